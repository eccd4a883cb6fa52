"""The shipped autotuning tables (``lightq.kernels.tuned_configs``) on real Triton autotuners, CPU only: seeding
keeps only configs the kernel still lists, under the exact tuning key; dumping and seeding round-trip."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (test extra)")


@pytest.fixture
def act_quant_tuner(monkeypatch, tmp_path):
    from lightq.kernels import act_quant, tuned_configs

    tuner = act_quant._act_quant.tuned
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuned_configs, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuned_configs, "arch", lambda: "sm90")
    return tuned_configs, act_quant._act_quant.name, tuner


def test_seed_takes_listed_configs_under_their_exact_key(act_quant_tuner, tmp_path):
    tuned_configs, name, tuner = act_quant_tuner
    key = [5120, True, False, "torch.bfloat16", "torch.float8_e4m3fn", "torch.float32"]
    listed = tuned_configs._fields(tuner.configs[-1])
    dropped = {**listed, "num_warps": 3}  # a config the kernel no longer lists
    (tmp_path / "sm90.json").write_text(json.dumps({name: [[key, listed], [[64, True, False], dropped]],
                                                    "other_kernel": [[key, listed]]}))
    assert tuned_configs.seed(name, tuner) == 1
    assert list(tuner.cache) == [tuple(key)]
    assert tuned_configs._fields(tuner.cache[tuple(key)]) == listed


def test_no_table_for_this_gpu_seeds_nothing(act_quant_tuner):
    tuned_configs, name, tuner = act_quant_tuner
    assert tuned_configs.seed(name, tuner) == 0 and tuner.cache == {}


def test_dump_merges_into_the_table_and_seeds_back(act_quant_tuner, tmp_path):
    tuned_configs, name, tuner = act_quant_tuner
    old_key, new_key = [13824, False, True, "torch.bfloat16"], [1536, True, False, "torch.bfloat16"]
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps({name: [[old_key, tuned_configs._fields(tuner.configs[0])]]}))
    tuner.cache[tuple(new_key)] = tuner.configs[1]
    tuned_configs.dump(path)
    table = json.loads(path.read_text())
    assert sorted(json.dumps(k) for k, _ in table[name]) == sorted(json.dumps(k) for k in (old_key, new_key))
    tuner.cache.clear()
    assert tuned_configs.seed(name, tuner) == 2
    assert tuned_configs._fields(tuner.cache[tuple(new_key)]) == tuned_configs._fields(tuner.configs[1])
