"""The audit in front of the user: the viewer colours heads and rows by missed attention mass, the report has
an audit section with its plots, and traces without an audit still open as before.

The view data (views.audit_head_stats, views.missed_rows, analysis.audit.missed_by_layer / _by_position) is
checked against numbers computed directly from the Trace API (``trace.missed``, ``trace.audit``) with loops,
on a real SmolLM2-135M trace with an audit; the pages are checked in headless Chromium (conftest's
``browser``), pixel colours read back from the canvases. The trace without an audit is the GPU-path trace in
tests/data, written before the audit existed."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from helpers import child_env
from test_browser import new_page, open_page, wait_for

from sparsetrace import Trace
from sparsetrace.analysis.audit import audit_summary, format_summary, missed_by_layer, missed_by_position
from sparsetrace.viz import views
from sparsetrace.viz.report import report_html

pytestmark = pytest.mark.slow  # a real model's trace (built once)

OLD_TRACE = os.path.join(os.path.dirname(__file__), "data", "smollm2-300-gpu")
AUDIT_RATE = 6


@pytest.fixture(scope="module")
def audited():
    """A real SmolLM2-135M trace with the audit and the per-row estimate (300 tokens, top_k 4, blocks of 16,
    6 audited query blocks, chunks of 160: two shards), built once into $SPARSETRACE_HOME/test-traces."""
    from sparsetrace.store import TraceError
    from sparsetrace.tracing.models import cache_home

    path = cache_home() / "test-traces" / f"smollm2-135m-300-k4-b16-audit{AUDIT_RATE}"
    try:
        trace = Trace.load(path)
        if trace.has_missed and trace.has_audit:
            return trace
    except TraceError:
        pass
    shutil.rmtree(path, ignore_errors=True)  # our cache: rebuild
    from sparsetrace import load_model
    from sparsetrace.config import TraceConfig
    from sparsetrace.datasets.essays import haystack_text
    from sparsetrace.tracing.tracer import trace_text

    model, tokenizer = load_model("smollm2-135m")
    return trace_text(model, tokenizer, haystack_text(2400),
                      TraceConfig.of(top_k=4, block_size=16, chunk_size=160, audit_rate=AUDIT_RATE),
                      max_tokens=300, out=path, model_id="smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def old():
    trace = Trace.load(OLD_TRACE)
    assert not trace.has_missed and not trace.has_audit and trace.audit() is None
    return trace


def variant(trace, *, missed: bool, audit: bool) -> Trace:
    """The same trace in memory with only the per-row estimate, only the audit, or neither."""
    L, H = trace.num_layers, trace.num_heads
    layers = [trace.layer(li) for li in range(L)]
    return Trace.from_arrays(torch.stack([i for i, _ in layers]), torch.stack([m for _, m in layers]),
                             block_q=trace.block_q, block_k=trace.block_k, tokens=trace.tokens,
                             meta={"model_id": "variant"}, token_offsets=trace.token_offsets, text=trace.text,
                             missed=torch.stack([torch.stack([trace.missed(li, h) for h in range(H)])
                                                 for li in range(L)]) if missed else None,
                             audit=trace.audit() if audit else None)


# --------------------------------------------------------------------------- the view data


def test_head_stats_carry_the_audit_per_head(audited, old):
    stats = views.head_stats(audited)
    assert views.audit_metrics(audited) == ["missed", "missed_audited", "recall"]
    worst = 0.0
    for li in range(audited.num_layers):
        for h in range(audited.num_heads):
            est = audited.missed(li, h)[:, 0].tolist()
            a = audited.audit(li, h)
            recall = [r for r in a["recall"].tolist() if not math.isnan(r)]
            want = {"missed": sum(est) / len(est), "missed_audited": sum(a["missed"].tolist()) / len(a["missed"]),
                    "recall": sum(recall) / len(recall) if recall else math.nan}
            for k, v in want.items():
                if math.isnan(v):
                    assert math.isnan(stats[k][li, h])
                else:
                    worst = max(worst, abs(stats[k][li, h] - v))
    print(f"head stats vs loops over Trace.missed / Trace.audit: max |diff| {worst:.2e}; mean missed "
          f"{np.nanmean(stats['missed']):.3f}, audited {np.nanmean(stats['missed_audited']):.3f}, recall "
          f"{np.nanmean(stats['recall']):.3f}")
    assert worst < 1e-9
    # per layer (as the viewer's background thread asks) gives the same
    part = views.head_stats(audited, layers=[7])
    assert np.array_equal(part["missed"][7], stats["missed"][7]) and np.isnan(part["missed"][6]).all()
    # older traces: no audit metrics, nothing else changes
    assert views.audit_metrics(old) == [] and not set(views.head_stats(old)) & {"missed", "missed_audited", "recall"}
    est_only, audit_only = variant(audited, missed=True, audit=False), variant(audited, missed=False, audit=True)
    assert views.audit_metrics(est_only) == ["missed"]
    assert views.audit_metrics(audit_only) == ["missed_audited", "recall"]
    assert np.allclose(views.head_stats(est_only)["missed"], stats["missed"])


def test_stats_cache_written_before_the_audit_is_recomputed(audited, tmp_path):
    stats = views.cached_head_stats(audited, tmp_path)
    assert views.read_stats_cache(audited, tmp_path) is not None
    path = views.stats_cache_path(audited, tmp_path)
    saved = json.loads(path.read_text())
    for k in ("missed", "missed_audited", "recall"):
        del saved[k]
    path.write_text(json.dumps(saved))  # as the viewer wrote it before it knew the audit
    assert views.read_stats_cache(audited, tmp_path) is None
    assert np.allclose(views.cached_head_stats(audited, tmp_path)["missed"], stats["missed"])


@pytest.mark.parametrize("span,max_rows", [((None, None), 1000), ((None, None), 5), ((3, 17), 4), ((11, 12), 9)])
def test_missed_rows_match_the_trace_api(audited, span, max_rows):
    q0, q1 = span
    for layer, head in ((0, 0), (13, 4), (-1, -1)):
        d = views.missed_rows(audited, layer, head, q0, q1, max_rows=max_rows)
        g = views.block_grid(audited, layer, head, q0, q1, max_rows=max_rows, max_cols=10)
        assert (d["q0"], d["q1"], d["q_step"], d["rows"]) == (g.q0, g.q1, g.q_step, g.values.shape[0])
        li, h = audited.head_index(layer, head)
        missed = audited.missed(li, h).tolist()  # [nQ][3]
        for r in range(d["rows"]):
            rows = missed[d["q0"] + r * d["q_step"]:min(d["q1"], d["q0"] + (r + 1) * d["q_step"])]
            for i, name in enumerate(("estimate", "low", "high")):
                assert d[name][r] == pytest.approx(sum(x[i] for x in rows) / len(rows), abs=1e-5)
            assert d["worst"][r] == pytest.approx(max(x[0] for x in rows), abs=1e-5)
        a = audited.audit(li, h)
        want = sorted((qb, m, r) for qb, m, r in zip(a["query_block"].tolist(), a["missed"].tolist(),
                                                     a["recall"].tolist(), strict=True) if d["q0"] <= qb < d["q1"])
        assert [row["query_block"] for row in d["audited"]] == [qb for qb, _, _ in want]
        for row, (qb, m, r) in zip(d["audited"], want, strict=True):
            assert row["missed"] == pytest.approx(m, abs=1e-5)
            assert row["recall"] == (None if math.isnan(r) else pytest.approx(r, abs=1e-5))
            assert [row["estimate"], row["low"], row["high"]] == pytest.approx(missed[qb], abs=1e-5)
        json.dumps(d, allow_nan=False)
    print(f"{span} rows {max_rows}: {d['rows']} cells of {d['q_step']} blocks, {len(d['audited'])} audited rows")


def test_missed_rows_of_partial_and_old_traces(audited, old):
    est_only = views.missed_rows(variant(audited, missed=True, audit=False), 3, 1)
    assert est_only["has_missed"] and not est_only["has_audit"] and est_only["audited"] == []
    assert est_only["estimate"] == views.missed_rows(audited, 3, 1)["estimate"]
    audit_only = views.missed_rows(variant(audited, missed=False, audit=True), 3, 1)
    assert audit_only["estimate"] is None and len(audit_only["audited"]) == AUDIT_RATE
    assert "estimate" not in audit_only["audited"][0]
    none = views.missed_rows(old, 3, 1, max_rows=7)
    assert not none["has_missed"] and not none["has_audit"] and none["estimate"] is None and none["audited"] == []
    assert none["rows"] == views.block_grid(old, 3, 1, max_rows=7).values.shape[0]


def test_missed_by_layer_and_position_match_the_trace_api(audited, old):
    L, H = audited.num_layers, audited.num_heads
    est = torch.stack([torch.stack([audited.missed(li, h) for h in range(H)]) for li in range(L)]).double()
    audit = audited.audit()
    rows, exact = audit["query_block"], audit["missed"].double()
    by_layer = missed_by_layer(audited)
    for li in (0, 11, L - 1):
        flat = est[li].reshape(-1, 3)
        assert by_layer["estimate"]["mean"][li] == pytest.approx(flat.mean(0).tolist(), abs=1e-9)
        assert by_layer["estimate"]["p90"][li] == pytest.approx(torch.quantile(flat, 0.9, dim=0).tolist(), abs=1e-9)
        assert by_layer["estimate"]["at_audited"][li] == pytest.approx(est[li][:, rows, 0].mean().item(), abs=1e-9)
        mean, low, high = by_layer["audited"]["mean"][li]
        assert mean == pytest.approx(exact[li].mean().item(), abs=1e-9) and low <= mean <= high
        p90, low, high = by_layer["audited"]["p90"][li]
        assert p90 == pytest.approx(torch.quantile(exact[li].flatten(), 0.9).item(), abs=1e-9) and low <= p90 <= high
    # the layers' means average to the trace-wide figures audit_summary prints
    summary = audit_summary(audited)
    assert np.mean([m[0] for m in by_layer["audited"]["mean"]]) == pytest.approx(summary["missed_mean"][0])
    assert np.mean([m[0] for m in by_layer["estimate"]["mean"]]) == pytest.approx(summary["estimated_missed_mean"])
    by_pos = missed_by_position(audited)
    bins = by_pos["bins"]
    assert bins[0]["q0"] == 0 and bins[-1]["q1"] == audited.num_query_blocks
    assert all(a["q1"] == b["q0"] for a, b in zip(bins, bins[1:]))
    assert sum(b["audited_blocks"] for b in bins) == len(rows)
    for b in bins:
        part = est[:, :, b["q0"]:b["q1"]].reshape(-1, 3)
        assert b["estimate"] == pytest.approx(part.mean(0).tolist(), abs=1e-9)
        pick = (rows >= b["q0"]) & (rows < b["q1"])
        if pick.any():
            assert b["audited"][0] == pytest.approx(exact[..., pick].mean().item(), abs=1e-9)
            assert b["at_audited"] == pytest.approx(est[:, :, rows[pick], 0].mean().item(), abs=1e-9)
            assert (b["audited"][1] is None) == (int(pick.sum()) == 1)
        else:
            assert b["audited"] is None
    print("by position:", [(b["t0"], round(b["estimate"][0], 3), b["audited"] and round(b["audited"][0], 3))
                           for b in bins])
    assert missed_by_layer(old) is None and missed_by_position(old) is None
    json.dumps([by_layer, by_pos], allow_nan=False)


def test_viewer_serves_the_audit(audited, old):
    from sparsetrace.viz.server import make_server

    for trace, has in ((audited, True), (old, False)):
        server = make_server(trace, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            with urllib.request.urlopen(base + "/api/meta") as r:
                meta = json.loads(r.read())
            assert meta["audit"] == {"has_missed": has, "has_audit": has}
            assert ({"missed", "missed_audited", "recall"} <= set(meta["metrics"])) == has
            with urllib.request.urlopen(base + "/api/missed?layer=2&head=5&q0=4&q1=19&rows=6") as r:
                got = json.loads(r.read())
            assert got == json.loads(json.dumps(views.missed_rows(trace, 2, 5, 4, 19, max_rows=6)))
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + "/api/missed?layer=99&head=0")
            assert refused.value.code == 400 and "layer 99 out of range" in json.loads(refused.value.read())["error"]
        finally:
            server.shutdown()
            server.server_close()


def test_report_has_an_audit_section(audited, old):
    import matplotlib.image as mpimg

    page = report_html(audited, max_cells=32, n_heads=1)
    section = re.search(r'<section id="audit-panel" data-state="([^"]+)">(.*?)</section>', page, re.S)
    assert section and section.group(1) == "audit+estimate"
    body = section.group(2)
    summary = re.search(r'<pre id="audit-summary">(.*?)</pre>', body, re.S).group(1)
    assert html.unescape(summary).split("\n") == format_summary(audit_summary(audited))
    plots = dict(re.findall(r'<figure data-plot="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', body))
    assert list(plots) == ["by-layer", "by-position", "calibration"]
    for name, b64 in plots.items():
        img = mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")
        colours = len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))
        print(f"{name}: {img.shape[1]}x{img.shape[0]} px, {len(b64) * 3 // 4} bytes, {colours} colours")
        assert img.shape[0] > 250 and img.shape[1] > 250 and colours > 20
    assert "http://" not in body and "https://" not in body
    # the overview of the report can show the audit's metrics too
    data = json.loads(page.split('id="sparsetrace-data">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    assert {"missed", "missed_audited", "recall"} <= set(data["info"]["metrics"])
    # without the audit: a short note, no plots; audit=False: no section
    none = report_html(old, max_cells=16, n_heads=1)
    assert '<section id="audit-panel" data-state="none">' in none and "carries no audit" in none
    assert "data:image/png" not in none
    assert 'id="audit-panel"' not in report_html(audited, max_cells=16, n_heads=1, audit=False)
    for kept, state, n in (({"missed": True, "audit": False}, "estimate", 2),
                           ({"missed": False, "audit": True}, "audit", 2)):
        part = report_html(variant(audited, **kept), max_cells=16, n_heads=1)
        assert f'data-state="{state}"' in part and part.count("data:image/png;base64,") == n, state
    with pytest.raises(ValueError, match="missed a trace with an audit"):
        report_html(old, by="missed")


def test_report_leaves_pyplot_alone(audited):
    """Drawing the audit's plots never imports pyplot (which would switch a notebook's backend away from
    inline when a trace shows itself there)."""
    import subprocess
    import sys

    code = ("import sys; from sparsetrace import Trace; from sparsetrace.viz.report import report_html; "
            f"page = report_html(Trace.load({str(audited.path)!r}), max_cells=8, n_heads=1); "
            "assert page.count('data:image/png;base64,') == 3; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]


def test_report_picks_the_heads_that_miss_the_most(audited, tmp_path):
    from sparsetrace.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(audited.path), "--out", str(out), "--by", "missed", "--n-heads", "3",
                 "--max-cells", "16"]) == 0
    page = out.read_text(encoding="utf-8")
    data = json.loads(page.split('id="sparsetrace-data">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    means = {(li, h): audited.missed(li, h)[:, 0].double().mean().item()
             for li in range(audited.num_layers) for h in range(audited.num_heads)}
    want = sorted(means, key=lambda lh: (-means[lh], lh))[:3]
    assert [(p["layer"], p["head"]) for p in data["heads"]] == want
    assert [p["stats"]["missed"] for p in data["heads"]] == [pytest.approx(means[lh], abs=1e-6) for lh in want]
    assert 'data-state="audit+estimate"' in page
    print("heads that miss the most:", [(lh, round(means[lh], 3)) for lh in want])


# --------------------------------------------------------------------------- in the browser

def serve(trace):
    from sparsetrace.viz.server import make_server

    server = make_server(trace, port=0, cache_dir=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


PIXEL = """([sel, x, y]) => { const c = document.querySelector(sel), d = c.getContext('2d')
  .getImageData(Math.floor(x), Math.floor(y), 1, 1).data; return `rgb(${d[0]},${d[1]},${d[2]})`; }"""


def test_viewer_colours_heads_and_rows_by_missed_mass(browser, audited, tmp_path):
    server, url = serve(audited)
    try:
        page, errors = open_page(browser, url)
        wait_for(page, "(() => { const o = window.__sparsetrace.S.overview; "
                       "return o && o.done_layers === o.num_layers; })()", 120, errors)
        wait_for(page, "+document.body.dataset.missed >= 1", 30, errors)
        assert page.evaluate("document.getElementById('metric').value") == "missed"
        assert page.evaluate("!document.getElementById('overview-legend').hidden")
        assert "estimated missed mass" in page.evaluate("document.getElementById('overview-legend').textContent")
        # every overview cell has the colour of its head's mean estimated missed mass (from the Trace API)
        box = page.evaluate("document.getElementById('overview').cellBox")
        checked = 0
        for li in range(0, audited.num_layers, 4):
            for h in range(audited.num_heads):
                want = round(audited.missed(li, h)[:, 0].double().mean().item(), 6)  # as /api/overview
                x, y = box["left"] + h * box["cw"] + box["cw"] / 2, box["top"] + li * box["ch"] + box["ch"] / 2
                assert page.evaluate(PIXEL, ["#overview", x, y]) == page.evaluate("(x) => AUDIT.colour(x)", want)
                checked += 1
        # the strip beside the block map: each query row coloured by its estimate, audited rows by their exact value
        layer, head = page.evaluate("[window.__sparsetrace.S.layer, window.__sparsetrace.S.head]")
        strip = page.evaluate("(() => { const c = document.getElementById('missed-strip'); "
                              "return [c.width, c.height, c.getBoundingClientRect().toJSON()]; })()")
        W, H, rect = strip
        nq = audited.num_query_blocks
        est = audited.missed(layer, head)
        for qb in range(nq):
            y = (qb + 0.5) * H / nq
            assert page.evaluate(PIXEL, ["#missed-strip", W * 0.25, y]) == \
                page.evaluate("(x) => AUDIT.colour(x)", round(est[qb, 0].item(), 5)), qb
        a = audited.audit(layer, head)
        for qb, m in zip(a["query_block"].tolist(), a["missed"].tolist(), strict=True):
            y = (qb + 0.5) * H / nq
            assert page.evaluate(PIXEL, ["#missed-strip", W * 0.8, y]) == \
                page.evaluate("(x) => AUDIT.colour(x)", round(m, 5)), qb
        unaudited = next(q for q in range(nq) if q not in a["query_block"].tolist())
        assert page.evaluate(PIXEL, ["#missed-strip", W * 0.8, (unaudited + 0.5) * H / nq]) == "rgb(255,255,255)"
        # hover an audited row of the strip: estimate, interval, exact value and recall
        qb = int(a["query_block"][-1])
        page.mouse.move(rect["x"] + rect["width"] / 2, rect["y"] + (qb + 0.5) * rect["height"] / nq)
        tip = wait_for(page, "document.getElementById('tip').style.display === 'block' && "
                             "document.getElementById('tip').textContent", 10, errors)
        print("strip tooltip:", tip.replace("\n", " | "))
        assert f"query block {qb} " in tip and f"missed mass ≈ {est[qb, 0].item():.3f}" in tip
        assert f"interval {est[qb, 1].item():.3f}–{est[qb, 2].item():.3f}" in tip
        assert f"exact missed mass {a['missed'][-1].item():.3f}" in tip and "recall" in tip
        page.screenshot(path=tmp_path / "viewer-missed.png")
        # the block map's own tooltip names the row's missed mass too
        mrect = page.evaluate("document.getElementById('map').getBoundingClientRect().toJSON()")
        page.mouse.move(mrect["x"] + 3, mrect["y"] + (qb + 0.5) * mrect["height"] / nq)
        tip = wait_for(page, "document.getElementById('tip').textContent.includes('key block') && "
                             "document.getElementById('tip').textContent", 10, errors)
        assert f"missed mass ≈ {est[qb, 0].item():.3f}" in tip
        # another head: the strip follows
        before = int(page.evaluate("document.body.dataset.missed"))
        page.evaluate("window.__sparsetrace.showHead(2, 3)")
        wait_for(page, f"+document.body.dataset.missed > {before}", 30, errors)
        est = audited.missed(2, 3)
        assert page.evaluate(PIXEL, ["#missed-strip", W * 0.25, (nq - 0.5) * H / nq]) == \
            page.evaluate("(x) => AUDIT.colour(x)", round(est[nq - 1, 0].item(), 5))
        # the other metrics keep the overview's own scale and hide the legend
        page.select_option("#metric", "entropy")
        assert page.evaluate("document.getElementById('overview-legend').hidden")
        print(f"{checked} overview cells and {nq} strip rows match the Trace API")
        assert errors == [], errors
        page.close()
    finally:
        server.shutdown()
        server.server_close()


def test_report_shows_the_audit_section(browser, audited, tmp_path):
    out = tmp_path / "report.html"
    out.write_text(report_html(audited, max_cells=64), encoding="utf-8")
    page, errors = open_page(browser, out.as_uri())
    wait_for(page, "+document.body.dataset.drawn >= 4", 30, errors)
    assert page.evaluate("document.getElementById('audit-panel').dataset.state") == "audit+estimate"
    sizes = wait_for(page, "(() => { const im = [...document.querySelectorAll('#audit-panel img')]; "
                           "return im.length === 3 && im.every(i => i.complete && i.naturalWidth > 0) && "
                           "im.map(i => [i.dataset.plot || i.parentElement.dataset.plot, i.naturalWidth, "
                           "i.naturalHeight]); })()", 10, errors)
    print("report audit plots:", sizes)
    assert [s[0] for s in sizes] == ["by-layer", "by-position", "calibration"]
    assert "missed mass" in page.evaluate("document.getElementById('audit-summary').textContent")
    page.select_option("#metric", "missed")
    assert page.evaluate("!document.getElementById('overview-legend').hidden")
    page.evaluate("document.getElementById('audit-panel').scrollIntoView()")
    page.screenshot(path=tmp_path / "report-audit.png", full_page=True)
    assert errors == [], errors
    page.close()


def test_a_trace_without_an_audit_opens_as_before(browser, old, tmp_path):
    server, url = serve(old)
    requests = []
    try:
        page, errors = new_page(browser)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        wait_for(page, "document.body && document.body.dataset.drawn", 60, errors)
        wait_for(page, "(() => { const o = window.__sparsetrace.S.overview; "
                       "return o && o.done_layers === o.num_layers; })()", 60, errors)
        assert page.evaluate("document.getElementById('metric').value") == "entropy"
        assert "missed" not in page.evaluate("[...document.querySelectorAll('#metric option')].map(o => o.value)")
        assert page.evaluate("document.getElementById('missed-strip').hidden")
        assert page.evaluate("document.getElementById('missed-help').hidden")
        assert page.evaluate("document.getElementById('overview-legend').hidden")
        assert not any("/api/missed" in u for u in requests)
        page.screenshot(path=tmp_path / "viewer-old.png")
        assert errors == [], errors
        page.close()
    finally:
        server.shutdown()
        server.server_close()
    out = tmp_path / "report.html"
    out.write_text(report_html(old, max_cells=64), encoding="utf-8")
    page, errors = open_page(browser, out.as_uri())
    wait_for(page, "+document.body.dataset.drawn >= 4", 30, errors)
    assert page.evaluate("document.getElementById('audit-panel').dataset.state") == "none"
    assert "carries no audit" in page.evaluate("document.getElementById('audit-panel').textContent")
    assert errors == [], errors
    page.close()
