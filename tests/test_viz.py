"""Viewer data functions against brute force on small awkward traces; plot, report, bad inputs.

The references build the dense [nQ, nK] block-mass matrix (and the token mask, with loops) that
the library never builds, then aggregate it with plain reshapes."""

from __future__ import annotations

import base64
import csv
import json
import math
import socket
import threading

import numpy as np
import pytest
import torch
from helpers import loop_token_mask, random_block_rows

from sparsetrace import Trace
from sparsetrace.cli import main
from sparsetrace.errors import UsageError
from sparsetrace.store import LOG8_MAX_REL_ERROR, decode_mass
from sparsetrace.viz import views as data
from sparsetrace.viz.report import Report, report_data, report_html
from sparsetrace.viz.synthetic import synthetic_text, write_synthetic_trace


def random_trace(T=203, L=2, H=3, k=5, bq=8, bk=6, seed=0, text=True) -> Trace:
    """An in-memory trace with valid random rows (sorted, unique, causal, -1 padded)."""
    idx, mass = random_block_rows(L, H, T, bq, bk, k, seed)
    txt, tokens, offsets = synthetic_text(T, seed)
    return Trace.from_arrays(idx, mass, block_q=bq, block_k=bk, meta={"model_id": "random"}, tokens=tokens,
                             token_offsets=offsets if text else None, text=txt if text else None)


def dense(trace, layer, head) -> np.ndarray:
    """float64 [nQ, nK]: mass of every kept (query block, key block), by loops."""
    idx, mass = trace[layer, head]
    out = np.zeros((trace.num_query_blocks, trace.num_key_blocks))
    for i, (row, mrow) in enumerate(zip(idx.tolist(), mass.tolist(), strict=True)):
        for j, m in zip(row, mrow, strict=True):
            if j >= 0:
                out[i, j] = m
    return out


def aggregate(d: np.ndarray, q0, q1, k0, k1, qs, ks, reduce) -> np.ndarray:
    sub = d[q0:q1, k0:k1]
    rows, cols = math.ceil((q1 - q0) / qs), math.ceil((k1 - k0) / ks)
    out = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            cell = sub[r * qs:(r + 1) * qs, c * ks:(c + 1) * ks]
            out[r, c] = cell.max() if reduce == "max" else cell.sum() / cell.shape[0]
    return out


@pytest.fixture(scope="module")
def small():
    return random_trace()


@pytest.mark.parametrize("reduce", data.REDUCES)
@pytest.mark.parametrize("view,cells", [
    ((None, None, None, None), (7, 9)),          # whole trace, ragged cells
    ((3, 20, 5, 33), (4, 100)),                  # a viewport; columns one per block
    ((25, 26, 0, 34), (1, 3)),                   # one query block
    ((-5, 1000, -2, 1000), (1000, 1000)),        # clipped to the trace
])
def test_block_grid_matches_dense(small, reduce, view, cells):
    for layer, head in ((0, 0), (1, 2), (-1, -1)):
        g = data.block_grid(small, layer, head, *view, max_rows=cells[0], max_cols=cells[1],
                            reduce=reduce)
        want = aggregate(dense(small, layer, head), g.q0, g.q1, g.k0, g.k1, g.q_step, g.k_step,
                         reduce)
        assert g.values.shape == want.shape and g.values.shape[0] <= cells[0]
        assert g.values.shape[1] <= cells[1]
        err = np.abs(g.values - want).max()
        print(f"{reduce} {view} {cells} L{layer} H{head}: grid {g.values.shape}, "
              f"steps {g.q_step}x{g.k_step}, max |diff| {err:.2e}")
        assert err < 1e-6


def test_block_grid_on_disk_reads_only_the_viewport(tmp_path, monkeypatch):
    trace = write_synthetic_trace(tmp_path / "t", num_tokens=3000, num_layers=2, num_heads=2,
                                  top_k=6, block_size=16, chunk_blocks=50)
    asked = []
    orig = trace._read
    monkeypatch.setattr(trace, "_read", lambda name, l, h, q: asked.append(q) or orig(name, l, h, q))
    g = data.block_grid(trace, 1, 1, 40, 90, 10, 60, max_rows=16, max_cols=16, reduce="sum")
    assert {(q.start, q.stop) for q in asked} == {(40, 90)}
    want = aggregate(dense(trace, 1, 1), 40, 90, 10, 60, g.q_step, g.k_step, "sum")
    assert np.abs(g.values - want).max() < 1e-6


def test_int32_indices_and_log8_mass_on_disk(tmp_path):
    """Past 32767 key blocks the store keeps int32 indices; log8 mass decodes to float32."""
    trace = write_synthetic_trace(tmp_path / "t", num_tokens=33_000, num_layers=1, num_heads=1,
                                  top_k=4, block_size=1, chunk_blocks=11_000, with_text=False,
                                  mass_encoding="log8")
    assert trace.manifest["index_dtype"] == "int32" and trace.num_key_blocks == 33_000
    q0, q1, k0, k1 = 32_000, 33_000, 31_990, 33_000
    idx, mass = trace[0, 0]
    want = np.zeros((q1 - q0, k1 - k0))
    for i in range(q0, q1):
        for j, m in zip(idx[i].tolist(), mass[i].tolist(), strict=True):
            if k0 <= j < k1:
                want[i - q0, j - k0] = m
    for reduce in data.REDUCES:
        g = data.block_grid(trace, 0, 0, q0, q1, k0, k1, max_rows=300, max_cols=70,
                            reduce=reduce)
        ref = aggregate(want, 0, q1 - q0, 0, k1 - k0, g.q_step, g.k_step, reduce)
        assert g.values.shape == ref.shape and np.abs(g.values - ref).max() < 1e-6
    whole = data.block_grid(trace, 0, 0, max_rows=500, max_cols=500)
    assert whole.values.shape == (500, 500) and whole.q_step == 66


@pytest.mark.parametrize("T,bq,bk", [(203, 8, 6), (100, 5, 16), (64, 16, 16), (37, 4, 4)])
def test_kept_pairs_and_sparsity_match_token_mask(T, bq, bk):
    trace = random_trace(T=T, bq=bq, bk=bk, k=4, L=1, H=2, seed=T)
    stats = data.head_stats(trace)
    for h in range(2):
        idx = trace.indices(0, h)
        mask = loop_token_mask(idx[None, None], bq, bk, T, T)[0, 0]          # [T, T]
        per_row = [int(mask[i * bq:(i + 1) * bq].sum()) for i in range(trace.num_query_blocks)]
        got = data.kept_pairs_per_row(idx, 0, bq, bk, T)
        assert got.tolist() == per_row
        want = 1 - mask.sum().item() / (T * (T + 1) / 2)
        print(f"T={T} bq={bq} bk={bk} head {h}: sparsity {stats['sparsity'][0, h]:.6f} "
              f"loop {want:.6f}")
        assert stats["sparsity"][0, h] == pytest.approx(want, abs=1e-12)
    assert stats["sparsity"].mean() == pytest.approx(trace.sparsity, abs=1e-12)


def test_head_stats_match_loops(small):
    s = data.head_stats(small)
    T, bq, bk = small.num_tokens, small.block_q, small.block_k
    for layer in range(small.num_layers):
        for head in range(small.num_heads):
            idx, mass = small[layer, head]
            ent, diag, sink = [], [], []
            for i, (row, mrow) in enumerate(zip(idx.tolist(), mass.tolist(), strict=True)):
                p = [m / sum(mrow) for m in mrow]
                ent.append(-sum(x * math.log2(x) for x in p if x > 0))
                d = (min((i + 1) * bq, T) - 1) // bk
                diag.append(sum(x for j, x in zip(row, p, strict=True) if j == d))
                sink.append(sum(x for j, x in zip(row, p, strict=True) if j == 0 and d != 0))
            for name, want in (("entropy", ent), ("diagonal", diag), ("sink", sink)):
                assert s[name][layer, head] == pytest.approx(np.mean(want), abs=1e-5), name
            assert s["other"][layer, head] == pytest.approx(1 - np.mean(diag) - np.mean(sink),
                                                            abs=1e-5)
    top = data.top_heads(s, 3)
    assert len(top) == 3 and s["other"][top[0]] == np.nanmax(s["other"])


def test_received_and_token_pieces(small):
    d = dense(small, 1, 0)
    got = data.received(small, 1, 0, 4, 9)
    assert np.abs(got - d[4:9].sum(0) / 5).max() < 1e-6
    pieces = data.token_pieces(small, 0, small.num_tokens)
    assert "".join(pieces) == small.text[: small.token_offsets[-1, 1]]
    assert data.token_pieces(small, 10, 13) == pieces[10:13]
    bare = random_trace(T=40, text=False)
    assert data.token_pieces(bare, 0, 2) == [f"⟨{int(t)}⟩" for t in bare.tokens[:2]]


def test_bad_layer_head_and_ranges(small):
    with pytest.raises(ValueError, match=r"layer 99 out of range for a trace with 2 layers \(valid: -2..1\)"):
        data.block_grid(small, 99, 0)
    with pytest.raises(ValueError, match="head 3 out of range"):
        data.block_grid(small, 0, 3)
    with pytest.raises(ValueError, match="empty query block range"):
        data.block_grid(small, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="reduce"):
        data.block_grid(small, 0, 0, reduce="mean")


def test_load_analysis_formats(tmp_path, small):
    a = tmp_path / "anchors"
    a.mkdir()
    with open(a / "heads.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "kurtosis", "other"])
        w.writerows([[0, 0, "", 9], [0, 1, 3.5, 9], [1, 2, 7.25, 9]])  # "" = NaN kurtosis
    n = tmp_path / "niah"
    n.mkdir()
    # the niah command's shape: one [L][H] needle-mass matrix per case and k -> mean
    cases = [{"id": i, "k": 8, "needle_mass": [[0.0, 0.1, 0.2], [0.2 + 0.4 * i, 0.0, 0.0]],
              "needle_mass_max": [0.2, 0.6]} for i in range(2)]
    (n / "routes.json").write_text(json.dumps({"cases": cases, "comparison": {
        "8": {"heads": [{"layer": 0, "head": 0, "mass": 9.0}]}}}))
    got = data.load_analysis(small, anchors=a, niah=n)
    assert got["kurtosis"][0, 1] == 3.5 and got["kurtosis"][1, 2] == 7.25
    assert np.isnan(got["kurtosis"][0, 0])
    assert got["needle_mass"][1, 0] == pytest.approx(0.4) and got["needle_mass"][0, 0] == 0
    (a / "heads.csv").unlink()
    (a / "anchors.json").write_text(json.dumps({"kurtosis": [[1, 2, 3], [4, 5, 6]]}))
    assert data.load_analysis(small, anchors=a)["kurtosis"][1, 2] == 6
    (a / "anchors.json").write_text(json.dumps([{"layer": 40, "head": 0, "kurtosis": 1}]))
    with pytest.raises(ValueError, match="another trace"):
        data.load_analysis(small, anchors=a)
    with pytest.raises(UsageError):
        data.load_analysis(small, niah=tmp_path / "nope")
    assert data.load_analysis(small) == {}


def test_plot_writes_a_real_picture(tmp_path):
    import matplotlib.image as mpimg

    trace = random_trace(T=5000, bq=16, bk=16, k=6, L=1, H=1)
    out = tmp_path / "map.png"
    assert main(["plot", "--layer", "0", "--head", "0", "--out", str(out),
                 "--max-cells", "200", str(tmp_path / "x")]) == 2  # not a trace dir
    trace.save(tmp_path / "t")
    assert main(["plot", str(tmp_path / "t"), "--layer", "0", "--head", "0", "--out",
                 str(out)]) == 0
    img = mpimg.imread(out)
    colours = len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    print(f"{out.stat().st_size} bytes, {img.shape}, {colours} colours")
    assert out.stat().st_size > 20_000 and colours > 50


def test_report_is_self_contained(tmp_path):
    trace = random_trace(T=3000, bq=16, bk=16, k=6)
    html = report_html(trace, max_cells=64)
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    payload = html.split('id="sparsetrace-data">', 1)[1].split("</script>", 1)[0]
    d = json.loads(payload.replace("<\\/", "</"))
    assert len(d["heads"]) == 4 and d["heads"][0]["grid"]["rows"] <= 64
    assert set(d["metrics"]) >= {"sparsity", "entropy", "other"}
    picked = report_data(trace, heads=[(1, 2)], max_cells=8)["heads"]
    assert [(p["layer"], p["head"]) for p in picked] == [(1, 2)]
    r = Report(trace, max_cells=32)
    assert r._repr_html_().startswith("<iframe srcdoc=") and "&lt;script" in r._repr_html_()
    trace.save(tmp_path / "t")
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "t"), "--out", str(out), "--heads", "0:1,1:0"]) == 0
    page = out.read_text()
    written = json.loads(page.split('id="sparsetrace-data">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    assert [(p["layer"], p["head"]) for p in written["heads"]] == [(0, 1), (1, 0)]
    assert written["info"]["num_tokens"] == 3000 and written["info"]["model"] == "random"
    for panel in written["heads"]:  # the embedded block maps decode to the trace's own grids
        g = data.block_grid(Trace.load(tmp_path / "t"), panel["layer"], panel["head"], max_rows=256,
                            max_cols=256)
        codes = torch.frombuffer(bytearray(base64.b64decode(panel["codes"])), dtype=torch.uint8)
        decoded = decode_mass(codes).view(panel["grid"]["rows"], panel["grid"]["cols"]).numpy()
        assert decoded.shape == g.values.shape
        assert np.allclose(decoded, g.values, rtol=LOG8_MAX_REL_ERROR + 1e-6, atol=2.0**-25)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "heads.csv").write_text("layer,head,kurtosis\n1,1,9.5\n0,2,1.0\n")
    d = report_data(trace, anchors=tmp_path / "a", by="kurtosis", n_heads=2, max_cells=8)
    assert [(p["layer"], p["head"]) for p in d["heads"]] == [(1, 1), (0, 2)]
    assert d["heads"][0]["stats"]["kurtosis"] == 9.5 and "kurtosis" in d["info"]["metrics"]
    with pytest.raises(ValueError, match="needs --niah"):
        report_data(trace, by="needle_mass")


def test_cli_bad_inputs(tmp_path, capsys):
    trace = random_trace(T=300, bq=16, bk=16, k=4)
    trace.save(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    cases = [
        (["view", str(tmp_path / "empty")], "not a trace directory"),
        (["plot", str(tmp_path / "t"), "--layer", "99", "--head", "0", "--out",
          str(tmp_path / "m.png")], "layer 99 out of range for a trace with 2 layers (valid: -2..1)"),
        (["plot", str(tmp_path / "t"), "--layer", "0", "--head", "7", "--out",
          str(tmp_path / "m.png")], "head 7 out of range for a trace with 3 heads (valid: -3..2)"),
        (["plot", str(tmp_path / "t"), "--layer", "0", "--head", "0", "--out",
          str(tmp_path / "m.txt")], "give a .png"),
        (["report", str(tmp_path / "t"), "--out", str(tmp_path / "no" / "r.html")],
         "does not exist"),
        (["report", str(tmp_path / "t"), "--out", str(tmp_path / "r.html"), "--heads", "5:0"],
         "layer 5 out of range"),
        (["view", str(tmp_path / "t"), "--host", "0.0.0.0"], "not a loopback address"),
    ]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases.append((["view", str(tmp_path / "t"), "--port", str(port)],
                      f"port {port} is in use; pass --port another or 0 for a free one"))
        for argv, msg in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            print(err.strip())
            assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_every_reader_refuses_a_corrupt_shard(tmp_path, capsys):
    """A shard whose bytes changed (same size) is never read as valid: `plot`, `report` and `fidelity
    --trace` stop with one sentence and write nothing; the viewer answers the requests that would read it
    with that sentence (and serves the intact shards)."""
    import urllib.error
    import urllib.request

    from sparsetrace.viz.server import make_server

    path = tmp_path / "t"
    write_synthetic_trace(path, num_tokens=640, num_layers=2, num_heads=2, top_k=4, block_size=16,
                          chunk_blocks=16)  # 40 query blocks, shards of 16
    shard = path / "shard-00001.safetensors"  # query blocks 16..31
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    says = "shard-00001.safetensors is corrupt (sha256 mismatch)"
    commands = [["plot", str(path), "--layer", "0", "--head", "0", "--out", str(tmp_path / "m.png")],
                ["report", str(path), "--out", str(tmp_path / "r.html")],
                ["fidelity", "--trace", str(path)]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "r.html").exists()

    server = make_server(Trace.load(path, verify=False), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/api/grid?layer=0&head=1"
    try:
        with urllib.request.urlopen(base + "&q0=0&q1=16") as ok:  # shard 0 only
            assert ok.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "&q0=10&q1=20")
        assert refused.value.code == 400 and says in json.loads(refused.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_sources_endpoint_and_the_report_embed_the_sources(tmp_path):
    """/api/sources answers what analysis.sources computes (cached, bad spans are a 400 with the sentence);
    the report embeds the last block's sources; a trace shows itself in a notebook (no sources there)."""
    import urllib.error
    import urllib.request

    from sparsetrace.analysis.sources import sources
    from sparsetrace.viz.server import make_server

    random_trace(T=3000, bq=16, bk=16, k=6).save(tmp_path / "t")
    trace = Trace.load(tmp_path / "t")
    want = sources(trace, (2900, 3000), top=8)
    server = make_server(trace, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/api/sources"
    try:
        with urllib.request.urlopen(base + "?t0=2900&t1=3000") as r:
            body = r.read()
        got = json.loads(body)
        assert got["span"] == [2900, 3000] and got["num_layers"] == 2 and got["unit"] == "sentence"
        assert [p["token_start"] for p in got["top"]] == [p["token_start"] for p in want.top(8)]
        assert all(len(p["entry"]) == 2 and p["text"] for p in got["top"])
        assert np.allclose(got["blocks"], want.score.numpy(), rtol=1e-3, atol=1e-12)
        with urllib.request.urlopen(base + "?t0=2900&t1=3000") as again:
            assert again.read() == body  # kept: a long trace takes seconds per span
        for query, says in [("?t0=5000&t1=6000", "holds no token"), ("?t0=1&t1=9&residual=x", "not a number"),
                            ("?t0=1&t1=9&aggregate=sum", "aggregate")]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + query)
            assert refused.value.code == 400 and says in json.loads(refused.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()
    embedded = report_data(trace, max_cells=8)["sources"]
    last = sources(trace, top=8)
    assert embedded["span"] == [2992, 3000] and len(embedded["top"]) == 8
    assert [p["token_start"] for p in embedded["top"]] == [p["token_start"] for p in last.top(8)]
    assert report_data(trace, max_cells=8, sources=False)["sources"] is None
    import sparsetrace as st  # its root registers how a Trace shows in a notebook

    shown = st.Trace.load(tmp_path / "t")._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "&quot;sources&quot;: null" in shown


def test_sources_view_carries_the_error_bars_of_an_audited_trace(tmp_path):
    """A trace with missed-mass estimates (as the tracer records them): the view's per-block low/high are
    analysis.sources' bars, read from the shards; a trace without estimates has none."""
    from sparsetrace.analysis.sources import sources
    from sparsetrace.viz.views import sources_view

    plain = random_trace(T=400, bq=8, bk=8, k=5)
    L, H, nQ = plain.num_layers, plain.num_heads, plain.num_query_blocks
    mu = torch.rand(L, H, nQ, 1, generator=torch.Generator().manual_seed(0)) * 0.3
    indices, mass = (torch.stack(x) for x in zip(*(plain.layer(layer) for layer in range(L))))  # [L, H, nQ, k]
    audited = Trace.from_arrays(indices, mass, block_q=8, block_k=8,
                                tokens=plain.tokens, token_offsets=plain.token_offsets, text=plain.text,
                                missed=torch.cat([mu, mu * 0.5, mu * 1.5], -1))
    audited.save(tmp_path / "t")
    trace = Trace.load(tmp_path / "t")
    view, want = sources_view(trace, 300, 400), sources(trace, (300, 400))
    assert view["missed_mass"] and 0 < view["unattributed"] < 1
    assert np.allclose(view["blocks_low"], want.low.numpy(), rtol=1e-3, atol=1e-12)
    assert np.allclose(view["blocks_high"], want.high.numpy(), rtol=1e-3, atol=1e-12)
    assert all(lo <= s <= hi for lo, s, hi in zip(view["blocks_low"], view["blocks"], view["blocks_high"]))
    assert "blocks_low" not in sources_view(plain, 300, 400)
