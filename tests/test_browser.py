"""The viewer and the report in a real browser: headless Chromium driven over the DevTools
protocol (sparsetrace.viz.browser, stdlib only). Skipped when no chromium is installed (the
Makefile's `make browser` installs Debian's).

Each test checks that the block map is drawn (pixels read back with getImageData, counted
against the white background), that interactions change what is drawn, and that the page logged
no console error, exception or failed load. Screenshots land in the test's tmp dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from sparsetrace.viz.browser import BrowserError, Chromium, find_chromium
from sparsetrace.viz.synthetic import write_synthetic_trace

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium not installed (make browser, or apt-get install "
                                       "chromium)")

# non-background pixels of a canvas (background: white)
PAINTED = """(() => {{
  const c = document.querySelector({sel!r}), d = c.getContext('2d')
    .getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
  return [n, c.width * c.height];
}})()"""


def painted(page, selector="#map"):
    return page.evaluate(PAINTED.format(sel=selector))


@pytest.fixture(scope="module")
def browser():
    with Chromium() as b:
        yield b


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # 20k tokens at block 16: 1250 blocks, more than the canvas has pixels, so the first
    # picture is aggregated server-side and zooming reaches one cell per block.
    trace = write_synthetic_trace(tmp_path_factory.mktemp("trace") / "syn", num_tokens=20_000,
                                  num_layers=4, num_heads=3, top_k=12, block_size=16,
                                  chunk_blocks=400)
    trace.update_manifest(fidelity={"criterion_passed": True, "top1_agreement": 0.97,
                                    "kl": 0.0123, "top_k": 12})  # as `sparsetrace fidelity` adds
    return trace


@pytest.fixture(scope="module")
def server(synthetic):
    """`sparsetrace view DIR --port 0` as a subprocess; yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrace.cli", "view", str(synthetic.path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SPARSETRACE_HOME": str(
                                synthetic.path.parent / "home")})
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    try:
        m = re.search(r"http://\S+/", lines[0] if lines else "")
        if m is None:
            proc.kill()
            pytest.fail(f"sparsetrace view did not start: {lines} {proc.stderr.read()[-2000:]}")
        yield m.group(0)
    finally:
        proc.terminate()
        proc.wait(10)


def open_page(browser, url):
    page = browser.page(1400, 1000)
    page.goto(url)
    page.wait_for("document.body && document.body.dataset.drawn", 60)
    return page


def draws(page) -> int:
    return int(page.evaluate("document.body.dataset.drawn || 0"))


def test_viewer_draws_zooms_and_shades_text(browser, server, tmp_path):
    page = open_page(browser, server)
    n, total = painted(page)
    grid = page.evaluate("window.__sparsetrace.map.grid && "
                         "[window.__sparsetrace.map.grid.q_step, window.__sparsetrace.map.grid.rows]")
    print(f"first draw at {page.evaluate('window.__sparsetraceFirstDraw'):.0f} ms, "
          f"{n}/{total} pixels painted, grid q_step/rows {grid}")
    assert n > 0.02 * total and grid[0] > 1  # drawn, and aggregated server-side
    facts = page.evaluate("document.getElementById('facts').textContent")
    assert "20,000 tokens" in facts and "two-token criterion passed" in facts, facts
    page.screenshot(tmp_path / "viewer.png")

    # choose a head by clicking its cell in the overview (once the overview is computed)
    page.wait_for("(() => { const o = window.__sparsetrace.S.overview; "
                  "return o && o.done_layers === o.num_layers; })()", 60)
    box = page.evaluate("""(() => { const c = document.getElementById('overview'),
        r = c.getBoundingClientRect(), b = c.cellBox, s = r.width / c.width;
        return [r.left + (b.left + 2 * b.cw + b.cw / 2) * s, r.top + (b.top + 1 * b.ch + b.ch / 2) * s]; })()""")
    before = draws(page)
    page.mouse("mousePressed", *box)
    page.mouse("mouseReleased", *box)
    page.wait_for(f"+document.body.dataset.drawn > {before}", 30)
    assert page.evaluate("[window.__sparsetrace.S.layer, window.__sparsetrace.S.head]") == [1, 2]
    assert "layer 1, head 2" in page.evaluate("document.getElementById('map-title').textContent")

    # zoom with the wheel, around the map's centre, until one cell is one block
    rect = page.evaluate("(() => { const r = document.getElementById('map')"
                         ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
    cx, cy = rect[0] + rect[2] * 0.6, rect[1] + rect[3] * 0.7
    for _ in range(3):
        before = draws(page)
        page.mouse("mouseWheel", cx, cy, deltaX=0, deltaY=-400)
        page.wait_for(f"+document.body.dataset.drawn > {before}", 30)
    g = page.evaluate("(({q0, q1, q_step, k_step}) => [q0, q1, q_step, k_step])"
                      "(window.__sparsetrace.map.grid)")
    print("after wheel zoom: grid q0, q1, q_step, k_step =", g)
    assert g[2] == 1 and g[3] == 1 and 0 < g[0] and g[1] - g[0] < 400
    assert painted(page)[0] > 100

    # the + button zooms further, drag pans
    before = draws(page)
    page.evaluate("document.getElementById('zoom-in').click()")
    page.wait_for(f"+document.body.dataset.drawn > {before}", 30)
    v0 = page.evaluate("window.__sparsetrace.map.view")
    page.mouse("mousePressed", cx, cy)
    page.mouse("mouseMoved", cx + 120, cy - 80, button="left")
    page.mouse("mouseReleased", cx + 120, cy - 80)
    v1 = page.evaluate("window.__sparsetrace.map.view")
    assert v1["k0"] < v0["k0"] and v1["q0"] > v0["q0"]

    # hover: the tooltip shows the tokens of the blocks under the cursor, fetched lazily
    page.mouse("mouseMoved", cx, cy)
    tip = page.wait_for("(() => { const t = document.getElementById('tip'); "
                        "return t.textContent.includes('key text') && t.textContent; })()", 30)
    print("tooltip:", tip[:160].replace("\n", " | "))
    assert re.search(r"query block \d+ \(tokens [\d,]+–[\d,]+\)", tip)

    # click a cell: its query rows become the selected span; the text is shaded
    page.mouse("mousePressed", cx, cy)
    page.mouse("mouseReleased", cx, cy)
    page.wait_for("!!document.querySelector('#text span.q')", 30)
    shaded = page.evaluate("[...document.querySelectorAll('#text span')].filter(s => "
                           "!s.style.background.endsWith(', 0)')).length")
    assert shaded > 0
    page.evaluate("document.querySelector('input[value=sentence]').click()")
    page.wait_for("document.querySelectorAll('#text span').length > 0", 10)
    page.screenshot(tmp_path / "viewer-zoomed.png")
    assert page.errors == [], page.errors
    page.close()


def test_viewer_bad_request_is_a_400_with_a_message(browser, server):
    page = open_page(browser, server)
    assert page.errors == [], page.errors
    status = page.evaluate("fetch('/api/grid?layer=99&head=0').then(r => r.status)")
    assert status == 400
    assert page.evaluate("fetch('/api/grid?layer=99&head=0').then(r => r.json())")["error"] \
        .startswith("layer 99 is out of range")
    # the failed loads are caught as errors (which is what the other tests assert never happens)
    assert page.errors and all("status of 400" in e for e in page.errors), page.errors
    page.close()


def test_report_from_disk_and_in_an_iframe(browser, synthetic, tmp_path):
    from sparsetrace.viz.report import Report, report_html

    out = tmp_path / "report.html"
    out.write_text(report_html(synthetic, max_cells=200), encoding="utf-8")
    page = open_page(browser, out.as_uri())
    page.wait_for("+document.body.dataset.drawn >= 4", 30)
    assert "top-1 agreement 0.970" in page.evaluate("document.getElementById('facts').textContent")
    for i in range(4):
        n, total = painted(page, f"#map-{i}")
        assert n > 0.02 * total, (i, n, total)
    before = page.evaluate("window.__sparsetraceMaps[0].view.q1")
    page.evaluate("document.querySelector('[data-z=in]').click()")
    assert page.evaluate("window.__sparsetraceMaps[0].view.q1") < before
    assert painted(page, "#map-0")[0] > 100
    page.screenshot(tmp_path / "report.png")
    assert page.errors == [], page.errors
    page.close()

    # what Jupyter shows: the report inside an iframe's srcdoc (its script must run there)
    nb = tmp_path / "notebook.html"
    nb.write_text(f"<!doctype html><meta charset=utf-8><link rel=icon href='data:,'>"
                  f"<body>{Report(synthetic, max_cells=64)._repr_html_()}</body>", encoding="utf-8")
    page = browser.page()
    page.goto(nb.as_uri())
    page.wait_for("(() => { const f = document.querySelector('iframe'); return f && "
                  "f.contentDocument && +f.contentDocument.body.dataset.drawn >= 4; })()", 30)
    assert page.errors == [], page.errors
    page.close()


def check_served_trace(browser, trace, screenshot) -> str:
    """Serve ``trace`` in-process with the viewer's server code, open it, check the block map is drawn
    and the tooltip shows the trace's own text, save a screenshot; returns the header's facts line."""
    from sparsetrace.viz.server import make_server

    server = make_server(trace, port=0, cache_dir=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = open_page(browser, f"http://127.0.0.1:{server.server_address[1]}/")
        n, total = painted(page)
        assert n > 0.05 * total
        rect = page.evaluate("(() => { const r = document.getElementById('map')"
                             ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        page.mouse("mouseMoved", rect[0] + rect[2] * 0.05, rect[1] + rect[3] * 0.95)
        tip = page.wait_for("(() => { const t = document.getElementById('tip'); "
                            "return t.textContent.includes('key text') && t.textContent; })()", 30)
        key_text = tip.split("key text", 1)[1]
        print("real tooltip key text:", key_text[:80])
        assert key_text.strip() and key_text.strip() in trace.text
        facts = page.evaluate("document.getElementById('facts').textContent")
        page.screenshot(screenshot)
        assert page.errors == [], page.errors
        page.close()
        return facts
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("model,tokens", [("smollm2-135m", 300), ("gemma-3-270m", 700)])
def test_viewer_on_a_real_trace(browser, tmp_path, model, tokens):
    """A real trace of each supported model (top_k 4; Gemma past its 512-token sliding window), built
    once into $SPARSETRACE_HOME/test-traces, served in-process by the same server code; the tooltip
    shows the model's real text."""
    facts = check_served_trace(browser, real_trace(model, tokens), tmp_path / "real.png")
    assert "traced on" not in facts or "traced on cpu" in facts


def test_viewer_and_report_on_a_trace_from_the_gpu_path(browser, tmp_path):
    """The trace in tests/data written by the GPU path (FlexAttention + Triton on an H200; the same
    blocks as the CPU path, tests/test_tracer.py) opens in the viewer with its text under the cursor,
    says where it was traced, and makes a report that draws."""
    from sparsetrace import Trace
    from sparsetrace.viz.report import report_html

    trace = Trace.load(os.path.join(os.path.dirname(__file__), "data", "smollm2-300-gpu"))
    facts = check_served_trace(browser, trace, tmp_path / "gpu-trace.png")
    assert "traced on cuda: NVIDIA H200" in facts
    out = tmp_path / "report.html"
    out.write_text(report_html(trace), encoding="utf-8")
    page = open_page(browser, out.as_uri())
    page.wait_for("+document.body.dataset.drawn >= 4", 30)
    assert "traced on cuda" in page.evaluate("document.getElementById('facts').textContent")
    assert painted(page, "#map-0")[0] > 100
    assert page.errors == [], page.errors
    page.close()


def real_trace(model_id: str = "smollm2-135m", tokens: int = 300):
    from sparsetrace import Trace
    from sparsetrace.models import cache_home
    from sparsetrace.store import TraceError

    path = cache_home() / "test-traces" / f"{model_id}-{tokens}-k4-b16"
    try:
        return Trace.load(path)
    except TraceError:
        shutil.rmtree(path, ignore_errors=True)  # our cache: rebuild
    from sparsetrace import load_model
    from sparsetrace.data import haystack_text
    from sparsetrace.tracer import TraceConfig, trace_text

    model, tokenizer = load_model(model_id)
    return trace_text(model, tokenizer, haystack_text(tokens * 8),
                      TraceConfig(top_k=4, block_size=16, chunk_size=160), max_tokens=tokens,
                      out=path, model_id=model_id, progress=False)


def test_browser_helper_reports_page_errors(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><link rel=icon href='data:,'><script>console.error('boom');"
                   "undefinedFunction();</script>")
    page = browser.page()
    page.goto(bad.as_uri())
    deadline = time.monotonic() + 10
    while len(page.errors) < 2 and time.monotonic() < deadline:
        page.evaluate("1")
    assert any("boom" in e for e in page.errors)
    assert any("undefinedFunction" in e for e in page.errors)
    with pytest.raises(BrowserError):
        page.evaluate("nope.nope")
    page.close()
