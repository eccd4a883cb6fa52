"""Hardware profiles: what a run may use, decided once per job.

A profile is a plain record (no torch needed to build one), so planning can be tested against fake devices.
``detect()`` reads the real machine through torch; ``profile(name)`` returns the named profile used by
``hardware=cpu|sm80|sm89|sm90|sm100`` and by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Hardware:
    """One device a job runs on. ``capability`` is the CUDA compute capability (major + minor/10), None on CPU.
    ``chosen``: the user named this profile (``hardware=cpu``) rather than it being detected."""

    name: str
    device: str  # "cpu" or "cuda"
    capability: float | None = None
    gpu_name: str = ""
    chosen: bool = field(default=False, compare=False)

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def no_gpu_reason(self) -> str:
        """Why this run has no CUDA GPU, as the end of a sentence."""
        return "the CPU was chosen (hardware=cpu)" if self.chosen else "this machine has none"

    def describe(self) -> str:
        if not self.is_cuda:
            return "cpu"
        return f"{self.gpu_name or 'cuda'} (sm{int(round(self.capability * 10))})"


PROFILES: dict[str, Hardware] = {
    "cpu": Hardware("cpu", "cpu"),
    "sm80": Hardware("sm80", "cuda", 8.0, "A100 (profile)"),
    "sm89": Hardware("sm89", "cuda", 8.9, "L40S / RTX 4090 (profile)"),
    "sm90": Hardware("sm90", "cuda", 9.0, "H100 (profile)"),
    "sm100": Hardware("sm100", "cuda", 10.0, "B200 (profile)"),
}


def detect() -> Hardware:
    """The first CUDA device if torch sees one, else the CPU."""
    try:
        import torch
    except Exception:  # torch missing or broken: only the CPU is usable
        return PROFILES["cpu"]
    if not torch.cuda.is_available():
        return PROFILES["cpu"]
    major, minor = torch.cuda.get_device_capability(0)
    cap = major + minor / 10
    return Hardware(f"sm{major}{minor}", "cuda", cap, torch.cuda.get_device_name(0))


def resolve(name: str) -> Hardware:
    """``auto`` detects; a profile name is taken as given (``cpu`` forces the CPU even where a GPU exists).

    A GPU profile on a machine without that GPU is an error: the profile only describes, it cannot create a GPU.
    """
    from .errors import LightqError

    if name == "auto":
        return detect()
    if name not in PROFILES:
        raise LightqError(f"unknown hardware '{name}': choose one of auto, {', '.join(PROFILES)}")
    hw = PROFILES[name]
    if hw.is_cuda:
        real = detect()
        if not real.is_cuda:
            raise LightqError(f"hardware={name} asks for a CUDA GPU but none is visible here: use hardware=auto or cpu")
        if real.capability < hw.capability:
            raise LightqError(
                f"hardware={name} needs compute capability {hw.capability} but this GPU is {real.describe()}: "
                "use hardware=auto"
            )
        return Hardware(hw.name, "cuda", hw.capability, real.gpu_name, chosen=True)
    return replace(hw, chosen=True)
