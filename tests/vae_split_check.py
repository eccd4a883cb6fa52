"""Run by tests/test_parallel_vae.py under torchrun (gloo): the tiny Wan2.1 and Wan2.2 VAEs decode random latents
split by rows over the ranks (``lightq.parallel.rows``), and rank 0 decodes them alone. Heights: 7 (uneven over 2
and 3 ranks) and one latent row per rank (the smallest split); 3 latent frames (three chunks through the caches).

Two CPU conv kernels: torch's native one (``torch.backends.mkldnn.enabled=False``) and oneDNN (the default), which
picks its algorithm by the input's size; with either a rank's strip may be summed in another order than the whole
frame (the largest difference is reported; test_parallel_vae.py holds it to fp32 rounding). Rank 0 writes ``{"<vae> <rows> rows <kernel>": {"equal", "max_diff", "shape"}}``
to the JSON file named on the command line (oneDNN at 7 rows only).
"""

import json
import sys

import torch
import torch.distributed as dist

from lightq.models.vae import VAE_ARCHS, WanVAE
from lightq.models.vae22 import VAE22_ARCHS, Wan22VAE
from lightq.parallel.rows import RowSplit
from lightq.parallel.runtime import leave

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
found = {}
for kernel, onednn in (("native", False), ("onednn", True)):
    torch.backends.mkldnn.enabled = onednn
    for name, build in (("wan2.1", lambda: WanVAE(VAE_ARCHS["tiny"])),
                        ("wan2.2", lambda: Wan22VAE(VAE22_ARCHS["tiny"]))):
        for rows in (7, size) if kernel == "native" else (7,):
            torch.manual_seed(rows)  # every rank builds the same weights and draws the same latents
            vae = build()
            latents = torch.randn(1, vae.arch.z_dim, 3, rows, 5)
            split = vae.decode(latents, rows=RowSplit(dist.group.WORLD, rank, size, rows))
            if rank == 0:
                one = vae.decode(latents)
                found[f"{name} {rows} rows {kernel}"] = {"equal": torch.equal(split, one), "shape": list(split.shape),
                                                         "max_diff": float((split - one).abs().max())}
            else:
                assert split is None, "only rank 0 gets the video"
if rank == 0:
    json.dump(found, open(sys.argv[1], "w"), indent=1)
leave(0)  # as a lightq job's rank leaves: barrier, destroy, os._exit (docs/PARALLEL.md)
