"""Needle-in-a-haystack runs: decode RULER cases greedily, dense and with sparse attention, and score them.

For each case (``sparsetrace.datasets.ruler``) the dense run uses the model's own attention; each sparse
run uses the registered sparse attention under a ``TraceConfig`` and keeps its prefill's trace, from which
``sparsetrace.analysis.routes`` reads where the answer looks for the needle. Outputs of a sweep:

  results.csv      one row per case and k: id, variant, length, depth, k ("dense" for the dense run),
                   sparsity, kept_blocks (per row, on average), capped_share (under a coverage budget:
                   the share of rows whose max-k blocks held less than P), score (RULER
                   string_match_all), criterion (first two greedy tokens equal the dense run's), output,
                   num_tokens, seconds
  routes.json      per case and sparse k: needle mass per layer and head, the best needle-to-answer
                   route; per k: success-vs-failure head comparison
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis.routes import case_report, compare_heads
from ..datasets.ruler import NiahCase, encode, max_new_tokens, string_match_all
from ..errors import UsageError
from ..store import Trace
from ..tracing.backend import sparse_model
from ..tracing.forward import greedy_decode
from ..tracing.tracer import join_chunks, trace_meta

COLUMNS = ["id", "variant", "length", "depth", "k", "sparsity", "kept_blocks", "capped_share", "score", "criterion",
           "output", "num_tokens", "seconds"]


@dataclass
class CaseRun:
    """One greedy decode of a case: ``tokens`` generated, ``output`` their text, ``score``
    (string_match_all), and for a sparse run the prefill's ``trace`` (a :class:`Trace`)."""

    tokens: list[int]
    output: str
    score: float
    trace: object | None = None
    seconds: float = 0.0


def run_case(model, tokenizer, case: NiahCase, config=None, *, max_new: int | None = None,
             model_id: str = "") -> CaseRun:
    """Decode ``case`` greedily, dense (``config=None``, the model's own attention) or with STREAM
    attention under ``config`` (a ``TraceConfig``), and score it with string_match_all.

    Decoding stops at EOS, after ``max_new`` tokens (default :func:`max_new_tokens`), or once every
    expected value has appeared (which cannot change the score). A sparse run also returns the
    prefill's trace (in memory), the same trace ``trace_ids`` would record.
    """
    ids = encode(tokenizer, case)
    max_new = max_new_tokens(case) if max_new is None else max_new

    def found_all(tokens):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return string_match_all(text, case.answers) == 1.0

    start = time.perf_counter()
    trace = None
    if config is None:
        _, tokens, _ = greedy_decode(model, ids, max_new, stop=found_all)
    else:
        with sparse_model(model, config) as session:
            _, tokens, chunks = greedy_decode(model, ids, max_new, chunk_size=config.chunk_size,
                                              session=session, stop=found_all)
        meta = {**trace_meta(model, config, model_id), "niah_case": case.id}
        trace = Trace.from_arrays(**join_chunks(chunks), block_q=config.mask.block_q,
                                  block_k=config.mask.block_k, meta=meta, tokens=ids, budget=config.mask.budget())
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    return CaseRun(tokens, output, string_match_all(output, case.answers), trace,
                   time.perf_counter() - start)


def two_token_criterion(dense_tokens: list[int], sparse_tokens: list[int]) -> bool:
    """The fidelity criterion on already decoded runs: the first two greedy tokens agree."""
    return len(dense_tokens) >= 2 and dense_tokens[:2] == sparse_tokens[:2]


def prepare_cases(model_name: str | None, variants: list[str], lengths: list[int], depths: list[float], *,
                  samples: int = 1, seed: int = 0, haystack: str | None = None, max_new: int | None = None,
                  force: bool = False) -> tuple[list[NiahCase], str | None]:
    """The cases of a sweep, fitted to the model's tokenizer (read without loading the weights), and a
    warning when they reach past its context window (refused unless ``force``)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..datasets.ruler import check_variant, make_cases
    from ..tracing.models import resolve_folder

    for name in variants:
        check_variant(name)
    if not lengths:
        raise UsageError("no lengths given; pass e.g. --lengths 1k,2k.")
    folder = resolve_folder(model_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    window = int(AutoConfig.from_pretrained(folder).get_text_config().max_position_embeddings)
    cases = make_cases(variants, tokenizer, lengths, depths, samples=samples, seed=seed, haystack=haystack)
    longest = max(c.num_tokens + (max_new or max_new_tokens(c)) for c in cases)
    if longest <= window:
        return cases, None
    message = (f"cases reach {longest} tokens with the answer, past the model's context window of {window} "
               "tokens")
    if not force:
        raise UsageError(message + "; pass --force to run anyway or ask for shorter --lengths.")
    return cases, message + "; running anyway (--force)."


def write_cases(out: Path, cases: list[NiahCase]) -> None:
    """``cases.jsonl``: one case a line."""
    with open(out / "cases.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in cases)


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_depths(text: str) -> list[float]:
    out = []
    for t in split_list(text):
        try:
            d = float(t)
        except ValueError:
            raise UsageError(f"depth {t!r} is not a number; give percents like 0,50,100.") from None
        if not 0 <= d <= 100:
            raise UsageError(f"depth {t} is outside 0..100 (percent of the haystack).")
        out.append(int(d) if d.is_integer() else d)
    if not out:
        raise UsageError("no depths given; pass e.g. --depths 0,50,100.")
    return out


def parse_top_k(text: str) -> list[int | str]:
    out: list[int | str] = []
    for t in split_list(text):
        if t.lower() == "dense":
            out.append("dense")
            continue
        try:
            out.append(int(t))
        except ValueError:
            raise UsageError(f"--top-k value {t!r} is not an integer or 'dense'.") from None
    if not out:
        raise UsageError("no --top-k values given; pass e.g. --top-k 8,16,dense.")
    return out


def case_results(model, tokenizer, case, ks, configs, *, max_new=None, model_id="") -> tuple[list, list]:
    """One case dense and at every sparse k: its rows (dicts with :data:`COLUMNS`; the dense row only when
    ``"dense"`` is in ``ks``) and its reports (per sparse k the needle mass, route and score from
    :func:`sparsetrace.analysis.routes.case_report`)."""
    rows, reports = [], []
    spans = case.needle_token_spans
    dense = run_case(model, tokenizer, case, max_new=max_new, model_id=model_id)
    if "dense" in ks:
        rows.append(_row(case, "dense", None, dense, True))
    for k, config in configs.items():
        sparse = run_case(model, tokenizer, case, config, max_new=max_new, model_id=model_id)
        ok = two_token_criterion(dense.tokens, sparse.tokens)
        rows.append(_row(case, k, sparse.trace, sparse, ok))
        report = case_report(sparse.trace, spans)
        reports.append({"id": case.id, "variant": case.variant, "length": case.length,
                        "depth": case.depth, "k": k, "score": sparse.score,
                        "dense_score": dense.score, "sparsity": sparse.trace.sparsity,
                        "layer_sparsity": [round(sparse.trace.layer_sparsity(li), 4)
                                           for li in range(sparse.trace.num_layers)],
                        "needle_spans": [list(s) for s in spans], **report})
    return rows, reports


def case_log(case, rows, n: int, total: int) -> str:
    """The line a sweep prints after a case: its scores per k."""
    scores = " ".join(f"{r['k']}={r['score']:.2f}" for r in rows)
    return f"[{n}/{total}] {case.id} ({case.num_tokens} tokens): {scores} ({time.strftime('%H:%M:%S')})"


def sweep(model, tokenizer, cases, ks, configs, *, max_new=None, model_id="", log=None):
    """Run every case dense and at every sparse k in this process; returns (rows, reports) of
    :func:`case_results`, case after case. (The ``niah`` command runs the cases through
    :mod:`sparsetrace.runs.ranks` instead, to share them over processes and resume.)"""
    rows, reports = [], []
    for n, case in enumerate(cases, 1):
        case_rows, case_reports = case_results(model, tokenizer, case, ks, configs, max_new=max_new,
                                               model_id=model_id)
        rows += case_rows
        reports += case_reports
        if log is not None:
            log(case_log(case, case_rows, n, len(cases)))
    return rows, reports


def _row(case, k, trace, run, criterion) -> dict:
    """One CSV row; ``trace`` None for the dense run (sparsity 0, every causal block kept). ``capped_share`` is
    None unless the trace ran under a coverage budget."""
    capped = None if trace is None else trace.capped_share
    return {"id": case.id, "variant": case.variant, "length": case.length, "depth": case.depth, "k": k,
            "sparsity": 0.0 if trace is None else round(float(trace.sparsity), 4),
            "kept_blocks": None if trace is None else round(float(trace.mean_kept_blocks), 2),
            "capped_share": None if capped is None else round(capped, 4), "score": run.score,
            "criterion": bool(criterion), "output": run.output, "num_tokens": case.num_tokens,
            "seconds": round(run.seconds, 2)}


def comparisons(reports, ks) -> dict:
    """Per sparse k: :func:`compare_heads` of needle masses, success = score 1 at that k. Cases whose
    needle sits in a sink or local block are left out (those blocks draw mass whatever they hold)."""
    out = {}
    for k in ks:
        if k == "dense":
            continue
        sel = [r for r in reports if r["k"] == k and not r.get("needle_in_forced_blocks")]
        masses = [torch.tensor(r["needle_mass"]) for r in sel]
        out[str(k)] = compare_heads(masses, [r["score"] >= 1.0 for r in sel]).to_json()
    return out


def write_results(out: Path, rows, reports, cases, ks) -> None:
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    data = {"cases": reports, "comparison": comparisons(reports, ks)}
    (out / "routes.json").write_text(json.dumps(data) + "\n", encoding="utf-8")


def summary_table(rows, ks) -> str:
    """Mean score per (length, k) over depths and samples, and the mean sparsity per k."""
    lengths = sorted({r["length"] for r in rows})
    head = f"{'length':>7} " + " ".join(f"{k!s:>12}" for k in ks)
    lines = ["mean string_match_all score (sparsity)", head]
    for n in lengths:
        cells = []
        for k in ks:
            sel = [r for r in rows if r["length"] == n and r["k"] == k]
            if sel:
                s = sum(r["score"] for r in sel) / len(sel)
                sp = sum(r["sparsity"] for r in sel) / len(sel)
                cells.append(f"{s:.2f} ({sp:.2f})".rjust(12))
            else:
                cells.append(" " * 12)
        lines.append(f"{n:>7} " + " ".join(cells))
    return "\n".join(lines)
