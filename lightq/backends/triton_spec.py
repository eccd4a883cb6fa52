"""The built-in ``triton`` backend's spec: torch-free and triton-free (``lightq.backends.triton_backend`` is the
implementation, imported only when a run selects it)."""

from .spec import BackendSpec

SPEC = BackendSpec(
    name="triton",
    schemes={"fp8": 8.9, "int8": 8.0},
    impl="lightq.backends.triton_backend:TritonBackend",
    requires=("triton",),
    install="pip install triton (CUDA builds of torch ship it)",
    description="lightq's Triton kernels: fused per-token quant + torch._scaled_mm (fp8) / Triton int8 GEMM; "
                "fused LayerNorm+modulation+quant and RMSNorm+RoPE in the DiT block",
    k_multiple=16,
    n_multiple=16,
    precompiles=True,
)
