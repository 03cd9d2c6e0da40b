"""`pretrain report`: the HTML is self-contained and complete; in a real headless Chromium the page
loads and every chart region of a tiny Switch run (and of its data run) has something drawn; the
served page redraws as metrics.jsonl grows; several runs overlay; legends fit their charts."""
from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster.cli import main
from cluster.dashboard import MetricsTail, build_report, read_metrics, thin
from tests.cluster.browser import Browser, chromium_path
from tests.cluster.conftest import free_ports
from tests.cluster.png import read_png

REPO = Path(__file__).resolve().parents[2]
CHART = 'class="plot"'  # one per chart div

CHART_BORDER = (227, 227, 227)  # .chart{border:1px solid #e3e3e3}


def write_metrics(run_dir, steps: int = 30, moe: bool = True, torn: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        record = {"step": s, "tokens": 512 * s, "loss": 10 * math.exp(-s / 10) + 3, "lr": 1e-3 * min(1, s / 5),
                  "grad_norm": 1 + 0.1 * math.sin(s), "tokens_per_s": 4000 + 100 * math.cos(s), "mfu": 0.1}
        if moe:
            record.update(aux_loss=1.01, z_loss=0.4, dropped_frac=0.05, moe_layers=[1],
                          expert_load=[[0.4, 0.3, 0.2, 0.1]], dropped_frac_per_layer=[0.05])
        lines.append(json.dumps(record))
    if torn:
        lines.append('{"step": 31, "lo')
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "tiny-switch"}, "data": {"path": str(run_dir / "no-data")},
         "logging": {"wandb_api_key": "sk-secret-value"}}))


def test_run_report_is_self_contained(tmp_path, capsys):
    write_metrics(tmp_path / "run", torn=True)
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "dashboard:" in capsys.readouterr().out
    # Nothing is fetched: no element loads a script, style, image or frame from elsewhere.
    assert not re.findall(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", html)
    assert html.count(CHART) == 5 + 2 + 1  # training charts, MoE losses/dropped, one heatmap per MoE layer
    assert "unparsable lines skipped" in html and "sk-secret-value" not in html


def test_token_shares_by_source_are_charted(tmp_path):
    write_metrics(tmp_path / "run", moe=False)
    path = tmp_path / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["tokens_by_source"] = {"books": 0.3 * r["tokens"], "web": 0.7 * r["tokens"]}
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    html = build_report(tmp_path / "run")
    assert html.count(CHART) == 5 + 1 and "Share of training tokens by source" in html
    assert "books" in html and "web" in html


def test_dense_run_has_no_moe_charts(tmp_path):
    write_metrics(tmp_path / "run", moe=False)
    html = build_report(tmp_path / "run")
    assert html.count(CHART) == 5 and "Expert load" not in html


def test_data_report_charts_sources_and_steps(tmp_path):
    stats = {"docs_in": 10, "docs_out": 7, "removed": {"url:blocklist": 2, "language:fr": 1},
             "bytes_in": 100, "bytes_out": 70, "tokens": 0, "seconds": 0.1}
    report = {"sources": {"web": {"steps": {"read": stats, "filters": stats}},
                          "books": {"steps": {"read": dict(stats, removed={}, docs_out=10)}}},
              "failed_inputs": [{"source": "web", "path": "x.warc.gz", "error": "truncated gzip"}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    html = build_report(tmp_path)
    assert html.count(CHART) == 2 and "url:blocklist" in html and "truncated gzip" in html


def test_a_directory_without_metrics_or_report_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run dir" in capsys.readouterr().err


def chart_boxes(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each chart's 1px border in the screenshot."""
    border = np.all(img[..., :3] == CHART_BORDER, axis=-1)
    boxes = []
    for y in np.nonzero(border.sum(axis=1) >= 500)[0]:
        xs = np.nonzero(border[y])[0]
        for run in np.split(xs, np.nonzero(np.diff(xs) != 1)[0] + 1):
            if len(run) < 500:
                continue
            x0, x1 = run[0], run[-1]
            y1 = y
            while y1 + 1 < len(border) and border[y1 + 1, x0] and border[y1 + 1, x1]:
                y1 += 1
            if y1 - y > 100:
                boxes.append((x0, y, x1, y1))
    return boxes


def drawn_pixels(img: np.ndarray, box: tuple[int, int, int, int]) -> int:
    """Saturated pixels inside a box: lines, bars and heatmap cells (axes and text are grey)."""
    x0, y0, x1, y1 = box
    inner = img[y0 + 30:y1 - 30, x0 + 60:x1 - 10, :3].astype(int)
    return int(((inner.max(axis=-1) - inner.min(axis=-1)) > 60).sum())


@pytest.mark.slow
def test_report_of_a_tiny_switch_run_renders_in_chromium(train_job, data_job, tmp_path):
    chromium = chromium_path()
    assert train_job.state == "SUCCEEDED", train_job.printed[-3000:]
    assert main(["report", str(train_job.output_dir), "--out", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    # training, token shares by source, MoE, heatmaps, data run
    expected = 5 + 1 + 2 + html.count('id="run0-load-layer') + 2
    assert "Share of training tokens by source" in html
    assert "Expert load, layer 1" in html and "Documents per source" in html
    shot = tmp_path / "shot.png"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1240,4200", "--virtual-time-budget=10000", f"--screenshot={shot}", f"file://{tmp_path / 'report.html'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    img = read_png(shot)
    boxes = chart_boxes(img)
    assert len(boxes) == expected, (len(boxes), expected)
    blank = [b for b in boxes if drawn_pixels(img, b) < 50]
    assert not blank, f"charts with nothing drawn at {blank}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


def append_metrics(run_dir, first: int, last: int) -> None:
    """Steps whose loss climbs: the loss chart's y range and line both change."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        for s in range(first, last + 1):
            f.write(json.dumps({"step": s, "tokens": 512 * s, "loss": float(s), "lr": 1e-3, "grad_norm": 1.0,
                                "tokens_per_s": 4000.0, "mfu": 0.1}) + "\n")


@pytest.mark.slow
def test_served_dashboard_redraws_as_metrics_grow(tmp_path, browser):
    run = tmp_path / "run"
    write_metrics(run, steps=10, moe=False)
    port = free_ports(1)[0]
    server = subprocess.Popen([sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())",
                               "report", str(run), "--serve", "--port", str(port)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
        browser.open(f"http://127.0.0.1:{port}/")
        loss_points = "document.getElementById('train-loss').data[0].x.length"
        assert browser.evaluate(loss_points) == 10
        browser.evaluate("Plotly.relayout('train-lr', {'xaxis.range': [2, 6]}).then(() => true)")  # the reader zooms in
        before = browser.screenshot("#train-loss .nsewdrag")
        append_metrics(run, 11, 40)
        browser.wait_for(f"{loss_points} === 40 && document.getElementById('live-status').textContent !== 'loaded'")
        after = browser.screenshot("#train-loss .nsewdrag")
        assert before.shape == after.shape
        assert np.any(before != after, axis=-1).mean() > 0.01, "the loss chart's plot area did not change"
        assert browser.evaluate("document.getElementById('train-lr').layout.xaxis.range") == [2, 6]
        assert "40" in browser.evaluate("document.getElementById('training-summary').textContent")
    finally:
        server.terminate()
        server.wait(timeout=30)


def interrogate_loss_chart(browser) -> None:
    """What a reader does, with real mouse events: hover shows both runs' values at a step, a drag
    zooms into a step range, a click on a legend entry hides that run."""
    browser.evaluate("window.scrollTo(0, 0)")
    x, y = browser.centre("#train-loss .nsewdrag")
    browser.mouse("mouseMoved", x, y)
    hover = browser.wait_for("document.querySelector('#train-loss .hoverlayer').textContent")
    assert "run-a" in hover and "run-b" in hover and re.search(r"\d\.\d", hover), hover
    browser.mouse("mousePressed", x - 100, y)
    browser.mouse("mouseMoved", x - 20, y + 2)
    browser.mouse("mouseMoved", x + 60, y + 2)
    browser.mouse("mouseReleased", x + 60, y + 2)
    lo, hi = browser.wait_for("document.getElementById('train-loss').layout.xaxis.autorange === false"
                              " && document.getElementById('train-loss').layout.xaxis.range")
    assert 1 < lo < hi < 30 and hi - lo < 15, (lo, hi)
    browser.mouse("mouseMoved", *browser.centre("#train-loss .legend .traces .legendtoggle"))
    browser.mouse("mousePressed", *browser.centre("#train-loss .legend .traces .legendtoggle"))
    browser.mouse("mouseReleased", *browser.centre("#train-loss .legend .traces .legendtoggle"))
    assert browser.wait_for("document.getElementById('train-loss').data.map(t => t.visible || true).join()"
                            " === 'legendonly,true' && 'hidden'") == "hidden"


@pytest.mark.slow
def test_overlay_has_a_series_per_run_and_legends_fit(tmp_path, browser):
    write_metrics(tmp_path / "run-a")
    write_metrics(tmp_path / "run-b", moe=False)
    reasons = {f"quality:gopher_repetition_rule_{i}": i + 1 for i in range(9)}
    stats = {"docs_in": 100, "docs_out": 50, "removed": reasons}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "report.json").write_text(json.dumps({"sources": {"web": {"steps": {"filters": stats}}}}))
    dirs = [str(tmp_path / d) for d in ("run-a", "run-b", "data")]
    assert main(["report", *dirs]) == 0
    browser.open(f"file://{tmp_path / 'compare.html'}")
    for chart in ("loss", "lr", "tokens_per_s", "mfu"):
        assert browser.evaluate(f"document.getElementById('train-{chart}').data.map(t => t.name)") == ["run-a", "run-b"]
        legend = f"[...document.querySelectorAll('#train-{chart} .legendtext')].map(e => e.textContent)"
        assert browser.evaluate(legend) == ["run-a", "run-b"]
    interrogate_loss_chart(browser)
    entries = browser.evaluate("[...document.querySelectorAll('#data0-sources .legendtext')].map(e => e.textContent)")
    assert sorted(entries) == sorted(["kept", *reasons])  # whole labels, none cut short
    # Every legend entry and axis label lies inside its chart, and no legend needed a scrollbar to fit.
    outside = browser.evaluate("""[...document.querySelectorAll('.plot')].flatMap(p => {
        const b = p.getBoundingClientRect();
        return [...p.querySelectorAll('.legendtext, .ytick text, .xtick text')].filter(e => {
            const r = e.getBoundingClientRect();
            return r.left < b.left || r.right > b.right || r.top < b.top || r.bottom > b.bottom;
        }).map(e => p.id + ': ' + e.textContent)
          .concat([...p.querySelectorAll('.legend .scrollbar')].filter(s => s.getBoundingClientRect().height > 0)
                  .map(() => p.id + ': legend scrolls'));
    })""")
    assert outside == []


def test_serve_flags_that_conflict_are_named(tmp_path, capsys):
    write_metrics(tmp_path / "run", moe=False)
    assert main(["report", str(tmp_path / "run"), "--port", "8123"]) == 2
    assert "--port is the port for --serve" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "--serve", "--out", str(tmp_path / "x.html")]) == 2
    assert "--out writes a file and --serve" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), str(tmp_path / "missing")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err


def test_serving_on_a_port_in_use_is_a_clear_error(tmp_path, capsys):
    write_metrics(tmp_path / "run", moe=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["report", str(tmp_path / "run"), "--serve", "--port", str(port)]) == 2
    assert f"--port {port}: already in use" in capsys.readouterr().err


def test_a_tail_of_metrics_reads_what_a_fresh_read_does(tmp_path):
    """The live server parses only appended lines; each read must equal reading the file anew."""
    write_metrics(tmp_path / "run", steps=10, moe=False)
    path = tmp_path / "run" / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == read_metrics(path) and len(tail.read()[0]) == 10
    append_metrics(tmp_path / "run", 11, 15)
    with open(path, "a") as f:
        f.write('{"step": 16, "loss": 2.0')  # a line still being written
    assert tail.read() == read_metrics(path) and tail.read()[1] == 1
    with open(path, "a") as f:
        f.write("}\n")
    assert tail.read() == read_metrics(path) and tail.read()[0][-1] == {"step": 16, "loss": 2.0}
    write_metrics(tmp_path / "run", steps=3, moe=False)  # the run dir started over
    assert tail.read() == read_metrics(path) and len(tail.read()[0]) == 3


def test_long_runs_are_thinned_for_charts_but_keep_the_last_step():
    records = [{"step": s} for s in range(1, 10_001)]
    thinned = thin(records, limit=2000)
    assert len(thinned) <= 2001 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 10_000
    assert thin(records[:50], limit=2000) == records[:50]
