"""Model blocks rewritten on lightq's fused kernels: one file per fused block (``wan_block``: the Wan2.1 DiT block).

This floor stands on ``models`` (the block it replaces), ``quant`` (QLinear) and ``kernels`` (the Triton library);
none of those imports it.
"""
