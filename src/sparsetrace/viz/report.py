"""``sparsetrace report``: one self-contained HTML file (no network) with the overview of all
layers x heads and the block maps of a few heads, zoomable in the page.

Data sits in the page as JSON: the per-head metrics and, per chosen head, a block map aggregated
to at most ``max_cells`` x ``max_cells`` cells (1 byte per cell, log scale: code 0 = nothing
kept, code c = 2**(-24 (255 - c) / 254)), so a 1M-token trace makes a report of ~1 MB. The CSS
and JS are the viewer's own files, inlined. In Jupyter, ``Report(trace)`` displays the page in an
iframe (``srcdoc``), where its script runs; ``report_html`` gives the HTML string.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from . import data

STATIC = Path(__file__).with_name("static")
MAX_TEXT_TOKENS = 8192  # embed token text (tooltips) only up to this length


def encode_log8(values: np.ndarray) -> bytes:
    """float masses -> uint8 codes (0 = 0; c = 2**(-24 (255 - c) / 254), 3.3 % relative error)."""
    v = np.asarray(values, dtype=np.float64)
    code = np.clip(np.round(255 + np.log2(np.maximum(v, 2.0**-30)) * (254 / 24)), 1, 255)
    return np.where(v < 2.0**-25, 0, code).astype(np.uint8).tobytes()


def report_data(trace, *, heads=None, n_heads: int = 4, max_cells: int = 256, anchors=None,
                niah=None, stats=None, by: str = "other") -> dict:
    """The JSON the report page embeds. `heads`: [(layer, head)], default the `n_heads` heads
    with the largest metric `by`: "other" = mass off the diagonal and off the sink block (see
    data.head_stats), or "offdiag", "entropy", ..., "kurtosis" / "needle_mass" when the anchors /
    niah results are found."""
    stats = data.head_stats(trace) if stats is None else stats
    metrics = {**stats, **data.load_analysis(trace, anchors=anchors, niah=niah)}
    if heads is None:
        if by not in metrics:
            raise ValueError(f"cannot pick heads by {by!r}: this trace has {sorted(metrics)} "
                             "(kurtosis needs --anchors, needle_mass needs --niah)")
        heads = data.top_heads(metrics, n_heads, by=by)
    panels = []
    for layer, head in heads:
        layer = data._check(layer, trace.num_layers, "layer")
        head = data._check(head, trace.num_heads, "head")
        g = data.block_grid(trace, layer, head, max_rows=max_cells, max_cols=max_cells)
        panels.append({"layer": layer, "head": head, "grid": g.header(),
                       "codes": base64.b64encode(encode_log8(g.values)).decode(),
                       "stats": {k: _num(v[layer, head]) for k, v in metrics.items()}})
    info = data.describe(trace)
    info["metrics"] = list(metrics)
    pieces = (data.token_pieces(trace, 0, trace.num_tokens)
              if trace.num_tokens <= MAX_TEXT_TOKENS else None)
    return {"info": info, "by": by,
            "metrics": {k: [[_num(x) for x in row] for row in v] for k, v in metrics.items()},
            "heads": panels, "pieces": pieces}


def _num(x):
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def report_html(trace, **kwargs) -> str:
    """The report page as one HTML string (see `report_data` for the arguments)."""
    payload = json.dumps(report_data(trace, **kwargs), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # never closes the <script> early
    css = (STATIC / "viewer.css").read_text(encoding="utf-8")
    js = "\n".join((STATIC / f).read_text(encoding="utf-8") for f in ("common.js", "report.js"))
    title = html.escape(f"sparsetrace report: {data.describe(trace)['model']}")
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
    <div class="help" id="metric-help"></div>
    <div class="help">Outlined: the heads shown on the right.</div>
  </section>
  <div class="heads" id="heads"></div>
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
        from ..store import atomic_write_bytes

        atomic_write_bytes(path, self.html.encode("utf-8"))
        return Path(path)
