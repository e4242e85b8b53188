"""How large SHORTLIST's shortlist must be to keep the needles the exact oracle keeps, on real Q/K of NIAH cases.

For each RULER case (SmolLM2-135M, block 32), one dense forward captures every layer's post-RoPE q and k.
Then, for k in {4, 8}, each selection picks the answer block's key blocks (the last query block) in every
layer and head: the oracle, STREAM, and SHORTLIST with C = c × the default ``m * max(L, 2)`` for c in
{1, 2, 4}. We count the (layer, head) pairs whose answer block keeps a needle block. It measures the
search alone: no decoding, no RULER score (bench/niah_study.py has those).

    python bench/shortlist_size.py [--variants niah_single_2,niah_single_3,niah_multikey_1]
        [--lengths 2048] [--depths 10,50,90] [--json bench/results/shortlist_size.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import torch

from sparsetrace import MaskConfig, load_model
from sparsetrace.analysis.routes import needle_blocks
from sparsetrace.datasets import ruler
from sparsetrace.runs.niah import encode
from sparsetrace.selection.oracle import oracle_select
from sparsetrace.selection.shortlist import shortlist_select, shortlist_sizes
from sparsetrace.selection.stream import stream_select
from sparsetrace.tracing.probe import capture_qk

BLOCK = 32
MULTIPLES = (1, 2, 4)


def selections(q, k, config: MaskConfig, scale: float, window) -> dict[str, torch.Tensor]:
    """Indices ``[1, H, nQ, top_k]`` of each selection on one layer's q ``[H, T, D]``, k ``[Hkv, T, D]``."""
    q1, k1 = q[None], k[None]
    out = {"oracle": oracle_select(q1, k1, config, scale=scale, window=window).indices,
           "stream": stream_select(q1, k1, config, scale=scale, window=window).indices}
    m = config.top_k - config.sink_blocks - config.local_blocks
    count = torch.tensor([math.ceil(q.shape[1] / BLOCK) - config.sink_blocks - config.local_blocks])
    default = int(shortlist_sizes(count, m))  # C of the answer block, the last one
    for c in MULTIPLES:
        out[f"shortlist C x{c}"] = shortlist_select(q1, k1, config, scale=scale, window=window,
                                                    size=c * default).indices
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="niah_single_2,niah_single_3,niah_multikey_1")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="10,50,90")
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--json", type=Path, default=Path("bench/results/shortlist_size.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    cases = ruler.make_cases(args.variants.split(","), tokenizer, [int(x) for x in args.lengths.split(",")],
                             [float(x) for x in args.depths.split(",")], samples=1, seed=0)
    kept = collections.Counter()  # (k, selection) -> (layer, head) pairs keeping a needle block
    pairs = 0
    per_case = []
    for case in cases:
        layers = capture_qk(model, encode(tokenizer, case))
        needles = set(needle_blocks(case.needle_token_spans, BLOCK))
        row = {"id": case.id}
        for top_k in (int(x) for x in args.ks.split(",")):
            config = MaskConfig(block_q=BLOCK, block_k=BLOCK, top_k=top_k)
            for q, k, scale, window in layers.values():
                for name, indices in selections(q, k, config, scale, window).items():
                    hits = sum(bool(needles & set(r)) for r in indices[0, :, -1].tolist())
                    kept[(top_k, name)] += hits
                    row[f"{name} k{top_k}"] = row.get(f"{name} k{top_k}", 0) + hits
        pairs += sum(q.shape[0] for q, *_ in layers.values())
        per_case.append(row)
        print(row, flush=True)
    print(f"\nSmolLM2-135M, {len(cases)} cases, {pairs} (layer, head) pairs per k: pairs whose answer block "
          "keeps a needle block")
    print("| k | selection | pairs keeping the needle | share of the oracle's |")
    print("|---:|---|---:|---:|")
    rows = []
    for (top_k, name), n in sorted(kept.items()):
        share = n / kept[(top_k, "oracle")]
        rows.append({"k": top_k, "selection": name, "needle_kept": n, "share_of_oracle": round(share, 4)})
        print(f"| {top_k} | {name} | {n} | {share:.3f} |")
    result = {"bench": "shortlist_size", "model": "smollm2-135m", "block": BLOCK, "cases": len(cases),
              "pairs_per_k": pairs, "rows": rows, "per_case": per_case,
              "seconds": round(time.perf_counter() - start, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
