"""Shared checks of the adversarial suite: every case builds its own damaged input, then asserts the exit code,
one line naming the problem and the fix, no traceback, and that nothing the user had was lost or half-written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONVERT_CONF = REPO / "conf" / "convert.yaml"
FAST = ("model.frames=5", "sampler.steps=1", "model.height=32", "model.width=32")  # a whole tiny job in seconds


def one_line(text: str, *needles: str) -> str:
    """``text`` is exactly one non-empty line, holds no traceback and contains every needle (case-insensitive)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (symlinks by target name): what must not change."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def no_partials(root: Path) -> list[str]:
    """Temporaries left under ``root`` (none may be)."""
    return [str(p) for p in Path(root).rglob("*") if p.name.endswith((".partial", ".part"))
            or (p.name.startswith(".") and ".tmp" in p.name)]


def convert_cfg(*args: str):
    """The converter's config as ``python -m lightq.convert <args>`` composes it (without Hydra's own keys)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(CONVERT_CONF), OmegaConf.from_dotlist(["progress=false", *args]))
    cfg.pop("defaults")
    cfg.pop("hydra")
    return cfg


@pytest.fixture
def convert_cli(capsys):
    """Run the converter's command-line task in this process: returns (exit code, stderr, stdout)."""
    from lightq.convert import _task

    def run(*args: str) -> tuple[int, str, str]:
        try:
            _task(convert_cfg(*args))
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.err, captured.out

    return run


@pytest.fixture(scope="session")
def tiny_dit_folder():
    """The tiny model's float DiT as shipped (official layout: index + chunks), read-only for the tests."""
    from lightq.models.tiny import ensure_tiny

    return ensure_tiny("tiny")


@pytest.fixture
def lightq_cli(capsys, monkeypatch):
    """Run ``python -m lightq <args>`` (``lightq.app.main``) in this process: returns (exit code, stderr, stdout)."""
    import sys

    from lightq import app

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lightq", *args])
        try:
            app.main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return code, captured.err, captured.out

    return run


def compose(*overrides: str):
    """The job config ``python -m lightq <overrides>`` composes (prompts made literal as the CLI does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightq import config
    from lightq.overrides import literal_prompts
    from lightq.paths import conf_dir

    config.register()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=literal_prompts(["hardware=cpu", *overrides]))


def run_job(out: Path, *overrides: str) -> dict:
    """One job run in this process as a single run does it (validation, then the pipeline), into ``out``."""
    from lightq.sweep import run_job as run

    return run(compose(*overrides), out, {"overrides": list(overrides)}, False)


def input_error(result: dict, *needles: str) -> str:
    """``result`` is a job that failed on bad input: exit 2, one line naming the problem and the fix."""
    from lightq.job import exit_code

    assert result["status"] == "failed" and result.get("error_kind") == "input", result
    assert exit_code(result) == 2
    return one_line(result["reason"], *needles)
