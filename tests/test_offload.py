"""Offload on CPU: every mode (model, block, phase, and block/phase with blocks read lazily from disk) must give
bit-identical latents to offload=none — the machinery only moves bytes — for bf16 and every portable mode, T2V
and I2V, mixed precision included; plus the streamer's recovery, the clear errors, and one CLI run."""

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightq import config, hardware, plan
from lightq.checkpoints.conversion import convert
from lightq.checkpoints.sources import NON_BLOCK_FILE
from lightq.checkpoints.writers import save_safetensors_atomic
from lightq.convert import open_component_source
from lightq.errors import LightqError
from lightq.offload import gpu_weight_need
from lightq.offload.binding import refs_of
from lightq.offload.lazy import BLOCK_KEY, LazyBlocks
from lightq.offload.streaming import Streamer
from lightq.offload.units import units_per_block
from lightq.paths import conf_dir
from lightq.pipeline import components as C
from lightq.pipeline.graph import generate

MODES = ["none", "fp8-torch", "int8-torch", "int4-g128-torch", "fp8-b128-torch"]
SCHEME = {"fp8-torch": "fp8", "int8-torch": "int8", "int4-g128-torch": "int4-g128", "fp8-b128-torch": "fp8-b128"}
FAST = ["hardware=cpu", "model.frames=5", "sampler.steps=2"]


@pytest.fixture(scope="module")
def cfg_of():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=[*FAST, *overrides])


def run(cfg):
    hw = hardware.resolve("cpu")
    return generate(cfg, hw, plan.plan_run(cfg, hw)).latents


@pytest.fixture
def counters(monkeypatch):
    """Counts of block copies issued by streamers and of blocks read from disk by lazy readers."""
    counts = {"copies": 0, "reads": 0}
    issue, read = Streamer._issue, LazyBlocks.read

    def counting_issue(self, k):
        counts["copies"] += 1
        return issue(self, k)

    def counting_read(self, i):
        counts["reads"] += 1
        return read(self, i)

    monkeypatch.setattr(Streamer, "_issue", counting_issue)
    monkeypatch.setattr(LazyBlocks, "read", counting_read)
    return counts


def float_block_split(model: str, out: Path) -> Path:
    """The tiny model's bf16 DiT rewritten as block_<i>.safetensors + non_block.safetensors, tensors unchanged."""
    src = open_component_source(model, "dit")
    groups: dict[str, dict] = {NON_BLOCK_FILE: {}}
    for key in src:
        m = BLOCK_KEY.match(key)
        groups.setdefault(f"block_{m.group(1)}.safetensors" if m else NON_BLOCK_FILE, {})[key] = src[key]
    for fname, tensors in groups.items():
        save_safetensors_atomic(tensors, out / fname)
    return out


def block_split(model: str, mode: str, out: Path, skip=()) -> Path:
    if mode == "none":
        return float_block_split(model, out)
    return convert(open_component_source(model, "dit"), component="dit", scheme=SCHEME[mode], output=out,
                   layout="blocks", skip=list(skip), progress=False)


OFFLOADS = [("model",), ("block",), ("phase",), ("block", "lazy"), ("phase", "lazy")]


def offload_overrides(offload: tuple, split: Path) -> list[str]:
    extra = ["offload.lazy_load=true", f"dit_quant.ckpt={split}"] if "lazy" in offload else []
    return [f"offload={offload[0]}", *extra]


@pytest.mark.parametrize("model", ["tiny", "tiny-i2v"])
def test_pipeline_latents_bit_identical(cfg_of, counters, tmp_path, model):
    """The whole pipeline (T5, CLIP, DiT sampling loop with CFG, VAE) under every offload mode, fp8 everywhere."""
    common = [f"model={model}", "dit_quant=fp8-torch", "t5_quant=fp8-torch", "clip_quant=fp8-torch"]
    reference = run(cfg_of(*common))
    split = block_split(model, "fp8-torch", tmp_path / "dit-blocks")
    for offload in OFFLOADS:
        copies, reads = counters["copies"], counters["reads"]
        got = run(cfg_of(*common, *offload_overrides(offload, split)))
        assert torch.equal(got, reference), f"offload={offload} changed the latents"
        if offload[0] != "model":  # 2 steps x CFG = 4 DiT forwards of 2 blocks (x3 phases)
            assert counters["copies"] - copies >= 8 * (3 if offload[0] == "phase" else 1)
        if "lazy" in offload:
            assert counters["reads"] - reads >= 8, "blocks were not read from disk for every forward"


def component_inputs(arch, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    extra = {}
    if arch.is_i2v:
        extra = {"clip_fea": torch.randn(1, 257, arch.clip_dim, generator=g),
                 "y": torch.randn(1, arch.in_dim - 16, 2, 8, 8, generator=g)}
    return (x, torch.tensor([700.0]), torch.randn(1, 7, arch.text_dim, generator=g)), extra


def run_components(cfg, model: str):
    """(DiT outputs for two inputs, umT5 output) of the components loaded and run under ``cfg.offload``."""
    hw = hardware.resolve("cpu")
    methods = C.quant_methods(cfg, plan.plan_run(cfg, hw))
    cpu = torch.device("cpu")
    offload = C.Offload(cfg.offload, cpu, cfg)
    folder = C.model_folder(cfg)
    dit = C.load_dit(cfg, methods["dit"], folder, cpu, torch.bfloat16, False)
    t5 = C.load_t5(cfg, methods["t5"], folder, cpu, torch.bfloat16, False)
    ids, mask = C.load_tokenizer_for(cfg.model, folder)(["a red fox", ""])
    with offload.active(t5):
        text = t5(ids, mask)
    offload.release(t5)
    with offload.active(dit):
        outs = [dit(*a, **kw) for a, kw in (component_inputs(dit.arch, 0), component_inputs(dit.arch, 1))]
    offload.release(dit)
    return outs, text


@pytest.mark.parametrize("mode", MODES)
def test_components_bit_identical_every_mode(cfg_of, counters, tmp_path, mode):
    """DiT (T2V and I2V) and umT5 outputs under every offload mode equal offload=none, for bf16 and every
    portable mode; lazy splits are read pre-quantized (converted) or, for bf16, as stored."""
    for model in ("tiny", "tiny-i2v"):
        common = [f"model={model}", f"dit_quant={mode}", f"t5_quant={mode}"]
        ref_outs, ref_text = run_components(cfg_of(*common), model)
        split = block_split(model, mode, tmp_path / f"{model}-blocks")
        for offload in OFFLOADS:
            copies = counters["copies"]
            outs, text = run_components(cfg_of(*common, *offload_overrides(offload, split)), model)
            assert torch.equal(text, ref_text), f"{model} {mode} offload={offload}: T5 output changed"
            for out, ref in zip(outs, ref_outs):
                assert torch.equal(out, ref), f"{model} {mode} offload={offload}: DiT output changed"
            if offload[0] != "model":
                assert counters["copies"] - copies >= 2 * 2 + 2  # 2 forwards x 2 DiT blocks + 2 T5 blocks


@pytest.mark.parametrize("offload", ["block", "phase"])
def test_loading_through_the_offload_packs_each_block_as_it_completes(cfg_of, offload):
    """A DiT (fused-free portable fp8) and umT5 loaded for offload=block|phase: each block is packed the moment
    the loader completes it, before the next is read; its loaded tensors are freed (only the pack's copy lives),
    and those packs are the ones streamed. Every tensor of the components lives in exactly one pack, and the
    outputs equal offload=none's bit for bit."""
    common = ["dit_quant=fp8-torch", "t5_quant=fp8-torch"]
    ref_outs, ref_text = run_components(cfg_of(*common), "tiny")
    cfg = cfg_of(*common, f"offload={offload}")
    hw = hardware.resolve("cpu")
    methods = C.quant_methods(cfg, plan.plan_run(cfg, hw))
    cpu = torch.device("cpu")
    off = C.Offload(cfg.offload, cpu, cfg)
    packer, log = off.packer, []

    def watched(finish=None):
        on_block = packer(finish)

        def watch(model, i):
            loaded = [not any(t.is_meta for t in b.state_dict().values()) for b in model.blocks]
            originals = [weakref.ref(r.get()) for r in refs_of(model.blocks[i])]
            on_block(model, i)
            gc.collect()
            log.append((type(model).__name__, i, loaded, sum(o() is not None for o in originals)))
        return watch

    off.packer = watched
    folder = C.model_folder(cfg)
    dit = C.load_dit(cfg, methods["dit"], folder, cpu, torch.bfloat16, False, offload=off)
    t5 = C.load_t5(cfg, methods["t5"], folder, cpu, torch.bfloat16, False, off)
    for model in (dit, t5):
        n = len(model.blocks)
        assert [e[1:] for e in log if e[0] == type(model).__name__] == [
            (i, [j <= i for j in range(n)], 0) for i in range(n)], log
        placement = off._placement(model)
        packs = placement.resident.packs
        assert len(packs) == n * units_per_block(model.blocks[0], offload)
        spans = [(p.host.data_ptr(), p.host.data_ptr() + p.nbytes) for p in [*packs, placement.outside]]
        tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.numel()]
        assert all(sum(lo <= t.data_ptr() < hi for lo, hi in spans) == 1 for t in tensors)
    ids, mask = C.load_tokenizer_for(cfg.model, folder)(["a red fox", ""])
    with off.active(t5):
        assert torch.equal(t5(ids, mask), ref_text)
    off.release(t5)
    with off.active(dit):
        outs = [dit(*a, **kw) for a, kw in (component_inputs(dit.arch, 0), component_inputs(dit.arch, 1))]
    off.release(dit)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))


@pytest.mark.parametrize("offload", ["block", "phase"])
def test_mixed_precision_and_quantize_on_read(cfg_of, tmp_path, offload):
    """Skip patterns keep some block linears in bf16 (blocks of different sizes share the ring); lazy loading
    from the bf16 split quantizes while reading, from a converted split reads pre-quantized."""
    skip = ["blocks.0.*", "*.ffn.2"]
    common = ["dit_quant=fp8-torch", f"dit_quant.skip={json.dumps(skip)}"]
    reference = run(cfg_of(*common))
    assert not torch.equal(reference, run(cfg_of("dit_quant=fp8-torch"))), "skip patterns had no effect"
    assert torch.equal(run(cfg_of(*common, f"offload={offload}", "offload.buffers=3")), reference)
    bf16 = float_block_split("tiny", tmp_path / "bf16-blocks")
    fp8 = block_split("tiny", "fp8-torch", tmp_path / "fp8-blocks", skip)
    for split in (bf16, fp8):
        lazy = [f"offload={offload}", "offload.lazy_load=true", f"dit_quant.ckpt={split}"]
        assert torch.equal(run(cfg_of(*common, *lazy)), reference), split.name


def dit_and_inputs(cfg):
    hw = hardware.resolve("cpu")
    folder = C.model_folder(cfg)
    dit = C.load_dit(cfg, C.quant_methods(cfg, plan.plan_run(cfg, hw))["dit"], folder, torch.device("cpu"),
                     torch.bfloat16, False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    context = torch.randn(1, 7, dit.arch.text_dim, generator=g)
    return dit, (x, torch.tensor([500.0]), context)


@pytest.mark.parametrize("lazy", [False, True])
def test_forward_that_raises_midway_leaves_streaming_consistent(cfg_of, tmp_path, lazy):
    """A forward stopped inside block 1 leaves units in flight; the next forwards restart the ring (and the
    reader) and are exact; after release every tensor is back on its host copy."""
    base_cfg = cfg_of("dit_quant=int8-torch")
    plain, inputs = dit_and_inputs(base_cfg)
    reference = plain(*inputs)
    extra = ["offload.lazy_load=true", f"dit_quant.ckpt={block_split('tiny', 'int8-torch', tmp_path / 's')}"] \
        if lazy else []
    cfg = cfg_of("dit_quant=int8-torch", "offload=phase", *extra)
    dit, _ = dit_and_inputs(cfg)
    offload = C.Offload(cfg.offload, torch.device("cpu"), cfg)
    with offload.active(dit):
        assert torch.equal(dit(*inputs), reference)
        boom = dit.blocks[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            dit(*inputs)
        boom.remove()
        assert torch.equal(dit(*inputs), reference)
        assert torch.equal(dit(*inputs), reference)
    offload.release(dit)
    if not lazy:
        state, plain_state = dit.state_dict(), plain.state_dict()
        assert state.keys() == plain_state.keys()
        assert all(torch.equal(state[k], plain_state[k]) for k in state)
        placement = offload._placement(dit)
        hosts = {p.host.data_ptr() for p in placement.resident.packs}
        assert dit.blocks[0].ffn[0].data.untyped_storage().data_ptr() in hosts
    else:
        with pytest.raises(LightqError, match="lazily"):
            dit(*inputs)


def test_lazy_load_needs_a_block_split(cfg_of):
    cfg = cfg_of("offload=block", "offload.lazy_load=true", "dit_quant=fp8-torch")
    with pytest.raises(LightqError) as err:
        run(cfg)
    msg = str(err.value)
    assert "block-split" in msg and "python -m lightq.convert component=dit scheme=fp8" in msg
    assert "layout=blocks" in msg and "dit_quant.ckpt=" in msg


def test_lazy_load_needs_block_or_phase(cfg_of):
    with pytest.raises(LightqError, match="offload=block or offload=phase"):
        C.Offload(cfg_of("offload=model", "offload.lazy_load=true").offload, torch.device("cpu"))


def test_block_split_of_another_size_is_refused(cfg_of, tmp_path):
    split = float_block_split("tiny", tmp_path / "split")
    (split / "block_1.safetensors").unlink()
    cfg = cfg_of("offload=block", "offload.lazy_load=true", f"dit_quant.ckpt={split}")
    with pytest.raises(LightqError, match="blocks 0..0 but the model has 2"):
        run(cfg)


def test_budget_refused_before_loading_with_the_numbers(cfg_of, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the budget must be checked before anything is loaded")

    monkeypatch.setattr(C, "load_t5", no_loading)
    cfg = cfg_of("model=wan2.1-t2v-14b", "dit_quant=fp8-torch", "t5_quant=fp8-torch", "offload=block",
                 "offload.max_gpu_gib=2")
    with pytest.raises(LightqError) as err:
        run(cfg)
    msg = str(err.value)
    assert "offload.max_gpu_gib=2.0: offload=block needs" in msg and "GiB outside the blocks + 2 x" in msg, msg
    with pytest.raises(LightqError, match=r"offload=none needs \d+\.\d+ GiB .*dit: 1\d\.\d+ GiB"):
        run(cfg_of("model=wan2.1-t2v-14b", "dit_quant=fp8-torch", "offload.max_gpu_gib=20"))
    monkeypatch.undo()
    assert run(cfg_of("offload=block", "offload.max_gpu_gib=1.0")).shape[0] == 16


def test_weight_need_of_wan14b_fp8(cfg_of):
    """The 14B DiT in fp8 with two block buffers: its non-block tensors + 2 blocks, far below no offload."""
    big = ["model=wan2.1-t2v-14b", "dit_quant=fp8-torch", "t5_quant=fp8-torch"]
    block, detail = gpu_weight_need(cfg_of(*big, "offload=block"))
    none, _ = gpu_weight_need(cfg_of(*big))
    phase, _ = gpu_weight_need(cfg_of(*big, "offload=phase"))
    gib = 1 << 30
    # one block: 8 dim^2 attention weights + 2 dim x ffn weights, one byte each, plus scales and bf16 biases
    block_bytes = 8 * 5120 ** 2 + 2 * 5120 * 13824
    assert block > 2 * block_bytes and phase < block < 4 * gib, detail
    assert none > 14 * gib


def test_cli_block_offload_with_lazy_load(cfg_of, run_lightq, tmp_path):
    split = block_split("tiny", "fp8-torch", tmp_path / "dit-fp8-blocks")
    proc = run_lightq("offload=block", "offload.lazy_load=true", "dit_quant=fp8-torch", f"dit_quant.ckpt={split}",
                      "hardware=cpu", "quality.baseline=never")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = next((tmp_path / "outputs").rglob("result.json")).parent
    assert json.loads((job / "result.json").read_text())["status"] == "ok"
    expected = run(cfg_of("dit_quant=fp8-torch", "model.frames=9", "sampler.steps=4"))
    assert torch.equal(torch.load(job / "latents.pt", weights_only=True), expected)
