"""Hub references: revision pinning, only the files the job reads are fetched, local-path typos stay local, and
the messages name ``hf download``."""

import pytest
from hydra import compose, initialize_config_dir

from lightq import config
from lightq.checkpoints import hub
from lightq.errors import CheckpointError
from lightq.paths import conf_dir
from lightq.pipeline.components import hub_patterns


@pytest.mark.parametrize("ref, parsed", [
    ("Wan-AI/Wan2.1-T2V-1.3B", ("Wan-AI/Wan2.1-T2V-1.3B", None, None)),
    ("Wan-AI/Wan2.1-T2V-1.3B@v1.0", ("Wan-AI/Wan2.1-T2V-1.3B", "v1.0", None)),
    ("lightx2v/Encoders@0123abc/models_t5_umt5-xxl-enc-fp8.pth",
     ("lightx2v/Encoders", "0123abc", "models_t5_umt5-xxl-enc-fp8.pth")),
    ("me/repo/sub/dit.safetensors@refs/pr/3", ("me/repo", "refs/pr/3", "sub/dit.safetensors")),
    ("me/repo/sub/dit.safetensors", ("me/repo", None, "sub/dit.safetensors")),
    ("not a ref", None),
])
def test_parse(ref, parsed):
    assert hub.parse(ref) == parsed


def test_snapshot_and_file_pass_revision_and_patterns(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(tmp_path / "f"))
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("Wan-AI/Wan2.1-T2V-1.3B@abc123", ["Wan2.1_VAE.pth"]) == tmp_path
    assert hub.resolve("me/enc@v2/enc.pth") == tmp_path / "f"
    assert calls == [{"repo_id": "Wan-AI/Wan2.1-T2V-1.3B", "revision": "abc123", "allow_patterns": ["Wan2.1_VAE.pth"]},
                     {"repo_id": "me/enc", "filename": "enc.pth", "revision": "v2"}]


def test_local_path_typo_is_a_local_path_error(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: pytest.fail("asked the Hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint not found: models/Wan2\.1-T2V-1\.3b: no such local file or "
                                              r"folder \(models exists"):
        hub.resolve("models/Wan2.1-T2V-1.3b")
    for ref in ("./Wan2.1", "C:/models/Wan2.1", "models\\Wan2.1"):
        with pytest.raises(CheckpointError, match="no such local file or folder"):
            hub.resolve(ref)


def test_messages_name_hf_download():
    assert hub.download_command("me/enc", "v2", "enc.pth") == "hf download me/enc enc.pth --revision v2"
    assert hub.download_command("me/enc", None, None) == "hf download me/enc"


@pytest.fixture(scope="module")
def hydra_ctx():
    config.register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield


def test_the_job_fetches_only_what_it_reads(hydra_ctx, monkeypatch, tmp_path):
    import huggingface_hub

    from lightq.pipeline.components import model_folder

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    cfg = compose("config", overrides=["model=wan2.1-t2v-14b", "model.weights=Wan-AI/Wan2.1-T2V-14B",
                                       "dit_quant=fp8-torch", "dit_quant.ckpt=me/quant/dit-fp8.safetensors",
                                       "t5_quant=fp8-torch"])
    patterns = hub_patterns(cfg)
    assert model_folder(cfg) == tmp_path
    assert calls == [{"repo_id": "Wan-AI/Wan2.1-T2V-14B", "revision": None, "allow_patterns": patterns}]
    assert not {"diffusion_pytorch_model*", "transformer/*"} & set(patterns)  # the DiT comes from its ckpt
    assert {"models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-fp8.pth", "text_encoder/*", "Wan2.1_VAE.pth",
            "vae/*", "google/umt5-xxl/*", "tokenizer/*"} <= set(patterns)
    assert not any("clip" in p or "image_encoder" in p for p in patterns)  # t2v: no image encoder
    i2v = hub_patterns(compose("config", overrides=["model=wan2.1-i2v-14b-480p"]))
    assert {"diffusion_pytorch_model*", "transformer/*", "image_encoder/*",
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"} <= set(i2v)
