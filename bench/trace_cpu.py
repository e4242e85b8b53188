"""Wall time and peak memory of `sparsetrace trace` on this kind of machine (2 cores, 24 GiB): the default
model (SmolLM2-135M) over 8k and 32k tokens of real text, each length in a fresh process (peak RSS is the
process's high-water mark). Prints a table, ends with one JSON line, writes bench/results/trace_cpu.json.

    python bench/trace_cpu.py [--lengths 8192,32768] [--top-k 16] [--chunk-size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(tokens: int, top_k: int, chunk: int) -> dict:
    """Run the CLI in a child process and read its peak RSS from the kernel."""
    from sparsetrace.datasets.essays import haystack_text

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "essays.txt"
        text.write_text(haystack_text(tokens * 6))
        out = Path(tmp) / "trace"
        cmd = [sys.executable, "-m", "sparsetrace.cli", "trace", "--text-file", str(text),
               "--max-tokens", str(tokens), "--top-k", str(top_k), "--chunk-size", str(chunk),
               "--no-progress", "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"trace failed: {done.stderr.strip()}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over children so far
        fields = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip()
                      and line.split(None, 1)[0] in ("sparsity",))
        manifest = json.loads((out / "manifest.json").read_text())
        trace_bytes = sum(s["bytes"] for s in manifest["shards"])
    sparsity = float(fields["sparsity"].split()[0]) if "sparsity" in fields else None
    return {"tokens": tokens, "top_k": top_k, "chunk": chunk, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 2), "sparsity": sparsity,
            "trace_bytes": trace_bytes, "stdout": done.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=Path("bench/results/trace_cpu.json"))
    args = parser.parse_args()
    rows = []
    for tokens in (int(x) for x in args.lengths.split(",")):
        # RUSAGE_CHILDREN is a running max, so measure each length in its own benchmark process.
        child = subprocess.run([sys.executable, __file__, "--one", str(tokens), str(args.top_k),
                                str(args.chunk_size)], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1].pop("stdout"), flush=True)
    print(f"\n{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print("| tokens | top_k | chunk | wall s | peak RSS GiB | sparsity | trace MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['top_k']} | {r['chunk']} | {r['wall_s']} | {r['peak_rss_gib']} | "
              f"{r['sparsity']} | {r['trace_bytes'] / 1e6:.1f} |")
    result = {"model": "smollm2-135m", "rows": rows, "date": time.strftime("%Y-%m-%d"),
              "device": f"{os.cpu_count()} cores, "
                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(one_run(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
