"""The ``attn_quant`` group on the CPU: every mode file composes and plans (``skipped`` with a reason where it cannot
run), the attention backends are registered and listed, jobs record the mode, are never taken as the bf16 baseline,
and compose with I2V, block offload and sweeps; the benchmark's CPU-side pieces. (The seam: tests/test_attention.py.)"""

import csv
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lightq import plan
from lightq.attention import SCHEMES
from lightq.attention import registry as attention_registry
from lightq.attention.numerics import SCHEMES as NUMERIC_SCHEMES
from lightq.config import AttnQuantConfig, validate
from lightq.errors import LightqError
from lightq.hardware import PROFILES
from lightq.paths import conf_dir
from lightq.pipeline.graph import _is_baseline
from lightq.report import _is_baseline as row_is_baseline
from lightq.report import row

MODES = {p.stem: OmegaConf.load(p) for p in sorted((conf_dir() / "attn_quant").glob("*.yaml"))}


def test_scheme_names_agree_and_every_scheme_has_its_modes():
    assert SCHEMES == tuple(NUMERIC_SCHEMES)
    for scheme in SCHEMES:
        assert {f"{scheme}-torch", f"{scheme}-triton", f"{scheme}-auto"} <= set(MODES)
    for name, mode in MODES.items():
        assert mode.name == name and (mode.scheme == "none") == (name == "none")
        assert name.startswith(mode.scheme) or name == "none"
        assert mode.backend in ("auto", *attention_registry.specs(), "sageattention")


@pytest.mark.parametrize("hw", ["cpu", "sm80", "sm90"])
@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_plans_on_every_device(name, hw):
    mode, profile = MODES[name], PROFILES[hw]
    p = plan.plan_attention(mode, profile)
    assert p.component == "attn" and p.mode == name and p.scheme == mode.scheme
    if mode.scheme == "none":
        assert p.ok and p.backend is None
        return
    specs = attention_registry.specs()
    if mode.backend == "auto":
        assert p.ok and p.backend == ("torch" if hw == "cpu" or (hw == "sm80" and mode.scheme != "int8-sage")
                                      else "triton")
        return
    if mode.backend not in specs:
        assert not p.ok and "install: pip install -e plugins/lightq-sageattention" in p.reason
    else:
        assert p.ok == specs[mode.backend].can_implement(mode.scheme, profile)[0]
    if not p.ok:
        assert p.reason.startswith(f"attn_quant={name} cannot run here: ")
        assert p.reason.endswith(f"portable alternative: attn_quant={mode.scheme}-torch")


def test_triton_capabilities_are_the_formats():
    triton = attention_registry.specs()["triton"]
    assert triton.schemes == {"int8-sage": 8.0, "int8fp8-sage2": 8.9, "fp8-fa3": 8.9}
    ok, why = plan.plan_attention(MODES["fp8-fa3-triton"], PROFILES["sm80"]).ok, \
        plan.plan_attention(MODES["fp8-fa3-triton"], PROFILES["sm80"]).reason
    assert not ok and "8.9" in why


def test_registry_and_plan_modules_import_no_torch():
    code = ("import sys, lightq.plan, lightq.attention.registry, lightq.config; "
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_backends_cli_lists_the_attention_backends():
    out = subprocess.run([sys.executable, "-m", "lightq.backends", "--hardware", "sm80"], capture_output=True,
                         text=True, check=True).stdout
    table = out.split("attention backends (lightq.attention")[1]
    lines = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip()}
    assert "available here" in lines["torch"]
    assert "available here for int8-sage; not int8fp8-sage2" in lines["triton"] or "not here" in lines["triton"]


def test_validate_refuses_unknown_schemes_and_options():
    cfg = OmegaConf.structured({"attn_quant": AttnQuantConfig(name="x", scheme="int4")})
    with pytest.raises(LightqError, match="attn_quant.scheme='int4' is not an attention scheme"):
        validate(_full(cfg))
    cfg = OmegaConf.structured({"attn_quant": AttnQuantConfig(name="x", scheme="int8-sage", options={"k": 1})})
    with pytest.raises(LightqError, match="take no options"):
        validate(_full(cfg))


def _full(partial):
    from lightq.config import LightqConfig

    return OmegaConf.merge(OmegaConf.structured(LightqConfig), partial)


def test_a_quantized_attention_run_is_never_the_bf16_baseline():
    none = {"name": "none", "scheme": "none", "backend": "auto"}
    cfg = OmegaConf.create({"model": {"family": "wan2.1", "task": "t2v"}, "dit_quant": none, "t5_quant": none,
                            "attn_quant": MODES["int8-sage-torch"]})
    p = plan.plan_run(cfg, PROFILES["cpu"])
    assert set(p) == {"t5", "dit", "attn"} and not _is_baseline(p)
    res = {"status": "ok", "components": {c: q.as_dict() for c, q in p.items()}, "choices": {"model": "tiny"}}
    assert not row_is_baseline(res)
    r = row("job", res, {})
    assert r["attn_mode"] == "int8-sage-torch" and r["attn_backend"] == "torch" and r["psnr_db"] != "baseline"


@pytest.fixture(scope="module")
def i2v_offload_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn-sweep")
    proc = subprocess.run([sys.executable, "-m", "lightq", "-m", "model=tiny-i2v", "offload=block", "model.frames=5",
                           "attn_quant=none,int8fp8-sage2-torch,fp8-fa3-triton", f"hydra.sweep.dir={tmp / 'sweep'}"],
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    return tmp / "sweep", proc


def test_sweep_records_modes_skips_and_quality(i2v_offload_sweep):
    root, proc = i2v_offload_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for f in root.rglob("result.json"):
        res = json.loads(f.read_text())
        results[res["choices"]["attn_quant"]] = res
    assert results["fp8-fa3-triton"]["status"] == "skipped"
    assert "portable alternative: attn_quant=fp8-fa3-torch" in results["fp8-fa3-triton"]["reason"]
    quant = results["int8fp8-sage2-torch"]
    assert quant["status"] == "ok" and quant["components"]["attn"]["backend"] == "torch"
    assert quant["components"]["attn"]["reason"] == "requested: torch"
    assert 0.99 < quant["quality"]["latent_cosine"] < 1.0
    rows = {r["attn_mode"]: r for r in csv.DictReader((root / "results.csv").open())}
    assert rows["none"]["psnr_db"] == "baseline" and rows["int8fp8-sage2-torch"]["psnr_db"] not in ("", "baseline")
    assert rows["fp8-fa3-triton"]["status"] == "skipped" and "attn_mode" in (root / "results.md").read_text()


def test_bench_attention_pieces_on_the_cpu():
    """The GPU benchmark's float64 rows, table and target line (timing itself needs CUDA)."""
    from lightq.attention.inputs import wan_like_qkv
    from lightq.attention.numerics import exact_attention
    from lightq.bench import attention as bench
    from lightq.bench.step import attention_impls

    q, k, v = wan_like_qkv(1, 300, 2, 64, torch.bfloat16, seed=2)
    rows = torch.tensor([0, 150, 299])
    torch.testing.assert_close(bench.exact_rows(q, k, v, rows), exact_attention(q, k, v)[:, rows])
    assert set(bench.default_modes()) >= {"int8-sage-triton", "int8fp8-sage2-triton", "fp8-fa3-triton"}
    table = [bench.AttentionRow(32760, "sdpa cuDNN bf16", "torch", 30.0, 600, 1.0, 1.5, 0.99999, 2e-3),
             bench.AttentionRow(32760, "int8-sage-triton", "triton", 15.0, 1200, 2.0, 3.0, 0.9999, 4e-3),
             bench.AttentionRow(32760, "fp8-fa3-triton", "", note="cannot run here")]
    md = bench.markdown(table, {"device": "test"}, 40)
    assert "| 32760 | int8-sage-triton | triton | 15.000 | 1200 | 2.00 | 3.00 | 0.999900 | 4.00e-03 |  |" in md
    assert "int8-sage-triton 2.00x cuDNN" in bench.targets(table) and ": met" in bench.targets(table)
    with pytest.raises(LightqError, match="not an attn_quant mode"):
        attention_impls(["int4"])
    assert attention_impls(["fp8-fa3-triton"])[0][1] is None  # cannot run on the CPU: its row says why


def test_bench_cli_needs_a_gpu():
    for args in (["attention"], ["step", "--attn", "int8-sage-triton"]):
        proc = subprocess.run([sys.executable, "-m", "lightq.bench", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip() == "error: python -m lightq.bench needs a CUDA GPU; " \
                                                               "none is visible here"
