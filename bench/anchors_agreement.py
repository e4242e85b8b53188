"""Thought anchors from sparse traces vs the dense reference: do they find the same receiver heads and
rank sentences the same way?

Texts: reasoning-gym gsm_symbolic problems in the model's chat template (user question, assistant
step-by-step reasoning), as many problems as reach each target length, ``--texts`` different texts per
length. Each text's top_k is what ``fidelity.search_k`` finds (the smallest k whose next two greedy
tokens equal the dense run's, by binary search), i.e. the sparsity the criterion allows; with
``--top-k`` candidates instead, the first candidate that passes ``fidelity.check``. The text is traced
at that k and at twice it. The dense reference (sparsetrace.anchors_dense) gives exact sentence
matrices and the block-spread ones (dense block masses through the same uniform-spread approximation),
which splits the disagreement into the approximation's part and the pruning's part.

Metrics (``analysis.anchors.compare``), per kurtosis setting (``--drop FIRST,LAST``: sentences left
out of each head's kurtosis; 0,0 is the plain definition), receiver heads chosen from the kurtosis
averaged over all texts (targets: Spearman >= 0.9, overlap >= 16/20):
  overlap     |top-20 receiver heads (sparse) & top-20 (dense)|
  spread      the same for the block-spread reference (nothing pruned)
  split-half  |dense top-20 of the first half of the texts & dense top-20 of the second half|: how
              reproducible the dense receiver heads themselves are
  k vs 2k     overlap and rho_heads of the trace at k against the trace at 2k: the check that needs
              no dense run (what `sparsetrace anchors --compare` reports for long inputs)
  rho_heads   mean over texts and dense receiver heads of Spearman(sparse vertical, dense vertical)
  rho_recv    mean over texts of Spearman(sparse receiver score, dense receiver score), each with its
              own receiver heads

    python bench/anchors_agreement.py --tokens 1024 2048 --texts 6 --block 4

With ``--coverage P [P ...] --max-k K`` each text is traced under each coverage budget (docs/coverage.md:
every row keeps the fewest of its max-k selected blocks whose estimated mass reaches P) instead of at the
k of the search, and one row per P is reported (tag ``..._covP_maxK``), with the sparsity reached, the
mean kept blocks per row and the share of capped rows; no k-vs-2k trace is made there (its columns are
None), and no fidelity check.
Prints a table, ends with one JSON line, and merges its rows into bench/results/anchors.json. While a run
lasts each finished text is kept in bench/results/anchors.parts/, so a killed run resumes; under
``torchrun --standalone --nproc-per-node N bench/anchors_agreement.py ...`` the N processes share the texts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sparsetrace.analysis import anchors as A
from sparsetrace.analysis import sentences as S
from sparsetrace.config import TraceConfig
from sparsetrace.datasets.gsm import gsm_text
from sparsetrace.runs.anchors import dense_sentence_matrices
from sparsetrace.runs.fidelity import check, dense_reference, search_k
from sparsetrace.runs.ranks import Ranks
from sparsetrace.tracing.models import load_model
from sparsetrace.tracing.tracer import tokenize, trace_ids

RESULTS = Path(__file__).parent / "results" / "anchors.json"


def parse_drop(text: str) -> tuple[int, int]:
    first, last = (int(x) for x in text.split(","))
    return first, last


def one_text(model, tokenizer, target: int, seed: int, args) -> dict:
    """Trace one text at the k the criterion allows (and at twice it); its vertical scores (sparse at
    k and 2k, dense, block-spread) and facts."""
    text, regions, n_problems = gsm_text(tokenizer, min_tokens=target, seed=seed)
    ids, offsets = tokenize(tokenizer, text, target)
    base = TraceConfig.of(block_size=args.block, score=args.score, chunk_size=1024)
    if args.coverage:
        return budget_text(model, ids, text, offsets, regions, n_problems, base, seed, args)
    if args.top_k:
        dense_ref = dense_reference(model, ids, chunk_size=1024, block_size=args.block)
        for top_k in args.top_k:
            fid = check(model, ids, base.replace(top_k=top_k), dense=dense_ref)
            if fid.criterion_passed:
                break
    else:
        found = search_k(model, ids, base)
        top_k, fid = found.top_k, found.result
    t0 = time.perf_counter()
    trace = trace_ids(model, ids, base.replace(top_k=top_k), text=text, token_offsets=offsets)
    trace_s = time.perf_counter() - t0
    double = trace_ids(model, ids, base.replace(top_k=2 * top_k), text=text, token_offsets=offsets)
    sentences = S.trace_sentences(trace, regions, check_resolution=False)
    t0 = time.perf_counter()
    dense, spread = dense_sentence_matrices(model, ids, sentences, block=(args.block, args.block))
    dense_s = time.perf_counter() - t0
    lengths = sorted(s.num_tokens for s in sentences)
    row = {"tokens": int(ids.numel()), "seed": seed, "problems": n_problems, "top_k": top_k,
           "criterion_passed": fid.criterion_passed, "kl": round(fid.kl, 4),
           "sparsity": round(trace.sparsity, 4), "sparsity_2k": round(double.sparsity, 4),
           "sentences": len(sentences), "median_sentence_tokens": lengths[len(lengths) // 2],
           "trace_s": round(trace_s, 1), "dense_s": round(dense_s, 1)}
    return {"row": row, "sparse": A.trace_vertical(trace, sentences),
            "double": A.trace_vertical(double, sentences), "dense": A.vertical_scores(dense),
            "spread": A.vertical_scores(spread)}


def budget_text(model, ids, text, offsets, regions, n_problems, base, seed, args) -> dict:
    """Trace one text under each coverage budget ``args.coverage`` (at ``args.max_k``): the verticals
    of each budget's trace, the dense and block-spread ones, and one row per budget."""
    traces, budgets = {}, {}
    for cov in args.coverage:
        t0 = time.perf_counter()
        trace = trace_ids(model, ids, base.replace(coverage=cov, top_k=args.max_k, max_k=args.max_k),
                          text=text, token_offsets=offsets)
        traces[cov] = (trace, time.perf_counter() - t0)
    sentences = S.trace_sentences(traces[args.coverage[0]][0], regions, check_resolution=False)
    t0 = time.perf_counter()
    dense, spread = dense_sentence_matrices(model, ids, sentences, block=(args.block, args.block))
    dense_s = time.perf_counter() - t0
    lengths = sorted(s.num_tokens for s in sentences)
    for cov, (trace, trace_s) in traces.items():
        row = {"tokens": int(ids.numel()), "seed": seed, "problems": n_problems, "budget": trace.budget,
               "top_k": args.max_k, "sparsity": round(trace.sparsity, 4),
               "mean_kept_blocks": round(trace.mean_kept_blocks, 2),
               "capped_share": round(trace.capped_share, 4), "sentences": len(sentences),
               "median_sentence_tokens": lengths[len(lengths) // 2], "trace_s": round(trace_s, 1),
               "dense_s": round(dense_s, 1)}
        budgets[budget_key(cov)] = {"row": row, "sparse": A.trace_vertical(trace, sentences)}
    return {"budgets": budgets, "dense": A.vertical_scores(dense), "spread": A.vertical_scores(spread)}


def budget_key(cov: float) -> str:
    return f"cov{cov:g}"


def agreement(texts: list[dict], drop: tuple[int, int], top: int) -> dict:
    """Receiver-head overlaps and Spearman correlations over ``texts`` for one kurtosis setting."""
    def verticals(kind):
        return [t[kind] for t in texts]

    def compare(ours, reference):
        return A.compare(verticals(ours), verticals(reference), top=top, drop_first=drop[0],
                         drop_last=drop[1])

    sparse, spread = compare("sparse", "dense"), compare("spread", "dense")
    none = {"overlap": None, "rho_heads": None}  # a coverage row has no trace at 2k
    stability = compare("sparse", "double") if texts[0]["double"] is not None else none

    def dense_heads(chosen):
        return set(A.receiver_heads([A.head_kurtosis(t["dense"], *drop) for t in chosen], top))

    half = len(texts) // 2  # different texts on the two sides: not a compare() of one set
    split = len(dense_heads(texts[:half]) & dense_heads(texts[half:])) if half else None
    return {
        "drop_first": drop[0], "drop_last": drop[1],
        "overlap": sparse["overlap"],
        "overlap_spread_vs_dense": spread["overlap"],
        "dense_split_half": split,
        "overlap_k_vs_2k": stability["overlap"],
        "rho_heads": round(sparse["rho_heads"], 4),
        "rho_heads_spread_vs_dense": round(spread["rho_heads"], 4),
        "rho_heads_k_vs_2k": None if stability["rho_heads"] is None else round(stability["rho_heads"], 4),
        "rho_recv": round(sparse["rho_receiver"], 4),
        "receiver_heads_sparse": sparse["heads"], "receiver_heads_dense": sparse["reference_heads"],
    }


VERTICALS = ("sparse", "double", "dense", "spread")


def to_json(t: torch.Tensor) -> dict:
    """A tensor as JSON for a part file (float values exact: JSON keeps every double)."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.tolist()}


def from_json(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"]))


def report(args, target: int, texts: list[dict], cov: float | None = None) -> dict:
    """The agreement over the texts of one length (and coverage budget ``cov``): merged into
    bench/results/anchors.json and printed."""
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    tag = args.tag or f"{args.model}_block{args.block}_{args.score}_{target}"
    budget = None
    if cov is not None:
        tag += f"_{budget_key(cov)}_max{args.max_k}"
        budget = {"coverage": cov, "min_k": 1, "max_k": args.max_k}
    result = {"tag": tag, "model": args.model, "block": args.block, "score": args.score, "tokens": target,
              "top_k_candidates": "coverage" if budget else args.top_k or "search_k", "budget": budget,
              "top_heads": args.top_heads,
              "settings": [agreement(texts, drop, args.top_heads) for drop in args.drop],
              "texts": [t["row"] for t in texts]}
    stored[tag] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stored, indent=2) + "\n")
    summary = [{k: v for k, v in s.items() if not k.startswith("receiver_heads")} for s in result["settings"]]
    sparsity = sum(t["row"]["sparsity"] for t in texts) / len(texts)
    kept = "" if budget is None else (
        f", mean kept blocks {sum(t['row']['mean_kept_blocks'] for t in texts) / len(texts):.1f}, "
        f"capped {sum(t['row']['capped_share'] for t in texts) / len(texts):.3f}")
    print(f"\n{tag}: {len(texts)} texts, mean sparsity {sparsity:.3f}{kept}, "
          f"k {[t['row']['top_k'] for t in texts]}")
    print("drop first,last | overlap | spread | dense split-half | k vs 2k | rho_heads | rho spread | "
          "rho k vs 2k | rho_recv")
    n = args.top_heads
    for s in summary:
        stable = "-" if s["overlap_k_vs_2k"] is None else f"{s['overlap_k_vs_2k']}/{n}"  # coverage: no 2k trace
        print(f"{s['drop_first']},{s['drop_last']} | {s['overlap']}/{n} | "
              f"{s['overlap_spread_vs_dense']}/{n} | {s['dense_split_half']}/{n} | "
              f"{stable} | {s['rho_heads']} | {s['rho_heads_spread_vs_dense']} | "
              f"{'-' if s['rho_heads_k_vs_2k'] is None else s['rho_heads_k_vs_2k']} | {s['rho_recv']}", flush=True)
    return {tag: summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma-3-270m")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--texts", type=int, default=4, help="texts per length (different problems)")
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--top-k", type=int, nargs="+", default=None,
                   help="candidates, smallest first: the first passing fidelity.check is used "
                        "(default: fidelity.search_k's binary search over every k)")
    p.add_argument("--coverage", type=float, nargs="+", default=None, metavar="P",
                   help="trace each text under these coverage budgets instead of at a searched k "
                        "(one row each; needs --max-k)")
    p.add_argument("--max-k", type=int, default=None, help="with --coverage: key blocks a row keeps at most")
    p.add_argument("--score", choices=("max", "lse"), default="max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-heads", type=int, default=20)
    p.add_argument("--drop", type=parse_drop, nargs="+", default=[(0, 0), (4, 20)],
                   metavar="FIRST,LAST", help="kurtosis settings to report (sentences left out)")
    p.add_argument("--tag", default=None, help="row name in the JSON (default from the settings)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    args = p.parse_args(argv)
    if (args.coverage is None) != (args.max_k is None):
        p.error("--coverage and --max-k go together")
    with Ranks.from_env() as ranks:
        grid = [(target, i) for target in args.tokens for i in range(args.texts)]
        loaded = []

        def run_one(n: int) -> dict:
            target, i = grid[n]
            if not loaded:
                loaded.append(load_model(args.model))
            model, tokenizer = loaded[0]
            torch.manual_seed(0)  # per text: the same whichever rank runs it, after whatever it ran before
            result = one_text(model, tokenizer, target, args.seed + 1000 * target + i, args)
            if args.coverage:
                for b in result["budgets"].values():
                    print(f"{ranks.tag}{target} tokens, text {i}: {b['row']}", flush=True)
                return {"target": target, "dense": to_json(result["dense"]), "spread": to_json(result["spread"]),
                        "budgets": {k: {"row": b["row"], "sparse": to_json(b["sparse"])}
                                    for k, b in result["budgets"].items()}}
            print(f"{ranks.tag}{target} tokens, text {i}: {result['row']}", flush=True)
            return {"target": target, "row": result["row"],
                    **{kind: to_json(result[kind]) for kind in VERTICALS}}

        summary = {}

        def merge(results: list[dict]) -> None:
            if args.coverage:
                for cov in args.coverage:  # one row per budget, the dense verticals shared
                    texts = [{"target": r["target"], "row": r["budgets"][budget_key(cov)]["row"],
                              "sparse": from_json(r["budgets"][budget_key(cov)]["sparse"]), "double": None,
                              "dense": from_json(r["dense"]), "spread": from_json(r["spread"])}
                             for r in results]
                    for target in args.tokens:
                        summary.update(report(args, target, [t for t in texts if t["target"] == target], cov))
                return
            texts = [{"target": r["target"], "row": r["row"], **{kind: from_json(r[kind]) for kind in VERTICALS}}
                     for r in results]
            for target in args.tokens:  # the texts of each length, in order, whichever rank ran them
                summary.update(report(args, target, [t for t in texts if t["target"] == target]))

        # one part file per text while the sweep runs: a killed run (any number of ranks) resumes
        keys = [f"{args.model}|{target}|text{i}|seed{args.seed}" for target, i in grid]
        parts = args.out.with_suffix(".parts")
        if args.coverage:  # the parts of a coverage run apart from a k run's
            budgets = "_".join(f"{c:g}" for c in args.coverage)
            parts = parts.with_name(f"{parts.stem}.cov{budgets}_max{args.max_k}.parts")
        settings = {k: str(getattr(args, k)) for k in ("block", "top_k", "score")}
        if args.coverage:
            settings.update(coverage=str(args.coverage), max_k=str(args.max_k))
        ranks.sweep(keys, run_one, parts, merge=merge, settings=settings, log=print)
        if not ranks.main:
            return 0
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
