"""GPU kernels: the STREAM tile scorer (Triton) and block-sparse attention (FlexAttention + a Triton mass pass).

Imported lazily and only by ``sparsetrace.ops`` when a tensor is on CUDA, so CPU installs never import
Triton. The kernels depend only on the shared block operations (``sparsetrace.selection.blocks``); which
kernel runs, and the fallback to torch when one cannot, is decided in ``sparsetrace.ops``.

``tiles``    Triton helpers both kernels use (load a query tile, a logit tile, reduce it; supported sizes)
``scoring``  ``score_halves``: the block score of every half's representative, one program per query block
``flex``     ``flex_attention_lse`` (FlexAttention over the kept blocks) and ``block_mass`` (the mass pass)
``audit``    ``audit_scan``: the exact audit's dense pass over every causal key of the audited rows, fused
``estimate`` ``block_draw``, ``keys_in_blocks``, ``sample_rows``: the per-row estimate's heavy steps, fused

Results equal their CPU references (indices up to float32 score ties; attention and masses within the
input dtype's tolerance); ``bench/gpu_check.py`` checks this on a GPU (docs/gpu.md).
"""

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - only on CUDA machines without Triton
    raise ImportError(
        "sparsetrace.kernels needs Triton, which ships with CUDA builds of PyTorch; install one "
        "(pip install torch --index-url https://download.pytorch.org/whl/cu126) or use impl='torch'."
    ) from error
