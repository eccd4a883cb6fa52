"""The console scripts of pyproject.toml exist, and ``lightq``'s Hydra tab completion works in bash: the script
``lightq -sc install=bash`` prints, sourced, completes groups and options of a half-typed command line."""

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_console_script_names_a_callable():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"lightq", "lightq-convert", "lightq-report", "lightq-bench", "lightq-backends"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(import_module(module), attr)), name


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_of_the_lightq_command(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "lightq"  # what pip's console-script wrapper does: lightq.app:main under the name lightq
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.argv[0] = \"lightq\"; "
                      "from lightq.app import main; main()' \"$@\"\n")
    script.chmod(0o755)
    probe = ('eval "$(lightq -sc install=bash)"; COMP_LINE="lightq dit_quant=fp8-t"; COMP_POINT=${#COMP_LINE}; '
             'COMP_WORDS=(lightq dit_quant=fp8-t); COMP_CWORD=1; hydra_bash_completion; '
             'printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    r = subprocess.run(["bash", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    offered = set(r.stdout.split())
    assert {"dit_quant=fp8-torch", "dit_quant=fp8-triton"} <= offered and "dit_quant=none" not in offered, r.stdout
    assert "complete -o nospace -o default -F hydra_bash_completion lightq" in subprocess.run(
        ["lightq", "-sc", "install=bash"], env=env, capture_output=True, text=True, timeout=120).stdout
