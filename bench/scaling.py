"""How stream_mask scales with context length on CPU: time and peak memory, against the exact
oracle.

One layer's heads of SmolLM2-135M (9 query heads, 3 kv heads, head_dim 64), random post-RoPE-like
q/k in float32 (Gaussian, rotated by RoPE with theta 1e5 as in SmolLM2), S = T, block 32, top_k 16,
1 sink, 1 local. Every (provider, length) runs in a fresh subprocess, so peak memory (peak RSS
during the calls minus RSS after allocating the inputs and a small warm-up call; VmHWM reset where
Linux allows, else ru_maxrss) does not leak between rows. A run that runs out of memory (address
space capped by --mem-limit-gib) or past --timeout is recorded as such.

    python bench/scaling.py            # T = 8k .. 128k, oracle up to 32k
    python bench/scaling.py --quick    # T = 8k, 16k, 32k

Prints a markdown table, the log-log slope of stream time over the lengths, and one JSON line (also
written to bench/results/scaling.json). Target: slope <= 1.15 (O(T log T) work; the FLOP count
itself has slope ~1.21 over 8k..128k, since the levels grow from 5 to 9). Wall times are only as
good as the machine is idle: the load average is recorded, and CPU time is reported beside wall
time."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(Hq=9, Hkv=3, D=64)
MASK = dict(block_q=32, block_k=32, top_k=16, sink_blocks=1, local_blocks=1)
ROPE_THETA = 1e5
TARGET_SLOPE = 1.15
CHUNK = 4096  # query chunk of the "stream_chunked" provider (the tracer's chunked prefill)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> tuple[str, float]:
    """Start a peak-memory window; returns (method, baseline MiB). Linux >= 4.0 can reset the
    high-water mark (VmHWM) through /proc/self/clear_refs; elsewhere fall back to ru_maxrss (a
    process-lifetime peak, hence one fresh process per measurement)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM", _status_mib("VmRSS")
    except OSError:
        return "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib(method: str) -> float:
    if method == "VmHWM":
        return _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _inputs(T: int, seed: int = 0):
    """q ``[1, Hq, T, D]``, k ``[1, Hkv, T, D]`` float32: Gaussian, then RoPE-rotated (half-split
    layout)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    D = SHAPE["D"]
    inv_freq = ROPE_THETA ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # [D/2]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # [T, D/2]
    cos, sin = angles.cos().float().repeat(1, 2), angles.sin().float().repeat(1, 2)  # [T, D]

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    q = rope(torch.randn(1, SHAPE["Hq"], T, D, generator=g))
    k = rope(torch.randn(1, SHAPE["Hkv"], T, D, generator=g))
    return q, k


def stream_gflop(T: int) -> float:
    """Multiply-adds of the representative-score matmuls, x2: levels * 2m tiles of bq x bk x D per q
    block."""
    bq, bk, top_k = MASK["block_q"], MASK["block_k"], MASK["top_k"]
    m = top_k - MASK["sink_blocks"] - MASK["local_blocks"]
    n_kb = math.ceil(T / bk)
    levels = math.ceil(math.log2(math.ceil(max(n_kb - top_k + m, m) / m)))
    return 2 * SHAPE["Hq"] * math.ceil(T / bq) * levels * 2 * m * bq * bk * SHAPE["D"] / 1e9


def worker(provider: str, T: int, repeats: int, mem_limit_gib: float) -> dict:
    """Run in a fresh process: time one provider at one length; peak RSS growth over the inputs."""
    if mem_limit_gib > 0:  # fail with an allocation error instead of waking the OOM killer
        limit = int(mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    import sparsetrace as sp
    from sparsetrace.tracing.cpu import keep_freed_memory

    keep_freed_memory()  # as the tracer does on CPU (page faults otherwise dominate)

    def chunked(q, k, **kw):
        """How the tracer calls it: query chunks of CHUNK against the whole causal key prefix, so the
        score tiles stay O(CHUNK) instead of O(T)."""
        rows = [sp.stream_mask(q[:, :, s : s + CHUNK], k[:, :, : s + CHUNK], **kw).indices
                for s in range(0, q.shape[2], CHUNK)]
        return sp.BlockMask(torch.cat(rows, dim=2), kw["block_q"], kw["block_k"])

    fn = {"stream": sp.stream_mask, "stream_chunked": chunked, "oracle": sp.oracle_mask}[provider]
    q, k = _inputs(T)
    fn(q[:, :, :512], k[:, :, :512], **MASK)  # warm-up: kernels, thread pool, allocator
    method, base = _reset_peak()
    times, cpu_times = [], []
    try:
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            mask = fn(q, k, **MASK)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if sum(times) > 20:  # enough for a stable minimum at long lengths
                break
    except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return dict(
            status="OOM",
            error=str(err).splitlines()[0][:200],
            peak_mib=_peak_mib(method) - base,
            peak_method=method,
        )
    assert tuple(mask.indices.shape) == (
        1,
        SHAPE["Hq"],
        math.ceil(T / MASK["block_q"]),
        MASK["top_k"],
    )
    return dict(
        status="ok",
        seconds=min(times),
        cpu_seconds=min(cpu_times),
        repeats=len(times),
        peak_mib=_peak_mib(method) - base,
        peak_method=method,
        threads=torch.get_num_threads(),
    )


def run_one(provider: str, T: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        provider,
        "--T",
        str(T),
        "--repeats",
        str(args.repeats),
        "--mem-limit-gib",
        str(args.mem_limit_gib),
    ]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(status="too slow", error=f"> {args.timeout} s")
    if run.returncode != 0:
        status = "OOM" if run.returncode in (-9, 137) or "memory" in run.stderr.lower() else "error"
        return dict(status=status, error=(run.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(run.stdout.strip().splitlines()[-1])


def loglog_slope(xs, ys) -> float | None:
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _fmt(row: dict, key: str, spec: str) -> str:
    if row.get("status") != "ok":
        return row.get("status", "skipped")
    return format(row[key], spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8192, 16384, 32768, 65536, 131072],
        help="comma-separated T values",
    )
    parser.add_argument("--quick", action="store_true", help="T = 8k, 16k, 32k only")
    parser.add_argument(
        "--oracle-max", type=int, default=32768, help="longest T to run the O(T^2) oracle"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per row (minimum reported)"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (provider, length)")
    parser.add_argument(
        "--mem-limit-gib",
        type=float,
        default=round(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        help="address-space cap per worker (0 = none); default 80%% of RAM",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "scaling.json"
    )
    parser.add_argument("--worker", choices=["stream", "stream_chunked", "oracle"], help=argparse.SUPPRESS)
    parser.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.T, args.repeats, args.mem_limit_gib)))
        return
    lengths = [8192, 16384, 32768] if args.quick else args.lengths

    load_before = os.getloadavg()  # wall times are only as good as the machine is idle
    rows = []
    for T in lengths:
        row = dict(T=T, gflop=round(stream_gflop(T), 1), stream=run_one("stream", T, args),
                   chunked=run_one("stream_chunked", T, args))
        row["oracle"] = (
            run_one("oracle", T, args) if T <= args.oracle_max else dict(status="skipped")
        )
        rows.append(row)
        print(f"T={T}: stream {row['stream']}, oracle {row['oracle']}", file=sys.stderr, flush=True)

    print(
        f"\nstream_mask vs oracle_mask, CPU ({os.cpu_count()} cores), Hq={SHAPE['Hq']} "
        f"Hkv={SHAPE['Hkv']} D={SHAPE['D']} float32, {MASK}\n"
    )
    print(
        "| T | stream s | stream CPU s | stream peak MiB | stream GFLOP/s "
        f"| chunked ({CHUNK}) s | chunked peak MiB | oracle s | oracle peak MiB | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, o = r["stream"], r["oracle"]
        both = s.get("status") == "ok" and o.get("status") == "ok"
        gflops = f"{r['gflop'] / s['seconds']:.1f}" if s.get("status") == "ok" else "-"
        ratio = f"{o['seconds'] / s['seconds']:.1f}x" if both else "-"
        print(
            f"| {r['T']} | {_fmt(s, 'seconds', '.3f')} | {_fmt(s, 'cpu_seconds', '.2f')} | "
            f"{_fmt(s, 'peak_mib', '.0f')} | {gflops} | "
            f"{_fmt(r['chunked'], 'seconds', '.3f')} | {_fmt(r['chunked'], 'peak_mib', '.0f')} | "
            f"{_fmt(o, 'seconds', '.3f')} | {_fmt(o, 'peak_mib', '.0f')} | {ratio} |"
        )

    ok = [r for r in rows if r["stream"].get("status") == "ok"]
    slope = loglog_slope([r["T"] for r in ok], [r["stream"]["seconds"] for r in ok])
    span = f"{ok[0]['T']}..{ok[-1]['T']}" if ok else "-"
    verdict = "n/a" if slope is None else ("meets" if slope <= TARGET_SLOPE else "misses")
    flop_slope = loglog_slope([r["T"] for r in ok], [r["gflop"] for r in ok])
    cpu_slope = loglog_slope([r["T"] for r in ok], [r["stream"]["cpu_seconds"] for r in ok])
    okc = [r for r in rows if r["chunked"].get("status") == "ok"]
    chunked_slope = loglog_slope([r["T"] for r in okc], [r["chunked"]["seconds"] for r in okc])
    print(
        f"\nlog-log slope of stream time over T = {span}: "
        f"{'n/a' if slope is None else f'{slope:.3f}'} ({verdict} target <= {TARGET_SLOPE}); "
        f"slope of the FLOP count itself (levels grow as log2(T / m)): "
        f"{'n/a' if flop_slope is None else f'{flop_slope:.3f}'}; of CPU time (less sensitive to "
        f"other load): {'n/a' if cpu_slope is None else f'{cpu_slope:.3f}'}; chunked: "
        f"{'n/a' if chunked_slope is None else f'{chunked_slope:.3f}'}; load average "
        f"{load_before} before, {os.getloadavg()} after"
    )
    result = dict(
        bench="scaling",
        device="cpu",
        cpus=os.cpu_count(),
        machine=platform.machine(),
        shape=SHAPE,
        mask=MASK,
        dtype="float32",
        rows=rows,
        stream_slope=slope,
        flop_slope=flop_slope,
        cpu_slope=cpu_slope,
        chunked_slope=chunked_slope,
        load_before=load_before,
        load_after=os.getloadavg(),
        slope_span=span,
        target_slope=TARGET_SLOPE,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
