"""The noise floor of issue 16's measure: how many of the oracle's NIAH cases the oracle itself keeps when a
few of its rows slip.

The measure "of the cases the exact block top-k answers at k, how many a selection answers" counts *which*
cases are answered. Near a model's limit (k 3, 30k tokens) one row's choice can move an answer, so a
selection that differs from the oracle in a few rows loses some of the oracle's cases and gains others
even when it is as good. This runs ``bench/niah_study.py`` with ``--estimators oracle`` and the oracle
perturbed: in a random share ``--runner-up`` of its searched rows (rows with more middle candidates than
middle blocks) outside the input's tail, the runner-up (the (m+1)-th best exact score) replaces its weakest
kept middle block. The tail and every decode step stay exact, as SHORTLIST keeps them
(``selection.shortlist.EXACT_TAIL``), so the slips fall where SHORTLIST's can. The cells keep the label
``oracle:<k>``; count them against the exact oracle's with ``bench/niah_of_oracle.py --estimator oracle``.

    python bench/niah_noise_floor.py --runner-up 0.04 --noise-seed 0 -- --models gemma-3-270m \
        --variants niah_single_1 --lengths 30k --depths 50 --samples 3 --top-k 3,4 --estimators oracle \
        --device cuda --chunk-size 4096 --out /tmp/noise/niah_single_1_30k_d50.json

The perturbation replaces the selection that the sparse attention backend calls (a bench experiment; the
library has no such knob). Its draws come from a CPU generator seeded by ``--noise-seed``, one Bernoulli per
(head, query block) of each call, so a run is reproducible on any device.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import niah_study  # noqa: E402  (a sibling bench script)

from sparsetrace.config import MaskConfig  # noqa: E402
from sparsetrace.ops import select_blocks  # noqa: E402
from sparsetrace.selection.blocks import BlockMask, candidate_range, forced_sinks, in_middle  # noqa: E402
from sparsetrace.selection.oracle import block_scores, top_middle  # noqa: E402
from sparsetrace.selection.shortlist import exact_tail_blocks  # noqa: E402
from sparsetrace.tracing import backend  # noqa: E402


def runner_up_oracle(share: float, generator: torch.Generator):
    """A ``select_blocks`` whose oracle rows slip to the runner-up with probability ``share`` (see above);
    other estimators pass through unchanged."""

    def select(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
               window: int | None = None, impl: str = "auto", input_end: int | None = None) -> BlockMask:
        if config.estimator != "oracle":
            return select_blocks(q, k, config, scale=scale, window=window, impl=impl, input_end=input_end)
        B, H, T, _ = q.shape
        S = k.shape[2]
        scores = block_scores(q, k, config, scale=scale, window=window)  # [B, H, nQ, nKB]
        sinks = forced_sinks(config, window)
        m = config.top_k - sinks - config.local_blocks
        lo, n = candidate_range(T, S, config, q.device, window)
        nQ, n_kb = scores.shape[2], scores.shape[3]
        middle = in_middle(torch.arange(n_kb, device=q.device)[None, :], lo, n, sinks, config)  # [nQ, nKB]
        searched = middle.sum(-1) > m  # rows that choose
        searched[nQ - exact_tail_blocks(T, S, config.block_q, input_end):] = False
        slip = torch.rand(B, H, nQ, generator=generator) < share
        slip = slip.to(q.device) & searched
        if m >= 1 and bool(slip.any()):  # a slipped row is searched: it has more than m candidates
            ranked = torch.sort(scores.masked_fill(~middle, -math.inf), dim=-1, descending=True, stable=True)
            weakest = ranked.indices[..., m - 1:m]  # the m-th best: dropped, so the (m+1)-th comes in
            scores = scores.scatter(-1, weakest, torch.where(slip[..., None], -math.inf, ranked.values[..., m - 1:m]))
        return BlockMask(top_middle(scores, T, S, config, window), config.block_q, config.block_k)

    return select


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runner-up", type=float, required=True, help="share of searched rows that slip, in [0, 1]")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("study", nargs=argparse.REMAINDER, help="-- then bench/niah_study.py's arguments")
    args = p.parse_args(argv)
    if not 0 <= args.runner_up <= 1:
        p.error(f"--runner-up {args.runner_up} is not a share; give a number in [0, 1], e.g. 0.04.")
    study = args.study[1:] if args.study[:1] == ["--"] else args.study
    generator = torch.Generator().manual_seed(args.noise_seed)
    backend.select_blocks = runner_up_oracle(args.runner_up, generator)
    return niah_study.main(study)


if __name__ == "__main__":
    sys.exit(main())
