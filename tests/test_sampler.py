"""Flow-matching sampling: Wan's shifted schedule by hand, solver accuracy on an exactly solvable flow, CFG."""

import math

import pytest
import torch

from lightq.errors import LightqError
from lightq.pipeline.sampler import SamplerConfig, guided_velocity, sample, timesteps

# A Gaussian data distribution x0 ~ N(MU, SD^2): under x_s = (1 - s) x0 + s z, the exact velocity field is
# E[z - x0 | x_s], and the probability-flow ODE maps x_s = (1 - s) MU + sqrt(var(s)) z to x0 = MU + SD z.
MU, SD = 1.5, 0.5


def gaussian_velocity(x, s):
    var = (1 - s) ** 2 * SD ** 2 + s ** 2
    dev = x - (1 - s) * MU
    return s / var * dev - (MU + (1 - s) * SD ** 2 / var * dev)


def solve_gaussian(name, steps, shift):
    cfg = SamplerConfig(name=name, steps=steps, shift=shift, guide_scale=1.0)
    sched = timesteps(cfg)
    sigma_of = {float(t): float(s) for t, s in zip(sched.timesteps, sched.sigmas)}
    assert len(sigma_of) == steps  # distinct timesteps, so the exact field is evaluated at the solver's sigma
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(1, 11, 1, 1, 1)
    s0 = float(sched.sigmas[0])
    start = (1 - s0) * MU + math.sqrt((1 - s0) ** 2 * SD ** 2 + s0 ** 2) * z
    out = sample(lambda x, t, c: gaussian_velocity(x, sigma_of[float(t[0])]), start, cfg, None, progress=False)
    return (out.double() - (MU + SD * z)).abs().max().item()


def test_unipc_schedule_by_hand():
    # Wan: base sigmas linspace(1 - 1/1000, 0, 51)[:-1], shifted s' = 5 s / (1 + 4 s), t = int(1000 s').
    s = timesteps(SamplerConfig(name="unipc", steps=50, shift=5.0))
    assert s.sigmas.shape == (51,) and s.timesteps.shape == (50,) and s.sigmas[-1] == 0
    # s = 0.999:        4.995 / 4.996          = 0.99979984 -> t 999
    # s = 0.999 * 0.98: 4.8951 / 4.91608       = 0.99573238 -> t 995
    # s = 0.999 * 0.5:  2.4975 / 2.998         = 0.83305537 -> t 833
    # s = 0.999 * 0.02: 0.0999 / 1.07992       = 0.09250685 -> t 92
    assert s.sigmas[[0, 1, 25, 49]].tolist() == pytest.approx([0.99979984, 0.99573238, 0.83305537, 0.09250685],
                                                                abs=1e-7)
    assert s.timesteps[[0, 1, 25, 49]].tolist() == [999, 995, 833, 92]


def test_dpm_and_euler_schedule_by_hand():
    # base sigmas linspace(1, 0, 51)[:-1]: s = 1 -> 1; 0.98 -> 4.9/4.92; 0.5 -> 2.5/3; 0.02 -> 0.1/1.08
    want = [1.0, 4.9 / 4.92, 2.5 / 3, 0.1 / 1.08]
    dpm = timesteps(SamplerConfig(name="dpm++", steps=50, shift=5.0))
    euler = timesteps(SamplerConfig(name="euler", steps=50, shift=5.0))
    assert dpm.sigmas[[0, 1, 25, 49]].tolist() == pytest.approx(want, abs=1e-7)
    assert dpm.timesteps[[0, 1, 25, 49]].tolist() == [1000, 995, 833, 92]
    assert euler.timesteps[[0, 1, 25, 49]].tolist() == pytest.approx([1000 * w for w in want], rel=1e-6)
    # shift 1 leaves the base sigmas alone
    plain = timesteps(SamplerConfig(name="euler", steps=4, shift=1.0))
    assert plain.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_distill_schedule_by_hand():
    # LightX2V 4-step: sigma grid index 1000 - k of linspace(1, 0, 1001), shifted by 5:
    # k=1000 -> s=1 -> 1;  750 -> 0.75 -> 3.75/4;  500 -> 0.5 -> 2.5/3;  250 -> 0.25 -> 1.25/2
    s = timesteps(SamplerConfig(name="distill", shift=5.0))
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9375, 2.5 / 3, 0.625, 0.0], abs=1e-7)
    assert s.timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], rel=1e-6)
    custom = timesteps(SamplerConfig(name="distill", shift=1.0, denoising_steps=(1000, 500)))
    assert custom.sigmas.tolist() == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_solvers_converge_on_exact_flow(shift):
    err = {(n, k): solve_gaussian(n, k, shift) for n in ("unipc", "dpm++", "euler") for k in (16, 64)}
    for n in ("unipc", "dpm++", "euler"):
        assert err[n, 64] < err[n, 16]
    for k in (16, 64):
        assert err["unipc", k] < err["euler", k]
    assert err["unipc", 64] < 1e-2 and err["dpm++", 64] < 2e-2
    if shift == 1.0:  # uniform steps: UniPC is second order, Euler first order
        assert err["unipc", 16] / err["unipc", 64] > 8
        assert 3 < err["euler", 16] / err["euler", 64] < 5


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler", "distill"])
def test_single_data_point_is_reached_exactly(name):
    # All data at c: the x0 prediction is c at every sigma, and every solver must land on c.
    c = torch.tensor([0.3, -1.2, 2.0]).view(1, 3, 1, 1, 1)
    cfg = SamplerConfig(name=name, steps=7, guide_scale=1.0)
    sigmas = iter(timesteps(cfg).sigmas.tolist())
    out = sample(lambda x, t, _: (x - c) / next(sigmas), torch.randn(2, 3, 1, 1, 1), cfg, None, progress=False)
    torch.testing.assert_close(out, c.expand(2, 3, 1, 1, 1), rtol=0, atol=1e-5)


def test_cfg_formula_and_guide_scale_one_is_a_single_pass():
    calls = []

    def model_fn(x, t, cond):
        calls.append(cond)
        return x * 0 + (2.0 if cond == "c" else -1.0)

    x, t = torch.zeros(1, 1, 1, 1, 1), torch.tensor([500.0])
    assert guided_velocity(model_fn, x, t, "c", "u", 4.0).item() == -1.0 + 4.0 * 3.0
    assert calls == ["c", "u"]
    calls.clear()
    assert guided_velocity(model_fn, x, t, "c", "u", 1.0).item() == 2.0  # = u + 1 * (c - u)
    assert calls == ["c"]

    noise = torch.randn(1, 2, 1, 2, 2)
    outs = {}
    for scale in (1.0, 5.0):
        calls.clear()
        outs[scale] = sample(model_fn, noise, SamplerConfig(steps=6, guide_scale=scale), "c", "u", progress=False)
        assert len(calls) == (6 if scale == 1.0 else 12)
    no_cfg = sample(lambda x, t, c: model_fn(x, t, "c"), noise, SamplerConfig(steps=6, guide_scale=1.0), None,
                    progress=False)
    assert torch.equal(outs[1.0], no_cfg)
    assert not torch.equal(outs[1.0], outs[5.0])


def test_model_sees_batched_fp32_timesteps():
    seen = []

    def model_fn(x, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(model_fn, torch.randn(3, 4, 1, 2, 2), SamplerConfig(name="distill", guide_scale=1.0), "c", None,
           progress=False)
    assert len(seen) == 4 and all(t.shape == (3,) and t.dtype == torch.float32 for t in seen)
    assert [t[0].item() for t in seen] == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], rel=1e-6)


def _lightx2v_distill(model_fn, latents, step_list, shift, guide_scale=None):
    """LightX2V's WanStepDistillScheduler (set_denoising_timesteps + step_post), its CFG in WanModel.infer, written
    out step by step from its source: timesteps index 1000 - k of the shifted fp32 grid; after each model call
    ``x0 = latents - sigma * v``, then ``x0 + v * sigma_next`` except at the last step."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    index = [1000 - k for k in step_list]
    timesteps, sigmas = (sigmas * 1000)[index], sigmas[index]
    for i, t in enumerate(timesteps):
        t_in = torch.stack([t])
        v = model_fn(latents, t_in, "c")
        if guide_scale is not None:
            v_uncond = model_fn(latents, t_in, "u")
            v = v_uncond + guide_scale * (v - v_uncond)
        v = v.to(torch.float32)
        x = latents.to(torch.float32) - sigmas[i].item() * v
        if i < len(index) - 1:
            x = x + v * sigmas[i + 1].item()
        latents = x
    return latents


@pytest.mark.parametrize("step_list, shift, guide_scale", [
    ((1000, 750, 500, 250), 5.0, None), ((999, 934, 862, 756, 603, 410, 250, 140, 74), 8.0, None),
    ((1000, 750, 500, 250), 5.0, 3.0),
])
def test_distill_steps_exactly_as_lightx2v(step_list, shift, guide_scale):
    def model_fn(x, t, cond):  # depends on x, t and the conditioning, so every term of the rule shows
        return torch.sin(x * (t[0] / 1000.0) + (0.3 if cond == "c" else -0.2)) * 0.7

    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(name="distill", shift=shift, guide_scale=1.0 if guide_scale is None else guide_scale,
                        denoising_steps=step_list)
    ours = sample(model_fn, noise, cfg, "c", "u" if guide_scale is not None else None, progress=False)
    assert torch.equal(ours, _lightx2v_distill(model_fn, noise.clone(), step_list, shift, guide_scale))
    # deterministic: the same noise gives the same video, whatever the global RNG does
    torch.manual_seed(123)
    assert torch.equal(ours, sample(model_fn, noise, cfg, "c", "u" if guide_scale is not None else None,
                                    progress=False))


def test_distill_with_cfg_runs_two_passes_per_step():
    calls = []

    def model_fn(x, t, cond):
        calls.append(cond)
        return torch.zeros_like(x)

    sample(model_fn, torch.randn(1, 1, 1, 2, 2), SamplerConfig(name="distill", guide_scale=5.0), "c", "u",
           progress=False)
    assert calls == ["c", "u"] * 4


def test_no_progress_output_off_a_terminal(capsys):
    sample(lambda x, t, c: x, torch.randn(1, 1, 1, 1, 1), SamplerConfig(steps=3, guide_scale=1.0), None,
           progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("cfg,match", [
    (SamplerConfig(name="ddim"), "unknown sampler"),
    (SamplerConfig(steps=0), "steps"),
    (SamplerConfig(shift=0.0), "shift"),
    (SamplerConfig(denoising_steps=(1000, 500)), "only applies to the 'distill'"),
    (SamplerConfig(name="distill", denoising_steps=(500, 750)), "decreasing"),
    (SamplerConfig(name="distill", denoising_steps=(1001,)), "decreasing"),
])
def test_bad_config_is_a_clear_error(cfg, match):
    with pytest.raises(LightqError, match=match):
        timesteps(cfg)


def test_cfg_without_uncond_is_a_clear_error():
    with pytest.raises(LightqError, match="uncond"):
        sample(lambda x, t, c: x, torch.randn(1, 1, 1, 1, 1), SamplerConfig(guide_scale=5.0), "c", None,
               progress=False)
