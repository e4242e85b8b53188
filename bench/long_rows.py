"""Long rows on real Q/K: how many of the oracle's picks SHORTLIST keeps with the Gaussian guess and with Quest's bound.

In a long row (many candidates: 256 or more here) SHORTLIST's C is a small share of the candidates, and on a
30k NIAH case the guess (its step 2, mean plus three standard deviations) dropped the needle's block where
Quest's per-channel bound kept it (bench/RESULTS.md, issue 16). This asks whether the bound also keeps the
oracle's other picks there: one dense forward of the model over ``--tokens`` tokens of essays captures
post-RoPE q and k; in each chosen layer, for each k, it runs the oracle (exact block top-k), SHORTLIST, and
SHORTLIST with step 2 swapped for the bound (``bench/niah_prescore.py``), and counts, over the rows with
``LONG_ROW`` or more middle candidates outside the input's exact tail, the oracle's middle picks each keeps
(recall) and the rows where it keeps all of them; and how many of those picks two mixes of the two pre-scores
would hold in their shortlist (:func:`shortlists`). Block 32, one sink and one local block, max score. Prints
a table and writes JSON.

    python bench/long_rows.py --model gemma-3-270m --tokens 16384 --layers 5,11,17 --ks 3,4,8,16 \
        --json bench/results/long_rows_gemma_16k.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from niah_prescore import bound_prescore, bound_scores, pool_key_bounds  # noqa: E402  (a sibling bench script)

from sparsetrace import MaskConfig, load_model  # noqa: E402
from sparsetrace.datasets.essays import haystack_text  # noqa: E402
from sparsetrace.selection.blocks import candidate_range, in_middle, query_blocks  # noqa: E402
from sparsetrace.selection.oracle import oracle_select  # noqa: E402
from sparsetrace.selection.shortlist import (  # noqa: E402
    Z,
    exact_tail_blocks,
    pool_keys,
    pool_queries,
    pre_scores,
    shortlist_select,
    shortlist_sizes,
)
from sparsetrace.tracing.probe import capture_qk  # noqa: E402
from sparsetrace.tracing.tracer import tokenize  # noqa: E402

BLOCK, SINK, LOCAL = 32, 1, 1
LONG_ROW = 256  # middle candidates from which a row counts as long (8k tokens at block 32)


def oracle_middle(oracle: torch.Tensor, rows: torch.Tensor, first: torch.Tensor,
                  end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's picks ``[Hq, R, k]`` in the query blocks ``rows`` of its ``[Hq, nQ, k]`` indices, and which
    of them are middle picks (a row's middle is ``[first, end)``; the forced blocks are in every selection)."""
    o = oracle[:, rows].long()
    return o, (o >= first[rows, None]) & (o < end[rows, None])


def kept(selected: torch.Tensor, oracle: torch.Tensor, rows: torch.Tensor, first: torch.Tensor,
         end: torch.Tensor) -> tuple[int, int, int, int]:
    """(oracle middle picks kept, oracle middle picks, rows keeping every one, rows) over the query blocks
    ``rows`` of ``[Hq, nQ, k]`` indices (:func:`oracle_middle`)."""
    o, middle = oracle_middle(oracle, rows, first, end)
    hit = (o[..., :, None] == selected[:, rows, None, :].long()).any(-1) & middle
    return int(hit.sum()), int(middle.sum()), int((hit == middle).all(-1).sum()), hit.shape[0] * hit.shape[1]


def ranks(scores: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    """Each block's rank (0 = best) among its row's middle candidates, ties to the lower block:
    ``scores [H, nQ, nKB]``, bool ``middle [nQ, nKB]`` -> ``[H, nQ, nKB]`` (blocks outside rank last)."""
    order = torch.sort(scores.masked_fill(~middle, -math.inf), dim=-1, descending=True, stable=True).indices
    return torch.argsort(order, dim=-1)


def merged_scores(by_guess: torch.Tensor, by_bound: torch.Tensor) -> torch.Tensor:
    """The merge's ranking as scores (higher is better) from the two pre-scores' :func:`ranks` ``[H, R, nKB]``:
    a block's best rank under either, ties by the guess's rank."""
    return -(torch.minimum(by_guess, by_bound) * by_guess.shape[-1] + by_guess).double()


def prescore_ranks(q_sum: torch.Tensor, k: torch.Tensor, middle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each key block's :func:`ranks` among its row's ``middle [R, nKB]`` under z 3's guess and under Quest's
    bound, ``[H, R, nKB]`` each, for the query sums ``q_sum [1, H, R, D]`` against k ``[Hkv, S, D]``."""
    by_guess = ranks(pre_scores(q_sum, *pool_keys(k[None], BLOCK), Z)[0], middle)
    return by_guess, ranks(bound_scores(q_sum, *pool_key_bounds(k[None], BLOCK))[0], middle)


def shortlists(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, lo: torch.Tensor, n: torch.Tensor,
               ) -> dict[str, torch.Tensor]:
    """Which blocks each row's shortlist holds, bool ``[H, nQ, nKB]``, for two ways of mixing the pre-scores:
    ``merge`` takes the C blocks with the best rank under either (``min(rank_guess, rank_bound)``, then the
    guess's rank), the same C as SHORTLIST; ``union`` takes the C best of each, up to 2C blocks, to compare
    with ``guess_2c``, the 2C best by the guess."""
    T = q.shape[1]
    q_sum = pool_queries(q[None], query_blocks(q[None, :1, :, :1], config, T)[2])
    middle = in_middle(torch.arange(math.ceil(T / BLOCK))[None, :], lo, n, SINK, config)  # [nQ, nKB]
    by_guess, by_bound = prescore_ranks(q_sum, k, middle)
    size = shortlist_sizes(middle.sum(-1), config.top_k - SINK - LOCAL)[:, None]  # [nQ, 1]
    merged = ranks(merged_scores(by_guess, by_bound), middle)
    return {"merge": (merged < size) & middle, "union": ((by_guess < size) | (by_bound < size)) & middle,
            "guess_2c": (by_guess < 2 * size) & middle}


def held(shortlist: torch.Tensor, oracle: torch.Tensor, rows: torch.Tensor, first: torch.Tensor,
         end: torch.Tensor) -> int:
    """The oracle's middle picks (:func:`oracle_middle`) that the bool ``shortlist [H, nQ, nKB]`` holds, over
    the query blocks ``rows``."""
    o, middle = oracle_middle(oracle, rows, first, end)
    return int((shortlist[:, rows].gather(-1, o.clamp(min=0)) & middle).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", default="", help="comma-separated layers (default: every layer with long rows)")
    p.add_argument("--ks", default="3,4,8,16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    ids, _ = tokenize(tokenizer, haystack_text(args.tokens * 6), max_tokens=args.tokens)
    T = ids.shape[0]
    start = time.perf_counter()
    layers = capture_qk(model, ids)
    print(f"{args.model}: {T} tokens captured in {time.perf_counter() - start:.0f} s", flush=True)
    chosen = [int(x) for x in args.layers.split(",")] if args.layers else sorted(layers)
    rows_out = []
    print(f"{'layer':>5} {'k':>3} {'rows':>6} {'guess recall':>12} {'bound recall':>12} "
          f"{'guess all':>9} {'bound all':>9} {'merge':>10} {'union 2C':>10} {'guess 2C':>10}")
    for layer in chosen:
        q, k, scale, window = layers[layer]
        for top_k in [int(x) for x in args.ks.split(",")]:
            config = MaskConfig(block_q=BLOCK, block_k=BLOCK, top_k=top_k, sink_blocks=SINK, local_blocks=LOCAL)
            lo, n = candidate_range(T, T, config, "cpu", window)
            count = n - lo - SINK - LOCAL
            searched = torch.arange(len(n)) < len(n) - exact_tail_blocks(T, T, BLOCK)
            rows = ((count >= LONG_ROW) & searched).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            oracle = oracle_select(q[None], k[None], config, scale=scale, window=window).indices[0]
            guess = shortlist_select(q[None], k[None], config, scale=scale, window=window).indices[0]
            with bound_prescore():
                bound = shortlist_select(q[None], k[None], config, scale=scale, window=window).indices[0]
            g, b = (kept(x, oracle, rows, lo + SINK, n - LOCAL) for x in (guess, bound))
            mixed = {name: held(short, oracle, rows, lo + SINK, n - LOCAL)
                     for name, short in shortlists(q, k, config, lo, n).items()}
            row = {"layer": layer, "k": top_k, "rows": g[3], "picks": g[1], "guess_kept": g[0], "bound_kept": b[0],
                   "guess_rows_all": g[2], "bound_rows_all": b[2],
                   **{f"{name}_held": n_held for name, n_held in mixed.items()}}
            rows_out.append(row)
            print(f"{layer:5d} {top_k:3d} {g[3]:6d} {g[0] / g[1]:12.3f} {b[0] / b[1]:12.3f} {g[2] / g[3]:9.3f} "
                  f"{b[2] / b[3]:9.3f} {mixed['merge'] / g[1]:10.3f} {mixed['union'] / g[1]:10.3f} "
                  f"{mixed['guess_2c'] / g[1]:10.3f}", flush=True)
    result = {"bench": "long_rows", "model": args.model, "tokens": T, "block": BLOCK, "long_row": LONG_ROW,
              "date": time.strftime("%Y-%m-%d"), "rows": rows_out}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
