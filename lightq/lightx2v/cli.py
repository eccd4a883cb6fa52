"""``from_lightx2v=cfg.json`` on lightq's command line: each JSON becomes an option of the config group
``lightx2v`` (``conf/config.yaml`` lists it with no default), so Hydra composes it like any other choice.

``expand(argv)`` imports every file named by ``from_lightx2v=a.json`` or ``from_lightx2v=a.json,b.json`` (a sweep)
through ``importer.import_config``, stores one config per file in Hydra's ConfigStore and replaces the argument
with ``lightx2v=<name>[,<name>...]``. That config overrides the groups' choices in its defaults list and sets its
values after every group; so, in any order on the command line:

- Hydra's flags (``--cfg job``, ``-m``, ``--multirun``) work before or after it;
- the user's own ``group=option`` and ``key=value`` beat the JSON's (Hydra applies the command line last);
- ``-m from_lightx2v=a.json,b.json`` sweeps over the configs, one job each (``lightx2v=<name>`` in the job's
  folder name).

``from_lightx2v.model_cls=<class>`` is LightX2V's ``--model_cls`` (it applies to every JSON of the command line).
Each job's config holds the import record at ``from_lightx2v`` (file, model class, kernel choices, notes), which
result.json keeps.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LightqError
from .importer import Imported, import_config, literal

GROUP = "lightx2v"
KEY = "from_lightx2v"
CLASS_KEY = "from_lightx2v.model_cls"


def _values(arg: str) -> list[str]:
    """The file(s) of ``from_lightx2v=...``: a value or a comma sweep, quoted or not (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except HydraException as exc:
        raise LightqError(f"{arg}: not a path or a comma-separated list of paths ({exc})") from None
    items = value.list if isinstance(value, ChoiceSweep) else [value]
    if not all(isinstance(v, str) for v in items):
        raise LightqError(f"{arg}: give the path of a LightX2V JSON config (or several, comma-separated)")
    return [str(v) for v in items]


def _name(path: str, taken: set[str]) -> str:
    """A readable option name for ``path``: its stem, made unique."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem) or "config"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def node(imported: Imported) -> dict:
    """The Hydra config of one import: group overrides, then its values (escaped: data, never interpolated)."""
    cfg: dict = {"defaults": [{f"override /{g}": o} for g, o in imported.choices.items()] + ["_self_"]}
    for dotted, value in imported.values.items():
        *parents, leaf = dotted.split(".")
        here = cfg
        for p in parents:
            here = here.setdefault(p, {})
        here[leaf] = literal(value)
    cfg[KEY] = literal(imported.record())
    return cfg


def expand(argv: list[str]) -> list[str]:
    """``argv`` (without the program name) with ``from_lightx2v=`` replaced (see module doc); raises LightqError
    (a LightX2VError for a config lightq cannot run) naming the key and the file."""
    hits = [a for a in argv if a.startswith(f"{KEY}=")]
    classes = [a for a in argv if a.startswith(f"{CLASS_KEY}=")]
    if not hits:
        if classes:
            raise LightqError(f"{classes[0]} is LightX2V's --model_cls for a from_lightx2v= config: add "
                              "from_lightx2v=<config.json>")
        return argv
    if len(hits) > 1:
        raise LightqError(f"from_lightx2v= is given {len(hits)} times: give it once (several configs: "
                          "-m from_lightx2v=a.json,b.json)")
    model_cls = classes[-1].split("=", 1)[1] if classes else None
    from hydra.core.config_store import ConfigStore

    store, taken, names = ConfigStore.instance(), set(), []
    for path in _values(hits[0]):
        imported = import_config(path, model_cls)
        name = _name(path, taken)
        store.store(group=GROUP, name=name, node=node(imported), package="_global_")
        names.append(name)
    replaced = f"{GROUP}={','.join(names)}"
    return [replaced if a == hits[0] else a for a in argv if a not in classes]
