"""Studies over ranks: a sweep's cases in one process, or shared by N processes under ``torchrun``.

    torchrun --standalone --nproc-per-node N -m sparsetrace.cli niah ...     # or a bench script

One process (no ``WORLD_SIZE`` in the environment, or 1) touches no ``torch.distributed`` at all. Under
torchrun (world size, rank and local rank from its environment) rank r runs every N-th case still to do,
on ``cuda:<local rank>`` when the study runs on the GPU. Only a broadcast of the case list and barriers cross
ranks (gloo, on the CPU: no tensor ever does), so the same code runs on CPU-only and GPU machines.

Every finished case is written at once to its own JSON file in a parts folder (atomically, as the store
writes shards), so a killed sweep resumes: a case with a part file is not rerun, whatever the number of
ranks of either run. When every rank is done the main rank reads the parts back in the sweep's order,
calls ``merge(results)`` (which writes the files a single process writes: the same rows in the same
order), then removes those parts (and the folder once no other case's part is left in it). A part folder
remembers the settings of its sweep; a rerun with other settings is refused rather than mixing results.

Footguns: results go through JSON (tuples come back as lists, tensors must be turned into lists by the
caller); ``run_one`` may return None to leave a case for a later run (a time budget), which is then not
saved and not merged.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..store import atomic_write_bytes

SETTINGS = "settings.json"
# Ranks that finish early wait at the final barrier for the slowest; a sweep may take days.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the study: ``rank`` of ``world`` (``local_rank`` on its host)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (one process without them)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))

    @property
    def main(self) -> bool:
        """Whether this process writes the merged results (rank 0)."""
        return self.rank == 0

    @property
    def tag(self) -> str:
        """A log prefix: ``""`` for one process, ``"rank 1/2: "`` under torchrun."""
        return "" if self.world == 1 else f"rank {self.rank}/{self.world}: "

    def device(self, device: str) -> str:
        """The device this rank runs on: ``"cuda"`` becomes ``cuda:<local rank>`` under torchrun (one GPU
        per process; more processes on a host than GPUs is refused)."""
        if device != "cuda" or self.world == 1:
            return device
        import torch

        gpus = torch.cuda.device_count()
        if self.local_rank >= gpus:
            raise UsageError(f"process {self.local_rank} on this host has no GPU of its own ({gpus} GPUs); start "
                             "at most one process per GPU (torchrun --nproc-per-node).")
        return f"cuda:{self.local_rank}"

    def __enter__(self) -> Ranks:
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=BARRIER_TIMEOUT)
        return self

    def __exit__(self, *exc) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def sweep(self, keys: list[str], run_one: Callable[[int], object], parts: Path, *,
              merge: Callable[[list], None] | None = None, settings: dict | None = None,
              log: Callable[[str], None] | None = None) -> list | None:
        """Run ``run_one(i)`` for this rank's share of the cases ``keys[i]`` without a part file, save each
        result in ``parts``, wait for every rank, and on the main rank call ``merge`` with the results of
        all cases in the order of ``keys`` (cases left for later, by a None, are not in it) and remove
        their parts. Returns those results on the main rank, None on the others.

        Must be called inside ``with ranks:`` by every rank with the same ``keys`` and ``settings``.
        """
        assert len(set(keys)) == len(keys), "sweep keys must be unique"
        parts = Path(parts)
        check_settings(parts, settings)  # every rank, before any collective: a refusal ends them all alike
        todo = None
        if self.main:
            parts.mkdir(parents=True, exist_ok=True)
            if settings is not None and not (parts / SETTINGS).exists():
                _write_atomic(parts / SETTINGS, settings)
            todo = [i for i, key in enumerate(keys) if read_part(parts, key) is None]
            if log is not None and len(todo) < len(keys):
                log(f"resuming: {len(keys) - len(todo)} of {len(keys)} cases already done in {parts}")
        todo = self._broadcast(todo)
        for i in todo[self.rank::self.world]:
            result = run_one(i)
            if result is not None:
                _write_atomic(part_path(parts, keys[i]), {"key": keys[i], "result": result})
        self._barrier()
        if not self.main:
            return None
        results = [r for r in (read_part(parts, key) for key in keys) if r is not None]
        if merge is not None:
            merge([r["result"] for r in results])
        for r in results:  # merged: the parts are no longer needed
            part_path(parts, r["key"]).unlink()
        if all(p.name == SETTINGS for p in parts.glob("*.json")):
            shutil.rmtree(parts, ignore_errors=True)  # parts of other cases (another grid) are kept
        return [r["result"] for r in results]

    def _broadcast(self, value):
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def part_path(parts: Path, key: str) -> Path:
    """The part file of case ``key``: a readable stem plus a hash of the whole key."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return parts / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.json"


def read_part(parts: Path, key: str) -> dict | None:
    """``{"key", "result"}`` of a finished case, or None (no file; a rename makes a file whole or absent)."""
    path = part_path(parts, key)
    if not path.is_file():
        return None
    part = json.loads(path.read_text(encoding="utf-8"))
    assert part["key"] == key, f"{path} holds case {part['key']!r}, not {key!r}"
    return part


def check_settings(parts: Path, settings: dict | None) -> None:
    """Refuse to resume ``parts`` written by a sweep with other settings (one sentence)."""
    saved = parts / SETTINGS
    if settings is None or not saved.is_file():
        return
    theirs = json.loads(saved.read_text(encoding="utf-8"))
    ours = json.loads(json.dumps(settings))  # compare as JSON reads them back
    if theirs != ours:
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise UsageError(f"{parts} holds the unfinished cases of a sweep with other settings ({', '.join(changed)}); "
                         "rerun it with the same options, or delete that folder to start over.")


def _write_atomic(path: Path, data) -> None:
    """JSON (NaN allowed: results may hold it) through the store's atomic write: a killed write leaves no part."""
    atomic_write_bytes(path, (json.dumps(data) + "\n").encode())
