"""On-disk trace store: write a trace chunk by chunk, resume after a crash, read it back lazily.

A trace directory (format version 1) holds::

    manifest.json            the index: meta, shapes, dtypes, one entry per shard (file, q-block
                             range, sha256, bytes, kept token pairs), sha256 of the side files, the
                             "complete" flag, and free top-level entries added later ("fidelity")
    tokens.safetensors       tokens int32 [T]; offsets int32 [T, 2] when character spans were given
    text.txt                 the traced text, utf-8 (only when given)
    shard-00000.safetensors  indices [L, H, n, k] (int16, or int32 past 32767 key blocks) and
    shard-00001.safetensors  mass [L, H, n, k] (float16, or uint8 "log8") for query blocks [a, a+n)

Every file is written atomically (temp file in the same directory, fsync, os.replace, fsync of the
directory), a shard before the manifest that lists it, so a killed run leaves a valid prefix plus
files the manifest does not list; those are ignored, and deleted when the run resumes.
Only safetensors and JSON are read: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

FORMAT, FORMAT_VERSION = "sparsetrace-trace", 1
MANIFEST, TOKENS_FILE, TEXT_FILE = "manifest.json", "tokens.safetensors", "text.txt"
_TMP_PREFIX = ".tmp-"
# Meta keys that may differ between a run and its resumption without making it another trace.
VOLATILE_META_KEYS = frozenset({
    "volatile", "created", "created_at", "timestamp", "elapsed_s", "wall_s", "host", "hostname",
    "run_id", "resumed", "device", "sparsetrace_version", "git_commit"})
SHAPE_KEYS = ("num_layers", "num_heads", "top_k", "num_tokens", "num_query_blocks",
              "num_key_blocks", "block_q", "block_k")
# Manifest keys the store manages; everything else is free for finish(extra) / update_manifest.
_RESERVED = frozenset({"format", "format_version", "fingerprint", "meta", "index_dtype",
                       "mass_encoding", "complete", "completed_query_blocks", "shards", "files",
                       *SHAPE_KEYS})

MASS_ENCODINGS = ("float16", "log8")
# float16: round to nearest, relative error <= 2**-11 above 2**-14, absolute <= 2**-25 below.
FLOAT16_MAX_REL_ERROR = 2.0**-11
# log8: code 0 is exactly 0; code c in 1..255 is 2**(-24 * (255 - c) / 254), i.e. 2**-24 .. 1 in
# steps of 24/254 octave. Rounding in the log domain bounds the relative error by 2**(12/254) - 1
# (3.33 %); masses below 2**-25 become 0 (absolute error < 2**-25). Decoding does NOT renormalise
# rows: the bound then holds per entry and decoding is a table lookup; rows sum to 1 within 3.4 %.
LOG8_MAX_REL_ERROR = 2 ** (12 / 254) - 1
_LOG8_TABLE = torch.cat([torch.zeros(1), torch.exp2(-24.0 * (255 - torch.arange(1, 256)) / 254)])


class TraceError(ValueError):
    """A trace directory is missing, corrupt, truncated or not a trace; message says which file
    and what to do."""


# --------------------------------------------------------------------------- atomic file writes

def _fsync_dir(directory: Path) -> None:
    if os.name == "posix":  # Windows cannot open a directory to fsync it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # honours umask, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _to_json(obj, what: str) -> str:
    try:  # strict JSON (no NaN) so any tool can read the manifest
        return json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-able (no NaN/inf, no tensors): {e}") from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, _to_json(obj, Path(path).name).encode())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256_files(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers, so threads hash shards in parallel.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(_sha256_file, paths))


# --------------------------------------------------------------------------- encodings, counts

def _index_dtype(num_key_blocks: int) -> torch.dtype:
    return torch.int16 if num_key_blocks <= torch.iinfo(torch.int16).max else torch.int32


def _encode_mass(mass: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "float16":
        return mass.to(torch.float16)
    m = mass.to(torch.float32)
    code = torch.round(255 + torch.log2(m.clamp_min(2.0**-30)) * (254 / 24)).clamp_(1, 255)
    return torch.where(m < 2.0**-25, 0, code).to(torch.uint8)


def _decode_mass(stored: torch.Tensor) -> torch.Tensor:
    return _LOG8_TABLE[stored.long()] if stored.dtype == torch.uint8 else stored.float()


def _kept_pairs(indices: torch.Tensor, q_block_start: int, block_q: int, block_k: int,
                T: int) -> int:
    """Exact number of causal (query, key) token pairs that `indices [..., n, k]` keeps.

    Query block i covers tokens [a, b), key block j covers [s, e) of width w (the last blocks are
    ragged at T). A key block with e <= a + 1 is seen whole by every query: (b - a) * w pairs.
    Only blocks with j >= (a + 1) // block_k (the diagonal: one or two per row) need the causal
    count sum_{q=a}^{b-1} clamp(q - s + 1, 0, w) = g(b) - g(a), with the prefix sum
    g(t) = r(r+1)/2 + w * max(0, t - e + 1), r = clamp(t - s, 0, w - 1).
    This runs on every written chunk, so the big tensor is touched by three cheap passes only.
    """
    n = indices.shape[-2]
    qb = torch.arange(q_block_start, q_block_start + n)                    # [n]
    a, b = qb * block_q, ((qb + 1) * block_q).clamp(max=T)                 # [n]
    last = -(-T // block_k) - 1
    w_last = T - last * block_k
    per_row = block_k * (indices >= 0).sum(-1) - (block_k - w_last) * (indices == last).sum(-1)
    kept = int(((b - a) * per_row).sum())                                  # all as if seen whole
    near = (indices >= ((a + 1) // block_k).to(indices.dtype)[:, None]).nonzero()  # [m, ndim]
    row, j = near[:, -2], indices[near.unbind(-1)].long()                  # [m], [m]
    a, b, s = a[row], b[row], j * block_k
    e = (s + block_k).clamp(max=T)
    w = e - s

    def g(t):
        r = torch.minimum((t - s).clamp(min=0), w - 1)
        return r * (r + 1) // 2 + w * (t - e + 1).clamp(min=0)

    return kept + int((g(b) - g(a) - (b - a) * w).sum())                   # diagonal corrected


def _sparsity(kept_pairs: int, num_layers: int, num_heads: int, T: int) -> float:
    """1 - kept / causal (query, key) token pairs, of which each head has T(T+1)/2."""
    return 1.0 - kept_pairs / (num_layers * num_heads * T * (T + 1) // 2)


def block_sparsity(indices: torch.Tensor, block_q: int, block_k: int, T: int) -> float:
    """1 - kept / causal (query, key) token pairs of ``indices [L, H, nQ, k]`` over ``T`` tokens: the
    exact sparsity :attr:`Trace.sparsity` reports, for selections not (yet) in a trace."""
    return _sparsity(_kept_pairs(indices, 0, block_q, block_k, T), indices.shape[0], indices.shape[1], T)


# --------------------------------------------------------------------------- writer

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
    `VOLATILE_META_KEYS`, shapes, mass encoding), the listed shards that still verify (size,
    sha256, contiguous) are kept, everything after the first bad one and any stray shard or temp
    file is deleted, and `completed_query_blocks` says where to continue. Any other non-empty
    directory raises TraceError before anything is touched. One writer per directory at a time.
    """

    def __init__(self, path, *, meta: dict, tokens: torch.Tensor,
                 token_offsets: torch.Tensor | None, text: str | None, num_layers: int,
                 num_heads: int, top_k: int, num_query_blocks: int, num_key_blocks: int,
                 mass_encoding: str = "float16"):
        self.path = Path(path)
        meta = json.loads(_to_json(meta, "meta"))  # a private copy, exactly as it will read back
        tokens = torch.as_tensor(tokens).reshape(-1).cpu()
        token_offsets = None if token_offsets is None else token_offsets.cpu()
        T = tokens.numel()
        if mass_encoding not in MASS_ENCODINGS:
            raise ValueError(f"mass_encoding={mass_encoding!r}; expected one of {MASS_ENCODINGS}")
        bq, bk = meta.get("block_q"), meta.get("block_k")
        if not (isinstance(bq, int) and isinstance(bk, int) and bq > 0 and bk > 0):
            raise ValueError(f"meta needs positive int block_q and block_k; got {bq!r}, {bk!r}")
        if T == 0 or num_query_blocks != -(-T // bq) or num_key_blocks != -(-T // bk):
            raise ValueError(f"{T} tokens at block_q={bq}, block_k={bk} make {-(-T // bq)} query "
                             f"and {-(-T // bk)} key blocks; got num_query_blocks="
                             f"{num_query_blocks}, num_key_blocks={num_key_blocks}")
        if token_offsets is not None and tuple(token_offsets.shape) != (T, 2):
            raise ValueError(f"token_offsets must be [{T}, 2]; got {list(token_offsets.shape)}")
        self.shapes = dict(zip(SHAPE_KEYS, (num_layers, num_heads, top_k, T, num_query_blocks,
                                            num_key_blocks, bq, bk), strict=True))
        self.index_dtype, self.mass_encoding = _index_dtype(num_key_blocks), mass_encoding
        fingerprint = _fingerprint(meta, {**self.shapes, "mass_encoding": mass_encoding},
                                   tokens, token_offsets, text)
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
            "mass_encoding": mass_encoding, "complete": False, "completed_query_blocks": 0,
            "shards": []}
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
            return _read_manifest(self.path)
        # Our temp files alone may be left by a run killed while writing its first manifest.
        leftovers = list(self.path.iterdir())
        if any(not p.name.startswith(_TMP_PREFIX) for p in leftovers):
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
        hashes = iter(_sha256_files([p for p, o in zip(paths, ok, strict=True) if o]))
        kept, pos = [], 0
        for s, o in zip(shards, ok, strict=True):
            if not (o and next(hashes) == s["sha256"] and s["q_blocks"][0] == pos):
                break
            kept.append(s)
            pos = s["q_blocks"][1]
        listed = {s["file"] for s in kept}
        for p in self.path.iterdir():
            if p.name.startswith(_TMP_PREFIX) or (p.name.startswith("shard-")
                                                  and p.name not in listed):
                p.unlink()
        self.manifest.update(shards=kept, completed_query_blocks=pos,
                             complete=self.manifest["complete"]
                             and pos == self.shapes["num_query_blocks"])

    @property
    def completed_query_blocks(self) -> int:
        return self.manifest["completed_query_blocks"]

    def write(self, q_block_start: int, indices: torch.Tensor, mass: torch.Tensor) -> None:
        """Append query blocks [q_block_start, q_block_start + n) of every layer and head:
        indices [L, H, n, k] any int dtype (-1 padded), mass [L, H, n, k] float (0 at padding)."""
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

        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        data = safetensors.torch.save(
            {"indices": indices.to(self.index_dtype).contiguous(),
             "mass": _encode_mass(mass, self.mass_encoding).contiguous()},
            metadata={"format": FORMAT, "q_block_start": str(q_block_start)})
        atomic_write_bytes(self.path / name, data)  # the shard lands before the manifest lists it
        kept = _kept_pairs(indices, q_block_start, self.shapes["block_q"], self.shapes["block_k"],
                           self.shapes["num_tokens"])
        self.manifest["shards"].append({
            "file": name, "q_blocks": [q_block_start, q_block_start + n],
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "kept_pairs": kept})
        self.manifest["completed_query_blocks"] = q_block_start + n
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def finish(self, extra: dict | None = None) -> Trace:
        """Mark the trace complete, add `extra` top-level manifest entries, return the Trace
        (loaded without re-hashing: the hashes were just computed from the bytes written)."""
        if self.completed_query_blocks != self.shapes["num_query_blocks"]:
            raise ValueError(f"finish() after {self.completed_query_blocks} of "
                             f"{self.shapes['num_query_blocks']} query blocks; write the rest")
        self.manifest.update(_check_extra(extra or {}), complete=True)
        atomic_write_json(self.path / MANIFEST, self.manifest)
        return Trace.load(self.path, verify=False)


def _check_extra(extra: dict) -> dict:
    if bad := sorted(set(extra) & _RESERVED):
        raise ValueError(f"manifest keys {bad} are managed by the store and cannot be set")
    return json.loads(_to_json(extra, "manifest entries"))


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path / MANIFEST} is unreadable or corrupt ({e}); rerun the trace into "
                         "a new --out directory.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TraceError(f"{path / MANIFEST} is not a sparsetrace manifest; pass a trace dir.")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise TraceError(f"{path} has trace format {manifest['format_version']}, newer than this "
                         f"sparsetrace reads ({FORMAT_VERSION}); upgrade sparsetrace.")
    return manifest


# --------------------------------------------------------------------------- reader

class Trace:
    """The block-sparse attention trace of one model over one token sequence.

    `trace[layer, head]` -> `(indices, mass)`, both `[nQ, top_k]`, for one layer and QUERY head:
      - `indices` int32: KEY-BLOCK indices (not token indices) kept for each query block; key block
        j covers tokens `[j*block_k, (j+1)*block_k)`. Rows are sorted ascending, unique, padded
        with -1 at the END (short rows only where fewer than top_k key blocks are causal).
      - `mass` float32: for each kept block, the softmax probability that the model, running with
        this sparse mask, put on the block's keys, averaged over the block's queries. Rows sum to
        1; 0 at the -1 padding.
    Axis 0 is the QUERY-BLOCK axis: row i covers tokens `[i*block_q, (i+1)*block_q)`, absolute
    positions from token 0 (the chunked prefill that produced the trace does not show here).
    `trace.layer(l)` gives all heads of a layer at once, `[H, nQ, top_k]`.

    Footguns:
      - -1 is a valid torch index (the LAST block): mask it (`idx[idx >= 0]`) before indexing.
      - Indices are blocks: tokens of block j are `j*block_k ...`; block_q may differ from block_k,
        and the last query and key blocks are ragged when T is not a multiple of the block size.
      - The diagonal block is listed whole, but attention inside it is causal (see `sparsity`).
      - Heads are QUERY heads: with GQA, heads sharing a kv head still have rows of their own.
      - On disk, indices are int16 (int32 past 32767 key blocks) and mass float16 (relative error
        2**-11) or "log8" (3.3 %, rows not renormalised); reads always give int32 / float32.
      - Reads are lazy (memory-mapped shards) and uncached: keep tensors you reuse.
    Other attributes: `tokens` int64 [T]; `token_offsets` int64 [T, 2] character spans into
    `text`, or None; `text`; `meta` (alias `config`: the tracer's meta plus shapes); `manifest`;
    `fidelity`; `path` (None in memory); `num_layers`, `num_heads`, `num_tokens`,
    `num_query_blocks`, `num_key_blocks`, `top_k`, `block_q`, `block_k`; `sparsity`, `nbytes`,
    `dense_bytes`.
    """

    def __init__(self, manifest: dict, tokens: torch.Tensor, token_offsets, text, *, path=None,
                 shards=(), arrays=None):
        # Use Trace.load or Trace.from_arrays; this just binds what they checked.
        self.manifest, self.path = manifest, path
        self.tokens, self.token_offsets, self.text = tokens, token_offsets, text
        self._shards = list(shards)  # [(safe_open handle, q_start, q_end)] for a trace on disk
        self._arrays = arrays        # (indices int32, mass float32) [L, H, nQ, k] in memory
        for key in SHAPE_KEYS:
            setattr(self, key, manifest[key])
        self.meta = {**manifest["meta"], **{k: manifest[k] for k in SHAPE_KEYS},
                     "mass_encoding": manifest["mass_encoding"]}
        self.config = self.meta

    @classmethod
    def load(cls, path, *, verify: bool = True) -> Trace:
        """Open a finished trace directory. File sizes and shard headers are always checked;
        `verify` also checks every sha256 (reads all bytes once: ~0.5 s per GB; False opens a
        1M-token trace in about 0.1 s)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise TraceError(f"{path} has no {MANIFEST}: not a trace directory (or its run died "
                             "before writing anything); pass the --out directory of a trace.")
        m = _read_manifest(path)
        if not m.get("complete"):
            raise TraceError(f"{path} holds an incomplete trace ({m.get('completed_query_blocks')}"
                             f" of {m.get('num_query_blocks')} query blocks): the run was "
                             "interrupted; rerunning the same command with the same --out "
                             "resumes it.")
        fix = "rerunning the same trace command with the same --out recomputes the damaged part."
        files = [(name, e["bytes"], e["sha256"]) for name, e in m["files"].items()]
        files += [(s["file"], s["bytes"], s["sha256"]) for s in m["shards"]]
        for name, size, _ in files:
            p = path / name
            if not p.is_file():
                raise TraceError(f"{p} is missing but listed in {MANIFEST}; {fix}")
            if p.stat().st_size != size:
                raise TraceError(f"{p} is truncated or damaged ({p.stat().st_size} bytes, "
                                 f"{MANIFEST} says {size}); {fix}")
        if verify:
            hashes = _sha256_files([path / name for name, _, _ in files])
            for (name, _, want), got in zip(files, hashes, strict=True):
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
            shards.append((f, a, b))
            pos = b
        if pos != m["num_query_blocks"]:
            raise TraceError(f"{path / MANIFEST} covers {pos} of {m['num_query_blocks']} query "
                             f"blocks; {fix}")
        tok = safetensors.torch.load_file(path / TOKENS_FILE)
        offsets = tok["offsets"].long() if "offsets" in tok else None
        text = (path / TEXT_FILE).read_text(encoding="utf-8") if TEXT_FILE in m["files"] else None
        return cls(m, tok["tokens"].long(), offsets, text, path=path, shards=shards)

    @classmethod
    def from_arrays(cls, indices: torch.Tensor, mass: torch.Tensor, *, meta: dict,
                    tokens: torch.Tensor, token_offsets: torch.Tensor | None = None,
                    text: str | None = None) -> Trace:
        """An in-memory trace from whole `[L, H, nQ, k]` arrays; `save` writes it to disk."""
        tokens = torch.as_tensor(tokens).reshape(-1).long().cpu()
        bq, bk, T = meta.get("block_q"), meta.get("block_k"), tokens.numel()
        if not (isinstance(bq, int) and isinstance(bk, int) and indices.dim() == 4
                and indices.shape == mass.shape and indices.shape[2] == -(-T // bq)):
            raise ValueError(f"need indices and mass [L, H, nQ = ceil(T / block_q), k] and int "
                             f"meta block_q/block_k; got {list(indices.shape)}, "
                             f"{list(mass.shape)}, T={T}, block_q={bq}, block_k={bk}")
        L, H, nQ, k = indices.shape
        shapes = (L, H, k, T, nQ, -(-T // bk), bq, bk)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "meta": json.loads(_to_json(meta, "meta")),
                    **dict(zip(SHAPE_KEYS, shapes, strict=True)), "mass_encoding": "float32",
                    "complete": True, "shards": []}
        offsets = None if token_offsets is None else token_offsets.long().cpu()
        arrays = (indices.detach().cpu().to(torch.int32), mass.detach().cpu().float())
        return cls(manifest, tokens, offsets, text, arrays=arrays)

    def save(self, path, *, mass_encoding: str = "float16",
             chunk_query_blocks: int = 4096) -> None:
        """Write a complete trace directory (through TraceWriter, so it resumes too)."""
        writer = TraceWriter(path, meta=self.manifest["meta"], tokens=self.tokens,
                             token_offsets=self.token_offsets, text=self.text,
                             num_layers=self.num_layers, num_heads=self.num_heads,
                             top_k=self.top_k, num_query_blocks=self.num_query_blocks,
                             num_key_blocks=self.num_key_blocks, mass_encoding=mass_encoding)
        every = slice(None)
        for a in range(writer.completed_query_blocks, self.num_query_blocks, chunk_query_blocks):
            q = slice(a, min(a + chunk_query_blocks, self.num_query_blocks))
            writer.write(a, self._read("indices", every, every, q),
                         self._read("mass", every, every, q))
        writer.finish({k: v for k, v in self.manifest.items() if k not in _RESERVED})

    # -- reading

    def _read(self, name: str, layers, heads, q: slice) -> torch.Tensor:
        """`name[layers, heads, q]` as int32 / float32; the query-block axis is -2 of the result."""
        if self._arrays is not None:  # clone: callers may modify what they get
            return self._arrays[0 if name == "indices" else 1][layers, heads, q].clone()
        a, b, _ = q.indices(self.num_query_blocks)
        parts = [f.get_slice(name)[layers, heads, max(a, s) - s:min(b, e) - s]
                 for f, s, e in self._shards if s < b and e > a]  # memory-mapped reads
        out = torch.cat(parts, dim=-2)
        return out.to(torch.int32) if name == "indices" else _decode_mass(out)

    def _check(self, i, n: int, what: str) -> int:
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"{what} {i} out of range for a trace with {n} {what}s "
                             f"(valid: {-n}..{n - 1})")
        return i % n

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

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int32 [H, nQ, k], mass float32 [H, nQ, k]): all heads of one layer."""
        li = self._check(layer, self.num_layers, "layer")
        return (self._read("indices", li, slice(None), slice(None)),
                self._read("mass", li, slice(None), slice(None)))

    # -- summaries

    @property
    def fidelity(self) -> dict | None:
        return self.manifest.get("fidelity")

    def update_manifest(self, **extra) -> None:
        """Atomically add or replace top-level JSON-able manifest entries (fidelity, analysis
        results); shards are untouched. An in-memory trace keeps them for `save`."""
        extra = _check_extra(extra)
        if self.path is not None:
            on_disk = _read_manifest(self.path)  # re-read: keep what others added meanwhile
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
        return entries * (_index_dtype(self.num_key_blocks).itemsize + 2) + tokens

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense float16 causal attention pattern: L * H * T(T+1)/2 * 2 bytes."""
        T = self.num_tokens
        return self.num_layers * self.num_heads * T * (T + 1) // 2 * 2

    @property
    def sparsity(self) -> float:
        """1 - kept / causal (query, key) TOKEN pairs, over all layers and heads. The pair (q, x)
        is kept when x <= q and x's key block is in the row of q's query block; there are
        T(T+1)/2 causal pairs per head. Exact: causal inside diagonal blocks, ragged last blocks."""
        if self._arrays is not None:
            return block_sparsity(self._arrays[0], self.block_q, self.block_k, self.num_tokens)
        kept = sum(s["kept_pairs"] for s in self.manifest["shards"])  # counted per shard when written
        return _sparsity(kept, self.num_layers, self.num_heads, self.num_tokens)

    def __repr__(self) -> str:
        model = self.meta.get("model_id") or self.meta.get("model") or "?"
        if isinstance(model, dict):  # the tracer stores a model summary dict under "model"
            model = model.get("architecture") or model.get("name_or_path") or "?"
        where = "on disk" if self.path is not None else "in memory"
        return (f"Trace(model={model}, tokens={self.num_tokens}, layers={self.num_layers}, "
                f"heads={self.num_heads}, blocks {self.block_q}x{self.block_k}, "
                f"top_k={self.top_k}, sparsity={self.sparsity:.2f}, {_human(self.nbytes)} "
                f"{where} vs {_human(self.dense_bytes)} dense)")


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
