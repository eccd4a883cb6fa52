"""The console summary of a single run, from result.json fields: every number shown is the record's own."""

from pathlib import Path

from omegaconf import OmegaConf

from lightq.summary import REAL_WEIGHTS, summary

MODEL = OmegaConf.create({"name": "tiny", "task": "t2v", "frames": 5, "width": 64, "height": 64, "steps": 4,
                          "weights": "synthetic", "fps": 16})


def _result(**quality):
    return {"status": "ok", "hardware": {"name": "cpu", "gpu": ""},
            "components": {"t5": {"mode": "none", "scheme": "none", "weight_bytes": 3 * 2**20},
                           "dit": {"mode": "fp8-torch", "scheme": "fp8", "backend": "torch",
                                   "reason": "requested: torch", "quantized_layers": 20, "weight_bytes": 2**20},
                           "vae": {"weight_bytes": 2**21}},
            "timings_s": {"load": 1.5, "denoise": 8.0, "denoise_per_step": 2.0, "decode": 3.25, "total": 13.0},
            "memory": {"peak_host_bytes": 3 * 2**29, "peak_gpu_bytes": 0},
            "frames": 5, "outputs": {"video": "video.mp4"}, "quality": quality}


def _lines(result, out=Path("/out/job")):
    return dict(line.strip().split("  ", 1) for line in summary(result, out, MODEL).splitlines())


def test_every_part_of_the_run_is_named_from_the_record():
    rows = {k.strip(): v.strip() for k, v in _lines(_result(baseline="cached bf16 baseline x.pt", psnr_db=45.949,
                                                            ssim=0.99851, latent_cosine=0.99962,
                                                            speed="not compared: timed elsewhere")).items()}
    assert rows["model"] == "tiny (t2v, 5 frames 64x64, 4 steps, weights synthetic) on cpu"
    assert rows["t5"] == "none: bf16, not quantized, 3.0 MiB"
    assert rows["dit"] == "fp8-torch: fp8 on backend torch (requested: torch), 20 quantized linears, 1.0 MiB"
    assert rows["vae"] == "fp32 (the VAE is never quantized), 2.0 MiB"
    assert rows["time"] == ("13.0 s in all; seconds per stage: load 1.50, denoise 8.00 (median step 2.00), "
                            "decode 3.25")
    assert rows["peak memory"] == "host 1.50 GiB"
    assert rows["quality"] == ("PSNR 45.95 dB, SSIM 0.9985, latent cosine 0.9996 against bf16 "
                               "(cached bf16 baseline x.pt)")
    assert rows["speed"] == "not compared: timed elsewhere", "no ratio against a baseline timed elsewhere"
    assert rows["video"] == "/out/job/video.mp4 (5 frames, 16 fps)"
    assert rows["note"] == REAL_WEIGHTS and "noise" in REAL_WEIGHTS


def test_speed_ratio_only_when_both_runs_were_timed_in_this_job():
    rows = {k.strip(): v.strip() for k, v in _lines(_result(baseline="bf16 baseline computed in this job",
                                                            psnr_db=40.0, speedup_denoise=1.234)).items()}
    assert rows["speed"].startswith("denoising 1.23x the bf16 run's, both timed in this job")
    rows = {k.strip(): v.strip() for k, v in _lines(_result(baseline="this run is the bf16 baseline")).items()}
    assert rows["quality"] == "this run is the bf16 baseline" and "speed" not in rows


def test_real_weights_get_no_noise_note_and_gpu_memory_is_shown():
    result = _result(baseline="this run is the bf16 baseline")
    result["memory"]["peak_gpu_bytes"] = 2**31
    text = summary(result, Path("/o"), OmegaConf.merge(MODEL, {"weights": "/models/Wan2.1-T2V-1.3B"}))
    assert "note" not in text and "video is noise" not in text and "GPU 2.00 GiB" in text


def test_the_background_encode_is_shown_beside_the_write_stage():
    result = _result(baseline="this run is the bf16 baseline")
    result["timings_s"].update(write=0.25, quality=1.5, write_background=1.6)
    time_row = _lines(result)["time"]
    assert "write 0.25 (mp4 encode 1.60 in the background, overlapping decode and quality), quality 1.50" in time_row
