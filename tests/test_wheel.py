"""The built wheel carries its configs: installed into a fresh venv, ``python -m lightq`` runs from any directory.

The venv gets only the wheel; its dependencies (torch, hydra, ...) are reached through a plain ``.pth`` line
naming this interpreter's site-packages, which does not execute that folder's own .pth files — so the
development (editable) install of lightq stays invisible and the wheel's copy is the one that runs.
"""

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    build_dir = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                           str(REPO)], capture_output=True, text=True, env={**os.environ,
                                                                           "TMPDIR": str(build_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("lightq_wan-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_contains_configs(wheel):
    import zipfile

    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "lightq/conf/config.yaml" in names
    entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "[console_scripts]\nlightq = lightq.app:main" in entry_points
    for group in ("model", "dit_quant", "t5_quant", "clip_quant", "attn_quant", "offload", "hardware", "sampler"):
        assert any(n.startswith(f"lightq/conf/{group}/") and n.endswith(".yaml") for n in names), group


def test_installed_wheel_runs_from_any_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "host_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a worktree on the path would win
    where = subprocess.check_output([py, "-c", "import lightq; print(lightq.__file__)"], cwd=work, text=True, env=env)
    assert str(site) in where, f"the wheel's lightq must be the one imported, got {where}"
    proc = subprocess.run([py, "-m", "lightq", "dit_quant=fp8-torch"], cwd=work, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = list((work / "outputs").rglob("result.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())
    assert res["status"] == "ok" and res["components"]["dit"]["backend"] == "torch"
    assert (results[0].parent / "video.mp4").stat().st_size > 0
