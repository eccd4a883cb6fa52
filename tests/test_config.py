"""Every option of every config group composes into the typed schema; bad values fail at compose time."""

from itertools import product

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from lightq import config
from lightq.errors import LightqError
from lightq.paths import conf_dir

GROUPS = ("model", "dit_quant", "dit_low_quant", "t5_quant", "clip_quant", "offload", "hardware", "sampler")
MODEL_FOR = {"clip_quant": "tiny-i2v", "dit_low_quant": "tiny-t2v-a14b"}  # a model that has the component

MISSION_MODES = {
    "dit_quant": {"none", "fp8-vllm", "int8-vllm", "fp8-sgl", "int8-sgl", "fp8-q8f", "int8-q8f", "int8-torchao",
                  "int4-g128-marlin", "fp8-b128-deepgemm"},
    "t5_quant": {"none", "int8-vllm", "fp8-sgl", "int8-q8f", "fp8-q8f", "int8-torchao"},
    "clip_quant": {"none", "int8-vllm", "fp8-sgl", "int8-q8f", "fp8-q8f", "int8-torchao"},
}
PORTABLE = {"fp8-torch", "int8-torch", "int4-g128-torch", "fp8-b128-torch"}


def options(group):
    if group in config.QUANT_GROUPS:
        return config.quant_modes(group)
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_ctx():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


def test_every_mission_mode_exists():
    for group, modes in MISSION_MODES.items():
        have = set(options(group))
        assert modes | PORTABLE <= have, f"{group} lacks {sorted((modes | PORTABLE) - have)}"


def test_only_modes_that_say_more_than_their_name_are_yaml_files():
    """Plain ``<scheme>-<backend>`` modes come from the installed backends (``config.backend_modes``); a YAML file
    is kept for none, the auto modes and modes whose options need a comment."""
    for group in config.QUANT_GROUPS:
        for name in set(config.yaml_modes(group)) & set(config.backend_modes()):
            assert OmegaConf.load(conf_dir() / group / f"{name}.yaml").options, f"{group}/{name}.yaml is plain"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_typed_and_valid(hydra_ctx, group, option, tmp_path):
    model = [f"model={MODEL_FOR[group]}"] if group in MODEL_FOR else []
    cfg = compose("config", overrides=[*model, f"{group}={option}"])
    assert OmegaConf.get_type(cfg) is config.LightqConfig
    assert OmegaConf.get_type(cfg[group]) is type(getattr(config.LightqConfig(), group))
    if group.endswith("_quant"):
        assert cfg[group].name == option, f"{group}/{option}.yaml names itself '{cfg[group].name}'"
        assert cfg[group].scheme in config.SCHEMES
        assert cfg[group].ckpt is None and list(cfg[group].skip) == []
    if cfg.model.task == "i2v" and cfg.model.weights != "synthetic":  # real I2V weights need their picture
        from PIL import Image

        Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
        cfg.image = str(tmp_path / "in.png")
    config.validate(cfg)


def test_every_quant_combination_composes(hydra_ctx):
    combos = list(product(options("dit_quant"), options("t5_quant"), options("clip_quant")))
    assert len(combos) > 1000
    # composing is the slow part; the plan of every combination is checked in test_plan
    for dit, t5, clip in combos[:: max(1, len(combos) // 60)]:
        cfg = compose("config", overrides=[f"dit_quant={dit}", f"t5_quant={t5}", f"clip_quant={clip}",
                                           "model=tiny-i2v"])
        assert (cfg.dit_quant.name, cfg.t5_quant.name, cfg.clip_quant.name) == (dit, t5, clip)


def test_unknown_key_fails_at_compose_time(hydra_ctx):
    with pytest.raises(ConfigCompositionException):
        compose("config", overrides=["dit_quant.shceme=fp8"])


def test_wrong_type_fails_at_compose_time(hydra_ctx):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose("config", overrides=["model.frames=many"])


def test_unknown_mode_lists_valid_ones(hydra_ctx):
    with pytest.raises(Exception) as err:
        compose("config", overrides=["dit_quant=bogus"])
    text = str(err.value)
    assert "fp8-sgl" in text and "int8-torch" in text


@pytest.mark.parametrize("override,needle", [
    ("dit_quant.scheme=fp9", "scheme"),
    ("model.frames=10", r"4k\+1"),
    ("model.height=100", "multiples of 16"),
    ("offload.mode=disk", "offload.mode"),
    ("sampler.name=ddim", "sampler.name"),
])
def test_value_errors_name_the_field(hydra_ctx, override, needle):
    cfg = compose("config", overrides=[override])
    with pytest.raises(LightqError, match=needle):
        config.validate(cfg)
