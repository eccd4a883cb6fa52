"""The attention-backend contract and the two built-in implementations.

An implementation is loaded from its spec (``spec.load()``, which turns any import failure into one
``BackendUnavailable``) and gives, per scheme, the callable the seam installs for the DiT's self-attention:

    ``implementation(scheme) -> impl``, ``impl(q, k, v) -> out``  (``lightq.models.attention``'s contract:
    q ``[B, Lq, H, D]``, k / v ``[B, Lk, H, D]``, out ``[B, Lq, H * D]`` in q's dtype)
"""

from __future__ import annotations

import functools

from ..backends.spec import BackendSpec


def implementation_for(scheme: str, backend: str):
    """The seam's callable for ``scheme`` on the installed attention backend named ``backend`` (a planned choice,
    not ``auto``)."""
    from .registry import specs

    return specs()[backend].load().implementation(scheme)


class AttentionBackend:
    """Base of attention implementations: ``implementation(scheme)`` returns the seam's callable."""

    def __init__(self, spec: BackendSpec):
        self.spec, self.name = spec, spec.name

    def implementation(self, scheme: str):
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    """The reference numerics (``lightq.attention.numerics.reference_attention``)."""

    def implementation(self, scheme: str):
        from .numerics import reference_attention

        return functools.partial(reference_attention, scheme=scheme)


class TritonAttention(AttentionBackend):
    """lightq's kernels (``lightq.kernels.attention.quant_attention``); importing them imports triton."""

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        from ..kernels.attention import quant_attention

        self._kernel = quant_attention

    def implementation(self, scheme: str):
        kernel = self._kernel
        return lambda q, k, v: kernel(q, k, v, scheme)
