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


KEY_5120 = [5120, True, False, "torch.bfloat16", "torch.float8_e4m3fn", "torch.float32"]
KEY_13824 = [13824, True, False, "torch.bfloat16", "torch.float8_e4m3fn", "torch.float32"]
KEY_INT8 = [3072, False, False, "torch.bfloat16", "torch.int8", "torch.float32"]


def _write_table(tmp_path, name, tuner, entries):
    (tmp_path / "sm90.json").write_text(json.dumps({name: [[k, tuner_fields] for k, tuner_fields in entries]}))


def test_nearest_takes_the_closest_sizes_with_equal_flags_and_dtypes(act_quant_tuner, tmp_path):
    tuned_configs, name, tuner = act_quant_tuner
    f = [tuned_configs._fields(c) for c in tuner.configs]
    _write_table(tmp_path, name, tuner, [(KEY_5120, f[1]), (KEY_13824, f[2]), (KEY_INT8, f[3])])
    for width, want in ((3072, f[1]), (8000, f[1]), (9000, f[2]), (20000, f[2])):
        key, config = tuned_configs.nearest(name, (width, *KEY_5120[1:]), tuner.configs)
        assert tuned_configs._fields(config) == want, width
    assert tuned_configs._fields(tuned_configs.nearest(name, (13824, *KEY_INT8[1:]), tuner.configs)[1]) == f[3]
    assert tuned_configs.nearest(name, (5120, False, True, *KEY_5120[3:]), tuner.configs) is None  # other flags
    assert tuned_configs.nearest(name, (5120, True, False, "torch.float16", *KEY_5120[4:]), tuner.configs) is None
    assert tuned_configs.nearest(name, (5120, 1, False, *KEY_5120[3:]), tuner.configs) is None  # 1 is not True
    (tmp_path / "sm90.json").write_text(json.dumps({name: [[KEY_5120, {**f[1], "num_warps": 3}]]}))
    assert tuned_configs.nearest(name, tuple(KEY_5120), tuner.configs) is None  # a config the kernel dropped


@pytest.fixture
def disk_cache(act_quant_tuner, monkeypatch):
    """Triton's on-disk autotuning cache needs a GPU target to form its key; this stands in for it (the only
    double here): ``hits`` maps keys to configs found on disk, a miss runs ``bench_fn`` as Triton's does."""
    tuned_configs, name, tuner = act_quant_tuner
    hits, benched = {}, []

    def check_disk_cache(self, key, configs, bench_fn):
        if key in hits:
            self.cache[key] = hits[key]
            return True
        bench_fn()
        return False

    def bench():
        benched.append(True)
        tuner.cache[key_asked[0]] = tuner.configs[0]

    key_asked = []
    monkeypatch.delattr(tuner, "check_disk_cache")  # the hook lightq installed over the class method
    monkeypatch.setattr(type(tuner), "check_disk_cache", check_disk_cache)
    tuned_configs.fall_back_to_nearest(name, tuner)
    monkeypatch.delenv(tuned_configs.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv(tuned_configs.DUMP_ENV, raising=False)

    def miss(key):
        key_asked[:] = [key]
        return tuner.check_disk_cache(key, tuner.configs, bench)
    return tuned_configs, name, tuner, hits, benched, miss


def test_a_missing_key_takes_the_nearest_config_without_timing(disk_cache, tmp_path, monkeypatch):
    tuned_configs, name, tuner, hits, benched, miss = disk_cache
    f = [tuned_configs._fields(c) for c in tuner.configs]
    _write_table(tmp_path, name, tuner, [(KEY_5120, f[2])])
    key = (3072, *KEY_5120[1:])
    assert miss(key) is True and not benched
    assert tuned_configs._fields(tuner.cache[key]) == f[2]

    disk_key = (4096, *KEY_5120[1:])
    hits[disk_key] = tuner.configs[3]  # this machine autotuned that key before: its own timing wins
    assert miss(disk_key) is True and tuner.cache[disk_key] is tuner.configs[3] and not benched

    for env in (tuned_configs.AUTOTUNE_ENV, tuned_configs.DUMP_ENV):
        monkeypatch.setenv(env, "1" if env == tuned_configs.AUTOTUNE_ENV else str(tmp_path / "dump.json"))
        assert miss((2048, *KEY_5120[1:])) is False and benched == [True]
        benched.clear()
        monkeypatch.delenv(env)

    unfit = (5120, False, True, *KEY_5120[3:])
    monkeypatch.setenv(tuned_configs.AUTOTUNE_ENV, "0")  # never time: the kernel's first config
    assert miss(unfit) is True and tuner.cache.pop(unfit) is tuner.configs[0] and not benched
    monkeypatch.delenv(tuned_configs.AUTOTUNE_ENV)
    assert miss(unfit) is False and benched == [True]  # no shipped key fits: timed
