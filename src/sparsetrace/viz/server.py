"""``sparsetrace view``: a local web viewer over a trace directory (stdlib http.server, threaded).

The page (static/viewer.html) asks for data lazily, so a 1M-token trace opens at once:

    GET /api/meta                      trace facts, available metrics, the first head to show
    GET /api/overview                  per-(layer, head) metrics; filled in layer by layer by a
                                       background thread ("done_layers" says how far), cached
                                       under $SPARSETRACE_HOME/viz/ by trace fingerprint
    GET /api/grid?layer&head&q0&q1&k0&k1&rows&cols&reduce
                                       the aggregated block map of a viewport (views.block_grid):
                                       float32 little-endian body, its header in X-Grid (JSON)
    GET /api/missed?layer&head&q0&q1&rows
                                       what the masks of one head missed per query row, in the
                                       grid's row cells (views.missed_rows), and its audited rows
    GET /api/tokens?t0&t1              text pieces of tokens [t0, t1) (at most 20000)
    GET /api/received?layer&head&q0&q1 mass per key block received from query blocks [q0, q1)
                                       (sparse: kept blocks only)
    GET /api/sources?t0&t1&top&aggregate&residual
                                       what tokens [t0, t1) read through every layer and head
                                       (views.sources_view: block scores, top passages with their
                                       entry per layer); the last few answers are kept

Only loopback addresses are served: the viewer has no authentication.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..errors import UsageError
from . import views

STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}
MAX_TOKENS_PER_REQUEST = 20000
MAX_CELLS = 4096  # per grid side
SOURCES_CACHE = 16  # answers of /api/sources kept (a 1M-token trace takes seconds per span)


class PortInUseError(UsageError):
    """The port is taken (a UsageError, so the CLI prints it as one line, exit 2)."""


def check_loopback(host: str) -> str:
    """`host` if it names a loopback address, else UsageError (the viewer has no auth)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise UsageError(f"--host {host!r} does not resolve; use 127.0.0.1.") from None
    if not infos or not all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos):
        raise UsageError(f"--host {host} is not a loopback address; the viewer serves only "
                         "127.0.0.1 / ::1 (it has no authentication). Use ssh -L to reach it "
                         "from elsewhere.")
    return host


class _Overview:
    """Per-head metrics computed in a background thread, layer by layer, and cached on disk."""

    def __init__(self, trace, analysis: dict[str, np.ndarray], cache_dir: Path | None):
        self.trace, self.analysis = trace, analysis
        L = trace.num_layers
        self.stats: dict[str, np.ndarray] = {}
        self.done, self.error = 0, None
        self.lock, self._stop, self._thread = threading.Lock(), threading.Event(), None
        self.cache_dir = cache_dir
        cached = views.read_stats_cache(trace, cache_dir)
        if cached is not None:
            self.stats, self.done = cached, L

    def start(self) -> None:
        if self.done < self.trace.num_layers and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="overview")
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the layer in progress (a thread killed inside torch at interpreter exit
        aborts the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            for li in range(self.trace.num_layers):
                if self._stop.is_set():
                    return
                part = views.head_stats(self.trace, layers=[li])
                with self.lock:
                    if not self.stats:
                        self.stats = {k: np.full_like(v, np.nan) for k, v in part.items()}
                    for k, v in part.items():
                        self.stats[k][li] = v[li]
                    self.done = li + 1
            views.write_stats_cache(self.trace, self.cache_dir, self.stats)
        except Exception as e:  # noqa: BLE001 -- shown in the page; the viewer keeps working without it
            self.error = f"{type(e).__name__}: {e}"

    def json(self) -> dict:
        with self.lock:
            metrics = {**self.stats, **self.analysis}
            out = {k: views.json_grid(v) for k, v in metrics.items()}
            return {"done_layers": self.done, "num_layers": self.trace.num_layers,
                    "error": self.error, "metrics": out}


class ViewerApp:
    """The state behind the HTTP handler: one trace, its overview, analysis results."""

    def __init__(self, trace, *, anchors=None, niah=None, cache_dir: Path | None = None):
        self.trace = trace
        self.info = views.describe(trace)
        analysis = views.load_analysis(trace, anchors=anchors, niah=niah)
        self.overview = _Overview(trace, analysis, cache_dir)
        self.info["metrics"] = ["sparsity", "entropy", "other", "sink", "diagonal",
                                *analysis.keys()]
        # what the masks missed (traces with an audit; older ones have neither): overview metrics, row strip
        self.info["metrics"] += views.audit_metrics(trace)
        self.info["audit"] = {"has_missed": trace.has_missed, "has_audit": trace.has_audit}
        # first head shown: the top receiver head when anchors results are there, else a middle one
        kurt = analysis.get("kurtosis")
        self.info["default_head"] = (list(views.top_heads({"k": kurt}, 1, by="k")[0])
                                     if kurt is not None and not np.isnan(kurt).all()
                                     else [trace.num_layers // 2, 0])
        self._sources: dict[tuple, bytes] = {}
        self._sources_lock = threading.Lock()

    # every handler returns (status, content type, body bytes, extra headers)
    def meta(self, q):
        return _json(self.info)

    def overview_json(self, q):
        return _json(self.overview.json())

    def grid(self, q):
        g = views.block_grid(self.trace, _int(q, "layer"), _int(q, "head"),
                            _int(q, "q0", None), _int(q, "q1", None),
                            _int(q, "k0", None), _int(q, "k1", None),
                            max_rows=min(MAX_CELLS, _int(q, "rows", 800)),
                            max_cols=min(MAX_CELLS, _int(q, "cols", 800)),
                            reduce=q.get("reduce", ["max"])[0])
        body = np.ascontiguousarray(g.values, dtype="<f4").tobytes()
        return HTTPStatus.OK, "application/octet-stream", body, {"X-Grid": json.dumps(g.header())}

    def missed(self, q):
        return _json(views.missed_rows(self.trace, _int(q, "layer"), _int(q, "head"), _int(q, "q0", None),
                                       _int(q, "q1", None), max_rows=min(MAX_CELLS, _int(q, "rows", 800))))

    def tokens(self, q):
        t0, t1 = _int(q, "t0"), _int(q, "t1")
        t1 = min(t1, t0 + MAX_TOKENS_PER_REQUEST)
        t0, t1 = max(0, t0), min(self.trace.num_tokens, t1)
        pieces = views.token_pieces(self.trace, t0, t1) if t1 > t0 else []
        return _json({"t0": t0, "t1": t0 + len(pieces), "pieces": pieces})

    def received(self, q):
        v = views.received(self.trace, _int(q, "layer"), _int(q, "head"), _int(q, "q0"),
                          _int(q, "q1"))
        nz = np.flatnonzero(v)
        return _json({"blocks": nz.tolist(), "mass": [round(float(x), 7) for x in v[nz]]})


    def sources(self, q):
        aggregate = q.get("aggregate", ["mean"])[0]
        try:
            residual = float(q.get("residual", ["0.5"])[0])
        except ValueError:
            raise ValueError(f"residual={q['residual'][0]!r} is not a number") from None
        key = (_int(q, "t0"), _int(q, "t1"), min(50, _int(q, "top", 8)), aggregate, residual)
        with self._sources_lock:
            body = self._sources.get(key)
        if body is None:
            body = json.dumps(views.sources_view(self.trace, key[0], key[1], top=key[2], aggregate=aggregate,
                                                 residual=residual)).encode()
            with self._sources_lock:
                if len(self._sources) >= SOURCES_CACHE:
                    self._sources.pop(next(iter(self._sources)))
                self._sources[key] = body
        return HTTPStatus.OK, "application/json", body, {}


def _int(q: dict, name: str, default=...):
    if name not in q:
        if default is ...:
            raise ValueError(f"missing query parameter {name}")
        return default
    try:
        return int(q[name][0])
    except ValueError:
        raise ValueError(f"{name}={q[name][0]!r} is not an integer") from None


def _json(obj) -> tuple:
    return HTTPStatus.OK, "application/json", json.dumps(obj).encode(), {}


def _handler(app: ViewerApp, quiet: bool):
    routes = {"/api/meta": app.meta, "/api/overview": app.overview_json, "/api/grid": app.grid,
              "/api/tokens": app.tokens, "/api/received": app.received, "/api/sources": app.sources}

    class Handler(BaseHTTPRequestHandler):
        server_version = "sparsetrace-view"

        def do_GET(self):
            url = urlparse(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    result = self._static("viewer.html")
                elif url.path.startswith("/static/"):
                    result = self._static(url.path[len("/static/"):])
                elif url.path in routes:
                    result = routes[url.path](parse_qs(url.query))
                else:
                    result = (HTTPStatus.NOT_FOUND, "application/json",
                              b'{"error": "not found"}', {})
            except (ValueError, IndexError) as e:
                result = (HTTPStatus.BAD_REQUEST, "application/json",
                          json.dumps({"error": str(e)}).encode(), {})
            status, ctype, body, headers = result
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page moved on (e.g. a newer viewport replaced this request)

        def _static(self, name: str):
            path = (STATIC / name).resolve()
            if path.parent != STATIC.resolve() or not path.is_file():
                return HTTPStatus.NOT_FOUND, "text/plain", b"not found", {}
            return (HTTPStatus.OK, _STATIC_TYPES.get(path.suffix, "application/octet-stream"),
                    path.read_bytes(), {})

        def log_message(self, fmt, *args):
            if not quiet:
                sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    routes["/api/missed"] = app.missed  # the audit: missed mass per query row of one head
    return Handler


def make_server(trace, *, host: str = "127.0.0.1", port: int = 8000, anchors=None, niah=None,
                cache_dir: Path | None = None, quiet: bool = True) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded HTTP server for `trace`; port 0 picks a free one."""
    check_loopback(host)
    app = ViewerApp(trace, anchors=anchors, niah=niah, cache_dir=cache_dir)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        allow_reuse_address = False  # a port in use must say so, not be shared

        def server_close(self):
            super().server_close()
            app.overview.stop()

    try:
        server = Server((host, port), _handler(app, quiet))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} is in use; pass --port another or 0 for a free "
                                 "one.") from None
        if e.errno == errno.EACCES:
            raise UsageError(f"port {port} needs privileges; pass --port above 1023 or 0 "
                                  "for a free one.") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.app = app
    app.overview.start()
    return server


def serve(trace, *, host: str = "127.0.0.1", port: int = 8000, anchors=None, niah=None,
          cache_dir: Path | None = None, quiet: bool = True) -> None:
    """Serve the viewer for `trace` until Ctrl-C; prints the URL first (flushed)."""
    server = make_server(trace, host=host, port=port, anchors=anchors, niah=niah,
                         cache_dir=cache_dir, quiet=quiet)
    h, p = server.server_address[:2]
    url = f"http://[{h}]:{p}/" if ":" in h else f"http://{h}:{p}/"
    print(f"serving {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
