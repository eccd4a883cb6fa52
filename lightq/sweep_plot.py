"""``results.svg``: a sweep's quality against its speed, one point per job, drawn to be put in a report.

x: the denoising speedup against bf16 (the table's ``speedup``), y: PSNR of the decoded video against bf16 (dB).
Circle area is proportional to peak memory (GPU where every plotted job measured it, else host), with a size
legend. The bf16 baseline (PSNR infinite) sits on its own band above the plot at speedup 1. Overrides that every
job shares go to the subtitle; each label holds only what differs between jobs.

Labels are placed, in order of the points, at the first of a ring of positions around their point that overlaps
no other label, marker, legend or edge; a label with no free position goes to a numbered key under the plot, its
number beside the point. Text is monospace, so a label's extent is exact arithmetic (``text_box``), which is also
how the tests check that no two texts overlap.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
CHAR_W = 0.61  # advance width of a monospace glyph, in em (DejaVu Sans Mono: 0.602)
ASCENT, DESCENT = 0.8, 0.25  # of the font size, above and below the baseline
FS, FS_SMALL, FS_TITLE = 11, 10, 14
W = 820
LEFT, RIGHT = 64, 170  # margins: y tick labels / size legend
R_MIN, R_MAX = 4.0, 16.0
SPEED_NOTE = ("speedup: the bf16 job's denoising time over each job's, from separate runs; on a shared machine "
              "that ratio is noise (python -m lightq.bench measures speed within one run)")

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def text_box(x: float, y: float, text: str, size: float, anchor: str = "start") -> Box:
    """Extent of ``text`` drawn at (x, y) (y = baseline) in the monospace font."""
    w = len(text) * CHAR_W * size
    x0 = {"start": x, "middle": x - w / 2, "end": x - w}[anchor]
    return x0, y - ASCENT * size, x0 + w, y + DESCENT * size


def overlaps(a: Box, b: Box, gap: float = 1.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def inside(a: Box, area: Box) -> bool:
    return area[0] <= a[0] and a[2] <= area[2] and area[1] <= a[1] and a[3] <= area[3]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1) or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_text(v: float, step: float) -> str:
    """``v`` with as many decimals as the tick step needs (step 0.25 -> 2, 5 -> 0)."""
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}"


def _wrap(text: str, size: float, width: float) -> list[str]:
    per_line = max(10, int(width / (CHAR_W * size)))
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def split_overrides(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(overrides every row shares, in order; per row the label: its overrides that differ, or its job name)."""
    per_row = [list(r.get("overrides") or []) for r in rows]
    shared = [o for o in per_row[0] if all(o in ov for ov in per_row)] if per_row else []
    labels = [", ".join(o for o in ov if o not in shared) or r["job"] for ov, r in zip(per_row, rows)]
    return shared, labels


class _Canvas:
    def __init__(self):
        self.parts: list[str] = []
        self.taken: list[Box] = []

    def text(self, x, y, s, size=FS, anchor="start", reserve=True, **attrs) -> Box:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
                          f'{escape(s)}</text>')
        box = text_box(x, y, s, size, anchor)
        if reserve:
            self.taken.append(box)
        return box

    def add(self, element: str) -> None:
        self.parts.append(element)

    def free(self, box: Box, area: Box) -> bool:
        return inside(box, area) and not any(overlaps(box, t) for t in self.taken)


def _label_candidates(px: float, py: float, rad: float):
    """(gap, x, y, anchor) positions around a point, nearest first: right, left, above, below, the diagonals."""
    for gap in (3, 10, 20, 34, 52):
        r = rad + gap
        yield gap, px + r, py + FS * 0.35, "start"
        yield gap, px - r, py + FS * 0.35, "end"
        yield gap, px, py - r, "middle"
        yield gap, px, py + r + FS * ASCENT, "middle"
        d = r * 0.72
        yield gap, px + d, py - d, "start"
        yield gap, px - d, py - d, "end"
        yield gap, px + d, py + d + FS * ASCENT, "start"
        yield gap, px - d, py + d + FS * ASCENT, "end"


def _place(c: _Canvas, px: float, py: float, rad: float, label: str, area: Box, **attrs) -> float | None:
    """Draw ``label`` at the first free position around the point; its gap from the marker, or None if none."""
    for gap, x, y, anchor in _label_candidates(px, py, rad):
        if c.free(text_box(x, y, label, FS, anchor), area):
            c.text(x, y, label, FS, anchor, **attrs)
            return gap
    return None


def render(rows: list[dict]) -> str:
    """The svg for the table ``rows`` (lightq.report.row dicts, plus their ``overrides``)."""
    plotted = [r for r in rows if isinstance(r.get("speedup"), (int, float)) and math.isfinite(r["speedup"])
               and (r.get("baseline") or isinstance(r.get("psnr_db"), (int, float)) and math.isfinite(r["psnr_db"]))]
    base = [r for r in plotted if r.get("baseline")]
    points = [r for r in plotted if not r.get("baseline")]
    shared, labels = split_overrides(plotted) if plotted else ([], [])
    label_of = {id(r): lab for r, lab in zip(plotted, labels)}
    use_gpu = bool(plotted) and all(r.get("peak_gpu_gib") for r in plotted)
    mem_key, mem_name = ("peak_gpu_gib", "GPU") if use_gpu else ("peak_host_gib", "host")
    mems = [r.get(mem_key) or 0.0 for r in plotted]
    mmax = max(mems + [0.0])

    c = _Canvas()
    y = 22
    c.text(LEFT, y, "Quality against speed, every job of the sweep against bf16", FS_TITLE, font_weight="bold")
    sub = ("all jobs: " + " ".join(shared)) if shared else "jobs differ in every override shown"
    for line in _wrap(sub, FS_SMALL, W - LEFT - 20):
        y += FS_SMALL + 5
        c.text(LEFT, y, line, FS_SMALL, fill="#444")
    top = y + 16
    band = top + 22  # the baseline band: PSNR = infinity
    plot_h = 300
    py0, py1 = band + 14, band + 14 + plot_h
    px0, px1 = LEFT, W - RIGHT
    plot_area: Box = (px0, top, px1, py1)

    xs = [r["speedup"] for r in plotted] + [1.0]
    x_span = max(max(xs) - min(xs), 0.05 * max(xs))
    x_lo, x_hi = min(xs) - 0.06 * x_span, max(xs) + 0.06 * x_span
    ys = [r["psnr_db"] for r in points] or [0.0, 1.0]
    y_span = max(max(ys) - min(ys), 2.0)
    y_lo, y_hi = min(ys) - 0.06 * y_span, max(ys) + 0.06 * y_span
    x_ticks, y_ticks = nice_ticks(x_lo, x_hi), nice_ticks(y_lo, y_hi)
    inset = R_MAX + 4  # the data range maps inside the frame by this many pixels: no marker crosses it

    def sx(v):
        return px0 + inset + (v - x_lo) / (x_hi - x_lo) * (px1 - px0 - 2 * inset)

    def sy(v):
        return py1 - inset - (v - y_lo) / (y_hi - y_lo) * (py1 - py0 - 2 * inset)

    def radius(m):
        return R_MIN + (R_MAX - R_MIN) * math.sqrt(m / mmax) if mmax > 0 else R_MIN

    # frame, grid, ticks
    c.add(f'<rect x="{px0}" y="{py0}" width="{px1 - px0}" height="{py1 - py0}" fill="none" stroke="#888"/>')
    c.add(f'<line x1="{px0}" y1="{band}" x2="{px1}" y2="{band}" stroke="#bbb" stroke-dasharray="4 3"/>')
    c.text(px0 - 6, band + FS * 0.35, "inf", FS_SMALL, "end", fill="#444")
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for v in x_ticks:
        if px0 <= sx(v) <= px1:
            c.add(f'<line x1="{sx(v):.1f}" y1="{py0}" x2="{sx(v):.1f}" y2="{py1}" stroke="#eee"/>')
            c.text(sx(v), py1 + 15, _tick_text(v, x_step), FS_SMALL, "middle")
    for v in y_ticks:
        if py0 <= sy(v) <= py1:
            c.add(f'<line x1="{px0}" y1="{sy(v):.1f}" x2="{px1}" y2="{sy(v):.1f}" stroke="#eee"/>')
            c.text(px0 - 6, sy(v) + FS * 0.35, _tick_text(v, y_step), FS_SMALL, "end")
    c.add(f'<line x1="{sx(1.0):.1f}" y1="{band}" x2="{sx(1.0):.1f}" y2="{py1}" stroke="#999" stroke-dasharray="2 3"/>')
    c.text((px0 + px1) / 2, py1 + 32, "denoising speedup against bf16 (x, higher is faster)", FS, "middle")
    c.add(f'<text x="16" y="{(py0 + py1) / 2:.1f}" font-size="{FS}" text-anchor="middle" '
          f'transform="rotate(-90 16 {(py0 + py1) / 2:.1f})">PSNR against bf16 (dB, higher is closer)</text>')

    # size legend, right margin
    lx = px1 + 24
    ly = py0 + 4
    c.text(lx, ly + FS, f"peak {mem_name} memory", FS_SMALL)
    c.text(lx, ly + FS + FS_SMALL + 3, "(circle area)", FS_SMALL, fill="#444")
    ly += FS + 2 * FS_SMALL + 14
    if mmax > 0:
        for m in sorted({mmax, mmax / 4}, reverse=True):
            r = radius(m)
            c.add(f'<circle cx="{lx + R_MAX:.1f}" cy="{ly + r:.1f}" r="{r:.1f}" fill="steelblue" fill-opacity="0.45" '
                  f'stroke="steelblue"/>')
            c.text(lx + 2 * R_MAX + 8, ly + r + FS * 0.35, f"{m:.3g} GiB", FS_SMALL)
            ly += 2 * r + 8
    c.add(f'<rect x="{lx + R_MAX - 5:.1f}" y="{ly:.1f}" width="10" height="10" fill="black" '
          f'transform="rotate(45 {lx + R_MAX:.1f} {ly + 5:.1f})"/>')
    c.text(lx + 2 * R_MAX + 8, ly + 5 + FS * 0.35, "bf16 baseline", FS_SMALL)

    # markers first (labels must avoid all of them), then labels
    marks = []
    for r in base:
        x, yy = sx(1.0), band
        c.add(f'<rect x="{x - 5:.1f}" y="{yy - 5:.1f}" width="10" height="10" fill="black" '
              f'transform="rotate(45 {x:.1f} {yy:.1f})"><title>{escape(r["job"])}</title></rect>')
        c.taken.append((x - 7, yy - 7, x + 7, yy + 7))
        marks.append((x, yy, 7.0, "bf16" if len(base) == 1 else f"bf16: {label_of[id(r)]}"))
    for r in sorted(points, key=lambda r: (-r["psnr_db"], r["speedup"])):
        x, yy, rad = sx(r["speedup"]), sy(r["psnr_db"]), radius(r.get(mem_key) or 0.0)
        c.add(f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="{rad:.1f}" fill="steelblue" fill-opacity="0.45" '
              f'stroke="steelblue"><title>{escape(r["job"])}</title></circle>')
        c.taken.append((x - rad, yy - rad, x + rad, yy + rad))
        marks.append((x, yy, rad, label_of[id(r)]))
    key = []
    for x, yy, rad, label in marks:
        placed = _place(c, x, yy, rad, label, plot_area)
        if placed is None:
            key.append(label)
            placed = _place(c, x, yy, rad, str(len(key)), plot_area, font_weight="bold")
        if placed is not None and placed > 3:  # away from its point: a leader line says whose label it is
            bx0, by0, bx1, by1 = c.taken[-1]
            tx, ty = min(max(x, bx0), bx1), min(max(yy, by0), by1)
            d = math.hypot(tx - x, ty - yy) or 1.0
            c.add(f'<line x1="{x + (tx - x) * rad / d:.1f}" y1="{yy + (ty - yy) * rad / d:.1f}" x2="{tx:.1f}" '
                  f'y2="{ty:.1f}" stroke="#999" stroke-width="0.7"/>')

    # below the plot: the key of unplaced labels, what was not plotted, the note on speed
    y = py1 + 52
    notes = [f"{i}: {lab}" for i, lab in enumerate(key, 1)]
    if not plotted:
        notes.append("no job has both a speedup and a PSNR yet")
    plotted_ids = {id(r) for r in plotted}
    left_out = [r for r in rows if id(r) not in plotted_ids]
    if left_out:
        by_status: dict[str, int] = {}
        for r in left_out:
            by_status[r.get("status") or "?"] = by_status.get(r.get("status") or "?", 0) + 1
        notes.append("not plotted (see results.md): " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())))
    notes.append(SPEED_NOTE)
    for note in notes:
        for line in _wrap(note, FS_SMALL, W - LEFT - 20):
            c.text(LEFT, y, line, FS_SMALL, fill="#444")
            y += FS_SMALL + 5
    h = int(y + 10)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" '
            f'font-family="{FONT}">\n<rect width="{W}" height="{h}" fill="white"/>')
    return "\n".join([head, *c.parts, "</svg>"]) + "\n"
