"""Backends: the contract (``spec``, ``base``), the entry-point registry (``registry``), and the built-in ``torch``
(portable reference) and ``triton`` (lightq's kernels) backends; plugins add the others."""
