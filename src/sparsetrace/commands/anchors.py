"""``sparsetrace anchors``: thought anchors (receiver heads and sentence scores) from a sparse trace.

Reads a trace (``--trace DIR``) or traces first (``--text-file F`` or ``--gsm N`` reasoning-gym
problems in the model's chat template; the trace goes to ``OUT/trace``), then writes to ``--out``:
``sentences.csv``, ``heads.csv``, ``anchors.json`` and three PNG plots (receiver scores, sentence maps
of the top receiver heads, layer x head kurtosis). ``--suppress`` adds the causal check (one sparse
forward per sentence; see :mod:`sparsetrace.runs.suppression`). ``--compare DIR`` measures how far the
result moves against a second trace of the same tokens (e.g. at twice the top_k): the check for inputs
too long for the dense method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import UsageError
from .options import (
    add_config_flags,
    add_model_options,
    config_from_args,
    load,
    nonnegative_int,
    output_dir,
    positive_int,
    read_text,
)

SUPPRESS_MAX_TOKENS = 4096  # one forward per sentence, T x vocab float32 baseline in memory


def add_parser(sub) -> None:
    p = sub.add_parser("anchors", help="thought anchors: receiver heads and sentence scores",
                       description="Sentence-level attention analysis after Thought Anchors (Bogdan "
                                   "et al. 2025) from a sparse trace: vertical scores, receiver "
                                   "heads (top kurtosis), receiver scores, optional suppression KL.")
    p.add_argument("--trace", type=Path, help="trace directory to analyse (else trace first)")
    add_model_options(p)
    p.add_argument("--gsm", type=positive_int, default=None, metavar="N",
                   help="trace N reasoning-gym gsm_symbolic problems (question + step-by-step "
                        "reasoning, chat template) instead of --text-file")
    p.add_argument("--seed", type=int, default=0, help="seed of the --gsm problems (0)")
    add_config_flags(p)
    p.add_argument("--top-heads", type=positive_int, default=20, help="receiver heads (20)")
    p.add_argument("--drop-first", type=nonnegative_int, default=0, metavar="N",
                   help="leave the first N sentences out of each head's kurtosis (0; Thought Anchors' "
                        "code: sink-like opening sentences)")
    p.add_argument("--drop-last", type=nonnegative_int, default=0, metavar="N",
                   help="leave the last N sentences out of each head's kurtosis (0; their vertical "
                        "scores average over few later sentences)")
    p.add_argument("--suppress", action="store_true",
                   help="also measure the KL on later sentences when each sentence's key blocks "
                        "are removed (one sparse forward per sentence)")
    p.add_argument("--suppress-heads", choices=("all", "receivers"), default="all",
                   help="suppress in every head or only in the receiver heads (all)")
    p.add_argument("--sink-prior", action="store_true",
                   help="put the mass of key block 0 on token 0 (the attention sink) instead of "
                        "spreading it; use when the first sentence shares block 0 with token 0")
    p.add_argument("--compare", type=Path, default=None, metavar="DIR",
                   help="a second trace of the same tokens (e.g. at twice --top-k): report the "
                        "receiver heads in common and the Spearman of the vertical scores on its "
                        "receiver heads; if they move, the first trace is too sparse for anchors")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def _trace(args: argparse.Namespace):
    """The trace to analyse: ``--trace``, or one made now of ``--text-file`` / ``--gsm``; with the model
    when it was loaded for that."""
    from ..store import Trace

    if args.trace is not None:
        return Trace.load(args.trace), None
    from ..datasets.gsm import gsm_text
    from ..tracing.tracer import tokenize, trace_ids

    config = config_from_args(args)
    text, regions = (read_text(args.text_file), None) if args.gsm is None else (None, None)
    model, tokenizer, model_name = load(args)
    if args.gsm is not None:
        text, regions, _ = gsm_text(tokenizer, args.gsm, seed=args.seed)
    ids, offsets = tokenize(tokenizer, text, args.max_tokens)
    start = time.perf_counter()
    trace = trace_ids(model, ids, config, out=args.out / "trace", model_id=model_name, text=text,
                      token_offsets=offsets, progress=True)
    if regions is not None:
        trace.update_manifest(anchors_regions=[list(r) for r in regions])
    print(f"traced {trace.num_tokens} tokens in {time.perf_counter() - start:.1f} s -> {args.out / 'trace'}")
    return trace, model


def _suppress(args: argparse.Namespace, trace, result, model):
    """Suppression KL per sentence (``--suppress``), with the trace's own configuration."""
    from ..runs.suppression import suppression_kl

    if trace.num_tokens > SUPPRESS_MAX_TOKENS:
        raise UsageError(f"--suppress runs one forward per sentence and keeps T x vocab log-probabilities; "
                         f"{trace.num_tokens} tokens is too many (at most {SUPPRESS_MAX_TOKENS}); use a "
                         "shorter text or --max-tokens.")
    if model is None:
        args.model = args.model or trace.meta.get("model_id") or None
        model, _, _ = load(args)
    heads = result.heads if args.suppress_heads == "receivers" else None
    print(f"suppressing {len(result.sentences)} sentences ({args.suppress_heads} heads)...")
    return suppression_kl(model, trace.tokens, result.sentences, trace.trace_config, heads=heads,
                          progress=lambda i, n: print(f"  {i}/{n}", end="\r", flush=True))


def run(args: argparse.Namespace) -> int:
    from ..analysis.anchors import analyze, compare_traces, suppression_summary
    from ..analysis.sentences import trace_sentences
    from ..store import Trace

    out = output_dir(args.out)
    if args.trace is not None and (args.text_file is not None or args.gsm is not None):
        raise UsageError("give either --trace DIR or a text to trace (--text-file / --gsm), not both.")
    other = None if args.compare is None else Trace.load(args.compare)  # a bad --compare costs nothing
    trace, model = _trace(args)
    start = time.perf_counter()
    result = analyze(trace, sentences=trace_sentences(trace), top=args.top_heads, sink_prior=args.sink_prior,
                     drop_first=args.drop_first, drop_last=args.drop_last)
    analysis_s = time.perf_counter() - start
    agreement = None if other is None else compare_traces(
        trace, result, other, top=args.top_heads, drop_first=args.drop_first, drop_last=args.drop_last,
        sink_prior=args.sink_prior)
    kl = _suppress(args, trace, result, model) if args.suppress else None
    out.mkdir(parents=True, exist_ok=True)
    result.write_tables(out, kl)
    summary = {"trace": str(trace.path) if trace.path else None, "tokens": trace.num_tokens,
               "block_size": trace.block_k, "top_k": trace.top_k, "sparsity": trace.sparsity,
               "sink_prior": args.sink_prior, "analysis_seconds": round(analysis_s, 2), **result.summary()}
    if kl is not None:
        summary["suppression"] = suppression_summary(result, kl, args.suppress_heads)
    if agreement is not None:
        summary["compare"] = agreement
    if not args.no_plots:
        from ..viz.anchors import plot

        summary["plots"] = plot(out, result, trace, args.sink_prior)
    (out / "anchors.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(_report(result, trace, agreement, analysis_s, out))
    return 0


def _report(result, trace, agreement, analysis_s: float, out: Path) -> str:
    from ..analysis.anchors import STABLE_OVERLAP, STABLE_RHO
    from ..viz.anchors import label

    sentences = result.sentences
    median = sorted(s.num_tokens for s in sentences)[len(sentences) // 2]
    lines = [f"sentences       {len(sentences)} (median {median} tokens; block {trace.block_k})",
             "receiver heads  " + " ".join(f"L{layer}H{head}" for layer, head in result.heads[:10])
             + (" ..." if len(result.heads) > 10 else "")]
    lines += [f"  [{item['index']:>3}] {item['receiver_score']:.3g}  {label(item['text'], 70)}"
              for item in result.summary()["top_sentences"]]
    if agreement is not None:
        lines.append(f"against k={agreement['top_k']}  receiver heads in common "
                     f"{agreement['receiver_heads_in_common']}/{agreement['of']}, Spearman of vertical "
                     f"scores {agreement['spearman_vertical_on_its_heads']:.3f}, of receiver scores "
                     f"{agreement['spearman_receiver_scores']:.3f}")
        if not agreement["stable"]:
            lines.append(f"                the receiver heads move with k (wanted >= {STABLE_OVERLAP:.0%} in "
                         f"common and Spearman >= {STABLE_RHO}): this trace is too sparse to read anchors "
                         "from; use the larger k (docs/anchors.md).")
    lines.append(f"analysis        {analysis_s:.2f} s; written to {out}")
    return "\n".join(lines)
