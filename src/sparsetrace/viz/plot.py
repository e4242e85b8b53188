"""``sparsetrace plot``: a static block map of one head with matplotlib (Agg, imported lazily).

Readable at any length: the map is aggregated to at most ``max_cells`` x ``max_cells`` cells
(max mass per cell, views.block_grid), colours are on a log scale, ticks are token positions,
and the title names the model, layer, head and k.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from . import views

INSTALL_HINT = "pip install 'sparsetrace[viz]' (or pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); a one-sentence ValueError, which the
    CLI prints as such, when matplotlib is not installed. Every plotting command gets it from here."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UsageError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_block_map(trace, layer: int, head: int, out=None, *, max_cells: int = 1000,
                   reduce: str = "max", q_range=None, k_range=None, dpi: int = 150):
    """Draw (layer, head)'s block map; save it to `out` (png/pdf/svg by suffix) if given.
    `q_range` / `k_range`: (first, last) query / key BLOCKS to show (default: all).
    Returns the matplotlib Figure."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    layer, head = trace.head_index(layer, head)
    q0, q1 = q_range or (None, None)
    k0, k1 = k_range or (None, None)
    g = views.block_grid(trace, layer, head, q0, q1, k0, k1, max_rows=max_cells,
                        max_cols=max_cells, reduce=reduce)
    T, bq, bk = trace.num_tokens, trace.block_q, trace.block_k
    vals = g.values.copy()
    vals[vals <= 0] = float("nan")  # not kept: background
    vmax = max(float(g.values.max(initial=0.0)), 1e-12)
    extent = (g.k0 * bk, min(T, (g.k0 + g.values.shape[1] * g.k_step) * bk),
              min(T, (g.q0 + g.values.shape[0] * g.q_step) * bq), g.q0 * bq)
    fig, ax = plt.subplots(figsize=(7.2, 6.2), dpi=dpi)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(vals, cmap=cmap, norm=LogNorm(vmin=max(vmax * 1e-4, 1e-8), vmax=vmax),
                   extent=extent, interpolation="nearest", aspect="auto")
    ax.set_xlabel("key token position")
    ax.set_ylabel("query token position")
    ax.ticklabel_format(style="plain")
    ax.xaxis.set_major_formatter(_token_formatter())
    ax.yaxis.set_major_formatter(_token_formatter())
    label = "max mass of a kept block" if reduce == "max" else "mean mass sent to the cell"
    cells = (f", cells of {g.q_step}x{g.k_step} blocks" if g.q_step > 1 or g.k_step > 1 else "")
    fig.colorbar(im, ax=ax, label=f"{label} (log)")
    model = views.describe(trace)["model"]
    k = (f"k={trace.top_k}" if trace.budget is None
         else f"coverage {trace.budget['coverage']:g}, k<={trace.top_k}")
    ax.set_title(f"{model}: layer {layer}, head {head}, {k} "
                 f"({T:,} tokens, blocks {bq}x{bk}{cells})", fontsize=9)
    fig.tight_layout()
    if out is not None:
        fig.savefig(Path(out))
        plt.close(fig)
    return fig


def _token_formatter():
    from matplotlib.ticker import FuncFormatter

    def f(x, _):
        x = round(x)
        if abs(x) >= 1_000_000:
            return f"{x / 1e6:g}M"
        if abs(x) >= 1000:
            return f"{x / 1e3:g}k"
        return str(x)

    return FuncFormatter(f)
