"""The public operations and the one place that chooses their implementation.

``stream_mask`` / ``shortlist_mask`` / ``oracle_mask`` / ``select_blocks`` pick key blocks;
``sparse_attention`` attends over them.
Each takes ``impl``:

- ``"auto"``: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise;
- ``"torch"``: the vectorised implementation (``selection.stream``, ``selection.shortlist``,
  ``selection.oracle``, ``attention.blockwise``), the CPU path and the reference of every other path;
- ``"triton"``: the GPU kernels (``sparsetrace.kernels``, imported here lazily and nowhere else);
- ``"reference"``: the plain-loop / dense float64 references (``selection.reference``,
  ``attention.dense``), tiny inputs only.

When a GPU kernel cannot take an input (block sizes under 16, an unusual dtype or head dim) the call falls
back to torch with one warning per reason; that rule lives here and nowhere else. GPU kernels run with the
inputs' GPU made current (Triton launches on the current device): a model spread over several GPUs by a
device map calls these with each layer's tensors on that layer's GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch

from .attention.blockwise import check_qkv, sparse_attention_torch
from .attention.dense import sparse_attention_reference
from .config import MaskConfig
from .errors import UsageError
from .selection.blocks import BlockMask, check_qk
from .selection.oracle import oracle_select
from .selection.reference import oracle_reference, shortlist_reference, stream_reference
from .selection.shortlist import shortlist_select
from .selection.stream import hierarchical_search, stream_select

IMPLS = ("auto", "torch", "triton", "reference")
REFERENCES = {"stream": stream_reference, "shortlist": shortlist_reference, "oracle": oracle_reference}
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """One warning per distinct degraded path, not one per layer and chunk."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """``impl`` with ``"auto"`` made concrete for ``tensor``'s device."""
    if impl not in IMPLS:
        raise UsageError(f"impl={impl!r} is not one of {IMPLS}.")
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return impl


def on_device(tensor: torch.Tensor):
    """Context that makes ``tensor``'s CUDA device the current one (nothing for CPU tensors)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
                  window: int | None = None, impl: str = "auto", input_end: int | None = None) -> BlockMask:
    """Key blocks kept per query block under ``config`` (its ``estimator`` says which selection).

    Args:
        q: post-RoPE queries ``[B, Hq, T, D]`` (the last T of S positions).
        k: post-RoPE keys ``[B, Hkv, S, D]``; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        config: the estimator and its knobs.
        scale: logit scale of the ``"lse"`` score, default ``D ** -0.5``.
        window: the layer's sliding window (None = global). With a window the candidates are the blocks
            the window reaches, no sinks are forced and the search picks ``top_k - local_blocks``.
        impl: see the module docstring.
        input_end: the position after the input's last token (default S: q ends the input, as a whole
            prefill, its last chunk or a decode step do). SHORTLIST scores exactly the query blocks that hold
            the input's last ``EXACT_TAIL`` tokens; a chunk inside a prefill passes the input's end, so that
            rows do not depend on where chunks end. Other estimators ignore it.
    Returns:
        :class:`BlockMask` with int32 ``indices [B, Hq, nQ, top_k]``, rows sorted, unique, -1 padded.
    """
    check_qk(q, k)
    impl = resolve_impl(impl, q)
    if impl == "reference":
        if config.estimator == "shortlist":
            return shortlist_reference(q, k, config, scale=scale, window=window, input_end=input_end)
        return REFERENCES[config.estimator](q, k, config, scale=scale, window=window)
    if config.estimator == "oracle":  # O(T * S) by definition: no GPU kernel, torch on any device
        return oracle_select(q, k, config, scale=scale, window=window)
    if config.estimator == "shortlist":
        rescore = _gpu_rescorer(q, k, config, scale, window) if impl == "triton" else None
        with on_device(q):
            return shortlist_select(q, k, config, scale=scale, window=window, rescore=rescore,
                                    input_end=input_end)
    if impl == "triton":
        scorer = _gpu_scorer(q, k, config, scale, window)
        with on_device(q):
            return hierarchical_search(q, k, config, window, scorer)
    return stream_select(q, k, config, scale=scale, window=window)


def _triton_unsupported(q, config: MaskConfig) -> str | None:
    """Why the Triton scorer cannot take these tiles (None when it can)."""
    from .kernels import tiles

    reason = tiles.triton_supported(config.block_q, config.block_k, q.shape[-1])
    if reason is None and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reason = f"dtype {q.dtype}"
    if reason is None and not q.is_cuda:
        reason = f"{q.device} tensors"
    if reason is not None:
        warn_once(f"sparsetrace: Triton scorer not used ({reason}); scoring in torch.")
    return reason


def _gpu_scorer(q, k, config: MaskConfig, scale: float | None, window: int | None):
    """``score_halves(starts, ends)`` for the hierarchical search on CUDA: the Triton kernel, or the chunked
    torch scorer (with one warning) for sizes and dtypes the kernel does not take."""
    from .kernels import scoring

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.to(q.dtype)
    score = scoring.score_halves if _triton_unsupported(q, config) is None else scoring.score_halves_torch
    return lambda starts, ends: score(q, k, starts, ends, config, scale, window)


def _gpu_rescorer(q, k, config: MaskConfig, scale: float | None, window: int | None):
    """``rescore(q, block_ids, sizes)`` for SHORTLIST's step 4 on CUDA: the Triton kernel, or None (the torch tile
    scorer, with one warning) for sizes and dtypes the kernel does not take."""
    from .kernels import scoring

    if _triton_unsupported(q, config) is not None:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.to(q.dtype)
    return lambda q, block_ids, sizes: scoring.score_blocks(q, k, block_ids, config, scale, window, sizes=sizes)


def audit_scanner(q: torch.Tensor, config: MaskConfig, impl: str = "auto"):
    """The dense pass of the exact audit (``audit.exact.audit_rows``'s ``scan``) for ``q``'s device: the fused
    Triton scan on CUDA, or None (the torch scan) on the CPU and for tiles the kernel does not take."""
    if resolve_impl(impl, q) != "triton" or _triton_unsupported(q, config) is not None:
        return None
    from .kernels import audit

    def scan(q, k, rows, kept, config, scale, window):
        with on_device(q):
            return audit.audit_scan(q, k.to(q.dtype), rows, kept, config, scale, window)

    return scan


def estimate_pieces(q: torch.Tensor, block_q: int, samples: int, head: int = 0, impl: str = "auto"):
    """The per-row estimate's heavy steps for ``q``'s device, as ``(draw_blocks, sample_rows, keys_in_blocks)``
    (``audit.estimate.Pieces``; None for a step that runs in torch): the fused Triton ones on CUDA, None
    elsewhere. The sample step and the keys' draw run in torch, with one warning, for shapes their kernels do not
    take."""
    if resolve_impl(impl, q) != "triton":
        return None
    from .kernels import estimate

    def draw_blocks(scores, lo, n, indices, u, mix, need, head=0):
        with on_device(scores):
            return estimate.block_draw(scores, lo, n, indices, u, mix, need, head)

    def sample_rows(q, k, pos, weight, exact, lam, first, scale, window, z, m, per_query, head=0):
        with on_device(q):
            return estimate.sample_rows(q, k.to(q.dtype), pos, weight, exact, lam, first, scale, window, z, m,
                                        per_query, head)

    def keys_in_blocks(q_mean, k_blocks, blk, p_block, S, scale, mix, u):
        with on_device(q_mean):
            return estimate.keys_in_blocks(q_mean, k_blocks, blk, p_block, S, scale, mix, u)

    reason = estimate.sample_supported(q, samples, block_q, head)
    if reason is not None:
        warn_once(f"sparsetrace: the estimate's fused sample step not used ({reason}); sampling in torch.")
        return draw_blocks, None, None
    return draw_blocks, sample_rows, keys_in_blocks


def _config(config: MaskConfig | None, options: dict, estimator: str) -> MaskConfig:
    if config is not None and options:
        raise UsageError(f"pass either config or options {sorted(options)}, not both.")
    names = {f.name for f in dataclasses.fields(MaskConfig)}
    if unknown := set(options) - names:
        raise TypeError(f"unknown mask options {sorted(unknown)}; the options are {sorted(names)}.")
    config = config if config is not None else MaskConfig(**options)
    return dataclasses.replace(config, estimator=estimator)


def stream_mask(q: torch.Tensor, k: torch.Tensor, config: MaskConfig | None = None, *,
                scale: float | None = None, window: int | None = None, impl: str = "auto",
                **options) -> BlockMask:
    """STREAM's selection (the paper's hierarchical search): :func:`select_blocks` with
    ``estimator="stream"``. The knobs come as ``config`` or as :class:`MaskConfig` keyword options, e.g.
    ``stream_mask(q, k, block_q=32, block_k=32, top_k=8, sink_blocks=1, local_blocks=1)``."""
    return select_blocks(q, k, _config(config, options, "stream"), scale=scale, window=window, impl=impl)


def shortlist_mask(q: torch.Tensor, k: torch.Tensor, config: MaskConfig | None = None, *,
                   scale: float | None = None, window: int | None = None, impl: str = "auto",
                   **options) -> BlockMask:
    """SHORTLIST's selection (every candidate pre-scored from pooled keys, the best few rescored exactly;
    ``selection.shortlist``): :func:`select_blocks` with ``estimator="shortlist"``; same arguments as
    :func:`stream_mask`."""
    return select_blocks(q, k, _config(config, options, "shortlist"), scale=scale, window=window, impl=impl)


def oracle_mask(q: torch.Tensor, k: torch.Tensor, config: MaskConfig | None = None, *,
                scale: float | None = None, window: int | None = None, impl: str = "auto",
                **options) -> BlockMask:
    """The exact block top-k under STREAM's contract (forced blocks plus the m best middle blocks; O(T^2)):
    :func:`select_blocks` with ``estimator="oracle"``; same arguments as :func:`stream_mask`."""
    return select_blocks(q, k, _config(config, options, "oracle"), scale=scale, window=window, impl=impl)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, *,
                     scale: float | None = None, return_mass: bool = False, return_lse: bool = False,
                     window: int | None = None, impl: str = "auto"):
    """Softmax attention of ``q`` over the key blocks ``mask`` keeps (causal inside blocks).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` (GQA: head h reads kv head ``h // (Hq // Hkv)``).
        mask: from :func:`stream_mask` / :func:`oracle_mask` on these q, k.
        scale: logit scale, default ``D ** -0.5``.
        return_mass: also return the mass ``[B, Hq, nQ, top_k]`` float32: for each query block, the mean
            over its queries of the softmax probability falling in each kept block (rows sum to 1; 0 at -1).
            A query that sees no kept key at all (only possible with ``sink_blocks=0`` and a local
            window narrower than the query block) gets zero output and contributes zero mass.
        return_lse: also return float32 ``lse [B, Hq, T]``, the natural-log logsumexp of each query's scaled
            logits over its kept keys (-inf for a query that sees none): the normaliser the audit's
            missed-mass estimate divides by.
        window: sliding-window size of the layer (keys ``> position - window``), None = global.
        impl: see the module docstring.
    Returns:
        ``out [B, Hq, T, D]`` in q's dtype, or the tuple ``(out, mass)``, ``(out, lse)``, ``(out, mass, lse)``.
    """
    check_qkv(q, k, v, mask)
    impl = resolve_impl(impl, q)
    kwargs = dict(scale=scale, return_mass=return_mass, return_lse=return_lse, window=window)
    if impl == "reference":
        return sparse_attention_reference(q, k, v, mask, **kwargs)
    if impl == "triton":
        from .kernels import flex

        reason = flex.flex_unsupported(q, mask)
        if reason is None:
            with on_device(q):
                return _flex_attention(q, k, v, mask, **kwargs)
        warn_once(f"sparsetrace: FlexAttention path not used ({reason}); running the torch path.")
    return sparse_attention_torch(q, k, v, mask, **kwargs)


def _flex_attention(q, k, v, mask: BlockMask, *, scale, return_mass: bool, return_lse: bool, window):
    """FlexAttention, then the block masses from its logsumexp (Triton, or torch for tiles it cannot take)."""
    from .kernels import flex, tiles

    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    want_lse = return_mass or return_lse
    result = flex.flex_attention_lse(q, k, v, mask, scale=scale, window=window, return_lse=want_lse)
    if not want_lse:
        return result
    out, lse = result
    results = [out]
    if return_mass:
        k = k.to(q.dtype)
        mass_pass = flex.block_mass if tiles.triton_supported(mask.block_q, mask.block_k, D) is None \
            else flex.block_mass_torch
        results.append(mass_pass(q, k, lse, mask.indices, mask.block_q, mask.block_k, scale, window))
    if return_lse:
        results.append(lse.float())
    return tuple(results)
