"""Pictures of traces: a local web viewer, a self-contained HTML report, static block-map plots.

    from sparsetrace.viz import report_html, Report, plot_block_map
    Report(trace)                  # in Jupyter: the report, inline (an iframe, so its script runs)
    html = report_html(trace)      # the same page as one self-contained HTML string
    plot_block_map(trace, layer=3, head=1, out="map.png")   # matplotlib, imported lazily

Everything reads a :class:`~sparsetrace.store.Trace` only (never the model); long traces are
aggregated on the fly (``views.block_grid``), never expanded to a dense query x key matrix.
"""

from __future__ import annotations

_LAZY = {
    "report_html": "report",
    "Report": "report",
    "plot_block_map": "plot",
    "serve": "server",
    "head_stats": "views",
    "block_grid": "views",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sparsetrace.viz' has no attribute {name!r}")
