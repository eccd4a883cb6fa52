"""Quantized self-attention for the DiT (the ``attn_quant`` group), laid out like the linear backends.

- ``numerics``: the schemes' math and the portable torch reference (the oracle), with their error bounds;
- ``inputs``: attention inputs with Wan-like statistics, for tests and the benchmark;
- ``specs`` (torch-free): the built-in backends' specs, ``torch`` (the reference, runs anywhere) and ``triton``
  (``lightq.kernels.attention``); plugins publish theirs under the entry-point group ``lightq.attention``;
- ``registry`` (torch-free): reading that group and choosing a backend (``auto``: fastest first);
- ``backends``: the implementations' contract (``AttentionBackend.implementation(scheme)`` gives the callable the
  seam ``lightq.models.attention.use_self_attention`` installs) and the two built-in ones.

This module is torch-free: ``SCHEMES`` are the scheme names configs are validated against.
"""

SCHEMES = ("int8-sage", "int8fp8-sage2", "fp8-fa3")
