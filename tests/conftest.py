"""Shared test set-up: a private lightq cache per test session, so tiny checkpoints and baselines are fresh."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under xdist each worker gets one torch thread: two workers x two threads on two cores only thrash."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def fake_ffmpeg(tmp_path, monkeypatch):
    """Install a shell script as imageio-ffmpeg's binary: ``fake_ffmpeg(body)``, ``$REAL`` in ``body`` the real one;
    the script lives in ``tmp_path / "bin"``."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.get_ffmpeg_exe()

    def install(body: str) -> Path:
        script = tmp_path / "bin" / "ffmpeg"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\nREAL={real}\n{body}\n")
        script.chmod(0o755)
        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(script))
        return script

    return install


@pytest.fixture(scope="session", autouse=True)
def _lightq_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lightq-cache")
    old = os.environ.get("LIGHTQ_CACHE")
    os.environ["LIGHTQ_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LIGHTQ_CACHE", None)
    else:
        os.environ["LIGHTQ_CACHE"] = old


@pytest.fixture
def run_lightq(tmp_path):
    """Run ``python -m lightq <args>`` in a subprocess from a temp working dir; returns CompletedProcess."""
    import subprocess

    def run(*args, cwd=None, env=None, timeout=300):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "lightq", *args], cwd=cwd or tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
