"""Quantization: scheme numerics (``schemes``) and the quantized linear layer (``linear``)."""
