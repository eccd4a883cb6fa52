"""The Wan2.1 video VAE (3-D causal convolutional autoencoder), in the key layout of ``Wan2.1_VAE.pth``.

Contract
    ``encode(video [B, 3, F, H, W] in [-1, 1]) -> z [B, 16, 1 + (F - 1) // 4, H / 8, W / 8]``
    ``decode(z) -> video [B, 3, 1 + 4 (T - 1), 8 h, 8 w]`` clamped to [-1, 1]; both return float32.
    ``z = (mu - LATENT_MEAN) / LATENT_STD`` per channel, where ``mu`` is the posterior mean (the first 16
    channels of ``conv1(encoder(video))``); ``decode`` inverts that normalisation and applies ``conv2``.

Time is causal everywhere: a causal conv with temporal kernel ``k`` sees the current frame and the ``k - 1``
frames before it (zeros before the clip starts). Frame 0 is special in the resamplers: a temporal upsampler
passes it through unchanged and doubles every later frame (its ``time_conv`` emits two frames' channels at once,
seeing only frames >= 1); a temporal downsampler keeps frame 0 and then takes every window of 3 frames at
stride 2 over the whole sequence. Hence ``F = 1 + 4k`` frames <-> ``1 + k`` latents.

Because everything is causal, the video can be processed in chunks (encoder: 1 frame, then 4 at a time;
decoder: 1 latent at a time, as the official code does) with a ``FrameCache`` carrying, per causal conv, the
last ``k - 1`` input frames, and per resampler whether it has seen frame 0 (plus, when downsampling, the frame
that starts the next window). Chunked and whole-sequence processing compute the same function; chunking keeps
activation memory independent of the frame count.

A decode can be split over processes by latent rows (``decode(..., rows=RowSplit)``; ``lightq.parallel.rows``
builds one): each process decodes its rows, a 3x3 conv first takes one row from each neighbour (``halo``), the
middle's attention block sees the whole frame (``whole``, then ``own``), and rank 0 gets the video (``collect``).
Every process thus runs one process's operations on one process's values for its rows.

The module holds parameters only (no buffers), so it builds under ``torch.device("meta")`` and loads with
``load_state_dict(..., assign=True)``. It is never quantized and runs in float32 or bfloat16 (its parameters'
dtype). Sub-module names follow the official ``nn.Sequential`` indices so that state-dict keys match exactly:
``residual.{0,2,3,6}``, ``head.{0,2}``, ``resample.1`` (the weightless SiLU / dropout / pad / upsample layers
at the other indices are applied inline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lightq.errors import LightqError
from lightq.progress import Progress

# Per-channel statistics of Wan2.1 VAE posterior means, from the official release (wan/modules/vae.py).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class VAEArch:
    """Architecture hyper-parameters (names as in the official code, ``temperal`` spelling included)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent after the first."""
        return 2 ** sum(self.temperal_downsample)


VAE_ARCHS = {"wan2.1": VAEArch(), "tiny": VAEArch(dim=8)}


class RowSplit(Protocol):
    """A decode's latent rows split over processes (``lightq.parallel.rows.RowSplit``); ``x`` is ``[..., rows, W]``
    at any resolution."""

    def own(self, x: torch.Tensor) -> torch.Tensor: ...  # this process's rows of a whole frame

    def whole(self, x: torch.Tensor) -> torch.Tensor: ...  # every process's rows, in order

    def halo(self, x: torch.Tensor, n: int) -> torch.Tensor: ...  # plus n rows of each neighbour (zeros at edges)

    def collect(self, x: torch.Tensor) -> torch.Tensor | None: ...  # the whole frame on rank 0, None elsewhere


class FramesSink(Protocol):
    """Takes a decode's output frames ``[B, 3, n, H, W]`` as they are decoded (``decode_chunks``)."""

    def __call__(self, frames: torch.Tensor) -> None: ...


class FrameCache:
    """State carried between temporal chunks, keyed by module: conv input tails and frame-0 markers; and ``rows``,
    the decode's row split (None: the process decodes whole frames)."""

    def __init__(self, rows: RowSplit | None = None) -> None:
        self.rows = rows
        self._tails: dict[nn.Module, torch.Tensor] = {}
        self._started: set[nn.Module] = set()

    def tail(self, module: nn.Module) -> torch.Tensor | None:
        return self._tails.get(module)

    def set_tail(self, module: nn.Module, frames: torch.Tensor) -> None:
        self._tails[module] = frames.clone()  # a clone, so the whole chunk it was sliced from can be freed

    def first_call(self, module: nn.Module) -> bool:
        """True the first time ``module`` asks (it then owns frame 0 of the clip), False afterwards."""
        if module in self._started:
            return False
        self._started.add(module)
        return True


def _first_chunk(module: nn.Module, cache: FrameCache | None) -> bool:
    return cache is None or cache.first_call(module)


def _rows(cache: FrameCache | None) -> RowSplit | None:
    return cache.rows if cache is not None else None


class CausalConv3d(nn.Conv3d):
    """3-D conv, causal in time (``k_t - 1`` past frames, zeros before the clip), 'same' zero padding in space (under
    a row split: the neighbours' rows above and below, zeros at the frame's edges)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.history = kt - 1

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        rows, pad_h = _rows(cache), self.padding[1]
        if rows is not None and pad_h:
            x = rows.halo(x, pad_h)  # before the cache takes its tail: the cached rows carry their halo
        if self.history:
            past = cache.tail(self) if cache is not None else None
            if past is None:
                past = x.new_zeros(x.shape[0], x.shape[1], self.history, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache.set_tail(self, x[:, :, -self.history:])
        if rows is not None and pad_h:
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, 0, self.padding[2]))
        return super().forward(x)


class RMSNorm(nn.Module):
    """``x / rms_over_channels(x) * gamma`` (channel dim 1); gamma broadcasts over ``spatial_dims`` trailing dims."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D ``fn`` on ``[N, C, H, W]`` to every frame of ``x [B, C, T, H, W]``."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2).contiguous()


class ResidualBlock(nn.Module):
    """``x -> shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))`` with 3x3x3 causal convs."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_dim, 3), "2": CausalConv3d(in_dim, out_dim, 3),
            "3": RMSNorm(out_dim, 3), "6": CausalConv3d(out_dim, out_dim, 3),
        })
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        r = self.residual
        h = r["2"](F.silu(r["0"](x)), cache)
        h = r["6"](F.silu(r["3"](h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).reshape(n, 3 * c, h * w).transpose(1, 2)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [n, 1 head, h*w, c] each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        rows = _rows(cache)
        if rows is None:
            return x + _per_frame(self._attend, x)
        return x + rows.own(_per_frame(self._attend, rows.whole(x)))  # the whole frame, as one process sees it


class Downsample(nn.Module):
    """Spatial /2 (pad right/bottom by 1, 3x3 conv stride 2); if ``temporal``, then time /2 keeping frame 0."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = _per_frame(lambda f: self.resample["1"](F.pad(f, (0, 1, 0, 1))), x)
        return self._halve_time(x, cache) if self.time_conv is not None else x

    def _halve_time(self, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        # Windows of 3 frames at stride 2 over the whole clip, starting at frame 0; frame 0 is also kept as is.
        if _first_chunk(self, cache):
            kept, pending = x[:, :, :1], x
        else:
            kept, pending = x[:, :, :0], torch.cat([cache.tail(self), x], dim=2)
        windows = (pending.shape[2] - 1) // 2
        if cache is not None:
            cache.set_tail(self, pending[:, :, 2 * windows:])  # the frames the next window starts from
        if windows == 0:
            return kept
        return torch.cat([kept, self.time_conv(pending[:, :, : 2 * windows + 1])], dim=2)


class Upsample(nn.Module):
    """If ``temporal``, time x2 except frame 0; then spatial x2 (nearest) and a 3x3 conv to ``out_dim`` channels
    (Wan2.1: half of ``dim``, the default; Wan2.2: ``dim``)."""

    def __init__(self, dim: int, temporal: bool, out_dim: int | None = None):
        super().__init__()
        self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1)})
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, cache)
        conv, rows = self.resample["1"], _rows(cache)
        if rows is None:
            return _per_frame(lambda f: conv(_nearest_2x(f)), x)
        x = rows.halo(_per_frame(_nearest_2x, x), conv.padding[0])
        return _per_frame(lambda f: F.conv2d(f, conv.weight, conv.bias, padding=(0, conv.padding[1])), x)

    def _double_time(self, x: torch.Tensor, cache: FrameCache | None) -> torch.Tensor:
        # Frame 0 passes through; every later frame t becomes frames (2t', 2t'+1) from the two channel halves
        # of a causal time conv that sees frames >= 1 only.
        kept, rest = (x[:, :, :1], x[:, :, 1:]) if _first_chunk(self, cache) else (x[:, :, :0], x)
        if rest.shape[2] == 0:
            return kept
        y = self.time_conv(rest, cache)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([kept, y], dim=2)


def _nearest_2x(frames: torch.Tensor) -> torch.Tensor:
    return F.interpolate(frames, scale_factor=2.0, mode="nearest-exact")


def _head(dim: int, out_channels: int) -> nn.ModuleDict:
    return nn.ModuleDict({"0": RMSNorm(dim, 3), "2": CausalConv3d(dim, out_channels, 3)})


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


class Encoder3d(nn.Module):
    """video [B, 3, F, H, W] -> posterior parameters [B, 2 z_dim, 1 + (F - 1) / 4, H / 8, W / 8]."""

    def __init__(self, arch: VAEArch):
        super().__init__()
        dims = [arch.dim * m for m in (1, *arch.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: list[nn.Module] = []
        for stage, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(arch.num_res_blocks):
                blocks.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if stage < len(arch.dim_mult) - 1:
                blocks.append(Downsample(d_out, temporal=arch.temperal_downsample[stage]))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * arch.z_dim)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head["2"](F.silu(self.head["0"](x)), cache)


class Decoder3d(nn.Module):
    """latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4 (T - 1), 8 h, 8 w] (unclamped)."""

    def __init__(self, arch: VAEArch):
        super().__init__()
        dims = [arch.dim * m for m in (arch.dim_mult[-1], *reversed(arch.dim_mult))]
        temporal_upsample = tuple(reversed(arch.temperal_downsample))
        self.conv1 = CausalConv3d(arch.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for stage, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                d_in //= 2  # the previous stage's Upsample halved the channels
            for _ in range(arch.num_res_blocks + 1):
                blocks.append(ResidualBlock(d_in, d_out))
                d_in = d_out
            if stage < len(arch.dim_mult) - 1:
                blocks.append(Upsample(d_out, temporal=temporal_upsample[stage]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return self.head["2"](F.silu(self.head["0"](x)), cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE: ``encoder``, ``conv1`` (posterior 1x1x1), ``conv2`` (latent 1x1x1), ``decoder``."""

    def __init__(self, arch: VAEArch = VAEArch()):
        super().__init__()
        if arch.z_dim != len(LATENT_MEAN):
            raise LightqError(f"VAE z_dim {arch.z_dim} has no latent statistics: Wan2.1's VAE uses "
                              f"z_dim={len(LATENT_MEAN)} (the DiT's latent channels); keep it in the VAEArch")
        self.arch = arch
        self.encoder = Encoder3d(arch)
        self.conv1 = CausalConv3d(2 * arch.z_dim, 2 * arch.z_dim, 1)
        self.conv2 = CausalConv3d(arch.z_dim, arch.z_dim, 1)
        self.decoder = Decoder3d(arch)
        if not self.conv1.weight.is_meta:  # built on meta to be loaded: no init (normal_ there imports torch's compiler)
            self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.arch.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(LATENT_STD, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def _param_dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """Normalised posterior means ``[B, 16, 1 + (F - 1) // 4, H / 8, W / 8]`` (float32).

        ``chunked`` streams the frames (1, then 4 at a time) through a ``FrameCache``; ``False`` runs the
        whole clip at once (same result, memory growing with the frame count).
        """
        self._check_video(video)
        x = video.to(self._param_dtype())
        if chunked:
            step = self.arch.temporal_factor
            cache = FrameCache()
            starts = range(1, x.shape[2], step)
            parts = [self.encoder(x[:, :, :1], cache)]
            parts += [self.encoder(x[:, :, s : s + step], cache) for s in starts]
            h = torch.cat(parts, dim=2)
        else:
            h = self.encoder(x)
        mu = self.conv1(h)[:, : self.arch.z_dim].float()
        mean, std = self._stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunked: bool = True, progress: bool = False,
               rows: RowSplit | None = None, on_frames: FramesSink | None = None) -> torch.Tensor | None:
        """Video ``[B, 3, 1 + 4 (T - 1), 8 h, 8 w]`` in [-1, 1] (float32).

        ``chunked`` decodes one latent frame at a time through a ``FrameCache`` (``decode_chunks``), so
        activation memory does not grow with the frame count; ``False`` decodes the whole clip at once.
        ``progress`` reports the latent frames decoded (``lightq.progress``; chunked only). ``rows`` splits the
        (chunked) decode over processes by latent rows: every process passes the whole ``latents``, and the video
        is returned on rank 0 of the split, None on the others. ``on_frames`` gets the output frames as they are
        decoded (``decode_chunks``; unchunked: the whole video once).
        """
        self._check_latents(latents)
        mean, std = self._stats(latents)
        z = self.conv2((latents.float() * std + mean).to(self._param_dtype()))
        if not chunked:
            if rows is not None:
                raise LightqError("a row-split VAE decode runs chunked: pass chunked=True")
            video = self.decoder(z).float().clamp_(-1.0, 1.0)
            if on_frames is not None:
                on_frames(video)
            return video
        return decode_chunks(self.decoder, z, self.arch.temporal_factor, progress, rows, on_frames)

    def _check_video(self, video: torch.Tensor) -> None:
        check_video(self.arch, video)

    def _check_latents(self, latents: torch.Tensor) -> None:
        check_latents(self.arch, latents)


def decode_chunks(decoder, z: torch.Tensor, temporal_factor: int, progress: bool = False,
                  rows: RowSplit | None = None, on_frames: FramesSink | None = None) -> torch.Tensor | None:
    """Decode ``z [B, C, T, h, w]`` one latent frame at a time through a ``FrameCache``: ``decoder(z_i, cache)``
    gives that latent's output frames (1, then ``temporal_factor`` each), clamped to [-1, 1] in float32 into one
    video ``[B, 3, 1 + temporal_factor (T - 1), H, W]`` allocated at the first. With ``rows`` (``z`` whole, every
    rank of the split calling), each chunk's rows are collected on rank 0 of the split as it is decoded, and the
    video is returned there, None on the others. ``on_frames(view)`` gets each chunk's frames as soon as they are
    in the video (a view of it: the caller must not write into it), where the video is."""
    if rows is not None:
        z = rows.own(z)
    t = z.shape[2]
    cache, video, start = FrameCache(rows), None, 0
    with Progress(t, "VAE decode", "latent frames", progress) as bar:
        for i in range(t):
            frames = decoder(z[:, :, i : i + 1], cache).float().clamp_(-1.0, 1.0)
            if rows is not None:
                frames = rows.collect(frames)  # a collective: every rank of the split, every chunk
            if frames is not None:
                if video is None:
                    video = frames.new_empty(frames.shape[0], 3, 1 + temporal_factor * (t - 1), *frames.shape[-2:])
                part = video[:, :, start : start + frames.shape[2]]
                part.copy_(frames)
                start += frames.shape[2]
                if on_frames is not None:
                    on_frames(part)
            bar.update()
    return video


def init_weights(vae: nn.Module) -> None:
    """Random weights that keep activations at unit scale: every conv ~ N(0, 1 / fan_in), zero bias.

    Unlike PyTorch's default (variance 1 / (3 fan_in)), this keeps the encoder sensitive to its input (latents of
    different videos differ by ~0.2 per element, not ~0.04); the decoder's output conv (``decoder.head.2``) gets
    half that scale so decoded videos of random weights rarely reach the clamp. Real checkpoints overwrite all.
    """
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        vae.decoder.head["2"].weight.mul_(0.5)


def check_video(arch, video: torch.Tensor) -> None:
    """A LightqError unless ``video`` is ``[B, 3, 1 + kT, H, W]`` with H, W multiples of the VAE's spatial factor
    (``arch``: anything with ``temporal_factor`` and ``spatial_factor``)."""
    s, k = arch.spatial_factor, arch.temporal_factor
    if video.dim() != 5 or video.shape[1] != 3:
        raise LightqError(
            f"VAE encode expects a video [batch, 3, frames, height, width], got shape {tuple(video.shape)}: "
            "add the batch dimension and put RGB channels second"
        )
    frames, height, width = video.shape[2:]
    if frames < 1 or (frames - 1) % k:
        raise LightqError(
            f"VAE encode got {frames} frames; the Wan VAE needs 1 + {k}k frames (e.g. {1 + k} or {1 + 2 * k}): "
            f"trim or pad the clip to {1 + k * max(0, (frames - 1) // k)} or {1 + k * ((frames + k - 2) // k)}"
        )
    if height % s or width % s or height == 0 or width == 0:
        raise LightqError(
            f"VAE encode got {height}x{width} pixels; height and width must be positive multiples of {s} "
            f"(of {2 * s} for the DiT's 2x2 patches): resize or crop the video"
        )


def check_latents(arch, latents: torch.Tensor) -> None:
    """A LightqError unless ``latents`` is ``[B, z_dim, T, h, w]`` with every size >= 1."""
    z = arch.z_dim
    if latents.dim() != 5 or latents.shape[1] != z or min(latents.shape[2:]) < 1:
        raise LightqError(
            f"VAE decode expects latents [batch, {z}, frames, height, width] with every size >= 1, "
            f"got shape {tuple(latents.shape)}: pass the DiT output with its batch dimension"
        )
