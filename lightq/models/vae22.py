"""The Wan2.2 video VAE (TI2V-5B), in the key layout of ``Wan2.2_VAE.pth``.

Contract
    ``encode(video [B, 3, F, H, W] in [-1, 1]) -> z [B, 48, 1 + (F - 1) // 4, H / 16, W / 16]``
    ``decode(z) -> video [B, 3, 1 + 4 (T - 1), 16 h, 16 w]`` clamped to [-1, 1]; both return float32.
    ``z = (mu - LATENT_MEAN) * (1 / LATENT_STD)`` per channel, ``mu`` the first 48 channels of
    ``conv1(encoder(patchify(video)))``; ``decode`` inverts that and applies ``conv2``, then ``unpatchify``.

Against the Wan2.1 VAE (``lightq.models.vae``, whose causal convs, residual, attention and resampling blocks this
one reuses), the official Wan2.2 VAE

- folds each 2x2 pixel patch into channels first (``patchify``: ``[B, 3, F, H, W] -> [B, 12, F, H/2, W/2]``,
  channel ``4 c + 2 r + q`` for colour ``c``, row offset ``q``, column offset ``r``), so three 2x downsampling
  stages give 16x16 pixels per latent; the decoder ends on 12 channels and ``unpatchify`` inverts the fold;
- wraps every encoder stage in a ``DownBlock`` (``downsamples.<i>.downsamples.<j>``) whose parameter-free shortcut
  averages groups of the stage input's channels x (2 frames) x (2x2 pixels) into the output channels
  (``AvgDown``), and every decoder stage in an ``UpBlock`` (``upsamples.<i>.upsamples.<j>``) whose shortcut
  repeats channels into frames and pixels (``DupUp``, dropping the frame before the clip on the first latent);
- has a decoder of its own width (``dec_dim`` 256 against the encoder's 160) whose upsamplers keep the channel
  count; downsamples time in the later stages (``temperal_downsample`` False, True, True).

Processing is chunked as the official code does (encoder: 1 frame, then 4 at a time; decoder: one latent at a
time, through ``FrameCache``): the shortcuts pad or drop frames per chunk, so chunked is the definition here.
Parameters only (no buffers): builds under ``torch.device("meta")``; never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightq.errors import LightqError

from .vae import (CausalConv3d, Downsample, FrameCache, FramesSink, ResidualBlock, RowSplit, Upsample, _first_chunk,
                  _head, _middle, check_latents, check_video, decode_chunks, init_weights)

# Per-channel statistics of Wan2.2 VAE posterior means, from the official release (wan/modules/vae2_2.py).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
PATCH = 2  # pixels per side folded into channels before the encoder


@dataclass(frozen=True)
class VAE22Arch:
    """Architecture hyper-parameters of the Wan2.2 VAE (official names; ``dim`` is the encoder's width)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W: the patch fold times one halving per stage but the last."""
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)


VAE22_ARCHS = {"wan2.2": VAE22Arch(), "tiny": VAE22Arch(dim=8, dec_dim=16)}


def patchify(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, F, H, W] -> [B, 4 C, F, H/2, W/2]``, channel ``4 c + 2 r + q`` (``q``/``r`` row/column offsets)."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, f, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify``."""
    b, c4, f, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, f, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), f, h * PATCH, w * PATCH)


class AvgDown(nn.Module):
    """Parameter-free shortcut: front-pad time to a multiple of ``ft``, fold (``ft`` frames x ``fs`` x ``fs``
    pixels) into channels (channel-major), and average consecutive groups of them into ``out_ch`` channels."""

    def __init__(self, in_ch: int, out_ch: int, ft: int, fs: int):
        super().__init__()
        if in_ch * ft * fs * fs % out_ch:
            raise LightqError(f"AvgDown: {in_ch} x {ft * fs * fs} channels do not group into {out_ch}")
        self.out_ch, self.ft, self.fs = out_ch, ft, fs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_ch, -1, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp(nn.Module):
    """Parameter-free shortcut: repeat each channel, unfold the copies into (``ft`` frames x ``fs`` x ``fs``
    pixels) of ``out_ch`` channels; on the first latent the ``ft - 1`` frames before the clip are dropped."""

    def __init__(self, in_ch: int, out_ch: int, ft: int, fs: int):
        super().__init__()
        if out_ch * ft * fs * fs % in_ch:
            raise LightqError(f"DupUp: {in_ch} channels do not repeat into {out_ch} x {ft * fs * fs}")
        self.out_ch, self.ft, self.fs = out_ch, ft, fs
        self.repeats = out_ch * ft * fs * fs // in_ch

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_ch, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_ch, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first else x


class DownBlock(nn.Module):
    """One encoder stage: residual blocks, then (``down``) a Downsample, plus the ``AvgDown`` shortcut."""

    def __init__(self, d_in: int, d_out: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown(d_in, d_out, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = [ResidualBlock(d_in if i == 0 else d_out, d_out) for i in range(blocks)]
        if down:
            layers.append(Downsample(d_out, temporal=temporal))
        self.downsamples = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder stage: residual blocks, then (``up``) an Upsample keeping the channels, plus the ``DupUp``
    shortcut (``up`` stages only)."""

    def __init__(self, d_in: int, d_out: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp(d_in, d_out, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = [ResidualBlock(d_in if i == 0 else d_out, d_out) for i in range(blocks)]
        if up:
            layers.append(Upsample(d_out, temporal=temporal, out_dim=d_out))
        self.upsamples = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        first = _first_chunk(self, cache)
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return h if self.avg_shortcut is None else h + self.avg_shortcut(x, first)


class Encoder22(nn.Module):
    """patchified video [B, 12, F, H/2, W/2] -> posterior parameters [B, 2 z_dim, 1 + (F - 1) / 4, H/16, W/16]."""

    def __init__(self, arch: VAE22Arch):
        super().__init__()
        dims = [arch.dim * m for m in (1, *arch.dim_mult)]
        stages = len(arch.dim_mult)
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3)
        self.downsamples = nn.ModuleList(
            DownBlock(d_in, d_out, arch.num_res_blocks,
                      temporal=i < len(arch.temperal_downsample) and arch.temperal_downsample[i], down=i < stages - 1)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * arch.z_dim)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head["2"](F.silu(self.head["0"](x)), cache)


class Decoder22(nn.Module):
    """latents [B, z_dim, T, h, w] -> patchified video [B, 12, 1 + 4 (T - 1), 8 h, 8 w] (unclamped)."""

    def __init__(self, arch: VAE22Arch):
        super().__init__()
        dims = [arch.dec_dim * m for m in (arch.dim_mult[-1], *reversed(arch.dim_mult))]
        temporal_up = tuple(reversed(arch.temperal_downsample))
        stages = len(arch.dim_mult)
        self.conv1 = CausalConv3d(arch.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        self.upsamples = nn.ModuleList(
            UpBlock(d_in, d_out, arch.num_res_blocks + 1,
                    temporal=i < len(temporal_up) and temporal_up[i], up=i < stages - 1)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])))
        self.head = _head(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return self.head["2"](F.silu(self.head["0"](x)), cache)


class Wan22VAE(nn.Module):
    """The Wan2.2 VAE: ``encoder``, ``conv1`` (posterior 1x1x1), ``conv2`` (latent 1x1x1), ``decoder``."""

    def __init__(self, arch: VAE22Arch = VAE22Arch()):
        super().__init__()
        if arch.z_dim != len(LATENT_MEAN):
            raise LightqError(f"VAE z_dim {arch.z_dim} has no latent statistics: Wan2.2's VAE uses "
                              f"z_dim={len(LATENT_MEAN)} (the TI2V DiT's latent channels); keep it in the VAE22Arch")
        self.arch = arch
        self.encoder = Encoder22(arch)
        self.conv1 = CausalConv3d(2 * arch.z_dim, 2 * arch.z_dim, 1)
        self.conv2 = CausalConv3d(arch.z_dim, arch.z_dim, 1)
        self.decoder = Decoder22(arch)
        if not self.conv1.weight.is_meta:
            init_weights(self)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) per channel, as the official code holds them."""
        shape = (1, self.arch.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=like.device).view(shape)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=like.device).view(shape)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised posterior means ``[B, 48, 1 + (F - 1) // 4, H / 16, W / 16]`` (float32); frames stream 1,
        then 4 at a time."""
        check_video(self.arch, video)
        x = patchify(video.to(self.conv2.weight.dtype))
        step, cache = self.arch.temporal_factor, FrameCache()
        parts = [self.encoder(x[:, :, :1], cache)]
        parts += [self.encoder(x[:, :, s:s + step], cache) for s in range(1, x.shape[2], step)]
        mu = self.conv1(torch.cat(parts, dim=2))[:, :self.arch.z_dim].float()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False, rows: RowSplit | None = None,
               on_frames: FramesSink | None = None) -> torch.Tensor | None:
        """Video ``[B, 3, 1 + 4 (T - 1), 16 h, 16 w]`` in [-1, 1] (float32), one latent frame at a time
        (``vae.decode_chunks``: ``progress``, ``on_frames``); ``rows`` splits the decode over processes by latent
        rows (as ``vae.WanVAE.decode``; the shortcuts and ``unpatchify`` are per pixel): the video on rank 0 of the
        split, None on the others."""
        check_latents(self.arch, latents)
        mean, inv_std = self._stats(latents)
        z = self.conv2((latents.float() / inv_std + mean).to(self.conv2.weight.dtype))
        return decode_chunks(lambda z_i, cache: unpatchify(self.decoder(z_i, cache)), z, self.arch.temporal_factor,
                             progress, rows, on_frames)
