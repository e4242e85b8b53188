"""``sparsetrace niah``: RULER needle-in-a-haystack cases, dense and sparse scores, retrieval routes.

Writes to ``--out``:
  cases.jsonl      one case a line (id, variant, length, depth, input, answers, needle_token_spans, ...)
  results.csv      one row per case and k: id, variant, length, depth, k ("dense" for the dense run),
                   sparsity, score (RULER string_match_all), criterion (first two greedy tokens equal
                   the dense run's), output, num_tokens, seconds
  routes.json      per case and sparse k: needle mass per layer and head, the best needle-to-answer
                   route (:mod:`sparsetrace.analysis.niah`); per k: success-vs-failure head comparison
  scores.png, needle_mass.png, heads.png, routes.png
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from .common import add_device_option, add_trace_options, positive_int, read_text

COLUMNS = ["id", "variant", "length", "depth", "k", "sparsity", "score", "criterion", "output",
           "num_tokens", "seconds"]


def add_parser(sub) -> None:
    p = sub.add_parser("niah", help="needle-in-a-haystack sweep: scores dense vs sparse, routes",
                       description="Generate RULER NIAH cases fitted to the model's tokenizer, "
                                   "decode them greedily dense and with STREAM attention at each "
                                   "--top-k, score them (string_match_all) and trace the needle's "
                                   "route to the answer.")
    p.add_argument("--model", default=None,
                   help="model alias (smollm2-135m, gemma-3-270m), HF folder or .gguf file")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_device_option(p)
    p.add_argument("--variant", default="niah_single_2",
                   help="RULER variant(s), comma-separated (default niah_single_2)")
    p.add_argument("--lengths", default="1k", help="prompt lengths in tokens, e.g. 1k,2k,4k or 600")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    p.add_argument("--top-k", default="8,16,dense",
                   help="key blocks kept per query block, comma-separated; 'dense' = no pruning")
    p.add_argument("--samples", type=positive_int, default=1, help="cases per (length, depth)")
    p.add_argument("--haystack-file", type=Path, default=None,
                   help="UTF-8 text to use instead of the Paul Graham essays (essay variants)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="greedy tokens at most (default: 12 per number, 32 per uuid, plus 4)")
    p.add_argument("--force", action="store_true",
                   help="run lengths past the model's context window anyway")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_trace_options(p, top_k=False)


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_depths(text: str) -> list[float]:
    out = []
    for t in _split(text):
        try:
            d = float(t)
        except ValueError:
            raise ValueError(f"depth {t!r} is not a number; give percents like 0,50,100.") from None
        if not 0 <= d <= 100:
            raise ValueError(f"depth {t} is outside 0..100 (percent of the haystack).")
        out.append(int(d) if d.is_integer() else d)
    if not out:
        raise ValueError("no depths given; pass e.g. --depths 0,50,100.")
    return out


def parse_top_k(text: str) -> list[int | str]:
    out: list[int | str] = []
    for t in _split(text):
        if t.lower() == "dense":
            out.append("dense")
            continue
        try:
            out.append(int(t))
        except ValueError:
            raise ValueError(f"--top-k value {t!r} is not an integer or 'dense'.") from None
    if not out:
        raise ValueError("no --top-k values given; pass e.g. --top-k 8,16,dense.")
    return out


def run(args: argparse.Namespace) -> int:
    from .. import niah
    from .common import device_of, trace_config

    device_of(args.device)  # a GPU asked for but missing fails before anything is written
    variants = _split(args.variant)
    for name in variants:
        niah.check_variant(name)
    lengths = [niah.parse_length(t) for t in _split(args.lengths)]
    if not lengths:
        raise ValueError("no lengths given; pass e.g. --lengths 1k,2k.")
    depths = parse_depths(args.depths)
    ks = parse_top_k(args.top_k)
    configs = {k: trace_config(args, top_k=k) for k in ks if k != "dense"}  # validates every k
    haystack = read_text(args.haystack_file, "--haystack-file") if args.haystack_file else None

    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..models import _resolve_folder

    hf_logging.set_verbosity_error()
    folder = _resolve_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    window = int(AutoConfig.from_pretrained(folder).get_text_config().max_position_embeddings)
    cases = niah.make_cases(variants, tokenizer, lengths, depths, samples=args.samples,
                            seed=args.seed, haystack=haystack)
    longest = max(c.num_tokens + (args.max_new_tokens or niah.max_new_tokens(c)) for c in cases)
    if longest > window:
        message = (f"cases reach {longest} tokens with the answer, past the model's context window "
                   f"of {window} tokens")
        if not args.force:
            raise ValueError(message + "; pass --force to run anyway or ask for shorter --lengths.")
        print(f"warning: {message}; running anyway (--force).", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cases.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in cases)

    from .common import load

    model, tokenizer, mid = load(args)
    rows, reports = sweep(model, tokenizer, cases, ks, configs, max_new=args.max_new_tokens,
                          model_id=mid, log=print)
    write_results(args.out, rows, reports, cases, ks)
    print(summary_table(rows, ks))
    print(f"written to {args.out}")
    return 0


def sweep(model, tokenizer, cases, ks, configs, *, max_new=None, model_id="", log=None):
    """Run every case dense and at every sparse k; returns (rows, reports).

    ``rows``: dicts with :data:`COLUMNS`; ``reports``: per (case id, k) the needle mass, route and
    score from :func:`sparsetrace.analysis.niah.case_report`.
    """
    from .. import niah
    from ..analysis.niah import case_report

    rows, reports = [], []
    for n, case in enumerate(cases, 1):
        spans = case.needle_token_spans
        dense = niah.run_case(model, tokenizer, case, max_new=max_new, model_id=model_id)
        if "dense" in ks:
            rows.append(_row(case, "dense", 0.0, dense, True))
        for k, config in configs.items():
            sparse = niah.run_case(model, tokenizer, case, config, max_new=max_new,
                                   model_id=model_id)
            ok = niah.two_token_criterion(dense.tokens, sparse.tokens)
            rows.append(_row(case, k, sparse.trace.sparsity, sparse, ok))
            report = case_report(sparse.trace, spans)
            reports.append({"id": case.id, "variant": case.variant, "length": case.length,
                            "depth": case.depth, "k": k, "score": sparse.score,
                            "dense_score": dense.score, "sparsity": sparse.trace.sparsity,
                            "needle_spans": [list(s) for s in spans], **report})
        if log is not None:
            scores = " ".join(f"{r['k']}={r['score']:.2f}" for r in rows if r["id"] == case.id)
            log(f"[{n}/{len(cases)}] {case.id} ({case.num_tokens} tokens): "
                f"{scores} ({time.strftime('%H:%M:%S')})")
    return rows, reports


def _row(case, k, sparsity, run, criterion) -> dict:
    return {"id": case.id, "variant": case.variant, "length": case.length, "depth": case.depth,
            "k": k, "sparsity": round(float(sparsity), 4), "score": run.score,
            "criterion": bool(criterion), "output": run.output, "num_tokens": case.num_tokens,
            "seconds": round(run.seconds, 2)}


def comparisons(reports, ks) -> dict:
    """Per sparse k: :func:`compare_heads` of needle masses, success = score 1 at that k. Cases whose
    needle sits in a sink or local block are left out (those blocks draw mass whatever they hold)."""
    import torch

    from ..analysis.niah import compare_heads

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
    plot(out, rows, reports, ks)


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


# --------------------------------------------------------------------------- plots

def plot(out: Path, rows, reports, ks) -> None:
    """scores.png (length x depth per k), needle_mass.png (per layer, per k, success vs failure),
    heads.png (mean needle mass per layer and head), routes.png (the route over layers)."""
    import numpy as np

    from ..viz.plot import pyplot

    plt = pyplot()
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})

    fig, axes = plt.subplots(1, len(ks), figsize=(2.6 * len(ks) + 1, 2.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                sel = [r["score"] for r in rows if r["k"] == k and r["length"] == n and r["depth"] == d]
                if sel:
                    grid[i, j] = np.mean(sel)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        sp = [r["sparsity"] for r in rows if r["k"] == k]
        ax.set_title(f"k={k}" + (f" (sparsity {np.mean(sp):.2f})" if k != "dense" else ""), fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_xlabel("needle depth %", fontsize=7)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("tokens", fontsize=7)
    fig.suptitle("NIAH score (string_match_all)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)

    sparse_ks = [k for k in ks if k != "dense"]
    fig, axes = plt.subplots(1, max(1, len(sparse_ks)), figsize=(3.4 * max(1, len(sparse_ks)), 2.8),
                             squeeze=False)
    for ax, k in zip(axes[0], sparse_ks):
        for ok, color, label in ((True, "tab:green", "answered"), (False, "tab:red", "failed")):
            sel = [r["needle_mass_max"] for r in reports if r["k"] == k and (r["score"] >= 1) == ok]
            if sel:
                ax.plot(np.mean(sel, axis=0), color=color, label=f"{label} ({len(sel)})")
        ax.set_title(f"k={k}: answer block -> needle", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("needle mass (max over heads)", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "needle_mass.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, max(1, len(sparse_ks)), figsize=(3.4 * max(1, len(sparse_ks)), 3.2),
                             squeeze=False)
    for ax, k in zip(axes[0], sparse_ks):
        sel = [r["needle_mass"] for r in reports if r["k"] == k]
        if sel:
            im = ax.imshow(np.mean(sel, axis=0).T, aspect="auto", cmap="viridis", vmin=0)
            fig.colorbar(im, ax=ax, fraction=0.05)
        ax.set_title(f"k={k}: mean needle mass", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("head", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=120)
    plt.close(fig)

    shown = [r for r in reports if r["route"]["blocks"]][:6]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in shown:
        blocks = np.array(r["route"]["blocks"]) * r["route"]["block_size"]
        ok = r["score"] >= 1
        ax.plot(range(len(blocks)), blocks, marker=".", ms=3, lw=1,
                ls="-" if ok else "--", label=f"{r['id']} k={r['k']} ({'ok' if ok else 'fail'})")
    ax.set_xlabel("layer boundary (0 = needle at the input, L = answer block)", fontsize=7)
    ax.set_ylabel("token position of the route's block", fontsize=7)
    ax.set_title("best needle -> answer route over layers", fontsize=8)
    if shown:
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "routes.png", dpi=120)
    plt.close(fig)
