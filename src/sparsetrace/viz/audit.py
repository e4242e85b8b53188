"""The report's audit section: how much attention the masks missed, by layer and by position, in plots.

The numbers come from :mod:`sparsetrace.analysis.audit` (``missed_by_layer``, ``missed_by_position``,
``audit_summary`` and its text, ``format_summary``); this module only draws them and writes the section's
HTML, the plots embedded as PNG data URIs so the report stays one self-contained file. matplotlib is imported
lazily and used through ``matplotlib.figure.Figure`` only, never pyplot: drawing a report (e.g. a trace shown
in a notebook) leaves the caller's backend and figures alone.

- ``by-layer``: mean and p90 of the estimated missed mass of every row per layer (bands: the same statistic
  of the rows' interval ends), the exact audited mean and p90 with their bootstrap intervals, and the
  estimate on the audited rows (the like-for-like comparison);
- ``by-position``: the same by decile of query position;
- ``calibration``: the estimate and its interval against the exact value on every audited row.

Traces without an audit (older ones, or ``--audit-rate 0 --missed-samples 0``) get a short note instead;
without matplotlib the section keeps its table and says what to install.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from ..analysis.audit import (
    LEVEL,
    audit_summary,
    estimates,
    format_summary,
    missed_by_layer,
    missed_by_position,
)
from ..errors import UsageError
from .plot import INSTALL_HINT

NO_AUDIT = ("This trace carries no audit: it was traced before sparsetrace measured what the masks miss, "
            "or with --audit-rate 0 --missed-samples 0. Trace it again to see how much attention each row "
            "misses.")
EXPLAIN = ("Missed mass of a row (layer, head, query block): the share of the model's attention, over every "
           "causal key, that falls outside the blocks the trace kept (docs/audit.md). Estimate: every row, "
           f"with a {LEVEL:.0%} interval (Trace.missed); exact: a sample of query blocks in every layer and "
           "head (Trace.audit), with recall against the exact block top-k.")


def _figure(width: float, height: float):
    """A matplotlib Figure with one Axes, outside pyplot (no backend switch, nothing to close)."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise UsageError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    fig = Figure(figsize=(width, height), layout="tight")
    return fig, fig.subplots()


def _array(values, column: int | None = None) -> np.ndarray:
    """float64 array of JSON numbers (None -> NaN), one column of ``[value, low, high]`` rows if asked."""
    rows = [(r if column is None else r[column]) if r is not None else None for r in values]
    return np.array([np.nan if v is None else v for v in rows], dtype=float)


def _errorbar(ax, x, triples, **kwargs):
    """Points with asymmetric error bars from ``[value, low, high]`` rows (no bar where undefined)."""
    v, lo, hi = (_array(triples, i) for i in range(3))
    yerr = np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0).clip(min=0)
    ax.errorbar(x, v, yerr=yerr, capsize=2, lw=0, elinewidth=1, **kwargs)


def _band(ax, x, triples, **kwargs):
    v, lo, hi = (_array(triples, i) for i in range(3))
    (line,) = ax.plot(x, v, **kwargs)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)


def plot_by_layer(by_layer: dict, *, title: str = ""):
    """The by-layer figure of :func:`~sparsetrace.analysis.audit.missed_by_layer`'s result."""
    x = np.arange(by_layer["layers"])
    fig, ax = _figure(6.4, 3.4)
    est, aud = by_layer["estimate"], by_layer["audited"]
    if est is not None:
        _band(ax, x, est["mean"], color="tab:blue", label="estimate: mean of every row (band: its interval)")
        _band(ax, x, est["p90"], color="tab:red", ls="--", label="estimate: p90 of every row")
        if est["at_audited"] is not None:
            ax.plot(x, est["at_audited"], "x", color="tab:blue", ms=4, label="estimate: mean on the audited rows")
    if aud is not None:
        _errorbar(ax, x - 0.15, aud["mean"], fmt="o", ms=3.5, color="navy",
                  label=f"exact (audited rows): mean, {LEVEL:.0%} CI")
        _errorbar(ax, x + 0.15, aud["p90"], fmt="s", ms=3.5, color="darkred", label="exact: p90")
    ax.set_xlabel("layer")
    ax.set_ylabel("missed attention mass")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.6, by_layer["layers"] - 0.4)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=6.5, loc="upper right", ncol=2, framealpha=0.85)
    ax.set_title(title or "Missed attention mass by layer (all heads)", fontsize=9)
    return fig


def _tokens(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1_000_000 else f"{n / 1e3:.3g}k" if n >= 10_000 else str(n)


def plot_by_position(by_position: dict, *, title: str = ""):
    """The by-position figure of :func:`~sparsetrace.analysis.audit.missed_by_position`'s result."""
    bins = by_position["bins"]
    x = np.arange(len(bins))
    fig, ax = _figure(6.4, 3.4)
    if any(b["estimate"] is not None for b in bins):
        _band(ax, x, [b["estimate"] for b in bins], color="tab:blue", marker=".",
              label="estimate: mean of every row (band: its interval)")
        if any(b["at_audited"] is not None for b in bins):
            ax.plot(x, _array([b["at_audited"] for b in bins]), "x", color="tab:blue", ms=4,
                    label="estimate: mean on the audited rows")
    if any(b["audited"] is not None for b in bins):
        _errorbar(ax, x + 0.12, [b["audited"] or [None] * 3 for b in bins], fmt="o", ms=3.5, color="navy",
                  label=f"exact (audited rows): mean, {LEVEL:.0%} CI")
    ax.set_xticks(x, [f"{_tokens(b['t0'])}–{_tokens(b['t1'])}" for b in bins], fontsize=7,
                  rotation=30 if len(bins) > 6 else 0)
    ax.set_xlabel(f"query position (tokens), {by_position['num_bins']} equal bins of query blocks")
    ax.set_ylabel("missed attention mass")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=6.5, loc="upper left", framealpha=0.85)
    ax.set_title(title or "Missed attention mass by query position (all layers and heads)", fontsize=9)
    return fig


def plot_calibration(trace, summary: dict | None):
    """Estimate (with its interval) against the exact value on every audited row; None without both."""
    audit = trace.audit()
    if audit is None or not trace.has_missed or audit["query_block"].numel() == 0:
        return None
    at = estimates(trace)[:, :, audit["query_block"]].reshape(-1, 3).double().numpy()  # [L*H*r, 3]
    exact = audit["missed"].reshape(-1).double().numpy()
    inside = (at[:, 1] <= exact + 1e-6) & (exact <= at[:, 2] + 1e-6)  # as audit_summary counts
    fig, ax = _figure(4.0, 3.6)
    ax.vlines(exact, at[:, 1], at[:, 2], color="0.6", lw=0.5, alpha=0.5)
    ax.plot(exact[inside], at[inside, 0], ".", ms=3, color="tab:blue", label="interval holds the exact value")
    ax.plot(exact[~inside], at[~inside, 0], ".", ms=4, color="tab:red", label="interval misses it")
    ax.plot([0, 1], [0, 1], color="k", lw=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("exact missed mass (audited row)")
    ax.set_ylabel("estimate")
    ax.legend(fontsize=6.5, loc="upper left")
    held = summary["interval_coverage"] if summary and "interval_coverage" in summary else float(inside.mean())
    ax.set_title(f"Estimate vs exact on {exact.size:,} audited rows:\ninterval holds on {held:.1%}", fontsize=9)
    return fig


def _png(fig, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode()


def audit_section(trace, *, plots: bool = True, dpi: int = 100) -> dict:
    """The report's audit section as data: ``state`` ("audit+estimate", "audit", "estimate" or "none"),
    ``summary`` (the lines ``sparsetrace trace`` prints), ``by_layer`` / ``by_position`` (the analysis
    results), ``plots`` (``[{"id", "title", "caption", "png"}]``, base64 PNG) and ``note`` (why something is
    missing, else None)."""
    has_audit, has_missed = trace.has_audit, trace.has_missed
    state = ("audit+estimate" if has_audit and has_missed else "audit" if has_audit
             else "estimate" if has_missed else "none")
    out = {"state": state, "summary": [], "by_layer": None, "by_position": None, "plots": [], "note": None}
    if state == "none":
        out["note"] = NO_AUDIT
        return out
    summary = audit_summary(trace)
    by_layer, by_position = missed_by_layer(trace), missed_by_position(trace)
    out.update(by_layer=by_layer, by_position=by_position)
    if summary is not None:
        out["summary"] = format_summary(summary)
    else:  # the estimate alone
        mean = float(np.mean(_array(by_layer["estimate"]["mean"], 0)))
        out["summary"] = [f"estimate        mean missed {mean:.3f} over every row; no exact audit in this "
                          "trace (--audit-rate 0)"]
    if not has_missed:
        out["note"] = "No per-row estimate in this trace (--missed-samples 0): exact values of the audited rows only."
    if not plots:
        return out
    try:
        figures = [("by-layer", "Missed mass by layer", plot_by_layer(by_layer),
                    "Per layer, over every head. Line and band: the estimate over every row (band: the same "
                    "statistic of the rows' interval ends); points: the exact audited rows with bootstrap "
                    "intervals over the audited query blocks; crosses: the estimate on those same rows."),
                   ("by-position", "Missed mass by position", plot_by_position(by_position),
                    "By tenth of the query blocks (position in the text), over every layer and head. The first "
                    "blocks keep every causal block and miss nothing; the audit samples only rows that must "
                    "drop something, so compare its points with the crosses.")]
        calibration = plot_calibration(trace, summary)
        if calibration is not None:
            figures.append(("calibration", "Estimate vs exact", calibration,
                            "Every audited (layer, head, query block): the estimate and its interval against "
                            "the exact missed mass; on the diagonal the estimate is exact."))
    except UsageError:  # no matplotlib: the table alone
        out["note"] = " ".join(filter(None, [out["note"], f"The plots need matplotlib: {INSTALL_HINT}."]))
        return out
    out["plots"] = [{"id": i, "title": t, "caption": c, "png": _png(fig, dpi)} for i, t, fig, c in figures]
    return out


def section_html(section: dict) -> str:
    """The ``<section id="audit-panel">`` of the report page for :func:`audit_section`'s result."""
    parts = [f'<section id="audit-panel" data-state="{section["state"]}">',
             "<h2>Audit: the attention the masks missed</h2>"]
    if section["state"] != "none":
        parts.append(f'<div class="help">{html.escape(EXPLAIN)}</div>')
    if section["note"]:
        parts.append(f'<div class="help audit-note">{html.escape(section["note"])}</div>')
    if section["summary"]:
        parts.append(f'<pre id="audit-summary">{html.escape(chr(10).join(section["summary"]))}</pre>')
    if section["plots"]:
        parts.append('<div class="audit-plots">')
        for p in section["plots"]:
            parts.append(f'<figure data-plot="{p["id"]}"><img alt="{html.escape(p["title"])}" '
                         f'src="data:image/png;base64,{p["png"]}"><figcaption>{html.escape(p["caption"])}'
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)
