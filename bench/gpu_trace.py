"""End-to-end GPU trace of real architectures with random weights: 1M tokens through a Qwen2.5-1.5B-shaped
model, 128k through a Gemma-3-1B-shaped one (sliding-window + global layers) and 512k through a
Llama-3.1-8B-shaped one; chunked prefill with a KV cache, the trace written to disk. Timing and memory do not
depend on weight values.

Run on the GPU machine (prints a table, ends with one JSON line, merges its rows into --json):

    PYTHONPATH=src python bench/gpu_trace.py                                       # qwen 1M + gemma 128k
    PYTHONPATH=src python bench/gpu_trace.py --model llama-3.1-8b --tokens 524288  # one H200
    PYTHONPATH=src python bench/gpu_trace.py --model llama-3.1-8b --tokens 1048576 --device-map auto  # 2 GPUs

``--device-map auto`` builds the model on the CPU and spreads its decoder layers over every GPU PyTorch sees
(``sparsetrace.tracing.models.dispatch``: accelerate's balanced map), so each GPU holds its layers' KV cache;
Llama-3.1-8B's cache alone is 128 GiB at 1M tokens (bf16), more than one H200 holds beside the weights.
``--tiny`` runs shrunken shapes (2 layers for Llama) on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from sparsetrace.config import TraceConfig
from sparsetrace.tracing.models import dispatch, model_devices
from sparsetrace.tracing.tracer import device_name, trace_ids


def qwen25_1_5b(tiny: bool) -> Qwen2Config:
    """Qwen2.5-1.5B's shape: 28 layers, 12 q heads, 2 kv heads, head_dim 128."""
    if tiny:
        return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                           max_position_embeddings=32768)
    return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)


def gemma3_1b(tiny: bool) -> Gemma3TextConfig:
    """Gemma-3-1B's shape: 26 layers (5 sliding with window 512, then 1 global), 4 q heads, 1 kv head,
    head_dim 256."""
    if tiny:
        return Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                vocab_size=1000, sliding_window=64, max_position_embeddings=32768)
    return Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                            vocab_size=262144, sliding_window=512, max_position_embeddings=32768,
                            query_pre_attn_scalar=256)


def llama31_8b(tiny: bool) -> LlamaConfig:
    """Llama-3.1-8B's shape: 32 layers, 32 q heads, 8 kv heads, head_dim 128, hidden 4096, intermediate
    14336, vocab 128256, RoPE theta 500000 with Llama 3.1's frequency scaling (131072 positions)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if tiny:
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000,
                           max_position_embeddings=131072, rope_parameters=rope)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                       max_position_embeddings=131072, rope_parameters=rope, tie_word_embeddings=False)


# name -> (config builder, default tokens on the GPU, default tokens with --tiny)
MODELS = {
    "qwen2.5-1.5b": (qwen25_1_5b, 1 << 20, 2048),
    "gemma-3-1b": (gemma3_1b, 1 << 17, 1024),
    "llama-3.1-8b": (llama31_8b, 1 << 19, 1024),
}


def build(config, device: str, device_map: str | None):
    """Random weights (seed 0): built on ``device``, or on the CPU and spread over the GPUs by ``device_map``."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("cpu" if device_map else device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return dispatch(model, device_map) if device_map else model


# What a trace records beside its rows, and which selection: --modes runs the same input once per mode, in
# one process ("shortlist": the unaudited trace with SHORTLIST's selection instead of STREAM's; "coverage":
# the default trace under the recommended coverage budget P 0.95, at most 64 blocks a row, docs/fidelity.md).
MODES = {"unaudited": dict(audit_rate=0, missed_samples=0), "audit": dict(missed_samples=0),
         "audit+estimate": {}, "shortlist": dict(estimator="shortlist", audit_rate=0, missed_samples=0),
         "coverage": dict(coverage=0.95, max_k=64)}


def run(name: str, config, tokens: int, trace_config: TraceConfig, out_dir: Path, device: str,
        device_map: str | None = None, modes=("audit+estimate",)) -> list[dict]:
    start = time.perf_counter()
    model = build(config, device, device_map)
    build_s = time.perf_counter() - start
    ids = torch.randint(0, config.vocab_size, (tokens,))
    if len(modes) > 1:  # Triton and FlexAttention compile on first use: warm every mode up on two chunks
        for mode in modes:  # first, so the compile does not count in whichever mode runs first
            run_mode(model, name, config, ids[:2 * trace_config.chunk_size], trace_config.replace(**MODES[mode]),
                     out_dir, device_map, build_s)
    rows = [run_mode(model, name, config, ids, trace_config.replace(**MODES[mode]), out_dir, device_map, build_s)
            | {"mode": mode} for mode in modes]
    base = next((r["wall_s"] for r in rows if r["mode"] == "unaudited"), None)
    for r in rows:
        r["overhead_vs_unaudited"] = None if base is None else round(r["wall_s"] / base - 1, 4)
    del model
    return rows


def run_mode(model, name: str, config, ids: torch.Tensor, trace_config: TraceConfig, out_dir: Path,
             device_map: str | None, build_s: float) -> dict:
    from sparsetrace.analysis.audit import audit_summary

    tokens = ids.shape[0]
    gpus = [d for d in model_devices(model) if d.type == "cuda"]
    out = out_dir / f"{name}-{tokens}"
    shutil.rmtree(out, ignore_errors=True)
    for d in gpus:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    trace = trace_ids(model, ids, trace_config, out=out, model_id=f"{name}-shape (random weights)",
                      progress=True)
    for d in gpus:
        torch.cuda.synchronize(d)
    wall = time.perf_counter() - start
    peaks = [round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in gpus]
    row = {
        "model": f"{name}-shape", "tokens": tokens, "layers": trace.num_layers, "heads": trace.num_heads,
        "kv_heads": config.num_key_value_heads, "block": trace_config.mask.block_q, "top_k": trace_config.mask.top_k,
        "chunk": trace_config.chunk_size, "device": device_name(model), "device_map": device_map,
        "gpus": len(gpus), "build_s": round(build_s, 1), "wall_s": round(wall, 3),
        "peak_gpu_gib": round(sum(peaks), 2) if peaks else None, "peak_gpu_gib_per_device": peaks,
        "sparsity": round(trace.sparsity, 5), "trace_bytes": trace.nbytes,
        "dense_fp16_bytes": trace.dense_bytes, "bytes_ratio": round(trace.dense_bytes / trace.nbytes),
        "audit_rate": trace_config.audit_rate, "missed_samples": trace_config.missed_samples,
    }
    audit = audit_summary(trace)
    if audit is not None:
        row["audit"] = {key: audit[key] for key in ("missed_mean", "missed_p90", "recall_mean",
                                                    "interval_coverage", "estimated_missed_mean") if key in audit}
    del trace
    if gpus:
        torch.cuda.empty_cache()
    return row


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Earlier rows of ``path`` with this run's rows replacing those of the same model, length, device
    and device map (so a Llama run does not drop the Qwen and Gemma rows)."""
    def key(r):
        return r["model"], r["tokens"], r.get("device"), r.get("device_map"), r.get("mode")

    saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
    old = [{"device": f"cuda: {saved['device']}", **r} if "device" in saved else r for r in saved["rows"]]
    fresh = {key(r) for r in rows}
    return [r for r in old if key(r) not in fresh] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b,gemma-3-1b",
                        help=f"comma-separated, of {', '.join(MODELS)} (default: the first two)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per model (default: qwen 1M, gemma 128k, llama 512k; --tiny: 1-2k)")
    parser.add_argument("--device-map", choices=("auto", "balanced"), default=None,
                        help="spread the layers over every GPU PyTorch sees (accelerate's balanced map)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/sparsetrace-gpu-traces"))
    parser.add_argument("--json", type=Path, default=None,
                        help="rows merge into this file (default bench/results/gpu_trace.json; with --tiny "
                             "OUT_DIR/gpu_trace_tiny.json)")
    parser.add_argument("--chunk", type=int, default=1 << 16)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a script check)")
    parser.add_argument("--modes", default="audit+estimate",
                        help=f"comma-separated, of {', '.join(MODES)}: each traces the same input (the "
                             "overhead of the audit is measured against 'unaudited' in the same process)")
    args = parser.parse_args()
    names = args.model.split(",")
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f"--model {unknown[0]}: choose from {', '.join(MODELS)}")
    device = "cpu" if args.tiny else "cuda"
    if args.json is None:
        args.json = args.out_dir / "gpu_trace_tiny.json" if args.tiny else Path("bench/results/gpu_trace.json")
    trace_config = TraceConfig.of(block_size=64, top_k=16, chunk_size=args.chunk)
    if args.tiny:
        trace_config = TraceConfig.of(block_size=64, top_k=8, chunk_size=512)
    rows = []
    for name in names:
        builder, gpu_tokens, tiny_tokens = MODELS[name]
        tokens = args.tokens or (tiny_tokens if args.tiny else gpu_tokens)
        try:
            rows += run(name, builder(args.tiny), tokens, trace_config, args.out_dir, device, args.device_map,
                        args.modes.split(","))
        except torch.cuda.OutOfMemoryError as err:  # recorded as such; the other models still run
            print(f"{name} at {tokens} tokens: out of memory ({str(err).splitlines()[0][:200]})", flush=True)
            rows.append({"model": f"{name}-shape", "tokens": tokens, "device_map": args.device_map, "gpus": 0,
                         "device": f"cuda: {torch.cuda.get_device_name()}", "error": "out of memory"})
            torch.cuda.empty_cache()

    print(f"\ntorch {torch.__version__}")
    print("| model | tokens | device | mode | wall s | overhead | peak GPU GiB (per device) | sparsity | trace MB | "
          "dense fp16 TB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['tokens']} | {r['device']} | {r['error']} | | | | | |")
            continue
        peak = (f"{r['peak_gpu_gib']}" + (f" {r['peak_gpu_gib_per_device']}" if r["gpus"] > 1 else "")
                if r["gpus"] else "-")
        over = r.get("overhead_vs_unaudited")
        over = "-" if over is None else f"{100 * over:.1f} %"
        print(f"| {r['model']} | {r['tokens']} | {r['device']} | {r['mode']} | {r['wall_s']} | {over} | {peak} | "
              f"{r['sparsity']} | "
              f"{r['trace_bytes'] / 1e6:.1f} | "
              f"{r['dense_fp16_bytes'] / 1e12:.1f} | {r['bytes_ratio']:,} |")
    result = {"torch": torch.__version__, "rows": merge_rows(args.json, rows)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({"bench": "gpu_trace", "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
