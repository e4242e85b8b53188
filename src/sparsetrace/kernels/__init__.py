"""GPU paths of sparsetrace: the STREAM tile scorer (Triton) and block-sparse attention (FlexAttention).

Imported lazily, and only on CUDA code paths: ``sparsetrace.attention.sparse_attention(impl="auto")`` and
``sparsetrace.mask.stream_mask`` hand CUDA tensors over to the functions here. Nothing in this package is
imported by ``import sparsetrace`` or by CPU-only code, so CPU installs never need Triton.

    from sparsetrace.kernels import gpu_stream_mask, gpu_sparse_attention
    mask = gpu_stream_mask(q, k, MaskConfig(block_q=64, block_k=64, top_k=16))
    out, mass = gpu_sparse_attention(q, k, v, mask, return_mass=True)

Both give the same results as their CPU references (``mask.stream_mask``, ``attention.sparse_attention_torch``):
indices identical on float32 inputs up to ties of float32 scores; attention and masses within the tolerance
of the input dtype. ``bench/gpu_check.py`` checks this on a GPU; ``docs/gpu.md`` says how to run it.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - only on CUDA machines without Triton
    raise ImportError(
        "sparsetrace.kernels needs Triton, which ships with CUDA builds of PyTorch; install one "
        "(pip install torch --index-url https://download.pytorch.org/whl/cu126) or use impl='torch'."
    ) from error

from .attention import block_mass, block_mass_torch, flex_block_mask, gpu_sparse_attention
from .scoring import gpu_stream_mask, score_halves, score_halves_torch

__all__ = [
    "block_mass",
    "block_mass_torch",
    "flex_block_mask",
    "gpu_sparse_attention",
    "gpu_stream_mask",
    "score_halves",
    "score_halves_torch",
]
