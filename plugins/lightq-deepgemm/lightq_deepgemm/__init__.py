"""lightq backend ``deepgemm``: DeepGEMM's block-scaled fp8 GEMM. Declaration only; nothing heavy imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="deepgemm",
    schemes={"fp8-b128": 9.0},
    impl="lightq_deepgemm.impl:DeepGemmBackend",
    requires=("vllm",),
    install="pip install 'vllm>=0.26,<0.27' (bundles DeepGEMM; DeepGEMM JIT-compiles with nvcc: needs the CUDA "
            "toolkit)",
    description="DeepGEMM fp8_gemm_nt (128x128 weight blocks, 1x128 activation groups from vLLM's "
                "per_token_group_fp8_quant), Hopper only",
    max_capability=9.0,
    k_multiple=128,
    n_multiple=64,
)
