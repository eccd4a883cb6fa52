"""The built-in attention backends' specs (torch-free; see ``lightq.backends.spec.BackendSpec``): ``torch`` runs the
reference numerics anywhere torch runs, ``triton`` runs lightq's kernels (int8 Q.K from sm80, fp8 from sm89)."""

from ..backends.spec import BackendSpec

TORCH = BackendSpec(
    name="torch",
    schemes={"int8-sage": None, "int8fp8-sage2": None, "fp8-fa3": None},
    impl="lightq.attention.backends:TorchAttention",
    description="portable reference of every attention scheme (lightq.attention.numerics): CPU or GPU, slow",
)

TRITON = BackendSpec(
    name="triton",
    schemes={"int8-sage": 8.0, "int8fp8-sage2": 8.9, "fp8-fa3": 8.9},
    impl="lightq.attention.backends:TritonAttention",
    requires=("triton",),
    install="pip install triton (CUDA builds of torch ship it)",
    description="lightq's Triton kernels: block quantizer + online-softmax attention (lightq.kernels.attention)",
    precompiles=True,
)
