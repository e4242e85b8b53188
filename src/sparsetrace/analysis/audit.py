"""What a trace says about its own fidelity: the audit of sampled rows and the per-row estimate, summarised.

Reads :meth:`Trace.audit` (exact missed mass and recall of a sample of query blocks, the same rows in every
layer and head) and :meth:`Trace.missed` (an estimate with an interval for every row). Intervals for the
trace-wide figures come from a bootstrap over the audited query blocks (resampling whole blocks, since all
layers and heads of a block share it), seeded, so a summary is reproducible.
"""

from __future__ import annotations

import torch

BOOTSTRAP = 1000
LEVEL = 0.9


def _bootstrap(values: torch.Tensor, statistic, generator: torch.Generator) -> tuple[float, float, float]:
    """``statistic`` of ``values [L, H, r]`` and its ``LEVEL`` interval, resampling the r query blocks."""
    r = values.shape[-1]
    draws = torch.randint(0, r, (BOOTSTRAP, r), generator=generator)
    stats = torch.tensor([statistic(values[..., d]) for d in draws])
    tail = (1 - LEVEL) / 2
    return statistic(values), float(torch.quantile(stats, tail)), float(torch.quantile(stats, 1 - tail))


def _p90(x: torch.Tensor) -> float:
    return float(torch.quantile(x.flatten().double(), 0.9))


def _mean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double()))


def audit_summary(trace, *, worst: int = 5, seed: int = 0) -> dict | None:
    """JSON-able summary of a trace's audit, or None when it has none.

    ``missed_mean`` / ``missed_p90``: ``[value, low, high]`` over every audited (layer, head, query block);
    ``recall_mean``: the same for recall against the exact block top-k (rows that keep every candidate
    have none); ``worst_heads`` / ``worst_layers``: the largest mean audited missed mass; with a per-row
    estimate, ``estimated_missed_mean`` over every row of the trace and ``interval_coverage``: how often
    the estimate's interval holds the exact value on the audited rows.
    """
    audit = trace.audit()
    if audit is None or audit["query_block"].numel() == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    missed, recall = audit["missed"], audit["recall"]  # [L, H, r]
    L, H, r = missed.shape
    per_head = missed.double().mean(-1)  # [L, H]
    order = torch.argsort(per_head.flatten(), descending=True)[:worst]
    per_layer = per_head.mean(-1)  # [L]
    out = {
        "rows": int(L * H * r), "query_blocks": audit["query_block"].tolist(), "level": LEVEL,
        "missed_mean": list(_bootstrap(missed, _mean, g)),
        "missed_p90": list(_bootstrap(missed, _p90, g)),
        "recall_mean": list(_bootstrap(recall, _mean, g)) if bool((~recall.isnan()).any()) else None,
        "worst_heads": [{"layer": int(i) // H, "head": int(i) % H, "missed": float(per_head.flatten()[i])}
                        for i in order],
        "worst_layers": [{"layer": int(i), "missed": float(per_layer[i])}
                         for i in torch.argsort(per_layer, descending=True)[:worst]],
    }
    if trace.has_missed:
        estimate = torch.stack([torch.stack([trace.missed(layer, head) for head in range(H)])
                                for layer in range(L)])  # [L, H, nQ, 3]
        at = estimate[:, :, audit["query_block"]]  # [L, H, r, 3]
        inside = (at[..., 1] <= missed + 1e-6) & (missed <= at[..., 2] + 1e-6)
        out["estimated_missed_mean"] = float(estimate[..., 0].double().mean())
        out["interval_coverage"] = float(inside.double().mean())
        out["median_abs_error"] = float((at[..., 0] - missed).abs().median())
    return out


def format_summary(summary: dict) -> list[str]:
    """The lines ``sparsetrace trace`` prints about the audit."""
    def ci(v):
        return f"{v[0]:.3f} ({LEVEL:.0%} CI {v[1]:.3f}..{v[2]:.3f})"

    lines = [f"audit           {len(summary['query_blocks'])} query blocks x every layer and head "
             f"({summary['rows']} rows, exact)",
             f"missed mass     mean {ci(summary['missed_mean'])}, p90 {ci(summary['missed_p90'])}"]
    if summary["recall_mean"] is not None:
        lines.append(f"recall          {ci(summary['recall_mean'])} of the exact block top-k's picks")
    heads = ", ".join(f"L{h['layer']}H{h['head']} {h['missed']:.2f}" for h in summary["worst_heads"])
    lines.append(f"worst heads     {heads}")
    if "estimated_missed_mean" in summary:
        lines.append(f"estimate        mean missed {summary['estimated_missed_mean']:.3f} over every row; "
                     f"interval holds the exact value on {summary['interval_coverage']:.1%} of audited rows "
                     f"(median |error| {summary['median_abs_error']:.4f})")
    return lines
