"""Interactive charts for the HTML report, drawn by plotly.js: hover for values, drag to zoom into a
step range (double-click resets), click a legend entry to toggle its series. plotly.js is inlined
once per page (`plotly_script`), so a report opens with no network. A chart is a plotly figure as
a plain dict ({"data": [traces], "layout": {...}}, plotly's JSON schema): plotly.py's figure objects
validate and copy every point, seconds per refresh for a long run."""
from __future__ import annotations

import json
import math
from typing import Optional

import plotly.io as pio
from plotly.offline import get_plotlyjs

WIDTH, HEIGHT = 580, 320
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
# The browser-side options of every chart: no plotly logo (a link off the page), no cloud export.
CONFIG = {"displaylogo": False, "responsive": False, "showLink": False,
          "modeBarButtonsToRemove": ["select2d", "lasso2d"]}
# Legends sit under the plot, in rows: plotly wraps them and grows the margin, so labels never clip.
LEGEND = {"orientation": "h", "x": 0, "xanchor": "left", "y": -0.18, "yanchor": "top"}


def _layout(title: str, x_label: str, height: int = HEIGHT, **extra) -> dict:
    # uirevision: a live refresh (Plotly.react) keeps the reader's zoom and hidden series.
    return {"title": {"text": title, "font": {"size": 14}, "x": 0.02}, "plot_bgcolor": "#ffffff",
            "width": WIDTH, "height": height, "margin": {"l": 64, "r": 20, "t": 40, "b": 44},
            "xaxis": {"title": {"text": x_label}}, "hovermode": "x unified", "legend": LEGEND,
            "uirevision": title, **extra}


def _finite(ys: list[Optional[float]]) -> list[Optional[float]]:
    return [y if y is not None and math.isfinite(y) else None for y in ys]


def line_chart(title: str, series: list[tuple[str, list[float], list[Optional[float]], str]],
               x_label: str = "step") -> dict:
    """series: (label, xs, ys, colour); a None or non-finite y is a gap. The legend shows when there
    is more than one series."""
    traces = [{"type": "scatter", "x": xs, "y": _finite(ys), "name": label, "line": {"color": colour, "width": 2},
               "mode": "lines+markers" if len(xs) < 2 else "lines"} for label, xs, ys, colour in series]
    extra = {} if len(series) > 1 else {"showlegend": False}
    return {"data": traces, "layout": _layout(title, x_label, **extra)}


def heatmap(title: str, steps: list[float], rows: list[list[float]], row_label: str = "expert") -> dict:
    """rows[t][e]: value at step t for row e (expert load fractions); darker = busier."""
    z = [list(col) for col in zip(*rows)] if rows else []
    trace = {"type": "heatmap", "x": steps, "y": list(range(len(z))), "z": z, "zmin": 0,
             "colorscale": [[0, "#f7fbff"], [1, "#08306b"]], "colorbar": {"thickness": 12, "title": {"text": "share", "side": "right"}},
             "hovertemplate": f"step %{{x}}<br>{row_label} %{{y}}: %{{z:.3f}}<extra></extra>"}
    return {"data": [trace], "layout": _layout(title, "step", hovermode="closest",
                                               yaxis={"title": {"text": row_label}, "dtick": 1 if len(z) <= 16 else None})}


def stacked_bars(title: str, labels: list[str], parts: list[tuple[str, list[float], str]]) -> dict:
    """One horizontal bar per label, split into parts (name, value per label, colour)."""
    traces = [{"type": "bar", "y": labels, "x": values, "name": name, "orientation": "h", "marker": {"color": colour},
               "hovertemplate": f"%{{y}} {name}: %{{x:,}}<extra></extra>"} for name, values, colour in parts]
    height = HEIGHT + 24 * max(0, len(labels) - 6) + 18 * (len(parts) // 3)
    return {"data": traces, "layout": _layout(title, "documents", height=height, barmode="stack", hovermode="closest",
                                              yaxis={"autorange": "reversed", "automargin": True},
                                              legend={**LEGEND, "traceorder": "normal"})}  # stacks reverse it


def figures_json(figures: dict[str, dict]) -> str:
    """{div id: {data, layout}} as JSON that is safe inside a <script> element (NaN becomes null)."""
    return pio.to_json(figures, validate=False).replace("</", "<\\/")


def plotly_script() -> str:
    return f"<script>{get_plotlyjs()}</script>"


def draw_script(figures: dict[str, dict]) -> str:
    """Draws every chart div from the figures embedded in the page."""
    return (f'<script id="figures" type="application/json">{figures_json(figures)}</script>'
            f"<script>const CHART_CONFIG = {json.dumps(CONFIG)};"
            "const FIGURES = JSON.parse(document.getElementById('figures').textContent);"
            "for (const [id, f] of Object.entries(FIGURES)) Plotly.newPlot(id, f.data, f.layout, CHART_CONFIG);"
            "</script>")
