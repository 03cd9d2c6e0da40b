"""`pretrain report DIR ... --serve`: the dashboard over HTTP on 127.0.0.1. The page polls
/page.json every REFRESH_S seconds and redraws its charts in place (Plotly.react, which keeps the
reader's zoom and hidden series); when a chart appears (say, the first MoE record) it reloads."""
from __future__ import annotations

import errno
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


from cluster.charts import figures_json
from cluster.dashboard import Block, MetricsTail, build_blocks, check_dirs, render
from cluster.errors import ClusterError

REFRESH_S = 2.0
WATCHED = ("metrics.jsonl", "report.json", "config.yaml")

LIVE_JS = """<script>
let page = %s, busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch("page.json", {cache: "no-store"});
    const next = await r.json();
    if (next.version === page.version) return;
    const ids = p => JSON.stringify(Object.keys(p.figures).concat(Object.keys(p.html)).sort());
    if (ids(next) !== ids(page)) { location.reload(); return; }
    for (const [id, f] of Object.entries(next.figures)) await Plotly.react(id, f.data, f.layout, CHART_CONFIG);
    for (const [id, html] of Object.entries(next.html))
      if (html !== page.html[id]) document.getElementById(id).innerHTML = html;
    page = next;
    document.getElementById("live-status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {  // the server restarting or gone, or a run dir mid-write: try again on the next tick
  } finally { busy = false; }
}
setInterval(refresh, %d);
</script>"""


class LiveDashboard:
    """Builds the page and its JSON from the dirs, again only when one of their files changed."""

    def __init__(self, dirs: list[Path]):
        check_dirs(dirs)
        self.dirs = dirs
        self.lock = threading.Lock()
        self.version, self.title, self.blocks, self.json = "", "", [], ""
        self.tails: dict[Path, MetricsTail] = {}

    def _read(self, path: Path) -> tuple[list[dict], int]:
        return self.tails.setdefault(path, MetricsTail(path)).read()

    def _inputs_version(self) -> str:
        stats = [(str(p), p.stat().st_mtime_ns, p.stat().st_size)
                 for d in self.dirs for p in (d / name for name in WATCHED) if p.is_file()]
        return hashlib.sha1(repr(stats).encode()).hexdigest()[:16]

    def current(self) -> tuple[str, list[Block], str]:
        """(title, blocks, page JSON), rebuilt only when an input changed: an idle poll costs a few stats."""
        with self.lock:
            version = self._inputs_version()
            if version != self.version:
                self.title, self.blocks = build_blocks(self.dirs, self._read)
                figures = {i: c for i, c in self.blocks if isinstance(c, dict)}
                html = {i: c for i, c in self.blocks if not isinstance(c, dict)}
                self.json = (f'{{"version": {json.dumps(version)}, "figures": {figures_json(figures)}, '
                             f'"html": {json.dumps(html)}}}')
                self.version = version
            return self.title, self.blocks, self.json

    def page_json(self) -> str:
        return self.current()[2]

    def page_html(self) -> str:
        title, blocks, page = self.current()
        status = f'live, refreshed every {REFRESH_S:g} s: <span id="live-status">loaded</span>'
        return render(title, status, blocks, LIVE_JS % (page.replace("</", "<\\/"), int(REFRESH_S * 1000)))


def make_server(dirs: list, port: int) -> ThreadingHTTPServer:
    dashboard = LiveDashboard([Path(d) for d in dirs])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path not in ("/", "/page.json"):
                self.send_error(404)
                return
            body = (dashboard.page_html() if path == "/" else dashboard.page_json()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8" if path == "/" else "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per poll would bury the address the user needs
            pass

    try:
        return ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ClusterError(f"--port {port}: already in use on 127.0.0.1; pick another (0 picks a free one)")
        raise


def serve(dirs: list, port: int) -> None:
    server = make_server(dirs, port)
    print(f"dashboard: http://127.0.0.1:{server.server_address[1]}/  (refreshes every {REFRESH_S:g} s; "
          "Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
