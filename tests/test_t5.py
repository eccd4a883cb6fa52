"""umT5 encoder and its tokenizers: official key layout, T5 relative-position buckets, forward numerics, meta
loading, fp8 swap; the byte tokenizer of the tiny model and the umT5 path through transformers."""

import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightq.backends.torch_backend import SPEC as TORCH_SPEC
from lightq.errors import LightqError
from lightq.models.family import QUANTIZABLE
from lightq.models.t5 import T5_ARCHS, T5Arch, T5RMSNorm, UMT5Encoder, relative_position_bucket
from lightq.models.tokenizer import EOS_ID, PAD_ID, ByteTokenizer, load_tokenizer
from lightq.quant.linear import QLinear, selected, swap_linears

TINY = T5_ARCHS["tiny"]


def expected_shapes(a: T5Arch) -> dict[str, tuple[int, ...]]:
    """Keys of Wan's ``T5Encoder`` (umt5_xxl, encoder_only=True, shared_pos=False), written out from its source."""
    keys = {"token_embedding.weight": (a.vocab, a.dim), "norm.weight": (a.dim,)}
    for i in range(a.num_layers):
        keys.update({
            f"blocks.{i}.norm1.weight": (a.dim,),
            f"blocks.{i}.attn.q.weight": (a.dim_attn, a.dim),
            f"blocks.{i}.attn.k.weight": (a.dim_attn, a.dim),
            f"blocks.{i}.attn.v.weight": (a.dim_attn, a.dim),
            f"blocks.{i}.attn.o.weight": (a.dim, a.dim_attn),
            f"blocks.{i}.norm2.weight": (a.dim,),
            f"blocks.{i}.ffn.gate.0.weight": (a.dim_ffn, a.dim),
            f"blocks.{i}.ffn.fc1.weight": (a.dim_ffn, a.dim),
            f"blocks.{i}.ffn.fc2.weight": (a.dim, a.dim_ffn),
            f"blocks.{i}.pos_embedding.embedding.weight": (a.num_buckets, a.num_heads),
        })
    return keys


@pytest.mark.parametrize("name", sorted(T5_ARCHS))
def test_state_dict_keys_and_shapes_match_official_layout(name):
    with torch.device("meta"):
        model = UMT5Encoder(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(T5_ARCHS[name])
    assert not list(model.buffers())


def test_umt5_xxl_size():
    a = T5_ARCHS["umt5-xxl"]
    assert (a.vocab, a.dim, a.dim_attn, a.dim_ffn, a.num_heads, a.num_layers, a.num_buckets, a.text_len) == \
        (256384, 4096, 4096, 10240, 64, 24, 32, 512)
    with torch.device("meta"):
        model = UMT5Encoder("umt5-xxl")
    # 256384*4096 embedding + 24 * (4 * 4096^2 + 3 * 4096*10240 + 2*4096 + 32*64) + 4096
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336


@pytest.mark.parametrize("name", sorted(T5_ARCHS))
def test_quantizable_patterns_select_exactly_the_block_linears(name):
    with torch.device("meta"):
        model = UMT5Encoder(name)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_block = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")
    assert linears == {f"blocks.{i}.{s}" for i in range(T5_ARCHS[name].num_layers) for s in per_block}
    assert all(selected(n, QUANTIZABLE["t5"], ()) for n in linears)
    others = {n for n, _ in model.named_modules()} - linears
    assert not any(selected(n, QUANTIZABLE["t5"], ()) for n in others)


# --- relative position buckets --------------------------------------------------------------------------------

# Worked by hand from the T5 definition (bidirectional, 32 buckets, max distance 128): 16 buckets per direction,
# key after query (rel > 0) adds 16; distances below 8 are exact; otherwise
# 8 + floor(log(n / 8) / log(16) * 8), capped at 15. E.g. n=12: log(1.5)/log(16)*8 = 1.17 -> 9;
# n=23: 3.05 -> 11; n=90: 6.98 -> 14; n=91: 7.02 -> 15; n=16, 32, 64 sit exactly on 10, 12, 14.
BIDIRECTIONAL_CASES = [
    (0, 0), (-1, 1), (1, 17), (-7, 7), (7, 23), (-8, 8), (8, 24), (-9, 8), (-11, 8), (-12, 9), (12, 25),
    (-13, 9), (-16, 10), (16, 26), (-20, 10), (-23, 11), (-30, 11), (-32, 12), (-40, 12), (-50, 13), (-64, 14),
    (-70, 14), (-90, 14), (-91, 15), (-100, 15), (-127, 15), (-128, 15), (128, 31), (-1000, 15), (1000, 31),
    (-100000, 15), (100000, 31),
]
# Unidirectional (decoder style), 32 buckets: only rel <= 0 counts, 16 exact, then
# 16 + floor(log(n / 16) / log(8) * 16), capped at 31: n=20 -> 17, n=200 -> 35 -> 31.
UNIDIRECTIONAL_CASES = [(0, 0), (5, 0), (1000, 0), (-5, 5), (-15, 15), (-16, 16), (-20, 17), (-200, 31)]


@pytest.mark.parametrize("rel, bucket", BIDIRECTIONAL_CASES)
def test_bidirectional_buckets_by_hand(rel, bucket):
    assert relative_position_bucket(torch.tensor([rel]), True, 32, 128).item() == bucket


@pytest.mark.parametrize("rel, bucket", UNIDIRECTIONAL_CASES)
def test_unidirectional_buckets_by_hand(rel, bucket):
    assert relative_position_bucket(torch.tensor([rel]), False, 32, 128).item() == bucket


def published_t5_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """The published T5 bucket formula, one Python int at a time, in float64."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        bucket += num_buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64)])
def test_buckets_agree_with_published_formula_over_a_range(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-600, 601)
    got = relative_position_bucket(rel, bidirectional, num_buckets, max_distance).tolist()
    want = [published_t5_bucket(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got == want


def test_position_bias_matrix_is_key_minus_query():
    torch.manual_seed(0)
    model = UMT5Encoder(TINY)
    emb = model.blocks[1].pos_embedding.embedding.weight
    bias = model.blocks[1].pos_embedding(5)
    assert bias.shape == (1, TINY.num_heads, 5, 5)
    # query 4, key 0: rel = -4 -> bucket 4; query 0, key 4: rel = +4 -> bucket 20
    assert torch.equal(bias[0, :, 4, 0], emb[4])
    assert torch.equal(bias[0, :, 0, 4], emb[20])


# --- forward numerics -------------------------------------------------------------------------------------------

def reference_forward(sd: dict[str, torch.Tensor], a: T5Arch, ids: torch.Tensor, mask: torch.Tensor):
    """Wan's umT5 encoder written directly from the official formulas, in fp32 with explicit softmax."""
    sd = {k: v.float() for k, v in sd.items()}

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    b, length = ids.shape
    h, d = a.num_heads, a.dim_attn // a.num_heads
    buckets = torch.tensor([[published_t5_bucket(k - q, True, a.num_buckets, 128) for k in range(length)]
                            for q in range(length)])
    x = sd["token_embedding.weight"][ids]
    for i in range(a.num_layers):
        p = f"blocks.{i}."
        n = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(n, sd[p + f"attn.{s}.weight"]).view(b, length, h, d) for s in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        scores = torch.einsum("bihc,bjhc->bhij", q, k) + bias
        attn = torch.einsum("bhij,bjhc->bihc", scores.softmax(-1), v).reshape(b, length, -1)
        x = x + F.linear(attn, sd[p + "attn.o.weight"])
        n = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(n, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(n, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


def tokens(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY.vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UMT5Encoder(TINY).eval()


def test_forward_matches_reference_formulas(tiny_model):
    ids, mask = tokens()
    with torch.no_grad():
        out = tiny_model(ids, mask)
        want = reference_forward(tiny_model.state_dict(), TINY, ids, mask)
    assert out.shape == (2, 12, TINY.dim)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], want[valid], rtol=1e-4, atol=1e-4)


def test_padding_is_zero_and_does_not_leak(tiny_model):
    ids, mask = tokens()
    other = ids.clone()
    other[1, 7:] = 5  # different content at padding positions
    longer_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        out = tiny_model(ids, mask)
        out_other = tiny_model(other, mask)
        out_longer = tiny_model(longer_ids, longer_mask)
    assert torch.count_nonzero(out[1, 7:]) == 0
    assert torch.count_nonzero(out_longer[:, 12:]) == 0
    torch.testing.assert_close(out, out_other)
    torch.testing.assert_close(out_longer[:, :12], out, rtol=1e-5, atol=1e-5)
    # the outputs are not degenerate: tokens differ from each other, unit RMS after the final norm
    assert out[0].std(0).mean() > 0.1
    torch.testing.assert_close(out[0].pow(2).mean(-1), torch.ones(12), rtol=1e-3, atol=1e-3)


def test_bf16_model_close_to_fp32(tiny_model):
    ids, mask = tokens()
    bf16 = UMT5Encoder(TINY).eval()
    bf16.load_state_dict({k: v.bfloat16() for k, v in tiny_model.state_dict().items()})
    bf16 = bf16.bfloat16()
    with torch.no_grad():
        out = bf16(ids, mask)
        want = reference_forward(bf16.state_dict(), TINY, ids, mask) * mask[..., None]
    assert out.dtype == torch.bfloat16 and bf16.norm.weight.dtype == torch.bfloat16
    err = (out.float() - want).norm() / want.norm()
    assert err < 0.03


def test_fp16_overflow_is_clamped_like_official():
    torch.manual_seed(1)
    model = UMT5Encoder(TINY).eval()
    with torch.no_grad():
        model.blocks[0].ffn.fc2.weight.mul_(1e5)  # the FFN output overflows fp16
    model = model.half()
    ids, mask = tokens()
    with torch.no_grad():
        out = model(ids, mask)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()


def test_meta_construction_and_assign_load_reproduce_outputs(tiny_model, tmp_path):
    path = tmp_path / "t5.pth"
    torch.save({k: v.bfloat16() for k, v in tiny_model.state_dict().items()}, path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        loaded = UMT5Encoder(TINY)
    loaded.load_state_dict(state, assign=True, strict=True)
    loaded.eval()
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in loaded.parameters())
    eager = UMT5Encoder(TINY).eval()
    eager.load_state_dict(state)
    eager = eager.bfloat16()
    ids, mask = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), eager(ids, mask))


def test_fp8_torch_swap_stays_close_and_keeps_embedding_and_norms(tiny_model):
    model = UMT5Encoder(TINY).eval()
    model.load_state_dict({k: v.bfloat16() for k, v in tiny_model.state_dict().items()})
    model = model.bfloat16()
    ids, mask = tokens()
    with torch.no_grad():
        want = model(ids, mask).float()
    untouched = {k: v.clone() for k, v in model.state_dict().items() if "attn." not in k and "ffn." not in k}
    swapped = swap_linears(model, QUANTIZABLE["t5"], (), TORCH_SPEC.load(), "fp8")
    assert len(swapped) == 7 * TINY.num_layers
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.token_embedding, nn.Embedding)
    assert all(isinstance(m, T5RMSNorm) for n, m in model.named_modules() if n.endswith(("norm", "norm1", "norm2")))
    assert all(isinstance(model.get_submodule(n), QLinear) for n in swapped)
    after = model.state_dict()
    for k, v in untouched.items():
        assert torch.equal(after[k], v), k
    with torch.no_grad():
        got = model(ids, mask).float()
    assert (got - want).norm() / want.norm() < 0.1


@pytest.mark.parametrize("ids, mask, what", [
    (torch.zeros(2, 4), torch.ones(2, 4), "integer"),
    (torch.zeros(8, dtype=torch.long), torch.ones(8), "integer tensor \\[batch, length\\]"),
    (torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5), "mask shape"),
    (torch.full((1, 3), 256, dtype=torch.long), torch.ones(1, 3), "token ids must lie"),
])
def test_bad_inputs_raise_clear_errors(tiny_model, ids, mask, what):
    with pytest.raises(LightqError, match=what):
        tiny_model(ids, mask)


def test_unknown_arch_and_bad_arch():
    with pytest.raises(LightqError, match="unknown T5 architecture 'umt5-xl'"):
        UMT5Encoder("umt5-xl")
    with pytest.raises(LightqError, match="not divisible"):
        T5Arch(dim_attn=100, num_heads=64)


# --- tokenizers ---------------------------------------------------------------------------------------------------

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) is not None for m in ("transformers", "sentencepiece", "ftfy"))


def test_byte_tokenizer_ids_eos_padding_and_mask():
    tok = load_tokenizer("byte", 8, vocab=256)
    ids, mask = tok(["ab", ""])
    # 'a' = 97 -> 2 + 97 % 254 = 99, 'b' -> 100, then EOS, then padding
    assert ids.tolist() == [[99, 100, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
                            [EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_byte_tokenizer_folds_bytes_into_small_vocab_and_cleans_whitespace():
    tok = ByteTokenizer(vocab=10, text_len=6)
    ids, _ = tok(["  \té\n "])  # 'é' = UTF-8 0xC3 0xA9 = 195, 169 -> 2 + 195 % 8 = 5, 2 + 169 % 8 = 3
    assert ids.tolist() == [[5, 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert tok(["a  b"])[0].tolist() == tok([" a\n\nb "])[0].tolist()
    assert int(ids.max()) < 10


def test_byte_tokenizer_truncates_keeping_eos():
    ids, mask = ByteTokenizer(256, 4)(["abcdefgh"])
    assert ids.tolist() == [[99, 100, 101, EOS_ID]]
    assert mask.tolist() == [[1, 1, 1, 1]]


def test_byte_tokenizer_is_deterministic():
    tok = ByteTokenizer(256, 64)
    prompts = ["A cat walks on the grass, realistic style.", "一只猫"]
    assert torch.equal(tok(prompts)[0], ByteTokenizer(256, 64)(prompts)[0])


@pytest.mark.parametrize("call, what", [
    (lambda: load_tokenizer("byte", 8), "needs vocab="),
    (lambda: ByteTokenizer(2, 8), "vocab must be >= 3"),
    (lambda: ByteTokenizer(256, 0), "text_len must be >= 1"),
    (lambda: ByteTokenizer(256, 8)("a prompt"), "list of prompt strings"),
    (lambda: ByteTokenizer(256, 8)([1, 2]), "list of prompt strings"),
])
def test_byte_tokenizer_bad_input(call, what):
    with pytest.raises(LightqError, match=what):
        call()


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers, sentencepiece and ftfy are installed here")
def test_missing_tokenizer_dependencies_name_the_extra(tmp_path):
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    with pytest.raises(LightqError, match=r"pip install .transformers>=4.40. sentencepiece ftfy"):
        load_tokenizer(tmp_path, 512)


NEEDS_TRANSFORMERS = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="needs transformers, sentencepiece and ftfy (the tokenizer extra)")
TOY_WORDS = ("a", "cat", "walks", "&", "runs", "x")


def write_toy_umt5_tokenizer(folder) -> dict[str, int]:
    """A T5-format tokenizer (unigram pieces, '</s>' appended) in Wan's ``google/umt5-xxl`` subfolder; its vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in TOY_WORDS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    target = folder / "google" / "umt5-xxl"
    target.mkdir(parents=True)
    tok.save(str(target / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0, "additional_special_tokens": []}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return {w: i for i, (w, _) in enumerate(pieces)}


@NEEDS_TRANSFORMERS
def test_umt5_tokenizer_path_from_wan_folder_layout(tmp_path):
    vocab = write_toy_umt5_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, 8)
    ids, mask = tok(["a  cat\n walks &amp; runs", "x " * 100, " a cat walks & runs "])
    sentence = [vocab["\u2581" + w] for w in ("a", "cat", "walks", "&", "runs")] + [EOS_ID, PAD_ID, PAD_ID]
    assert ids.tolist() == [sentence, [vocab["\u2581x"]] * 7 + [EOS_ID], sentence]  # cleaned, truncated with EOS
    assert mask.tolist() == [[1] * 6 + [0, 0], [1] * 8, [1] * 6 + [0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@NEEDS_TRANSFORMERS
def test_umt5_tokenizer_bad_folder_names_the_problem(tmp_path):
    with pytest.raises(LightqError, match="cannot load the umT5 tokenizer"):
        load_tokenizer(tmp_path / "nowhere", 8)


@NEEDS_TRANSFORMERS
def test_real_umt5_tokenizer():
    source = os.environ.get("LIGHTQ_UMT5_TOKENIZER")
    if not source:
        pytest.skip("set LIGHTQ_UMT5_TOKENIZER to a Wan2.1 model folder (or its google/umt5-xxl) to check the real vocab")
    tok = load_tokenizer(source, 16)
    ids, mask = tok(["A  cat\n walks &amp; runs", "x " * 100])
    assert ids.shape == mask.shape == (2, 16)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == EOS_ID and (ids[0, n:] == PAD_ID).all() and (mask[0, n:] == 0).all()
    assert mask[1].all() and ids[1, -1] == EOS_ID  # truncated, EOS kept
    assert torch.equal(tok(["A cat walks & runs"])[0][0], ids[0])  # whitespace + HTML cleaning
    assert int(ids.max()) < T5_ARCHS["umt5-xxl"].vocab


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_cuda_bf16_and_fp8_torch_match_cpu_reference(tiny_model):
    ids, mask = tokens()
    with torch.no_grad():
        want = reference_forward(tiny_model.state_dict(), TINY, ids, mask) * mask[..., None]
    model = UMT5Encoder(TINY).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        bf16 = model(ids.cuda(), mask.cuda()).float().cpu()
    assert (bf16 - want).norm() / want.norm() < 0.03
    swap_linears(model, QUANTIZABLE["t5"], (), TORCH_SPEC.load(), "fp8")
    with torch.no_grad():
        fp8 = model(ids.cuda(), mask.cuda()).float().cpu()
    assert (fp8 - want).norm() / want.norm() < 0.1
    assert torch.count_nonzero(fp8[1, 7:]) == 0
