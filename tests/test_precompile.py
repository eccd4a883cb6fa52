"""The tables of recorded kernel specializations (``lightq.kernels.precompile``) on the CPU: which jobs have a
kind, how tables are read, merged and written, which entries still fit lightq's kernels, and that the shipped
tables fit them. Compiling them in the background needs a GPU: tests/gpu/test_precompile_gpu.py."""

import importlib.util
import json
from types import SimpleNamespace

import pytest

from lightq.plan import ComponentPlan

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (test extra)")


def _cfg(**model):
    return SimpleNamespace(model=SimpleNamespace(**{"dit_arch": "14b", "t5_arch": "umt5-xxl", "clip_arch": None,
                                                    **model}))


def test_job_kind_names_the_components_on_lightq_kernels():
    from lightq.pipeline.components import job_kind

    plans = {"dit": ComponentPlan("dit", "fp8-triton", "fp8", "triton", True, ""),
             "t5": ComponentPlan("t5", "int8-auto", "int8", "vllm", True, ""),
             "attn": ComponentPlan("attn", "int8-sage-triton", "int8-sage", "triton", True, ""),
             "clip": ComponentPlan("clip", "fp8-triton", "fp8", "triton", False, "cannot run here")}
    assert job_kind(_cfg(), plans) == "attn=int8-sage-triton@14b;dit=fp8-triton@14b"
    none = {"dit": ComponentPlan("dit", "none", "none", None, True, "bf16")}
    assert job_kind(_cfg(), none) is None


def test_no_precompile_off_the_gpu():
    from lightq.hardware import resolve
    from lightq.pipeline.components import kernel_precompile

    plans = {"dit": ComponentPlan("dit", "fp8-triton", "fp8", "triton", True, "")}
    assert kernel_precompile(_cfg(), resolve("cpu"), plans) is None


@pytest.fixture
def precompile(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    from lightq.kernels import precompile, tuned_configs

    monkeypatch.setattr(tuned_configs, "TABLE_DIR", tmp_path / "shipped")
    monkeypatch.setattr(tuned_configs, "arch", lambda: "sm90")
    monkeypatch.delenv(precompile.TABLE_ENV, raising=False)
    monkeypatch.setattr(precompile, "_recorded", {})
    (tmp_path / "shipped").mkdir()
    return precompile


def _spec(fn, key, **extra):
    import inspect

    py = fn.fn  # the kernel's Python function (compiled or, under TRITON_INTERPRET, interpreted)
    return {"name": f"{py.__module__}.{py.__qualname__}",
            "signature": {a: "i32" for a in inspect.signature(py).parameters},
            "key": key, "options": {"num_warps": 4, "extern_libs": [["libdevice", "/elsewhere/libdevice.10.bc"]]},
            **extra}


def _act_quant_kernel():
    from lightq.kernels.act_quant import _act_quant_kernel

    return _act_quant_kernel


@needs_triton
def test_tables_merge_the_shipped_one_and_ones_own(precompile, tmp_path, monkeypatch):
    fn = _act_quant_kernel()
    entry = lambda key: [fn.fn.__module__, fn.fn.__name__, _spec(fn, key)]  # noqa: E731
    shipped = {"arch": "sm90", "kinds": {"k": {"compiler": "3.6.0", "entries": [entry("a"), entry("b")]}}}
    (tmp_path / "shipped" / "sm90-specializations.json").write_text(json.dumps(shipped))
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"arch": "sm90", "kinds": {"k": {"compiler": "3.7.1", "entries": [entry("b"),
                                                                                             entry("c")]},
                                                         "other": {"entries": [entry("d")]}}}))
    monkeypatch.setenv(precompile.TABLE_ENV, str(own))
    assert [spec["key"] for _, _, spec in precompile.recorded("k")] == ["a", "b", "c"]
    assert precompile.recorded("missing") == []


@needs_triton
def test_an_unreadable_table_is_no_table(precompile, tmp_path, caplog):
    path = tmp_path / "shipped" / "sm90-specializations.json"
    path.write_text("{not json")
    assert precompile.recorded("k") == []
    assert "unreadable" in caplog.text


@needs_triton
def test_an_entry_fits_only_the_kernel_and_parameters_it_names(precompile):
    fn = _act_quant_kernel()
    assert precompile._fits(fn, _spec(fn, "k"))
    renamed = _spec(fn, "k")
    renamed["signature"] = {("old_" + a if a == "M" else a): t for a, t in renamed["signature"].items()}
    assert not precompile._fits(fn, renamed)
    assert not precompile._fits(fn, {**_spec(fn, "k"), "name": "lightq.kernels.act_quant.gone"})
    assert precompile._kernel("lightq.kernels.act_quant", "_act_quant_kernel") is fn
    assert precompile._kernel("lightq.kernels.act_quant", "act_quant") is None  # an op, not a kernel
    assert precompile._kernel("lightq.kernels.gone", "x") is None


@needs_triton
def test_recording_keeps_lightq_kernels_without_machine_paths(precompile, monkeypatch, tmp_path):
    import triton

    fn = _act_quant_kernel()
    monkeypatch.setenv(precompile.DUMP_ENV, str(tmp_path / "rec.json"))
    monkeypatch.setattr(precompile, "_recording_kind", "dit=fp8-triton@14b")
    before = precompile._launch_compiles
    for module, warmup in (("lightq.kernels.act_quant", False), ("someone.elses", False),
                           ("lightq.kernels.act_quant", True)):
        info = SimpleNamespace(module=module, name=fn.fn.__name__)
        data = json.dumps({**_spec(fn, f"{module}-{warmup}"), "target": {"backend": "cuda", "arch": 90}})
        precompile._on_compile(key="k", repr="r", fn=info, compile={"specialization_data": data},
                               is_manual_warmup=warmup, already_compiled=False)
    assert precompile._launch_compiles == before + 1  # a preload (manual warm-up) is not a launch's compile
    recorded = precompile._recorded["dit=fp8-triton@14b"]
    assert sorted(k[2] for k in recorded) == ["lightq.kernels.act_quant-False", "lightq.kernels.act_quant-True"]
    spec = next(iter(recorded.values()))
    assert "extern_libs" not in spec["options"] and "target" not in spec and spec["options"]["num_warps"] == 4

    precompile.dump(tmp_path / "rec.json")
    table = json.loads((tmp_path / "rec.json").read_text())
    kind = table["kinds"]["dit=fp8-triton@14b"]
    assert table["arch"] == "sm90" and kind["compiler"] == triton.__version__ and len(kind["entries"]) == 2
    precompile.dump(tmp_path / "rec.json")  # again: merged, not doubled
    assert len(json.loads((tmp_path / "rec.json").read_text())["kinds"]["dit=fp8-triton@14b"]["entries"]) == 2
    monkeypatch.setenv(precompile.TABLE_ENV, str(tmp_path / "rec.json"))
    read_back = precompile.recorded("dit=fp8-triton@14b")
    assert len(read_back) == 2 and all(precompile._fits(fn, spec) for _, _, spec in read_back)  # order kept


@needs_triton
def test_dump_replaces_a_kind_recorded_under_another_triton(precompile, tmp_path):
    fn = _act_quant_kernel()
    path = tmp_path / "t.json"
    old = {"arch": "sm90", "kinds": {"k": {"compiler": "0.0.1", "entries": [[fn.fn.__module__, fn.fn.__name__,
                                                                           _spec(fn, "old")]]},
                                     "kept": {"compiler": "0.0.1", "entries": []}}}
    path.write_text(json.dumps(old))
    precompile._recorded["k"] = {(fn.fn.__module__, fn.fn.__name__, "new"): _spec(fn, "new")}
    precompile.dump(path)
    table = json.loads(path.read_text())
    assert [e[2]["key"] for e in table["kinds"]["k"]["entries"]] == ["new"]
    assert table["kinds"]["kept"] == old["kinds"]["kept"]


@needs_triton
def test_the_shipped_tables_fit_lightqs_kernels():
    """A shipped entry that no longer fits its kernel is a kernel compiled inside the user's first step: re-record
    the table on the GPU (docs/BENCHMARKS.md, "Kernel warm-up") or delete the kind's entries."""
    from lightq.kernels import precompile, tuned_configs

    paths = sorted(tuned_configs.TABLE_DIR.glob("*-specializations.json"))
    for path in paths:
        table = json.loads(path.read_text())
        assert table["arch"] == path.name.split("-")[0]
        for kind, entry in table["kinds"].items():
            assert entry["entries"], kind
            for module, name, spec in entry["entries"]:
                fn = precompile._kernel(module, name)
                assert fn is not None and precompile._fits(fn, spec), f"{path.name}: {kind}: {module}.{name}"
                assert not set(precompile.MACHINE_FIELDS) & set(spec["options"]), (path.name, kind, name)
