"""Per-layer cost of STREAM + sparse attention against dense causal attention, on one GPU.

Run on a CUDA machine from the repository root (docs/gpu.md):

    PYTHONPATH=src python bench/gpu.py                      # table, then one JSON line
    PYTHONPATH=src python bench/gpu.py --lengths 8192,32768 --json /tmp/gpu.json

One layer of Qwen2.5-1.5B's attention shape (12 query heads, 2 kv heads, head_dim 128, bf16) on random
q, k, v, per length T (queries = keys = T):
- ``stream``: ``stream_mask(impl="triton")`` (Triton scorer, search in torch);
- ``sparse``: ``sparse_attention(return_mass=True, impl="triton")`` (FlexAttention + Triton block masses),
  also split into ``flex`` (output only) and ``mass`` (the second QK pass, given the logsumexp);
- ``dense``: ``scaled_dot_product_attention(is_causal=True)`` on the flash and the cuDNN backends, same
  tensors; ``dense_ms`` is the faster of the two;
- ``ratio`` = (stream + sparse) / dense (``ratio_vs_flash`` against the flash backend alone);
- ``--sweep-launch``: first time the scorer alone at the longest length for a few (num_warps,
  num_stages) and use the fastest for the table (``kernels.scoring.scorer_launch`` is the override point);
- trace bytes (int16 indices + fp16 masses, 28 layers x 12 heads) against the dense fp16 causal pattern
  (28 x 12 x T^2 / 2 entries of 2 bytes);
- the log-log slope of stream time over 64k..1M (least squares and end points);
- the torch path of ``stream_mask`` on the GPU, eager and under ``torch.compile``, against the Triton
  scorer at short lengths (the torch path materialises the ``[B, Hq, nQ, bq, 2m*bk]`` tile per level).
Out-of-memory is recorded as ``"OOM"``, other failures as ``"ERR: ..."``; the sweep goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from sparsetrace import MaskConfig, sparse_attention, stream_mask

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 28, 12, 2, 128  # Qwen2.5-1.5B
TARGETS = {131072: 0.25, 1048576: 0.03}
SLOPE_TARGET = 1.15


def time_ms(fn, budget_ms: float = 400.0, max_reps: int = 20):
    """Median milliseconds of ``fn()`` after one warm-up call (compiles land there); CUDA events."""
    fn()
    torch.cuda.synchronize()
    samples = []
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        if len(samples) >= max_reps or sum(samples) >= budget_ms:
            break
    samples.sort()
    return samples[len(samples) // 2]


def guarded(fn):
    """Run ``fn``; return its value, ``"OOM"`` or ``"ERR: ..."`` (and free the cache after a failure)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        result = "OOM"
    except RuntimeError as error:
        result = "OOM" if "out of memory" in str(error) else f"ERR: {str(error).splitlines()[0][:160]}"
    except Exception as error:  # noqa: BLE001 - a benchmark records the failure and goes on
        result = f"ERR: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    torch.cuda.empty_cache()
    return result


def dense_fn(q, k, v, backend: str):
    """Causal SDPA on one backend: ``"flash"`` (GQA native) or ``"cudnn"`` (k, v expanded to Hq heads
    outside the timed region when the backend refuses GQA; the arithmetic is the same)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run_gqa():
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run_gqa()
        return run_gqa
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def run_expanded():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

        return run_expanded


def dense_times(q, k, v) -> dict:
    """Milliseconds of dense causal attention per backend, and the fastest (the ratio's denominator)."""
    out = {}
    for backend in ("flash", "cudnn"):
        out[f"dense_{backend}_ms"] = guarded(
            lambda backend=backend: time_ms(dense_fn(q, k, v, backend), budget_ms=300, max_reps=10))
    times = [x for x in out.values() if num(x)]
    out["dense_ms"] = min(times) if times else out["dense_flash_ms"]
    return out


def torch_stream_mask(config: MaskConfig):
    """stream_mask forced onto its torch path."""
    return lambda q, k: stream_mask(q, k, config, impl="torch")


def parse_config(text: str) -> MaskConfig:
    bq, bk, top_k, sink, local = (int(x) for x in text.split(","))
    return MaskConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, local_blocks=local)


def num(x):
    return x if isinstance(x, (int, float)) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072,524288,1048576")
    parser.add_argument("--slope-lengths", default="65536,131072,262144,524288,1048576")
    parser.add_argument("--config", action="append",
                        help="block_q,block_k,top_k,sink_blocks,local_blocks (repeatable); "
                             "default 64,64,16,1,1")
    parser.add_argument("--compare-lengths", default="8192,32768,131072",
                        help="lengths for the eager torch path of stream_mask")
    parser.add_argument("--compile-lengths", default="32768",
                        help="lengths for torch.compile(stream_mask) (each compiles once)")
    parser.add_argument("--json", default="bench/results/gpu.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-launch", action="store_true",
                        help="time scorer launch settings at the longest length and use the fastest")
    args = parser.parse_args()

    import triton

    for key, value in (("recompile_limit", 64), ("cache_size_limit", 64)):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, value)
    configs = [parse_config(c) for c in (args.config or ["64,64,16,1,1"])]
    lengths = [int(x) for x in args.lengths.split(",")]
    slope_lengths = [int(x) for x in args.slope_lengths.split(",")]
    compare_lengths = [int(x) for x in args.compare_lengths.split(",") if x]
    compile_lengths = [int(x) for x in args.compile_lengths.split(",") if x]
    device = torch.cuda.get_device_name()
    print(f"device {device}  torch {torch.__version__}  triton {triton.__version__}  "
          f"shape {HEADS} q / {KV_HEADS} kv heads, head_dim {HEAD_DIM}, bf16, batch 1", flush=True)

    rows, stream_only, compare = [], [], []
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    sweep = sweep_launch(max(lengths), configs, gen) if args.sweep_launch else {}
    for T in sorted(set(lengths) | set(slope_lengths)):
        torch.cuda.empty_cache()
        for row in bench_length(T, configs, T in lengths, gen):
            stream_only.append({key: row[key] for key in ("T", "config", "stream_ms", "stream_tflop")})
            if T in lengths:
                rows.append(row)
                print(_fmt(row), flush=True)
            else:
                print(f"T={T:>8d} {row['config']:>14s} stream {row['stream_ms']} ms", flush=True)
    for T in sorted(set(compare_lengths) | set(compile_lengths)):
        torch.cuda.empty_cache()
        entry = compare_torch_path(T, configs[0], T in compare_lengths, T in compile_lengths, gen)
        compare.append(entry)
        print("stream_mask torch path:", json.dumps(entry), flush=True)

    slopes = {}
    for config in configs:
        name = config_name(config)
        points = [(r["T"], r["stream_ms"]) for r in stream_only
                  if r["config"] == name and r["T"] in slope_lengths and num(r["stream_ms"])]
        if len(points) >= 2:
            xs = [math.log(t) for t, _ in points]
            ys = [math.log(ms) for _, ms in points]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            ends = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
            slopes[name] = {"points": points, "least_squares": fit, "end_points": ends,
                            "target": SLOPE_TARGET, "pass": fit <= SLOPE_TARGET}

    print()
    print(_HEADER)
    for row in rows:
        print(_fmt(row))
    for name, s in slopes.items():
        print(f"stream_mask slope {name} over {[t for t, _ in s['points']]}: least squares "
              f"{s['least_squares']:.3f}, end points {s['end_points']:.3f} (target <= {SLOPE_TARGET})")
    for row in rows:
        if row["T"] in TARGETS and row["ratio"] is not None:
            ok = row["ratio"] <= TARGETS[row["T"]]
            print(f"target T={row['T']} {row['config']}: ratio {row['ratio']:.4f} <= "
                  f"{TARGETS[row['T']]} {'PASS' if ok else 'MISS'}")
    for entry in compare:
        print(f"stream_mask T={entry['T']}: triton {entry['triton_ms']} ms, eager torch "
              f"{entry.get('eager_ms', '-')} ms, torch.compile {entry.get('compiled_ms', '-')} ms "
              f"(compile {entry.get('compile_s', 0):.0f} s)")
    result = {
        "bench": "gpu", "device": device, "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "dtype": "bfloat16", "batch": 1},
        "launch_sweep": sweep, "rows": rows, "stream_only": stream_only, "slopes": slopes,
        "stream_torch_vs_triton": compare,
    }
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


def sweep_launch(T: int, configs, gen) -> dict:
    """Time ``stream_mask(impl="triton")`` at length T for a few scorer launch settings per config; install the
    fastest per block shape as ``kernels.scoring.scorer_launch``. Returns the timings."""
    from sparsetrace.kernels import scoring

    default = scoring.scorer_launch
    q = torch.randn(1, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    result, best = {}, {}
    for config in configs:
        timings, differ = {}, {}
        first = gpu_stream_mask(q, k, config).indices  # default settings: the indices to reproduce
        for warps, stages in ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)):
            scoring.scorer_launch = lambda *a, w=warps, s=stages: {"num_warps": w, "num_stages": s}
            differ[f"{warps}w{stages}s"] = guarded(
                lambda c=config, f=first: int((gpu_stream_mask(q, k, c).indices != f).any(-1).sum()))
            timings[f"{warps}w{stages}s"] = guarded(lambda c=config: time_ms(
                lambda: gpu_stream_mask(q, k, c), budget_ms=600, max_reps=3))
            print(f"sweep T={T} {config_name(config)} warps={warps} stages={stages}: "
                  f"{timings[f'{warps}w{stages}s']} ms, rows differing from the default "
                  f"{differ[f'{warps}w{stages}s']}", flush=True)
        scoring.scorer_launch = default
        fastest = min((ms, name) for name, ms in timings.items() if num(ms))[1]
        best[(config.block_q, config.block_k)] = {"num_warps": int(fastest[0]),
                                                  "num_stages": int(fastest[2])}
        result[config_name(config)] = {"timings_ms": timings, "rows_differ_from_default": differ,
                                       "fastest": fastest,
                                       "default": default(config.block_q, config.block_k, HEAD_DIM,
                                                          torch.bfloat16)}

    def tuned(block_q, block_k, head_dim, dtype):
        return best.get((block_q, block_k)) or default(block_q, block_k, head_dim, dtype)

    scoring.scorer_launch = tuned
    return result


def config_name(config: MaskConfig) -> str:
    return f"{config.block_q},{config.block_k},{config.top_k},{config.sink_blocks},{config.local_blocks}"


def bench_length(T: int, configs, full: bool, gen) -> list[dict]:
    """Rows for one length: stream time per config, and with ``full`` sparse, dense, ratio and bytes."""
    q = torch.randn(1, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense = dense_times(q, k, v) if full else None
    return [bench_config(q, k, v, config, dense, full) for config in configs]


def bench_config(q, k, v, config: MaskConfig, dense, full: bool) -> dict:
    from sparsetrace.kernels import flex

    T = q.shape[2]
    t0 = time.perf_counter()
    row = {"T": T, "config": config_name(config)}
    row["stream_ms"] = guarded(lambda: time_ms(lambda: gpu_stream_mask(q, k, config)))
    nQ = math.ceil(T / config.block_q)
    levels = math.ceil(math.log2(math.ceil(
        max(math.ceil(T / config.block_k) - config.sink_blocks - config.local_blocks, middle(config))
        / middle(config))))
    # upper bound: every level scores 2m tiles of bq x bk x D per query block and head
    row["levels"] = levels
    row["stream_tflop"] = 2 * levels * 2 * middle(config) * nQ * HEADS * (
        config.block_q * config.block_k * HEAD_DIM) / 1e12
    if not full:
        return row
    mask = guarded(lambda: gpu_stream_mask(q, k, config))
    if isinstance(mask, str):
        row.update(sparse_ms=mask, flex_ms=mask, mass_ms=mask)
    else:
        row["sparse_ms"] = guarded(lambda: time_ms(
            lambda: gpu_sparse_attention(q, k, v, mask, return_mass=True)))
        row["flex_ms"] = guarded(lambda: time_ms(lambda: gpu_sparse_attention(q, k, v, mask)))
        lse = guarded(lambda: gpu_sparse_attention_lse(q, k, v, mask))
        row["mass_ms"] = lse if isinstance(lse, str) else guarded(lambda: time_ms(
            lambda: flex.block_mass(q, k, lse, mask.indices, config.block_q, config.block_k,
                                    HEAD_DIM**-0.5)))
    row.update(dense)
    ok = all(num(row[c]) is not None for c in ("stream_ms", "sparse_ms", "dense_ms"))
    row["ratio"] = (row["stream_ms"] + row["sparse_ms"]) / row["dense_ms"] if ok else None
    if ok and num(row["dense_flash_ms"]):
        row["ratio_vs_flash"] = (row["stream_ms"] + row["sparse_ms"]) / row["dense_flash_ms"]
    row["sparse_tflop"] = 4 * T * config.top_k * config.block_k * HEAD_DIM * HEADS / 1e12
    row["dense_tflop"] = 4 * T * T / 2 * HEAD_DIM * HEADS / 1e12
    row["trace_bytes"] = LAYERS * HEADS * nQ * config.top_k * (2 + 2)
    row["dense_pattern_bytes"] = LAYERS * HEADS * T * T // 2 * 2
    row["bytes_ratio"] = row["trace_bytes"] / row["dense_pattern_bytes"]
    row["seconds"] = time.perf_counter() - t0
    return row


def compare_torch_path(T: int, config: MaskConfig, eager: bool, compile_: bool, gen) -> dict:
    """mask.stream_mask's torch path on the GPU, eager and/or compiled, against the Triton scorer."""
    q = torch.randn(1, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, KV_HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    entry = {"T": T, "config": config_name(config)}
    reference = torch_stream_mask(config)
    triton_mask = gpu_stream_mask(q, k, config)
    entry["triton_ms"] = guarded(lambda: time_ms(lambda: gpu_stream_mask(q, k, config)))
    if eager:
        first = guarded(lambda: reference(q, k))
        entry["eager_ms"] = first if isinstance(first, str) else guarded(
            lambda: time_ms(lambda: reference(q, k), budget_ms=2000, max_reps=5))
        if not isinstance(first, str):
            entry["eager_rows_differ"] = int((first.indices != triton_mask.indices).any(-1).sum())
        del first
    if compile_:
        torch._dynamo.reset()
        compiled = torch.compile(reference, dynamic=False)
        t0 = time.perf_counter()
        first = guarded(lambda: compiled(q, k))
        torch.cuda.synchronize()
        entry["compile_s"] = time.perf_counter() - t0
        entry["compiled_ms"] = first if isinstance(first, str) else guarded(
            lambda: time_ms(lambda: compiled(q, k), budget_ms=2000, max_reps=10))
        if not isinstance(first, str):
            entry["compiled_rows_differ"] = int((first.indices != triton_mask.indices).any(-1).sum())
    for name in ("eager_ms", "compiled_ms"):
        if num(entry.get(name)) and num(entry["triton_ms"]):
            entry[name.replace("_ms", "_over_triton")] = entry[name] / entry["triton_ms"]
    return entry


def middle(config: MaskConfig) -> int:
    """m: the blocks the search chooses per query block."""
    return config.top_k - config.sink_blocks - config.local_blocks


def gpu_stream_mask(q, k, config):
    return stream_mask(q, k, config, impl="triton")


def gpu_sparse_attention(q, k, v, mask, return_mass=False):
    return sparse_attention(q, k, v, mask, return_mass=return_mass, impl="triton")


def gpu_sparse_attention_lse(q, k, v, mask):
    """The logsumexp FlexAttention returns for this mask (input of the mass pass timed alone)."""
    from sparsetrace.kernels import flex

    _, lse = flex.flex_attention_lse(q, k, v, mask, scale=q.shape[3] ** -0.5, return_lse=True)
    return lse


_HEADER = (f"{'T':>8s} {'config':>14s} {'stream_ms':>10s} {'flex_ms':>9s} {'mass_ms':>9s} "
           f"{'sparse_ms':>10s} {'flash_ms':>10s} {'cudnn_ms':>10s} {'ratio':>8s} {'trace_MB':>9s} "
           f"{'dense_GB':>10s} {'bytes_ratio':>11s}")


def _cell(x, width, fmt):
    return f"{x:{width}{fmt}}" if num(x) is not None else f"{str(x)[:width]:>{width}s}"


def _fmt(r) -> str:
    return (f"{r['T']:8d} {r['config']:>14s} {_cell(r['stream_ms'], 10, '.2f')} "
            f"{_cell(r['flex_ms'], 9, '.2f')} {_cell(r['mass_ms'], 9, '.2f')} "
            f"{_cell(r['sparse_ms'], 10, '.2f')} {_cell(r['dense_flash_ms'], 10, '.2f')} "
            f"{_cell(r['dense_cudnn_ms'], 10, '.2f')} {_cell(r['ratio'], 8, '.4f')} "
            f"{r['trace_bytes'] / 1e6:9.2f} {r['dense_pattern_bytes'] / 1e9:10.1f} "
            f"{r['bytes_ratio']:11.2e}")


if __name__ == "__main__":
    main()
