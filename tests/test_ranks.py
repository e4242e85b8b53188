"""Studies over ranks (``sparsetrace.runs.ranks``): sharing, merge order, resume after a kill, settings.

In one process, and under ``torchrun --nproc-per-node 2`` (gloo, both ranks on the CPU) with a plain case
function, so the mechanics are checked in seconds; tests/test_niah.py runs the niah command itself over two
ranks on the real model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import child_env

from sparsetrace.errors import UsageError
from sparsetrace.runs.ranks import Ranks, part_path

KEYS = [f"case-{i}|k=8" for i in range(7)]


def square(i: int) -> dict:
    return {"i": i, "square": i * i, "pair": (i, -i), "nan": float("nan") if i == 3 else 0.5}


def test_one_process_merges_in_order_and_removes_the_parts(tmp_path):
    parts, merged = tmp_path / "parts", []
    with Ranks() as ranks:
        results = ranks.sweep(KEYS, square, parts, merge=merged.extend, settings={"k": 8})
    assert [r["i"] for r in merged] == list(range(7)) and results == merged
    assert merged[2]["pair"] == [2, -2]  # through JSON: tuples come back as lists
    assert not parts.exists()


def test_killed_sweep_resumes_without_rerunning_finished_cases(tmp_path):
    parts, ran = tmp_path / "parts", []

    def dies_at_4(i):
        if i == 4:
            raise KeyboardInterrupt  # what a kill looks like from inside
        ran.append(i)
        return square(i)

    with pytest.raises(KeyboardInterrupt), Ranks() as ranks:
        ranks.sweep(KEYS, dies_at_4, parts, settings={"k": 8})
    assert ran == [0, 1, 2, 3] and all(part_path(parts, KEYS[i]).is_file() for i in ran)
    ran.clear()

    def counted(i):
        ran.append(i)
        return square(i)

    merged = []
    with Ranks() as ranks:
        ranks.sweep(KEYS, counted, parts, merge=merged.extend, settings={"k": 8})
    assert ran == [4, 5, 6]
    assert [r["i"] for r in merged] == list(range(7))


def test_other_settings_are_refused_and_none_is_left_for_later(tmp_path):
    parts = tmp_path / "parts"
    with Ranks() as ranks:  # case 5 returns None (a time budget): not saved, not merged
        got = ranks.sweep(KEYS, lambda i: None if i == 5 else square(i), parts, settings={"k": 8})
    assert [r["i"] for r in got] == [0, 1, 2, 3, 4, 6]
    with pytest.raises(KeyboardInterrupt), Ranks() as ranks:
        ranks.sweep(KEYS, lambda i: (_ for _ in ()).throw(KeyboardInterrupt), parts, settings={"k": 8})
    with pytest.raises(UsageError, match=r"other settings \(k\); rerun it with the same options"):
        Ranks().sweep(KEYS, square, parts, settings={"k": 16})


def test_rank_device_and_tag():
    assert Ranks().device("cuda") == "cuda" and Ranks().tag == ""
    two = Ranks(rank=1, world=2, local_rank=1)
    assert two.device("cpu") == "cpu" and two.tag == "rank 1/2: " and not two.main
    if torch.cuda.device_count() >= 2:
        assert two.device("cuda") == "cuda:1"


SCRIPT = """
import json, sys
from pathlib import Path
from sparsetrace.runs.ranks import Ranks

out = Path(sys.argv[1])
keys = [f"case-{i}|k=8" for i in range(7)]
with Ranks.from_env() as ranks:
    def run_one(i):
        with open(out / f"ran-{ranks.rank}.txt", "a") as f:
            f.write(f"{i}\\n")
        return {"i": i, "square": i * i}
    def merge(results):
        (out / "merged.json").write_text(json.dumps(results))
    ranks.sweep(keys, run_one, out / "parts", merge=merge, settings={"k": 8})
"""


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port, one host) of this interpreter's environment."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=child_env())


@pytest.mark.slow
def test_two_ranks_under_torchrun_share_the_cases_and_resume(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    done = subprocess.run([sys.executable, str(script), str(one)], capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr
    # a killed earlier run left cases 0 and 5: two ranks share the other five, round robin
    (two / "parts").mkdir()
    for i in (0, 5):
        part = {"key": KEYS[i], "result": {"i": i, "square": i * i}}
        part_path(two / "parts", KEYS[i]).write_text(json.dumps(part))
    run = torchrun(2, str(script), str(two))
    assert run.returncode == 0, run.stderr[-2000:]
    ran = {r: sorted(int(x) for x in (two / f"ran-{r}.txt").read_text().split()) for r in (0, 1)}
    print("cases run per rank:", ran)
    assert ran == {0: [1, 3, 6], 1: [2, 4]}
    assert (two / "merged.json").read_bytes() == (one / "merged.json").read_bytes()
    assert not (two / "parts").exists()


def test_gpus_and_commands_under_torchrun_are_checked(tmp_path, monkeypatch, capsys):
    """One GPU per process; a device map (one model over the GPUs) and torchrun's processes do not mix; a
    command that does not share its work refuses to run N times over."""
    import argparse

    from sparsetrace.cli import main
    from sparsetrace.commands.options import placement

    if torch.cuda.device_count() < 2:
        with pytest.raises(UsageError, match="no GPU of its own"):
            Ranks(rank=1, world=2, local_rank=1).device("cuda")
    args = argparse.Namespace(device=None, device_map="auto")
    with pytest.raises(UsageError, match="--device-map spreads one model over the GPUs, but 2 processes"):
        placement(args, Ranks(rank=0, world=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    text = tmp_path / "t.txt"
    text.write_text("Some text to trace, a few words long.")
    assert main(["trace", "--text-file", str(text), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "only niah shares its work over torchrun's processes" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()
