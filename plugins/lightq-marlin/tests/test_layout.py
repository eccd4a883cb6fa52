"""CPU checks of Marlin's layouts (``lightq_marlin.layout``), written against their definitions element by element."""

import torch

from lightq.quant.schemes import quantize_weight, unpack_int4
from lightq_marlin.layout import gptq_words, marlin_group_scales


def test_gptq_words_hold_element_k_in_bits_4_k_mod_8():
    qw = quantize_weight(torch.randn(64, 256), "int4-g128")
    words = gptq_words(qw.data)
    assert words.shape == (256 // 8, 64) and words.dtype == torch.int32
    values = unpack_int4(qw.data) + 8  # [N, K] stored nibbles (v + 8)
    k = torch.arange(256)
    nibble = (words[k // 8, :] >> (4 * (k % 8))[:, None]) & 0xF  # [K, N]
    assert torch.equal(nibble.t().to(torch.int8), values.to(torch.int8))


def test_marlin_group_scales_transpose_each_run_of_64():
    scale = torch.arange(3 * 128, dtype=torch.float32).reshape(3, 128)
    out = marlin_group_scales(scale)
    flat_in, flat_out = scale.reshape(-1), out.reshape(-1)
    for p in range(flat_out.numel()):
        base, r = divmod(p, 64)
        i, j = divmod(r, 8)
        assert flat_out[p] == flat_in[base * 64 + 8 * j + i]
    assert out.shape == scale.shape
