"""lightq backend ``vllm``: vLLM's CUTLASS scaled GEMMs. Declaration only; nothing heavy is imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="vllm",
    schemes={"fp8": 8.9, "int8": 7.5, "fp8-pertensor": 8.9},
    impl="lightq_vllm.impl:VllmBackend",
    requires=("vllm",),
    install="pip install 'vllm>=0.26,<0.27'",
    description="vLLM: scaled_fp8_quant / scaled_int8_quant (per token; fp8-pertensor: static or dynamic per "
                "tensor) + cutlass_scaled_mm (bias fused)",
    k_multiple=16,
    n_multiple=16,
)
