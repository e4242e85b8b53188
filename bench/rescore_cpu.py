"""SHORTLIST's step 4 on the CPU: scoring only each row's first C candidates against the whole width.

SHORTLIST shortlists ``C`` candidates per query block, and the candidates tensor is as wide as the largest
row's C; rows of a causal input use 60-75 % of it at 4k-32k tokens. ``chunked_tile_scores(sizes=...)`` scores
a row's first C only. This times ``shortlist_select`` on one layer of SmolLM2-135M's shape (9 query heads, 3 kv
heads, head_dim 64; random float32 q/k; block 32, k 16) with that (``first C``) and with every row scored at
full width (``full width``, the rule before), alternating in one process, best of ``--reps``, on the whole
input and in the tracer's 1024-token chunks; the selections must be equal. Prints a table and writes JSON.

    python bench/rescore_cpu.py [--lengths 4096,16384] [--reps 3] [--json bench/results/rescore_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sparsetrace import MaskConfig
from sparsetrace.selection import shortlist
from sparsetrace.selection.blocks import chunked_tile_scores

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
CHUNK = 1024  # the tracer's default prefill chunk


def full_width(*args, sizes=None, **kwargs) -> torch.Tensor:
    """Step 4 as before: every candidate of every row scored (``sizes`` ignored)."""
    return chunked_tile_scores(*args, **kwargs)


def select(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, chunk: int | None) -> torch.Tensor:
    """SHORTLIST's indices over the whole input, or chunk by chunk as the tracer's prefill calls it."""
    T = q.shape[2]
    if chunk is None:
        return shortlist.shortlist_select(q, k, config).indices
    return torch.cat([shortlist.shortlist_select(q[:, :, i:i + chunk], k[:, :, :i + chunk], config,
                                                 input_end=T).indices for i in range(0, T, chunk)], dim=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("bench/results/rescore_cpu.json"))
    args = p.parse_args(argv)
    config = MaskConfig(block_q=32, block_k=32, top_k=16, estimator="shortlist")
    rows = []
    print(f"{'T':>6} {'chunk':>6} {'full width s':>12} {'first C s':>10} {'ratio':>6} same")
    for T in [int(x) for x in args.lengths.split(",")]:
        torch.manual_seed(0)
        q, k = torch.randn(1, HEADS, T, HEAD_DIM), torch.randn(1, KV_HEADS, T, HEAD_DIM)
        for chunk in (None, CHUNK):
            times, out = {"full": [], "first": []}, {}
            for _ in range(args.reps):
                for name, scorer in (("full", full_width), ("first", chunked_tile_scores)):
                    shortlist.chunked_tile_scores = scorer
                    start = time.perf_counter()
                    out[name] = select(q, k, config, chunk)
                    times[name].append(time.perf_counter() - start)
            shortlist.chunked_tile_scores = chunked_tile_scores
            row = {"T": T, "chunk": chunk, "full_width_s": round(min(times["full"]), 3),
                   "first_c_s": round(min(times["first"]), 3), "same": bool(torch.equal(out["full"], out["first"]))}
            row["ratio"] = round(row["first_c_s"] / row["full_width_s"], 3)
            rows.append(row)
            print(f"{T:6d} {chunk or '-':>6} {row['full_width_s']:12.3f} {row['first_c_s']:10.3f} "
                  f"{row['ratio']:6.3f} {row['same']}", flush=True)
    result = {"bench": "rescore_cpu", "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "cores": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    print(json.dumps(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(row["same"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
