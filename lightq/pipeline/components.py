"""Building the pipeline's components from the config: where weights come from, how each component is loaded
(with its planned quantization mode), inputs (noise, image, I2V conditioning), and whole-component offload.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import staging
from ..config import COMPONENTS, quant_of
from ..errors import LightqError
from ..models.family import LatentGeometry, family
from ..plan import ComponentPlan
from ..quant.linear import check_skip
from ..quant.method import QuantMethod

log = logging.getLogger("lightq")


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj)`` through ``staging.write_atomic``: a reader never sees half a file."""
    staging.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def parallel_layout(cfg):
    """The run's ``lightq.parallel.layout.Layout`` (the DiT's head count and whether the sampler runs CFG decide what
    fits); a LightqError when the config and the launch disagree."""
    from ..parallel.layout import plan_layout
    from .sampler import needs_uncond, sampler_config

    m = cfg.model
    fam = family(m.family)
    heads = fam.components["dit"].arch_table()[m.dit_arch].num_heads
    rows = fam.geometry(m).latent_shape(m.frames, *video_size(cfg))[2]
    return plan_layout(cfg.parallel, heads, needs_uncond(sampler_config(cfg)),
                       quantized_attention=cfg.attn_quant.scheme != "none", latent_rows=rows)


# ---------------------------------------------------------------------------------------------- weights


def model_folder(cfg) -> Path | None:
    """The folder holding the model's files: the tiny synthetic one, a local folder, or a Hub snapshot of the files
    this job reads (``hub_patterns``). ``None`` for ``weights=random``."""
    model_cfg = cfg.model
    w = model_cfg.weights
    if w == "random":
        return None
    if w == "synthetic":
        from ..models.tiny import TINY, ensure_tiny

        if model_cfg.name not in TINY:
            raise LightqError(f"model.weights=synthetic exists only for {', '.join(TINY)}; "
                              "give a weights folder, a Hub repo id, or weights=random")
        return ensure_tiny(model_cfg.name)
    if Path(w).expanduser().is_dir():
        return Path(w).expanduser()
    from ..checkpoints.hub import resolve

    return resolve(w, hub_patterns(cfg))


def hub_patterns(cfg) -> list[str]:
    """The files of a Hub model repository this job reads (``snapshot_download``'s ``allow_patterns``): for every
    component of the task whose mode names no ``ckpt`` of its own, its official file(s), its LightX2V
    pre-quantized file for the mode's scheme, and its diffusers subfolder; the tokenizer's folder; diffusers'
    ``model_index.json``."""
    fam = family(cfg.model.family)
    patterns = ["model_index.json"]
    for name in fam.pipeline(cfg.model.task):
        quant = quant_of(cfg, name) if name in COMPONENTS else None
        if quant is not None and quant.ckpt:
            continue  # its weights come from the mode's own file
        record = fam.components[name]
        patterns += list(record.hub)
        if record.lightx2v and quant is not None and quant.scheme not in ("none", None):
            patterns.append(record.lightx2v.format(quant.scheme))
        if record.diffusers:
            patterns.append(f"{record.diffusers}/*")
    if cfg.model.tokenizer != "byte":
        from ..checkpoints.diffusers import TOKENIZER_SUBFOLDER

        patterns += [f"{cfg.model.tokenizer}/*", f"{TOKENIZER_SUBFOLDER}/*"]
    return patterns


def _source(component: str, method: QuantMethod | None, folder: Path | None, fam):
    """(the TensorSource of one component, which file and why): the mode's ``ckpt`` if given, else its file in the
    model folder (``checkpoints.locate``, LightX2V's subfolders included) — the pre-quantized one of the mode's
    scheme when the folder has it, else the bf16 original, quantized at load."""
    from ..checkpoints.hub import resolve
    from ..checkpoints.locate import NotInFolder, find_component
    from ..checkpoints.conventions import open_source

    if method is not None and method.ckpt:
        path = resolve(method.ckpt)
        return open_source(path), {"path": str(path), "why": f"the mode's ckpt ({method.ckpt})"}
    if folder is None:
        return "random", {"path": "random", "why": "model.weights=random"}
    if method is not None and method.quantizes:
        try:
            found = find_component(folder, component, method.scheme, fam)
            return open_source(found.path), {"path": str(found.path), "why": f"pre-quantized {method.scheme}: "
                                                                              f"{found.why}"}
        except NotInFolder:
            found = find_component(folder, component, None, fam)
            return open_source(found.path), {"path": str(found.path), "why": f"no pre-quantized {method.scheme} "
                                             f"checkpoint in the folder or its LightX2V subfolders, so the bf16 one, "
                                             f"quantized at load: {found.why}"}
    found = find_component(folder, component, None, fam)
    return open_source(found.path), {"path": str(found.path), "why": found.why}


ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "model_type")


def check_folder_config(folder: Path, arch_name: str, arch) -> None:
    """LightqError when the model folder's ``config.json`` (LightX2V and the official release keep the DiT's size
    there) describes another DiT than ``model.dit_arch``: the weights would not fit, or fit another model."""
    from ..checkpoints.locate import folder_config

    found = folder_config(folder)
    if found is None:
        return
    path, data = found
    differ = [f"{k}={data[k]} (model.dit_arch={arch_name}: {getattr(arch, k)})" for k in ARCH_FIELDS
              if k in data and data[k] != getattr(arch, k)]
    if differ:
        raise LightqError(f"{path} describes another DiT than the chosen model: {', '.join(differ)}; pick the "
                          "model= of these weights (python -m lightq --help lists them)")


def quant_methods(cfg, plans: dict[str, ComponentPlan]) -> dict[str, QuantMethod]:
    """The quantization method of every planned component with linears (each backend loaded once, options
    applied); the self-attention plan (``attn``) is ``load_self_attention``'s."""
    return {name: QuantMethod.build(plan, quant_of(cfg, name)) for name, plan in plans.items() if name in COMPONENTS}


def _load(component: str, cfg, method: QuantMethod | None, folder, device, dtype, progress, offload=None,
          finish_block=None) -> nn.Module:
    """Component ``component`` of the model's family, built for its ``<component>_arch`` and filled by the loader
    on ``device``; ``finish_block(block)`` runs on each block as soon as it is loaded (fusing it).

    With ``offload`` (the run's ``Offload``) the component is loaded for it and placed before this returns
    (``Offload.prepare``): a component whose blocks stream (offload=block / phase) has each block packed into host
    memory as soon as it is complete (``Offload.packer``), so it is never whole on ``device``."""
    from ..checkpoints.loader import load_component

    fam = family(cfg.model.family)
    record = fam.components[component]
    build = record.build(cfg.model[f"{component}_arch"])
    if method is not None and method.quantizes and method.skip:  # before any tensor is read: a typo is an error
        with torch.device("meta"):
            names = [n for n, m in build().named_modules() if isinstance(m, nn.Linear)]
        check_skip(names, record.quantizable, method.skip, f"{component}_quant.skip")
    lora = _lora_stack(cfg, component, build, record.quantizable, method)  # read and checked before any weight
    if component == "dit" and folder is not None:
        check_folder_config(folder, cfg.model.dit_arch, record.arch_table()[cfg.model.dit_arch])
    source, file_record = _source(component, method, folder, fam)
    lazy = component in ("dit", *fam.experts) and cfg.offload.lazy_load
    blocks = {}  # the loader's on_block (a lazy load reads no block: they stream from disk while the DiT runs)
    if lazy:
        from ..offload import load_lazy as load_component
    elif offload is not None:
        blocks["on_block"] = offload.packer(finish_block)
    elif finish_block is not None:
        blocks["on_block"] = lambda model, i: finish_block(model.blocks[i])
    # random weights: each expert after the first draws from its own seed, so that the experts differ
    seed = cfg.seed + (fam.experts.index(component) if component in fam.experts else 0)
    model = load_component(build, source, include=record.quantizable, method=method, device=device, dtype=dtype,
                           ignore_prefixes=record.ignored_prefixes, progress=progress, seed=seed,
                           component=component, lora=lora, **blocks)
    model.lora_stack = lora
    model.checkpoint_file = file_record
    model.eval().requires_grad_(False)
    if offload is not None:
        offload.prepare(model)
    return model


def _lora_stack(cfg, component: str, build, include, method: QuantMethod | None):
    """The run's ``lora`` list read and checked against ``component`` (built on meta), or None."""
    from ..checkpoints.lora import LORA_COMPONENTS, load_loras, model_names

    if component not in LORA_COMPONENTS or not cfg.lora:
        return None
    from ..quant.linear import selected

    with torch.device("meta"):
        shapes, linears = model_names(build())
    quantizes = method is not None and method.quantizes
    quantized = {n for n in linears if quantizes and selected(n, include, method.skip)}
    return load_loras(cfg.lora, cfg.lora_mode, shapes, linears, quantized, component)


def load_t5(cfg, method, folder, device, dtype, progress, offload=None):
    return _load("t5", cfg, method, folder, device, dtype, progress, offload)


def load_clip(cfg, method, folder, device, dtype, progress, offload=None):
    return _load("clip", cfg, method, folder, device, dtype, progress, offload)


def per_token_timesteps(cfg, arch) -> bool:
    """Whether the run gives the DiT one timestep per token: Wan2.2 TI2V image-to-video (its kept first frame)."""
    return cfg.model.task == "i2v" and arch.model_type == "ti2v"


def load_dit(cfg, method, folder, device, dtype, progress, component: str = "dit", offload=None):
    """A DiT (``component``: ``dit``, or an expert of the family such as ``dit_low``), each block fused as it is
    loaded when the method says, except where the run gives per-token timesteps, which the fused block's
    modulation kernels do not take. ``offload``: as ``_load``."""
    finish = None
    arch = family(cfg.model.family).components[component].arch_table()[cfg.model[f"{component}_arch"]]
    if method is not None and method.fuse and per_token_timesteps(cfg, arch):
        log.info("%s: the blocks stay unfused: TI2V image-to-video gives one timestep per token, the fused block "
                 "one per sample", component)
    elif method is not None and method.fuse:
        from ..fused.wan_block import fuse_block  # norm+modulation+quant, fused q/k/v, GELU+quant

        finish = fuse_block
    return _load(component, cfg, method, folder, device, dtype, progress, offload, finish)


def load_self_attention(plan: ComponentPlan | None):
    """The DiT self-attention implementation of the planned ``attn_quant`` mode, or None for ``none`` (bf16 SDPA);
    ``generate`` installs it with ``lightq.models.attention.use_self_attention``. Cross-attention is untouched."""
    if plan is None or plan.scheme == "none":
        return None
    from ..attention.backends import implementation_for

    return implementation_for(plan.scheme, plan.backend)


def job_kind(cfg, plans: dict[str, ComponentPlan]) -> str | None:
    """Which components run on lightq's Triton kernels (a planned backend whose spec ``precompiles``: a component's
    linear layers or the DiT's self-attention), as sorted ``component=scheme-backend@arch`` joined by ``;`` (the
    self-attention's arch is the DiT's); None if none does. The key of the shipped kernel specializations
    (``kernels.precompile``)."""
    from ..attention.registry import specs as attention_specs
    from ..backends.registry import specs as linear_specs

    m = cfg.model
    archs = {"dit": m.dit_arch, "dit_low": m.dit_arch, "attn": m.dit_arch, "t5": m.t5_arch, "clip": m.clip_arch}
    found = {"linear": linear_specs(), "attn": attention_specs()}

    def precompiles(name: str, p: ComponentPlan) -> bool:
        spec = found["attn" if name == "attn" else "linear"].get(p.backend) if p.ok and p.backend else None
        return spec is not None and spec.precompiles

    return ";".join(sorted(f"{name}={p.scheme}-{p.backend}@{archs.get(name)}"
                           for name, p in plans.items() if precompiles(name, p))) or None


def kernel_precompile(cfg, hw, plans: dict[str, ComponentPlan]):
    """A ``kernels.precompile.Background`` compiling this job's recorded kernel specializations while it loads
    (a context manager; ``wait()`` before the first step), or None for a job that runs none of lightq's Triton
    kernels on a GPU."""
    kind = job_kind(cfg, plans)
    if kind is None or not hw.is_cuda:
        return None
    from ..kernels import interpreting
    from ..kernels.precompile import Background

    return None if interpreting() else Background(kind)


def load_vae(cfg, folder, device, offload=None):
    return _load(family(cfg.model.family).decoder, cfg, None, folder, device, torch.float32, False, offload)


def load_tokenizer_for(model_cfg, folder: Path | None):
    from ..checkpoints.diffusers import TOKENIZER_SUBFOLDER
    from ..models.t5 import T5_ARCHS
    from ..models.tokenizer import BYTE_TOKENIZER, load_tokenizer

    arch = T5_ARCHS[model_cfg.t5_arch]
    where = model_cfg.tokenizer
    if model_cfg.weights == "random":  # random weights have no vocabulary to honour: no tokenizer files needed
        where = BYTE_TOKENIZER
    if where != BYTE_TOKENIZER and folder is not None:
        where = next((p for p in (folder / model_cfg.tokenizer, folder / TOKENIZER_SUBFOLDER) if p.exists()), folder)
    return load_tokenizer(where, arch.text_len, arch.vocab)


def describe(module: nn.Module, method: QuantMethod | None) -> dict:
    """Quantized layer count, weight bytes (parameters + quantized buffers, LoRA side paths included), which file
    was read and why (``file``), the layers
    that left the chosen backend (``QuantMethod.record``) and the LoRAs applied (``LoraStack.record``) of a loaded
    component."""
    from ..quant.linear import QLinear

    qlinears = [m for m in module.modules() if isinstance(m, QLinear)]
    lazy = getattr(module, "lazy_blocks", None)  # blocks read from disk while running: counted, not resident
    storages = {}  # by storage, so tensors that are views of one buffer (fused q/k/v) count once
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
    lora = getattr(module, "lora_stack", None)
    return {"quantized_layers": len(qlinears) + (lazy.quantized_layers() if lazy is not None else 0),
            "weight_bytes": sum(storages.values()), "checkpoint": getattr(module, "checkpoint_numerics", {}),
            **({"file": module.checkpoint_file} if hasattr(module, "checkpoint_file") else {}),
            **(method.record() if method is not None else {}), **({"lora": lora.record()} if lora is not None else {})}


# ---------------------------------------------------------------------------------------------- inputs


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise ``[1, *shape]`` (the latent shape, ``LatentGeometry.latent_shape``) drawn on the CPU from
    ``seed``: the same on every device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=g, dtype=torch.float32)


def video_size(cfg) -> tuple[int, int]:
    """(height, width) of the video: ``model.height`` x ``model.width``, or for an I2V job with
    ``model.i2v_size=max_area`` LightX2V's size for the input picture's aspect ratio (``LatentGeometry.max_area``;
    the synthetic gradient's aspect is height / width)."""
    m = cfg.model
    if m.task != "i2v" or m.i2v_size != "max_area":
        return m.height, m.width
    aspect = m.height / m.width
    if cfg.image:
        from ..images import load_rgb

        img = load_rgb(cfg.image)
        aspect = img.height / img.width
    return family(m.family).geometry(m).max_area(m.height, m.width, aspect)


def input_image(cfg, height: int, width: int) -> torch.Tensor:
    """The I2V input image ``[3, H, W]`` in [-1, 1]: ``model.i2v_size=crop`` resized to cover (H, W) and
    centre-cropped; ``max_area`` resized to (H, W) (``video_size`` kept the picture's aspect ratio), bicubic.

    With synthetic weights and no ``image``, a deterministic colour gradient stands in.
    """
    if not cfg.image:
        if cfg.model.weights not in ("synthetic", "random"):
            raise LightqError("model.task=i2v needs an input image: pass image=<path to png/jpg>")
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        return torch.stack((xx, yy, xx * yy))
    from PIL import Image

    from ..images import load_rgb

    img = load_rgb(cfg.image)
    if cfg.model.i2v_size == "max_area":
        img = img.resize((width, height), Image.BICUBIC)
    else:
        scale = max(height / img.height, width / img.width)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def first_frame_latents(vae, image: torch.Tensor) -> torch.Tensor:
    """Wan2.2 TI2V image-to-video: the VAE latents ``[1, C, 1, h, w]`` of the image alone, which replace the first
    latent frame throughout sampling (``sampler.sample``'s ``keep``)."""
    return vae.encode(image[None, :, None].float())


def token_timesteps(t: torch.Tensor, kept_frames: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps ``[B, f * h * w]`` for a DiT token ``grid`` (f, h, w): 0 on the tokens of the first
    ``kept_frames`` latent frames (clean: they are the image), ``t`` elsewhere, as the official TI2V mask gives."""
    f, h, w = grid
    per_frame = t[:, None].expand(-1, f).clone()
    per_frame[:, :kept_frames] = 0.0
    return per_frame.repeat_interleave(h * w, dim=1)


def i2v_condition(vae, image: torch.Tensor, frames: int, geometry: LatentGeometry) -> torch.Tensor:
    """Wan I2V conditioning ``y`` ``[1, T + C, f, h, w]`` (T the VAE's temporal stride, 4; C its latent
    channels, 16): a T-channel first-frame mask + the VAE latents of (image, then frames-1 black frames). The
    mask marks the first *pixel* frame, folded T-to-1 in time like the VAE folds frames: latent frame 0 covers
    one frame repeated T times, each later latent frame T frames."""
    _, h, w = image.shape
    t = geometry.temporal
    _, lat_f, lat_h, lat_w = geometry.latent_shape(frames, h, w)
    mask = torch.zeros(1, frames, lat_h, lat_w, device=image.device)
    mask[:, 0] = 1
    mask = torch.cat([mask[:, :1].repeat(1, t, 1, 1), mask[:, 1:]], dim=1)  # [1, T * lat_f, h, w]
    mask = mask.view(lat_f, t, lat_h, lat_w).transpose(0, 1)  # channel c of latent frame f: pixel frame T f + c
    video = torch.cat([image[:, None], image.new_zeros(3, frames - 1, h, w)], dim=1)
    latents = vae.encode(video[None].float())[0]
    return torch.cat([mask.to(latents), latents])[None]


# ---------------------------------------------------------------------------------------------- offload


class Offload:
    """Where components live while the pipeline runs (``offload.mode``), carried out by ``lightq.offload``.

    ``none``: everything on the device. ``model``: components in (pinned) host memory, copied to the device only
    while they run. ``block`` / ``phase``: the DiT and umT5 stream their blocks (or block phases) through
    ``offload.buffers`` device slots, the rest of them resident while they run; CLIP and the VAE as ``model``.
    With ``run_cfg``, ``offload.max_gpu_gib`` is checked before anything is loaded.

    A component loaded for it (``load_*(..., offload=)``, on the run's device) is packed into host memory as it
    loads: its blocks one at a time as the loader completes them (``packer``), the rest once it is loaded
    (``prepare``); from a CUDA device each tensor goes once, by DMA, into its final page-locked pack. A module
    loaded elsewhere (host memory) is packed at ``prepare`` or its first ``start``.
    """

    def __init__(self, offload_cfg, device: torch.device, run_cfg=None):
        if offload_cfg.lazy_load and offload_cfg.mode not in ("block", "phase"):
            raise LightqError(f"offload.lazy_load=true streams DiT blocks from disk, which offload={offload_cfg.mode} "
                              "does not do: use offload=block or offload=phase")
        if offload_cfg.buffers < 1 or offload_cfg.lazy_ahead < 1:
            raise LightqError(f"offload.buffers={offload_cfg.buffers}, offload.lazy_ahead={offload_cfg.lazy_ahead}: "
                              "both must be at least 1")
        if run_cfg is not None:
            from ..offload import check_budget

            check_budget(run_cfg)
        self.cfg, self.device, self.mode = offload_cfg, device, offload_cfg.mode
        self.pin = bool(offload_cfg.pin_memory) and device.type == "cuda"
        self._placed: dict[int, object] = {}
        self._packed: dict[int, list] = {}  # by module: its blocks' unit packs, made while it loads

    def _placement(self, module: nn.Module):
        from ..offload import place

        if id(module) not in self._placed:
            self._placed[id(module)] = place(module, self.mode, self.device, self.cfg.buffers, self.pin,
                                             self.cfg.lazy_ahead, self._packed.pop(id(module), None))
        return self._placed[id(module)]

    def packer(self, finish: Callable[[nn.Module], None] | None = None) -> Callable[[nn.Module, int], None]:
        """The loader's ``on_block`` for a component loaded for this offload: ``finish(block)`` first, then, under
        block / phase for a component whose blocks stream, the block's units packed into host memory
        (``offload.placement.pack_units``, host buffers made ahead while the next block loads:
        ``offload.binding.HostBuffers``), which ``prepare`` hands to the component's placement."""
        from ..offload.binding import HostBuffers
        from ..offload.placement import pack_units
        from ..offload.units import streams_blocks

        buffers = HostBuffers(self.pin)

        def on_block(model: nn.Module, i: int) -> None:
            block = model.blocks[i]
            if finish is not None:
                finish(block)
            if self.mode in ("block", "phase") and streams_blocks(model):
                self._packed.setdefault(id(model), []).append(pack_units(block, self.mode, self.pin, buffers))
            if i == len(model.blocks) - 1:
                buffers.close()
        return on_block

    def prepare(self, *modules: nn.Module | None) -> None:
        """Pack each module where it will live (host buffers) now, in the load stage, not at its first use (on a
        CUDA device, the device memory it leaves is returned to the driver)."""
        for module in modules:
            if module is not None and self.mode != "none":
                self._placement(module)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @contextmanager
    def active(self, module: nn.Module | None):
        self.start(module)
        yield

    def start(self, module: nn.Module | None) -> None:
        """Put ``module`` where it runs (its weights on the device, or its blocks streaming); ``release`` undoes it."""
        if module is not None and self.mode != "none":
            self._placement(module).start()

    def release(self, module: nn.Module | None) -> None:
        if module is not None and self.mode != "none":
            self._placement(module).stop()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def room_for(self, module: nn.Module) -> tuple[int, int, str]:
        """(bytes ``module`` takes on the device under offload=model, bytes it may take now, how that was counted):
        ``lightq.pipeline.experts``'s prefetch check."""
        from .experts import device_room

        room, why = device_room(self.device, self.cfg.max_gpu_gib)
        return self._placement(module).nbytes, room, why

    def prefetch(self, module: nn.Module) -> None:
        """Start copying ``module`` (offload=model) to the device ahead of its ``start``."""
        self._placement(module).prefetch()

    def drop_prefetched(self) -> None:
        for placement in self._placed.values():
            if hasattr(placement, "drop"):
                placement.drop()
