"""Session hooks for both test trees (``tests/`` and ``plugins/*/tests``): GPU-only tests on a machine without CUDA.

A test marked ``gpu`` needs CUDA. Without CUDA every such test is skipped (reason ``GPU_ONLY``, unless its own
``skipif`` says it first) before any of its fixtures run, prints nothing on the progress line (they are most of the
suite: screens of ``s`` otherwise), and the end of the run says how many there were. Any other skip keeps its ``s``
and is counted with its reason at the end.
"""

from __future__ import annotations

from collections import Counter

import pytest

GPU_ONLY = "GPU-only (no CUDA here)"
GPU_RUN_HINT = "on a GPU machine: bash scripts/gpu-tests.sh <out-dir>"
GPU_ONLY_PROPERTY = ("lightq_gpu_only", True)  # rides on the item's reports, also from xdist workers


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_ONLY)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
            item.user_properties.append(GPU_ONLY_PROPERTY)


def _skip_reason(report) -> str | None:
    """Why a test was skipped: ``GPU_ONLY`` for a ``gpu`` test without CUDA, else its own reason (``longrepr`` is
    ``(path, line, "Skipped: <reason>")``)."""
    if not report.skipped:
        return None
    if GPU_ONLY_PROPERTY in report.user_properties:
        return GPU_ONLY
    return str(report.longrepr[2]).removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else None


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report, config):
    if _skip_reason(report) == GPU_ONLY:
        return "skipped", "", "SKIPPED (GPU-only)"
    return None


def pytest_terminal_summary(terminalreporter):
    reasons = Counter(_skip_reason(r) for r in terminalreporter.stats.get("skipped", []))
    gpu = reasons.pop(GPU_ONLY, 0)
    if gpu:
        terminalreporter.write_line(f"{gpu} skipped: {GPU_ONLY}; {GPU_RUN_HINT}")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"{n} skipped: {reason}")
