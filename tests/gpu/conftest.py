"""What the GPU test files share: the device, the skip marks, the composed job config and the job's latents.

A module sets ``pytestmark = GPU`` (marked ``gpu``, skipped without CUDA) or ``TRITON`` (also skipped without
triton) and imports what it uses (``from .conftest import DEV, GPU, ...``); ``cfg_of`` composes a job config on the
GPU (``hardware=auto``, five frames, the test's overrides after), ``latents_of`` runs it in this process.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

CUDA = torch.cuda.is_available()
CAP = torch.cuda.get_device_capability() if CUDA else (0, 0)
DEV = torch.device("cuda") if CUDA else None
# the weight schemes whose tensor-core GEMMs this GPU has: int8 from sm80 (Ampere), fp8 from sm89 (Ada)
SCHEMES = [s for s, need in (("int8", (8, 0)), ("fp8", (8, 9))) if CAP >= need]

GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the GPU machine)")]
TRITON = [*GPU, pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]


def compose_job(*base: str):
    """A module-scoped fixture body: yields ``lambda *overrides: job config`` on ``hardware=auto`` + ``base``."""
    from hydra import compose, initialize_config_dir

    from lightq import config
    from lightq.paths import conf_dir

    config.register()

    def compose_one(*overrides):  # Hydra's global state held per call: several such fixtures may be alive at once
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=["hardware=auto", *base, *overrides])
    yield compose_one


@pytest.fixture(scope="module")
def cfg_of():
    yield from compose_job("model.frames=5")


def latents_of(cfg) -> torch.Tensor:
    """The denoised latents of job config ``cfg``, generated in this process on the GPU."""
    from lightq import hardware, plan
    from lightq.pipeline.graph import generate

    hw = hardware.resolve(cfg.hardware.name)
    assert hw.is_cuda
    return generate(cfg, hw, plan.plan_run(cfg, hw)).latents
