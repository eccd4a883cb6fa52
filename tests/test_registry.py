"""Backend registry, specs and ``choose`` against fake hardware profiles; ``python -m lightq.backends``.

In-process tests replace ``registry.specs`` by a fixed set of specs. The CLI tests run in a subprocess whose
``PYTHONPATH`` holds a fake installed distribution (a ``.dist-info`` with ``lightq.backends`` entry points):
a usable plugin, one whose kernel library is missing, one whose entry point cannot load, one whose kernel library
is present (with a version) but fails on import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from lightq.backends import registry
from lightq.backends.spec import BackendSpec
from lightq.backends.torch_backend import SPEC as TORCH_SPEC
from lightq.backends.torch_backend import TorchBackend
from lightq.errors import BackendUnavailable
from lightq.hardware import PROFILES, Hardware

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MISSING = "lightq_test_no_such_kernel"

VLLM = BackendSpec(name="vllm", schemes={"fp8": 8.9, "int8": 7.5}, impl=f"{MISSING}.impl:Vllm",
                   requires=(MISSING,), install="pip install lightq-vllm", k_multiple=16, n_multiple=16)
SGL = BackendSpec(name="sgl", schemes={"fp8": 8.9, "int8": 8.0}, impl="json:JSONDecoder", requires=("json",),
                  install="pip install lightq-sgl", k_multiple=16, n_multiple=16)
DEEPGEMM = BackendSpec(name="deepgemm", schemes={"fp8-b128": 9.0}, impl="json:JSONDecoder", requires=("json",),
                       install="pip install lightq-deepgemm", k_multiple=128)


@pytest.fixture
def installed(monkeypatch):
    """Pretend these backends are installed (sgl and deepgemm "have" their library: ``json`` stands in)."""

    def use(*specs):
        monkeypatch.setattr(registry, "specs", lambda: {s.name: s for s in specs})

    use(TORCH_SPEC, VLLM, SGL, DEEPGEMM)
    return use


def test_auto_on_cpu_picks_torch_and_explains_every_rejection(installed):
    spec, reason = registry.choose("fp8", "auto", PROFILES["cpu"])
    assert spec is TORCH_SPEC
    assert reason.startswith("auto: torch (")
    # the device blocks first: installing a GPU library could not help on this machine, so no install command
    assert "vllm: needs a CUDA GPU (compute capability >= 8.9 for fp8); this machine has none" in reason
    assert "sgl: needs a CUDA GPU (compute capability >= 8.9 for fp8); this machine has none" in reason
    assert "install" not in reason
    assert reason.index("sgl:") < reason.index("vllm:")  # in preference order (fp8: sgl first outside the DiT)


@pytest.mark.parametrize("profile,scheme,expected,rejected", [
    ("sm80", "fp8", "torch", "sgl: needs compute capability >= 8.9 for fp8; this GPU is A100 (profile) (sm80)"),
    ("sm89", "fp8", "sgl", None),
    ("sm90", "int8", "sgl", "vllm:"),
    ("sm89", "fp8-b128", "torch", "deepgemm: needs compute capability >= 9.0 for fp8-b128"),
    ("sm90", "fp8-b128", "deepgemm", None),
    ("sm100", "int4-g128", "torch", None),
])
def test_auto_on_gpu_profiles(installed, profile, scheme, expected, rejected):
    spec, reason = registry.choose(scheme, "auto", PROFILES[profile])
    assert spec.name == expected
    if rejected:
        assert rejected in reason
    else:
        assert reason == f"auto: {expected}"


def test_shape_rules_are_checked(installed):
    spec, reason = registry.choose("fp8", "auto", PROFILES["sm90"], shape=(5120, 200))
    assert spec is TORCH_SPEC
    assert "sgl: needs in_features % 16 == 0 and out_features % 16 == 0, got [5120, 200]" in reason


def test_named_backend(installed):
    assert registry.choose("fp8", "torch", PROFILES["cpu"]) == (TORCH_SPEC, "requested: torch")
    spec, reason = registry.choose("fp8", "marlin", PROFILES["sm90"])
    assert spec is None
    assert reason == "backend 'marlin' is not installed (installed: deepgemm, sgl, torch, vllm)"
    spec, reason = registry.choose("fp8", "sgl", PROFILES["cpu"])
    assert spec is None and reason == "backend 'sgl' needs a CUDA GPU (compute capability >= 8.9 for fp8); this machine has none"
    spec, reason = registry.choose("fp8", "sgl", replace(PROFILES["cpu"], chosen=True))
    assert reason.endswith("; the CPU was chosen (hardware=cpu)")
    spec, reason = registry.choose("fp8", "vllm", PROFILES["sm90"])  # the GPU would do: the missing library, and how
    assert reason == f"backend 'vllm' needs the package '{MISSING}', which is not installed; install: pip install lightq-vllm"
    spec, reason = registry.choose("int4-g128", "sgl", PROFILES["sm90"])
    assert spec is None and "does not implement scheme 'int4-g128' (it has: fp8, int8)" in reason


def test_no_backend_for_scheme(installed):
    installed(VLLM)
    spec, reason = registry.choose("fp8", "auto", PROFILES["sm90"])
    assert spec is None
    assert reason.startswith("no installed backend implements 'fp8' here (vllm: ")
    spec, reason = registry.choose("int4-g128", "auto", PROFILES["sm90"])
    assert (spec, reason) == (None, "no installed backend implements 'int4-g128' here (none declares it)")


def test_candidates_follow_preference_then_name(installed):
    extra = BackendSpec(name="aaa", schemes={"fp8": None}, impl="json:JSONDecoder")
    installed(TORCH_SPEC, VLLM, SGL, extra)
    assert [s.name for s in registry.candidates("fp8")] == ["sgl", "vllm", "torch", "aaa"]
    assert [s.name for s in registry.candidates("fp8", "dit")] == ["vllm", "sgl", "torch", "aaa"]


ODD_SCHEMES = [None, 42, "", "FP8", "fp4", ("fp8",)]
ODD_SHAPES = [None, (0, 0), (-16, 32), (5120, 5120), (10**12, 3)]
ODD_HARDWARE = [Hardware("npu", "npu"), *PROFILES.values()]
# Inputs on which spec.py's can_implement raises today (reported to the lead; spec.py is not ours to change).
RAISES_TODAY = [
    ("fp8", Hardware("cuda-unknown", "cuda", None), None),  # CUDA device without a capability: None < 8.9
    ("fp8", PROFILES["sm90"], (5120,)),  # shape of the wrong length: unpacking fails
    ("fp8", PROFILES["sm90"], ("5120", "5120")),  # non-integer shape: str % int
    (["fp8"], PROFILES["sm90"], None),  # unhashable scheme: `in dict` fails
]


@pytest.mark.parametrize("spec", [TORCH_SPEC, VLLM, SGL, DEEPGEMM], ids=lambda s: s.name)
def test_can_implement_never_raises(spec):
    for hw in ODD_HARDWARE:
        for scheme in ODD_SCHEMES:
            for shape in ODD_SHAPES:
                ok, reason = spec.can_implement(scheme, hw, shape)
                assert isinstance(ok, bool) and isinstance(reason, str) and reason


@pytest.mark.parametrize("scheme,hw,shape", RAISES_TODAY, ids=["no-capability", "short-shape", "str-shape",
                                                               "list-scheme"])
def test_can_implement_never_raises_on_malformed_inputs(scheme, hw, shape):
    ok, reason = SGL.can_implement(scheme, hw, shape)
    assert isinstance(ok, bool) and isinstance(reason, str)


def test_is_available_never_raises_on_bad_requirement_names():
    for requires in [("",), ("a..b",), ("json.no_such_submodule.x",), (".relative",), (f"{MISSING}.sub",)]:
        spec = BackendSpec(name="odd", schemes={"fp8": None}, impl="x:y", requires=requires, install="pip install odd")
        ok, reason = spec.is_available(PROFILES["cpu"])
        assert ok is False and "install: pip install odd" in reason


def test_load_turns_an_import_time_runtime_error_into_backend_unavailable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = BackendSpec(name="broken", schemes={"fp8": None}, impl="raising_backend_impl:Backend",
                       install="pip install 'lightq-broken==1.0'")
    with pytest.raises(BackendUnavailable) as err:
        spec.load()
    msg = str(err.value)
    assert "backend 'broken' failed to load (RuntimeError: undefined symbol" in msg
    assert msg.endswith("install: pip install 'lightq-broken==1.0'")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("impl", [f"{MISSING}.impl:Backend", "json:NoSuchClass", "json"])
def test_load_reports_missing_module_or_class(impl):
    spec = BackendSpec(name="x", schemes={"fp8": None}, impl=impl, install="pip install lightq-x")
    with pytest.raises(BackendUnavailable, match=r"backend 'x' failed to load .*; install: pip install lightq-x"):
        spec.load()


def test_torch_spec_loads_its_backend():
    backend = TORCH_SPEC.load()
    assert isinstance(backend, TorchBackend) and backend.name == "torch"


def test_pyproject_registers_the_torch_backend():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"][registry.GROUP]["torch"]
    module, _, attr = entry.partition(":")
    assert (module, attr) == ("lightq.backends.torch_spec", "SPEC")


def test_reading_the_registry_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from lightq.backends import registry; registry.specs(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", "specs must be torch-free (plugins declare, implementations import)"


# ---------------------------------------------------------------- python -m lightq.backends, in a subprocess

FAKE_SPECS = '''
from lightq.backends.spec import BackendSpec

GOOD = BackendSpec(name="goodgpu", schemes={"fp8": 8.9, "fp8-b128": 9.0}, impl="json:JSONDecoder",
                   requires=("json",), install="pip install lightq-goodgpu")
MISSING = BackendSpec(name="missingkernel", schemes={"int8": 7.5}, impl="x:y", requires=("%s",),
                      install="pip install lightq-missingkernel")
RAISING = BackendSpec(name="raising", schemes={"fp8": None}, impl="raising_backend_impl:Backend",
                      requires=("fakekernel",), install="pip install 'fakekernel==3.1.4'")
''' % MISSING


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    """A directory that, on PYTHONPATH, looks like two installed distributions."""
    site = tmp_path_factory.mktemp("site")
    (site / "lightq_fake_specs.py").write_text(FAKE_SPECS)
    plugins = site / "lightq_fake_plugins-0.1.dist-info"
    plugins.mkdir()
    (plugins / "METADATA").write_text("Metadata-Version: 2.1\nName: lightq-fake-plugins\nVersion: 0.1\n")
    (plugins / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{registry.GROUP}]
        torch = lightq.backends.torch_spec:SPEC
        goodgpu = lightq_fake_specs:GOOD
        missingkernel = lightq_fake_specs:MISSING
        raising = lightq_fake_specs:RAISING
        brokenentry = lightq_no_such_plugin_module:SPEC
        """))
    # A kernel library whose version is readable from metadata but which must never be imported by the table.
    (site / "fakekernel").mkdir()
    (site / "fakekernel" / "__init__.py").write_text("raise RuntimeError('fakekernel was imported')\n")
    kernel = site / "fakekernel-3.1.4.dist-info"
    kernel.mkdir()
    (kernel / "METADATA").write_text("Metadata-Version: 2.1\nName: fakekernel\nVersion: 3.1.4\n")
    (kernel / "top_level.txt").write_text("fakekernel\n")
    return site


def run_table(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTS), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "lightq.backends", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=site)


def table_rows(stdout: str) -> dict[str, str]:
    """backend -> row of the linear-backend table (the first; the attention backends' table follows a blank line)."""
    lines = stdout.splitlines()
    assert lines[1].startswith("backend") and lines[2].startswith("-------"), stdout
    end = lines.index("") if "" in lines else len(lines)
    return {line.split()[0]: line for line in lines[3:end]}


def test_cli_table_for_a_gpu_profile(fake_site):
    proc = run_table(fake_site, "--hardware", "sm90")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lightq backends on H100 (profile) (sm90) (hardware=sm90)\n")
    rows = table_rows(proc.stdout)
    assert {"torch", "goodgpu", "missingkernel", "raising", "brokenentry"} <= set(rows)  # plus any installed
    import torch

    assert torch.__version__ in rows["torch"]
    assert rows["torch"].endswith("fp8 any, int8 any, fp8-b128 any, int4-g128 any, fp8-pertensor any  available here")
    assert "fp8 sm89+, fp8-b128 sm90+" in rows["goodgpu"] and rows["goodgpu"].endswith("available here")
    assert rows["missingkernel"].endswith(
        f"not here: needs the package '{MISSING}', which is not installed; install: pip install lightq-missingkernel")
    assert "3.1.4" in rows["raising"] and rows["raising"].endswith("available here")  # found, never imported
    assert "unusable: entry point failed to load: ModuleNotFoundError" in rows["brokenentry"]


def test_cli_table_for_sm80_names_the_least_capability_needed(fake_site):
    proc = run_table(fake_site, "--hardware", "sm80")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["goodgpu"].endswith("not here: needs compute capability >= 8.9; this GPU is A100 (profile) (sm80)")
    proc = run_table(fake_site, "--hardware", "sm89")  # only some schemes: each refused one with its reason
    assert table_rows(proc.stdout)["goodgpu"].endswith(
        "available here for fp8; not fp8-b128: needs compute capability >= 9.0 for fp8-b128; "
        "this GPU is L40S / RTX 4090 (profile) (sm89)")


def test_cli_deep_reports_import_failures(fake_site):
    proc = run_table(fake_site, "--hardware", "cpu", "--deep")
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["torch"].endswith("available here (loaded)")
    assert rows["goodgpu"].endswith("not here: needs a CUDA GPU (compute capability >= 8.9); the CPU was chosen "
                                    "(hardware=cpu)")
    assert rows["raising"].endswith(
        "not here: backend 'raising' failed to load (RuntimeError: undefined symbol: _ZN3c104cuda9SetDeviceEi "
        "(kernel library built against another torch)); install: pip install 'fakekernel==3.1.4'")


def test_cli_detected_hardware_and_bad_profile(fake_site):
    proc = run_table(fake_site)
    assert proc.returncode == 0, proc.stderr
    assert "(hardware=auto)" in proc.stdout.splitlines()[0] and "torch" in table_rows(proc.stdout)
    proc = run_table(fake_site, "--hardware", "sm75")
    assert proc.returncode == 2 and "invalid choice: 'sm75'" in proc.stderr


def test_loading_a_backend_keeps_the_attention_switches(tmp_path, monkeypatch):
    """A kernel library that flips torch's SDPA switches on import (vLLM does) must not leak that into the run."""
    import torch

    (tmp_path / "flips_sdpa_impl.py").write_text(
        "import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\ntorch.backends.cuda.enable_flash_sdp(False)\n"
        "class Impl:\n    def __init__(self, spec):\n        self.spec = spec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    BackendSpec(name="flips", schemes={"fp8": None}, impl="flips_sdpa_impl:Impl").load()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
