"""The parallel layout of a run, from the ``parallel`` config and the launcher's environment (torch-free).

``torchrun --nproc-per-node N -m lightq parallel=<mode> ...`` starts N processes (``WORLD_SIZE`` = N, each with
its ``RANK`` / ``LOCAL_RANK``). With ``parallel.cfg`` = 2 the first half of the ranks runs the conditional DiT pass
and the second half the unconditional one; within each half the video tokens are split over the
``N / cfg`` ranks (the sequence-parallel degree ``sp``):

    rank = cfg_rank * sp + sp_rank

``mode`` says how self-attention spans the split: ``ulysses`` (all-to-all from token slices to head slices, full
attention on ``heads / sp`` heads, all-to-all back; ``sp`` must divide the head count), ``allgather`` (every rank
gathers all keys and values and attends its own queries to them; any ``sp``), ``ring`` (key/value blocks passed
around the ranks, partial softmaxes merged; any ``sp``, ``O(L / sp)`` memory; bf16 attention only), ``auto``
(ulysses where ``sp`` divides the heads, else allgather), ``none`` (no token split: ``sp`` must be 1).

``vae`` says who decodes the latents: ``split`` (every rank its latent rows, ``parallel.rows``; each rank needs
one at least) or ``rank0`` (rank 0 alone, the others wait).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import LightqError

MODES = ("none", "ulysses", "allgather", "ring", "auto")
VAE_MODES = ("split", "rank0")
LAUNCH = "torchrun --nproc-per-node <N> -m lightq"


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    local_rank: int
    cfg: int
    sp: int
    attention: str  # none | ulysses | allgather | ring (auto resolved)
    vae: str = "rank0"  # split | rank0

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the outputs and the record; the other ranks write nothing."""
        return self.rank == 0

    def describe(self) -> str:
        parts = ([f"cfg {self.cfg}"] if self.cfg > 1 else []) + ([f"{self.attention} {self.sp}"] if self.sp > 1 else [])
        return " x ".join(parts) or "single process"


def launched_world(env=None) -> tuple[int, int, int]:
    """(world size, rank, local rank) that the launcher set in ``env`` (1, 0, 0 without a launcher)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    except ValueError as exc:
        raise LightqError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun), got {exc}") from None


def plan_layout(pcfg, heads: int, guided: bool, env=None, quantized_attention: bool = False,
                latent_rows: int | None = None) -> Layout:
    """The layout of ``pcfg`` (``mode``, ``cfg``, ``vae``) for a DiT of ``heads`` heads, ``guided`` if the sampler runs
    CFG, ``quantized_attention`` if an ``attn_quant`` mode is on, ``latent_rows`` the latents' height (None: not
    checked); a LightqError names what does not fit and the fix."""
    world, rank, local = launched_world(env)
    mode, cfg, vae = str(pcfg.mode), pcfg.cfg, str(pcfg.vae)
    wanted = getattr(pcfg, "world", None)
    if wanted is not None and wanted != world:
        raise LightqError(f"parallel.world={wanted}: this run is written for {wanted} processes but {world} "
                          f"{'was' if world == 1 else 'were'} launched: torchrun --nproc-per-node {wanted} -m lightq ...")
    if mode not in MODES:
        raise LightqError(f"parallel.mode='{mode}': choose one of {', '.join(MODES)}")
    if vae not in VAE_MODES:
        raise LightqError(f"parallel.vae='{vae}': choose split (every process decodes its latent rows) or rank0 "
                          "(rank 0 decodes alone)")
    if cfg not in (1, 2):
        raise LightqError(f"parallel.cfg={cfg}: choose 1 (no CFG parallelism) or 2 (the two CFG passes on two halves "
                          "of the processes)")
    if mode == "none" and cfg == 1:
        if world > 1:
            raise LightqError(f"{world} processes were launched but parallel=none runs one: choose parallel=ulysses, "
                              "allgather, auto, cfg or cfg-ulysses, or launch a single process")
        return Layout(1, 0, 0, 1, 1, "none")
    if world == 1:
        raise LightqError(f"parallel.mode={mode} parallel.cfg={cfg} needs several processes: launch it with {LAUNCH} "
                          "...")
    if cfg == 2 and not guided:
        raise LightqError("parallel.cfg=2 puts the conditional and unconditional DiT passes on two halves of the "
                          "processes, but this sampler runs one pass (guide_scale 1, or the distill sampler): set "
                          "parallel.cfg=1")
    if world % cfg:
        raise LightqError(f"parallel.cfg=2 needs an even number of processes, got {world}")
    sp = world // cfg
    if mode == "none" and sp > 1:
        raise LightqError(f"{world} processes with parallel.cfg={cfg} leave {sp} per CFG pass, but parallel.mode=none "
                          "splits no tokens: choose parallel.mode=ulysses, allgather or auto, or launch "
                          f"{cfg} processes")
    if mode == "ring" and quantized_attention:
        raise LightqError("parallel.mode=ring merges each key block's partial softmax through its log-sum-exp, which "
                          "torch's bf16 flash attention returns and the attn_quant kernels do not: use "
                          "parallel.mode=ulysses or allgather with attn_quant, or attn_quant=none")
    if vae == "split" and latent_rows is not None and latent_rows < world:
        raise LightqError(f"parallel.vae=split gives each of the {world} processes one latent row at least, but the "
                          f"latents have {latent_rows}: set parallel.vae=rank0, or make the video taller")
    if sp == 1:
        mode = "none"
    elif mode == "auto":
        mode = "ulysses" if heads % sp == 0 else "allgather"
    elif mode == "ulysses" and heads % sp:
        raise LightqError(f"parallel.mode=ulysses splits the DiT's {heads} heads over {sp} processes, which does not "
                          f"divide them: use parallel.mode=allgather (or auto), or a process count whose sequence "
                          f"degree divides {heads}")
    return Layout(world, rank, local, cfg, sp, mode, vae)
