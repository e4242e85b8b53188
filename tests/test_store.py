"""Trace store: round trips, resume after a kill, corruption detection, exact sparsity."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sparsetrace.store import (
    FLOAT16_MAX_REL_ERROR,
    LOG8_MAX_REL_ERROR,
    Trace,
    TraceError,
    TraceWriter,
    atomic_write_bytes,
)

# Per-entry decode bound |got - want| <= rel * want + atol (see store.py for the derivation).
TOL = {"float16": (FLOAT16_MAX_REL_ERROR, 2.0**-25), "log8": (LOG8_MAX_REL_ERROR, 2.0**-25)}


def random_arrays(L, H, T, bq, bk, k, seed=0):
    """Valid indices/mass per the trace contract: causal blocks only, rows sorted, -1 padded at the
    end, masses spanning many decades (so log8's range is exercised) and summing to 1 per row."""
    g = torch.Generator().manual_seed(seed)
    nQ, nK = -(-T // bq), -(-T // bk)
    last = (torch.arange(nQ) * bq + bq - 1).clamp(max=T - 1)  # [nQ]
    n_causal = last // bk + 1  # [nQ]
    score = torch.rand(L, H, nQ, max(nK, k), generator=g)  # [L, H, nQ, nK']
    score[..., torch.arange(score.shape[-1]) >= n_causal[:, None]] = -1
    val, idx = score.topk(k, dim=-1)  # [L, H, nQ, k]
    idx = torch.where(val < 0, nK + 1, idx).sort(dim=-1).values  # padding sorts last
    idx = torch.where(idx > nK, -1, idx).to(torch.int32)
    mass = torch.exp(torch.randn(L, H, nQ, k, generator=g) * 5) * (idx >= 0)
    mass = mass / mass.sum(-1, keepdim=True)
    return idx, mass


def make_trace(L=3, H=2, T=203, bq=8, bk=6, k=5, seed=0, text=True):
    idx, mass = random_arrays(L, H, T, bq, bk, k, seed)
    tokens = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(seed))
    offsets = torch.stack([torch.arange(T) * 2, torch.arange(T) * 2 + 1], -1) if text else None
    meta = {"model": "tiny-test", "score": "max"}
    return Trace.from_arrays(
        idx, mass, block_q=bq, block_k=bk, meta=meta, tokens=tokens, token_offsets=offsets,
        text="ab" * T if text else None
    )


def writer_for(trace, path, **kw):
    return TraceWriter(
        path,
        meta=trace.manifest["meta"],
        tokens=trace.tokens,
        token_offsets=trace.token_offsets,
        text=trace.text,
        num_layers=trace.num_layers,
        num_heads=trace.num_heads,
        top_k=trace.top_k,
        block_q=trace.block_q,
        block_k=trace.block_k,
        **kw,
    )


def all_arrays(trace):
    layers = [trace.layer(li) for li in range(trace.num_layers)]
    return torch.stack([i for i, _ in layers]), torch.stack([m for _, m in layers])


def assert_mass_close(name, got, want, encoding):
    rel, atol = TOL[encoding]
    err = (got.double() - want.double()).abs()
    bound = rel * want.double().abs() + atol
    print(
        f"{name} [{encoding}]: max abs err {err.max():.3g}, max err/bound {(err / bound).max():.3f}"
    )
    assert bool((err <= bound).all()), f"{name}: error exceeds {encoding} bound"


def snapshot(path):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(path).iterdir())}


@pytest.mark.parametrize("encoding", ["float16", "log8"])
def test_round_trip(tmp_path, encoding):
    tr = make_trace()
    tr.save(tmp_path / "t", mass_encoding=encoding)
    back = Trace.load(tmp_path / "t")
    idx, mass = all_arrays(back)
    assert idx.dtype == torch.int32 and mass.dtype == torch.float32
    assert torch.equal(idx, tr._arrays["indices"])
    assert_mass_close("mass", mass, tr._arrays["mass"], encoding)
    assert bool((mass[idx < 0] == 0).all())
    row_err = (mass.sum(-1) - 1).abs().max()
    print(f"row-sum error [{encoding}]: {row_err:.3g}")
    assert row_err <= TOL[encoding][0] + 1e-6
    assert torch.equal(back.tokens, tr.tokens) and back.tokens.dtype == torch.int64
    assert torch.equal(back.token_offsets, tr.token_offsets) and back.text == tr.text
    assert back.meta["model"] == "tiny-test" and back.meta["num_layers"] == 3
    assert back.meta["mass_encoding"] == encoding
    assert (back.block_q, back.block_k, back.top_k, back.num_tokens) == (8, 6, 5, 203)
    assert back.sparsity == pytest.approx(tr.sparsity, abs=1e-12)
    assert back.nbytes == sum(p.stat().st_size for p in (tmp_path / "t").glob("*.safetensors"))
    assert "tokens=203" in repr(back) and "blocks 8x6" in repr(back) and "tiny-test" in repr(back)
    print(repr(back))


def test_indexing(tmp_path):
    tr = make_trace()
    tr.save(tmp_path / "t")
    for t in (tr, Trace.load(tmp_path / "t")):
        i, m = t[-1, -2]
        assert torch.equal(i, t.indices(2, 0)) and torch.equal(m, t.mass(2, 0))
        li, lm = t.layer(-3)
        assert torch.equal(li[1], t.indices(0, 1)) and torch.equal(lm[1], t.mass(0, 1))
        assert i.shape == (t.num_query_blocks, t.top_k)
        with pytest.raises(IndexError, match=r"layer 3 out of range .* 3 layers \(valid: -3..2\)"):
            t[3, 0]
        with pytest.raises(IndexError, match="head -3"):
            t.mass(0, -3)
        with pytest.raises(TypeError, match="trace\\[layer, head\\]"):
            t[0]
    i[:] = 7  # returned tensors are copies; the in-memory trace is unchanged
    assert not torch.equal(tr.indices(-1, -2), i)


def test_missed_and_audit_round_trip(tmp_path):
    """The per-row missed-mass estimate and the audited rows survive save, chunking and load; traces
    without them answer None; audited rows must lie in the chunk written."""
    tr = make_trace()
    L, H, nQ = tr.num_layers, tr.num_heads, tr.num_query_blocks
    g = torch.Generator().manual_seed(5)
    est = torch.rand(L, H, nQ, generator=g)
    missed = torch.stack([est, est * 0.8, (est * 1.2).clamp(max=1)], dim=-1)  # [L, H, nQ, 3]
    rows = torch.tensor([2, 11, 12, 24])  # two in the second shard of 10 query blocks
    audit = {"query_block": rows, "missed": torch.rand(L, H, 4, generator=g),
             "recall": torch.rand(L, H, 4, generator=g)}
    with_extras = Trace.from_arrays(tr._arrays["indices"], tr._arrays["mass"], block_q=tr.block_q,
                                    block_k=tr.block_k, tokens=tr.tokens, missed=missed, audit=audit)
    with_extras.save(tmp_path / "t", chunk_query_blocks=10)
    back = Trace.load(tmp_path / "t")
    assert back.has_missed and [s["audit_rows"] for s in back.manifest["shards"]] == [1, 2, 1]
    for layer, head in ((0, 0), (2, 1), (-1, -1)):
        assert torch.allclose(back.missed(layer, head), missed[layer, head], atol=1e-3)  # float16
        got = back.audit(layer, head)
        assert torch.equal(got["query_block"], rows)
        assert torch.equal(got["missed"], audit["missed"][layer, head])
        assert torch.equal(got["recall"], audit["recall"][layer, head])
    assert torch.equal(back.audit()["recall"], audit["recall"])
    assert tr.missed(0, 0) is None and tr.audit() is None and not tr.has_missed
    tr.save(tmp_path / "plain")
    assert Trace.load(tmp_path / "plain").missed(1, 1) is None and Trace.load(tmp_path / "plain").audit() is None
    with pytest.raises(ValueError, match="outside this chunk"):
        writer_for(tr, tmp_path / "w").write(0, tr._arrays["indices"][:, :, :5], tr._arrays["mass"][:, :, :5],
                                             audit={"query_block": torch.tensor([7]),
                                                    "missed": torch.zeros(L, H, 1), "recall": torch.zeros(L, H, 1)})


@pytest.mark.parametrize("bk,expect", [(6, "I16"), (1, "I32")])
def test_index_dtype(tmp_path, bk, expect):
    T = 40_000 if bk == 1 else 203  # 40000 key blocks > 32767 needs int32
    idx, mass = random_arrays(1, 1, T, 4096 if bk == 1 else 8, bk, 3)
    tr = Trace.from_arrays(
        idx,
        mass,
        block_q=4096 if bk == 1 else 8, block_k=bk,
        tokens=torch.zeros(T, dtype=torch.long),
    )
    tr.save(tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("indices").get_dtype() == expect
        assert f.get_slice("mass").get_dtype() == "F16"
    back = Trace.load(tmp_path / "t")
    assert torch.equal(back.indices(0, 0), idx[0, 0]) and back.indices(0, 0).dtype == torch.int32
    assert int(idx.max()) > 32767 or bk != 1


def test_chunked_writes_equal_single_write(tmp_path):
    tr = make_trace()
    idx, mass = tr._arrays["indices"], tr._arrays["mass"]
    tr.save(tmp_path / "one")
    w = writer_for(tr, tmp_path / "many")
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 26)]:  # uneven chunks, 26 query blocks in all
        w.write(a, idx[:, :, a:b].to(torch.int64), mass[:, :, a:b].double())
    w.finish()
    many, one = Trace.load(tmp_path / "many"), Trace.load(tmp_path / "one")
    assert len(many.manifest["shards"]) == 4
    for x, y in zip(all_arrays(many), all_arrays(one), strict=True):
        assert torch.equal(x, y)
    assert many.sparsity == one.sparsity


def test_resume_after_kill(tmp_path):
    tr = make_trace()
    idx, mass = tr._arrays["indices"], tr._arrays["mass"]
    chunks = [(0, 7), (7, 14), (14, 21), (21, 26)]
    w = writer_for(tr, tmp_path / "t")
    for a, b in chunks[:2]:
        w.write(a, idx[:, :, a:b], mass[:, :, a:b])
    del w  # "kill": plus debris a killed third write could leave behind
    (tmp_path / "t" / ".tmp-shard-00002.safetensors.dead").write_bytes(b"half a shard")
    (tmp_path / "t" / "shard-00002.safetensors").write_bytes(b"not in the manifest")
    with pytest.raises(TraceError, match="incomplete.*interrupted.*resumes"):
        Trace.load(tmp_path / "t")
    w = writer_for(tr, tmp_path / "t")
    assert w.completed_query_blocks == 14
    assert not (tmp_path / "t" / ".tmp-shard-00002.safetensors.dead").exists()
    for a, b in chunks[2:]:
        w.write(a, idx[:, :, a:b], mass[:, :, a:b])
    w.finish(extra={"fidelity": {"ok": True}})
    resumed = Trace.load(tmp_path / "t")
    tr.save(tmp_path / "ref")
    for x, y in zip(all_arrays(resumed), all_arrays(Trace.load(tmp_path / "ref")), strict=True):
        assert torch.equal(x, y)
    assert resumed.fidelity == {"ok": True}
    Trace.load(tmp_path / "t", verify=True)  # every listed shard verifies
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "manifest.json",
        *(f"shard-0000{i}.safetensors" for i in range(4)),
        "text.txt",
        "tokens.safetensors",
    ]
    # Rerunning a finished trace finds nothing to do and finishes again (the tracer relies on it).
    again = writer_for(tr, tmp_path / "t")
    assert again.completed_query_blocks == 26
    again.finish()
    assert Trace.load(tmp_path / "t").fidelity == {"ok": True}
    # A damaged shard in a finished trace: rerunning drops it and everything after it.
    (tmp_path / "t" / "shard-00001.safetensors").write_bytes(b"junk")
    assert writer_for(tr, tmp_path / "t").completed_query_blocks == 7


def test_the_same_trace_is_written_to_the_same_bytes(tmp_path):
    """Shard bytes depend on the rows alone (so sha256 can compare two runs), not on hash-map order."""
    tr = make_trace()
    digests = set()
    for i in range(8):
        tr.save(tmp_path / f"t{i}", chunk_query_blocks=10)
        digests.add(tuple(s["sha256"] for s in Trace.load(tmp_path / f"t{i}").manifest["shards"]))
    assert len(digests) == 1, digests


def test_resume_ignores_volatile_meta(tmp_path):
    tr = make_trace()
    meta = dict(tr.manifest["meta"])
    kw = dict(
        tokens=tr.tokens,
        token_offsets=tr.token_offsets,
        text=tr.text,
        num_layers=3,
        num_heads=2,
        top_k=5,
        block_q=8,
        block_k=6,
    )
    w = TraceWriter(tmp_path / "t", meta={**meta, "created": "monday"}, **kw)
    w.write(0, tr._arrays["indices"][:, :, :5], tr._arrays["mass"][:, :, :5])
    w = TraceWriter(tmp_path / "t", meta={**meta, "created": "tuesday"}, **kw)
    assert w.completed_query_blocks == 5


@pytest.mark.parametrize("change", ["tokens", "meta", "encoding"])
def test_different_trace_refused_untouched(tmp_path, change):
    tr = make_trace()
    w = writer_for(tr, tmp_path / "t")
    w.write(0, tr._arrays["indices"][:, :, :5], tr._arrays["mass"][:, :, :5])
    before = snapshot(tmp_path / "t")
    other = make_trace(seed=1) if change == "tokens" else tr
    kw = {"mass_encoding": "log8"} if change == "encoding" else {}
    if change == "meta":
        other = Trace.from_arrays(
            tr._arrays["indices"], tr._arrays["mass"],
            block_q=tr.block_q,
            block_k=tr.block_k,
            meta={**tr.manifest["meta"], "model": "another"},
            tokens=tr.tokens,
            token_offsets=tr.token_offsets,
            text=tr.text,
        )
    with pytest.raises(
        ValueError,
        match="already holds a trace of another input/config; pass a new "
        "--out directory or delete it",
    ):
        writer_for(other, tmp_path / "t", **kw)
    assert snapshot(tmp_path / "t") == before


def test_non_trace_dirs(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("mine")
    before = snapshot(d)
    with pytest.raises(TraceError, match=r"not a trace.*nothing was changed"):
        writer_for(make_trace(), d)
    assert snapshot(d) == before
    with pytest.raises(TraceError, match=f"{re.escape(str(d))} has no manifest.json"):
        Trace.load(d)
    with pytest.raises(TraceError, match="no manifest.json"):
        Trace.load(tmp_path / "missing")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(TraceError, match="manifest.json is unreadable or corrupt"):
        Trace.load(d)
    (d / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(TraceError, match="not a sparsetrace manifest"):
        Trace.load(d)
    with pytest.raises(TraceError, match="not a sparsetrace manifest"):
        writer_for(make_trace(), d)
    # Only our temp files: a run killed while writing its first manifest; starting over is fine.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".tmp-manifest.json.ab12").write_bytes(b"{")
    assert writer_for(make_trace(), tmp_path / "fresh").completed_query_blocks == 0
    assert not list((tmp_path / "fresh").glob(".tmp-*"))


@pytest.fixture
def saved(tmp_path):
    tr = make_trace()
    tr.save(tmp_path / "t", chunk_query_blocks=10)  # 3 shards
    return tmp_path / "t"


def test_truncated_shard(saved):
    p = saved / "shard-00001.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    for verify in (True, False):  # size is always checked
        with pytest.raises(TraceError, match=r"shard-00001\.safetensors is truncated"):
            Trace.load(saved, verify=verify)


@pytest.mark.parametrize("name", ["shard-00002.safetensors", "tokens.safetensors", "text.txt"])
def test_flipped_byte(saved, name):
    p = saved / name
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=rf"{re.escape(name)} is corrupt \(sha256 mismatch\)"):
        Trace.load(saved)


def flip_byte(path: Path) -> None:
    """Change one byte of ``path`` in place: same size, other content."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_lazy_load_hashes_each_shard_before_its_first_read(saved):
    """Opening without `verify` reads no shard bytes; the first read of a damaged shard raises, reads
    of intact shards work, and the damaged one never reads as valid later either."""
    flip_byte(saved / "shard-00001.safetensors")  # query blocks 10..19
    t = Trace.load(saved, verify=False)
    idx, _ = t.rows(0, 0, 0, 10)  # shard 0 only
    assert idx.shape == (10, 5)
    for read in (lambda: t.rows(0, 0, 5, 15), lambda: t[0, 1], lambda: t.layer(2), lambda: t.rows(1, 1, 12, 13)):
        with pytest.raises(TraceError, match=r"shard-00001\.safetensors is corrupt \(sha256 mismatch\)"):
            read()
    assert t.rows(0, 0, 20, 26)[0].shape == (6, 5)  # shard 2 is fine


def test_resume_drops_a_shard_whose_bytes_changed_but_not_its_size(tmp_path):
    tr = make_trace()
    idx, mass = tr._arrays["indices"], tr._arrays["mass"]
    w = writer_for(tr, tmp_path / "t")
    for a, b in [(0, 7), (7, 14), (14, 21)]:
        w.write(a, idx[:, :, a:b], mass[:, :, a:b])
    flip_byte(tmp_path / "t" / "shard-00001.safetensors")
    w = writer_for(tr, tmp_path / "t")  # a rerun of the killed trace
    assert w.completed_query_blocks == 7, "a shard with other bytes of the same size was kept"
    assert not (tmp_path / "t" / "shard-00002.safetensors").exists()


def test_missing_shard(saved):
    (saved / "shard-00000.safetensors").unlink()
    with pytest.raises(TraceError, match=r"shard-00000\.safetensors is missing"):
        Trace.load(saved)


def test_update_manifest_keeps_shards(saved):
    before = {p.name: p.read_bytes() for p in saved.glob("*.safetensors")}
    t = Trace.load(saved)
    t.update_manifest(fidelity={"k": 16, "agree": 0.99}, anchors=[1, 2])
    assert t.fidelity == {"k": 16, "agree": 0.99}
    back = Trace.load(saved)
    assert back.fidelity == {"k": 16, "agree": 0.99} and back.manifest["anchors"] == [1, 2]
    assert {p.name: p.read_bytes() for p in saved.glob("*.safetensors")} == before
    with pytest.raises(ValueError, match="managed by the store"):
        t.update_manifest(shards=[])
    with pytest.raises(ValueError, match="JSON-able"):
        t.update_manifest(bad=float("nan"))
    assert not list(saved.glob(".tmp-*"))


def test_writer_validation(tmp_path):
    tr = make_trace()
    idx, mass = tr._arrays["indices"], tr._arrays["mass"]
    w = writer_for(tr, tmp_path / "t")
    with pytest.raises(ValueError, match="chunks must arrive in order"):
        w.write(3, idx[:, :, 3:5], mass[:, :, 3:5])
    with pytest.raises(ValueError, match="expected indices and mass"):
        w.write(0, idx[:2, :, :5], mass[:2, :, :5])
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 34\)"):
        w.write(0, idx[:, :, :5] + 100, mass[:, :, :5])
    with pytest.raises(ValueError, match="0 where indices is -1"):
        w.write(0, torch.full_like(idx[:, :, :5], -1), mass[:, :, :5])
    with pytest.raises(ValueError, match="write the rest"):
        w.finish()
    with pytest.raises(ValueError, match="mass_encoding"):
        writer_for(tr, tmp_path / "u", mass_encoding="int4")
    with pytest.raises(ValueError, match="positive int block_q and block_k"):
        TraceWriter(tmp_path / "v", meta={}, tokens=tr.tokens, num_layers=1, num_heads=1, top_k=1,
                    block_q=0, block_k=6)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "T,bq,bk,k",
    [(23, 4, 3, 3), (23, 3, 4, 2), (17, 5, 5, 2), (20, 1, 3, 4), (9, 8, 1, 5), (40, 16, 4, 3)],
)
def test_sparsity_matches_dense_count(T, bq, bk, k):
    L, H = 2, 2  # ragged blocks, block_q < / = / > block_k
    tr = make_trace(L, H, T, bq, bk, k, seed=3, text=False)
    idx = tr._arrays["indices"]
    kept = [0] * L
    pos = torch.arange(T)
    for layer in range(L):
        for h in range(H):
            dense = torch.zeros(T, T, dtype=torch.bool)  # [query token, key token]
            for i in range(idx.shape[2]):
                for j in idx[layer, h, i].tolist():
                    if j >= 0:
                        dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk] = True
            kept[layer] += int((dense & (pos[None, :] <= pos[:, None])).sum())
    want = 1 - sum(kept) / (L * H * T * (T + 1) / 2)
    print(f"sparsity {tr.sparsity:.6f} vs dense count {want:.6f}")
    assert tr.sparsity == pytest.approx(want, abs=1e-12)
    for layer in range(L):  # one layer's own count
        assert tr.layer_sparsity(layer) == pytest.approx(1 - kept[layer] / (H * T * (T + 1) / 2), abs=1e-12)
    # top_k >= key blocks keeps every causal block: sparsity 0
    full, _ = random_arrays(1, 1, T, bq, bk, k=-(-T // bk))
    dense_tr = Trace.from_arrays(
        full, torch.zeros(full.shape), block_q=bq, block_k=bk, tokens=torch.zeros(T)
    )
    assert dense_tr.sparsity == pytest.approx(0.0, abs=1e-12)


def test_log8_codes():
    from sparsetrace.store import decode_mass, encode_mass

    m = torch.tensor([0.0, 1.0, 0.5, 2.0**-24, 2.0**-25 * 1.01, 2.0**-26, 1e-3, 1 + 1e-7])
    code = encode_mass(m, "log8")
    assert code.dtype == torch.uint8 and code.tolist()[:6] == [0, 255, 244, 1, 1, 0]
    d = decode_mass(code)
    assert d[0] == 0 and d[1] == 1 and d[-1] == 1
    assert abs(d[6] / 1e-3 - 1) <= LOG8_MAX_REL_ERROR


def test_repr_with_tracer_meta():
    idx, mass = random_arrays(1, 1, 64, 32, 32, 2)
    meta = {"model_id": "", "model": {"architecture": "LlamaForCausalLM"}}
    r = repr(Trace.from_arrays(idx, mass, block_q=32, block_k=32, meta=meta, tokens=torch.zeros(64)))
    print(r)
    assert r.startswith("Trace(model=LlamaForCausalLM, tokens=64, layers=1, heads=1")
    assert "in memory vs 4.1 KiB dense" in r


def test_dense_bytes_and_nbytes(saved):
    t = Trace.load(saved)
    T = 203
    assert t.dense_bytes == 3 * 2 * T * (T + 1) // 2 * 2
    files = [*saved.glob("shard-*.safetensors"), saved / "tokens.safetensors"]
    assert t.nbytes == sum(p.stat().st_size for p in files)


def test_atomic_write_and_no_pickle(tmp_path):
    atomic_write_bytes(tmp_path / "x.bin", b"abc")
    atomic_write_bytes(tmp_path / "x.bin", b"defg")
    assert (tmp_path / "x.bin").read_bytes() == b"defg" and os.listdir(tmp_path) == ["x.bin"]
    src = Path(__import__("sparsetrace.store", fromlist=["x"]).__file__).read_text()
    # safetensors.torch.load_file is fine; torch.load / np.load(allow_pickle) / pickle are not
    assert not re.search(
        r"\bimport pickle|\bpickle\.|\btorch\.load\b|\bnp\.load\b|numpy\.load\b|"
        r"weights_only|allow_pickle|marshal",
        src,
    )
