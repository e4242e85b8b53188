"""SHORTLIST / STREAM at block 64 / k 16 and 4 on a CUDA machine: main's rule and the long-row merge, each with
``torch.topk`` and with a two-stage top-C (the top C of P column parts, unsorted, then the top C of those), in
one process; then a ``torch.profiler`` table of one 1M / k 16 call of each rule. Writes JSON.

    git apply bench/results/niah_search_long_row/long_row_merge.patch
    PYTHONPATH=src python bench/results/niah_search_long_row/merge_cost.py /tmp/merge_cost.json
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sparsetrace import MaskConfig, shortlist_mask, stream_mask
from sparsetrace.selection import shortlist as sl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from search_gpu import time_ms  # noqa: E402

ORIGINAL = sl.top_columns


def two_stage(parts: int):
    def top_columns(scores: torch.Tensor, width: int) -> torch.Tensor:
        n = scores.shape[-1]
        if not scores.is_cuda or n < 4 * parts * width:
            return ORIGINAL(scores, width)
        size = -(-n // parts)
        padded = torch.nn.functional.pad(scores, (0, size * parts - n), value=-math.inf)
        v, i = torch.topk(padded.unflatten(-1, (parts, size)), width, dim=-1, sorted=False)
        i = i + torch.arange(parts, device=scores.device)[:, None] * size
        j = torch.topk(v.flatten(-2), width, dim=-1).indices
        return i.flatten(-2).gather(-1, j)
    return top_columns


def measure(T: int) -> list[dict]:
    """The ratios at T tokens for k 16 and 4 (and the profile tables at 1M / k 16)."""
    torch.manual_seed(0)
    q = torch.randn(1, 12, T, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, T, 128, device="cuda", dtype=torch.bfloat16)
    rows = []
    for top_k in (16, 4):
        config = MaskConfig(block_q=64, block_k=64, top_k=top_k)
        stream = time_ms(lambda config=config: stream_mask(q, k, config, impl="triton"))
        row = {"T": T, "top_k": top_k, "stream_ms": stream}
        reference = {}
        for rule, long_row in (("main", math.inf), ("merge", 256)):
            sl.LONG_ROW = long_row
            for parts in (0, 8, 16):
                sl.top_columns = ORIGINAL if parts == 0 else two_stage(parts)
                ms = time_ms(lambda config=config: shortlist_mask(q, k, config, impl="triton"))
                indices = shortlist_mask(q, k, config, impl="triton").indices
                reference.setdefault(rule, indices)
                row[f"{rule}_p{parts}"] = round(ms / stream, 3)
                row[f"{rule}_p{parts}_same"] = round(float((indices == reference[rule]).all(-1).float().mean()), 4)
        sl.top_columns = ORIGINAL
        print(json.dumps(row), flush=True)
        rows.append(row)
        if T == 1048576 and top_k == 16:
            for rule, long_row in (("main", math.inf), ("merge", 256)):
                sl.LONG_ROW = long_row
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    shortlist_mask(q, k, config, impl="triton")
                    torch.cuda.synchronize()
                print(rule)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))
    return rows


def main() -> None:
    rows = [row for T in (131072, 1048576) for row in measure(T)]
    with open(sys.argv[1], "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
