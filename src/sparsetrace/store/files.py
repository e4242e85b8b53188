"""Atomic, durable file writes and content hashes: what makes a killed run leave no half-written file.

Every file is written to a temp file in the same directory, fsynced, renamed over the target and the
directory fsynced, so readers see the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TMP_PREFIX = ".tmp-"


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
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}"
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


def to_json(obj, what: str) -> str:
    try:  # strict JSON (no NaN) so any tool can read the manifest
        return json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-able (no NaN/inf, no tensors): {e}") from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, to_json(obj, Path(path).name).encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers, so threads hash shards in parallel.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))
