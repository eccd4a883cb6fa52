"""The built-in ``torch`` backend's spec: torch-free, so reading the registry imports nothing heavy."""

from .spec import BackendSpec

SPEC = BackendSpec(
    name="torch",
    schemes={"fp8": None, "int8": None, "fp8-b128": None, "int4-g128": None, "fp8-pertensor": None},
    impl="lightq.backends.torch_backend:TorchBackend",
    description="portable reference: torch._scaled_mm / torch._int_mm where available, exact emulation otherwise",
)
