"""User-facing errors.

Every problem a user can fix (unknown mode, missing plugin, wrong GPU, bad checkpoint, bad shapes) is raised as
a ``LightqError`` carrying one line that names the problem and the fix. The CLI prints that line and exits 2;
nothing else is printed, no traceback.
"""


class LightqError(Exception):
    """A problem the user can fix; ``str(err)`` is the single line shown to them."""

    exit_code = 2


class BackendUnavailable(LightqError):
    """The requested backend cannot run here (library missing, import failed, hardware too old)."""


class CheckpointError(LightqError):
    """A checkpoint is missing, corrupt, or does not match the requested mode."""


class QuantizationError(LightqError):
    """A tensor cannot be quantized as asked (NaN/Inf values, a shape the scheme cannot hold)."""
