"""lightq backend ``q8f``: Q8-Kernels (Ada only). Declaration only; nothing heavy is imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="q8f",
    schemes={"fp8": 8.9, "int8": 8.9},
    impl="lightq_q8f.impl:Q8fBackend",
    requires=("q8_kernels",),
    install="pip install --no-build-isolation git+https://github.com/KONAKONA666/q8_kernels (builds CUDA sources "
            "for Ada; CUDA >= 12.4)",
    description="Q8-Kernels q8_linear / fp8_linear with its token-wise quantizers (Ada sm89 only; unverified here)",
    max_capability=8.9,
    k_multiple=16,
    n_multiple=16,
)
