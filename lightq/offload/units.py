"""How a component splits into streamed units: one unit per block (``block``) or per phase of a block (``phase``).

A ``UnitSpec`` is a group of tensors that must be on the device from the moment ``start`` is called (its forward
pre-hook) until ``end`` returns (its forward hook). Phases follow the order of the block's forward, as each block
class states in its ``offload_phases()``; e.g. the Wan DiT block:

    self_attn  = modulation + norm1 + self_attn     start: the block    end: self_attn
    cross_attn = norm3 + cross_attn                  start: norm3        end: cross_attn   (fused block: cross_attn)
    ffn        = norm2 + ffn                         start: norm2        end: ffn          (fused block: ffn)

Every tensor of a block belongs to exactly one phase (checked), QLinear packed buffers included.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LightqError
from .binding import TensorRef, refs_of

GRANULARITIES = ("block", "phase")


@dataclass
class UnitSpec:
    refs: list[TensorRef]
    start: nn.Module
    end: nn.Module


def _phases(block: nn.Module) -> list[tuple[list[nn.Module], nn.Module, nn.Module]]:
    """(modules whose tensors the phase holds, start module, end module) for each phase of ``block``, as the block
    describes them (``offload_phases``)."""
    phases = getattr(block, "offload_phases", None)
    if phases is None:
        raise LightqError(f"offload=phase streams blocks that describe their phases (Wan DiT, umT5), not "
                          f"{type(block).__name__}; use offload=block")
    return phases()


def streams_blocks(module: nn.Module) -> bool:
    """Components whose blocks ``offload=block|phase`` streams: those whose ``blocks`` describe their offload phases
    (``offload_phases``; in Wan2.1 the DiT and the umT5 encoder), or read lazily from disk (``lazy_blocks``)."""
    if getattr(module, "lazy_blocks", None) is not None:
        return True
    blocks = getattr(module, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(
        callable(getattr(block, "offload_phases", None)) for block in blocks)


def units_per_block(block: nn.Module, granularity: str) -> int:
    return 1 if granularity == "block" else len(_phases(block))


def unit_specs(block: nn.Module, granularity: str) -> list[UnitSpec]:
    """The units of one block, in execution order."""
    if granularity not in GRANULARITIES:
        raise LightqError(f"offload granularity '{granularity}': choose block or phase")
    if granularity == "block":
        return [UnitSpec(refs_of(block), block, block)]
    specs = []
    for i, (mods, start, end) in enumerate(_phases(block)):
        own = refs_of(block, recurse=False) if i == 0 else []  # the block's own tensors (DiT modulation)
        specs.append(UnitSpec(own + [r for m in mods for r in refs_of(m)], start, end))
    covered = {(id(r.owner), r.name) for s in specs for r in s.refs}
    missing = [r.name for r in refs_of(block) if (id(r.owner), r.name) not in covered]
    if missing or sum(len(s.refs) for s in specs) != len(covered):
        raise LightqError(f"offload=phase: the phase split of {type(block).__name__} misses or repeats tensors "
                          f"({', '.join(missing[:5]) or 'repeated'}); use offload=block")
    return specs
