"""Fidelity: does the pruned model still say the same thing?

The sparse run (STREAM attention, :func:`sparsetrace.tracer.sparse_model`) and the dense run (the model's
own attention, sdpa) see the same tokens through the same chunked prefill (:func:`chunked_forward`), and
are compared three ways:

- **the criterion** (after the STREAM paper): the dense model's next two greedy tokens after the input
  equal the sparse model's. Token 1 is the argmax of the last position's logits; it is appended and
  token 2 decoded by continuing the run's own KV cache (the sparse model decodes sparsely);
- **top-1 agreement**: over the last ``last_n`` input positions, how often the argmax next tokens match;
- **KL(dense || sparse)** of the next-token distributions at those positions, mean and max (nats).

They are reported with the block **sparsity** of the sparse run: the exact fraction of causal
(query, key) token pairs the masks pruned, over all layers and heads (:attr:`Trace.sparsity` of the
trace recorded during the sparse run; decode steps are not counted).

:func:`search_k` binary-searches the smallest ``top_k`` (block size fixed) that meets the criterion.
Footgun: the criterion is not monotone in k (a larger k can flip a near-tie the smaller k got right), so
binary search *assumes* monotonicity; every probe is reported so the assumption can be checked, and the
k returned is only guaranteed to pass itself, not to be the global minimum.

Memory: both runs hold a KV cache of the whole input and, per chunk, attention scores of ``chunk_size``
queries against every key (sdpa on CPU may materialise them). :func:`dense_memory_bytes` estimates that
conservatively and :func:`dense_reference` refuses, with the numbers, when it exceeds available RAM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..config import TraceConfig
from ..errors import UsageError
from ..store import Trace, block_sparsity
from ..tracing.backend import sparse_model
from ..tracing.forward import greedy_decode
from ..tracing.tracer import join_chunks, model_summary

DEFAULT_LAST_N = 64


@dataclass(frozen=True)
class FidelityResult:
    """One sparse-vs-dense comparison. ``kl`` is the mean KL(dense || sparse) in nats over the last
    ``last_n`` positions, ``kl_max`` its max; ``sparsity`` the exact pruned fraction of causal pairs
    over all layers and heads, ``sparsity_full_layers`` the same over the layers without a sliding
    window only (Gemma 3: 3 of 18; equal to ``sparsity`` for models without sliding layers). Pairs
    are counted against the full causal triangle even on sliding layers, so there ``sparsity``
    includes what the window itself already drops."""

    criterion_passed: bool
    top_k: int
    block_size: int
    sparsity: float
    top1_agreement: float
    kl: float
    kl_max: float
    dense_tokens: tuple[int, int]
    sparse_tokens: tuple[int, int]
    n_tokens: int
    last_n: int
    model_id: str = ""
    trace_config: dict = field(default_factory=dict)
    sparsity_full_layers: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_tokens"], d["sparse_tokens"] = list(self.dense_tokens), list(self.sparse_tokens)
        return d


@dataclass(frozen=True)
class SearchResult:
    """The smallest passing ``top_k`` binary search found, the check at that k, and every probe made
    (in order) as ``{"top_k", "criterion_passed", "sparsity", "top1_agreement", "kl", "kl_max"}``."""

    top_k: int
    result: FidelityResult
    probes: tuple[dict, ...]
    k_min: int
    k_max: int

    @property
    def sparsity(self) -> float:
        return self.result.sparsity

    def to_dict(self) -> dict:
        """The check at the found k (same keys as :meth:`FidelityResult.to_dict`) plus ``search``."""
        return {
            **self.result.to_dict(),
            "search": {
                "k_min": self.k_min,
                "k_max": self.k_max,
                "method": "binary search; assumes the criterion is monotone in k, which it need "
                          "not be: a smaller k than the one found may also pass",
                "probes": [dict(p) for p in self.probes],
            },
        }


@dataclass(frozen=True)
class DenseReference:
    """The dense run's outputs that every comparison needs: ``logits`` float32 ``[last_n, V]`` of the
    last input positions and the two greedy ``tokens``. Compute once, reuse for many k."""

    logits: torch.Tensor
    tokens: tuple[int, int]
    n_tokens: int

    @property
    def last_n(self) -> int:
        return self.logits.shape[0]


# --------------------------------------------------------------------------- memory

def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dense_memory_bytes(model, n_tokens: int, chunk_size: int, last_n: int = DEFAULT_LAST_N) -> int:
    """A conservative estimate of the extra memory a dense chunked run over ``n_tokens`` needs.

    KV cache (every layer keeps all keys and values, float32 or wider) + per chunk the sdpa working
    set: three ``[Hq, chunk, S]`` float32 tensors (scores, probabilities, the expanded mask; the CPU
    math path materialises them) + GQA-repeated keys and values of one layer + the kept logits.
    Weights are already loaded and not counted.
    """
    s = model_summary(model)
    L, Hq, Hkv, D = s["num_layers"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
    width = max(4, next(model.parameters()).element_size())
    vocab = model.config.get_text_config().vocab_size
    S, c = n_tokens + 2, min(chunk_size, n_tokens)
    kv_cache = L * 2 * Hkv * S * D * width
    scores = 3 * Hq * c * S * 4
    repeated_kv = 2 * Hq * S * D * 4
    logits = (last_n + c) * vocab * 4
    return kv_cache + scores + repeated_kv + logits


def _check_memory(model, n_tokens: int, chunk_size: int, last_n: int,
                  available_bytes: int | None) -> None:
    available = available_memory_bytes() if available_bytes is None else available_bytes
    need = dense_memory_bytes(model, n_tokens, chunk_size, last_n)
    if available is not None and need > available:
        raise UsageError(
            f"the dense reference at {n_tokens} tokens needs about {need / 2**30:.2f} GiB (KV cache and "
            f"{min(chunk_size, n_tokens)}-query attention scores) but only {available / 2**30:.2f} GiB "
            "is available; lower --max-tokens or --chunk-size."
        )


# --------------------------------------------------------------------------- runs

def _greedy_two(model, input_ids: torch.Tensor, chunk_size: int, last_n: int, session=None):
    """Prefill ``input_ids``, keep the last ``last_n`` logits, decode two greedy tokens (no EOS stop:
    the criterion compares two tokens); with ``session``, also the prefill's trace chunks."""
    logits, tokens, chunks = greedy_decode(model, input_ids, 2, chunk_size=chunk_size,
                                           keep_logits=last_n, session=session, stop_at_eos=False)
    return logits, tuple(tokens), chunks


def _prepare(input_ids, block_size: int, last_n: int) -> tuple[torch.Tensor, int]:
    input_ids = torch.as_tensor(input_ids).flatten().long()
    T = input_ids.shape[0]
    if T < block_size:
        raise UsageError(
            f"the input has {T} tokens, fewer than one block of {block_size}: there is nothing to "
            f"prune; give at least {block_size} tokens (or a smaller --block-size)."
        )
    if not isinstance(last_n, int) or last_n <= 0:
        raise UsageError(f"last_n={last_n!r} must be a positive integer.")
    return input_ids, min(last_n, T)


def dense_reference(model, input_ids, *, chunk_size: int = 1024, last_n: int = DEFAULT_LAST_N,
                    block_size: int = 1, available_bytes: int | None = None) -> DenseReference:
    """Run ``model`` densely (its own attention, e.g. sdpa) over ``input_ids [T]``: the last
    ``min(last_n, T)`` logits and two greedy tokens. Refuses (ValueError) when the estimated memory
    exceeds ``available_bytes`` (default: MemAvailable)."""
    input_ids, last_n = _prepare(input_ids, block_size, last_n)
    _check_memory(model, input_ids.shape[0], chunk_size, last_n, available_bytes)
    logits, tokens, _ = _greedy_two(model, input_ids, chunk_size, last_n)
    return DenseReference(logits, tokens, input_ids.shape[0])


def _compare(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL, max KL) of next-token distributions ``[N, V]``; KL(dense || sparse)."""
    kls = []
    for d, s in zip(dense.split(16), sparse.split(16)):  # float64 rows, a few at a time
        p_log, q_log = d.double().log_softmax(-1), s.double().log_softmax(-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0.0))
    kl = torch.cat(kls)
    agree = (dense.argmax(-1) == sparse.argmax(-1)).double().mean()
    return float(agree), float(kl.mean()), float(kl.max())


def check(
    model,
    input_ids,
    config: TraceConfig | None = None,
    *,
    last_n: int = DEFAULT_LAST_N,
    dense: DenseReference | None = None,
    trace=None,
    model_id: str = "",
    available_bytes: int | None = None,
) -> FidelityResult:
    """Compare the sparse run of ``model`` on ``input_ids [T]`` with the dense run.

    Args:
        config: the sparse run's :class:`TraceConfig` (its ``chunk_size`` is used for both runs);
            default ``TraceConfig()``.
        last_n: positions at the end of the input whose next-token distributions are compared
            (clamped to T).
        dense: a :func:`dense_reference` of the same input to reuse (k search); computed if None.
        trace: a :class:`~sparsetrace.store.Trace` of this input and config (or its directory); the
            result is written into its manifest as ``fidelity``.
        available_bytes: memory available for the runs (default: MemAvailable); a run estimated to
            need more is refused with a ValueError.
    Returns:
        :class:`FidelityResult`.
    """
    config = TraceConfig() if config is None else config
    mask = config.mask
    input_ids, last_n = _prepare(input_ids, mask.block_q, last_n)
    T = input_ids.shape[0]
    if trace is not None:
        trace = _matching_trace(trace, input_ids, config)
    if dense is None:
        dense = dense_reference(model, input_ids, chunk_size=config.chunk_size, last_n=last_n,
                                block_size=mask.block_q, available_bytes=available_bytes)
    elif dense.n_tokens != T or dense.last_n < last_n:
        raise UsageError(f"the dense reference covers {dense.n_tokens} tokens and {dense.last_n} "
                         f"positions; this check needs {T} and {last_n}. Recompute it.")

    # The comparison reads only the kept blocks: no audit or missed-mass estimate (they change no output),
    # except under a coverage budget, whose cut of every row is made with the estimate.
    quiet = config.replace(audit_rate=0, missed_samples=config.missed_samples if mask.coverage else 0)
    with sparse_model(model, quiet) as session:
        logits, tokens, chunks = _greedy_two(model, input_ids, config.chunk_size, last_n, session)
    indices = join_chunks(chunks)["indices"]  # [L, H, nQ, top_k]
    sparsity = block_sparsity(indices, mask.block_q, mask.block_k, T)
    layer_types = model_summary(model)["layer_types"] or ["full_attention"] * indices.shape[0]
    full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
    full_sparsity = block_sparsity(indices[full], mask.block_q, mask.block_k, T) if full else None
    agree, kl, kl_max = _compare(dense.logits[-last_n:], logits[-last_n:])
    result = FidelityResult(
        criterion_passed=tokens == dense.tokens, top_k=mask.width, block_size=mask.block_q,
        sparsity=sparsity, top1_agreement=agree, kl=kl, kl_max=kl_max, dense_tokens=dense.tokens,
        sparse_tokens=tokens, n_tokens=T, last_n=last_n, model_id=model_id,
        trace_config=asdict(config), sparsity_full_layers=full_sparsity,
    )
    if trace is not None:
        trace.update_manifest(fidelity=result.to_dict())
    return result


def _matching_trace(trace, input_ids: torch.Tensor, config: TraceConfig | None):
    """The Trace (loaded if a path), after checking it is of this input (and config, when given)."""
    if not isinstance(trace, Trace):
        trace = Trace.load(trace, verify=False)
    if not torch.equal(trace.tokens, input_ids):
        raise UsageError(f"the trace at {trace.path} holds another input ({trace.num_tokens} tokens) "
                         f"than the {input_ids.shape[0]} tokens checked; check the trace's own text.")
    theirs = trace.trace_config
    if config is not None and theirs is not None and theirs.mask != config.mask:
        raise UsageError(f"the trace at {trace.path} was made with {asdict(theirs.mask)}, not "
                         f"{asdict(config.mask)}; check with the trace's settings so the result "
                         "describes it.")
    return trace


def _probe_summary(r: FidelityResult) -> dict:
    return {"top_k": r.top_k, "criterion_passed": r.criterion_passed, "sparsity": r.sparsity,
            "sparsity_full_layers": r.sparsity_full_layers,
            "top1_agreement": r.top1_agreement, "kl": r.kl, "kl_max": r.kl_max,
            "sparse_tokens": list(r.sparse_tokens)}


def search_k(
    model,
    input_ids,
    base_config: TraceConfig | None = None,
    *,
    k_min: int | None = None,
    k_max: int | None = None,
    last_n: int = DEFAULT_LAST_N,
    trace=None,
    model_id: str = "",
    available_bytes: int | None = None,
    on_probe=None,
) -> SearchResult:
    """Binary-search the smallest ``top_k`` (``base_config``'s block size and forced blocks fixed)
    whose sparse run meets the two-token criterion.

    ``k_min`` defaults to the smallest valid k (forced blocks + 1), ``k_max`` to the number of key
    blocks (keep everything; larger k are clamped to it). Assumes the criterion is monotone in k,
    which it need not be: the k returned passed its own probe, and ``probes`` lists every k tried.
    The dense reference is computed once. ``on_probe(result)`` is called after every probe.
    With ``trace`` (a Trace or directory of this input) the result goes into its manifest as
    ``fidelity_search``.

    Raises:
        ValueError: bad bounds, or ``k_max`` itself fails (raise ``k_max``).
    """
    base_config = TraceConfig() if base_config is None else base_config
    base = base_config.mask
    if base.coverage is not None:
        raise UsageError(f"the k search varies a fixed top_k, but the config has a coverage budget "
                         f"(coverage={base.coverage}); drop --coverage, or check one budget without --search-k.")
    floor = base.sink_blocks + base.local_blocks + 1
    input_ids, last_n = _prepare(input_ids, base.block_q, last_n)
    n_blocks = math.ceil(input_ids.shape[0] / base.block_k)
    k_min = floor if k_min is None else k_min
    k_max = n_blocks if k_max is None else min(k_max, max(n_blocks, k_min))
    if k_min < floor:
        raise UsageError(f"k_min={k_min} is below the {floor} blocks a selection needs (sink "
                         f"{base.sink_blocks} + local {base.local_blocks} + 1); "
                         f"raise --k-min to {floor}.")
    if k_min > k_max:
        raise UsageError(f"k_min={k_min} exceeds k_max={k_max}; give k_min <= k_max.")
    if trace is not None:
        trace = _matching_trace(trace, input_ids, None)
    dense = dense_reference(model, input_ids, chunk_size=base_config.chunk_size, last_n=last_n,
                            block_size=base.block_q, available_bytes=available_bytes)
    results: dict[int, FidelityResult] = {}
    probes: list[dict] = []

    def passes(k: int) -> bool:
        r = check(model, input_ids, base_config.replace(top_k=k), last_n=last_n, dense=dense,
                  model_id=model_id)
        results[k] = r
        probes.append(_probe_summary(r))
        if on_probe is not None:
            on_probe(r)
        return r.criterion_passed

    lo, hi = k_min, k_max  # invariant: the answer is in [lo, hi], k_max assumed to pass
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    if lo not in results and not passes(lo):  # only k_max can be unprobed here
        raise UsageError(
            f"the largest k tried, k_max={k_max}, fails the criterion (dense next tokens "
            f"{list(dense.tokens)}, sparse {list(results[lo].sparse_tokens)}); raise --k-max"
            + (" (it already keeps every block: dense and sparse differ only by float rounding)."
               if k_max >= n_blocks else f" (up to {n_blocks}, which keeps every block).")
        )
    found = SearchResult(top_k=lo, result=results[lo], probes=tuple(probes), k_min=k_min,
                         k_max=k_max)
    if trace is not None:
        trace.update_manifest(fidelity_search=found.to_dict())
    return found
