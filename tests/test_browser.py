"""The viewer and the report in a real browser: headless Debian chromium driven by Playwright (the
session's ``browser`` fixture in conftest.py). A missing chromium fails these tests, it does not
skip them: `make browser` installs Debian's.

Each test checks that the block map is drawn (pixels read back with getImageData, counted against
the white background), that interactions change what is drawn, and that the page logged no console
error, threw no exception, had no failed request and got no HTTP error (collected from Playwright's
page events). Screenshots land in the test's tmp dir."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from sparsetrace.viz.synthetic import write_synthetic_trace

VIEWPORT = {"width": 1400, "height": 1000}

# non-background pixels of a canvas (background: white): [painted, total]
PAINTED = """(sel) => {
  const c = document.querySelector(sel), d = c.getContext('2d')
    .getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) n++;
  return [n, c.width * c.height];
}"""
MAP_RECT = ("(() => { const r = document.getElementById('map').getBoundingClientRect(); "
            "return [r.left, r.top, r.width, r.height]; })()")
TOOLTIP = ("(() => { const t = document.getElementById('tip'); "
           "return t.textContent.includes('key text') && t.textContent; })()")


def painted(page, selector="#map"):
    return page.evaluate(PAINTED, selector)


def new_page(browser):
    """A fresh page (its own context) at 1400 x 1000 CSS pixels, and the list its errors go to:
    console errors and failed assertions, uncaught exceptions, failed requests, HTTP errors."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    errors: list[str] = []

    def console(msg):
        if msg.type in ("error", "assert"):
            errors.append(f"console.{msg.type}: {msg.text} {msg.location.get('url', '')}".strip())

    def response(r):
        if r.status >= 400:
            errors.append(f"response: status of {r.status} for {r.request.method} {r.url}")

    page.on("console", console)
    page.on("pageerror", lambda exc: errors.append(f"exception: {exc}"))
    page.on("requestfailed", lambda r: errors.append(f"failed request: {r.method} {r.url}: {r.failure}"))
    page.on("response", response)
    return page, errors


def wait_for(page, expression: str, timeout: float = 30.0, errors=None):
    """Poll a JS expression (every 50 ms) until truthy and return its value; an exception while
    evaluating counts as not yet (e.g. the page is still loading)."""
    try:
        handle = page.wait_for_function(
            f"() => {{ try {{ return ({expression}); }} catch (e) {{ return undefined; }} }}",
            timeout=timeout * 1e3, polling=50)
    except PlaywrightTimeout:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {expression!r}; "
                             f"page errors: {errors}") from None
    try:
        return handle.json_value()
    finally:
        handle.dispose()


def open_page(browser, url):
    page, errors = new_page(browser)
    page.goto(url)
    wait_for(page, "document.body && document.body.dataset.drawn", 60, errors)
    return page, errors


def draws(page) -> int:
    return int(page.evaluate("document.body.dataset.drawn || 0"))


def redrawn(page, before: int, errors, timeout: float = 30.0):
    wait_for(page, f"+document.body.dataset.drawn > {before}", timeout, errors)


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


def test_viewer_draws_zooms_and_shades_text(browser, server, tmp_path):
    page, errors = open_page(browser, server)
    n, total = painted(page)
    grid = page.evaluate("window.__sparsetrace.map.grid && "
                         "[window.__sparsetrace.map.grid.q_step, window.__sparsetrace.map.grid.rows]")
    print(f"first draw at {page.evaluate('window.__sparsetraceFirstDraw'):.0f} ms, "
          f"{n}/{total} pixels painted, grid q_step/rows {grid}")
    assert n > 0.02 * total and grid[0] > 1  # drawn, and aggregated server-side
    facts = page.evaluate("document.getElementById('facts').textContent")
    assert "20,000 tokens" in facts and "two-token criterion passed" in facts, facts
    page.screenshot(path=tmp_path / "viewer.png")

    # choose a head by clicking its cell in the overview (once the overview is computed)
    wait_for(page, "(() => { const o = window.__sparsetrace.S.overview; "
                   "return o && o.done_layers === o.num_layers; })()", 60, errors)
    box = page.evaluate("""(() => { const c = document.getElementById('overview'),
        r = c.getBoundingClientRect(), b = c.cellBox, s = r.width / c.width;
        return [r.left + (b.left + 2 * b.cw + b.cw / 2) * s, r.top + (b.top + 1 * b.ch + b.ch / 2) * s]; })()""")
    before = draws(page)
    page.mouse.click(*box)
    redrawn(page, before, errors)
    assert page.evaluate("[window.__sparsetrace.S.layer, window.__sparsetrace.S.head]") == [1, 2]
    assert "layer 1, head 2" in page.evaluate("document.getElementById('map-title').textContent")

    # zoom with the wheel, around the map's centre, until one cell is one block
    rect = page.evaluate(MAP_RECT)
    cx, cy = rect[0] + rect[2] * 0.6, rect[1] + rect[3] * 0.7
    page.mouse.move(cx, cy)
    for _ in range(3):
        before = draws(page)
        page.mouse.wheel(0, -400)
        redrawn(page, before, errors)
    g = page.evaluate("(({q0, q1, q_step, k_step}) => [q0, q1, q_step, k_step])"
                      "(window.__sparsetrace.map.grid)")
    print("after wheel zoom: grid q0, q1, q_step, k_step =", g)
    assert g[2] == 1 and g[3] == 1 and 0 < g[0] and g[1] - g[0] < 400
    assert painted(page)[0] > 100

    # the + button zooms further, drag pans
    before = draws(page)
    page.evaluate("document.getElementById('zoom-in').click()")
    redrawn(page, before, errors)
    v0 = page.evaluate("window.__sparsetrace.map.view")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 120, cy - 80)
    page.mouse.up()
    v1 = page.evaluate("window.__sparsetrace.map.view")
    assert v1["k0"] < v0["k0"] and v1["q0"] > v0["q0"]

    # hover: the tooltip shows the tokens of the blocks under the cursor, fetched lazily
    page.mouse.move(cx, cy)
    tip = wait_for(page, TOOLTIP, 30, errors)
    print("tooltip:", tip[:160].replace("\n", " | "))
    assert re.search(r"query block \d+ \(tokens [\d,]+–[\d,]+\)", tip)

    # click a cell: its query rows become the selected span; the text is shaded
    page.mouse.click(cx, cy)
    wait_for(page, "!!document.querySelector('#text span.q')", 30, errors)
    shaded = page.evaluate("[...document.querySelectorAll('#text span')].filter(s => "
                           "!s.style.background.endsWith(', 0)')).length")
    assert shaded > 0
    page.evaluate("document.querySelector('input[value=sentence]').click()")
    wait_for(page, "document.querySelectorAll('#text span').length > 0", 10, errors)
    page.screenshot(path=tmp_path / "viewer-zoomed.png")
    assert errors == [], errors
    page.close()


SELECT_TEXT = """([i, j]) => {  // select the text panel's token spans i..j with the mouse's own events
  const spans = document.querySelectorAll('#text span'), r = document.createRange();
  r.setStart(spans[i].firstChild, 0); r.setEnd(spans[j].firstChild, spans[j].firstChild.length);
  const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(r);
  document.getElementById('text').dispatchEvent(new MouseEvent('mouseup', {bubbles: true}));
  return [+spans[i].dataset.t, +spans[j].dataset.t];
}"""


def test_viewer_shades_the_sources_of_a_selected_span(browser, server, synthetic, tmp_path):
    """Select a span in the text panel: the text is shaded by its sources over all layers and heads (the
    same numbers as analysis.sources), and the layer x source chart is drawn."""
    from sparsetrace.analysis.sources import sources

    page, errors = open_page(browser, server)
    wait_for(page, "document.querySelectorAll('#text span').length > 100", 30, errors)
    n = page.evaluate("document.querySelectorAll('#text span').length")
    t0, t1 = page.evaluate(SELECT_TEXT, [n - 60, n - 20])
    wait_for(page, "document.body.dataset.sources === '1'", 60, errors)
    assert page.evaluate("window.__sparsetrace.S.by") == "sources"
    assert page.evaluate("document.querySelector('input[name=by][value=sources]').checked")
    title = page.evaluate("document.getElementById('text-title').textContent")
    print(title)
    assert f"sources of tokens {t0:,}–{t1 + 1:,} over all 4 layers and heads" in title
    got = page.evaluate("window.__sparsetrace.S.sources")
    want = sources(synthetic, (t0, t1 + 1), top=8)
    assert [p["token_start"] for p in got["top"]] == [r["token_start"] for r in want.top(8)]
    assert max(abs(a - float(b)) for a, b in zip(got["blocks"], want.score)) < 1e-3 * float(want.score.max())
    # the chart: drawn, one column per top source
    chart, total = painted(page, "#sources-chart")
    print(f"chart: {chart}/{total} pixels painted, top sources {[p['token_start'] for p in got['top']]}")
    assert chart > 0.2 * total and len(got["top"]) == 8
    shaded = page.evaluate("[...document.querySelectorAll('#text span')].filter(s => "
                           "!s.style.background.endsWith(', 0)')).length")
    assert shaded > 50
    # a top source's button brings its text into view, shaded
    page.evaluate("document.querySelector('#top-blocks button').click()")
    first = max(got["top"][0]["token_start"], got["top"][0]["block"] * synthetic.block_k)  # in its strongest block
    wait_for(page, f"!!document.querySelector('#text span[data-t=\"{first}\"]')", 10, errors)
    bg = page.evaluate(f"document.querySelector('#text span[data-t=\"{first}\"]').style.background")
    assert bg != "rgba(255, 140, 0, 0)", bg  # full strength reads rgb(255, 140, 0)
    page.screenshot(path=tmp_path / "viewer-sources.png", full_page=True)
    # back to one head's attention: the chart hides, the title names the head
    page.evaluate("document.querySelector('input[name=by][value=head]').click()")
    wait_for(page, "document.getElementById('text-title').textContent.includes('head')", 10, errors)
    assert page.evaluate("document.getElementById('sources-box').hidden")
    assert errors == [], errors
    page.close()


def test_viewer_bad_request_is_a_400_with_a_message(browser, server):
    page, errors = open_page(browser, server)
    assert errors == [], errors
    status = page.evaluate("fetch('/api/grid?layer=99&head=0').then(r => r.status)")
    assert status == 400
    assert page.evaluate("fetch('/api/grid?layer=99&head=0').then(r => r.json())")["error"] == \
        "layer 99 out of range for a trace with 4 layers (valid: -4..3)"
    page.wait_for_timeout(200)  # let the page's events reach us
    # the failed loads are caught as errors (which is what the other tests assert never happens):
    # the browser's console line and the HTTP response itself
    assert errors and all("status of 400" in e for e in errors), errors
    assert any(e.startswith("console.error") for e in errors), errors
    assert any(e.startswith("response") for e in errors), errors
    page.close()


def test_report_from_disk_and_in_an_iframe(browser, synthetic, tmp_path):
    from sparsetrace.viz.report import Report, report_html

    out = tmp_path / "report.html"
    out.write_text(report_html(synthetic, max_cells=200), encoding="utf-8")
    page, errors = open_page(browser, out.as_uri())
    wait_for(page, "+document.body.dataset.drawn >= 4", 30, errors)
    assert "top-1 agreement 0.970" in page.evaluate("document.getElementById('facts').textContent")
    for i in range(4):
        n, total = painted(page, f"#map-{i}")
        assert n > 0.02 * total, (i, n, total)
    before = page.evaluate("window.__sparsetraceMaps[0].view.q1")
    page.evaluate("document.querySelector('[data-z=in]').click()")
    assert page.evaluate("window.__sparsetraceMaps[0].view.q1") < before
    assert painted(page, "#map-0")[0] > 100
    # what the last block read: the chart, the list, the shaded text
    wait_for(page, "document.body.dataset.sources === '1'", 10, errors)
    chart, total = painted(page, "#sources-chart")
    items = page.evaluate("document.querySelectorAll('#sources-list li').length")
    shaded = page.evaluate("[...document.querySelectorAll('#text span')].filter(s => "
                           "!s.style.background.endsWith(', 0)')).length")
    print(f"report sources: chart {chart}/{total} pixels, {items} passages, {shaded} shaded tokens")
    assert chart > 0.2 * total and items == 8
    assert shaded == 0 and page.evaluate("document.getElementById('text').hidden")  # 20k tokens: no text embedded
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    assert errors == [], errors
    page.close()

    # what Jupyter shows: the report inside an iframe's srcdoc (its script must run there)
    nb = tmp_path / "notebook.html"
    nb.write_text(f"<!doctype html><meta charset=utf-8><link rel=icon href='data:,'>"
                  f"<body>{Report(synthetic, max_cells=64)._repr_html_()}</body>", encoding="utf-8")
    page, errors = new_page(browser)
    page.goto(nb.as_uri())
    wait_for(page, "(() => { const f = document.querySelector('iframe'); return f && "
                   "f.contentDocument && +f.contentDocument.body.dataset.drawn >= 4; })()", 30, errors)
    assert errors == [], errors
    page.close()


def check_served_trace(browser, trace, screenshot) -> str:
    """Serve ``trace`` in-process with the viewer's server code, open it, check the block map is drawn
    and the tooltip shows the trace's own text, save a screenshot; returns the header's facts line."""
    from sparsetrace.viz.server import make_server

    server = make_server(trace, port=0, cache_dir=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page, errors = open_page(browser, f"http://127.0.0.1:{server.server_address[1]}/")
        n, total = painted(page)
        assert n > 0.05 * total
        rect = page.evaluate(MAP_RECT)
        page.mouse.move(rect[0] + rect[2] * 0.05, rect[1] + rect[3] * 0.95)
        tip = wait_for(page, TOOLTIP, 30, errors)
        key_text = tip.split("key text", 1)[1]
        print("real tooltip key text:", key_text[:80])
        assert key_text.strip() and key_text.strip() in trace.text
        facts = page.evaluate("document.getElementById('facts').textContent")
        page.screenshot(path=screenshot)
        assert errors == [], errors
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
    page, errors = open_page(browser, out.as_uri())
    wait_for(page, "+document.body.dataset.drawn >= 4", 30, errors)
    assert "traced on cuda" in page.evaluate("document.getElementById('facts').textContent")
    assert painted(page, "#map-0")[0] > 100
    assert errors == [], errors
    page.close()


def real_trace(model_id: str = "smollm2-135m", tokens: int = 300):
    from sparsetrace import Trace
    from sparsetrace.store import TraceError
    from sparsetrace.tracing.models import cache_home

    path = cache_home() / "test-traces" / f"{model_id}-{tokens}-k4-b16"
    try:
        cached = Trace.load(path)
        if cached.has_missed:
            return cached
    except TraceError:
        pass
    shutil.rmtree(path, ignore_errors=True)  # our cache, broken or made before traces carried their audit
    from sparsetrace import load_model
    from sparsetrace.config import TraceConfig
    from sparsetrace.datasets.essays import haystack_text
    from sparsetrace.tracing.tracer import trace_text

    model, tokenizer = load_model(model_id)
    return trace_text(model, tokenizer, haystack_text(tokens * 8),
                      TraceConfig.of(top_k=4, block_size=16, chunk_size=160), max_tokens=tokens,
                      out=path, model_id=model_id, progress=False)


def test_page_errors_are_collected(browser, tmp_path):
    """The error collection the other tests rely on: console.error, an uncaught exception and a
    failed load all land in the list; a JS error in evaluate raises."""
    with socket.socket() as s:  # a port nothing listens on: the load is refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><link rel=icon href='data:,'><script>console.error('boom');"
                   f"undefinedFunction();</script><img src='http://127.0.0.1:{closed}/x.png'>")
    page, errors = new_page(browser)
    page.goto(bad.as_uri())
    deadline = time.monotonic() + 10
    while len(errors) < 3 and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert any("boom" in e for e in errors), errors
    assert any(e.startswith("exception") and "undefinedFunction" in e for e in errors), errors
    assert any(e.startswith("failed request") and f":{closed}/x.png" in e for e in errors), errors
    with pytest.raises(PlaywrightError, match="nope"):
        page.evaluate("nope.nope")
    page.close()
