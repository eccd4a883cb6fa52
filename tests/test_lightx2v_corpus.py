"""The 264 real LightX2V configs of tests/data/lightx2v-configs: each imports and composes (on a model of its class's
family), or is refused in one line naming the feature, the key and the file; never a traceback. docs/LIGHTX2V.md is
this survey's table."""

import json
from pathlib import Path

from lightq.lightx2v import keys as K
from lightq.lightx2v.survey import UNKNOWN, compose, counts, markdown, survey

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "lightx2v-configs"
CLASSES = json.loads((CORPUS / "model_cls.json").read_text())
SOURCE = "LightX2V's configs/ (commit f8aee98b)"


def _line_names_key_and_file(outcome) -> bool:
    cfg = json.loads((CORPUS / outcome.path).read_text())
    return outcome.reason.startswith(outcome.path + ": ") and "\n" not in outcome.reason and (
        any(f"{k}=" in outcome.reason or f"{k}." in outcome.reason or f" {k}:" in outcome.reason
            or f"key {k}" in outcome.reason for k in cfg)
        or "model class" in outcome.reason)


def test_every_config_imports_or_is_refused_in_one_line():
    outcomes = survey(CORPUS, CLASSES)
    assert len(outcomes) == len(json.loads((CORPUS / "selected_264.json").read_text())) == 264
    for verdict, n in sorted(counts(outcomes).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n:4d}  {verdict}")
    for o in outcomes:
        if o.imported:
            compose(o.imported)  # a job config Hydra composes and lightq validates
        else:
            assert _line_names_key_and_file(o), o.reason
    wan = [o for o in outcomes if CLASSES[o.path]["model_cls"] in K.CLASSES]
    refused = {o.path: o.reason for o in wan if not o.imported}
    # a Wan2.1 / Wan2.2 config is refused only for a feature lightq lacks, never for a key it does not know
    assert not [r for o in wan if not o.imported and o.feature == UNKNOWN for r in [o.reason]], refused
    assert {"configs/quantization/wan_i2v.json", "configs/offload/phase/wan_i2v_phase.json",
            "configs/distill/wan21/wan_t2v_distill_fp8_4step_cfg.json",
            "configs/offload/block/wan_t2v_1_3b.json", "configs/wan22/wan_moe_t2v_distill.json",
            "configs/platforms/metax/wan22_t2v.json", "configs/wan22/wan_ti2v_i2v_4090.json",
            "configs/distill/wan22/wan_moe_i2v_distill_quant.json"} <= {o.path for o in wan if o.imported}
    wan22 = [o for o in wan if CLASSES[o.path]["model_cls"] in K.WAN22_CLASSES]
    assert sum(1 for o in wan22 if o.imported) >= 19 and all(o.imported.model_cls == CLASSES[o.path]["model_cls"]
                                                             for o in wan22 if o.imported)
    assert (REPO / "docs" / "LIGHTX2V.md").read_text() == markdown(outcomes, SOURCE), \
        "docs/LIGHTX2V.md is stale: python -m lightq.lightx2v.survey tests/data/lightx2v-configs --classes " \
        "tests/data/lightx2v-configs/model_cls.json --markdown docs/LIGHTX2V.md"


def test_without_a_model_class_nothing_raises_but_one_line():
    """As a user runs them, without from_lightx2v.model_cls: the same guarantee (LightX2VError only)."""
    outcomes = survey(CORPUS, {p: {} for p in CLASSES})
    assert all(o.imported or "\n" not in o.reason for o in outcomes)
    print(dict(counts(outcomes)))
