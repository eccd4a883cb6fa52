"""The fused Wan block's unmerged LoRA checked site by site against the unfused block's side paths (shared by
tests/test_triton_backend.py, on the CPU interpreter, and tests/gpu/test_lora_gpu.py).

A site is one call of a quantized side path (``LowRankPath.add_codes``) during a block forward: the GEMM output
before the path, the activation codes and scales it was given, the output after it, and whether those codes are
the very tensors the base GEMM just before it read (the side path shares its linear's quantized activation,
docs/LORA.md). ``side_path_sites`` compares each site of a fused block with the unfused model's path(s) of the same
linear(s) applied to that same input: the joint q/k/v path against the separate q, k and v paths on their thirds.
Comparing sites rather than whole blocks keeps the rounding noise of the rest of the block out of the comparison.
"""

from __future__ import annotations

import dataclasses

import torch

from lightq.quant.lora import LowRankPath

QKV = ("self_attn.q", "self_attn.k", "self_attn.v")


@dataclasses.dataclass
class Site:
    path: LowRankPath
    before: torch.Tensor
    xq: torch.Tensor
    sx: torch.Tensor
    after: torch.Tensor
    base_input: bool  # xq / sx are the tensors the base GEMM just before this path read


def recorded_sites(monkeypatch, backend, block, args) -> list[Site]:
    """The sites of one forward ``block(*args)`` (``monkeypatch``: a pytest MonkeyPatch whose context is used)."""
    add, gemm = LowRankPath.add_codes, type(backend).gemm_only
    sites, last, inside = [], {}, []

    def gemm_spy(self, xq, sx, packed, bias, dtype):
        if not inside:  # a base GEMM, not the down-projection inside a side path
            last.update(xq=xq, sx=sx)
        return gemm(self, xq, sx, packed, bias, dtype)

    def add_spy(self, y, xq, sx, backend_):
        before = y.clone()
        inside.append(True)
        try:
            out = add(self, y, xq, sx, backend_)
        finally:
            inside.pop()
        sites.append(Site(self, before, xq, sx, out.clone(), last.get("xq") is xq and last.get("sx") is sx))
        return out

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(type(backend), "gemm_only", gemm_spy)
        m.setattr(LowRankPath, "add_codes", add_spy)
        block(*args)
    return sites


def side_path_sites(monkeypatch, backend, fused_block, unfused_block, args) -> dict[str, float]:
    """Per site of ``fused_block(*args)``, named by its linear(s) (``self_attn.qkv`` for the joint path): the
    relative L2 difference of its LoRA increment from the unfused block's paths' increment on the same input.
    Asserts every side path of the fused block ran once, on its base GEMM's activation, and that the sites cover
    the unfused block's side paths."""
    names = {id(m): n.removesuffix(".lora").removesuffix("_lora")
             for n, m in fused_block.named_modules() if isinstance(m, LowRankPath)}
    sites = recorded_sites(monkeypatch, backend, fused_block, args)
    seen = [names[id(s.path)] for s in sites]
    assert sorted(seen) == sorted(names.values()), f"side paths run {seen}, the block has {sorted(names.values())}"
    covered = {n for name in seen for n in (QKV if name == "self_attn.qkv" else (name,))}
    unfused = {n.removesuffix(".lora") for n, m in unfused_block.named_modules() if isinstance(m, LowRankPath)}
    assert covered == unfused, f"the fused block's side paths cover {sorted(covered)}, the unfused {sorted(unfused)}"
    out = {}
    with torch.no_grad():
        for name, s in zip(seen, sites):
            assert s.base_input, f"{name}: the side path read another activation than its base GEMM"
            ref = s.before.clone()
            parts = QKV if name == "self_attn.qkv" else (name,)
            width = ref.shape[1] // len(parts)
            for i, part in enumerate(parts):
                path = unfused_block.get_submodule(part).lora
                third = s.before[:, i * width:(i + 1) * width].clone()
                ref[:, i * width:(i + 1) * width] = path.add_codes(third, s.xq, s.sx, backend)
            got, want = (s.after - s.before).float(), (ref - s.before).float()
            out[name] = ((got - want).norm() / want.norm()).item()
    return out
