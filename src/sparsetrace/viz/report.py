"""``sparsetrace report``: one self-contained HTML file (no network) with the overview of all
layers x heads, the block maps of a few heads, zoomable in the page, and what the last block read:
its sources over all layers (``views.sources_view``: the layer x source chart, the top passages and,
up to ``MAX_TEXT_TOKENS``, the text shaded by source score).

Data sits in the page as JSON: the per-head metrics and, per chosen head, a block map aggregated
to at most ``max_cells`` x ``max_cells`` cells (1 byte per cell, log scale: code 0 = nothing
kept, code c = 2**(-24 (255 - c) / 254)), so a 1M-token trace makes a report of ~1 MB. The CSS
and JS are the viewer's own files, inlined. In Jupyter, ``Report(trace)`` displays the page in an
iframe (``srcdoc``), where its script runs; ``report_html`` gives the HTML string.

The "audit" section (``viz.audit``: missed attention mass by layer and by position, plots embedded as
PNG) follows the block maps; ``audit=False`` leaves it out, traces without an audit get a short note.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..store import atomic_write_bytes, encode_mass
from . import audit as audit_view
from . import views

STATIC = Path(__file__).with_name("static")


def _log8_bytes(values: np.ndarray) -> bytes:
    """Grid cells in the store's 1-byte log encoding (decoded by the page with the same table)."""
    return encode_mass(torch.from_numpy(np.ascontiguousarray(values)), "log8").numpy().tobytes()
MAX_TEXT_TOKENS = 8192  # embed token text (tooltips) only up to this length


def report_data(trace, *, heads=None, n_heads: int = 4, max_cells: int = 256, anchors=None,
                niah=None, stats=None, by: str = "other", sources: bool = True) -> dict:
    """The JSON the report page embeds. `heads`: [(layer, head)], default the `n_heads` heads
    with the largest metric `by`: "other" = mass off the diagonal and off the sink block (see
    views.head_stats), or "offdiag", "entropy", ..., "kurtosis" / "needle_mass" when the anchors /
    niah results are found. `sources`: embed the sources of the last block (two passes over the
    trace: 0.3 s at 2k tokens, tens of seconds at 1M on a 2-core CPU)."""
    stats = views.head_stats(trace) if stats is None else stats
    metrics = {**stats, **views.load_analysis(trace, anchors=anchors, niah=niah)}
    if heads is None:
        if by not in metrics:
            raise UsageError(f"cannot pick heads by {by!r}: this trace has {sorted(metrics)} "
                             "(kurtosis needs --anchors, needle_mass needs --niah, missed a trace "
                             "with an audit)")
        heads = views.top_heads(metrics, n_heads, by=by)
    panels = []
    for layer, head in heads:
        layer, head = trace.head_index(layer, head)
        g = views.block_grid(trace, layer, head, max_rows=max_cells, max_cols=max_cells)
        panels.append({"layer": layer, "head": head, "grid": g.header(),
                       "codes": base64.b64encode(_log8_bytes(g.values)).decode(),
                       "stats": {k: views.json_number(v[layer, head]) for k, v in metrics.items()}})
    info = views.describe(trace)
    info["metrics"] = list(metrics)
    pieces = (views.token_pieces(trace, 0, trace.num_tokens)
              if trace.num_tokens <= MAX_TEXT_TOKENS else None)
    found = None
    if sources:
        found = views.sources_view(trace, top=8)
        if pieces is None:  # no text to shade: the chart and the list only
            del found["blocks"]
    return {"info": info, "by": by,
            "metrics": {k: views.json_grid(v) for k, v in metrics.items()},
            "heads": panels, "pieces": pieces, "sources": found}


def report_html(trace, **kwargs) -> str:
    """The report page as one HTML string (see `report_data` for the arguments; ``audit=False``: no
    audit section)."""
    with_audit = kwargs.pop("audit", True)
    payload = json.dumps(report_data(trace, **kwargs), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # never closes the <script> early
    audit = audit_view.section_html(audit_view.audit_section(trace)) if with_audit else ""
    css = (STATIC / "viewer.css").read_text(encoding="utf-8")
    js = "\n".join((STATIC / f).read_text(encoding="utf-8") for f in ("common.js", "audit.js", "report.js"))
    title = html.escape(f"sparsetrace report: {views.describe(trace)['model']}")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>
{css}
</style>
</head>
<body>
<header><h1 id="title">sparsetrace report</h1><div class="facts" id="facts"></div></header>
<main>
  <section id="overview-panel">
    <h2>Overview: layers (rows) × heads (columns)</h2>
    <div class="controls"><label>metric <select id="metric"></select></label></div>
    <canvas id="overview" width="360" height="200"></canvas>
    <div class="legend audit-legend" id="overview-legend" hidden></div>
    <div class="help" id="metric-help"></div>
    <div class="help">Outlined: the heads shown on the right.</div>
  </section>
  <div class="heads" id="heads"></div>
{audit}
</main>
<div id="tip"></div>
<script type="application/json" id="sparsetrace-data">{payload}</script>
<script>
{js}
</script>
</body>
</html>
"""


class Report:
    """A trace report for notebooks: ``display(Report(trace))`` shows it in an iframe (its
    script runs there; Jupyter does not run scripts of plain HTML output), ``.save(path)``
    writes the self-contained file, ``.html`` is the page."""

    def __init__(self, trace, *, height: int = 1000, **kwargs):
        self.html, self.height = report_html(trace, **kwargs), height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:0"></iframe>')

    def save(self, path) -> Path:
        atomic_write_bytes(path, self.html.encode("utf-8"))
        return Path(path)


def write_report(trace, path, *, cache_dir=None, **kwargs) -> int:
    """Write the report of ``trace`` to ``path`` atomically, with the per-head statistics read from or
    written to ``cache_dir`` (shared with the viewer); returns its size in bytes."""
    page = report_html(trace, stats=views.cached_head_stats(trace, cache_dir), **kwargs).encode("utf-8")
    atomic_write_bytes(path, page)
    return len(page)


def trace_html(trace) -> str:
    """What a notebook shows for a trace (``sparsetrace`` registers it with the store): the overview and
    the block map of its most long-range head, in an iframe (the report page with one small map and no
    sources or audit plots; see :class:`Report` for more)."""
    return Report(trace, n_heads=1, max_cells=128, sources=False, audit=False, height=560)._repr_html_()

