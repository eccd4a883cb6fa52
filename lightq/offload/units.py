"""How a component splits into streamed units: one unit per block (``block``) or per phase of a block (``phase``).

A ``UnitSpec`` is a group of tensors that must be on the device from the moment ``start`` is called (its forward
pre-hook) until ``end`` returns (its forward hook). Phases follow the order of the block's forward:

    Wan DiT block:  self_attn  = modulation + norm1 + self_attn     start: the block    end: self_attn
                    cross_attn = norm3 + cross_attn                  start: norm3        end: cross_attn
                    ffn        = norm2 + ffn                         start: norm2        end: ffn
    umT5 block:     attn       = pos_embedding + norm1 + attn        start: the block    end: attn
                    ffn        = norm2 + ffn                         start: norm2        end: ffn

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
    """(modules whose tensors the phase holds, start module, end module) for each phase of ``block``."""
    from ..models.t5 import T5Block
    from ..models.wan_dit import Block

    if isinstance(block, Block):
        return [([block.norm1, block.self_attn], block, block.self_attn),
                ([block.norm3, block.cross_attn], block.norm3, block.cross_attn),
                ([block.norm2, block.ffn], block.norm2, block.ffn)]
    if isinstance(block, T5Block):
        return [([block.pos_embedding, block.norm1, block.attn], block, block.attn),
                ([block.norm2, block.ffn], block.norm2, block.ffn)]
    raise LightqError(f"offload=phase streams Wan DiT and umT5 blocks, not {type(block).__name__}; use offload=block")


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
