"""The Wan2.1 family record: geometry from the VAE and DiT architectures, builders, quantizable patterns, file
names, tasks and the block key — what offload, checkpoints, planning and validation ask instead of Wan classes."""

import fnmatch

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightq.config import ModelConfig
from lightq.errors import LightqError
from lightq.models.family import FAMILIES, WAN21, family
from lightq.models.tiny import ensure_tiny


def model(**fields):
    return OmegaConf.structured(ModelConfig(**fields))


def test_geometry_comes_from_the_vae_and_dit_architectures():
    geometry = WAN21.geometry(model(vae_arch="wan2.1", dit_arch="14b"))
    assert (geometry.channels, geometry.temporal, geometry.spatial, geometry.patch) == (16, 4, 8, (1, 2, 2))
    assert geometry.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    geometry.check(81, 480, 832)
    with pytest.raises(LightqError, match=r"model.frames=10: this model needs 4k\+1 frames"):
        geometry.check(10, 480, 832)
    with pytest.raises(LightqError, match="multiples of 16"):
        geometry.check(81, 488, 832)


@pytest.mark.parametrize("name", sorted(WAN21.components))
def test_every_component_builds_and_its_patterns_select_linears(name):
    record = WAN21.components[name]
    for arch in [a for a in record.arch_table() if a.startswith("tiny")]:  # the real sizes: tests of each model
        with torch.device("meta"):
            module = record.build(arch)()
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        for pattern in record.quantizable:
            assert any(fnmatch.fnmatchcase(n, pattern) for n in linears) or pattern.endswith("_img"), (arch, pattern)
    with pytest.raises(LightqError, match="architecture 'huge' does not exist"):
        record.build("huge")


def test_the_tiny_folder_holds_the_official_file_names():
    folder = ensure_tiny("tiny-i2v")
    for record in WAN21.components.values():
        if record.official:
            assert (folder / record.official).is_file(), record.official
    assert (folder / f"{WAN21.components['dit'].stem}.safetensors.index.json").is_file()


def test_tasks_blocks_and_lookups():
    assert WAN21.components_of("t2v") == ("t5", "dit") and WAN21.pipeline("i2v") == ("t5", "clip", "dit", "vae")
    assert set(WAN21.quantizable) == {"dit", "t5", "clip"}
    key = WAN21.block_key()
    assert key.match("blocks.12.ffn.0.weight").group(1) == "12" and not key.match("head.blocks.1.x")
    assert key.search("model.blocks.3.attn.q.weight").group(1) == "3"
    assert family("wan2.1") is WAN21 and set(FAMILIES) == {"wan2.1", "wan2.2-a14b", "wan2.2-ti2v"}
    with pytest.raises(LightqError, match="model.family=.wan9.: choose one of wan2.1, wan2.2-a14b, wan2.2-ti2v"):
        family("wan9")
    with pytest.raises(LightqError, match="model.task='v2v': choose t2v or i2v"):
        WAN21.components_of("v2v")
