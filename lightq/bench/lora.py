"""``python -m lightq.bench lora``: what a LoRA costs on a quantized DiT, measured in one run on the GPU.

For one model size and DiT mode (default 14B, ``fp8-triton``, the blocks fused), the DiT is built with ``--layers``
blocks of random bf16 weights, written once to a safetensors file (so loads read a real file; it stays in the page
cache, which makes the LoRA's share of a load larger than from disk), and a rank-``--rank`` LoRA on every linear of
those blocks (random bf16 factors, alpha = rank) is written next to it in the official naming. Measured:

    load       load_component from the file: without LoRA, and merged (the LoRA file read and checked, merged in
               float64 on the GPU, then quantized): seconds (best of ``--repeat``), their ratio, and the part spent
               reading and checking the LoRA file (``lora s``)
    block      one block forward on [1, 32760, dim] tokens (480p): without LoRA, unmerged with the quantized
               down-projection (where the backend takes one: ``lightq.quant.lora``), unmerged with the bf16
               down-projection, merged: ms and the ratio to no LoRA
    error      relative L2 error of each block update against the bf16 block with the LoRA merged in bf16, and of
               unmerged against merged

``--load-layers N`` adds the load rows of an N-block build (40: the whole 14B DiT; its own file, block rows unchanged).
``run`` returns the rows (``LoraRow``) and prints a markdown table; ``tests/gpu/test_lora_gpu.py`` checks the
targets (unmerged block within 5% of no LoRA, merged load within 1.2x); docs/BENCHMARKS.md keeps the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoints.loader import load_component
from ..checkpoints.lora import load_loras, model_names
from ..checkpoints.sources import open_files
from ..checkpoints.writers import save_safetensors_atomic
from ..errors import LightqError
from ..models.family import QUANTIZABLE
from ..models.wan_dit import DIT_ARCHS, WanDiT
from ..quant.linear import selected
from ..quant.lora import LowRankPath
from ..quant.method import QuantMethod
from . import timing
from .linear import Backends, discover_modes
from .step import inputs, rel_err


DEVICE = "cuda"


@dataclasses.dataclass
class LoraRow:
    case: str
    load_s: float | None = None
    lora_s: float | None = None
    block_ms: float | None = None
    block_err: float | None = None
    note: str = ""


def write_model_and_lora(arch, rank: int, folder: Path, seed: int = 0, device: str = DEVICE) -> tuple[Path, Path]:
    """A random bf16 DiT of ``arch`` and a rank-``rank`` LoRA on every block linear, as safetensors files (the
    random values drawn on ``device``)."""
    model = load_component(lambda: WanDiT(arch), "random", device=device, dtype=torch.bfloat16, progress=False,
                           seed=seed)
    weights = folder / "dit.safetensors"
    save_safetensors_atomic({k: v.cpu() for k, v in model.state_dict().items()}, weights)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    lora = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            n, k = m.weight.shape
            lora[f"{name}.lora_down.weight"] = (torch.randn(rank, k, device=device, generator=gen) / k ** 0.5).bfloat16().cpu()
            lora[f"{name}.lora_up.weight"] = (torch.randn(n, rank, device=device, generator=gen) * 0.02).bfloat16().cpu()
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    del model
    path = folder / "lora.safetensors"
    save_safetensors_atomic(lora, path)
    return weights, path


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load(arch, weights: Path, method: QuantMethod, lora_path: Path | None, mode: str = "merged",
         quantized_down: bool = True, device: str = DEVICE):
    """(model, seconds, seconds reading and checking the LoRA): the DiT loaded from ``weights`` onto ``device`` (the
    LoRA read, checked and applied; ``quantized_down=False`` keeps bf16 down-projections), its blocks fused when
    the method fuses."""
    _sync(device)
    t0 = time.perf_counter()
    stack = None
    if lora_path is not None:
        with torch.device("meta"):
            shapes, linears = model_names(WanDiT(arch))
        quantized = {n for n in linears if method.quantizes and selected(n, QUANTIZABLE["dit"], method.skip)}
        stack = load_loras([{"path": str(lora_path), "strength": 1.0}], mode, shapes, linears, quantized)
        stack.quantized_down = quantized_down
    lora_s = time.perf_counter() - t0
    model = load_component(lambda: WanDiT(arch), open_files(weights), include=QUANTIZABLE["dit"], method=method,
                           device=device, dtype=torch.bfloat16, progress=False, lora=stack)
    if method.fuse:
        from ..fused.wan_block import fuse_dit_blocks

        fuse_dit_blocks(model)
    _sync(device)
    model.lora_stack = stack
    return model.requires_grad_(False), time.perf_counter() - t0, lora_s


def _best_load(arch, weights: Path, method: QuantMethod, lora_path: Path | None, mode: str, repeat: int,
               quantized_down: bool = True):
    """(the last model, best seconds, its LoRA seconds) of ``repeat`` loads."""
    best = None
    for i in range(repeat):
        dit, s, lora_s = load(arch, weights, method, lora_path, mode, quantized_down)
        if best is None or s < best[0]:
            best = (s, lora_s)
        if i < repeat - 1:
            del dit
            torch.cuda.empty_cache()
    return dit, round(best[0], 3), round(best[1], 3)


def run(model: str = "14b", mode: str = "fp8-triton+fast_accum", rank: int = 64, layers: int = 2, iters: int = 20,
        repeat: int = 3, json_path: str | None = None, load_layers: int | None = None) -> list[LoraRow]:
    """The rows of the module docstring; ``mode`` as ``bench step`` names modes (``+option`` sets a backend option:
    ``fp8-triton+fast_accum`` is ``dit_quant=fp8-triton``)."""
    (name, scheme, spec), = discover_modes([mode])
    backend, why = Backends().get(spec, name)
    if backend is None:
        raise LightqError(f"{mode} cannot run here: {why}")
    method = QuantMethod(scheme, backend, component="dit")
    arch = dataclasses.replace(DIT_ARCHS[model], num_layers=layers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightq-bench-lora-") as tmp:
        weights, lora_path = write_model_and_lora(arch, rank, Path(tmp))
        _, _, _, (tokens, e0, rope, text) = inputs(arch)
        args = (tokens, e0, rope, text, None, torch.bfloat16)
        ref_model, _, _ = load(arch, weights, QuantMethod("none", None), lora_path)  # bf16 + LoRA merged: the reference
        with torch.no_grad():
            ref = ref_model.blocks[0](*args) - tokens
        del ref_model
        outputs = {}
        cases = [("no LoRA", None, "merged", True), (f"unmerged rank {rank}", lora_path, "unmerged", True),
                 (f"unmerged rank {rank}, bf16 down", lora_path, "unmerged", False),
                 (f"merged rank {rank}", lora_path, "merged", True)]
        for case, lora, lora_mode, quantized_down in cases:
            dit, seconds, lora_s = _best_load(arch, weights, method, lora, lora_mode, repeat, quantized_down)
            block = dit.blocks[0]
            with torch.no_grad():
                ms = timing.time_ms(lambda: block(*args), iters)
                outputs[case] = block(*args) - tokens
            downs = sorted({p.codes_scheme or "bf16" for p in block.modules() if isinstance(p, LowRankPath)})
            note = f"{type(block).__name__}, {layers} blocks built" + (f"; down {'/'.join(downs)}" if downs else "")
            rows.append(LoraRow(case, seconds, lora_s if lora else None, round(ms, 3), rel_err(outputs[case], ref),
                                note))
            del dit, block
            torch.cuda.empty_cache()
        for r in rows[1:3]:
            r.note += f"; vs merged {rel_err(outputs[r.case], outputs[rows[3].case]):.2e}"
    if load_layers:
        rows += full_loads(model, method, rank, load_layers, repeat)
    info = timing.device_info()
    print(markdown(rows, info, model, mode))
    if json_path:
        Path(json_path).write_text(json.dumps({"device": info, "model": model, "mode": mode, "rank": rank,
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return rows


def full_loads(model: str, method: QuantMethod, rank: int, layers: int, repeat: int) -> list[LoraRow]:
    """The load rows (no LoRA, merged) of a ``layers``-block build of ``model`` in its own file."""
    arch = dataclasses.replace(DIT_ARCHS[model], num_layers=layers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightq-bench-lora-full-") as tmp:
        weights, lora_path = write_model_and_lora(arch, rank, Path(tmp))
        for case, lora in ((f"no LoRA, {layers}-block load", None), (f"merged rank {rank}, {layers}-block load",
                                                                      lora_path)):
            dit, seconds, lora_s = _best_load(arch, weights, method, lora, "merged", repeat)
            rows.append(LoraRow(case, seconds, lora_s if lora else None, note=f"{layers} blocks built"))
            del dit
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[LoraRow], info: dict, model: str, mode: str) -> str:
    out = [f"Device: {timing.describe(info)}. {model} {mode}, 480p block (32,760 tokens), random weights.", "",
           "| case | load s | load vs no LoRA | lora s | block ms | block vs no LoRA | block err vs bf16+LoRA | note |",
           "|---|---|---|---|---|---|---|---|"]
    base = None
    for r in rows:
        if r.lora_s is None:  # a no-LoRA row: the base of the rows after it
            base = r
        block = "" if r.block_ms is None else f"{r.block_ms} | {r.block_ms / base.block_ms:.3f}x | {r.block_err:.2e}"
        out.append(f"| {r.case} | {r.load_s} | {r.load_s / base.load_s:.3f}x | {'' if r.lora_s is None else r.lora_s}"
                   f" | {block or ' | | '} | {r.note} |")
    return "\n".join(out)
