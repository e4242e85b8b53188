"""Viewer benchmark: time from navigation to the first block map drawn, in headless Chromium.

    python bench/viewer.py            # 20k and 1M-token synthetic traces (28 layers x 12 heads)
    python bench/viewer.py --no-synthetic --trace gpu-8k=DIR ...   # trace directories already written

The 1M-token trace (1,048,544 tokens = 32767 blocks of 32, the int16 limit; 28 x 12 heads,
top_k 16, ~0.7 GB) is written once into $SPARSETRACE_HOME/bench/trace-1m (about a minute) and
reused. For each trace `sparsetrace view` runs as a subprocess; each page load is timed by the
page itself: `window.__sparsetraceFirstDraw` is `performance.now()` (ms since navigation start)
when the block map is first drawn. The first load after the server starts is "cold"; then
"warm" loads, a wheel zoom (time to the redrawn map), and the server's grid endpoint alone.
The browser is Debian's headless chromium driven by Playwright (``$SPARSETRACE_CHROMIUM`` or
``chromium`` on the PATH; `make browser` installs it). Prints a table, writes
bench/results/viewer.json (viewer_traces.json with --no-synthetic; --out elsewhere), ends with one
JSON line.

    python bench/viewer.py --no-synthetic --trace gpu-300=tests/data/smollm2-300-gpu --loads 2 \
        --out /tmp/viewer.json     # a quick check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from sparsetrace.tracing.models import cache_home
from sparsetrace.viz.synthetic import write_synthetic_trace

RESULTS = Path(__file__).with_name("results") / "viewer.json"
BUDGET_S = 5.0
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """Debian's chromium ($SPARSETRACE_CHROMIUM wins); exits with a message when there is none."""
    path = os.environ.get("SPARSETRACE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        sys.exit(f"no chromium at {path}: run `make browser` (or `apt-get install chromium`), or "
                 "point $SPARSETRACE_CHROMIUM at a Chromium binary")
    return path


def new_page(browser):
    """A page at 1400 x 1000 and the list of its errors (console errors, exceptions, failed
    requests, HTTP errors)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("console", lambda m: m.type in ("error", "assert")
            and errors.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda exc: errors.append(f"exception: {exc}"))
    page.on("requestfailed", lambda r: errors.append(f"failed request: {r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400
            and errors.append(f"response: status of {r.status} for {r.url}"))
    return page, errors


def wait_for(page, expression: str, timeout: float = 60.0, polling: int = 50):
    """Poll a JS expression until truthy; its value."""
    handle = page.wait_for_function(expression, timeout=timeout * 1e3, polling=polling)
    try:
        return handle.json_value()
    finally:
        handle.dispose()


def ensure_trace(path: Path, tokens: int, layers: int, heads: int, top_k: int):
    from sparsetrace import Trace
    from sparsetrace.store import TraceError

    try:
        return Trace.load(path, verify=False)
    except TraceError:
        print(f"writing a {tokens:,}-token synthetic trace to {path} (once) ...", flush=True)
        return write_synthetic_trace(path, num_tokens=tokens, num_layers=layers, num_heads=heads,
                                     top_k=top_k, block_size=32, progress=True)


def start_view(path: Path):
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrace.cli", "view", str(path),
                             "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(180)
    m = re.search(r"http://\S+/", line[0] if line else "")
    if m is None:
        proc.kill()
        raise RuntimeError(f"sparsetrace view did not start: {line}")
    return proc, m.group(0)


def measure(browser, url: str, loads: int) -> dict:
    first, errors = [], []
    for _ in range(loads):
        page, page_errors = new_page(browser)
        page.goto(url)
        first.append(wait_for(page, "window.__sparsetraceFirstDraw", 60))
        if len(first) < loads:
            page.close()
            errors += page_errors
    # zoom: wheel over the map, time until the map is redrawn from a new grid
    r = page.evaluate("(() => { const r = document.getElementById('map')"
                      ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
    before = int(page.evaluate("document.body.dataset.drawn"))
    page.mouse.move(r[0] + r[2] / 2, r[1] + r[3] / 2)
    t0 = page.evaluate("performance.now()")
    page.mouse.wheel(0, -600)
    wait_for(page, f"+document.body.dataset.drawn > {before}", 60, polling=10)
    zoom_ms = page.evaluate("performance.now()") - t0
    painted = page.evaluate("""(() => { const c = document.getElementById('map'),
        d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++;
        return n; })()""")
    page.close()
    errors += page_errors  # every load's, the zoom's included
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    t = time.perf_counter()
    opener.open(url + "api/grid?layer=3&head=1&rows=800&cols=800").read()
    grid_ms = (time.perf_counter() - t) * 1e3
    return {"cold_first_draw_ms": round(first[0], 1),
            "warm_first_draw_ms": round(statistics.median(first[1:] or first), 1),
            "zoom_redraw_ms": round(zoom_ms, 1), "grid_endpoint_ms": round(grid_ms, 1),
            "painted_pixels_after_zoom": painted, "console_errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loads", type=int, default=4, help="page loads per trace (first is cold)")
    ap.add_argument("--only-1m", action="store_true")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --trace directories")
    ap.add_argument("--trace", action="append", default=[], metavar="NAME=DIR",
                    help="also measure this trace directory (e.g. one written by the GPU path)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results file (default {RESULTS}, or viewer_traces.json next to it with "
                         "--no-synthetic)")
    args = ap.parse_args()
    home = cache_home() / "bench"
    from sparsetrace import Trace

    with tempfile.TemporaryDirectory() as tmp:
        traces = [] if args.only_1m or args.no_synthetic else [
            ("20k", ensure_trace(Path(tmp) / "trace-20k", 20_000, 28, 12, 16))]
        if not args.no_synthetic:
            traces.append(("1M", ensure_trace(home / "trace-1m", 1_048_544, 28, 12, 16)))
        for spec in args.trace:
            name, _, folder = spec.rpartition("=")
            traces.append((name or folder, Trace.load(folder)))
        rows = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            for name, trace in traces:
                t = time.perf_counter()
                proc, url = start_view(trace.path)
                start_s = time.perf_counter() - t
                try:
                    r = measure(browser, url, args.loads)
                finally:
                    proc.terminate()
                    proc.wait(10)
                rows.append({"trace": name, "tokens": trace.num_tokens,
                             "model": trace.meta.get("model_id"), "device": trace.meta.get("device"),
                             "layers_x_heads": f"{trace.num_layers}x{trace.num_heads}",
                             "query_blocks": trace.num_query_blocks,
                             "trace_bytes": trace.nbytes, "server_start_s": round(start_s, 1),
                             **r, "under_budget": r["cold_first_draw_ms"] < BUDGET_S * 1e3})
    cols = ("trace", "tokens", "query_blocks", "server_start_s", "cold_first_draw_ms",
            "warm_first_draw_ms", "zoom_redraw_ms", "grid_endpoint_ms")
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>18}" for c in cols))
    result = {"bench": "viewer", "budget_s": BUDGET_S, "cpus": os.cpu_count(),
              "load_avg": os.getloadavg()[0], "rows": rows}
    out = args.out or (RESULTS if not args.no_synthetic else RESULTS.with_name("viewer_traces.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if all(r["under_budget"] and not r["console_errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
