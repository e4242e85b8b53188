"""Recall of the searched selections (STREAM, SHORTLIST) against the exact oracle, the dense attention mass
they cover, and their CPU time, on real post-RoPE queries and keys of the default model (SmolLM2-135M) over
a few thousand tokens of real text.

For every layer and head, block size in {32, 64}, top_k in {8, 16, 32}, block score in {max, lse} and each
searched estimator (``--estimators stream,shortlist``):
- recall: |searched middle picks ∩ oracle middle picks| / |oracle middle picks| over the rows where the
  search ran (the forced sink and local blocks are shared by construction and left out, so this is the
  search's own recall); and, for comparison with figures quoted elsewhere, the recall of all kept
  blocks over all rows (forced blocks and rows that keep everything included);
- coverage: the dense softmax mass (mean over queries) that falls in the kept blocks, for each estimator and
  for the oracle (the exact block top-k under the same score), so they can be compared;
- seconds per layer of the selection itself (the estimator on all heads of one layer).
Prints a table and ends with one JSON line; writes bench/results/recall.json.

    python bench/recall.py [--tokens 4096] [--layers 0,5,10] [--text essays|cot] [--estimators stream,shortlist]
                           [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from sparsetrace import MaskConfig, load_model, select_blocks
from sparsetrace.attention.dense import dense_block_mass, dense_probs
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.datasets.gsm import gsm_text
from sparsetrace.tracing.cpu import keep_freed_memory
from sparsetrace.tracing.probe import capture_qk
from sparsetrace.tracing.tracer import tokenize


def middle_picks(indices: torch.Tensor, sink: int, local: int, n: torch.Tensor) -> list[set]:
    """The searched (non-forced) blocks of every row where the search ran."""
    rows = []
    flat = indices.reshape(-1, indices.shape[-1])
    n_rows = n.repeat(flat.shape[0] // n.shape[0])
    for row, nr in zip(flat.tolist(), n_rows.tolist()):
        if nr <= len(row):
            continue
        rows.append({b for b in row if sink <= b < nr - local})
    return rows


def kept_overlap(searched: torch.Tensor, oracle: torch.Tensor) -> tuple[int, int]:
    """(blocks kept by both, blocks kept by the oracle) over every row, forced blocks included."""
    s, o = searched.reshape(-1, searched.shape[-1]).long(), oracle.reshape(-1, oracle.shape[-1]).long()
    both = ((s[:, :, None] == o[:, None, :]) & (o[:, None, :] >= 0)).any(1).sum()
    return int(both), int((o >= 0).sum())


def coverage(block_mass: torch.Tensor, indices: torch.Tensor) -> float:
    """Mean over heads and query blocks of the dense mass inside the kept blocks."""
    ids = indices[0].long()  # [H, nQ, k]
    kept = block_mass.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
    return kept.sum(-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--top-k", default="8,16,32")
    parser.add_argument("--blocks", default="32,64")
    parser.add_argument("--scores", default="max,lse")
    parser.add_argument("--estimators", default="stream,shortlist", help="searched estimators to compare")
    parser.add_argument("--text", choices=("essays", "cot"), default="essays",
                        help="Paul Graham essays, or gsm_symbolic chains of thought in the chat template")
    parser.add_argument("--quick", action="store_true", help="1k tokens, 3 layers")
    parser.add_argument("--json", type=Path, default=Path("bench/results/recall.json"))
    args = parser.parse_args()
    keep_freed_memory()
    if args.quick:
        args.tokens, args.layers = 1024, "0,14,29"
    model, tokenizer = load_model()
    text = (haystack_text(args.tokens * 6) if args.text == "essays"
            else gsm_text(tokenizer, min_tokens=args.tokens)[0])
    ids, _ = tokenize(tokenizer, text, max_tokens=args.tokens)
    T = ids.shape[0]
    layers = capture_qk(model, ids)
    chosen = sorted(layers) if args.layers is None else [int(x) for x in args.layers.split(",")]
    top_ks = [int(x) for x in args.top_k.split(",")]
    blocks = [int(x) for x in args.blocks.split(",")]
    scores = args.scores.split(",")
    estimators = args.estimators.split(",")
    sink, local = 1, 1
    # acc[(block, k, score, estimator)] = [hits, picks, coverage sum, oracle coverage sum, layers,
    #                                      kept by both, kept by the oracle, seconds]
    acc: dict[tuple, list[float]] = {}
    start = time.perf_counter()
    for layer in chosen:
        q, k, scaling, window = layers[layer]
        probs = dense_probs(q, k, scaling, window)  # [H, T, T], this layer only
        for block in blocks:
            block_mass = dense_block_mass(probs, block, block, math.ceil(T / block))
            last = torch.clamp((torch.arange(math.ceil(T / block)) + 1) * block, max=T) - 1
            n = last // block + 1
            for top_k in top_ks:
                for score in scores:
                    config = MaskConfig(block_q=block, block_k=block, top_k=top_k, sink_blocks=sink,
                                        local_blocks=local, score=score)
                    o_idx = select_blocks(q[None], k[None], replace(config, estimator="oracle"),
                                          scale=scaling, window=window).indices
                    o_picks = middle_picks(o_idx, sink, local, n)
                    o_cov = coverage(block_mass, o_idx)
                    for estimator in estimators:
                        tic = time.perf_counter()
                        s_idx = select_blocks(q[None], k[None], replace(config, estimator=estimator),
                                              scale=scaling, window=window).indices
                        seconds = time.perf_counter() - tic
                        hits = picks = 0
                        for s_row, o_row in zip(middle_picks(s_idx, sink, local, n), o_picks):
                            hits += len(s_row & o_row)
                            picks += len(o_row)
                        a = acc.setdefault((block, top_k, score, estimator), [0, 0, 0.0, 0.0, 0, 0, 0, 0.0])
                        both, kept = kept_overlap(s_idx, o_idx)
                        for i, value in enumerate((hits, picks, coverage(block_mass, s_idx), o_cov, 1, both,
                                                   kept, seconds)):
                            a[i] += value
        del probs
        print(f"layer {layer} done ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = []
    for (block, top_k, score, estimator), values in sorted(acc.items()):
        hits, picks, s_cov, o_cov, n_layers, both, kept, seconds = values
        rows.append({
            "block": block, "top_k": top_k, "score": score, "estimator": estimator,
            "recall": hits / picks if picks else float("nan"),
            "recall_all_kept": both / kept,
            "coverage": s_cov / n_layers, "oracle_coverage": o_cov / n_layers,
            "coverage_gap": (o_cov - s_cov) / n_layers, "key_blocks": math.ceil(T / block),
            "seconds_per_layer": seconds / n_layers,
        })
    what = "Paul Graham essays" if args.text == "essays" else "gsm_symbolic chains of thought"
    print(f"\nSmolLM2-135M, {T} tokens of {what}, layers {chosen[0]}..{chosen[-1]} "
          f"({len(chosen)}), all 9 heads, sink 1 + local 1")
    print("| block | top_k | score | estimator | recall (searched blocks) | recall (all kept) | coverage "
          "| oracle coverage | gap | s / layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['top_k']} | {r['score']} | {r['estimator']} | {r['recall']:.3f} | "
              f"{r['recall_all_kept']:.3f} | {r['coverage']:.3f} | {r['oracle_coverage']:.3f} | "
              f"{r['coverage_gap']:+.3f} | {r['seconds_per_layer']:.2f} |")
    result = {"model": "smollm2-135m", "text": args.text, "tokens": T, "layers": chosen, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
