"""lightq backend ``sgl``: sglang-kernel's scaled GEMMs. Declaration only; nothing heavy is imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="sgl",
    schemes={"fp8": 8.9, "int8": 8.0, "fp8-pertensor": 8.9},
    impl="lightq_sgl.impl:SglBackend",
    requires=("sgl_kernel",),
    install="pip install 'sglang-kernel>=0.4.6,<0.5'",
    description="sglang-kernel: sgl_per_token_quant_fp8 (int8: vLLM's scaled_int8_quant, else lightq's Triton "
                "act_quant); fp8-pertensor: sgl_per_tensor_quant_fp8, else vLLM's scaled_fp8_quant (static or dynamic) + "
                "fp8_scaled_mm / "
                "int8_scaled_mm (bias fused)",
    k_multiple=16,
    n_multiple=16,
)
