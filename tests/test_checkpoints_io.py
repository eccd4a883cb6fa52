"""TensorSource over every file layout, streamed atomic writing, and corrupt-file errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightq.checkpoints.conventions import open_source
from lightq.checkpoints.sources import file_sha256, sources_sha256
from lightq.checkpoints.writers import SafetensorsWriter, mmap_safetensors, save_safetensors_atomic
from lightq.errors import CheckpointError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.self_attn.q.weight": torch.randn(8, 16, generator=g).bfloat16(),
        "blocks.0.self_attn.q.weight_scale": torch.rand(8, 1, generator=g),
        "blocks.1.self_attn.q.weight": torch.randn(8, 16, generator=g).to(torch.float8_e4m3fn),
        "head.bias": torch.randn(4, generator=g),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3, dtype=torch.int8),
    }


def _same(a, b):
    """Same dtype, shape and bytes."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_writer_output_is_standard_safetensors(tmp_path):
    t = _tensors()
    path = save_safetensors_atomic(t, tmp_path / "m.safetensors", {"lightq.scheme": "fp8"})
    back = load_file(path)
    assert list(back) == list(t) or set(back) == set(t)
    assert all(_same(back[k], t[k]) for k in t)
    src = open_source(path)
    assert src.metadata == {"lightq.scheme": "fp8"}
    assert src.shape("blocks.0.self_attn.q.weight") == (8, 16)
    assert src.dtype("blocks.1.self_attn.q.weight") == torch.float8_e4m3fn
    assert all(_same(src[k], t[k]) for k in t)
    assert list(tmp_path.iterdir()) == [path]


def test_refuses_overwrite_unless_asked(tmp_path):
    p = save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="already exists.*overwrite=true"):
        save_safetensors_atomic({"a": torch.zeros(2)}, p)
    save_safetensors_atomic({"a": torch.zeros(2)}, p, overwrite=True)
    assert torch.equal(load_file(p)["a"], torch.zeros(2))


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="expected 'a'"):
        with SafetensorsWriter(out, [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]) as w:
            w.write("a", torch.ones(3))
    with pytest.raises(CheckpointError, match="never written"):
        with SafetensorsWriter(out, [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]) as w:
            w.write("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_chunked_index_folder(tmp_path):
    t = _tensors()
    keys = list(t)
    save_file({k: t[k] for k in keys[:3]}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in keys[3:]}, tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    weight_map = {k: f"diffusion_pytorch_model-0000{1 if i < 3 else 2}-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    src = open_source(tmp_path)
    assert set(src) == set(t) and len(src.files) == 2
    assert all(_same(src[k], t[k]) for k in t)
    # an index that points a key at the wrong chunk is refused
    weight_map[keys[0]] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="does not match the chunk files"):
        open_source(tmp_path)


def test_block_split_folder(tmp_path):
    t = _tensors()
    save_file({k: v for k, v in t.items() if k.startswith("blocks.0.")}, tmp_path / "block_0.safetensors")
    save_file({k: v for k, v in t.items() if k.startswith("blocks.1.")}, tmp_path / "block_1.safetensors")
    save_file({k: v for k, v in t.items() if not k.startswith("blocks.")}, tmp_path / "non_block.safetensors")
    src = open_source(tmp_path)
    assert set(src) == set(t) and all(_same(src[k], t[k]) for k in t)
    assert src.file_of("blocks.1.self_attn.q.weight").name == "block_1.safetensors"
    (tmp_path / "block_0.safetensors").rename(tmp_path / "block_2.safetensors")
    with pytest.raises(CheckpointError, match="missing block_0.safetensors"):
        open_source(tmp_path)


def test_single_file_folder_and_ambiguity(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "one.safetensors")
    assert set(open_source(tmp_path)) == {"a"}
    save_file({"b": torch.ones(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="2 .safetensors files and no index"):
        open_source(tmp_path)


def test_pth_weights_only(tmp_path):
    t = _tensors()
    torch.save(t, tmp_path / "enc.pth")
    src = open_source(tmp_path / "enc.pth")
    assert set(src) == set(t) and all(_same(src[k], t[k]) for k in t)
    torch.save({"model": {"a": torch.ones(1)}}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match="flat dict"):
        open_source(tmp_path / "nested.pth")


class _Evil:
    pass


def test_pth_with_code_is_refused(tmp_path):
    torch.save({"a": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: cannot load as a weights-only"):
        open_source(tmp_path / "evil.pth")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) - 40], "truncated or corrupt"),
    (lambda b: b"\xff" * 8 + b[8:], "truncated or corrupt"),
    (lambda b: b[:8] + b"{garbage" + b[16:], "truncated or corrupt"),
])
def test_corrupt_safetensors(tmp_path, damage, message):
    good = save_safetensors_atomic(_tensors(), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*{message}"):
        open_source(bad)


def test_truncated_pth(tmp_path):
    torch.save(_tensors(), tmp_path / "good.pth")
    (tmp_path / "bad.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="bad.pth: cannot load"):
        open_source(tmp_path / "bad.pth")


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_source(tmp_path / "nope.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_source(tmp_path / "x.ckpt")


def test_mmap_view_and_hashes(tmp_path):
    t = _tensors()
    p = save_safetensors_atomic(t, tmp_path / "m.safetensors")
    views = mmap_safetensors(p)
    assert all(_same(views[k], t[k]) for k in t)
    q = save_safetensors_atomic({"x": torch.ones(3)}, tmp_path / "n.safetensors")
    import hashlib
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert sources_sha256([p]) == file_sha256(p)
    assert sources_sha256([p, q]) == sources_sha256([q, p]) != file_sha256(p)
