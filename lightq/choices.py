"""Config-group choices on the command line, checked before Hydra composes anything.

``check_choices(argv)`` raises one ``LightqError`` for the first ``group=option`` whose option does not exist in
that group (sweep lists ``group=a,b`` are checked item by item), naming the valid options. Hydra itself would
answer with a multi-line message and exit 1. The options come from Hydra's own config loader over lightq's
config search path, so options registered in code or by plugins count as well as files. Values Hydra would
expand itself (``choice(...)``, ``glob(...)``, interpolations) and Hydra's own groups are left to Hydra.
"""

from __future__ import annotations

from .errors import LightqError


def _requested(argv: list[str]) -> list[tuple[str, str]]:
    """(group, option) pairs named by plain ``group=option[,option...]`` overrides."""
    pairs = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+").partition("=")
        if key.startswith(("hydra", "~")) or "." in key or any(c in value for c in "()${}[]*"):
            continue
        pairs += [(key, option) for option in value.split(",") if option]
    return pairs


def _listed(sources, group: str, kind) -> list[str]:
    """The names Hydra's config repository lists under ``group`` (``kind``: ``ObjectType.CONFIG`` its options,
    ``ObjectType.GROUP`` its sub-groups), read from the loader's config sources: the loader's own
    ``get_group_options`` copies the whole ConfigStore on every call."""
    found: set[str] = set()
    for source in sources:
        if source.is_group(config_path=group):
            found.update(source.list(config_path=group, results_filter=kind))
    return sorted(found)


def check_choices(argv: list[str]) -> None:
    pairs = _requested(argv)
    if not pairs:
        return
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    from .paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lightq"):
        sources = GlobalHydra.instance().config_loader().get_sources()
        groups = {g for g in _listed(sources, "", ObjectType.GROUP) if not g.startswith("hydra")}
        for group, option in pairs:
            if group not in groups:
                continue  # a plain config key (seed=3, prompt=...): Hydra checks it against the schema
            options = _listed(sources, group, ObjectType.CONFIG)
            if option not in options:
                hint = " (python -m lightq.backends: which backends can run here)" if group.endswith("_quant") else ""
                raise LightqError(f"{group}={option}: there is no such {group}; choose one of "
                                  f"{', '.join(options)}{hint}")
