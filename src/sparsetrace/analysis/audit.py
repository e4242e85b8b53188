"""What a trace says about its own fidelity: the audit of sampled rows and the per-row estimate, summarised.

Reads :meth:`Trace.audit` (exact missed mass and recall of a sample of query blocks, the same rows in every
layer and head) and :meth:`Trace.missed` (an estimate with an interval for every row). Intervals for the
trace-wide figures come from a bootstrap over the audited query blocks (resampling whole blocks, since all
layers and heads of a block share it), seeded, so a summary is reproducible.

- :func:`audit_summary` / :func:`format_summary`: the trace-wide figures ``sparsetrace trace`` prints.
- :func:`missed_by_layer` / :func:`missed_by_position`: the same per layer and per position decile (the
  report's audit plots), the exact audited values beside the estimate over every row and at the audited rows.
"""

from __future__ import annotations

import math

import torch

BOOTSTRAP = 1000
LEVEL = 0.9
# A coverage budget P is met on a row when its true kept mass is >= P - COVERAGE_SLACK (issue 17's criterion:
# the estimate behind the cut has an interval of about this width at 64 samples a row).
COVERAGE_SLACK = 0.02


def _audited(trace) -> dict | None:
    """``trace.audit()``, or None when the trace has no audit or audited no row."""
    audit = trace.audit()
    return None if audit is None or audit["query_block"].numel() == 0 else audit


def audit_summary(trace, *, worst: int = 5, seed: int = 0) -> dict | None:
    """JSON-able summary of a trace's audit, or None when it has none.

    ``missed_mean`` / ``missed_p90``: ``[value, low, high]`` over every audited (layer, head, query block),
    low/high a ``LEVEL`` bootstrap interval over the audited query blocks (NaN with a single audited block:
    resampling one block says nothing about the spread);
    ``recall_mean``: the same for recall against the exact block top-k (rows that keep every candidate
    have none); ``worst_heads`` / ``worst_layers``: the largest mean audited missed mass; with a per-row
    estimate, ``estimated_missed_mean`` over every row of the trace and ``interval_coverage``: how often
    the estimate's interval holds the exact value on the audited rows. Under a coverage budget,
    ``coverage`` (:func:`coverage_summary`).
    """
    audit = _audited(trace)
    if audit is None:
        return None
    g = torch.Generator().manual_seed(seed)
    missed, recall = audit["missed"], audit["recall"]  # [L, H, r]
    L, H, r = missed.shape

    def pooled(values, statistic) -> list[float]:  # one group: every (layer, head) of the r query blocks
        return _grouped_bootstrap(values.double().reshape(1, L * H, r), statistic, g)[0].tolist()

    per_head = missed.double().mean(-1)  # [L, H]
    order = torch.argsort(per_head.flatten(), descending=True)[:worst]
    per_layer = per_head.mean(-1)  # [L]
    out = {
        "rows": int(L * H * r), "query_blocks": audit["query_block"].tolist(), "level": LEVEL,
        "missed_mean": pooled(missed, _nanmean),
        "missed_p90": pooled(missed, _nanp90),
        "recall_mean": pooled(recall, _nanmean) if bool((~recall.isnan()).any()) else None,
        "worst_heads": [{"layer": int(i) // H, "head": int(i) % H, "missed": float(per_head.flatten()[i])}
                        for i in order],
        "worst_layers": [{"layer": int(i), "missed": float(per_layer[i])}
                         for i in torch.argsort(per_layer, descending=True)[:worst]],
    }
    if trace.has_missed:
        estimate = estimates(trace)  # [L, H, nQ, 3]
        at = estimate[:, :, audit["query_block"]]  # [L, H, r, 3]
        inside = (at[..., 1] <= missed + 1e-6) & (missed <= at[..., 2] + 1e-6)
        out["estimated_missed_mean"] = float(estimate[..., 0].double().mean())
        out["interval_coverage"] = float(inside.double().mean())
        out["median_abs_error"] = float((at[..., 0] - missed).abs().median())
    if trace.budget is not None:
        out["coverage"] = coverage_summary(trace, audit)
    return out


def coverage_summary(trace, audit: dict | None = None) -> dict | None:
    """How a trace cut to a coverage budget P did, JSON-able (None without a budget): ``P``, ``min_k``,
    ``max_k``, ``mean_kept_blocks`` (every row), ``capped_share`` (rows whose whole max-k selection held less
    than P by the estimate), and on the exactly audited rows: ``true_kept_mean`` (1 - exact missed),
    ``met_share`` (share of audited rows with true kept mass >= P - ``slack``), ``met_share_not_capped`` (the
    same over the audited rows that were not capped; None when all were), ``capped_audited`` (share capped)
    and ``rows`` (how many); those are None for a trace without an audited row."""
    budget = trace.budget
    if budget is None:
        return None
    audit = _audited(trace) if audit is None else audit
    out = {"P": budget["coverage"], "min_k": budget["min_k"], "max_k": budget["max_k"], "slack": COVERAGE_SLACK,
           "mean_kept_blocks": trace.mean_kept_blocks, "capped_share": trace.capped_share, "rows": 0,
           "true_kept_mean": None, "met_share": None, "met_share_not_capped": None, "capped_audited": None}
    if audit is None:
        return out
    kept = 1 - audit["missed"].double()  # [L, H, r]
    capped = torch.stack([torch.stack([trace.capped(layer, h)[audit["query_block"]] for h in range(trace.num_heads)])
                          for layer in range(trace.num_layers)])  # [L, H, r]
    met = kept >= budget["coverage"] - COVERAGE_SLACK
    out.update(rows=int(kept.numel()), true_kept_mean=float(kept.mean()), met_share=float(met.double().mean()),
               met_share_not_capped=float(met[~capped].double().mean()) if bool((~capped).any()) else None,
               capped_audited=float(capped.double().mean()))
    return out


def format_summary(summary: dict) -> list[str]:
    """The lines ``sparsetrace trace`` prints about the audit."""
    def ci(v):
        if math.isnan(v[1]) or math.isnan(v[2]):
            return f"{v[0]:.3f} (no CI: one audited query block)"
        return f"{v[0]:.3f} ({LEVEL:.0%} CI {v[1]:.3f}..{v[2]:.3f})"

    blocks = len(summary["query_blocks"])
    lines = [f"audit           {blocks} query block{'s' * (blocks != 1)} x every layer and head "
             f"({summary['rows']} rows, exact)",
             f"missed mass     mean {ci(summary['missed_mean'])}, p90 {ci(summary['missed_p90'])}"]
    if summary["recall_mean"] is not None:
        lines.append(f"recall          {ci(summary['recall_mean'])} of the exact block top-k's picks")
    heads = ", ".join(f"L{h['layer']}H{h['head']} {h['missed']:.2f}" for h in summary["worst_heads"])
    lines.append(f"worst heads     {heads}")
    if summary.get("coverage") is not None:
        lines += format_coverage(summary["coverage"])
    if "estimated_missed_mean" in summary:
        lines.append(f"estimate        mean missed {summary['estimated_missed_mean']:.3f} over every row; "
                     f"interval holds the exact value on {summary['interval_coverage']:.1%} of audited rows "
                     f"(median |error| {summary['median_abs_error']:.4f})")
    return lines


def format_coverage(c: dict) -> list[str]:
    """The lines ``sparsetrace trace`` prints about a coverage budget (:func:`coverage_summary`)."""
    lines = [f"coverage        budget P={c['P']:g} (min_k {c['min_k']}, max_k {c['max_k']}): "
             f"{c['mean_kept_blocks']:.1f} blocks kept per row on average, {c['capped_share']:.1%} of rows "
             "capped at max_k"]
    if c["met_share"] is not None:
        share = c["met_share_not_capped"]
        not_capped = "" if share is None else f" ({share:.1%} of those not capped)"
        lines.append(f"true coverage   kept mass >= P - {c['slack']:g} on {c['met_share']:.1%} of audited rows"
                     f"{not_capped}; mean kept mass {c['true_kept_mean']:.3f}")
    else:
        lines.append("true coverage   no audited row (no row must drop blocks at max_k, so every row's kept "
                     "mass is known exactly and is >= P)")
    return lines


# --------------------------------------------------------------------------- by layer and by position

def estimates(trace, layer: int | None = None) -> torch.Tensor | None:
    """The per-row estimate of every head, float32 ``[L, H, nQ, 3]`` (estimate, low, high), or ``[H, nQ, 3]``
    of one layer; None for traces without it."""
    if not trace.has_missed:
        return None
    layers = range(trace.num_layers) if layer is None else [layer]
    out = torch.stack([torch.stack([trace.missed(li, h) for h in range(trace.num_heads)]) for li in layers])
    return out if layer is None else out[0]


_BOOTSTRAP_ELEMENTS = 1 << 23  # values a statistic reduces at once (torch.quantile takes at most 2**24)


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    return torch.nanmean(x, dim=-1)


def _nanp90(x: torch.Tensor) -> torch.Tensor:
    return torch.nanquantile(x, 0.9, dim=-1)


def _grouped_bootstrap(values: torch.Tensor, statistic, generator: torch.Generator) -> torch.Tensor:
    """``[G, 3]``: ``statistic`` of each group's values ``[G, n, r]`` (pooled over n and r) and its ``LEVEL``
    interval, resampling the r audited query blocks (whole blocks: every layer and head of a block shares
    it) with the same ``BOOTSTRAP`` draws for every group; NaN bounds where r < 2. ``statistic`` reduces the
    last axis. The draws are taken from ``generator`` first, so a call's numbers do not depend on how the
    work is sliced: groups at once, and draws at once, within ``_BOOTSTRAP_ELEMENTS``."""
    G, n, r = values.shape
    draws = torch.randint(0, r, (BOOTSTRAP, r), generator=generator)            # [Bt, r]
    point = statistic(values.reshape(G, n * r))                                  # [G]
    groups = max(1, _BOOTSTRAP_ELEMENTS // (BOOTSTRAP * n * r))
    at_once = max(1, _BOOTSTRAP_ELEMENTS // (groups * n * r))                    # draws per slice
    boot = torch.cat([torch.cat([statistic(values[a:a + groups][:, :, draws[d:d + at_once]]  # [g, n, d, r]
                                           .permute(2, 0, 1, 3).flatten(-2))                # [d, g, n*r] -> [d, g]
                                 for d in range(0, BOOTSTRAP, at_once)])
                      for a in range(0, G, groups)], dim=1)                      # [Bt, G]
    tail = (1 - LEVEL) / 2
    low, high = torch.nanquantile(boot, torch.tensor([tail, 1 - tail], dtype=boot.dtype), dim=0)  # [G] each
    if r < 2:  # one audited block: resampling it says nothing about the spread
        low, high = torch.full_like(point, math.nan), torch.full_like(point, math.nan)
    return torch.stack([point, low, high], -1)


def _rows(x: torch.Tensor | None) -> list | None:
    """Rows of a ``[G, 3]`` tensor as lists of floats, None for NaN (JSON has none)."""
    return None if x is None else [[None if math.isnan(v) else float(v) for v in row] for row in x.tolist()]


def missed_by_layer(trace, *, seed: int = 0) -> dict | None:
    """Missed mass per layer, JSON-able, or None for a trace with neither the audit nor the estimate.

    ``estimate`` (with the per-row estimate; else None): ``mean`` and ``p90`` ``[L, 3]`` over every row of the
    layer's heads, each ``[value, low, high]`` where low/high are the same statistic of the rows' interval ends
    (they hold the true value whenever every row's interval holds its own); ``at_audited`` ``[L]``: the mean
    estimate on the audited rows only, the like-for-like comparison with the audit (the audit samples only
    rows that must drop something). ``audited`` (with the audit; else None): ``mean``, ``p90`` and ``recall``
    (mean) ``[L, 3]`` over the exactly audited rows, ``[value, low, high]`` with a ``LEVEL`` bootstrap interval
    over the audited query blocks (None for what is undefined: the interval of a single audited block, the
    recall of rows that keep every candidate)."""
    audit = _audited(trace)
    if audit is None and not trace.has_missed:
        return None
    out: dict = {"layers": trace.num_layers, "level": LEVEL, "estimate": None, "audited": None}
    if trace.has_missed:
        stats = {"mean": [], "p90": [], "at_audited": []}
        for layer in range(trace.num_layers):
            est = estimates(trace, layer).double()                              # [H, nQ, 3]
            flat = est.reshape(-1, 3)                                            # [H * nQ, 3]
            stats["mean"].append(flat.mean(0))
            stats["p90"].append(torch.quantile(flat, 0.9, dim=0))
            if audit is not None:
                stats["at_audited"].append(float(est[:, audit["query_block"], 0].mean()))
        out["estimate"] = {"mean": _rows(torch.stack(stats["mean"])), "p90": _rows(torch.stack(stats["p90"])),
                           "at_audited": stats["at_audited"] or None}
    if audit is not None:
        g = torch.Generator().manual_seed(seed)
        missed, recall = audit["missed"].double(), audit["recall"].double()     # [L, H, r]
        out["audited"] = {"mean": _rows(_grouped_bootstrap(missed, _nanmean, g)),
                          "p90": _rows(_grouped_bootstrap(missed, _nanp90, g)),
                          "recall": _rows(_grouped_bootstrap(recall, _nanmean, g))}
    return out


def position_bins(num_query_blocks: int, bins: int = 10) -> torch.Tensor:
    """int64 ``[nQ]``: the position bin of each query block (``i * bins // nQ``: deciles by default)."""
    return torch.arange(num_query_blocks) * bins // num_query_blocks


def missed_by_position(trace, *, bins: int = 10, seed: int = 0) -> dict | None:
    """Missed mass by position of the query block (deciles by default), over every layer and head; JSON-able,
    or None for a trace with neither the audit nor the estimate.

    ``bins``: one entry per non-empty bin: ``q0``/``q1`` (query blocks), ``t0``/``t1`` (tokens), ``estimate``
    ``[mean, low, high]`` over every row of the bin (low/high: the mean of the rows' interval ends) and
    ``at_audited`` (the mean estimate on the bin's audited rows), ``audited_blocks``, ``audited`` and
    ``recall`` ``[mean, low, high]`` over the bin's audited rows with a ``LEVEL`` bootstrap interval over its
    audited query blocks (None where the bin has none; low and high None where it has one)."""
    audit = _audited(trace)
    if audit is None and not trace.has_missed:
        return None
    nq, T = trace.num_query_blocks, trace.num_tokens
    which = position_bins(nq, bins)                                              # [nQ]
    sums = torch.zeros(nq, 3, dtype=torch.float64)                               # per query block
    if trace.has_missed:
        for layer in range(trace.num_layers):
            sums += estimates(trace, layer).double().sum(0)                      # [nQ, 3]
        per_row = sums / (trace.num_layers * trace.num_heads)                    # [nQ, 3]
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(bins):
        blocks = torch.nonzero(which == b).flatten()
        if blocks.numel() == 0:
            continue
        q0, q1 = int(blocks[0]), int(blocks[-1]) + 1
        entry = {"bin": b, "q0": q0, "q1": q1, "t0": q0 * trace.block_q, "t1": min(T, q1 * trace.block_q),
                 "estimate": None, "at_audited": None, "audited_blocks": 0, "audited": None, "recall": None}
        if trace.has_missed:
            entry["estimate"] = [float(v) for v in per_row[q0:q1].mean(0)]
        if audit is not None:
            pick = (audit["query_block"] >= q0) & (audit["query_block"] < q1)
            entry["audited_blocks"] = int(pick.sum())
            if pick.any():
                missed = audit["missed"][..., pick].double().reshape(1, -1, int(pick.sum()))   # [1, L*H, r_b]
                recall = audit["recall"][..., pick].double().reshape(1, -1, int(pick.sum()))
                entry["audited"] = _rows(_grouped_bootstrap(missed, _nanmean, g))[0]
                entry["recall"] = _rows(_grouped_bootstrap(recall, _nanmean, g))[0]
                if trace.has_missed:
                    entry["at_audited"] = float(per_row[audit["query_block"][pick], 0].mean())
        out.append(entry)
    return {"bins": out, "num_bins": bins, "level": LEVEL}
