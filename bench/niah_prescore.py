"""SHORTLIST with Quest's per-channel bound as its pre-score (step 2), on the NIAH grid: a bench experiment.

SHORTLIST's step 2 ranks every candidate key block by a Gaussian guess at its top logit, the pooled mean key
plus three standard deviations (``selection.shortlist.pre_scores``). At 30k tokens on Gemma that guess leaves
the needle's block out of the shortlist in 46 % of the global-layer rows where the oracle keeps it at k 4
(bench/RESULTS.md, issue 16). Quest's bound (arXiv 2406.10774) ranks a block by the largest ``qsum . k`` any of
its keys could reach given each dimension's range, ``sum_d max(qsum_d kmax_d, qsum_d kmin_d) = qsum+ . kmax +
qsum- . kmin``: a block holding one strong key ranks by that key. It is used as a ranking only; as a bound it
is far above the true block maximum (shared/DESIGN.md).

This runs ``bench/niah_study.py`` with the library's SHORTLIST and that one step replaced: the module-level
``pool_keys`` / ``pre_scores`` that ``shortlist_select`` calls are swapped for :func:`pool_key_bounds` /
:func:`bound_scores` (the library has no such knob; the audit keeps its own binding of the Gaussian guess).
``--min-width W`` also widens step 3 for small m: ``C = min(count, max(m, W) * max(L, 2))`` (the rule's own
``w`` is ``m``, or 4 at m = 1). The cells keep the label ``shortlist:<k>``; count them against the oracle's
with ``bench/niah_of_oracle.py``.

    python bench/niah_prescore.py [--min-width 4] -- --models gemma-3-270m --variants niah_single_1 \
        --lengths 30k --depths 50 --samples 3 --top-k 3,4 --estimators shortlist --device cuda \
        --chunk-size 4096 --out /tmp/quest/niah_single_1_30k_d50.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import niah_study  # noqa: E402  (a sibling bench script)

from sparsetrace.selection import shortlist  # noqa: E402


def pool_key_bounds(k: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension maximum and minimum of the real keys of every block, float32 ``[B, Hkv, nKB, D]`` each
    (exact in k's dtype; the ragged last block over its real keys only, without padding a copy of k)."""
    B, H, S, D = k.shape
    whole, n_kb = S // block_k, math.ceil(S / block_k)
    k_max = torch.empty(B, H, n_kb, D, dtype=torch.float32, device=k.device)
    k_min = torch.empty_like(k_max)
    if whole:
        k_min[:, :, :whole], k_max[:, :, :whole] = torch.aminmax(
            k[:, :, : whole * block_k].unflatten(2, (whole, block_k)), dim=3)
    if n_kb > whole:
        k_min[:, :, whole], k_max[:, :, whole] = torch.aminmax(k[:, :, whole * block_k :], dim=2)
    return k_max, k_min


def bound_scores(q_sum: torch.Tensor, k_max: torch.Tensor, k_min: torch.Tensor, z: float = 0.0) -> torch.Tensor:
    """``qsum+ . kmax + qsum- . kmin``: ``[B, Hq, c, D]`` x ``[B, Hkv, nKB, D]`` -> ``[B, Hq, c, nKB]``, two GEMMs
    like the Gaussian guess's; GQA stacks the query heads of one kv head. ``z`` (the guess's weight) is unused:
    the signature is ``pre_scores``'."""
    B, Hq, c, D = q_sum.shape
    Hkv, n_kb = k_max.shape[1], k_max.shape[2]
    qs = q_sum.reshape(B * Hkv, (Hq // Hkv) * c, D)
    lower = torch.bmm(qs.clamp(max=0.0), k_min.reshape(B * Hkv, n_kb, D).mT)  # [B*Hkv, g*c, nKB]
    return torch.baddbmm(lower, qs.clamp(min=0.0), k_max.reshape(B * Hkv, n_kb, D).mT).reshape(B, Hq, c, n_kb)


def widened_sizes(min_width: int):
    """``shortlist_sizes`` with ``w = max(m, min_width)`` for every m (an explicit ``size`` is kept)."""
    rule = shortlist.shortlist_sizes

    def sizes(count: torch.Tensor, m: int, size: int | None = None) -> torch.Tensor:
        if size is not None:
            return rule(count, m, size)
        largest_group = torch.clamp(count, min=1).add(m - 1).div(m, rounding_mode="floor")  # ceil(count / m)
        levels = torch.ceil(torch.log2(largest_group.double())).long().clamp(min=2)
        return torch.minimum(count, max(m, min_width) * levels)

    return sizes


@contextlib.contextmanager
def bound_prescore(min_width: int | None = None):
    """SHORTLIST's step 2 is Quest's bound (and step 3 ``w = max(m, min_width)``) inside the block."""
    saved = shortlist.pool_keys, shortlist.pre_scores, shortlist.shortlist_sizes
    shortlist.pool_keys, shortlist.pre_scores = pool_key_bounds, bound_scores
    if min_width is not None:
        shortlist.shortlist_sizes = widened_sizes(min_width)
    try:
        yield
    finally:
        shortlist.pool_keys, shortlist.pre_scores, shortlist.shortlist_sizes = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-width", type=int, default=None, help="step 3's w = max(m, W) (default: the rule's)")
    p.add_argument("study", nargs=argparse.REMAINDER, help="-- then bench/niah_study.py's arguments")
    args = p.parse_args(argv)
    if args.min_width is not None and args.min_width < 1:
        p.error(f"--min-width {args.min_width} is not a width; give a positive integer, e.g. 4.")
    study = args.study[1:] if args.study[:1] == ["--"] else args.study
    with bound_prescore(args.min_width):
        return niah_study.main(study)


if __name__ == "__main__":
    sys.exit(main())
