"""Hugging Face Hub references for checkpoints and model folders.

A ``ckpt`` or model path that is not an existing local path and looks like ``owner/repo[@revision][/path/in/repo]``
is fetched through ``huggingface_hub`` into its cache (with its progress bars): with a path, that one file
(``hf_hub_download``); without, a snapshot of the files the job reads (``snapshot_download`` with
``allow_patterns``: ``job_patterns``), never the whole repository. ``@revision`` pins a branch, tag or commit.
``HF_HUB_OFFLINE=1`` is honoured: only the cache is used. A reference that names a local path (it starts with
``/``, ``.``, ``~`` or a drive, holds a backslash, or its first part is a folder here) and does not exist is a
local-path error, never a Hub lookup. When a Hub file is neither cached nor reachable, one CheckpointError says
so and names the fix (``hf download ...``, the current huggingface_hub command line).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_REF = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*?))?"
                     rf"(?:/(?P<file>[^@]+))?$")


def parse(ref: str) -> tuple[str, str | None, str | None] | None:
    """``(repo, revision, file)`` of a Hub reference, or None when ``ref`` does not look like one. A revision
    holding ``/`` (a branch like ``refs/pr/1``) must be the last part: ``owner/repo/file@refs/pr/1``."""
    m = HUB_REF.match(ref)
    if m:
        return m.group("repo"), m.group("revision"), m.group("file")
    m = re.match(rf"^(?P<repo>{_PART}/{_PART})/(?P<file>[^@]+)@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*)$", ref)
    return (m.group("repo"), m.group("revision"), m.group("file")) if m else None


def looks_local(text: str) -> bool:
    """True when ``text`` is meant as a local path (module docstring), whether or not it exists."""
    first = text.replace("\\", "/").split("/", 1)[0]
    return (text.startswith(("/", ".", "~")) or "\\" in text or re.match(r"^[A-Za-z]:", text) is not None
            or (bool(first) and Path(first).expanduser().is_dir()))


def resolve(ref: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local path for ``ref``: itself when it exists locally, else the Hub file or snapshot in the cache."""
    text = str(ref)
    local = Path(text).expanduser()
    if local.exists():
        return local
    parts = None if looks_local(text) else parse(text)
    if parts is None:
        where = _nearest_existing(local)
        hint = f" ({where} exists; check the rest of the path)" if where else ""
        raise CheckpointError(f"checkpoint not found: {text}: no such local file or folder{hint}; a Hub reference "
                              "is owner/repo[@revision][/file]")
    repo, revision, filename = parts
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if filename:
            return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as exc:
        raise CheckpointError(_why(text, repo, revision, filename, exc)) from exc


def _nearest_existing(path: Path) -> Path | None:
    for parent in path.parents:
        if str(parent) not in ("", ".") and parent.exists():
            return parent
    return None


def download_command(repo: str, revision: str | None, filename: str | None) -> str:
    """The ``hf download`` command line that puts ``repo`` (or one file of it) in the cache."""
    return " ".join(["hf download", repo, *([filename] if filename else []),
                     *([f"--revision {revision}"] if revision else [])])


def _why(ref: str, repo: str, revision: str | None, filename: str | None, exc: Exception) -> str:
    from huggingface_hub import constants

    name = type(exc).__name__
    offline = constants.HF_HUB_OFFLINE
    fetch = download_command(repo, revision, filename)
    if offline or name == "OfflineModeIsEnabled":
        return (f"'{ref}' is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1): download it "
                f"once online ({fetch}) or pass a local path")
    if name == "LocalEntryNotFoundError":
        return (f"'{ref}' is not in the Hugging Face cache and the Hub cannot be reached (network error): connect, "
                f"or run `{fetch}` elsewhere and pass the local path")
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return (f"Hub repository of '{ref}' not found or not accessible ({name}); check the name or log in "
                "(hf auth login)")
    if name == "RevisionNotFoundError":
        return f"'{ref}': revision '{revision}' does not exist in {repo}; check the branch, tag or commit"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"'{ref}': no such file in the Hub repository; check the file name"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"cannot fetch '{ref}' from the Hugging Face Hub and it is not cached ({name}: {detail})"
