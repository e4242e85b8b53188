"""Synthetic traces for the viewer's tests, demos and benchmarks (no model needed).

Rows follow the trace contract (sorted, unique, -1 padded, sink block 0 and the diagonal block
forced, causal) and each (layer, head) gets a character so the pictures are not all alike: its
middle picks lean towards the start of the context (``shape > 1``) or towards the diagonal
(``shape < 1``), and its mass leans on the sink, the diagonal or the middle. Written chunk by
chunk through :class:`~sparsetrace.store.TraceWriter`, so a 1M-token trace never sits in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..store import Trace, TraceWriter

_WORDS = """
    the model reads a long text and every head keeps a few blocks of keys for each block of queries
    while the sink and the diagonal are always kept so the trace stays small needle haystack answer
    number city secret
""".split()


def synthetic_text(num_tokens: int, seed: int = 0) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(text, tokens int64 [T], offsets int64 [T, 2]): one word per token, a sentence every ~12."""
    g = torch.Generator().manual_seed(seed)
    word_ids = torch.randint(len(_WORDS), (num_tokens,), generator=g).tolist()
    stops = (torch.rand(num_tokens, generator=g) < 1 / 12).tolist()
    parts, offsets, pos = [], [], 0
    for w, stop in zip(word_ids, stops, strict=True):
        piece = _WORDS[w] + (". " if stop else " ")
        offsets.append((pos, pos + len(_WORDS[w]) + (1 if stop else 0)))
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), torch.tensor(word_ids, dtype=torch.long) + 1000, torch.tensor(offsets)


def synthetic_rows(q_start: int, n: int, *, num_layers: int, num_heads: int, top_k: int,
                   block_q: int, block_k: int, num_tokens: int, seed: int = 0):
    """(indices int32, mass float32), both [L, H, n, k], for query blocks [q_start, q_start+n)."""
    L, H, k = num_layers, num_heads, top_k
    g = torch.Generator().manual_seed(seed * 1_000_003 + q_start)
    head_g = torch.Generator().manual_seed(seed)                      # same per-head character
    shape = torch.exp(1.2 * torch.randn(L, H, 1, 1, generator=head_g))  # [L, H, 1, 1]
    w_sink, w_diag = torch.rand(2, L, H, 1, generator=head_g) * 4      # [L, H, 1] each
    qb = torch.arange(q_start, q_start + n)                            # [n]
    last = ((qb + 1) * block_q).clamp(max=num_tokens) - 1
    causal = last // block_k + 1                                       # [n] key blocks per row
    m = k - 2
    u = torch.rand(L, H, n, m, generator=g).pow(shape).sort(-1).values   # [L, H, n, m]
    span = (causal - 2 - m).clamp(min=0)[:, None]                      # [n, 1]
    middle = 1 + torch.arange(m) + (u * span).floor().long()           # [L, H, n, m], increasing
    full = torch.cat([torch.zeros(L, H, n, 1, dtype=torch.long), middle,
                      (causal - 1)[:, None].expand(L, H, n, 1)], -1)   # [L, H, n, k]
    short = torch.arange(k).expand(L, H, n, k)
    short = torch.where(short < causal[:, None], short, -1)           # all causal blocks, padded
    indices = torch.where((causal > k)[:, None], full, short)
    weight = -torch.log(torch.rand(L, H, n, k, generator=g).clamp_min(1e-9))  # Exp(1)
    weight[..., 0] += w_sink
    is_diag = indices == (causal - 1)[:, None]
    weight = weight + is_diag * w_diag[..., None]
    weight = torch.where(indices >= 0, weight ** 2, 0.0)
    mass = weight / weight.sum(-1, keepdim=True)
    return indices.to(torch.int32), mass.float()


def write_synthetic_trace(path, *, num_tokens: int, num_layers: int = 4, num_heads: int = 3,
                          top_k: int = 16, block_size: int = 32, chunk_blocks: int = 1024,
                          seed: int = 0, with_text: bool = True, progress: bool = False,
                          mass_encoding: str = "float16"):
    """Write (or finish writing: TraceWriter resumes) a synthetic trace directory; return it."""
    text, tokens, offsets = synthetic_text(num_tokens, seed) if with_text else (
        None, torch.arange(num_tokens) % 50000, None)
    nb = -(-num_tokens // block_size)
    mask = {"block_q": block_size, "block_k": block_size, "top_k": top_k, "sink_blocks": 1, "local_blocks": 1}
    meta = {"model_id": "synthetic", "model": {"architecture": "synthetic"},
            "trace_config": {"mask": mask}, "synthetic_seed": seed}
    w = TraceWriter(Path(path), meta=meta, tokens=tokens, token_offsets=offsets, text=text,
                    num_layers=num_layers, num_heads=num_heads, top_k=top_k, block_q=block_size,
                    block_k=block_size, mass_encoding=mass_encoding)
    for a in range(w.completed_query_blocks, nb, chunk_blocks):
        n = min(chunk_blocks, nb - a)
        idx, mass = synthetic_rows(a, n, num_layers=num_layers, num_heads=num_heads, top_k=top_k,
                                   block_q=block_size, block_k=block_size,
                                   num_tokens=num_tokens, seed=seed)
        w.write(a, idx, mass)
        if progress:
            print(f"\r  wrote query blocks {a + n}/{nb}", end="", flush=True)
    if progress:
        print()
    w.finish()
    return Trace.load(path, verify=False)
