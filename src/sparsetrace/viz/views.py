"""What the pictures show, as pure functions over a :class:`~sparsetrace.store.Trace`.

- :func:`head_stats`: one number per (layer, head) for the overview: sparsity (exact, in token
  pairs), entropy of the kept-block masses, mass on the diagonal / sink / other blocks.
- :func:`block_grid`: the block map of one head in a viewport of query blocks x key blocks,
  aggregated to at most ``max_rows x max_cols`` cells. It reads only the viewport's query-block
  rows (``O(rows * top_k)``) and scatters their kept entries into the grid: the dense
  ``nQ x nK`` matrix (32768^2 float32 = 4 GB at 1M tokens) is never built.
- :func:`token_pieces`: the text of a token range, for tooltips and the shaded text.
- :func:`audit_head_stats`, :func:`missed_rows`: what the masks missed (``Trace.missed``, ``Trace.audit``):
  per head for the overview, per query row of one head for the strip beside the block map.
- :func:`load_analysis`: per-head numbers written by the anchors / niah commands, if present.
- :func:`sources_view`: what a token span read through every layer (``analysis.sources``), as JSON:
  the score of every key block (the text shading) and the top passages with their entry per layer
  (the layer x source chart).

Conventions (as in store.Trace): indices are KEY-BLOCK ids with -1 padding; row i is query block
i; a cell of a grid covers ``q_step`` query blocks x ``k_step`` key blocks.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.sources import sources
from ..errors import UsageError
from ..store import atomic_write_json, kept_pairs_per_row

REDUCES = ("max", "sum")


def json_number(x, digits: int | None = 6):
    """A float for JSON: None for NaN (JSON has no NaN), rounded to ``digits`` (None: as is)."""
    x = float(x)
    return None if math.isnan(x) else x if digits is None else round(x, digits)


def json_grid(values, digits: int | None = 6) -> list[list]:
    """An ``[L, H]`` array as nested lists of :func:`json_number`."""
    return [[json_number(x, digits) for x in row] for row in np.asarray(values).tolist()]


def diagonal_block(q_blocks: torch.Tensor, block_q: int, block_k: int, T: int) -> torch.Tensor:
    """Key block holding the last token of each query block (the forced local block)."""
    return (((q_blocks + 1) * block_q).clamp(max=T) - 1) // block_k


def head_stats(trace, layers=None) -> dict[str, np.ndarray]:
    """Per (layer, head) numbers for the overview, each float64 [L, H] (NaN for layers not asked):

    - ``sparsity``: 1 - kept / causal token pairs of the head (exact, as Trace.sparsity);
    - ``entropy``: mean over query blocks of the entropy (bits) of the kept-block masses,
      normalised per row; low = focused, log2(top_k) = spread evenly;
    - ``diagonal``, ``sink``, ``other``: mean share of a query block's mass on its diagonal
      key block, on block 0 (when that is not the diagonal), and on every other kept block
      ("off-diagonal, off-sink": the long-range reads the report ranks heads by);
    - ``offdiag``: 1 - diagonal;
    - ``missed``, ``missed_audited``, ``recall``: see :func:`audit_head_stats` (traces with an audit only).
    Reads one layer at a time (``O(L * H * nQ * k)``; about 2 s at 1M tokens, 28 x 12 heads)."""
    L, H = trace.num_layers, trace.num_heads
    names = ("sparsity", "entropy", "diagonal", "sink", "other", "offdiag")
    out = {k: np.full((L, H), np.nan) for k in names}
    T, bq, bk = trace.num_tokens, trace.block_q, trace.block_k
    qb = torch.arange(trace.num_query_blocks)
    diag = diagonal_block(qb, bq, bk, T)[:, None]                         # [nQ, 1]
    causal = T * (T + 1) / 2
    for li in range(L) if layers is None else layers:
        idx, mass = trace.layer(li)                                       # [H, nQ, k] each
        out["sparsity"][li] = 1 - kept_pairs_per_row(idx, 0, bq, bk, T).sum(-1).double().numpy() / causal
        total = mass.sum(-1, keepdim=True).clamp_min(1e-30)               # [H, nQ, 1]
        p = mass / total
        ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)               # [H, nQ]
        out["entropy"][li] = ent.double().mean(-1).numpy()
        on_diag = (p * (idx == diag)).sum(-1)                             # [H, nQ]
        on_sink = (p * ((idx == 0) & (diag != 0))).sum(-1)
        out["diagonal"][li] = on_diag.double().mean(-1).numpy()
        out["sink"][li] = on_sink.double().mean(-1).numpy()
        out["other"][li] = (1 - on_diag - on_sink).clamp(min=0).double().mean(-1).numpy()
        out["offdiag"][li] = 1 - out["diagonal"][li]
    out.update(audit_head_stats(trace, layers))
    return out


def stats_cache_path(trace, cache_dir) -> Path | None:
    """Where head_stats of `trace` are cached: <cache_dir>/<fingerprint>-stats.json (None for
    traces without a fingerprint, e.g. in memory)."""
    fp = trace.manifest.get("fingerprint")
    return None if cache_dir is None or not fp else Path(cache_dir) / f"{fp[:32]}-stats.json"


def read_stats_cache(trace, cache_dir) -> dict[str, np.ndarray] | None:
    path = stats_cache_path(trace, cache_dir)
    if path is None or not path.is_file():
        return None
    try:
        saved = {k: np.array(v, dtype=float)  # None (NaN) -> nan
                 for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return None
    shape = (trace.num_layers, trace.num_heads)
    if not set(audit_metrics(trace)) <= set(saved):  # written before the overview had the audit's metrics
        return None
    return saved if saved and all(v.shape == shape for v in saved.values()) else None


def write_stats_cache(trace, cache_dir, stats: dict[str, np.ndarray]) -> None:
    path = stats_cache_path(trace, cache_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {k: json_grid(v, digits=None) for k, v in stats.items()})


def cached_head_stats(trace, cache_dir=None) -> dict[str, np.ndarray]:
    """head_stats, read from / written to `cache_dir` (keyed by the trace's fingerprint)."""
    stats = read_stats_cache(trace, cache_dir)
    if stats is None:
        stats = head_stats(trace)
        write_stats_cache(trace, cache_dir, stats)
    return stats


def top_heads(stats: dict[str, np.ndarray], n: int = 4, by: str = "other") -> list[tuple[int, int]]:
    """The n (layer, head) pairs with the largest ``stats[by]`` (ties: lower layer, head first)."""
    v = np.nan_to_num(stats[by], nan=-np.inf)
    order = np.lexsort((np.arange(v.size), -v.reshape(-1)))[:n]
    return [(int(i) // v.shape[1], int(i) % v.shape[1]) for i in order]


@dataclass
class Grid:
    """An aggregated block map: ``values[r, c]`` covers query blocks ``q0 + r*q_step ...`` (up to
    q_step of them, fewer in the last row) and key blocks ``k0 + c*k_step ...``.

    reduce="max": the largest mass of a kept (query block, key block) pair in the cell.
    reduce="sum": the mean over the cell's query blocks of the mass they put on the cell's key
    blocks, i.e. the share of an average query's attention landing in the cell (rows sum to
    <= 1). 0 means nothing in the cell was kept."""

    values: np.ndarray  # float32 [rows, cols]
    q0: int
    q1: int
    k0: int
    k1: int
    q_step: int
    k_step: int
    reduce: str

    def header(self) -> dict:
        rows, cols = self.values.shape
        return {"rows": rows, "cols": cols, "q0": self.q0, "q1": self.q1, "k0": self.k0,
                "k1": self.k1, "q_step": self.q_step, "k_step": self.k_step,
                "reduce": self.reduce, "max": float(self.values.max(initial=0.0))}


def _span(a, b, n: int, what: str) -> tuple[int, int]:
    a = 0 if a is None else int(a)
    b = n if b is None else int(b)
    a, b = max(0, a), min(n, b)
    if b <= a:
        raise UsageError(f"empty {what} range [{a}, {b}) in a trace with {n} {what}s")
    return a, b


def block_grid(trace, layer: int, head: int, q0=None, q1=None, k0=None, k1=None, *,
               max_rows: int = 1000, max_cols: int = 1000, reduce: str = "max") -> Grid:
    """The block map of (layer, head) over query blocks [q0, q1) x key blocks [k0, k1) (clipped
    to the trace), aggregated to at most max_rows x max_cols cells (see :class:`Grid`)."""
    if reduce not in REDUCES:
        raise UsageError(f"reduce={reduce!r}; expected one of {REDUCES}")
    q0, q1 = _span(q0, q1, trace.num_query_blocks, "query block")
    k0, k1 = _span(k0, k1, trace.num_key_blocks, "key block")
    q_step = math.ceil((q1 - q0) / max(1, int(max_rows)))
    k_step = math.ceil((k1 - k0) / max(1, int(max_cols)))
    rows, cols = math.ceil((q1 - q0) / q_step), math.ceil((k1 - k0) / k_step)
    layer, head = trace.head_index(layer, head)
    idx, mass = trace.rows(layer, head, q0, q1)  # [n, k] each
    r = (torch.arange(q1 - q0) // q_step)[:, None].expand_as(idx)         # [n, k]
    keep = (idx >= k0) & (idx < k1)
    cell = r[keep] * cols + (idx[keep].long() - k0) // k_step             # [m]
    vals = mass[keep]
    grid = torch.zeros(rows * cols, dtype=torch.float32)
    if reduce == "max":
        grid.scatter_reduce_(0, cell, vals, "amax")
        grid = grid.view(rows, cols)
    else:
        grid.index_add_(0, cell, vals)
        per_row = torch.full((rows,), float(q_step))
        per_row[-1] = (q1 - q0) - (rows - 1) * q_step                     # ragged last cell row
        grid = grid.view(rows, cols) / per_row[:, None]
    return Grid(grid.numpy(), q0, q1, k0, k1, q_step, k_step, reduce)


def received(trace, layer: int, head: int, q0: int, q1: int, k0=None, k1=None) -> np.ndarray:
    """float32 [k1 - k0]: mean over query blocks [q0, q1) of the mass each key block receives."""
    k0, k1 = _span(k0, k1, trace.num_key_blocks, "key block")
    return block_grid(trace, layer, head, q0, q1, k0, k1, max_rows=1, max_cols=k1 - k0,
                      reduce="sum").values[0]


def token_pieces(trace, t0: int, t1: int) -> list[str]:
    """The text of tokens [t0, t1): each token's character span, extended over the gap up to the
    next token's start (so pieces join back into the text); ``⟨id⟩`` without offsets/text."""
    t0, t1 = _span(t0, t1, trace.num_tokens, "token")
    if trace.text is None or trace.token_offsets is None:
        return [f"⟨{int(t)}⟩" for t in trace.tokens[t0:t1]]
    off = trace.token_offsets[t0:min(t1 + 1, trace.num_tokens)].tolist()
    text, out = trace.text, []
    for i in range(t1 - t0):
        s, e = off[i]
        if i + 1 < len(off) and off[i + 1][0] > e:
            e = off[i + 1][0]
        out.append(text[s:e])
    return out


# --------------------------------------------------------------------------- missed attention mass (the audit)

def audit_metrics(trace) -> list[str]:
    """The overview metrics a trace's audit gives (see :func:`audit_head_stats`): ``missed`` with the per-row
    estimate, ``missed_audited`` and ``recall`` with the exact audit; [] for traces without (older ones)."""
    return (["missed"] if trace.has_missed else []) + (["missed_audited", "recall"] if trace.has_audit else [])


def audit_head_stats(trace, layers=None) -> dict[str, np.ndarray]:
    """Per (layer, head), float64 [L, H] (NaN for layers not asked), only those the trace has:

    - ``missed``: mean over every query block of the estimated missed mass (``Trace.missed``): the share
      of the model's attention the kept blocks do not show;
    - ``missed_audited``: mean of the exact missed mass over the audited query blocks (``Trace.audit``);
    - ``recall``: mean recall of the audited rows against the exact block top-k (NaN where every audited
      row keeps every candidate)."""
    names = audit_metrics(trace)
    out = {k: np.full((trace.num_layers, trace.num_heads), np.nan) for k in names}
    for li in range(trace.num_layers) if layers is None else layers:
        for h in range(trace.num_heads):
            if "missed" in out:
                out["missed"][li, h] = trace.missed(li, h)[:, 0].double().mean().item()
            if "missed_audited" in out:
                audit = trace.audit(li, h)
                out["missed_audited"][li, h] = audit["missed"].double().mean().item()
                out["recall"][li, h] = torch.nanmean(audit["recall"].double()).item()
    return out


def missed_rows(trace, layer: int, head: int, q0=None, q1=None, *, max_rows: int = 1000) -> dict:
    """What the masks of (layer, head) missed, per query row of ``[q0, q1)`` (clipped to the trace), as JSON.

    Rows are grouped into cells of ``q_step`` query blocks exactly as :func:`block_grid` groups them for the
    same range and ``max_rows``, so cell r sits beside row r of the block map. Per cell (lists of
    ``rows`` floats, None without the per-row estimate): ``estimate``, ``low``, ``high``: the mean over the
    cell's query blocks of the estimate and of its interval ends (if every row's interval holds its value,
    the cell's mean lies between ``low`` and ``high``); ``worst``: the largest estimate in the cell.
    ``audited``: the exactly audited rows inside the range, each ``{"query_block", "missed", "recall"}``
    (recall None where the row keeps every candidate) plus the row's ``estimate``/``low``/``high`` when the
    trace has them. ``has_missed``/``has_audit`` say what the trace carries (older traces: neither)."""
    q0, q1 = _span(q0, q1, trace.num_query_blocks, "query block")
    layer, head = trace.head_index(layer, head)
    q_step = math.ceil((q1 - q0) / max(1, int(max_rows)))
    rows = math.ceil((q1 - q0) / q_step)
    out = {"layer": layer, "head": head, "q0": q0, "q1": q1, "q_step": q_step, "rows": rows,
           "has_missed": trace.has_missed, "has_audit": trace.has_audit,
           "estimate": None, "low": None, "high": None, "worst": None, "audited": []}
    missed = trace.missed(layer, head)                                     # [nQ, 3] or None
    if missed is not None:
        cells = torch.full((rows * q_step, 3), math.nan, dtype=torch.float64)
        cells[:q1 - q0] = missed[q0:q1].double()
        cells = cells.view(rows, q_step, 3)                                # [rows, q_step, 3]
        mean = cells.nanmean(1)                                            # [rows, 3]
        worst = cells[..., 0].nan_to_num(-math.inf).amax(1)                # [rows]
        for i, name in enumerate(("estimate", "low", "high")):
            out[name] = [json_number(x, 5) for x in mean[:, i].tolist()]
        out["worst"] = [json_number(x, 5) for x in worst.tolist()]
    audit = trace.audit(layer, head) if out["has_audit"] else None
    if audit is not None:
        for qb, m, r in zip(audit["query_block"].tolist(), audit["missed"].tolist(), audit["recall"].tolist(),
                            strict=True):
            if q0 <= qb < q1:
                row = {"query_block": qb, "missed": json_number(m, 5), "recall": json_number(r, 5)}
                if missed is not None:
                    row.update(zip(("estimate", "low", "high"), (json_number(x, 5) for x in missed[qb].tolist())))
                out["audited"].append(row)
        out["audited"].sort(key=lambda row: row["query_block"])
    return out


# --------------------------------------------------------------------------- analysis results

ANALYSIS_FILES = {"kurtosis": ("heads.csv", "anchors.json"), "needle_mass": ("routes.json",)}
_KEYS = {"kurtosis": ("kurtosis", "receiver_kurtosis"),
         "needle_mass": ("needle_mass", "mass_on_needle")}


def _records(obj, keys):
    """Yield (layer, head, value) from any JSON shape holding per-head records: a list of
    {"layer", "head", <key>} dicts anywhere inside, or an [L][H] matrix under <key>."""
    if isinstance(obj, dict):
        if "layer" in obj and "head" in obj:
            for k in keys:
                if isinstance(obj.get(k), (int, float)):
                    yield int(obj["layer"]), int(obj["head"]), float(obj[k])
                    return
        for k, v in obj.items():
            if k in keys and isinstance(v, list) and v and isinstance(v[0], list):
                for li, row in enumerate(v):
                    for hi, x in enumerate(row):
                        if isinstance(x, (int, float)):
                            yield li, hi, float(x)
            elif isinstance(v, (dict, list)):
                yield from _records(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            yield from _records(v, keys)


def _read_metric(path: Path, keys) -> list[tuple[int, int, float]]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            out = []
            for row in csv.DictReader(f):
                key = next((k for k in keys if row.get(k) not in (None, "")), None)
                if key is not None and row.get("layer") and row.get("head"):
                    out.append((int(row["layer"]), int(row["head"]), float(row[key])))
            return out
    return list(_records(json.loads(path.read_text(encoding="utf-8")), keys))


def find_analysis_file(metric: str, where: Path | None) -> Path | None:
    """The file for ``metric`` ("kurtosis" or "needle_mass") at ``where`` (a file, or a dir
    holding one of ANALYSIS_FILES[metric], directly or in an anchors/ or niah/ subfolder)."""
    if where is None:
        return None
    where = Path(where)
    if where.is_file():
        return where if where.name in ANALYSIS_FILES[metric] else None
    for d in (where, where / "anchors", where / "niah"):
        for name in ANALYSIS_FILES[metric]:
            if (d / name).is_file():
                return d / name
    return None


def load_analysis(trace, *, anchors=None, niah=None) -> dict[str, np.ndarray]:
    """{"kurtosis": [L, H], "needle_mass": [L, H]} (NaN where missing) from the anchors / niah
    results in the given paths, else in the trace directory or its parent (the anchors command
    writes its trace inside its out dir); absent metrics are left out.
    A head listed several times (routes.json: one needle-mass matrix per case and k) gets the
    mean. Unreadable or mismatched files raise UsageError naming the file."""
    out = {}
    for metric, given in (("kurtosis", anchors), ("needle_mass", niah)):
        if given is not None and not Path(given).exists():
            raise UsageError(f"{given} does not exist; pass the --out dir of the "
                                    f"{'anchors' if metric == 'kurtosis' else 'niah'} command.")
        path = find_analysis_file(metric, given)
        if path is None and given is None and trace.path is not None:  # next to the trace
            path = (find_analysis_file(metric, trace.path)
                    or find_analysis_file(metric, Path(trace.path).parent))
        if path is None:
            if given is not None:
                raise UsageError(f"{given} holds none of {ANALYSIS_FILES[metric]}.")
            continue
        try:
            recs = _read_metric(path, _KEYS[metric])
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {path}: {e}") from None
        total = np.zeros((trace.num_layers, trace.num_heads))
        count = np.zeros_like(total)
        for li, hi, v in recs:  # several records per head (niah: one per case and k): mean
            if 0 <= li < trace.num_layers and 0 <= hi < trace.num_heads and not math.isnan(v):
                total[li, hi] += v
                count[li, hi] += 1
        with np.errstate(invalid="ignore"):
            grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        if recs and np.isnan(grid).all():
            raise UsageError(f"{path} has no (layer, head) inside this trace's "
                             f"{trace.num_layers} x {trace.num_heads}; is it from another trace?")
        if recs:
            out[metric] = grid
    return out


def describe(trace) -> dict:
    """JSON-able facts about a trace for page headers and titles."""
    meta = trace.meta
    return {"model": trace.model_name, "device": meta.get("device"), "num_tokens": trace.num_tokens,
            "num_layers": trace.num_layers,
            "num_heads": trace.num_heads, "num_query_blocks": trace.num_query_blocks,
            "num_key_blocks": trace.num_key_blocks, "block_q": trace.block_q,
            "block_k": trace.block_k, "top_k": trace.top_k, "sparsity": trace.sparsity,
            "has_text": trace.text is not None and trace.token_offsets is not None,
            "mass_encoding": meta.get("mass_encoding"), "fidelity": trace.fidelity, "budget": trace.budget,
            # counted per shard when written; only a budget's rows vary enough in length to say it
            "mean_kept_blocks": None if trace.budget is None else trace.mean_kept_blocks}


# --------------------------------------------------------------------------- sources of a span

def sources_view(trace, t0: int | None = None, t1: int | None = None, *, top: int = 8, unit: str | None = None,
                 aggregate: str = "mean", residual: float = 0.5) -> dict:
    """JSON for the text shading and the layer x source chart: the sources of tokens ``[t0, t1)``
    (default: the last query block) over all layers and heads. ``blocks``: the score of every key block
    (``low``/``high`` too where the trace has missed-mass estimates); ``top``: the ``top`` strongest
    passages (``unit``: sentences when the trace has text, else blocks), each with ``entry`` [L] (the
    part of its score that entered it at each layer) and its text."""
    found = sources(trace, None if t0 is None and t1 is None else (t0, t1), aggregate=aggregate,
                    residual=residual, top=top)
    unit = unit or ("sentence" if trace.text is not None and trace.token_offsets is not None else "block")
    out = found.summary(top, unit)
    for row in out["top"]:
        row["entry"] = [_significant(x) for x in row["entry"]]
    out["blocks"] = [_significant(x) for x in found.score.tolist()]
    if found.has_missed:
        out["blocks_low"] = [_significant(x) for x in found.low.tolist()]
        out["blocks_high"] = [_significant(x) for x in found.high.tolist()]
    return out


def _significant(x: float) -> float:
    """4 significant digits: small scores stay visible (rounding to decimals would zero them)."""
    return float(f"{x:.4g}")
