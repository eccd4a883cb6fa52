"""The video writer (mp4 / PNG, atomic) and the quality metrics, checked against hand-computed values."""

import math
import subprocess
import time

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import lightq.pipeline.video as video_io
from lightq.errors import LightqError
from lightq.pipeline.quality import cosine, psnr, ssim
from lightq.pipeline.video import read_mp4, write_frames, write_mp4


def _gradient_frames(frames: int, height: int, width: int) -> torch.Tensor:
    """Smooth frames (H.264 keeps them nearly exact): horizontal ramp in R, vertical in G, per-frame level in B."""
    ramp_x = torch.linspace(-0.8, 0.8, width).expand(height, width)
    ramp_y = torch.linspace(-0.6, 0.6, height)[:, None].expand(height, width)
    return torch.stack([
        torch.stack([ramp_x, ramp_y, torch.full((height, width), -0.5 + 0.1 * f)]) for f in range(frames)
    ])


def _as_uint8(frames: torch.Tensor) -> np.ndarray:
    return ((frames + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _stream_info(path) -> str:
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True)
    return next(line for line in probe.stderr.splitlines() if "Video:" in line)


def _fed(frames: torch.Tensor, path) -> video_io.Mp4Writer:
    writer = video_io.Mp4Writer(path)
    writer.feed(frames)
    return writer


# ---------------------------------------------------------------------------------------------- mp4


def test_mp4_round_trip(tmp_path):
    frames = _gradient_frames(9, 48, 64)
    path = write_mp4(frames, tmp_path / "out" / "video.mp4", fps=16)
    assert path == tmp_path / "out" / "video.mp4"
    back = read_mp4(path)
    assert back.shape == (9, 48, 64, 3) and back.dtype == np.uint8
    # yuv420p halves chroma resolution and quantises the RGB -> YUV conversion: a few levels off, no more
    error = np.abs(back.astype(int) - _as_uint8(frames).astype(int))
    assert error.mean() < 2.5 and error.max() <= 12
    info = _stream_info(path)
    assert "h264" in info and "yuv420p" in info and "16 fps" in info
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["video.mp4"]  # no temp file left


def test_odd_sizes_padded_to_even(tmp_path):
    frames = _gradient_frames(5, 33, 47)
    back = read_mp4(write_mp4(frames, tmp_path / "odd.mp4"))
    assert back.shape == (5, 34, 48, 3)
    expected = _as_uint8(frames).astype(int)
    assert np.abs(back[:, :33, :47].astype(int) - expected).mean() < 3
    # the added row / column repeat the last ones
    assert np.abs(back[:, 33, :47].astype(int) - expected[:, 32]).mean() < 4
    assert np.abs(back[:, :33, 47].astype(int) - expected[:, :, 46]).mean() < 4


def test_rgb_channel_order(tmp_path):
    frames = -torch.ones(3, 3, 16, 16)
    for index in range(3):
        frames[index, index] = 1.0  # red, green, blue frames
    back = read_mp4(write_mp4(frames, tmp_path / "rgb.mp4")).astype(int)
    for index in range(3):
        mean_rgb = back[index].mean(axis=(0, 1))
        assert mean_rgb[index] > 230 and np.delete(mean_rgb, index).max() < 25


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, fake_ffmpeg):
    fake_ffmpeg("exec sleep 60")  # an encoder that never reads: the feeding thread blocks
    out = tmp_path / "out"
    writer = _fed(_gradient_frames(9, 32, 32), out / "video.mp4")
    real_join, calls = writer._thread.join, []

    def interrupted_join(*args):
        calls.append(args)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the job waits for the encode
        real_join(*args)

    monkeypatch.setattr(writer._thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        writer.result()
    assert not writer._thread.is_alive() and writer._proc.poll() is not None  # ffmpeg stopped, thread ended
    assert list(out.iterdir()) == []


def test_cancel_keeps_the_previous_file(tmp_path, fake_ffmpeg):
    path = write_mp4(_gradient_frames(5, 32, 32), tmp_path / "video.mp4")
    before = path.read_bytes()
    fake_ffmpeg("exec sleep 60")
    writer = _fed(_gradient_frames(9, 32, 32), path)
    writer.cancel()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bin", "video.mp4"]
    with pytest.raises(LightqError, match="cancelled"):
        writer.result()


def test_background_encode_returns_at_once_and_times_itself(tmp_path, fake_ffmpeg):
    fake_ffmpeg('sleep 1; exec "$REAL" "$@"')  # a slow start, then the real encoder
    frames = _gradient_frames(9, 32, 32)
    start = time.perf_counter()
    writer = _fed(frames, tmp_path / "video.mp4")
    assert time.perf_counter() - start < 0.5 and writer.seconds is None  # the caller goes on meanwhile
    assert writer.result() == tmp_path / "video.mp4" and writer.seconds >= 1.0
    assert read_mp4(tmp_path / "video.mp4").shape == (9, 32, 32, 3)


def test_encoder_failure_is_the_writers_error(tmp_path, fake_ffmpeg):
    fake_ffmpeg("cat > /dev/null; echo 'No space left on device' >&2; exit 3")
    writer = _fed(_gradient_frames(9, 32, 32), tmp_path / "video.mp4")  # fails in its thread
    with pytest.raises(LightqError, match=r"ffmpeg could not write .*\(exit 3: No space left on device\)"):
        writer.result()
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]


@pytest.mark.parametrize("height, width", [(48, 64), (33, 47), (1, 1), (2, 5)])
def test_uint8_frames_match_the_per_pixel_formula(height, width):
    """Chunked conversion (``FRAMES_PER_CHUNK`` < frames) gives the per-pixel formula; padding repeats the edge."""
    g = torch.Generator().manual_seed(height * width)
    count = video_io.FRAMES_PER_CHUNK + 3
    frames = torch.rand(count, 3, height, width, generator=g) * 2.4 - 1.2  # out of range too: clamped
    expected = _as_uint8(frames.clamp(-1, 1))
    np.testing.assert_array_equal(video_io.uint8_frames(frames), expected)
    padded = video_io.uint8_frames(frames, pad_to_even=True)
    assert padded.shape == (count, height + height % 2, width + width % 2, 3)
    rows = np.minimum(np.arange(padded.shape[1]), height - 1)
    cols = np.minimum(np.arange(padded.shape[2]), width - 1)
    np.testing.assert_array_equal(padded, expected[:, rows][:, :, cols])


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = write_mp4(_gradient_frames(5, 32, 32), tmp_path / "video.mp4")
    before = path.read_bytes()
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")  # an encoder that fails at once
    with pytest.raises(LightqError, match=r"ffmpeg could not write .*\(exit 1"):
        write_mp4(_gradient_frames(9, 32, 32), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


@pytest.mark.parametrize("frames, fragment", [
    (torch.zeros(1, 3, 9, 32, 32), "[frames, 3, height, width]"),
    (torch.zeros(9, 4, 32, 32), "[frames, 3, height, width]"),
    (torch.full((2, 3, 32, 32), math.nan), "NaN"),
])
def test_bad_frames_rejected(tmp_path, frames, fragment):
    with pytest.raises(LightqError) as err:
        write_mp4(frames, tmp_path / "video.mp4")
    assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_read_missing_file(tmp_path):
    with pytest.raises(LightqError, match="no video file"):
        read_mp4(tmp_path / "absent.mp4")


def test_png_frames_exact(tmp_path):
    frames = torch.rand(3, 3, 17, 23, generator=torch.Generator().manual_seed(0)) * 2 - 1
    paths = write_frames(frames, tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in paths]
    for path, expected in zip(paths, _as_uint8(frames)):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


# ---------------------------------------------------------------------------------------------- metrics


def test_psnr_hand_values():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert psnr(a, a) == math.inf
    signs = torch.where(torch.arange(a.numel()) % 2 == 0, 1.0, -1.0).reshape(a.shape)
    noisy = a + 0.1 * signs  # mean squared error exactly 0.01
    assert psnr(a, noisy, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))  # 26.02 dB
    assert psnr(a, noisy, data_range=1.0) == pytest.approx(20.0)
    assert psnr(np.zeros(4), np.full(4, 255.0), data_range=255.0) == pytest.approx(0.0)


def test_ssim_identical_and_constant_images():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert ssim(a, a) == pytest.approx(1.0)
    # constant images: no variance, so SSIM is the luminance term (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    c1, c2, big_c1 = 0.2, 0.5, (0.01 * 1.0) ** 2
    expected = (2 * c1 * c2 + big_c1) / (c1**2 + c2**2 + big_c1)
    got = ssim(torch.full((1, 3, 12, 12), c1, dtype=torch.float64), torch.full((1, 3, 12, 12), c2, dtype=torch.float64),
               data_range=1.0)
    assert got == pytest.approx(expected, rel=1e-12)


def test_ssim_of_a_constant_shift_matches_direct_window_sums():
    # A shift leaves every local (co)variance unchanged (contrast-structure term = 1), so each window's SSIM is
    # (2 m (m + d) + C1) / (m^2 + (m + d)^2 + C1) with m its Gaussian-weighted mean, computed here window by window.
    rng = np.random.default_rng(3)
    image, shift, data_range = rng.random((13, 14)), 0.15, 1.0
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    big_c1 = (0.01 * data_range) ** 2
    values = []
    for top in range(13 - 10):
        for left in range(14 - 10):
            m = float((weights * image[top:top + 11, left:left + 11]).sum())
            values.append((2 * m * (m + shift) + big_c1) / (m**2 + (m + shift) ** 2 + big_c1))
    got = ssim(image, image + shift, data_range=data_range)
    assert got == pytest.approx(float(np.mean(values)), rel=1e-10)
    assert got == pytest.approx(ssim(image + shift, image, data_range=data_range), rel=1e-12)  # symmetric


def test_ssim_falls_with_noise_and_needs_a_window():
    a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    mild, strong = ssim(a, a + 0.05 * noise, data_range=1.0), ssim(a, a + 0.3 * noise, data_range=1.0)
    assert 1.0 > mild > strong > 0.0
    with pytest.raises(LightqError, match="at least 11x11"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_cosine_hand_values():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -2 * a) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == 0.0
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(cosine(torch.zeros(3), torch.ones(3)))
    with pytest.raises(LightqError, match="shapes"):
        cosine(torch.zeros(3), torch.zeros(4))


def _structured(shape: tuple, seed: int) -> torch.Tensor:
    """Edges, a checkerboard, flat regions at both ends of the range and smooth ramps: SSIM's hard cases."""
    height, width = shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.where((rows // 3 + cols // 3) % 2 == 0, 0.9, 0.1).double()
    image[: height // 3] = 1.0
    image[:, : width // 4] = 0.0
    image[-(height // 4):] = (cols[-(height // 4):] / max(width - 1, 1)).double()
    shift = torch.rand(shape[:-2] + (1, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (image * 0.8 + 0.2 * shift).expand(shape).clone()


@pytest.mark.parametrize("shape", [(2, 3, 48, 64), (1, 3, 37, 53), (11, 11), (3, 13, 200), (2, 2, 61, 12)])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_equals_the_conv2d_formula(shape, kind):
    """The banded-matrix SSIM is the 2-D convolution's (``tests/quality_reference.py``) up to the order of sums."""
    from quality_reference import ssim_conv2d

    g = torch.Generator().manual_seed(sum(shape))
    if kind == "random":
        a = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        a = _structured(shape, 6)
    for b, data_range in ((a + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64), 1.0),
                          ((a * 255).round(), 255.0), (_structured(shape, 7), 1.0)):
        a_scaled = a * 255 if data_range == 255.0 else a
        assert ssim(a_scaled, b, data_range) == pytest.approx(ssim_conv2d(a_scaled, b, data_range), rel=1e-9, abs=0)


def test_compare_streams_frames_and_matches_whole_video_metrics():
    """``compare`` runs a few frames per pass; its numbers are the whole video's (frame-weighted pass means), with
    the SSIM of the conv2d formula and the MSE of the whole float64 video."""
    from quality_reference import ssim_conv2d

    from lightq.pipeline import quality

    g = torch.Generator().manual_seed(5)
    video = torch.rand(9, 3, 24, 20, generator=g) * 2 - 1  # 9 frames: passes of 4, 4, 1
    ref = (video + 0.05 * torch.randn(video.shape, generator=g)).clamp(-1, 1)
    lat, ref_lat = torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 3, 4, 4, generator=g)
    got = quality.compare(video, ref, lat, ref_lat)
    a, b = (video.double() + 1) / 2, (ref.double() + 1) / 2
    mse = float(((a - b) ** 2).mean())
    assert got["psnr_db"] == round(10 * math.log10(1 / mse), 4) == round(psnr(a, b, data_range=1.0), 4)
    assert got["ssim"] == pytest.approx(ssim_conv2d(a, b, data_range=1.0), abs=1e-6)
    assert got["latent_cosine"] == round(cosine(lat, ref_lat), 6)
    assert quality.FRAMES_PER_PASS < video.shape[0]
    assert quality.compare(video.double(), ref, lat, ref_lat.double()) == got  # any dtypes, moved once


# ---------------------------------------------------------------------------------------------- streamed feed


def _streamed(frames: torch.Tensor, path, sizes=(1, 4, 4, 4, 4)) -> video_io.Mp4Writer:
    """``frames`` fed as a decode feeds them: the first frame, then groups of four (the rest, whatever is left)."""
    writer, lo = video_io.Mp4Writer(path), 0
    for n in (*sizes, frames.shape[0]):
        if lo < frames.shape[0]:
            writer.feed(frames[lo:lo + n])
            lo += n
    return writer


@pytest.mark.parametrize("height, width", [(48, 64), (33, 47)])
def test_streamed_frames_give_the_whole_videos_pixels_and_bytes(tmp_path, fake_ffmpeg, height, width):
    """Fed a chunk at a time, ffmpeg gets the bytes the whole-video path gives it, and the mp4 is the same file."""
    g = torch.Generator().manual_seed(height)
    frames = torch.rand(video_io.FRAMES_PER_CHUNK + 5, 3, height, width, generator=g) * 2.4 - 1.2
    whole = write_mp4(frames, tmp_path / "whole.mp4").read_bytes()
    assert _streamed(frames, tmp_path / "streamed.mp4").result().read_bytes() == whole
    fake_ffmpeg('for last; do :; done; cat > "$last"')  # the raw rgb24 input, as the output file
    raw = write_mp4(frames, tmp_path / "whole.raw").read_bytes()
    assert raw == video_io.uint8_frames(frames, pad_to_even=True).tobytes()
    assert _streamed(frames, tmp_path / "streamed.raw").result().read_bytes() == raw


def test_a_non_finite_frame_fed_late_fails_the_close_and_writes_nothing(tmp_path):
    frames = _gradient_frames(9, 32, 32)
    frames[7, 1, 3, 3] = math.inf
    writer = _streamed(frames, tmp_path / "video.mp4")
    with pytest.raises(LightqError, match="NaN or Inf"):
        writer.close()
    assert list(tmp_path.iterdir()) == [] and writer._proc.poll() is not None
    with pytest.raises(LightqError, match="cancelled"):
        writer.result()


def test_frames_of_another_size_or_after_the_end_are_refused(tmp_path):
    writer = video_io.Mp4Writer(tmp_path / "video.mp4")
    writer.feed(_gradient_frames(1, 32, 32))
    with pytest.raises(LightqError, match="frames of 32x48 after frames of 32x32"):
        writer.feed(_gradient_frames(4, 32, 48))
    assert writer.result().is_file()
    with pytest.raises(LightqError, match="after its end"):
        writer.feed(_gradient_frames(4, 32, 32))
    with pytest.raises(LightqError, match="no frames were given"):
        video_io.Mp4Writer(tmp_path / "empty.mp4").result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_an_encoder_that_fails_early_is_the_results_error_not_the_feeds(tmp_path, fake_ffmpeg):
    fake_ffmpeg("echo 'Permission denied' >&2; exit 1")  # exits before reading a frame
    writer = video_io.Mp4Writer(tmp_path / "video.mp4")
    writer.feed(_gradient_frames(1, 32, 32))
    deadline = time.perf_counter() + 30
    while writer._proc is None or writer._proc.poll() is None:  # until ffmpeg has exited
        assert time.perf_counter() < deadline
        time.sleep(0.01)
    for _ in range(3):
        writer.feed(_gradient_frames(4, 32, 32))  # the decode goes on: no error until result()
    with pytest.raises(LightqError, match=r"ffmpeg could not write .*\(exit 1: Permission denied\)"):
        writer.result()
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]
