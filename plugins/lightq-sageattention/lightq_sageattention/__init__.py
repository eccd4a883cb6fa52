"""lightq attention backend ``sageattention``: the sageattention library's ``sageattn``. Declaration only; nothing
heavy is imported here."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="sageattention",
    schemes={"int8-sage": 8.0},
    impl="lightq_sageattention.impl:SageAttentionBackend",
    requires=("sageattention", "triton"),
    install="pip install 'sageattention==1.0.6'",
    description="sageattention 1.0.6 sageattn (Triton): int8 Q (blocks of 128) / K (blocks of 64, smoothed) Q.K, "
                "fp16 P.V with fp16 accumulation",
)
