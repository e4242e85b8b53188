"""End-to-end GPU trace of real architectures with random weights: 1M tokens through a Qwen2.5-1.5B-shaped
model and 128k through a Gemma-3-1B-shaped one (sliding-window + global layers), chunked prefill with a KV
cache, the trace written to disk. Timing and memory do not depend on weight values.

Run on the GPU machine:  PYTHONPATH=src python bench/gpu_trace.py --out-dir /tmp/traces --json out.json
Prints a table and ends with one JSON line. ``--tiny`` runs small shapes on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

from sparsetrace.config import TraceConfig
from sparsetrace.tracing.tracer import trace_ids


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


def run(name: str, config, tokens: int, trace_config: TraceConfig, out_dir: Path, device: str) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (tokens,))
    out = out_dir / name
    shutil.rmtree(out, ignore_errors=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trace = trace_ids(model, ids, trace_config, out=out, model_id=f"{name} (random weights)", progress=True)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    row = {
        "model": name, "tokens": tokens, "layers": trace.num_layers, "heads": trace.num_heads,
        "block": trace_config.block_size, "top_k": trace_config.top_k, "chunk": trace_config.chunk_size,
        "wall_s": round(wall, 1), "peak_gpu_gib": round(peak, 2), "sparsity": round(trace.sparsity, 5),
        "trace_bytes": trace.nbytes, "dense_fp16_bytes": trace.dense_bytes,
        "bytes_ratio": round(trace.dense_bytes / trace.nbytes),
    }
    del model, trace
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/sparsetrace-gpu-traces"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu_trace.json"))
    parser.add_argument("--qwen-tokens", type=int, default=1 << 20)
    parser.add_argument("--gemma-tokens", type=int, default=1 << 17)
    parser.add_argument("--chunk", type=int, default=1 << 16)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a script check)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    trace_config = TraceConfig.of(block_size=64, top_k=16, chunk_size=args.chunk)
    if args.tiny:
        args.qwen_tokens, args.gemma_tokens = 2048, 1024
        trace_config = TraceConfig.of(block_size=64, top_k=8, chunk_size=512)
    rows = [
        run("qwen2.5-1.5b-shape", qwen25_1_5b(args.tiny), args.qwen_tokens, trace_config, args.out_dir, device),
        run("gemma-3-1b-shape", gemma3_1b(args.tiny), args.gemma_tokens, trace_config, args.out_dir, device),
    ]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\ndevice: {device_name}, torch {torch.__version__}")
    print("| model | tokens | wall s | peak GPU GiB | sparsity | trace MB | dense fp16 TB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['wall_s']} | {r['peak_gpu_gib']} | {r['sparsity']} | "
              f"{r['trace_bytes'] / 1e6:.0f} | {r['dense_fp16_bytes'] / 1e12:.1f} | {r['bytes_ratio']:,} |")
    result = {"device": device_name, "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
