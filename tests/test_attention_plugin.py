"""CPU checks of the attention plugin ``plugins/lightq-sageattention``, as CI installs it (editable, without its
``kernel`` extra): registered under ``lightq.attention``, its kernel library the ``kernel`` extra, importing it
imports nothing heavy, and on the CPU or without the library it says why (the install command where the GPU would
do) instead of raising."""

import importlib.util
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lightq import plan
from lightq.attention import registry
from lightq.config import AttnQuantConfig
from lightq.errors import BackendUnavailable
from lightq.hardware import PROFILES

ROOT = Path(__file__).resolve().parents[1]
MISSING = importlib.util.find_spec("sageattention") is None


def test_registered_with_its_spec():
    assert "sageattention" in {ep.name for ep in entry_points(group=registry.GROUP)}, \
        "run pip install -e plugins/lightq-sageattention"
    registry.specs.cache_clear()
    spec = registry.specs()["sageattention"]
    assert spec.schemes == {"int8-sage": 8.0} and spec.requires == ("sageattention", "triton")


def test_pyproject_declares_entry_point_and_library():
    meta = tomllib.loads((ROOT / "plugins" / "lightq-sageattention" / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"][registry.GROUP] == {"sageattention": "lightq_sageattention:SPEC"}
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["project"]["dependencies"] == [core["name"]]
    assert meta["project"]["optional-dependencies"]["kernel"] == ["sageattention==1.0.6"]
    assert core["optional-dependencies"]["sageattention"] == ["lightq-sageattention[kernel]"]


def test_importing_the_plugin_imports_no_kernel_library():
    code = "import sys, lightq_sageattention; print('sageattention' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_plan_explains_why_not_and_auto_falls_back():
    mode = AttnQuantConfig(name="int8-sage-sageattention", scheme="int8-sage", backend="sageattention")
    for hw in ("cpu", "sm90"):
        p = plan.plan_attention(mode, PROFILES[hw])
        if MISSING or hw == "cpu":
            assert not p.ok and "int8-sage-sageattention cannot run here" in p.reason
        if hw == "cpu":  # no GPU: the blocking reason, not an install command that could not help
            assert "needs a CUDA GPU" in p.reason and "install" not in p.reason
        elif MISSING:
            assert "pip install 'sageattention==1.0.6'" in p.reason
    auto = plan.plan_attention(AttnQuantConfig(name="int8-sage-auto", scheme="int8-sage"), PROFILES["cpu"])
    assert auto.ok and auto.backend == "torch" and "sageattention:" in auto.reason


@pytest.mark.skipif(not MISSING, reason="sageattention is installed here")
def test_load_without_the_library_is_one_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="sageattention.*install: pip install 'sageattention==1.0.6'"):
        registry.specs()["sageattention"].load()
