"""Hugging Face Hub references for checkpoints and model folders.

A ``ckpt`` or model path that is not an existing local path and looks like ``owner/repo`` or
``owner/repo/path/in/repo`` is fetched through ``huggingface_hub`` into its cache (with its progress bars):
``repo_id/filename`` downloads one file (``hf_hub_download``), ``repo_id`` a snapshot (``snapshot_download``,
optionally limited by ``allow_patterns``). ``HF_HUB_OFFLINE=1`` is honoured: only the cache is used. When the
file is neither cached nor reachable, one CheckpointError says so and names the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_REF = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:/(?P<file>.+))?$")


def resolve(ref: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local path for ``ref``: itself when it exists locally, else the Hub file or snapshot in the cache."""
    text = str(ref)
    local = Path(text).expanduser()
    if local.exists():
        return local
    m = HUB_REF.match(text)
    if text.startswith(("/", ".", "~")) or not m:
        raise CheckpointError(f"checkpoint not found: {text} (not a local path, nor a Hub 'owner/repo[/file]')")
    repo, filename = m.group("repo"), m.group("file")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if filename:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        return Path(snapshot_download(repo_id=repo, allow_patterns=allow_patterns))
    except Exception as exc:
        raise CheckpointError(_why(text, exc)) from exc


def _why(ref: str, exc: Exception) -> str:
    from huggingface_hub import constants

    name = type(exc).__name__
    offline = constants.HF_HUB_OFFLINE
    if offline or name == "OfflineModeIsEnabled":
        return (f"'{ref}' is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1): download it "
                f"once online (huggingface-cli download ...) or pass a local path")
    if name == "LocalEntryNotFoundError":
        return (f"'{ref}' is not in the Hugging Face cache and the Hub cannot be reached (network error): connect, "
                f"or download it elsewhere and pass a local path")
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"Hub repository of '{ref}' not found or not accessible ({name}); check the name or log in"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"'{ref}': no such file in the Hub repository; check the file name"
    return f"cannot fetch '{ref}' from the Hugging Face Hub and it is not cached ({name}: {str(exc).splitlines()[0] if str(exc) else ''})"
