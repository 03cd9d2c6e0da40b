"""Inline SVG charts for the HTML report: line charts, heatmaps and stacked bars, written as text
so the page needs no script, no library and no network to show them."""
from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 560, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 30, 40
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def fmt(value: float) -> str:
    """Short tick labels: 3 significant digits, SI suffixes for large values."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if magnitude >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _frame(title: str, body: list[str], extra_height: int = 0) -> str:
    height = HEIGHT + extra_height
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">'
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>'
            f'<text x="{MARGIN_L}" y="18" class="title">{escape(title)}</text>' + "".join(body) + "</svg>")


def _axes(x_ticks: list[float], y_ticks: list[float], sx, sy, x_label: str) -> list[str]:
    out = []
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line x1="{MARGIN_L}" x2="{WIDTH - MARGIN_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{MARGIN_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - MARGIN_B + 16}" class="tick" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<text x="{(MARGIN_L + WIDTH - MARGIN_R) / 2}" y="{HEIGHT - 6}" class="tick" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{WIDTH - MARGIN_L - MARGIN_R}" '
               f'height="{HEIGHT - MARGIN_T - MARGIN_B}" class="plotarea"/>')
    return out


def line_chart(title: str, series: list[tuple[str, list[float], list[float], str]], x_label: str = "step") -> str:
    """series: (label, xs, ys, colour); points with a non-finite y are left out."""
    points = [[(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)] for _, xs, ys, _ in series]
    flat = [p for ps in points for p in ps]
    if not flat:
        return _frame(title, [f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="tick" text-anchor="middle">'
                              "no data</text>"])
    x_ticks = nice_ticks(min(p[0] for p in flat), max(p[0] for p in flat))
    y_ticks = nice_ticks(min(p[1] for p in flat), max(p[1] for p in flat))
    sx = _scale(x_ticks[0], x_ticks[-1], MARGIN_L, WIDTH - MARGIN_R)
    sy = _scale(y_ticks[0], y_ticks[-1], HEIGHT - MARGIN_B, MARGIN_T)
    body = _axes(x_ticks, y_ticks, sx, sy, x_label)
    for i, ((label, _, _, colour), ps) in enumerate(zip(series, points)):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ps)
        if len(ps) == 1:
            body.append(f'<circle cx="{sx(ps[0][0]):.1f}" cy="{sy(ps[0][1]):.1f}" r="3" fill="{colour}"/>')
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
                    f"<title>{escape(label)}</title></polyline>")
        if len(series) > 1:
            body.append(f'<text x="{WIDTH - MARGIN_R - 4}" y="{MARGIN_T + 14 + 14 * i}" class="legend" '
                        f'text-anchor="end" fill="{colour}">{escape(label)}</text>')
    return _frame(title, body)


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def heat_colour(value: float) -> str:
    """White (0) to deep blue (1): load fractions read as darker = busier expert."""
    v = min(max(value, 0.0), 1.0)
    r, g, b = (round(255 - v * (255 - c)) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(title: str, steps: list[float], rows: list[list[float]], row_label: str = "expert") -> str:
    """rows[t][e]: value at step t for row e (expert load fractions), one column per logged step."""
    if not rows:
        return line_chart(title, [])
    n_rows = len(rows[0])
    peak = max((v for r in rows for v in r), default=1.0) or 1.0
    x0, x1, y0, y1 = MARGIN_L, WIDTH - MARGIN_R, MARGIN_T, HEIGHT - MARGIN_B
    cw, ch = (x1 - x0) / len(rows), (y1 - y0) / n_rows
    body = []
    for t, row in enumerate(rows):
        for e, v in enumerate(row):
            body.append(f'<rect x="{x0 + t * cw:.2f}" y="{y0 + e * ch:.2f}" width="{cw + 0.5:.2f}" '
                        f'height="{ch + 0.5:.2f}" fill="{heat_colour(v / peak)}"><title>step {fmt(steps[t])} '
                        f'{row_label} {e}: {v:.3f}</title></rect>')
    for e in range(n_rows):
        if n_rows <= 16 or e % math.ceil(n_rows / 16) == 0:
            body.append(f'<text x="{x0 - 6}" y="{y0 + (e + 0.7) * ch:.1f}" class="tick" text-anchor="end">{e}</text>')
    for t in sorted({0, len(rows) // 2, len(rows) - 1}):
        body.append(f'<text x="{x0 + (t + 0.5) * cw:.1f}" y="{y1 + 16}" class="tick" text-anchor="middle">'
                    f"{fmt(steps[t])}</text>")
    body.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 6}" class="tick" text-anchor="middle">step '
                f"(darkest = {peak:.3f} of routed tokens)</text>")
    return _frame(title, body)


def stacked_bars(title: str, labels: list[str], parts: list[tuple[str, list[float], str]]) -> str:
    """One horizontal bar per label, split into parts (name, value per label, colour)."""
    height_extra = max(0, 22 * len(labels) - (HEIGHT - MARGIN_T - MARGIN_B))
    totals = [sum(values[i] for _, values, _ in parts) for i in range(len(labels))]
    peak = max(totals, default=0) or 1.0
    left, right = 150, WIDTH - MARGIN_R
    body = []
    for i, label in enumerate(labels):
        y, x = MARGIN_T + 8 + 22 * i, float(left)
        body.append(f'<text x="{left - 6}" y="{y + 12}" class="tick" text-anchor="end">{escape(label[:22])}</text>')
        for name, values, colour in parts:
            w = values[i] / peak * (right - left)
            if w > 0:
                body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="16" fill="{colour}">'
                            f"<title>{escape(label)} {escape(name)}: {fmt(values[i])}</title></rect>")
            x += w
    legend_y = MARGIN_T + 8 + 22 * len(labels) + 14
    for j, (name, _, colour) in enumerate(parts):  # four legend entries to a row
        body.append(f'<text x="{MARGIN_L + 120 * (j % 4)}" y="{legend_y + 14 * (j // 4)}" class="legend" '
                    f'fill="{colour}">\u25a0 {escape(name[:18])}</text>')
    return _frame(title, body, extra_height=height_extra + 14 * (len(parts) // 4) + 10)
