"""Reading a trace: :class:`Trace`, lazy and memory-mapped, with the conventions a reader must know."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from ..config import TraceConfig
from .encoding import block_sparsity, decode_mass, human_bytes, index_dtype, sparsity
from .files import atomic_write_json, sha256_file, sha256_files, to_json
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RESERVED,
    ROW_LAYOUT,
    SHAPE_KEYS,
    TEXT_FILE,
    TOKENS_FILE,
    TraceError,
    TraceIndexError,
    check_extra,
    read_manifest,
)
from .writer import TraceWriter

_FIX = "rerunning the same trace command with the same --out recomputes the damaged part."

# What a notebook shows for a Trace (``_repr_html_``): a picture, which belongs to sparsetrace.viz. The
# package root registers it here at import (the store never imports viz: data flows one way); with none
# registered, notebooks show ``__repr__``.
_html_views: list = []


def register_html_view(view) -> None:
    """Make ``view(trace) -> str`` (self-contained HTML) what notebooks show for a :class:`Trace`."""
    _html_views[:] = [view]


class Trace:
    """The block-sparse attention trace of one model over one token sequence.

    `trace[layer, head]` -> `(indices, mass)`, both `[nQ, top_k]`, for one layer and QUERY head:
      - `indices` int32: KEY-BLOCK indices (not token indices) kept for each query block; key block
        j covers tokens `[j*block_k, (j+1)*block_k)`. Rows are sorted ascending, unique, padded
        with -1 at the END: short rows where fewer than top_k key blocks are causal, and, in a trace
        made under a coverage budget (`trace.budget`), wherever the row reached the budget's mass with
        fewer blocks (top_k is then the budget's max_k; count a row's blocks as `(idx >= 0).sum(-1)`).
      - `mass` float32: for each kept block, the softmax probability that the model, running with
        this sparse mask, put on the block's keys, averaged over the block's queries. Rows sum to
        1; 0 at the -1 padding.
    Axis 0 is the QUERY-BLOCK axis: row i covers tokens `[i*block_q, (i+1)*block_q)`, absolute
    positions from token 0 (the chunked prefill that produced the trace does not show here).
    `trace.layer(l)` gives all heads of a layer at once, `[H, nQ, top_k]` (`heads=` a slice of them;
    `device=` moves the stored int16 / float16 there and decodes there).

    Footguns:
      - -1 is a valid torch index (the LAST block): mask it (`idx[idx >= 0]`) before indexing.
      - Row lengths vary under a coverage budget: `top_k` is the width, not the count of kept blocks.
      - Indices are blocks: tokens of block j are `j*block_k ...`; block_q may differ from block_k,
        and the last query and key blocks are ragged when T is not a multiple of the block size.
      - The diagonal block is listed whole, but attention inside it is causal (see `sparsity`).
      - Heads are QUERY heads: with GQA, heads sharing a kv head still have rows of their own.
      - On disk, indices are int16 (int32 past 32767 key blocks) and mass float16 (relative error
        2**-11) or "log8" (3.3 %, rows not renormalised); reads always give int32 / float32.
      - Reads are lazy (memory-mapped shards) and uncached: keep tensors you reuse. Each shard's
        sha256 is checked before its first read (all of them at load with `verify=True`), so a
        damaged shard raises TraceError instead of reading as valid.
    In a notebook a trace shows itself: the overview of all layers x heads and one block map, drawn
    by sparsetrace.viz (self-contained, no server; see `register_html_view`).
    Other attributes: `tokens` int64 [T]; `token_offsets` int64 [T, 2] character spans into
    `text`, or None; `text`; `meta` (the tracer's meta plus shapes); `trace_config` (the
    TraceConfig it was made with, or None); `manifest`;
    `fidelity`; `budget` (`{"coverage", "min_k", "max_k"}` or None) and `capped(layer, head)`;
    `path` (None in memory); `num_layers`, `num_heads`, `num_tokens`,
    `num_query_blocks`, `num_key_blocks`, `top_k`, `block_q`, `block_k`; `sparsity`, `nbytes`,
    `dense_bytes`.
    """

    def __init__(self, manifest: dict, tokens: torch.Tensor, token_offsets, text, *, path=None,
                 shards=(), arrays=None):
        # Use Trace.load or Trace.from_arrays; this just binds what they checked.
        self.manifest, self.path = manifest, path
        self.tokens, self.token_offsets, self.text = tokens, token_offsets, text
        # For a trace on disk: [{"file": safe_open handle, "q": (start, end), "path", "sha256",
        # "verified", "missed", "audit_rows", "capped"}]; in memory, {"indices" int32, "mass" float32
        # [L, H, nQ, k], optional "missed" [L, H, nQ, 3], optional "capped" bool [L, H, nQ], optional
        # "audit": {"query_block" [R], "missed", "recall" [L, H, R]}}.
        self._shards = list(shards)
        self._arrays = arrays
        for key in SHAPE_KEYS:
            setattr(self, key, manifest[key])
        self.meta = {**manifest["meta"], **{k: manifest[k] for k in SHAPE_KEYS},
                     "mass_encoding": manifest["mass_encoding"]}

    @classmethod
    def load(cls, path, *, verify: bool = True) -> Trace:
        """Open a finished trace directory. File sizes, shard headers and the hashes of the small
        side files are always checked at once; each shard's sha256 is checked before its first read,
        or all of them now with `verify=True` (reads every byte once: ~0.5 s per GB; the default
        opens a 1M-token trace in about 0.1 s)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise TraceError(f"{path} has no {MANIFEST}: not a trace directory (or its run died "
                             "before writing anything); pass the --out directory of a trace.")
        m = read_manifest(path)
        if not m.get("complete"):
            raise TraceError(f"{path} holds an incomplete trace ({m.get('completed_query_blocks')}"
                             f" of {m.get('num_query_blocks')} query blocks): the run was "
                             "interrupted; rerunning the same command with the same --out "
                             "resumes it.")
        fix = _FIX
        side = [(name, e["bytes"], e["sha256"]) for name, e in m["files"].items()]
        files = side + [(s["file"], s["bytes"], s["sha256"]) for s in m["shards"]]
        for name, size, _ in files:
            p = path / name
            if not p.is_file():
                raise TraceError(f"{p} is missing but listed in {MANIFEST}; {fix}")
            if p.stat().st_size != size:
                raise TraceError(f"{p} is truncated or damaged ({p.stat().st_size} bytes, "
                                 f"{MANIFEST} says {size}); {fix}")
        checked = files if verify else side  # shards not hashed now are hashed before their first read
        hashes = sha256_files([path / name for name, _, _ in checked])
        for (name, _, want), got in zip(checked, hashes, strict=True):
            if got != want:
                raise TraceError(f"{path / name} is corrupt (sha256 mismatch); {fix}")
        shards, pos = [], 0
        for s in m["shards"]:
            (a, b), p = s["q_blocks"], path / s["file"]
            try:  # safe_open memory-maps the file; only its header is read here
                f = safe_open(str(p), framework="pt")
                shapes = [f.get_slice(t).get_shape() for t in ("indices", "mass")]
            except Exception as e:  # safetensors has its own error type for bad headers
                raise TraceError(f"{p} is not a readable shard ({e}); {fix}") from None
            if a != pos or shapes != [[m["num_layers"], m["num_heads"], b - a, m["top_k"]]] * 2:
                raise TraceError(f"{p} does not match {MANIFEST} (q blocks {a}..{b}, shapes "
                                 f"{shapes}); {fix}")
            shards.append({"file": f, "q": (a, b), "path": p, "sha256": s["sha256"],
                           "verified": verify, "missed": s.get("missed", False),
                           "audit_rows": s.get("audit_rows", 0), "capped": s.get("capped", False)})
            pos = b
        if pos != m["num_query_blocks"]:
            raise TraceError(f"{path / MANIFEST} covers {pos} of {m['num_query_blocks']} query "
                             f"blocks; {fix}")
        tok = safetensors.torch.load_file(path / TOKENS_FILE)
        offsets = tok["offsets"].long() if "offsets" in tok else None
        text = (path / TEXT_FILE).read_text(encoding="utf-8") if TEXT_FILE in m["files"] else None
        return cls(m, tok["tokens"].long(), offsets, text, path=path, shards=shards)

    @classmethod
    def from_arrays(cls, indices: torch.Tensor, mass: torch.Tensor, *, block_q: int, block_k: int,
                    tokens: torch.Tensor, meta: dict | None = None,
                    token_offsets: torch.Tensor | None = None, text: str | None = None,
                    missed: torch.Tensor | None = None, audit: dict | None = None,
                    capped: torch.Tensor | None = None, budget: dict | None = None) -> Trace:
        """An in-memory trace from whole `[L, H, nQ, k]` arrays (and optionally the per-row missed
        mass `[L, H, nQ, 3]`, the audit, and under a coverage ``budget`` the ``capped`` rows
        `[L, H, nQ]`, as `TraceWriter` takes them); `save` writes it."""
        tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
        bq, bk, T = block_q, block_k, tokens.numel()
        meta = {} if meta is None else meta
        if not (isinstance(bq, int) and isinstance(bk, int) and indices.dim() == 4
                and indices.shape == mass.shape and indices.shape[2] == -(-T // bq)):
            raise ValueError(f"need indices and mass [L, H, nQ = ceil(T / block_q), k] and int "
                             f"block_q/block_k; got {list(indices.shape)}, "
                             f"{list(mass.shape)}, T={T}, block_q={bq}, block_k={bk}")
        L, H, nQ, k = indices.shape
        shapes = (L, H, k, T, nQ, -(-T // bk), bq, bk)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "meta": json.loads(to_json(meta, "meta")),
                    **dict(zip(SHAPE_KEYS, shapes, strict=True)), "mass_encoding": "float32",
                    "row_layout": ROW_LAYOUT, "budget": budget, "complete": True, "shards": []}
        if (capped is None) != (budget is None):
            raise ValueError("capped rows go with a coverage budget: pass both or neither")
        offsets = None if token_offsets is None else token_offsets.long().cpu()
        arrays = {"indices": indices.detach().cpu().to(torch.int32), "mass": mass.detach().cpu().float()}
        if missed is not None:
            arrays["missed"] = missed.detach().cpu().float()
        if capped is not None:
            arrays["capped"] = capped.detach().cpu().bool()
        if audit is not None:
            arrays["audit"] = {"query_block": torch.as_tensor(audit["query_block"]).long().cpu(),
                               "missed": audit["missed"].detach().cpu().float(),
                               "recall": audit["recall"].detach().cpu().float()}
        return cls(manifest, tokens, offsets, text, arrays=arrays)

    def save(self, path, *, mass_encoding: str = "float16",
             chunk_query_blocks: int = 4096) -> None:
        """Write a complete trace directory (through TraceWriter, so it resumes too)."""
        writer = TraceWriter(path, meta=self.manifest["meta"], tokens=self.tokens,
                             token_offsets=self.token_offsets, text=self.text,
                             num_layers=self.num_layers, num_heads=self.num_heads,
                             top_k=self.top_k, block_q=self.block_q, block_k=self.block_k,
                             mass_encoding=mass_encoding, budget=self.budget)
        every = slice(None)
        audit = self.audit()
        for a in range(writer.completed_query_blocks, self.num_query_blocks, chunk_query_blocks):
            q = slice(a, min(a + chunk_query_blocks, self.num_query_blocks))
            missed = self._read("missed", every, every, q) if self.has_missed else None
            rows = None
            if audit is not None:
                inside = (audit["query_block"] >= q.start) & (audit["query_block"] < q.stop)
                rows = {"query_block": audit["query_block"][inside], "missed": audit["missed"][..., inside],
                        "recall": audit["recall"][..., inside]}
            capped = self._read("capped", every, every, q) if self.budget is not None else None
            writer.write(a, self._read("indices", every, every, q), self._read("mass", every, every, q),
                         missed=missed, audit=rows, capped=capped)
        writer.finish({k: v for k, v in self.manifest.items() if k not in RESERVED})

    # -- reading

    def _read(self, name: str, layers, heads, q: slice, device=None) -> torch.Tensor:
        """`name[layers, heads, q]` as int32 / float32 (bool for "capped"); the query-block axis is -2 of
        the result (-1 for "capped", one flag per row). With ``device``, the stored (narrow) values move
        there and are decoded there."""
        if self._arrays is not None:  # a copy: callers may modify what they get
            out = self._arrays[name][layers, heads, q]
            return out.clone() if device is None else out.to(device, copy=True)
        a, b, _ = q.indices(self.num_query_blocks)
        shards = [sh for sh in self._shards if sh["q"][0] < b and sh["q"][1] > a]
        self._verify(shards)
        parts = [sh["file"].get_slice(name)[layers, heads, max(a, sh["q"][0]) - sh["q"][0]:
                                            min(b, sh["q"][1]) - sh["q"][0]]
                 for sh in shards]  # memory-mapped reads
        # the query-block axis: -2 of every stored array but the per-row flags
        out = torch.cat(parts, dim=-1 if name == "capped" else -2)
        if device is not None:  # int16 / float16 on disk: half the bytes to move, decoded where they land
            out = out.to(device)
        if name == "capped":
            return out.bool()
        if name == "indices":
            return out.to(torch.int32)
        return out.float() if name == "missed" else decode_mass(out)

    @staticmethod
    def _verify(shards: list[dict]) -> None:
        """Hash each shard once, before its bytes are first read; a mismatch is never read as valid. The
        first read of a layer touches every shard of a trace chunked by query blocks: they are hashed in
        parallel (a 1M-token trace's 0.7 GB took 0.74 s in one thread on this 2-core CPU)."""
        todo = [sh for sh in shards if not sh["verified"]]
        hashes = sha256_files([sh["path"] for sh in todo]) if len(todo) > 1 else [
            sha256_file(sh["path"]) for sh in todo]
        for shard, got in zip(todo, hashes, strict=True):
            if got != shard["sha256"]:
                raise TraceError(f"{shard['path']} is corrupt (sha256 mismatch); {_FIX}")
            shard["verified"] = True

    def _check(self, i, n: int, what: str) -> int:
        i = operator.index(i)
        if not -n <= i < n:
            raise TraceIndexError(f"{what} {i} out of range for a trace with {n} {what}s "
                             f"(valid: {-n}..{n - 1})")
        return i % n

    # -- what the trace says about its own fidelity

    @property
    def has_missed(self) -> bool:
        """Whether every row carries an estimate of its missed attention mass (see :meth:`missed`)."""
        if self._arrays is not None:
            return "missed" in self._arrays
        return bool(self._shards) and all(sh["missed"] for sh in self._shards)

    @property
    def has_audit(self) -> bool:
        """Whether the trace carries exactly audited rows (see :meth:`audit`); known without reading them."""
        if self._arrays is not None:
            found = self._arrays.get("audit")
            return found is not None and found["query_block"].numel() > 0
        return any(sh["audit_rows"] for sh in self._shards)

    @property
    def budget(self) -> dict | None:
        """The coverage budget the rows were cut to, ``{"coverage": P, "min_k", "max_k"}`` (``max_k`` is
        ``top_k``, the rows' width), or None for a trace with ``top_k`` blocks wherever that many are causal."""
        return self.manifest.get("budget")

    def capped(self, layer: int, head: int) -> torch.Tensor | None:
        """bool ``[nQ]``: under a coverage budget, the rows that kept all ``max_k`` blocks and still held less
        than P of the attention by the estimate; None for a trace without a budget."""
        if self.budget is None:
            return None
        layer, head = self.head_index(layer, head)
        return self._read("capped", layer, head, slice(None))

    def missed(self, layer: int, head: int) -> torch.Tensor | None:
        """float32 ``[nQ, 3]``: per query block, the estimated share of the model's attention the kept
        blocks miss (mean over the block's queries of ``1 - sum of p over kept keys``) and the low and high
        ends of its confidence interval; None for traces recorded without the estimate."""
        if not self.has_missed:
            return None
        layer, head = self.head_index(layer, head)
        return self._read("missed", layer, head, slice(None))

    def audit(self, layer: int | None = None, head: int | None = None) -> dict | None:
        """The exactly audited rows: ``{"query_block": int64 [R], "missed": float32, "recall": float32}``
        with ``missed``/``recall`` ``[R]`` for one (layer, head), or ``[L, H, R]`` when both are None.
        ``missed`` is the exact missed mass of the kept selection (a dense pass over every causal key of
        those queries), ``recall`` the share of the exact block top-k's row (the oracle's) that the row
        kept. None for traces recorded without an audit."""
        pick = (slice(None), slice(None)) if layer is None and head is None else self.head_index(layer, head)
        if self._arrays is not None:
            found = self._arrays.get("audit")
            if found is None:
                return None
            return {"query_block": found["query_block"].clone(), "missed": found["missed"][pick].clone(),
                    "recall": found["recall"][pick].clone()}
        shards = [sh for sh in self._shards if sh["audit_rows"]]
        if not shards:
            return None
        self._verify(shards)
        return {"query_block": torch.cat([sh["file"].get_tensor("audit_query_block").long() for sh in shards]),
                **{key: torch.cat([sh["file"].get_slice(f"audit_{key}")[pick] for sh in shards], dim=-1).float()
                   for key in ("missed", "recall")}}

    def head_index(self, layer: int, head: int) -> tuple[int, int]:
        """``(layer, head)`` as non-negative ints (negative ones count from the end); TraceIndexError
        names the valid range when either is outside the trace."""
        return self._check(layer, self.num_layers, "layer"), self._check(head, self.num_heads, "head")

    def indices(self, layer: int, head: int) -> torch.Tensor:
        """int32 [nQ, top_k]: kept key-block indices of (layer, head), -1 padded."""
        return self._read("indices", self._check(layer, self.num_layers, "layer"),
                          self._check(head, self.num_heads, "head"), slice(None))

    def mass(self, layer: int, head: int) -> torch.Tensor:
        """float32 [nQ, top_k]: attention mass on each kept block of (layer, head)."""
        return self._read("mass", self._check(layer, self.num_layers, "layer"),
                          self._check(head, self.num_heads, "head"), slice(None))

    def rows(self, layer: int, head: int, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int32, mass float32) ``[q1 - q0, top_k]``: query-block rows ``[q0, q1)`` of one head,
        reading only the shards that overlap them (a viewport of a 1M-token trace stays cheap)."""
        layer = self._check(layer, self.num_layers, "layer")
        head = self._check(head, self.num_heads, "head")
        q = slice(q0, q1)
        return self._read("indices", layer, head, q), self._read("mass", layer, head, q)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"index a Trace as trace[layer, head] (or trace.layer(l)); got {key!r}")
        return self.indices(*key), self.mass(*key)

    def layer(self, layer: int, *, heads: slice | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int32 [H, nQ, k], mass float32 [H, nQ, k]): all heads of one layer (or the heads of
        the slice ``heads``); on ``device`` (e.g. "cuda") when given: the stored bytes move there and are
        decoded there."""
        li = self._check(layer, self.num_layers, "layer")
        heads = slice(None) if heads is None else heads
        return (self._read("indices", li, heads, slice(None), device),
                self._read("mass", li, heads, slice(None), device))

    # -- summaries

    @property
    def trace_config(self) -> TraceConfig | None:
        """The :class:`TraceConfig` the tracer recorded (None for traces written by other tools)."""
        raw = self.meta.get("trace_config")
        return None if raw is None else TraceConfig.from_dict(raw)

    @property
    def fidelity(self) -> dict | None:
        return self.manifest.get("fidelity")

    def update_manifest(self, **extra) -> None:
        """Atomically add or replace top-level JSON-able manifest entries (fidelity, analysis
        results); shards are untouched. An in-memory trace keeps them for `save`."""
        extra = check_extra(extra)
        if self.path is not None:
            on_disk = read_manifest(self.path)  # re-read: keep what others added meanwhile
            on_disk.update(extra)
            atomic_write_json(self.path / MANIFEST, on_disk)
        self.manifest.update(extra)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the shards and the tokens file (the text is input, not trace). In
        memory: what `save` would write at float16 mass, without safetensors headers."""
        if self.path is not None:
            return (sum(s["bytes"] for s in self.manifest["shards"])
                    + self.manifest["files"][TOKENS_FILE]["bytes"])
        entries = self.num_layers * self.num_heads * self.num_query_blocks * self.top_k
        tokens = 4 * self.num_tokens * (1 if self.token_offsets is None else 3)
        return entries * (index_dtype(self.num_key_blocks).itemsize + 2) + tokens

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense float16 causal attention pattern: L * H * T(T+1)/2 * 2 bytes."""
        T = self.num_tokens
        return self.num_layers * self.num_heads * T * (T + 1) // 2 * 2

    def layer_sparsity(self, layer: int) -> float:
        """:attr:`sparsity` of one layer, over its heads. A sliding-window layer's pairs outside the window
        count as pruned, as in :attr:`sparsity`: compare layers of one kind."""
        indices = self._read("indices", self._check(layer, self.num_layers, "layer"), slice(None), slice(None))
        return block_sparsity(indices[None], self.block_q, self.block_k, self.num_tokens)

    @property
    def sparsity(self) -> float:
        """1 - kept / causal (query, key) TOKEN pairs, over all layers and heads. The pair (q, x)
        is kept when x <= q and x's key block is in the row of q's query block; there are
        T(T+1)/2 causal pairs per head. Exact: causal inside diagonal blocks, ragged last blocks."""
        if self._arrays is not None:
            return block_sparsity(self._arrays["indices"], self.block_q, self.block_k, self.num_tokens)
        kept = sum(s["kept_pairs"] for s in self.manifest["shards"])  # counted per shard when written
        return sparsity(kept, self.num_layers, self.num_heads, self.num_tokens)

    @property
    def mean_kept_blocks(self) -> float:
        """Kept key blocks per row (layer, head, query block), on average: ``top_k`` less the ``-1`` padding
        of short rows (early rows; every row a coverage budget cut). Counted per shard when written."""
        rows = self.num_layers * self.num_heads * self.num_query_blocks
        shards = self.manifest["shards"]
        if self._arrays is None and all("kept_blocks" in s for s in shards):
            return sum(s["kept_blocks"] for s in shards) / rows
        kept = sum(int((self._read("indices", li, slice(None), slice(None)) >= 0).sum())
                   for li in range(self.num_layers))  # older traces: count them once
        return kept / rows

    @property
    def capped_share(self) -> float | None:
        """Under a coverage budget, the share of rows whose whole max-k selection held less than P by the
        estimate (``capped``); None for a trace without a budget."""
        if self.budget is None:
            return None
        rows = self.num_layers * self.num_heads * self.num_query_blocks
        if self._arrays is not None:
            return float(self._arrays["capped"].double().mean())
        return sum(s["capped"] for s in self.manifest["shards"]) / rows

    @property
    def model_name(self) -> str:
        """The model id the tracer recorded, else its architecture, else "?"."""
        model = self.meta.get("model_id") or self.meta.get("model") or "?"
        if isinstance(model, dict):  # the tracer stores a model summary dict under "model"
            model = model.get("architecture") or model.get("name_or_path") or "?"
        return str(model)

    def _repr_html_(self) -> str | None:
        return _html_views[0](self) if _html_views else None

    def __repr__(self) -> str:
        model = self.model_name
        where = "on disk" if self.path is not None else "in memory"
        return (f"Trace(model={model}, tokens={self.num_tokens}, layers={self.num_layers}, "
                f"heads={self.num_heads}, blocks {self.block_q}x{self.block_k}, "
                f"top_k={self.top_k}, sparsity={self.sparsity:.2f}, {human_bytes(self.nbytes)} "
                f"{where} vs {human_bytes(self.dense_bytes)} dense)")
