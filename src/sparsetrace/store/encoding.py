"""Trace math on stored rows: index and mass encodings, and counting kept (query, key) token pairs.

The one copy of each: the writer encodes, every reader (the Trace, the viewer, the report) decodes and
counts with these.
"""

from __future__ import annotations

import torch

# float16: round to nearest, relative error <= 2**-11 above 2**-14, absolute <= 2**-25 below.
FLOAT16_MAX_REL_ERROR = 2.0**-11
# log8: code 0 is exactly 0; code c in 1..255 is 2**(-24 * (255 - c) / 254), i.e. 2**-24 .. 1 in
# steps of 24/254 octave. Rounding in the log domain bounds the relative error by 2**(12/254) - 1
# (3.33 %); masses below 2**-25 become 0 (absolute error < 2**-25). Decoding does NOT renormalise
# rows: the bound then holds per entry and decoding is a table lookup; rows sum to 1 within 3.4 %.
LOG8_MAX_REL_ERROR = 2 ** (12 / 254) - 1
LOG8_TABLE = torch.cat([torch.zeros(1), torch.exp2(-24.0 * (255 - torch.arange(1, 256)) / 254)])




def index_dtype(num_key_blocks: int) -> torch.dtype:
    return torch.int16 if num_key_blocks <= torch.iinfo(torch.int16).max else torch.int32


def encode_mass(mass: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "float16":
        return mass.to(torch.float16)
    m = mass.to(torch.float32)
    code = torch.round(255 + torch.log2(m.clamp_min(2.0**-30)) * (254 / 24)).clamp_(1, 255)
    return torch.where(m < 2.0**-25, 0, code).to(torch.uint8)


def decode_mass(stored: torch.Tensor) -> torch.Tensor:
    if stored.dtype == torch.uint8:
        return LOG8_TABLE.to(stored.device)[stored.long()]
    return stored.float()


def _pairs_in_block(j: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block_k: int,
                    T: int) -> torch.Tensor:
    """Causal pairs between queries [a, b) and key block j = [s, e), width w: query q sees
    c(q) = clamp(q - s + 1, 0, w) of its keys, and sum_{q < t} c(q) = G(t) = r(r + 1)/2 +
    w * max(0, t - e) with r = clamp(t - s, 0, w); the pairs are G(b) - G(a)."""
    s = j * block_k
    e = (s + block_k).clamp(max=T)
    w = e - s

    def G(t):
        r = torch.minimum((t - s).clamp(min=0), w)
        return r * (r + 1) // 2 + w * (t - e).clamp(min=0)

    return G(b) - G(a)


def kept_pairs_per_row(indices: torch.Tensor, q_start: int, block_q: int, block_k: int,
                       T: int) -> torch.Tensor:
    """int64 [..., n]: causal (query, key) token pairs that each query block's kept blocks hold.

    Every kept block counts whole, (b - a) * width; only the few key blocks a query block
    overlaps (j from a // block_k to its diagonal block, at most ceil(block_q / block_k) + 1)
    lose pairs to causality, so those are looked up by value rather than computed per entry
    (a whole 1M-token layer is 6M entries)."""
    n = indices.shape[-2]
    qb = torch.arange(q_start, q_start + n)                               # [n]
    a, b = qb * block_q, ((qb + 1) * block_q).clamp(max=T)                # [n]
    last = -(-T // block_k) - 1
    w_last = T - last * block_k
    count = (indices >= 0).sum(-1)                                        # [..., n]
    has_last = (indices == last).any(-1)
    kept = (b - a) * (block_k * count - (block_k - w_last) * has_last)
    first, diag = a // block_k, (b - 1) // block_k                        # [n] each
    for d in range(-(-block_q // block_k) + 1):
        j = first + d                                                     # [n]
        ok = j <= diag
        whole = (b - a) * ((j + 1) * block_k).clamp(max=T) - (b - a) * j * block_k
        loss = torch.where(ok, whole - _pairs_in_block(j, a, b, block_k, T), 0)  # [n]
        kept = kept - loss * (indices == j[:, None].to(indices.dtype)).any(-1)
    return kept


def kept_pairs(indices: torch.Tensor, q_block_start: int, block_q: int, block_k: int, T: int) -> int:
    """Total causal (query, key) token pairs ``indices [..., n, k]`` keeps (rows start at query block
    ``q_block_start``)."""
    return int(kept_pairs_per_row(indices, q_block_start, block_q, block_k, T).sum())


def sparsity(kept_pairs: int, num_layers: int, num_heads: int, T: int) -> float:
    """1 - kept / causal (query, key) token pairs, of which each head has T(T+1)/2."""
    return 1.0 - kept_pairs / (num_layers * num_heads * T * (T + 1) // 2)


def block_sparsity(indices: torch.Tensor, block_q: int, block_k: int, T: int) -> float:
    """1 - kept / causal (query, key) token pairs of ``indices [L, H, nQ, k]`` over ``T`` tokens: the
    exact sparsity :attr:`Trace.sparsity` reports, for selections not (yet) in a trace."""
    return sparsity(kept_pairs(indices, 0, block_q, block_k, T), indices.shape[0], indices.shape[1], T)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
