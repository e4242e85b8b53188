"""Writing a trace directory chunk by chunk, and resuming an interrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import safetensors.torch
import torch

from ..config import MASS_ENCODINGS
from .encoding import encode_mass, index_dtype, kept_pairs
from .files import atomic_write_bytes, atomic_write_json, sha256_files, to_json
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROW_LAYOUT,
    SHAPE_KEYS,
    TEXT_FILE,
    TMP_PREFIX,
    TOKENS_FILE,
    VOLATILE_META_KEYS,
    TraceError,
    check_extra,
    read_manifest,
)


def _fingerprint(meta: dict, shapes: dict, tokens, token_offsets, text) -> str:
    """sha256 of what defines a trace; volatile meta keys are left out so that a resumed run
    (another day, another host) still matches."""
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\0".encode())
    stable = {k: v for k, v in meta.items() if k not in VOLATILE_META_KEYS}
    parts = [json.dumps([stable, shapes], sort_keys=True).encode(),
             tokens.long().numpy().tobytes(),
             b"-" if token_offsets is None else token_offsets.long().numpy().tobytes(),
             b"-" if text is None else text.encode()]
    for p in parts:  # length-prefixed: no two different inputs concatenate to the same bytes
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()


class TraceWriter:
    """Writes a trace directory, one shard per `write`, and resumes an interrupted one.

    If `path` holds a manifest with the same fingerprint (tokens, offsets, text, meta without
    `VOLATILE_META_KEYS`, shapes, mass encoding, budget), the listed shards that still verify (size,
    sha256, contiguous) are kept, everything after the first bad one and any stray shard or temp
    file is deleted, and `completed_query_blocks` says where to continue. Any other non-empty
    directory raises TraceError before anything is touched. One writer per directory at a time.

    ``budget`` (``MaskConfig.budget()``: ``{"coverage", "min_k", "max_k"}``) marks a trace whose rows were
    cut to a coverage budget: ``top_k`` is then ``max_k``, rows have different lengths (-1-padded), and every
    ``write`` takes ``capped``.
    """

    def __init__(self, path, *, meta: dict, tokens: torch.Tensor,
                 token_offsets: torch.Tensor | None = None, text: str | None = None,
                 num_layers: int, num_heads: int, top_k: int, block_q: int, block_k: int,
                 mass_encoding: str = "float16", budget: dict | None = None):
        self.path = Path(path)
        meta = json.loads(to_json(meta, "meta"))  # a private copy, exactly as it will read back
        tokens = torch.as_tensor(tokens).reshape(-1).cpu()
        token_offsets = None if token_offsets is None else token_offsets.cpu()
        T = tokens.numel()
        if mass_encoding not in MASS_ENCODINGS:
            raise ValueError(f"mass_encoding={mass_encoding!r}; expected one of {MASS_ENCODINGS}")
        bq, bk = block_q, block_k
        if not (isinstance(bq, int) and isinstance(bk, int) and bq > 0 and bk > 0):
            raise ValueError(f"need positive int block_q and block_k; got {bq!r}, {bk!r}")
        if T == 0:
            raise ValueError("a trace needs at least one token")
        num_query_blocks, num_key_blocks = -(-T // bq), -(-T // bk)
        if token_offsets is not None and tuple(token_offsets.shape) != (T, 2):
            raise ValueError(f"token_offsets must be [{T}, 2]; got {list(token_offsets.shape)}")
        self.shapes = dict(zip(SHAPE_KEYS, (num_layers, num_heads, top_k, T, num_query_blocks,
                                            num_key_blocks, bq, bk), strict=True))
        self.index_dtype, self.mass_encoding = index_dtype(num_key_blocks), mass_encoding
        if budget is not None:
            budget = json.loads(to_json(budget, "budget"))
            if budget.get("max_k") != top_k:
                raise ValueError(f"a budget's max_k is the rows' width: got max_k={budget.get('max_k')}, "
                                 f"top_k={top_k}")
        self.budget = budget
        # The budget joins the fingerprint only when there is one, so traces without one keep theirs.
        defining = {**self.shapes, "mass_encoding": mass_encoding, **({"budget": budget} if budget else {})}
        fingerprint = _fingerprint(meta, defining, tokens, token_offsets, text)
        # Side files derive from the inputs alone, so a resume can always rewrite them.
        tok = {"tokens": tokens.to(torch.int32).contiguous()}
        if token_offsets is not None:
            tok["offsets"] = token_offsets.to(torch.int32).contiguous()
        self._side = {TOKENS_FILE: safetensors.torch.save(tok)}
        if text is not None:
            self._side[TEXT_FILE] = text.encode("utf-8")

        old = self._existing_manifest()
        if old is not None and old.get("fingerprint") != fingerprint:
            raise TraceError(f"{self.path} already holds a trace of another input/config; pass a "
                             "new --out directory or delete it.")
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = old or {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "meta": meta, **self.shapes, "index_dtype": str(self.index_dtype).split(".")[-1],
            "mass_encoding": mass_encoding, "row_layout": ROW_LAYOUT, "budget": budget, "complete": False,
            "completed_query_blocks": 0, "shards": []}
        self.manifest["files"] = {name: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                                  for name, d in self._side.items()}
        if old is not None:
            self._keep_verified_prefix()
        atomic_write_json(self.path / MANIFEST, self.manifest)  # written first: the dir is ours
        for name, data in self._side.items():
            p = self.path / name
            if not (p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data):
                atomic_write_bytes(p, data)

    def _existing_manifest(self) -> dict | None:
        if self.path.exists() and not self.path.is_dir():
            raise TraceError(f"{self.path} is not a directory; pass a new --out directory.")
        if not self.path.is_dir():
            return None
        if (self.path / MANIFEST).is_file():
            return read_manifest(self.path)
        # Our temp files alone may be left by a run killed while writing its first manifest.
        leftovers = list(self.path.iterdir())
        if any(not p.name.startswith(TMP_PREFIX) for p in leftovers):
            raise TraceError(f"{self.path} is a non-empty directory without {MANIFEST}, so not a "
                             "trace; pass a new --out directory (nothing was changed).")
        for p in leftovers:
            p.unlink()
        return None

    def _keep_verified_prefix(self) -> None:
        """Keep the longest contiguous run of intact listed shards; delete the rest and any stray
        shard or temp file (all of it ours: the fingerprint matched)."""
        shards = self.manifest["shards"]
        paths = [self.path / s["file"] for s in shards]
        ok = [p.is_file() and p.stat().st_size == s["bytes"]
              for p, s in zip(paths, shards, strict=True)]
        hashes = iter(sha256_files([p for p, o in zip(paths, ok, strict=True) if o]))
        kept, pos = [], 0
        for s, o in zip(shards, ok, strict=True):
            if not (o and next(hashes) == s["sha256"] and s["q_blocks"][0] == pos):
                break
            kept.append(s)
            pos = s["q_blocks"][1]
        listed = {s["file"] for s in kept}
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith("shard-")
                                                  and p.name not in listed):
                p.unlink()
        self.manifest.update(shards=kept, completed_query_blocks=pos,
                             complete=self.manifest["complete"]
                             and pos == self.shapes["num_query_blocks"])

    @property
    def completed_query_blocks(self) -> int:
        return self.manifest["completed_query_blocks"]

    def write(self, q_block_start: int, indices: torch.Tensor, mass: torch.Tensor, *,
              missed: torch.Tensor | None = None, audit: dict | None = None,
              capped: torch.Tensor | None = None) -> None:
        """Append query blocks [q_block_start, q_block_start + n) of every layer and head:
        indices [L, H, n, k] any int dtype (-1 padded), mass [L, H, n, k] float (0 at padding).

        Optional, per row: ``missed [L, H, n, 3]`` (estimated missed mass, low, high; stored float16).
        Optional, for audited rows of this chunk: ``audit = {"query_block": [r] absolute query-block
        ids inside the chunk, "missed": [L, H, r], "recall": [L, H, r]}`` (stored float32).
        With a budget, required: ``capped`` bool ``[L, H, n]`` (rows whose whole selection held less than the
        budget's P by the estimate; stored as bool, one byte a row)."""
        L, H, k, nQ, nK = (self.shapes[x] for x in ("num_layers", "num_heads", "top_k",
                                                   "num_query_blocks", "num_key_blocks"))
        if q_block_start != self.completed_query_blocks:
            raise ValueError(f"write(q_block_start={q_block_start}) but "
                             f"{self.completed_query_blocks} query blocks are written; chunks "
                             "must arrive in order")
        n = indices.shape[2] if indices.dim() == 4 else -1
        if (tuple(indices.shape) != (L, H, n, k) or tuple(mass.shape) != (L, H, n, k) or n < 1
                or q_block_start + n > nQ):
            raise ValueError(f"expected indices and mass [L={L}, H={H}, n, k={k}] with 1 <= n <= "
                             f"{nQ - q_block_start}; got {list(indices.shape)}, {list(mass.shape)}")
        if indices.is_floating_point() or not mass.is_floating_point():
            raise ValueError(f"need integer indices and float mass; got {indices.dtype}, "
                             f"{mass.dtype}")
        indices, mass = indices.detach().cpu(), mass.detach().cpu().float()
        lo, hi = int(indices.min()), int(indices.max())  # checked before narrowing the dtype
        if lo < -1 or hi >= nK:
            raise ValueError(f"indices must lie in [-1, {nK}); got [{lo}, {hi}]")
        indices = indices.to(torch.int32)
        if (not bool(torch.isfinite(mass).all()) or float(mass.min()) < 0
                or bool(mass[indices < 0].any())):
            raise ValueError("mass must be finite, >= 0, and 0 where indices is -1")

        tensors = {"indices": indices.to(self.index_dtype).contiguous(),
                   "mass": encode_mass(mass, self.mass_encoding).contiguous()}
        if missed is not None:
            if tuple(missed.shape) != (L, H, n, 3) or not bool(torch.isfinite(missed).all()):
                raise ValueError(f"missed must be finite [L={L}, H={H}, n={n}, 3]; got {list(missed.shape)}")
            tensors["missed"] = missed.detach().cpu().to(torch.float16).contiguous()
        if (capped is None) != (self.budget is None):
            raise ValueError("capped rows go with a coverage budget: pass capped exactly when the writer has "
                             "a budget")
        if capped is not None:
            if tuple(capped.shape) != (L, H, n):
                raise ValueError(f"capped must be [L={L}, H={H}, n={n}]; got {list(capped.shape)}")
            tensors["capped"] = capped.detach().cpu().to(torch.bool).contiguous()
        audited = 0
        if audit is not None and len(audit["query_block"]):
            rows = torch.as_tensor(audit["query_block"]).cpu()
            audited = rows.numel()
            if not bool(((rows >= q_block_start) & (rows < q_block_start + n)).all()):
                raise ValueError(f"audited query blocks {rows.tolist()} lie outside this chunk's "
                                 f"[{q_block_start}, {q_block_start + n})")
            for key in ("missed", "recall"):
                if tuple(audit[key].shape) != (L, H, audited):
                    raise ValueError(f"audit[{key!r}] must be [L={L}, H={H}, r={audited}]; got "
                                     f"{list(audit[key].shape)}")
                tensors[f"audit_{key}"] = audit[key].detach().cpu().float().contiguous()
            tensors["audit_query_block"] = rows.to(torch.int32).contiguous()
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        data = safetensors.torch.save(
            tensors,
            # One metadata key: safetensors keeps metadata in a hash map, so two keys come out in a
            # random order and the same rows would hash differently from run to run.
            metadata={"format": f"{FORMAT}; q_block_start={q_block_start}"})
        atomic_write_bytes(self.path / name, data)  # the shard lands before the manifest lists it
        kept = kept_pairs(indices, q_block_start, self.shapes["block_q"], self.shapes["block_k"],
                           self.shapes["num_tokens"])
        self.manifest["shards"].append({
            "file": name, "q_blocks": [q_block_start, q_block_start + n],
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "kept_pairs": kept,
            "kept_blocks": int((indices >= 0).sum()), "missed": missed is not None, "audit_rows": audited,
            **({"capped": int(capped.sum())} if capped is not None else {})})
        self.manifest["completed_query_blocks"] = q_block_start + n
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def finish(self, extra: dict | None = None) -> None:
        """Mark the trace complete and add `extra` top-level manifest entries; ``Trace.load(path,
        verify=False)`` then reads it without re-hashing (the hashes were just computed from the bytes
        written)."""
        if self.completed_query_blocks != self.shapes["num_query_blocks"]:
            raise ValueError(f"finish() after {self.completed_query_blocks} of "
                             f"{self.shapes['num_query_blocks']} query blocks; write the rest")
        self.manifest.update(check_extra(extra or {}), complete=True)
        atomic_write_json(self.path / MANIFEST, self.manifest)
