"""The trace directory format: file names, manifest keys, and reading a manifest.

A trace directory (format version 1) holds::

    manifest.json            the index: meta, shapes, dtypes, one entry per shard (file, q-block
                             range, sha256, bytes, kept token pairs), sha256 of the side files, the
                             "complete" flag, and free top-level entries added later ("fidelity")
    tokens.safetensors       tokens int32 [T]; offsets int32 [T, 2] when character spans were given
    text.txt                 the traced text, utf-8 (only when given)
    shard-00000.safetensors  indices [L, H, n, k] (int16, or int32 past 32767 key blocks) and
    shard-00001.safetensors  mass [L, H, n, k] (float16, or uint8 "log8") for query blocks [a, a+n)

Rows are ``-1``-padded at the end to the width k (``row_layout``). A trace made under a coverage budget
(manifest ``budget``: ``{"coverage": P, "min_k", "max_k"}``, with ``k = max_k``) has rows of different
lengths at that width, and its shards add ``capped`` bool [L, H, n]: rows whose whole max-k selection held
less than P by the estimate. Traces without ``budget`` (all older ones) keep k blocks wherever k are causal.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .files import to_json

FORMAT, FORMAT_VERSION = "sparsetrace-trace", 1
MANIFEST, TOKENS_FILE, TEXT_FILE = "manifest.json", "tokens.safetensors", "text.txt"
TMP_PREFIX = ".tmp-"
# Meta keys that may differ between a run and its resumption without making it another trace.
VOLATILE_META_KEYS = frozenset({
    "volatile", "created", "created_at", "timestamp", "elapsed_s", "wall_s", "host", "hostname",
    "run_id", "resumed", "device", "sparsetrace_version", "git_commit"})
SHAPE_KEYS = ("num_layers", "num_heads", "top_k", "num_tokens", "num_query_blocks",
              "num_key_blocks", "block_q", "block_k")
# Manifest keys the store manages; everything else is free for finish(extra) / update_manifest.
# How rows are stored: every row -1-padded at the end to the manifest's top_k (the one layout so far; the
# manifest names it so that a reader can refuse a layout it does not know).
ROW_LAYOUT = "padded"
RESERVED = frozenset({"format", "format_version", "fingerprint", "meta", "index_dtype", "row_layout",
                       "budget", "mass_encoding", "complete", "completed_query_blocks", "shards", "files",
                       *SHAPE_KEYS})



class TraceError(UsageError):
    """A trace directory is missing, corrupt, truncated or not a trace; message says which file
    and what to do."""


class TraceIndexError(UsageError, IndexError):
    """A layer, head or query block outside the trace (an IndexError too, as Python indexing raises)."""


def check_extra(extra: dict) -> dict:
    if bad := sorted(set(extra) & RESERVED):
        raise ValueError(f"manifest keys {bad} are managed by the store and cannot be set")
    return json.loads(to_json(extra, "manifest entries"))


def read_manifest(path: Path) -> dict:
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
    if manifest.get("row_layout", ROW_LAYOUT) != ROW_LAYOUT:
        raise TraceError(f"{path} stores rows as {manifest['row_layout']!r}, a layout this sparsetrace does not "
                         f"read (it reads {ROW_LAYOUT!r}); upgrade sparsetrace.")
    return manifest
