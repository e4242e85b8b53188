"""How sparse can STREAM attention be while the model still says the same thing?

For each model (SmolLM2-135M, Gemma 3 270M), text (Paul Graham essays; chain-of-thought: GSM-style
problems as question + step-by-step reasoning in the tokenizer's chat format, concatenated) and length,
binary-search the smallest top_k (block 32, 1 sink, 1 local block) that meets the two-greedy-tokens
criterion (sparsetrace.fidelity.search_k), and report its block sparsity, top-1 agreement and
KL(dense||sparse) over the last 64 positions, plus every probe.

    python bench/fidelity_study.py --lengths 1k,2k,4k [--models smollm2-135m,gemma-3-270m]

Prints a table and ends with one JSON line; results go to bench/results/fidelity.json, merged with what
is there (cases already measured with the same settings are skipped); while a run lasts each finished case
is kept in bench/results/fidelity.parts/, so a killed run resumes. Under
``torchrun --standalone --nproc-per-node N bench/fidelity_study.py ... [--device cuda]`` the N processes
share the cases and write the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsetrace import load_model
from sparsetrace.config import TraceConfig
from sparsetrace.datasets.essays import haystack_text
from sparsetrace.datasets.gsm import gsm_problems
from sparsetrace.datasets.ruler import parse_length
from sparsetrace.runs.fidelity import search_k
from sparsetrace.runs.ranks import Ranks
from sparsetrace.tracing.tracer import tokenize

RESULTS = Path(__file__).parent / "results" / "fidelity.json"
TEXTS = ("haystack", "cot")


def chat_turns(tokenizer, question: str, answer: str) -> str:
    """One problem as a user / assistant exchange: the tokenizer's chat template, or Gemma's turn
    markup for the base Gemma 3 tokenizer (it ships none). Each problem is its own chat here, unlike
    ``sparsetrace.data.chat_text`` (one conversation); kept so that all lengths of the study were
    measured on the same kind of text."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return (f"<start_of_turn>user\n{question}<end_of_turn>\n"
            f"<start_of_turn>model\n{answer}<end_of_turn>\n")


def cot_ids(tokenizer, n_tokens: int, problems_of=None) -> torch.Tensor:
    """The first ``n_tokens`` of ``gsm_problems(n, seed=0)`` as chats, for the smallest n in 8, 16, ...
    that is long enough. ``problems_of(n)`` replaces ``gsm_problems`` (problems saved to a file)."""
    problems_of = problems_of or (lambda n: gsm_problems(n, seed=0))
    parts, ids, n = [], None, 8
    while ids is None or ids.shape[0] < n_tokens:
        problems = problems_of(n)
        parts = [chat_turns(tokenizer, p["question"], p["reasoning"]) for p in problems]
        ids, _ = tokenize(tokenizer, "".join(parts))
        n *= 2
    return ids[:n_tokens]


def text_ids(tokenizer, text: str, n_tokens: int, problems_of=None) -> torch.Tensor:
    """``n_tokens`` ids of the text, after a BOS where the tokenizer adds one by default (Gemma)."""
    bos = tokenizer("x")["input_ids"][:1]
    bos = bos if bos == [tokenizer.bos_token_id] else []
    body = n_tokens - len(bos)
    if text == "cot":
        ids = cot_ids(tokenizer, body, problems_of)
    else:
        ids, _ = tokenize(tokenizer, haystack_text(n_tokens * 8), max_tokens=body)
    assert ids.shape[0] == body, f"{text} too short for {n_tokens} tokens"
    return torch.cat([torch.tensor(bos, dtype=torch.long), ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--texts", default=",".join(TEXTS))
    ap.add_argument("--lengths", default="1k,2k,4k")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--last-n", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cpu", help="run the models here (cpu, cuda)")
    ap.add_argument("--gsm-json", type=Path, default=None,
                    help="read the gsm problems from this file instead of reasoning-gym (for a machine "
                         "without it); write it with --write-gsm-json")
    ap.add_argument("--write-gsm-json", type=Path, default=None, metavar="FILE",
                    help="save gsm_problems(n, seed=0) for n = 8, 16, ..., 512 to FILE and exit")
    args = ap.parse_args()
    if args.write_gsm_json is not None:
        saved = {str(n): gsm_problems(n, seed=0) for n in (8, 16, 32, 64, 128, 256, 512)}
        args.write_gsm_json.write_text(json.dumps(saved) + "\n")
        return
    saved = json.loads(args.gsm_json.read_text()) if args.gsm_json is not None else None
    problems_of = (lambda n: saved[str(n)]) if saved is not None else None
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    models = args.models.split(",")
    texts = args.texts.split(",")
    config = TraceConfig.of(block_size=args.block_size, chunk_size=1024)

    with Ranks.from_env() as ranks:
        device = ranks.device(args.device)
        done = json.loads(args.out.read_text())["cases"] if args.out.exists() else []
        have = {(c["model"], c["text"], c["n_tokens"], c["block_size"]) for c in done}
        # length-major: a partial run covers every model at the short lengths
        grid = [(T, name, text) for T in lengths for name in models for text in texts
                if (name, text, T, args.block_size) not in have]
        loaded = {}

        def run_one(i: int) -> dict:
            T, name, text = grid[i]
            if name not in loaded:
                model, tokenizer = load_model(name)
                loaded[name] = model.to(device), tokenizer
            model, tokenizer = loaded[name]
            ids = text_ids(tokenizer, text, T, problems_of)
            start = time.perf_counter()
            case = {"model": name, "text": text, "n_tokens": T, "block_size": args.block_size,
                    "num_key_blocks": -(-T // args.block_size),
                    "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}
            try:
                found = search_k(model, ids, config, last_n=args.last_n, model_id=name)
                r = found.result
                case.update(top_k=found.top_k, sparsity=r.sparsity,
                            sparsity_full_layers=r.sparsity_full_layers,
                            top1_agreement=r.top1_agreement, kl=r.kl, kl_max=r.kl_max,
                            dense_tokens=list(r.dense_tokens), probes=list(found.probes),
                            error=None)
            except ValueError as err:  # k_max fails, or memory: recorded, the sweep goes on
                case.update(top_k=None, error=str(err))
            case["seconds"] = round(time.perf_counter() - start, 1)
            print(ranks.tag + row(case), flush=True)
            return case

        def merge(cases: list[dict]) -> None:
            done.extend(cases)  # in grid order, whichever rank ran them
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"cases": done}, indent=1) + "\n")

        # one part file per case while the sweep runs: a killed run (any number of ranks) resumes
        ranks.sweep([f"{name}|{text}|{T}|block{args.block_size}" for T, name, text in grid], run_one,
                    args.out.with_suffix(".parts"), merge=merge,
                    settings={"last_n": args.last_n, "gsm_json": str(args.gsm_json or "")}, log=print)
        if not ranks.main:
            return
    print()
    print(HEADER)
    for c in sorted(done, key=lambda c: (c["model"], c["text"], c["n_tokens"])):
        print(row(c))
    print(json.dumps({"bench": "fidelity_study", "cases": [
        {k: c.get(k) for k in ("model", "text", "n_tokens", "top_k", "sparsity", "kl")}
        for c in done]}))


HEADER = (f"{'model':14s} {'text':8s} {'tokens':>6s} {'blocks':>6s} {'min k':>5s} {'sparsity':>8s} "
          f"{'full-lay':>8s} "
          f"{'top-1':>6s} {'KL mean':>9s} {'KL max':>9s} {'probes':>6s} {'s':>6s}")


def row(c: dict) -> str:
    if c.get("top_k") is None:
        return f"{c['model']:14s} {c['text']:8s} {c['n_tokens']:6d}  error: {c['error']}"
    return (f"{c['model']:14s} {c['text']:8s} {c['n_tokens']:6d} {c['num_key_blocks']:6d} "
            f"{c['top_k']:5d} {c['sparsity']:8.4f} "
            f"{c.get('sparsity_full_layers') or c['sparsity']:8.4f} {c['top1_agreement']:6.3f} {c['kl']:9.2e} "
            f"{c['kl_max']:9.2e} {len(c['probes']):6d} {c['seconds']:6.0f}")


if __name__ == "__main__":
    main()
