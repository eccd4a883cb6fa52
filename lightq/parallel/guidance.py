"""Classifier-free guidance with its two DiT passes on two ranks (``parallel.cfg=2``).

Rank ``cfg_rank`` 0 of the group runs the conditional pass and rank 1 the unconditional one; an all-gather gives
both velocities to both, which combine them as one process does (``sampler.guided_velocity``):
``v = v_uncond + s (v_cond - v_uncond)``, the same fp32 operations on the same values, so both ranks step
identical latents. A step with scale 1 runs the conditional pass alone, on both ranks, as one process does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def split_guidance(group, cfg_rank: int):
    """A ``sampler.sample`` guidance function for this rank of the CFG ``group``."""

    def guided(model_fn, x, t, cond, uncond, guide_scale: float) -> torch.Tensor:
        if guide_scale == 1.0:  # a step without CFG (e.g. one expert of Wan2.2): both ranks run the one pass
            return model_fn(x, t, cond).float()
        mine = model_fn(x, t, cond if cfg_rank == 0 else uncond).float().contiguous()
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        dist.all_gather(both, mine, group=group)
        v_cond, v_uncond = both
        return v_uncond + guide_scale * (v_cond - v_uncond)

    return guided
