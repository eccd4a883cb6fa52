"""CPU checks of the six kernel plugins (``plugins/lightq-*``), as CI sees them: installed editable without their
``kernel`` extra (the kernel library).

Each plugin must register its spec under ``lightq.backends``, declare its kernel library as its ``kernel`` extra
(and the core's extra of the plugin's name must pull it), explain
on the CPU (without raising) why it cannot run, with the install command, import nothing heavy at package import,
and turn a missing library into one BackendUnavailable naming the install command.
Install them first: ``pip install -e plugins/lightq-vllm -e plugins/lightq-sgl ...`` (the README's test command).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lightq.backends.registry import GROUP, specs
from lightq.errors import BackendUnavailable
from lightq.hardware import PROFILES

ROOT = Path(__file__).resolve().parents[1]
# plugin name -> (import name of the package, kernel library import name, pip requirement prefix or None)
PLUGINS = {
    "vllm": ("lightq_vllm", "vllm", "vllm"),
    "sgl": ("lightq_sgl", "sgl_kernel", "sglang-kernel"),
    "torchao": ("lightq_torchao", "torchao", "torchao"),
    "deepgemm": ("lightq_deepgemm", "vllm", "vllm"),
    "marlin": ("lightq_marlin", "vllm", "vllm"),
    "q8f": ("lightq_q8f", "q8_kernels", None),  # not on the package index: documented install, no dependency
}
KERNEL_MODULES = ("vllm", "sgl_kernel", "torchao", "deep_gemm", "q8_kernels", "q8_kernels_cuda")


def _library_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(PLUGINS[name][1]) is None
    except Exception:  # a broken install counts as missing
        return True


def test_every_plugin_is_registered_under_the_entry_point_group():
    registered = {ep.name for ep in entry_points(group=GROUP)}
    missing = sorted(set(PLUGINS) - registered)
    assert not missing, ("plugins not installed: " + ", ".join(missing) + "; run pip install "
                         + " ".join(f"-e plugins/lightq-{m}" for m in missing))


def test_registry_lists_the_torch_backend_and_all_six_plugins():
    specs.cache_clear()
    assert set(specs()) >= {"torch", *PLUGINS}
    for name in PLUGINS:
        spec = specs()[name]
        assert spec.schemes, f"{name}: entry point failed to load ({spec.description})"


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_pyproject_declares_entry_point_and_kernel_extra(name):
    meta = tomllib.loads((ROOT / "plugins" / f"lightq-{name}" / "pyproject.toml").read_text())
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    package, _, requirement = PLUGINS[name]
    assert meta["project"]["entry-points"][GROUP] == {name: f"{package}:SPEC"}
    deps = meta["project"]["dependencies"]
    assert core["name"] in deps, f"{name} must depend on the core distribution {core['name']}: {deps}"
    if requirement is not None:
        kernel = meta["project"]["optional-dependencies"]["kernel"]
        assert any(d.startswith(requirement) for d in kernel), f"{name}[kernel] must pull {requirement}: {kernel}"
        assert not any(d.startswith(requirement) for d in deps), f"{requirement} must be the kernel extra only: {deps}"
        assert core["optional-dependencies"][name] == [f"lightq-{name}[kernel]"]
    else:
        assert core["optional-dependencies"][name] == [f"lightq-{name}"]


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_cpu_rejection_explains_itself_without_raising(name):
    spec = specs()[name]
    cpu = PROFILES["cpu"]
    ok, why = spec.is_available(cpu)
    assert ok is False and why
    for scheme in spec.schemes:
        ok, why = spec.can_implement(scheme, cpu, (1536, 1536))
        assert ok is False and why.startswith("needs a CUDA GPU (compute capability >= ") and "this machine has none" in why
        assert "install" not in why, "installing the library cannot help on a machine without a GPU"
    if _library_missing(name):  # where the GPU would do, the missing library is named with its install command
        scheme = max(spec.schemes, key=lambda s: spec.schemes[s])
        gpu = next(hw for hw in sorted((h for h in PROFILES.values() if h.is_cuda), key=lambda h: h.capability)
                   if hw.capability >= spec.schemes[scheme] and hw.capability <= (spec.max_capability or 99))
        ok, why = spec.can_implement(scheme, gpu)
        assert ok is False and spec.install in why and why.startswith(f"needs the package '{PLUGINS[name][1]}'")


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_importing_the_plugin_imports_no_kernel_library(name):
    package = PLUGINS[name][0]
    code = (f"import sys, {package}; heavy = [m for m in {KERNEL_MODULES!r} if m in sys.modules]; "
            f"print(','.join(heavy)); assert {package}.SPEC.name == {name!r}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"importing {package} imported {run.stdout.strip()}"


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_load_without_the_library_is_one_backend_unavailable(name):
    if not _library_missing(name):
        pytest.skip(f"{PLUGINS[name][1]} is installed here")
    spec = specs()[name]
    with pytest.raises(BackendUnavailable) as err:
        spec.load()
    assert name in str(err.value) and spec.install in str(err.value)


# Declared hardware and shape rules, checked with the library requirement lifted (the specs are plain data).
WAN_NK = [(1536, 1536), (8960, 1536), (1536, 8960), (5120, 5120), (13824, 5120), (5120, 13824), (128, 256)]
EXPECTED = {  # (name, scheme): (lowest profile that runs it, a profile that must not)
    ("vllm", "fp8"): ("sm89", "sm80"), ("vllm", "int8"): ("sm80", None),
    ("sgl", "fp8"): ("sm89", "sm80"), ("sgl", "int8"): ("sm80", None),
    ("torchao", "int8"): ("sm80", None),
    ("deepgemm", "fp8-b128"): ("sm90", "sm100"),
    ("marlin", "int4-g128"): ("sm80", None),
    ("q8f", "fp8"): ("sm89", "sm90"), ("q8f", "int8"): ("sm89", "sm90"),
}


@pytest.mark.parametrize("name,scheme", sorted(EXPECTED))
def test_declared_capabilities_and_wan_shapes(name, scheme):
    spec = dataclasses.replace(specs()[name], requires=())
    runs_on, refused_on = EXPECTED[(name, scheme)]
    for n, k in WAN_NK:
        ok, why = spec.can_implement(scheme, PROFILES[runs_on], (n, k))
        assert ok, f"{name} {scheme} [{n}, {k}] on {runs_on}: {why}"
    if refused_on is not None:
        ok, why = spec.can_implement(scheme, PROFILES[refused_on], (1536, 1536))
        assert not ok and why
    ok, why = spec.can_implement(scheme, PROFILES[runs_on], (100, 100))
    assert not ok and "100" in why, f"{name} must refuse a [100, 100] weight"


@pytest.mark.parametrize("fails", (False, True), ids=("imports", "raises"))
def test_import_vllm_restores_the_attention_backend_switches(tmp_path, monkeypatch, fails):
    """vLLM's CUDA platform module turns cuDNN attention off when imported; ``import_vllm`` must undo that, also
    when the import fails half-way. A stand-in module does what vLLM's does."""
    from lightq.models.attention import sdpa_switches
    from lightq_vllm.importing import import_vllm

    (tmp_path / "flips_sdpa.py").write_text(
        "import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\ntorch.backends.cuda.enable_flash_sdp(False)\n"
        + ("raise ImportError('half-way')\n" if fails else "VALUE = 1\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flips_sdpa", raising=False)
    before = sdpa_switches()
    assert before[0] and before[3], "flash and cuDNN attention are on by default"
    if fails:
        with pytest.raises(ImportError, match="half-way"):
            import_vllm("flips_sdpa")
    else:
        assert import_vllm("flips_sdpa").VALUE == 1
    assert sdpa_switches() == before


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_known_plugin_table_matches_the_spec(name):
    """``registry.KNOWN_PLUGINS`` keeps a plugin's modes where it is not installed: its schemes must be the spec's."""
    from lightq.backends.registry import KNOWN_PLUGINS

    assert set(KNOWN_PLUGINS[name].schemes) == set(specs()[name].schemes)
    assert f"plugins/lightq-{name}" in KNOWN_PLUGINS[name].install
