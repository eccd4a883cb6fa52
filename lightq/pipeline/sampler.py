"""Wan2.1 flow-matching sampling: schedule, solver step, classifier-free guidance, loop.

Flow matching: ``x_sigma = (1 - sigma) * x0 + sigma * noise``; the model predicts the velocity
``v = noise - x0``, so ``x0 = x - sigma * v``. Sampling integrates from sigma ~ 1 (noise) to sigma = 0.

Schedule (Wan's, ``num_train_timesteps = 1000``): base sigmas ``s`` evenly spaced, then shifted
``s' = shift * s / (1 + (shift - 1) * s)``; the model sees ``t = s' * 1000``. The sigma list ends with 0.

- ``unipc``  (official default): ``s`` = linspace(1 - 1/1000, 0, steps + 1)[:-1], ``t`` truncated to integers;
             multistep UniPC, B(h) = e^h - 1 ("bh2"), order 2 with a first-order warm-up and last step, in the
             x0 (data) parametrisation, predictor and corrector, as Wan's ``FlowUniPCMultistepScheduler``.
- ``dpm++``: ``s`` = linspace(1, 0, steps + 1)[:-1], ``t`` truncated to integers; multistep DPM-Solver++(2M),
             midpoint form, first order at the first and last steps, as Wan's ``FlowDPMSolverMultistepScheduler``.
- ``euler``: the ``dpm++`` schedule with float timesteps; ``x += (s_next - s) * v``.
- ``distill``: LightX2V's step-distilled schedule: fp32 sigmas linspace(1, 0, 1001)[:-1] shifted, one step per
             entry ``k`` of ``denoising_steps`` (default 1000, 750, 500, 250) at index ``1000 - k``; each step is
             deterministic, as LightX2V's ``WanStepDistillScheduler`` (since its #506): ``x0 = x - s * v``, then
             ``x_next = x0 + s_next * v`` (``x0`` itself at the last step), in fp32. CFG as the other solvers
             (``conf/sampler/distill.yaml`` sets ``guide_scale`` 1: the distilled models are CFG-distilled).

All solvers work in the lambda = log((1 - s) / s) time of the data-prediction ODE (lambda = +inf at s = 0).
CFG: ``v = v_uncond + guide_scale * (v_cond - v_uncond)``; one model pass only when ``guide_scale == 1``.

Two experts (Wan2.2 A14B): with a ``boundary`` b, a step at timestep ``t >= b * 1000`` belongs to the high-noise
expert and takes ``guide_scale``, every later one to the low-noise expert with ``guide_scale_low`` (``high_noise``
says which; the caller's model function picks the expert by the same rule). With a ``boundary_step`` k instead
(LightX2V's distilled Wan2.2 MoE, its ``boundary_step_index``), steps ``0 .. k-1`` are the high-noise expert's and
the rest the low-noise one's, whatever their timesteps: ``t > t_k``, the schedule's timesteps being decreasing.
Kept frames (Wan2.2 TI2V image-to-video): ``keep`` latents replace the first frames of ``x`` before the first step
and after every step, as the official pipeline does, so they pass through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from ..errors import LightqError
from ..progress import Progress

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "dpm++", "euler", "distill")
DISTILL_STEPS = (1000, 750, 500, 250)
# Wan's UniPC starts from the largest sigma of its 1000-step training grid, 1 - 1/1000, held in fp32.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x, t [B], conditioning) -> velocity


@dataclass
class SamplerConfig:
    """Solver ``name`` (one of SOLVERS), ``steps``, schedule ``shift``, CFG ``guide_scale`` and, for ``distill``,
    the fixed ``denoising_steps`` (timesteps on the 1000-step grid, decreasing; default 1000, 750, 500, 250)."""

    name: str = "unipc"
    steps: int = 50
    shift: float = 5.0
    guide_scale: float = 5.0
    denoising_steps: tuple | None = None
    guide_scale_low: float | None = None  # the low-noise expert's (None: guide_scale)
    boundary: float | None = None  # two experts: the high-noise one runs while t >= boundary * 1000
    boundary_step: int | None = None  # two experts: the high-noise one runs steps 0 .. boundary_step - 1 (wins)


class Schedule(NamedTuple):
    sigmas: torch.Tensor     # fp32 [N + 1], decreasing, last = 0
    timesteps: torch.Tensor  # fp32 [N], what the model is given (0..1000)


def _check(cfg: SamplerConfig) -> None:
    if cfg.name not in SOLVERS:
        raise LightqError(f"unknown sampler '{cfg.name}': choose one of {', '.join(SOLVERS)}")
    if cfg.shift <= 0:
        raise LightqError(f"sampler shift must be > 0, got {cfg.shift}")
    if cfg.guide_scale < 0 or (cfg.guide_scale_low is not None and cfg.guide_scale_low < 0):
        raise LightqError(f"guide_scale must be >= 0, got {cfg.guide_scale} / {cfg.guide_scale_low}")
    if cfg.name != "distill":
        if cfg.denoising_steps is not None:
            raise LightqError(f"denoising_steps only applies to the 'distill' sampler, not '{cfg.name}'; "
                              "use steps instead")
        if int(cfg.steps) != cfg.steps or cfg.steps < 1:
            raise LightqError(f"sampler steps must be a positive integer, got {cfg.steps}")
        _check_boundary_step(cfg, int(cfg.steps))
        return
    _check_boundary_step(cfg, len(cfg.denoising_steps or DISTILL_STEPS))
    steps = tuple(cfg.denoising_steps or DISTILL_STEPS)
    if not steps or any(int(k) != k or not 1 <= k <= NUM_TRAIN_TIMESTEPS for k in steps) \
            or any(a <= b for a, b in zip(steps, steps[1:])):
        raise LightqError(f"denoising_steps must be decreasing integers in 1..{NUM_TRAIN_TIMESTEPS}, got {steps}")


def _check_boundary_step(cfg: SamplerConfig, steps: int) -> None:
    k = cfg.boundary_step
    if k is None:
        return
    if cfg.boundary is None:
        raise LightqError(f"sampler.boundary_step={k} picks the step where a two-expert model's low-noise expert "
                          "takes over; this model has one DiT: drop it")
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= steps:
        raise LightqError(f"sampler.boundary_step={k}: give an integer from 0 to {steps} (the run's step count; the "
                          "high-noise expert runs the steps before it)")


def shift_sigmas(sigmas, shift: float):
    """Wan's timestep shift ``shift * s / (1 + (shift - 1) * s)`` (numpy arrays or tensors)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def timesteps(cfg: SamplerConfig) -> Schedule:
    """The (sigmas, timesteps) of a run; see the module doc for each solver's grid."""
    _check(cfg)
    if cfg.name == "distill":
        grid = shift_sigmas(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1], cfg.shift)  # fp32, as LightX2V
        picked = grid[[NUM_TRAIN_TIMESTEPS - int(k) for k in (cfg.denoising_steps or DISTILL_STEPS)]]
        return Schedule(torch.cat([picked, picked.new_zeros(1)]), picked * NUM_TRAIN_TIMESTEPS)
    start = UNIPC_SIGMA_MAX if cfg.name == "unipc" else 1.0
    sigmas = shift_sigmas(np.linspace(start, 0.0, int(cfg.steps) + 1)[:-1], cfg.shift)  # float64
    t = sigmas * NUM_TRAIN_TIMESTEPS
    if cfg.name != "euler":
        t = t.astype(np.int64)  # Wan's schedulers hand the model integer timesteps
    return Schedule(torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)),
                    torch.from_numpy(np.asarray(t, dtype=np.float32)))


# --- solvers: step(i, x, v) -> x at sigmas[i + 1] -----------------------------------------------------------------

def _lam(sigma: float) -> float:
    """log-SNR time ``log((1 - s) / s)``; +inf at s = 0, -inf at s = 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log((1.0 - sigma) / sigma)


class _Solver:
    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = [float(s) for s in sigmas]
        self.num_steps = len(self.sigmas) - 1

    def x0(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x - self.sigmas[i] * v

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Euler(_Solver):
    def step(self, i, x, v):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * v


class Distill(_Solver):
    """Predict x0, then move it back along the same velocity to the next sigma: ``x0 + s_next * v``."""

    def step(self, i, x, v):
        x0 = self.x0(i, x, v)
        if i == self.num_steps - 1:
            return x0
        return x0 + v * self.sigmas[i + 1]


class DPMSolverPP(_Solver):
    """DPM-Solver++(2M), midpoint: ``x_t = (s_t/s_0) x - a_t (e^-h - 1) (m0 + (m0 - m1) / (2 r))``."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.prev_x0 = None

    def step(self, i, x, v):
        m0 = self.x0(i, x, v)
        s0, s_t = self.sigmas[i], self.sigmas[i + 1]
        h = _lam(s_t) - _lam(s0)
        x_t = (s_t / s0) * x - (1.0 - s_t) * math.expm1(-h) * m0
        if self.prev_x0 is not None and i < self.num_steps - 1:
            r = (_lam(s0) - _lam(self.sigmas[i - 1])) / h
            x_t = x_t - (1.0 - s_t) * math.expm1(-h) * (0.5 / r) * (m0 - self.prev_x0)
        self.prev_x0 = m0
        return x_t


class UniPC(_Solver):
    """UniPC-bh2, order 2, data prediction: a corrector (UniC) refines the previous step with the new model
    output, then a predictor (UniP) takes the next step. Order 1 at the first step (warm-up) and the last."""

    def __init__(self, sigmas):
        super().__init__(sigmas)
        self.history: list[torch.Tensor] = []  # x0 predictions, newest last
        self.last_sample = None
        self.last_order = 1

    def _coeffs(self, s_prev: float | None, s0: float, s_t: float) -> tuple[float, float, float, float]:
        """For a step s0 -> s_t: (h, phi1 = e^-h - 1, B(h) = phi1 for bh2, r = (lam(s_prev) - lam(s0)) / h)."""
        h = _lam(s_t) - _lam(s0)
        phi1 = math.expm1(-h)
        r = (_lam(s_prev) - _lam(s0)) / h if s_prev is not None else math.nan
        return h, phi1, phi1, r

    def _base(self, x, m0, s0, s_t, phi1):
        return (s_t / s0) * x - (1.0 - s_t) * phi1 * m0

    def _correct(self, i: int, m_t: torch.Tensor) -> torch.Tensor:
        """UniC: redo the step sigmas[i-1] -> sigmas[i] from ``last_sample``, using ``m_t``, the x0 prediction at i
        (made from the predicted sample, which the corrected one replaces)."""
        order, m0 = self.last_order, self.history[-1]
        s_prev = self.sigmas[i - 2] if order == 2 else None
        s0, s_t = self.sigmas[i - 1], self.sigmas[i]
        h, phi1, b_h, r = self._coeffs(s_prev, s0, s_t)
        x_t = self._base(self.last_sample, m0, s0, s_t, phi1)
        if order == 1:
            return x_t - (1.0 - s_t) * b_h * 0.5 * (m_t - m0)
        hh = -h  # the UniPC recursion (hh = -h): g1 = phi1 / hh - 1, g2 = g1 / hh - 1/2; b_k = k! g_k / B(h)
        g1 = phi1 / hh - 1.0
        g2 = g1 / hh - 0.5
        b = torch.tensor([g1 / b_h, 2.0 * g2 / b_h], dtype=torch.float64)
        rhos = torch.linalg.solve(torch.tensor([[1.0, 1.0], [r, 1.0]], dtype=torch.float64), b).tolist()
        d1 = (self.history[-2] - m0) / r
        return x_t - (1.0 - s_t) * b_h * (rhos[0] * d1 + rhos[1] * (m_t - m0))

    def step(self, i, x, v):
        m = self.x0(i, x, v)
        if i > 0:
            x = self._correct(i, m)
        self.history = (self.history + [m])[-2:]
        order = min(2, self.num_steps - i, i + 1)
        self.last_sample, self.last_order = x, order
        s0, s_t = self.sigmas[i], self.sigmas[i + 1]
        s_prev = self.sigmas[i - 1] if order == 2 else None
        _, phi1, b_h, r = self._coeffs(s_prev, s0, s_t)
        x_t = self._base(x, m, s0, s_t, phi1)
        if order == 2:
            x_t = x_t - (1.0 - s_t) * b_h * 0.5 * (self.history[-2] - m) / r
        return x_t


_SOLVER_CLASSES = {"unipc": UniPC, "dpm++": DPMSolverPP, "euler": Euler, "distill": Distill}


def solver_class(name: str) -> type:
    """The solver of sampler ``name`` (one of SOLVERS)."""
    return _SOLVER_CLASSES[name]


def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return x
    x = x.clone()
    x[:, :, :keep.shape[2]] = keep.to(x)
    return x


# --- guidance and the loop ----------------------------------------------------------------------------------------

def guide_scale_of(cfg: SamplerConfig, high_noise_step: bool = True) -> float:
    """The CFG scale at a step of the high-noise expert (or the only model) or, with ``high_noise_step=False``,
    of the low-noise expert (1: a single model pass, no CFG)."""
    if not high_noise_step and cfg.guide_scale_low is not None:
        return float(cfg.guide_scale_low)
    return float(cfg.guide_scale)


def needs_uncond(cfg: SamplerConfig) -> bool:
    """Whether any step runs CFG (the negative prompt is then encoded)."""
    return guide_scale_of(cfg, True) != 1.0 or (cfg.boundary is not None and guide_scale_of(cfg, False) != 1.0)


def high_noise(cfg: SamplerConfig, t: float) -> bool:
    """Whether the step at timestep ``t`` (a timestep of ``timesteps(cfg)``) belongs to the high-noise expert
    (always, for one model); see the module doc for ``boundary`` and ``boundary_step``."""
    if cfg.boundary is None:
        return True
    if cfg.boundary_step is None:
        return t >= cfg.boundary * NUM_TRAIN_TIMESTEPS
    schedule, k = timesteps(cfg).timesteps.tolist(), cfg.boundary_step
    if k >= len(schedule):
        return True
    if 0 < k and schedule[k - 1] == schedule[k]:
        raise LightqError(f"sampler.boundary_step={k}: steps {k - 1} and {k} share timestep {schedule[k]:g}, so the "
                          "experts cannot be told apart by it: use fewer steps or another boundary_step")
    return t > schedule[k]


def guided_velocity(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
                    guide_scale: float) -> torch.Tensor:
    v_cond = model_fn(x, t, cond).float()
    if guide_scale == 1.0:
        return v_cond
    v_uncond = model_fn(x, t, uncond).float()
    return v_uncond + guide_scale * (v_cond - v_uncond)


def sample(model_fn: ModelFn, noise: torch.Tensor, cfg: SamplerConfig, cond: Any, uncond: Any = None,
           progress: bool = True, on_step: Callable[[int], None] | None = None, keep: torch.Tensor | None = None,
           guidance: Callable | None = None) -> torch.Tensor:
    """Denoise ``noise`` ``[B, C, F, H, W]`` into fp32 latents.

    ``model_fn(x, t, c)`` returns the velocity for ``x`` at timesteps ``t`` ``[B]`` (fp32) with conditioning
    ``c``, which is ``cond`` or ``uncond`` passed through untouched (a tensor, a dict of keyword arguments, ...).
    ``uncond`` is needed only when CFG is on; every solver is deterministic given ``noise``. ``progress``:
    ``lightq.progress``.
    ``on_step(i)`` is called after step ``i`` (the job times each step with it). ``keep`` ``[B, C, k, H, W]``:
    latents that replace the first ``k`` frames before the first step and after each (see the module doc).
    ``guidance``: how a step's velocity is formed from ``model_fn`` (``guided_velocity``'s signature and result;
    ``lightq.parallel.guidance`` splits its two passes over two processes); None: ``guided_velocity``.
    """
    _check(cfg)
    if needs_uncond(cfg) and uncond is None:
        raise LightqError(f"guide_scale {cfg.guide_scale} needs the unconditional (negative prompt) inputs; "
                          "pass uncond or set guide_scale=1")
    sched = timesteps(cfg)
    solver = solver_class(cfg.name)(sched.sigmas)
    x = _kept(noise.float(), keep)
    steps = sched.timesteps.tolist()
    with Progress(len(steps), f"denoise ({cfg.name})", "steps", progress) as bar:
        for i, t in enumerate(steps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            v = (guidance or guided_velocity)(model_fn, x, t_batch, cond, uncond,
                                              guide_scale_of(cfg, high_noise(cfg, t)))
            x = _kept(solver.step(i, x, v), keep)
            bar.update()
            if on_step is not None:
                on_step(i)
    return x


def sampler_config(cfg):
    """The sampler settings of a run: the sampler group's values, else the model's defaults."""
    s, m = cfg.sampler, cfg.model
    guide_scale = s.guide_scale if s.guide_scale is not None else m.guide_scale
    if s.guide_scale_low is not None:
        low = s.guide_scale_low
    elif s.guide_scale is not None:
        low = s.guide_scale  # the sampler's one scale, for both experts
    else:
        low = m.guide_scale_low
    return SamplerConfig(
        name=s.name,
        steps=s.steps if s.steps is not None else m.steps,
        shift=s.shift if s.shift is not None else m.shift,
        guide_scale=guide_scale,
        denoising_steps=tuple(s.denoising_steps) if s.denoising_steps else None,
        guide_scale_low=low if m.boundary is not None else None,
        boundary=m.boundary,
        boundary_step=s.boundary_step,
    )
