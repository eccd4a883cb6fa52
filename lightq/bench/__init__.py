"""Benchmarks run on the GPU machine: ``python -m lightq.bench linear|step`` (see ``linear`` and ``step``).

Every number is measured side by side with its bf16 baseline in the same run (CUDA events, warm-up, median), on
the device named in the output; results go to stdout as markdown and, with ``--json``, to a file.
"""
