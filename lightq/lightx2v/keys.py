"""What lightq does with each LightX2V config key that is not mapped onto a lightq option (``importer`` maps those).

- ``MISSING``: LightX2V features lightq does not have, feature -> the keys that turn it on. A config that turns one
  on is refused in one line naming the feature, the key and the file. This table is the single place to switch a
  feature on: the engineer who adds it removes its row and maps its keys in ``importer``.
- ``KERNELS``: kernel choices: key -> value -> what lightq runs for it (``SAME``: the same numerics, another kernel;
  a note: how the numerics differ). Recorded in result.json (``from_lightx2v.kernels`` / ``notes``).
- ``CONSTANTS``: key -> the one value lightq's Wan2.1 has; another value is refused.
- ``PLACEMENT``: where LightX2V keeps a component (memory, not numerics): accepted, noted.
- ``UNUSED``: keys LightX2V itself does not read in a Wan2.1 run of this kind: accepted, noted.

A key in none of these (and not mapped) is refused as unknown: nothing in a config is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# LightX2V's model classes (its --model_cls) lightq runs, with the lightq model family each runs on (``model=`` must
# be of it: ``config.validate``); every other class is refused.
WAN21_CLASSES = ("wan2.1", "wan2.1_distill")
MOE_CLASSES = ("wan2.2_moe", "wan2.2_moe_distill")  # Wan2.2 A14B: two experts
WAN22_CLASSES = ("wan2.2", *MOE_CLASSES)  # wan2.2: the dense TI2V-5B
CLASSES = (*WAN21_CLASSES, *WAN22_CLASSES)
DISTILL_CLASSES = ("wan2.1_distill", "wan2.2_moe_distill")  # LightX2V's step-distill schedulers
CLASS_FAMILIES = {"wan2.1": "wan2.1", "wan2.1_distill": "wan2.1", "wan2.2": "wan2.2-ti2v",
                  "wan2.2_moe": "wan2.2-a14b", "wan2.2_moe_distill": "wan2.2-a14b"}
# keys only LightX2V's Wan2.2 MoE runners read (a list-valued sample_guide_scale is theirs too)
MOE_KEYS = ("boundary", "boundary_step_index", "high_noise_original_ckpt", "low_noise_original_ckpt",
            "high_noise_quantized_ckpt", "low_noise_quantized_ckpt")


def _on(value: Any) -> bool:
    """A value that turns a feature on: anything but false / null / empty / 0."""
    return value not in (False, None, 0, "", [], {})


@dataclass(frozen=True)
class Missing:
    """A LightX2V feature lightq lacks: ``keys`` turn it on when ``active(value)``; ``issue`` where it is planned;
    ``why`` what is missing (default: the feature itself)."""

    feature: str
    keys: tuple[str, ...]
    active: Callable[[Any], bool] = _on
    issue: str = ""
    prefixes: tuple[str, ...] = field(default=())  # every key starting with one of these belongs to it too
    why: str = "lightq does not have it"
    classes: tuple[str, ...] = CLASSES  # the model classes it is missing for

    def owns(self, key: str) -> bool:
        return key in self.keys or (bool(self.prefixes) and key.startswith(self.prefixes))


MISSING: tuple[Missing, ...] = (
    Missing("multi-GPU parallel inference", ("seq_parallel", "cfg_parallel", "text_encoder_tensor_parallel",
                                             "vae_decode_parallel", "load_from_rank0", "tp_mm_type",
                                             "tp_rms_norm_type")),
    Missing("feature caching", ("feature_caching",), lambda v: v != "NoCaching"),
    Missing("feature caching", ("teacache_thresh", "coefficients", "use_ret_steps", "use_adaln_cache")),
    Missing("sparse attention", ("dynamic_sparse_attn_setting", "rainfusion_attn_setting", "sol_attn_setting",
                                 "sparse_type")),
    Missing("the tiny autoencoder (TAE) decoder", ("use_tae", "tae_path")),
    Missing("disaggregated serving", ("disagg_mode", "disagg_config", "rdma_buffer_slot_size")),
    Missing("autoregressive / causal video generation", ("ar_config", "num_frame_per_block", "num_blocks",
                                                         "frame_seq_length", "num_fragments", "causal_rope_type",
                                                         "causal_self_attn_type", "chunk_latent_frames",
                                                         "prev_frame_length", "memory_window_size")),
    Missing("dynamic CFG", ("enable_dynamic_cfg", "cfg_interval", "enable_cfg_renorm", "cfg_renorm_min")),
    Missing("the prompt enhancer", ("use_prompt_enhancer", "prompt_travel"), prefixes=("pe_",)),
    Missing("video frame interpolation", ("video_frame_interpolation",)),
    Missing("changing resolution during sampling", ("changing_resolution", "resolution_rate")),
    Missing("I2V image resize modes (resize_mode / buckets)", ("resize_mode", "bucket_shape", "fixed_shape",
                                                               "fixed_area", "aspect_ratio")),
    Missing("I2V without the CLIP image encoder", ("use_image_encoder",), lambda v: v is False,
            classes=WAN21_CLASSES),  # Wan2.2 has no CLIP: use_image_encoder false is its design (``importer``)
    Missing("module unloading between stages", ("unload_modules",)),
    Missing("audio-driven video (seko_talk, InfiniteTalk, Wan2.1 audio)", ("audio_sr", "video_duration",
                                                                           "use_real_mel_spectrogram"),
            lambda v: True, prefixes=("audio_", "infinitetalk_", "adapter_")),
    Missing("other models' encoders and VAEs (Wan2.1 has T5, CLIP and its VAE)", (), lambda v: True,
            prefixes=("video_vae_", "audio_vae_", "text_encoder_", "qwen25vl_", "qwen3_", "gemma_", "byt5_",
                      "siglip_")),
)

SAME = ""  # KERNELS value: the same numerics as lightq's, by another kernel

_BF16_ATTENTION = {"flash_attn2": SAME, "flash_attn3": SAME, "torch_sdpa": SAME,
                   "npu_flash_attn": "LightX2V's Ascend NPU kernel of bf16 attention; lightq runs bf16 attention",
                   "intel_xpu_flash_attn": "LightX2V's Intel XPU kernel of bf16 attention; lightq runs bf16 attention"}
SAGE2_NOTE = ("sage_attn2 -> attn_quant=int8fp8-sage2-auto: SageAttention2's formats (smoothed int8 Q.K, fp8 e4m3 "
              "P.V with per-channel V scales), as LightX2V runs it on Hopper; SageAttention2 scales Q/K per thread "
              "where lightq scales per block, so results agree within the scheme's error bound, not bit for bit. "
              "On Ada (sm89) and Ampere (sm80) LightX2V's sage_attn2 runs int8 Q.K with fp16 P.V: "
              "attn_quant=int8-sage-auto there")
CROSS_SAGE_NOTE = ("LightX2V runs this cross-attention with SageAttention2 (int8 / fp8); lightq's cross-attention "
                   "is always bf16")

# key -> value -> SAME or how lightq's numerics differ. Self-attention's mode is mapped by ``importer``.
KERNELS: dict[str, dict[str, str]] = {
    "self_attn_1_type": {**_BF16_ATTENTION, "sage_attn2": SAGE2_NOTE},
    "cross_attn_1_type": {**_BF16_ATTENTION, "sage_attn2": CROSS_SAGE_NOTE},
    "cross_attn_2_type": {**_BF16_ATTENTION, "sage_attn2": CROSS_SAGE_NOTE},
    "rope_type": {"torch_real_rope": SAME, "torch_complex_rope": SAME, "flashinfer_rope": SAME},
    "rms_norm_type": {"torch": SAME, "sgl-kernel": SAME, "one-pass": SAME, "npu_rms_norm": SAME},
    "layer_norm_type": {"torch": SAME, "Triton": SAME, "npu_layer_norm": SAME, "gcu_layer_norm": SAME},
    "modulate_type": {"torch": SAME, "triton": SAME},
    "use_compile": {"False": SAME, "True": "LightX2V torch.compiles the DiT; lightq runs it eagerly (same math)"},
    "use_tiling_vae": {"False": SAME,
                       "True": "LightX2V decodes the VAE in tiles; lightq decodes the whole latent at once, so "
                               "pixels near tile seams differ"},
}
# key -> the value lightq's Wan2.1 (and Wan2.2 A14B) has (as LightX2V writes it)
CONSTANTS: dict[str, Any] = {
    "text_len": 512, "use_31_block": True, "vae_stride": [4, 8, 8], "patch_size": [1, 2, 2],
    "num_channels_latents": 16, "use_bfloat16": True, "do_mm_calib": False, "max_area": False,
}
# Wan2.2 TI2V-5B's (class wan2.2): the Wan2.2 VAE's 48 channels, 4 frames and 16x16 pixels per latent. LightX2V's
# defaults are Wan2.1's, so a wan2.2 config must state these (``REQUIRED``).
TI2V_CONSTANTS: dict[str, Any] = {**CONSTANTS, "vae_stride": [4, 16, 16], "num_channels_latents": 48}
CLASS_CONSTANTS = {"wan2.2": TI2V_CONSTANTS}  # the other classes: CONSTANTS
REQUIRED = {"wan2.2": ("vae_stride", "num_channels_latents")}

# ``parallel`` (mapped by ``importer``): how self-attention spans the split tokens, and the other keys of the dict
PARALLEL_ATTENTION = {"ulysses": ("ulysses", SAME),
                      "ulysses-4090": ("ulysses", "LightX2V's ulysses-4090 moves the all-to-all through host memory "
                                                  "for GPUs without peer access; the same math as ulysses"),
                      "ring": ("ring", "LightX2V's ring attention and lightq's both pass key/value blocks around "
                                       "the ranks and merge the partial softmaxes; the merge order may differ "
                                       "(within lightq.parallel.sequence_parallel's bound)")}
PARALLEL_KEYS = {
    "seq_p_head_parallel": SAME, "seq_p_tensor_fusion": SAME, "seq_p_prepost_backend": SAME,
    "seq_p_fp8_comm": "LightX2V sends the sequence-parallel all-to-all in fp8; lightq sends the activations as they "
                      "are (the single-GPU result, twice the bytes)",
    "seq_p_quant_scheme": "LightX2V quantizes the sequence-parallel traffic; lightq sends the activations as they "
                          "are (the single-GPU result, more bytes)",
}

# where a component lives: no numerics (lightq's offload= places every component; see the notes)
PLACEMENT = ("t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload", "offload_ratio", "t5_lazy_load",
             "vae_offload_cache", "num_disk_workers")

# accepted and noted: LightX2V does not read them in a Wan2.1 / wan2.1_distill run
UNUSED = {
    "target_fps": "only read with video_frame_interpolation",
    "_comment": "a comment", "comment": "a comment", "comment_parallel": "a comment",
    # fp8-pertensor's load-time options: LightX2V's Wan DiT gives its linears no config, so they never see them
    # (only the WorldMirror and Motus runners pass them on)
    "weight_auto_quant": "LightX2V's Wan DiT does not pass it to its linears: a quantized DiT reads dit_quantized_ckpt",
    "weight_scale_granularity": "LightX2V's Wan DiT does not pass it to its linears (fp8-pertensor weight_auto_quant)",
    "input_scale_file": "read by LightX2V's WorldMirror runner only",
}
