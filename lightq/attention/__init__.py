"""Quantized self-attention: its numerics (``numerics``, the torch reference), realistic inputs (``inputs``), the
attention backends and their registry (entry-point group ``lightq.attention``)."""
