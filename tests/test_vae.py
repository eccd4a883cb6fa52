"""The Wan2.1 VAE: official key layout and shapes, encode/decode shapes, causality and chunked == whole-clip
processing, meta + assign loading, bad shapes."""

import pytest
import torch

from lightq.errors import LightqError
from lightq.models.vae import LATENT_MEAN, LATENT_STD, VAE_ARCHS, VAEArch, WanVAE


def _meta_model(arch: VAEArch = VAEArch()) -> WanVAE:
    with torch.device("meta"):
        return WanVAE(arch)


def _shapes(model: WanVAE) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The suite runs two xdist workers on two cores: a second OpenMP thread per worker only spins (2x CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAE_ARCHS["tiny"]).eval()


def _video(frames: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------- layout


# Written out from the official wan/modules/vae.py (Wan2.1, dim 96, z_dim 16): one residual block with a
# shortcut, each resample kind, the middle attention, the in/out convs and the posterior / latent 1x1x1 convs.
EXPECTED = {
    # encoder.downsamples.3: the first ResidualBlock of stage 1, 96 -> 192 channels
    "encoder.downsamples.3.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.3.residual.2.weight": (192, 96, 3, 3, 3),
    "encoder.downsamples.3.residual.2.bias": (192,),
    "encoder.downsamples.3.residual.3.gamma": (192, 1, 1, 1),
    "encoder.downsamples.3.residual.6.weight": (192, 192, 3, 3, 3),
    "encoder.downsamples.3.residual.6.bias": (192,),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.3.shortcut.bias": (192,),
    # downsample2d after stage 0, downsample3d after stage 1
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.2.resample.1.bias": (96,),
    "encoder.downsamples.5.resample.1.weight": (192, 192, 3, 3),
    "encoder.downsamples.5.resample.1.bias": (192,),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.5.time_conv.bias": (192,),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    # middle attention
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.to_qkv.bias": (1152,),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.middle.1.proj.bias": (384,),
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv1.bias": (32,),
    "conv2.weight": (16, 16, 1, 1, 1),
    "conv2.bias": (16,),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    # upsample3d after decoder stage 0 (halves the channels), its time_conv doubling them for two frames
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.resample.1.bias": (192,),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.3.time_conv.bias": (768,),
    "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    # upsample2d after stage 2
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
    "decoder.head.2.bias": (3,),
}


def test_official_keys_and_shapes():
    shapes = _shapes(_meta_model())
    for key, shape in EXPECTED.items():
        assert shapes.get(key) == shape, key
    # 194 tensors in Wan2.1_VAE.pth, 108 of them on the decoder side (decoder.* and conv2.*)
    assert len(shapes) == 194
    assert sum(k.startswith(("decoder.", "conv2.")) for k in shapes) == 108
    # no time_conv on the 2-D resamplers, no shortcut where channels are unchanged
    assert not any(k.startswith(("encoder.downsamples.2.time_conv", "decoder.upsamples.11.time_conv")) for k in shapes)
    assert not any(k.startswith("encoder.downsamples.4.shortcut") for k in shapes)
    # stage layout: 11 encoder blocks, 15 decoder blocks, 3 middle blocks each
    assert {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")} == set(range(11))
    assert {int(k.split(".")[2]) for k in shapes if k.startswith("decoder.upsamples.")} == set(range(15))
    assert {k for k in shapes if ".time_conv." in k} == {
        f"{p}.time_conv.{t}" for p in ("encoder.downsamples.5", "encoder.downsamples.8",
                                       "decoder.upsamples.3", "decoder.upsamples.7") for t in ("weight", "bias")}


def test_no_buffers_and_latent_constants():
    model = _meta_model()
    assert list(model.buffers()) == []
    assert len(LATENT_MEAN) == len(LATENT_STD) == 16
    assert LATENT_MEAN[7] == 1.5508 and LATENT_STD[8] == 3.2687
    assert VAE_ARCHS["tiny"].z_dim == 16 and VAE_ARCHS["wan2.1"] == VAEArch()
    with pytest.raises(LightqError, match="z_dim=16"):
        _meta_model(VAEArch(dim=8, z_dim=4))


# ---------------------------------------------------------------------------------------------- numerics


def test_tiny_shapes_and_scale(tiny):
    video = _video(9, 64, seed=1)
    latents = tiny.encode(video)
    assert latents.shape == (1, 16, 3, 8, 8) and latents.dtype == torch.float32
    decoded = tiny.decode(latents)
    assert decoded.shape == (1, 3, 9, 64, 64) and decoded.dtype == torch.float32
    assert decoded.abs().max() <= 1.0
    # seeded random weights are usable: latents react to the input, decoded frames are not flat or saturated
    small_a, small_b = tiny.encode(_video(5, 32, seed=2)), tiny.encode(_video(5, 32, seed=3))
    assert 0.05 < (small_a - small_b).std() < 2.0
    assert 0.1 < decoded.std() < 0.7
    assert (decoded.abs() == 1).float().mean() < 0.01
    assert decoded.std(dim=(3, 4)).min() > 0.05  # every frame and channel has spatial structure
    assert tiny.encode(video[:, :, :1, :32, :16]).shape == (1, 16, 1, 4, 2)  # a single image


def test_chunked_equals_whole_clip(tiny):
    video = _video(13, 16, seed=3)  # 4 chunks: 1 + 4 + 4 + 4 frames
    enc_chunked, enc_full = tiny.encode(video), tiny.encode(video, chunked=False)
    assert enc_chunked.shape == (1, 16, 4, 2, 2)
    torch.testing.assert_close(enc_chunked, enc_full, atol=1e-5, rtol=1e-5)
    latents = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    dec_chunked, dec_full = tiny.decode(latents), tiny.decode(latents, chunked=False)
    assert dec_chunked.shape == (1, 3, 13, 16, 16)
    torch.testing.assert_close(dec_chunked, dec_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["wan2.1", "wan2.2"])
def test_decode_hands_over_each_chunk_as_it_is_decoded(tiny, which):
    """``on_frames`` gets 1, then 4 frames per latent, in order, equal to the returned video's, each before the
    next latent is decoded; unchunked (Wan2.1 only), the whole video once."""
    from lightq.models.vae22 import VAE22_ARCHS, Wan22VAE

    torch.manual_seed(0)
    vae = tiny if which == "wan2.1" else Wan22VAE(VAE22_ARCHS["tiny"]).eval()
    latents = torch.randn(1, vae.arch.z_dim, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    calls, got = [], []
    real = vae.decoder.forward
    vae.decoder.forward = lambda *a: (calls.append(len(got)), real(*a))[1]
    try:
        video = vae.decode(latents, on_frames=lambda part: got.append(part.clone()))
    finally:
        del vae.decoder.forward
    assert [p.shape[2] for p in got] == [1, 4, 4, 4] and calls == [0, 1, 2, 3]
    torch.testing.assert_close(torch.cat(got, dim=2), video, atol=0, rtol=0)
    if which == "wan2.1":
        whole = []
        torch.testing.assert_close(tiny.decode(latents, chunked=False, on_frames=whole.append), whole[0])
        assert len(whole) == 1


def test_causal_in_time(tiny):
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    changed = latents.clone()
    changed[:, :, 2] += 1.0
    a, b = tiny.decode(latents), tiny.decode(changed)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], atol=0, rtol=0)  # latents 0, 1 -> frames 0..4
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max() > 1e-3
    video = _video(9, 16, seed=6)
    edited = video.clone()
    edited[:, :, 5:] = 0.0
    torch.testing.assert_close(tiny.encode(video)[:, :, :2], tiny.encode(edited)[:, :, :2], atol=0, rtol=0)


def test_meta_assign_load_reproduces(tiny):
    loaded = _meta_model(VAE_ARCHS["tiny"])
    loaded.load_state_dict(tiny.state_dict(), assign=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loaded.eval().decode(latents), tiny.decode(latents), atol=0, rtol=0)


def test_bfloat16_tracks_float32(tiny):
    half = WanVAE(VAE_ARCHS["tiny"]).to(torch.bfloat16).eval()
    half.load_state_dict(tiny.state_dict())
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    a, b = tiny.decode(latents), half.decode(latents)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("shape, fragment", [
    ((1, 3, 10, 64, 64), "1 + 4k frames"),
    ((1, 3, 9, 60, 64), "multiples of 8"),
    ((3, 9, 64, 64), "[batch, 3, frames, height, width]"),
    ((1, 4, 9, 64, 64), "[batch, 3, frames, height, width]"),
])
def test_bad_video_shapes(tiny, shape, fragment):
    with pytest.raises(LightqError) as err:
        tiny.encode(torch.zeros(shape))
    assert fragment in str(err.value)


def test_bad_frame_count_names_the_fix(tiny):
    with pytest.raises(LightqError) as err:
        tiny.encode(torch.zeros(1, 3, 10, 64, 64))
    assert "trim or pad the clip to 9 or 13" in str(err.value)


def test_bad_latent_shape(tiny):
    with pytest.raises(LightqError) as err:
        tiny.decode(torch.zeros(1, 15, 2, 4, 4))
    assert "[batch, 16, frames, height, width]" in str(err.value)


# ---------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@pytest.mark.gpu
@needs_cuda
def test_gpu_matches_cpu(tiny, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions are not fp32-exact
    gpu = WanVAE(VAE_ARCHS["tiny"]).to("cuda").eval()
    gpu.load_state_dict(tiny.state_dict())
    video = _video(5, 32, seed=9)
    latents = tiny.encode(video)
    torch.testing.assert_close(gpu.encode(video.cuda()).cpu(), latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.decode(latents.cuda()).cpu(), tiny.decode(latents), atol=1e-4, rtol=1e-4)
    half = gpu.to(torch.bfloat16)
    decoded = half.decode(latents.cuda()).cpu()
    assert torch.nn.functional.cosine_similarity(decoded.flatten(), tiny.decode(latents).flatten(), dim=0) > 0.99


@pytest.mark.gpu
@needs_cuda
def test_gpu_chunked_decode_memory_does_not_grow_with_frames():
    torch.manual_seed(0)
    model = WanVAE().to("cuda", torch.bfloat16).eval()  # the real Wan2.1 size, random weights
    activation_peaks = {}
    for latent_frames in (2, 6):
        latents = torch.randn(1, 16, latent_frames, 30, 52, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        video = model.decode(latents)
        torch.cuda.synchronize()
        assert video.shape == (1, 3, 1 + 4 * (latent_frames - 1), 240, 416)
        output_bytes = video.numel() * video.element_size()
        activation_peaks[latent_frames] = torch.cuda.max_memory_allocated() - before - output_bytes
        del video
    assert activation_peaks[6] < 1.1 * activation_peaks[2], activation_peaks
