"""``sparsetrace fidelity``: does the STREAM-pruned model still say what the dense model says?

Runs the model densely (sdpa) and with STREAM attention on one text and prints the two-greedy-tokens
criterion, top-1 agreement and KL(dense || sparse) over the last positions, and the block sparsity; or,
with ``--search-k``, binary-searches the smallest top_k that meets the criterion. ``--trace DIR`` checks
the input and settings of an existing trace and records the result in its manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import UsageError
from .options import (
    add_config_flags,
    add_model_options,
    config_from_args,
    flag_of,
    given_config_options,
    load,
    positive_int,
    read_text,
)


def add_parser(sub) -> None:
    p = sub.add_parser("fidelity", help="compare the sparse model with the dense one on a text",
                       description="Compare STREAM-sparse and dense runs of a model on a text: the next "
                                   "two greedy tokens (the criterion), top-1 agreement and "
                                   "KL(dense||sparse) over the last positions, and the block "
                                   "sparsity; or search the smallest top_k that passes.")
    add_model_options(p)
    add_config_flags(p, skip=("top_k",))  # flags not given take the --trace's settings, else the defaults
    which = p.add_mutually_exclusive_group()
    which.add_argument("--top-k", type=positive_int, default=None,
                       help="key blocks kept per query block (default 16, or the trace's)")
    which.add_argument("--search-k", action="store_true",
                       help="binary-search the smallest top_k that meets the criterion")
    p.add_argument("--k-min", type=positive_int, default=None,
                   help="lower bound of the search (default: forced blocks + 1)")
    p.add_argument("--k-max", type=positive_int, default=None,
                   help="upper bound of the search (default: every key block)")
    p.add_argument("--last-n", type=positive_int, default=64,
                   help="positions at the end of the input compared by top-1 and KL (default 64)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="an existing trace of this text: check its settings, record the result in "
                        "its manifest (without --text-file its tokens are used)")


def _config(args: argparse.Namespace, trace):
    """The flags over the trace's own configuration (or the defaults); a flag that contradicts the
    trace is refused, so the result describes that trace (``--top-k`` may differ with ``--search-k``)."""
    base = None if trace is None else trace.trace_config
    if base is not None:
        theirs = dataclasses.asdict(base.mask)  # what changes the selection (not chunking, storage)
        for name, given in given_config_options(args).items():
            if name in theirs and given != theirs[name] and not (name == "top_k" and args.search_k):
                flag = flag_of(name)
                raise UsageError(f"{flag} {given} differs from the trace's {theirs[name]}; drop {flag} "
                                 "so the result describes that trace.")
    return config_from_args(args, base)


def _tokens(args, tokenizer, trace):
    from ..tracing.tracer import tokenize

    if args.text_file is None and trace is not None:
        return trace.tokens
    ids, _ = tokenize(tokenizer, read_text(args.text_file), args.max_tokens)
    if trace is not None and not (ids.shape == trace.tokens.shape and bool((ids == trace.tokens).all())):
        raise UsageError(f"--text-file gives {ids.shape[0]} tokens that differ from the "
                         f"{trace.num_tokens} tokens of --trace {args.trace}; drop --text-file to "
                         "use the trace's own tokens.")
    return ids


def _token_text(tokenizer, tokens) -> str:
    return " ".join(repr(tokenizer.decode([t])) for t in tokens)


def _budget(result) -> str:
    mask = result.trace_config.get("mask", {})
    if mask.get("coverage") is None:
        return ""
    return f" at most (coverage budget {mask['coverage']}, min_k {mask['min_k']}; rows cut by estimated mass)"


def summarize(result, tokenizer) -> str:
    """The lines ``fidelity`` prints for one check."""
    verdict = "PASS" if result.criterion_passed else "FAIL"
    full = ("" if result.sparsity_full_layers in (None, result.sparsity)
            else f" ({result.sparsity_full_layers:.4f} on the full-attention layers)")
    return "\n".join([
        f"model            {result.model_id or '?'}",
        f"tokens           {result.n_tokens} (top-1 and KL over the last {result.last_n} positions)",
        f"blocks           {result.block_size} tokens, top_k {result.top_k}" + _budget(result),
        f"sparsity         {result.sparsity:.4f} of causal (query, key) pairs pruned{full}",
        (f"criterion        {verdict}: next two greedy tokens dense "
         f"{_token_text(tokenizer, result.dense_tokens)}, sparse "
         f"{_token_text(tokenizer, result.sparse_tokens)}"),
        f"top-1 agreement  {result.top1_agreement:.4f}",
        f"KL dense||sparse mean {result.kl:.3e}, max {result.kl_max:.3e} nats",
    ])


def probe_table(search) -> str:
    lines = ["  top_k  criterion  sparsity  top-1    KL mean    KL max"]
    for p in search.probes:
        lines.append(f"  {p['top_k']:5d}  {'pass' if p['criterion_passed'] else 'fail':9s}  "
                     f"{p['sparsity']:8.4f}  {p['top1_agreement']:.4f}  {p['kl']:.3e}  "
                     f"{p['kl_max']:.3e}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.search_k and args.k_min is not None and args.k_max is not None and args.k_min > args.k_max:
        raise UsageError(f"--k-min {args.k_min} exceeds --k-max {args.k_max}; give k-min <= k-max.")
    if not args.search_k and (args.k_min is not None or args.k_max is not None):
        raise UsageError("--k-min and --k-max bound --search-k; add --search-k or drop them.")
    if args.text_file is None and args.trace is None:
        raise UsageError("no input text: pass --text-file FILE (or --trace DIR of a trace).")
    trace = None
    if args.trace is not None:
        from ..store import Trace

        trace = Trace.load(args.trace)
        if args.model is None and trace.meta.get("model_id"):
            args.model = trace.meta["model_id"]
    config = _config(args, trace)
    from ..runs import fidelity

    model, tokenizer, model_id = load(args)
    if trace is not None and trace.meta.get("model_id") not in (None, "", model_id):
        raise UsageError(f"--trace {args.trace} was made with {trace.meta['model_id']}, not "
                         f"{model_id}; pass --model {trace.meta['model_id']}.")
    ids = _tokens(args, tokenizer, trace)
    if args.search_k:
        found = fidelity.search_k(
            model, ids, config, k_min=args.k_min, k_max=args.k_max, last_n=args.last_n,
            trace=trace, model_id=model_id,
            on_probe=lambda r: print(f"probe top_k {r.top_k:4d}: "
                                     f"{'pass' if r.criterion_passed else 'fail'}", flush=True),
        )
        print(probe_table(found))
        print(f"smallest passing top_k {found.top_k} (binary search in [{found.k_min}, "
              f"{found.k_max}]; it assumes the criterion is monotone in k)")
        result, payload = found.result, found.to_dict()
    else:
        result = fidelity.check(model, ids, config, last_n=args.last_n, trace=trace,
                                model_id=model_id)
        payload = result.to_dict()
    print(summarize(result, tokenizer))
    if trace is not None:
        print(f"recorded in      {args.trace / 'manifest.json'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"written to       {args.json}")
    return 0
