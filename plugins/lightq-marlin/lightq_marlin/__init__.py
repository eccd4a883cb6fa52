"""lightq backend ``marlin``: int4 group-128 weight-only GEMM. Declaration only; nothing heavy is imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="marlin",
    schemes={"int4-g128": 8.0},
    impl="lightq_marlin.impl:MarlinBackend",
    requires=("vllm",),
    install="pip install 'vllm>=0.26,<0.27'",
    description="Marlin (vLLM gptq_marlin_repack + marlin_gemm, scalar type uint4b8, bf16/fp16 activations)",
    k_multiple=128,
    n_multiple=64,
)
