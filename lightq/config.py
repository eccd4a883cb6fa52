"""The typed config every run composes into (Hydra structured configs).

``conf/config.yaml`` starts its defaults list with ``lightq_schema`` (registered here), so every composed config
is merged onto these dataclasses: a misspelt key or a value of the wrong type fails at compose time, before
anything runs. Values that need more than a type check (scheme names, shapes) are checked by ``validate``.

Groups: ``model``, ``dit_quant``, ``dit_low_quant``, ``t5_quant``, ``clip_quant``, ``attn_quant``, ``offload``,
``hardware``, ``sampler``, ``tracking``; ``lora`` is a list of ``LoraEntry`` and ``lora_mode`` how they apply.
``dit_low_quant`` is the low-noise expert of a two-expert model (Wan2.2 A14B; ``dit_quant`` is then the high-noise
one): its default ``same`` runs ``dit_quant``'s mode (``quant_of``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .attention import SCHEMES as ATTN_SCHEMES
from .errors import LightqError
from .paths import conf_dir, job_folder_name

SCHEMES = ("none", "fp8", "int8", "fp8-b128", "int4-g128", "fp8-pertensor")
COMPONENTS = ("dit", "dit_low", "t5", "clip")
SAME = "same"  # dit_low_quant's default: the mode of dit_quant
INHERITED_MODES = {"dit_low_quant": "dit_quant"}  # a group offering every YAML mode of another
TRACKERS = ("none", "mlflow")
DTYPES = ("bf16", "fp16", "fp32")
SEED_MAX = 2**32 - 1
SYNTHETIC_IMAGE_WEIGHTS = ("synthetic", "random")  # weights whose I2V runs may go without image= (a gradient)
ISOLATE = ("auto", "always", "never")
I2V_SIZES = ("crop", "max_area")


@dataclass
class QuantConfig:
    """One quantization mode of one component: a scheme (numerics) + a backend (kernels) + options.

    ``name`` is the mode (``fp8-sgl``), ``backend`` a registered backend name or ``auto``, ``ckpt`` an optional
    pre-quantized checkpoint (file, folder, or Hub ``repo/file``), ``skip`` fnmatch patterns of linears kept in
    high precision on top of the component's never-quantized layers.
    """

    name: str = "none"
    scheme: str = "none"
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    ckpt: Optional[str] = None
    skip: list[str] = field(default_factory=list)


@dataclass
class AttnQuantConfig:
    """The DiT self-attention's mode: a scheme of ``lightq.attention.numerics`` (``none``: bf16 SDPA) + an attention
    backend (``lightq.attention`` entry points, or ``auto``). Cross-attention always stays bf16. The backends take
    no options yet: ``options`` must stay empty."""

    name: str = "none"
    scheme: str = "none"
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Which pipeline, its architectures, its weights and the video it makes.

    ``family``: the model family record (``lightq.models.family``) that says which components the task has, how
    each is built and what the video geometry must be. ``weights``: ``synthetic`` (the embedded tiny
    checkpoint), ``random`` (real architecture, random weights, for benchmarks), a local folder in the official
    layout, or a Hub repo id. Two-expert models (Wan2.2 A14B) add ``dit_low_arch`` (the low-noise expert),
    ``boundary`` (the high-noise expert denoises while ``t >= boundary * 1000``) and ``guide_scale_low`` (the
    low-noise expert's CFG scale; ``guide_scale`` is the high-noise one's). ``i2v_size``: how an I2V video takes its
    size from ``height`` x ``width``: ``crop`` exactly that size (the picture resized to cover it, centre-cropped),
    ``max_area`` LightX2V's rule (the picture's aspect ratio within that area, each side a multiple of the latent
    grid; ``LatentGeometry.max_area``).
    """

    name: str = "tiny"
    family: str = "wan2.1"
    task: str = "t2v"
    dit_arch: str = "tiny"
    dit_low_arch: Optional[str] = None
    t5_arch: str = "tiny"
    clip_arch: Optional[str] = None
    vae_arch: str = "tiny"
    tokenizer: str = "byte"
    weights: str = "synthetic"
    dtype: str = "bf16"
    height: int = 64
    width: int = 64
    frames: int = 9
    fps: int = 16
    i2v_size: str = "crop"
    steps: int = 4
    shift: float = 5.0
    guide_scale: float = 5.0
    guide_scale_low: Optional[float] = None
    boundary: Optional[float] = None


@dataclass
class SamplerConfig:
    """Flow-matching sampler; ``None`` fields take the model's defaults (steps, shift, guide_scale). A
    ``guide_scale`` given here applies to both experts of a two-expert model unless ``guide_scale_low`` is given.
    ``boundary_step`` (two experts): the high-noise expert runs steps ``0 .. boundary_step - 1``, the low-noise one
    the rest, in place of ``model.boundary``'s timestep rule (LightX2V's ``boundary_step_index``)."""

    name: str = "unipc"
    steps: Optional[int] = None
    shift: Optional[float] = None
    guide_scale: Optional[float] = None
    guide_scale_low: Optional[float] = None
    denoising_steps: Optional[list[int]] = None
    boundary_step: Optional[int] = None


@dataclass
class OffloadConfig:
    """``mode``: none | model | block | phase; ``lazy_load`` streams blocks from a block-split checkpoint.

    ``buffers``: device slots for streamed blocks (the one computing + those copied ahead); ``lazy_ahead``: blocks
    the disk reader keeps ready; ``pin_memory``: page-locked host copies on CUDA (asynchronous transfers);
    ``max_gpu_gib``: refuse, before loading, a run whose weights cannot fit this many GiB of GPU memory.
    ``prefetch`` (offload=model, two experts): copy the low-noise expert in during the last high-noise step when the
    GPU has room for both (``lightq.pipeline.experts``); false: only at the switch (one expert on the GPU, ever).
    """

    mode: str = "none"
    lazy_load: bool = False
    buffers: int = 2
    lazy_ahead: int = 2
    pin_memory: bool = True
    max_gpu_gib: Optional[float] = None
    prefetch: bool = True


@dataclass
class ParallelConfig:
    """Several processes for one video (``lightq.parallel.layout``): ``mode`` none | ulysses | allgather | auto (how
    self-attention spans the video tokens split over the processes), ``cfg`` 1 | 2 (2: the conditional and
    unconditional DiT passes on two halves of the processes). Launched with ``torchrun``. ``world``: the process
    count the run was written for (a LightX2V config's ``seq_p_size x cfg_p_size``); null: whatever was launched.
    ``vae``: split (every process decodes its latent rows, ``lightq.parallel.rows``) | rank0 (rank 0 decodes alone)."""

    mode: str = "none"
    cfg: int = 1
    world: Optional[int] = None
    vae: str = "split"


@dataclass
class HardwareConfig:
    """``name``: auto (detect) | cpu | sm80 | sm89 | sm90 | sm100."""

    name: str = "auto"


@dataclass
class QualityConfig:
    """Quality against the bf16 run of the same model, seed and prompt.

    ``baseline``: ``auto`` (compute and cache it when the model is synthetic/tiny, else use a cached one if
    present), ``always``, ``never``. ``compare=false`` skips the comparison and the baseline entirely (the
    ``quality`` stage of the job's timings; it runs on the job's device).
    """

    baseline: str = "auto"
    compare: bool = True


@dataclass
class TrackingConfig:
    """Experiment tracking of every job: ``name`` none | mlflow (see lightq.tracking).

    ``uri``: the MLflow tracking URI (``conf/tracking/mlflow.yaml``: an SQLite file under ``./mlruns``);
    ``artifact_root``: where a new experiment keeps its artifacts; ``experiment``: the experiment's name;
    ``log_video``: upload video.mp4 with the other artifacts.
    """

    name: str = "none"
    uri: Optional[str] = None
    artifact_root: Optional[str] = None
    experiment: str = "lightq"
    log_video: bool = True


@dataclass
class SweepConfig:
    """How a sweep (``-m``) runs each job. ``isolate``: auto (a fresh process per job on CUDA) | always | never.
    ``objective``: the number of result.json each job returns to Hydra's sweeper (``quality.psnr_db``,
    ``timings_s.denoise``, ... : ``results.OBJECTIVES``), which Optuna-style sweepers optimize; null returns
    the exit code. ``gpus``: ``all`` or GPU indices (``0,1,2,3``) that the sweep's concurrent isolated jobs share,
    one job per GPU at a time (``lightq.gpu_slots``; use with a parallel launcher); null: every job sees every GPU.
    ``procs_per_job``: processes of each isolated job; above 1 the job runs under ``torchrun`` (a ``parallel=`` job)
    and, with ``gpus``, takes that many GPUs."""

    isolate: str = "auto"
    objective: Optional[str] = None
    gpus: Optional[Any] = None
    procs_per_job: int = 1


@dataclass
class LoraEntry:
    """One LoRA of the run's ``lora`` list: ``path`` a file or a Hub ``owner/repo/file``, ``strength`` its weight
    (1 = as trained, 0 = off). ``lightq.checkpoints.lora`` reads the layouts; docs/LORA.md."""

    path: str = ""
    strength: float = 1.0
    expert: Optional[str] = None  # two-expert models (Wan2.2 A14B): high | low | both; one-DiT models: leave it out


LORA_MODES = ("merged", "unmerged")
LORA_EXPERTS = {"high": ("dit",), "low": ("dit_low",), "both": ("dit", "dit_low")}  # expert -> the DiT components


@dataclass
class LightX2VRecord:
    """What ``from_lightx2v=`` imported (``lightq.lightx2v``), kept in result.json: the JSON ``config``, LightX2V's
    ``model_cls``, its kernel choices and a note on every meaning that differs from lightq's or goes unused."""

    config: Optional[str] = None
    model_cls: Optional[str] = None
    kernels: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class LightqConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dit_quant: QuantConfig = field(default_factory=QuantConfig)
    dit_low_quant: QuantConfig = field(default_factory=lambda: QuantConfig(name=SAME))
    t5_quant: QuantConfig = field(default_factory=QuantConfig)
    clip_quant: QuantConfig = field(default_factory=QuantConfig)
    attn_quant: AttnQuantConfig = field(default_factory=AttnQuantConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    prompt: str = "A cat walks on the grass, realistic style."
    negative_prompt: str = ""
    image: Optional[str] = None
    seed: int = 42
    save_frames: bool = False
    from_lightx2v: LightX2VRecord = field(default_factory=LightX2VRecord)
    resume: bool = False
    # LoRAs of the DiT, stacked in order: lora='[{path: a.safetensors, strength: 0.8}]'; sweep with
    # -m lora.0.strength=0,0.5,1. lora_mode: merged (into the weight before quantization) | unmerged (side path)
    lora: list[LoraEntry] = field(default_factory=list)
    lora_mode: str = "merged"


QUANT_GROUPS = tuple(f"{c}_quant" for c in COMPONENTS)


def backend_modes() -> dict[str, QuantConfig]:
    """The plain mode ``<scheme>-<backend>`` of every scheme of every installed backend (and of the repository's
    plugins where they are not installed, so that their modes plan and name the install command): a backend
    plugin brings its modes with it. Torch-free: read from the registry's specs."""
    from .backends.registry import scheme_backends

    return {f"{s}-{b}": QuantConfig(name=f"{s}-{b}", scheme=s, backend=b) for s, b in scheme_backends()}


def yaml_modes(group: str) -> list[str]:
    """The modes of a quant group written as YAML in ``conf/<group>/``: ``none``, the ``*-auto`` modes, and the
    modes whose options need a document (``dit_quant/fp8-triton.yaml``)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def inherited_modes(group: str) -> list[str]:
    """The YAML modes ``group`` takes from another group's folder (``dit_low_quant``: every ``dit_quant`` file)
    and has no file of its own for."""
    if group not in INHERITED_MODES:
        return []
    return sorted(set(yaml_modes(INHERITED_MODES[group])) - set(yaml_modes(group)))


def quant_modes(group: str) -> list[str]:
    """Every option of a quant group: its YAML modes (own and inherited) and the generated backend modes."""
    return sorted(set(yaml_modes(group)) | set(inherited_modes(group)) | set(backend_modes()))


def quant_of(cfg: Any, component: str) -> Any:
    """The quantization mode ``component`` runs: its group's, except ``dit_low_quant=same`` (the default), which
    runs ``dit_quant``'s mode, options and skip list with its own ``ckpt`` (a pre-quantized file holds one
    expert; without one, the low-noise expert's file is found in its folder)."""
    q = cfg[f"{component}_quant"]
    if component != "dit_low" or q.name != SAME:
        return q
    d = cfg.dit_quant
    return OmegaConf.structured(QuantConfig(name=d.name, scheme=d.scheme, backend=d.backend,
                                            options=OmegaConf.to_container(d.options), ckpt=q.ckpt,
                                            skip=list(d.skip)))


def register() -> None:
    """Put the schema, and every backend mode without a YAML file, into Hydra's ConfigStore (idempotent);
    ``conf/config.yaml`` names the schema first. A stored node with the name of a YAML file would be merged into
    it by Hydra's deprecated automatic schema matching, so a YAML file always wins.

    A generated mode is stored as a plain mapping of every ``QuantConfig`` field: the schema types it when Hydra
    merges it, so the composed config is the one a typed node gives, while a plain node costs OmegaConf a fraction
    of a typed one to build here and to copy on each of Hydra's composes (docs/BENCHMARKS.md, "A job's process
    outside its job")."""
    store = ConfigStore.instance()
    store.store(name="lightq_schema", node=LightqConfig)
    modes = {name: asdict(mode) for name, mode in backend_modes().items()}
    for group in QUANT_GROUPS:
        inherited = inherited_modes(group)
        for name in inherited:
            store.store(group=group, name=name, node=OmegaConf.load(conf_dir() / INHERITED_MODES[group] / f"{name}.yaml"))
        for name in sorted(set(modes) - set(yaml_modes(group)) - set(inherited)):
            store.store(group=group, name=name, node=modes[name])


# ``hydra.sweep.subdir`` names job folders through this; registered on import, so that launchers resolving the
# sub-folder in another process (joblib, submitit) have it as soon as they unpickle lightq's task function.
if not OmegaConf.has_resolver("lightq_job_dir"):
    OmegaConf.register_new_resolver("lightq_job_dir", job_folder_name)


def validate(cfg: Any) -> None:
    """Value checks a type cannot express; raises LightqError naming the field and the valid values."""
    for comp in COMPONENTS:
        q = cfg[f"{comp}_quant"]
        if q.scheme not in SCHEMES:
            raise LightqError(f"{comp}_quant.scheme='{q.scheme}' is not a scheme: choose one of {', '.join(SCHEMES)}")
    attn = cfg.attn_quant
    if attn.scheme not in ("none", *ATTN_SCHEMES):
        raise LightqError(f"attn_quant.scheme='{attn.scheme}' is not an attention scheme: choose one of none, "
                          f"{', '.join(ATTN_SCHEMES)}")
    if attn.options:
        raise LightqError(f"attn_quant={attn.name}: attention backends take no options, got {sorted(attn.options)}; "
                          "remove attn_quant.options")
    from .models.family import family

    fam = family(cfg.model.family)
    fam.components_of(cfg.model.task)  # an unknown task is an error here
    _validate_lightx2v_class(cfg)
    if cfg.offload.mode not in ("none", "model", "block", "phase"):
        raise LightqError(f"offload.mode='{cfg.offload.mode}': choose none, model, block or phase")
    if cfg.sampler.name not in ("unipc", "dpm++", "euler", "distill"):
        raise LightqError(f"sampler.name='{cfg.sampler.name}': choose unipc, dpm++, euler or distill")
    if cfg.quality.baseline not in ("auto", "always", "never"):
        raise LightqError(f"quality.baseline='{cfg.quality.baseline}': choose auto, always or never")
    if cfg.tracking.name not in TRACKERS:
        raise LightqError(f"tracking.name='{cfg.tracking.name}': choose one of {', '.join(TRACKERS)}")
    if cfg.lora_mode not in LORA_MODES:
        raise LightqError(f"lora_mode='{cfg.lora_mode}': choose merged (added to the weights before quantization) or "
                          "unmerged (a low-rank side path next to the quantized GEMM)")
    lora_entries(cfg.lora)
    check_lora_experts(cfg.lora, cfg.model.name, fam.experts)
    if cfg.sweep.isolate not in ISOLATE:
        raise LightqError(f"sweep.isolate='{cfg.sweep.isolate}': choose one of {', '.join(ISOLATE)}")
    from .results import check_objective

    check_objective(cfg.sweep.objective)
    m = cfg.model
    for comp in fam.pipeline(m.task):
        table = fam.components[comp].arch_table()
        if m[f"{comp}_arch"] not in table:
            raise LightqError(f"model.{comp}_arch='{m[f'{comp}_arch']}': choose one of {', '.join(table)}")
    fam.geometry(m).check(m.frames, m.height, m.width)
    _validate_experts(cfg, fam)
    if m.dtype not in DTYPES:
        raise LightqError(f"model.dtype='{m.dtype}': choose one of {', '.join(DTYPES)}")
    if m.i2v_size not in I2V_SIZES:
        raise LightqError(f"model.i2v_size='{m.i2v_size}': choose one of {', '.join(I2V_SIZES)}")
    if not m.fps > 0:
        raise LightqError(f"model.fps={m.fps}: give a positive frame rate (e.g. 16)")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise LightqError(f"seed={cfg.seed}: choose an integer from 0 to {SEED_MAX}")
    _validate_task_inputs(cfg)


def _validate_lightx2v_class(cfg: Any) -> None:
    """A ``from_lightx2v=`` config runs on a model of its LightX2V class's family (``lightx2v.keys.CLASS_FAMILIES``):
    its keys mean what they mean there (two experts' boundary, the TI2V latent channels)."""
    cls = cfg.from_lightx2v.model_cls
    if cls is None:
        return
    from .lightx2v.keys import CLASS_FAMILIES

    want = CLASS_FAMILIES.get(cls)
    if want is not None and cfg.model.family != want:
        raise LightqError(f"from_lightx2v: LightX2V's model class {cls} runs a {want} model; model={cfg.model.name} "
                          f"is {cfg.model.family}: pick a {want} model (python -m lightq --help lists them)")


def _validate_experts(cfg: Any, fam) -> None:
    """A quantization mode for a component the model does not have would be ignored: an error; a two-expert model
    needs its low-noise expert's architecture and the boundary between the two."""
    m = cfg.model
    present = fam.components_of(m.task)
    clip = cfg.clip_quant
    if m.task != "t2v" and "clip" not in present and (clip.scheme != "none" or clip.ckpt):
        raise LightqError(f"clip_quant={clip.name} quantizes a CLIP image encoder, which model={m.name} does not "
                          "have (it conditions on the VAE-encoded image only): drop clip_quant=")
    q = cfg.dit_low_quant
    if "dit_low" not in present and (q.name not in (SAME, "none") or q.ckpt):
        raise LightqError(f"dit_low_quant={q.name} quantizes the low-noise expert of a two-expert model, which "
                          f"model={m.name} does not have: drop dit_low_quant=, or pick a Wan2.2 A14B model")
    if "dit_low" in present:
        if m.dit_low_arch is None or m.boundary is None:
            raise LightqError(f"model={m.name} has two DiT experts: set model.dit_low_arch and model.boundary "
                              "(e.g. 0.875; the high-noise expert denoises while t >= boundary * 1000)")
        if not 0.0 < m.boundary < 1.0:
            raise LightqError(f"model.boundary={m.boundary}: choose a value between 0 and 1 (the official 0.875 "
                              "for T2V-A14B, 0.9 for I2V-A14B)")
        if cfg.sampler.boundary_step is not None:
            from .pipeline.sampler import sampler_config, timesteps

            timesteps(sampler_config(cfg))  # checks boundary_step against the run's step count
    elif m.boundary is not None or m.guide_scale_low is not None or cfg.sampler.guide_scale_low is not None \
            or cfg.sampler.boundary_step is not None:
        raise LightqError(f"model.boundary / guide_scale_low / sampler.boundary_step belong to two-expert models; "
                          f"model={m.name} has one DiT: drop them")


def _validate_task_inputs(cfg: Any) -> None:
    """What only one task uses is an error on the other (it would be ignored); the I2V picture is checked now,
    before any model loads."""
    m = cfg.model
    if m.task == "t2v":
        if cfg.image:
            raise LightqError(f"image= is the input of image-to-video models; model={m.name} is text-to-video: "
                              "drop image=, or pick an I2V model (e.g. model=tiny-i2v)")
        q = cfg.clip_quant
        if q.scheme != "none" or q.ckpt:
            raise LightqError(f"clip_quant={q.name} quantizes the image encoder, which model={m.name} (text-to-video) "
                              "does not have: drop clip_quant=, or pick an I2V model")
        return
    if cfg.image:
        from .images import load_rgb

        load_rgb(cfg.image)
    elif m.weights not in SYNTHETIC_IMAGE_WEIGHTS:
        raise LightqError(f"model={m.name} is image-to-video and needs its input picture: pass image=<png or jpg>")


def check_lora_experts(entries, model: str, experts: tuple[str, ...]) -> None:
    """Each entry's ``expert``: required on a two-expert model (``high`` / ``low`` / ``both``), refused on a one-DiT
    model; a LightqError names the entry and the fix (a file named like LightX2V's ``*high_noise*`` / ``*low_noise*``
    LoRAs gets the expert it names suggested)."""
    for i, e in enumerate(entries or ()):
        expert = e.get("expert")
        if expert is not None and expert not in LORA_EXPERTS:
            raise LightqError(f"lora[{i}].expert={expert!r}: choose {' | '.join(LORA_EXPERTS)}")
        if experts and expert is None:
            name = str(e.get("path")).rsplit("/", 1)[-1].lower()
            guess = "high" if "high_noise" in name else "low" if "low_noise" in name else None
            hint = f" (the file name says {guess}_noise: expert: {guess})" if guess else ""
            raise LightqError(f"lora[{i}] {e.get('path')}: model={model} has two denoising experts: say which one the "
                              f"LoRA is for with lora.{i}.expert=high|low|both{hint}")
        if not experts and expert is not None:
            raise LightqError(f"lora[{i}].expert={expert}: model={model} has one DiT; drop expert")


def lora_entries(entries) -> list[tuple[str, float]]:
    """``(path, strength)`` of each ``lora`` entry, or a LightqError naming the bad one."""
    out = []
    for i, e in enumerate(entries or ()):
        try:
            path, strength = e.get("path"), e.get("strength", 1.0)
        except AttributeError:  # not a mapping
            path, strength = None, None
        if not path or not isinstance(path, str):
            raise LightqError(f"lora[{i}]: give the LoRA file as lora=[{{path: <file or owner/repo/file>, strength: "
                              "1.0}]")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise LightqError(f"lora[{i}].strength={strength!r}: give a finite number (1.0 = as trained, 0 = off)")
        out.append((path, float(strength)))
    return out
