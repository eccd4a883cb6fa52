"""lightq backend ``torchao``: torchao's int8 tensor subclass, compiled. Declaration only; nothing heavy imported."""

from lightq.backends.spec import BackendSpec

SPEC = BackendSpec(
    name="torchao",
    schemes={"int8": 8.0},
    impl="lightq_torchao.impl:TorchaoBackend",
    requires=("torchao",),
    install="pip install 'torchao>=0.18,<0.19'",
    description="torchao Int8Tensor (Int8DynamicActivationInt8WeightConfig semantics) built from the lightq int8 "
                "checkpoint, run under torch.compile",
    k_multiple=8,
    n_multiple=8,
)
