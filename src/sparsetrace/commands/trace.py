"""``sparsetrace trace``: run a model with sparse attention over a text and write the trace."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import add_config_flags, add_model_options, config_from_args, load, output_dir, read_text


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="trace a model's sparse attention over a text",
                       description="Run the model with STREAM block-sparse attention over a text "
                                   "(chunked prefill) and write the trace directory.")
    add_model_options(p)
    add_config_flags(p)
    p.add_argument("--out", type=Path, required=True, help="trace directory to write (resumes if killed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def summarize(trace, seconds: float | None = None) -> str:
    """The lines ``trace`` prints: size, sparsity and bytes against a dense float16 record."""
    from ..store import human_bytes

    lines = [
        f"tokens          {trace.num_tokens}",
        f"layers x heads  {trace.num_layers} x {trace.num_heads}",
        f"blocks          {trace.block_q} tokens, top_k {trace.top_k} of up to {trace.num_key_blocks}"
        + ("" if trace.budget is None else f" (at most: coverage budget {trace.budget['coverage']:g}, "
                                           f"{trace.mean_kept_blocks:.1f} kept per row on average)"),
        f"sparsity        {trace.sparsity:.4f} of causal (query, key) pairs pruned",
        f"trace bytes     {human_bytes(trace.nbytes)}",
        f"dense fp16      {human_bytes(trace.dense_bytes)} (T(T+1)/2 entries per layer and head)",
        f"ratio           {trace.dense_bytes / max(trace.nbytes, 1):,.0f}x smaller",
    ]
    if seconds is not None:
        lines.append(f"wall time       {seconds:.1f} s")
    from ..analysis.audit import audit_summary, coverage_summary, format_coverage, format_summary

    audit = audit_summary(trace)
    if audit is not None:
        lines += format_summary(audit)
    else:
        config = trace.trace_config
        lines.append("audit           none (--audit-rate 0)" if config is None or not config.audit_rate
                     else "audit           none (no row had to drop blocks)")
        if trace.budget is not None:
            lines += format_coverage(coverage_summary(trace))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..store import MANIFEST
    from ..tracing.tracer import trace_text

    config = config_from_args(args)
    text = read_text(args.text_file)
    out = output_dir(args.out)
    model, tokenizer, model_id = load(args)
    start = time.perf_counter()
    resumed = (out / MANIFEST).exists()
    trace = trace_text(model, tokenizer, text, config, max_tokens=args.max_tokens, out=out,
                       model_id=model_id, progress=not args.no_progress)
    if resumed:
        print(f"resumed the trace in {out}")
    print(summarize(trace, time.perf_counter() - start))
    print(f"written to      {out}")
    return 0
