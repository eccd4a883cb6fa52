"""results.svg read back as geometry: no text overlaps another or leaves the picture, shared overrides are in the
subtitle only, the baseline and the size legend are drawn; results.md lists the baseline first."""

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest

from lightq import report, sweep_plot

SVG = "{http://www.w3.org/2000/svg}"
MODES = ["fp8-torch", "int8-torch", "int4-g128-torch", "fp8-b128-torch", "fp8-triton", "int8-triton"]


def _job(folder, overrides, status="ok", psnr=None, denoise=1.0, peak=2**30, baseline=False):
    choices = dict(o.split("=", 1) for o in overrides)
    res = {"status": status, "reason": "" if status == "ok" else "fp8-sgl cannot run here",
           "choices": {"model": choices.get("model", "tiny"), **choices, "overrides": overrides},
           "components": {"dit": {"mode": choices.get("dit_quant", "none"), "scheme": "none" if baseline else "fp8",
                                  "backend": None if baseline else "torch"}},
           "timings_s": {"denoise": denoise, "total": denoise + 1}, "memory": {"peak_host_bytes": peak}}
    if psnr is not None:
        res["quality"] = {"psnr_db": psnr, "ssim": 0.99, "latent_cosine": 0.999}
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(res))


@pytest.fixture
def crowded_sweep(tmp_path):
    """Twelve quantized jobs whose points nearly coincide (the worst case for labels), a baseline, a skipped job."""
    shared = ["model=tiny", "model.frames=5", "seed=3"]
    for i, (mode, t5) in enumerate((m, t) for m in MODES for t in ("none", "int8-torch")):
        _job(tmp_path / f"dit_quant={mode},t5_quant={t5}", [f"dit_quant={mode}", f"t5_quant={t5}", *shared],
             psnr=40 + 0.05 * i, denoise=1.0 - 0.002 * i, peak=(1 + i % 3) * 2**30)
    _job(tmp_path / "dit_quant=none,t5_quant=none", ["dit_quant=none", "t5_quant=none", *shared], denoise=1.0,
         baseline=True)
    _job(tmp_path / "dit_quant=fp8-sgl,t5_quant=none", ["dit_quant=fp8-sgl", "t5_quant=none", *shared],
         status="skipped")
    report.build(tmp_path)
    return tmp_path


def _texts(svg_path):
    root = ET.parse(svg_path).getroot()
    width, height = float(root.get("width")), float(root.get("height"))
    boxes = []
    for el in root.iter(f"{SVG}text"):
        s = "".join(el.itertext())
        size = float(el.get("font-size"))
        x0, y0, x1, y1 = sweep_plot.text_box(float(el.get("x")), float(el.get("y")), s, size,
                                             el.get("text-anchor", "start"))
        rot = re.match(r"rotate\((-?[\d.]+) ([\d.]+) ([\d.]+)\)", el.get("transform", ""))
        if rot:  # a -90 degree rotation about (cx, cy): the box turns on its side
            assert float(rot.group(1)) == -90
            cx, cy = float(rot.group(2)), float(rot.group(3))
            x0, y0, x1, y1 = cx + (y0 - cy), cy - (x1 - cx), cx + (y1 - cy), cy - (x0 - cx)
        boxes.append((s, (x0, y0, x1, y1)))
    return root, (width, height), boxes


def test_no_text_overlaps_another_or_leaves_the_picture(crowded_sweep):
    root, (width, height), boxes = _texts(crowded_sweep / "results.svg")
    assert root.get("font-family").startswith("DejaVu Sans Mono"), "extents are computed for a monospace font"
    for s, (x0, y0, x1, y1) in boxes:
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, f"{s!r} is clipped: {(x0, y0, x1, y1)}"
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not sweep_plot.overlaps(box_a, box_b, gap=0), f"{a!r} overlaps {b!r}"


def test_labels_hold_what_differs_and_the_subtitle_what_is_shared(crowded_sweep):
    _, _, boxes = _texts(crowded_sweep / "results.svg")
    texts = [s for s, _ in boxes]
    assert any(s.startswith("all jobs: ") and "model.frames=5" in s and "seed=3" in s for s in texts)
    labels = [s for s in texts if "dit_quant=" in s]
    assert labels, texts
    for label in labels:
        assert "model.frames" not in label and "seed=" not in label, label
    # every quantized job is named once: on the plot, or in the key under it (its number beside the point)
    named = " ".join(texts)
    for mode in MODES:
        for t5 in ("none", "int8-torch"):
            assert named.count(f"dit_quant={mode}, t5_quant={t5}") == 1, (mode, t5)
    key = [s for s in texts if re.match(r"\d+: dit_quant=", s)]
    numbers = [s for s in texts if s.isdigit()]
    assert len(numbers) >= len(key)


def test_baseline_point_size_legend_and_speed_note(crowded_sweep):
    root, _, boxes = _texts(crowded_sweep / "results.svg")
    texts = [s for s, _ in boxes]
    baseline = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(baseline) == 1 and baseline[0].find(f"{SVG}title").text == "dit_quant=none,t5_quant=none"
    assert "bf16" in texts and "bf16 baseline" in texts and "inf" in texts
    assert "peak host memory" in texts and "(circle area)" in texts
    sizes = sorted(float(c.get("r")) for c in root.iter(f"{SVG}circle") if c.find(f"{SVG}title") is None)
    assert len(sizes) == 2 and sizes[0] < sizes[1], "two reference circles in the size legend"
    legend = [s for s in texts if s.endswith(" GiB")]
    assert legend == ["3 GiB", "0.75 GiB"]
    assert any("not plotted" in s and "1 skipped" in s for s in texts)
    assert any("separate runs" in s for s in texts), "the speedup is said to come from separate runs"
    points = [c for c in root.iter(f"{SVG}circle") if c.find(f"{SVG}title") is not None]
    assert len(points) == 12
    for c in points:  # area proportional to memory: job i peaks at 1 + i % 3 GiB of the 3 GiB maximum
        i = [f"dit_quant={m},t5_quant={t}" for m in MODES for t in ("none", "int8-torch")].index(c.find(f"{SVG}title").text)
        want = sweep_plot.R_MIN + (sweep_plot.R_MAX - sweep_plot.R_MIN) * math.sqrt((1 + i % 3) / 3)
        assert abs(float(c.get("r")) - want) < 0.06


def test_markdown_lists_the_baseline_first(crowded_sweep):
    lines = (crowded_sweep / "results.md").read_text().splitlines()
    assert lines[2].startswith("| dit_quant=none,t5_quant=none | ok |")
    assert len(lines) == 2 + 14


def test_empty_sweep_still_draws_a_whole_picture(tmp_path):
    _job(tmp_path / "a", ["dit_quant=fp8-sgl"], status="skipped")
    report.build(tmp_path)
    _, _, boxes = _texts(tmp_path / "results.svg")
    texts = [s for s, _ in boxes]
    assert "no job has both a speedup and a PSNR yet" in texts
