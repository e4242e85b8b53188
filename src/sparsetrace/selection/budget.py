"""Coverage budgets: cut each row of a selection to the fewest blocks that hold an estimated mass P.

A fixed ``top_k`` keeps as many blocks where one block holds all the attention as where fifty share it.
A coverage budget (issue 17, shared/DESIGN.md section 1b) instead lets each row (layer, head, query block)
keep blocks in order of their estimated attention mass until the estimated kept mass reaches P:

  1. the selection runs at the largest width, ``max_k`` (any estimator; ``MaskConfig.search``);
  2. every kept block gets an estimated mass, the share of the model's whole attention it holds (how it is
     estimated is ``sparsetrace.audit.coverage``'s business: this module only takes the numbers);
  3. forced blocks (sinks, locals) are kept first and counted; then the other blocks by estimated mass,
     largest first (ties: the lower block index), until the running sum reaches P;
  4. the row keeps at least ``min_k`` blocks (or all it has) and at most its ``max_k`` entries; a row whose
     whole selection holds less than P keeps all of it and is flagged **capped**;
  5. kept blocks are re-sorted ascending and the row is ``-1``-padded back to ``max_k`` entries, so the result
     is again a :class:`~sparsetrace.selection.blocks.BlockMask` (rows of different lengths, one width).

:func:`coverage_rows` is steps 3-5, a pure function of the row's entries, their estimated masses and which
are forced; :func:`forced_entries` says which entries are forced under the contract.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import MaskConfig
from .blocks import in_middle, pack_rows


class BudgetRows(NamedTuple):
    """What :func:`coverage_rows` returns: ``indices`` int32 ``[..., W]`` (the cut rows, ascending,
    ``-1``-padded), ``keep`` bool ``[..., W]`` (which input entries survive, in the input's entry order),
    ``capped`` bool ``[...]`` (the whole row was kept and still held less than P by the estimate) and
    ``kept_mass`` float64 ``[...]`` (estimated mass of what is kept)."""

    indices: torch.Tensor
    keep: torch.Tensor
    capped: torch.Tensor
    kept_mass: torch.Tensor


def forced_entries(indices: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, sinks: int,
                   config: MaskConfig) -> torch.Tensor:
    """bool ``[..., nQ, W]``: the entries of ``indices [..., nQ, W]`` that the contract forces (the sinks
    and the local blocks of each row's candidate range ``[lo, n)``, ``[nQ]`` each); padding is not forced."""
    return (indices >= 0) & ~in_middle(indices.long(), lo, n, sinks, config)


def coverage_rows(indices: torch.Tensor, mass: torch.Tensor, forced: torch.Tensor, coverage: float,
                  min_k: int = 1) -> BudgetRows:
    """Cut every row to the shortest prefix, in estimated-mass order, whose estimated mass reaches ``coverage``.

    Args:
        indices: kept key blocks ``[..., W]`` (int, ``-1``-padded; any order).
        mass: the estimated attention mass of each entry ``[..., W]`` (float, >= 0; ignored at padding).
        forced: bool ``[..., W]``: entries kept whatever their mass (counted first toward the budget).
        coverage: P in (0, 1).
        min_k: a row keeps at least this many entries (or all it has).
    Returns:
        :class:`BudgetRows`. A row keeps its forced entries, then the others by mass (largest first, ties:
        the lower block index) until the kept mass is >= P, and at least ``min_k`` entries; ``capped`` where
        even every entry holds less than P.
    """
    assert indices.shape == mass.shape == forced.shape, (indices.shape, mass.shape, forced.shape)
    valid = indices >= 0
    forced = forced & valid
    W = indices.shape[-1]
    # Order of the entries: forced first, then by mass descending, ties by block index ascending, padding
    # last. Two stable sorts: by block index, then by the (forced, mass) key, which keeps index order on ties.
    by_block = torch.sort(torch.where(valid, indices.long(), torch.iinfo(torch.int64).max), dim=-1,
                          stable=True).indices  # [..., W]
    m = mass.double().gather(-1, by_block)
    key = torch.where(forced.gather(-1, by_block), torch.inf, m).masked_fill(~valid.gather(-1, by_block), -torch.inf)
    order = by_block.gather(-1, torch.sort(key, dim=-1, descending=True, stable=True).indices)  # [..., W]

    m_sorted = torch.where(valid, mass.double(), 0.0).gather(-1, order)  # [..., W]
    # mass kept before each entry in the order: an exclusive running sum, not cumsum - m (whose rounding can
    # put a row that reaches P exactly a hair below it, and keep one entry too many)
    before = torch.nn.functional.pad(m_sorted.cumsum(-1)[..., :-1], (1, 0))
    n_valid = valid.sum(-1, keepdim=True)
    n_forced = forced.sum(-1, keepdim=True)
    rank = torch.arange(W, device=indices.device)
    # Entry r is kept when the budget is not yet met before it, or it is forced, or it is needed for min_k.
    wanted = (before < coverage) | (rank < n_forced) | (rank < min_k)
    # The kept entries form a prefix: a later entry never has less mass before it.
    keep_sorted = wanted & (rank < n_valid)
    keep = torch.zeros_like(valid).scatter(-1, order, keep_sorted)
    total = torch.where(valid, mass.double(), 0.0).sum(-1)
    # summed in the cut's order, so a row whose running sum reached P reports a kept mass >= P (summed in
    # another order the same entries can land a hair below it)
    kept_mass = torch.where(keep_sorted, m_sorted, 0.0).cumsum(-1)[..., -1]
    return BudgetRows(pack_rows(indices.to(torch.int32), keep), keep, total < coverage, kept_mass)
