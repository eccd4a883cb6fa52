"""LoRA on the GPU: the fused triton block's side paths, and the issue-19 targets (``python -m lightq.bench lora``).

Run on the GPU machine: ``python -m pytest tests/gpu/test_lora_gpu.py -q -n 0 -s`` (``-s`` prints the bench table).
Skipped without CUDA / triton.

- the fused fp8 / int8 block with an unmerged LoRA (quantized down-projections, docs/LORA.md): strength 0 gives the
  no-LoRA fused block's output bit for bit; its LoRA contribution (output with minus output without) matches the
  unfused triton block's (the same codes through QLinear.forward) within 1% relative L2, and the unfused
  torch-backend block's (bf16 down-projection on the bf16 activation) within 8%: they differ by the activation's
  quantization error (a few percent of the contribution) and, fp8, A's (3 mantissa bits: about 2**-4 / sqrt(3) rms
  relative); the fused block with bf16 down-projections stays within 5% of the torch block as before;
- targets at 14B, 480p, ``fp8-triton`` (fused, fast_accum), rank 64 on every block linear: the unmerged block within
  5% of the block without LoRA, the merged load within 1.2x of the load without LoRA (on the 2-block build; the
  whole DiT's load: ``python -m lightq.bench lora --load-layers 40``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from .conftest import CAP, CUDA, SCHEMES, TRITON

pytestmark = TRITON


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_block_side_paths(scheme, tmp_path):
    from lightq.bench import lora as bench
    from lightq.bench.linear import Backends, discover_modes
    from lightq.models.rope import rope_tables
    from lightq.models.wan_dit import DIT_ARCHS
    from lightq.quant.method import QuantMethod

    arch = dataclasses.replace(DIT_ARCHS["1.3b"], num_layers=1)
    weights, lora_path = bench.write_model_and_lora(arch, 32, tmp_path)
    (mode, _, spec), = discover_modes([f"{scheme}-triton"])
    backend = Backends().get(spec, mode)[0]
    methods = {"fused": (QuantMethod(scheme, backend, component="dit"), True),
               "fused bf16 down": (QuantMethod(scheme, backend, component="dit"), False),
               "unfused": (QuantMethod(scheme, backend, fuse=False, component="dit"), True),
               "torch": (QuantMethod.portable(scheme, "dit"), True)}
    g = torch.Generator(device="cuda").manual_seed(0)
    grid = (3, 16, 20)
    tokens = torch.randn(1, grid[0] * grid[1] * grid[2], arch.dim, device="cuda", generator=g)
    e0 = torch.randn(1, 6, arch.dim, device="cuda", generator=g) * 0.1
    text = torch.randn(1, 512, arch.dim, device="cuda", generator=g).bfloat16()
    args = (tokens, e0, rope_tables(grid, arch.head_dim, torch.device("cuda")), text, None, torch.bfloat16)
    out = {}
    with torch.no_grad():
        for name, (method, quantized_down) in methods.items():
            plain, _, _ = bench.load(arch, weights, method, None)
            lora, _, _ = bench.load(arch, weights, method, lora_path, "unmerged", quantized_down)
            assert (type(lora.blocks[0]).__name__ == "FusedBlock") == name.startswith("fused")
            out[name] = (plain.blocks[0](*args), lora.blocks[0](*args))
            if name == "fused":
                qkv = lora.blocks[0].self_attn.qkv_lora
                assert qkv is not None and qkv.codes_scheme == scheme and lora.blocks[0].ffn[2].lora is not None
                lora.lora_stack.set_strengths(lora, [0.0])
                assert torch.equal(lora.blocks[0](*args), out[name][0]), "strength 0 changed the fused block"
    contribution = {k: with_lora - without for k, (without, with_lora) in out.items()}
    assert contribution["torch"].norm() > 0.02 * out["torch"][0].norm(), "the LoRA barely changes the block"
    assert _rel(contribution["fused"], contribution["unfused"]) < 0.01
    assert _rel(contribution["fused"], contribution["torch"]) < 0.08
    assert _rel(contribution["fused bf16 down"], contribution["torch"]) < 0.05


@pytest.mark.skipif(CUDA and torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
                    reason="the 14B rows need 60 GiB of GPU memory")
@pytest.mark.skipif(CAP < (8, 9), reason="fp8 needs compute capability 8.9")
def test_targets_14b_fp8_triton_rank64():
    from lightq.bench import lora as bench

    rows = {r.case: r for r in bench.run("14b", "fp8-triton+fast_accum", rank=64, layers=2, iters=10, repeat=2)}
    base, unmerged, merged = rows["no LoRA"], rows["unmerged rank 64"], rows["merged rank 64"]
    assert "down fp8" in unmerged.note, unmerged.note
    assert unmerged.block_ms <= 1.05 * base.block_ms, f"unmerged block {unmerged.block_ms} ms vs {base.block_ms} ms"
    assert merged.load_s <= 1.2 * base.load_s, f"merged load {merged.load_s} s vs {base.load_s} s"
    assert merged.block_err < base.block_err and unmerged.block_err < base.block_err, "the LoRA is not applied"
