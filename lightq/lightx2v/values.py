"""What the LightX2V importer and its parts share: the refusal type and the rule for a config's checkpoint paths."""

from __future__ import annotations

import os
from typing import Any

from ..errors import LightqError


class LightX2VError(LightqError):
    """A LightX2V config lightq cannot run with LightX2V's meaning; ``feature``: what it lacks (or ``None``)."""

    def __init__(self, message: str, feature: str | None = None):
        super().__init__(message)
        self.feature = feature


def local_path(value: Any, key: str, out) -> str:
    """A LightX2V checkpoint path: always a local path; a relative one is read from the working directory."""
    if not isinstance(value, str):
        raise LightX2VError(f"{out.path}: {key}={value!r}: give a path")
    if os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    full = os.path.abspath(value)
    out.notes.append(f"{key}={value}: a relative path, read from the working directory as LightX2V does ({full}), "
                     "not from the Hub" + ("" if os.path.exists(full) else "; it does not exist there"))
    return full
