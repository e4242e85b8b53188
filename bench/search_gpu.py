"""GPU cost of the searched selections: SHORTLIST against STREAM and dense attention, in the same run.

Run on a CUDA machine from the repository root:

    PYTHONPATH=src python bench/search_gpu.py                    # 131072 and 1048576 tokens
    PYTHONPATH=src python bench/search_gpu.py --lengths 8192,131072 --json /tmp/search_gpu.json

One layer of Qwen2.5-1.5B's attention shape (12 query heads, 2 kv heads, head_dim 128, bf16, batch 1) on
random q, k, per length T and block config: ``stream_mask(impl="triton")`` (Triton halves scorer),
``shortlist_mask(impl="triton")`` (torch pre-score, Triton rescoring), dense causal SDPA (the faster of the
flash and cuDNN backends) for scale, each a median of repeated runs; the peak GPU memory each selection adds
over its inputs; and the rows where the two selections agree (random inputs have no needle: agreement here
only says how different the searches are, the recall benches say which is right). Then the last 1 and
``EXACT_TAIL`` queries alone over all keys (a decode token; the input's tail, which SHORTLIST scores
exactly). Prints the tables and writes JSON (bench/results/search_gpu.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from sparsetrace import MaskConfig, shortlist_mask, stream_mask
from sparsetrace.selection.shortlist import EXACT_TAIL

HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128  # Qwen2.5-1.5B


def time_ms(fn, reps: int = 5) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call (CUDA-synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra_mb(fn) -> float:
    """GPU memory ``fn`` allocates at its peak beyond what is allocated before it, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def dense_ms(q, k, v) -> float:
    """Causal SDPA on the faster of the flash and cuDNN backends (GQA by ``enable_gqa``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = float("inf")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                best = min(best, time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True), reps=3))
        except RuntimeError:
            continue
    return best


def last_queries_row(q, k, v) -> dict:
    """The selection of the last 1 and ``EXACT_TAIL`` queries alone over all keys (a decode token, and the
    input's tail, which SHORTLIST scores exactly), against dense SDPA of them."""
    config = MaskConfig(block_q=64, block_k=64, top_k=16)
    row = {"T": k.shape[2]}
    for n in (1, EXACT_TAIL):
        last = q[:, :, -n:]
        row[f"stream_ms_{n}"] = time_ms(lambda last=last: stream_mask(last, k, config, impl="triton"))
        row[f"shortlist_ms_{n}"] = time_ms(lambda last=last: shortlist_mask(last, k, config, impl="triton"))
        row[f"dense_ms_{n}"] = time_ms(lambda last=last: torch.nn.functional.scaled_dot_product_attention(
            last, k, v, enable_gqa=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,1048576")
    parser.add_argument("--configs", default="64,16;32,16;64,8",
                        help="block,top_k pairs separated by ';' (1 sink, 1 local block)")
    parser.add_argument("--json", default="bench/results/search_gpu.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {device}  torch {torch.__version__}  shape {HEADS} q / {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}, bf16", flush=True)
    header = (f"{'T':>8} {'block':>5} {'k':>3} {'stream ms':>10} {'shortlist ms':>12} {'ratio':>6} "
              f"{'dense ms':>9} {'stream MB':>10} {'shortlist MB':>12} {'same rows':>9}")
    print(header)
    rows, one_block = [], []
    for T in [int(x) for x in args.lengths.split(",")]:
        q = torch.randn(1, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        dense = dense_ms(q, k, v)
        for pair in args.configs.split(";"):
            block, top_k = (int(x) for x in pair.split(","))
            config = MaskConfig(block_q=block, block_k=block, top_k=top_k)
            row = {"T": T, "block": block, "top_k": top_k, "dense_ms": dense}
            masks = {}
            for name, select in (("stream", stream_mask), ("shortlist", shortlist_mask)):
                def run(select=select, q=q, k=k, config=config):
                    return select(q, k, config, impl="triton")
                masks[name] = run().indices
                row[f"{name}_ms"] = time_ms(run)
                row[f"{name}_peak_mb"] = peak_extra_mb(run)
            row["ratio"] = row["shortlist_ms"] / row["stream_ms"]
            row["same_rows"] = (masks["stream"] == masks["shortlist"]).all(-1).float().mean().item()
            rows.append(row)
            print(f"{T:8d} {block:5d} {top_k:3d} {row['stream_ms']:10.1f} {row['shortlist_ms']:12.1f} "
                  f"{row['ratio']:6.2f} {dense:9.1f} {row['stream_peak_mb']:10.0f} "
                  f"{row['shortlist_peak_mb']:12.0f} {row['same_rows']:9.3f}", flush=True)
        one_block.append(last_queries_row(q, k, v))
        del q, k, v
        torch.cuda.empty_cache()
    print(f"\nthe last queries alone over all T keys, block 64 / k 16 (a decode token; a prefill's exact tail)\n"
          f"{'T':>8} {'queries':>7} {'stream ms':>10} {'shortlist ms':>12} {'dense ms':>9}")
    for r in one_block:
        for n in (1, EXACT_TAIL):
            print(f"{r['T']:8d} {n:7d} {r[f'stream_ms_{n}']:10.2f} {r[f'shortlist_ms_{n}']:12.2f} "
                  f"{r[f'dense_ms_{n}']:9.2f}")
    result = {"bench": "search_gpu", "device": device, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "rows": rows, "last_queries": one_block}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
