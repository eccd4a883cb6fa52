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


# errno -> what the user can do about it
_OS_FIXES = {
    "ENOSPC": "the disk is full: free space or write somewhere else",
    "EDQUOT": "the disk quota is exceeded: free space or write somewhere else",
    "EROFS": "the filesystem is read-only: write somewhere else",
    "EACCES": "permission denied: choose a location you can write to (and read from)",
    "EPERM": "operation not permitted: choose a location you own",
    "ENOTDIR": "a file is in the way where a folder is needed: move it or choose another path",
    "EISDIR": "a folder is in the way where a file is needed: move it or choose another path",
    "EEXIST": "a file is in the way (the path already exists): move it or choose another path",
    "ENAMETOOLONG": "the name is too long for the filesystem: choose a shorter one",
    "ENOENT": "no such file or folder: check the path",
}


def from_os_error(exc: OSError, doing: str) -> LightqError | None:
    """One-line LightqError for an OSError the user can fix (full disk, permissions, a file in the way...),
    ``None`` for any other (a genuine I/O failure stays an internal error)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name not in _OS_FIXES:
        return None
    where = exc.filename if exc.filename is not None else "?"
    return LightqError(f"{doing} failed at {where}: {exc.strerror or name} — {_OS_FIXES[name]}")
