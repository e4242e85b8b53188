"""The sparse attention backend, registered with transformers' ``AttentionInterface``.

The attention function is registered under the name ``"sparsetrace"`` (and a mask function under the
same name in ``AttentionMaskInterface`` that returns ``None``: our attention applies causality itself, so
the model never builds a ``[T, S]`` mask). Nothing in a model class is patched: :func:`sparse_model`
switches the model's ``attn_implementation`` to ``"sparsetrace"`` for the duration of a ``with`` block and
puts the active :class:`SparseSession` in a context variable, restoring both on exit, even on exceptions.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..audit.coverage import Covered, cover
from ..audit.estimate import estimate_missed
from ..audit.exact import audit_query_blocks, audit_rows, droppable_query_blocks
from ..config import TraceConfig
from ..ops import audit_scanner, estimate_pieces, select_blocks, sparse_attention
from ..selection.blocks import BlockMask

ATTN_NAME = "sparsetrace"

MaskEdit = Callable[[int, BlockMask], BlockMask]
# observe(layer, query, key, mask, scale, window): shown every layer's inputs and final selection
Observer = Callable[[int, torch.Tensor, torch.Tensor, BlockMask, "float | None", "int | None"], None]


def _estimate_slab(query: torch.Tensor) -> int:
    """Largest temporary of the per-row estimate (and a budget's cut), in floats. The CPU size keeps slabs
    cache-sized; on a GPU small slabs mean many small launches, and the estimate was launch-bound there
    (H200, 2026-12-02: 45 s at 128k with CPU-sized slabs; with 2**29, 12 ms a 64k-query chunk of the 1.5B
    shape at 128k, with 2**31 one slab a chunk, 6.6 ms and 3.4 GiB of temporaries)."""
    return 2**31 if query.is_cuda else 2**23


@dataclass
class SparseSession:
    """What the registered attention does while active: select, (optionally) edit, attend, record.

    The selection runs at ``config.mask.width``; under a coverage budget (``config.mask.coverage``) its rows
    are then cut to the budget (:func:`sparsetrace.audit.coverage.cover`) whether or not anything is
    recorded, so a traced run and an unrecorded one attend the same blocks. ``edit(layer, mask) -> mask``
    may change the selection before attention runs (e.g. suppress a sentence's key blocks); ``record``
    collects per layer, for the current chunk, the kept blocks and their masses and, as ``config`` asks,
    the estimated missed mass of every row and the exact audit of the chunk's audited rows.
    ``num_tokens`` (the whole input's length, set by the tracer) fixes which query blocks are audited:
    ``config.audit_rate`` of them, stratified over the input, the same for every layer. ``input_end``
    (the position after the input's last token, set by ``chunked_forward``) says where the input's tail
    is, whose query blocks SHORTLIST scores exactly, so rows do not depend on the chunking (None: every
    call ends its input).
    """

    config: TraceConfig
    edit: MaskEdit | None = None
    record: bool = True
    observe: Observer | None = None
    num_tokens: int | None = None
    input_end: int | None = None
    layers: dict[int, dict] = field(default_factory=dict)
    _audited: torch.Tensor | None = None

    def select(self, query: torch.Tensor, key: torch.Tensor, window: int | None,
               scale: float | None = None) -> tuple[BlockMask, Covered | None]:
        """The selection of one layer's chunk, and under a coverage budget the cut rows (``Covered``,
        whose ``mask`` is the selection then)."""
        mask = select_blocks(query, key, self.config.mask.search(), window=window, input_end=self.input_end)
        if self.config.mask.coverage is None:
            return mask, None
        first = (key.shape[2] - query.shape[2]) // self.config.mask.block_q
        covered = cover(query, key, mask, self.config.mask, scale=scale, window=window,
                        samples=self.config.missed_samples, first_query_block=first,
                        max_elements=_estimate_slab(query),
                        pieces=estimate_pieces(query, self.config.mask.block_q, self.config.missed_samples))
        return covered.mask, covered

    def audited_query_blocks(self) -> torch.Tensor:
        """The absolute query blocks of the input audited in every layer (empty without ``num_tokens``)."""
        if self._audited is None:
            T, mask = self.num_tokens, self.config.mask.search()  # rows droppable at the selection's width
            if not T or not self.config.audit_rate:
                self._audited = torch.zeros(0, dtype=torch.long)
            else:  # rows that keep every candidate have nothing to miss: start at the first that must drop
                droppable = droppable_query_blocks(T, T, mask).nonzero().flatten()
                first = int(droppable[0]) if len(droppable) else math.ceil(T / mask.block_q)
                self._audited = audit_query_blocks(math.ceil(T / mask.block_q), self.config.audit_rate,
                                                   first=first)
        return self._audited

    def record_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: BlockMask,
                     mass: torch.Tensor, lse: torch.Tensor | None, scale: float | None,
                     window: int | None, covered: Covered | None = None) -> None:
        """Keep what the trace holds of one layer's chunk (batch 0): rows, masses, the estimate, the audit
        (and under a coverage budget, ``covered``: which rows are capped; its estimate is the cut rows')."""
        config, (_, H, T, _), S = self.config, query.shape, key.shape[2]
        first = (S - T) // config.mask.block_q  # the chunk's first query block in the input
        record = {"indices": mask.indices[0], "mass": mass[0]}
        if covered is not None:
            record["capped"] = covered.capped[0]
        if covered is not None and covered.missed is not None:
            record["missed"] = covered.missed[0]
        elif config.missed_samples:
            record["missed"] = estimate_missed(query, key, mask.indices, config.mask, scale=scale, window=window,
                                               samples=config.missed_samples, kept_lse=lse,
                                               first_query_block=first, max_elements=_estimate_slab(query),
                                               pieces=estimate_pieces(query, config.mask.block_q,
                                                                      config.missed_samples))[0]
        rows = self.audited_query_blocks()
        rows = rows[(rows >= first) & (rows < first + mask.indices.shape[2])]
        if config.audit_rate:
            record["audit"] = {"query_block": rows, "missed": torch.zeros(H, 0), "recall": torch.zeros(H, 0)}
            if len(rows):
                big = 2**28 if query.is_cuda else 2**24  # logit tile of the dense pass, in floats
                search = config.mask.search()  # the selection's contract at its width (the oracle row's)
                missed, recall = audit_rows(query, key, mask.indices, (rows - first).to(query.device),
                                            search, scale=scale, window=window, max_elements=big,
                                            scan=audit_scanner(query, search))
                record["audit"].update(missed=missed[0], recall=recall[0])
        self.layers[layer] = record

    def take_chunk(self) -> dict:
        """The chunk's records of every layer, stacked on the CPU, and reset: ``indices`` int32 and ``mass``
        float32 ``[L, H, nQ_chunk, top_k]``, and as recorded ``missed`` ``[L, H, nQ_chunk, 3]``, ``capped``
        bool ``[L, H, nQ_chunk]`` (under a coverage budget) and
        ``audit`` ``{"query_block" [r], "missed" [L, H, r], "recall" [L, H, r]}``. Each layer's records sit
        on that layer's device (a model spread over GPUs by a device map), so each is brought to the CPU
        before the layers are stacked."""
        order = sorted(self.layers)
        assert order == list(range(len(order))), f"layers recorded out of order: {order}"
        records = [self.layers[i] for i in order]
        chunk = {name: torch.stack([r[name].cpu() for r in records])
                 for name in ("indices", "mass", "missed", "capped") if name in records[0]}
        if "audit" in records[0]:
            chunk["audit"] = {"query_block": records[0]["audit"]["query_block"].cpu(),
                              **{key: torch.stack([r["audit"][key].cpu() for r in records])
                                 for key in ("missed", "recall")}}
        self.layers.clear()
        return chunk


_ACTIVE: contextvars.ContextVar[SparseSession | None] = contextvars.ContextVar("sparsetrace", default=None)


def stream_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface backend: ``query [B, Hq, T, D]``, ``key/value [B, Hkv, S, D]`` (post-RoPE, cache
    included) -> ``([B, T, Hq, D], None)``, like transformers' ``eager_attention_forward``."""
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError(
            "the 'sparsetrace' attention runs only inside `with sparsetrace.sparse_model(model, config):`."
        )
    window = kwargs.get("sliding_window") or None
    mask, covered = session.select(query, key, window, scaling)
    if session.edit is not None:
        mask = session.edit(module.layer_idx, mask)
        if covered is not None:  # the cut rows' estimate no longer describes the edited selection
            covered = covered._replace(missed=None)
    if session.observe is not None:
        session.observe(module.layer_idx, query, key, mask, scaling, window)
    estimate = session.record and session.config.missed_samples > 0
    out, mass, *lse = sparse_attention(query, key, value, mask, scale=scaling, return_mass=True,
                                       return_lse=estimate, window=window)
    if session.record:
        session.record_layer(module.layer_idx, query, key, mask, mass, lse[0] if lse else None, scaling, window,
                             covered)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask function for the 'sparsetrace' backend: none, since the attention is causal by construction."""
    return None


AttentionInterface.register(ATTN_NAME, stream_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


def mark_input_end(position: int) -> None:
    """Tell the active :func:`sparse_model` session (if any) that the input being run ends at ``position``
    (its KV cache length after the last token): see ``SparseSession.input_end``."""
    session = _ACTIVE.get()
    if session is not None:
        session.input_end = position


@contextlib.contextmanager
def sparse_model(model, config: TraceConfig, *, edit: MaskEdit | None = None, record: bool = True,
                 num_tokens: int | None = None, observe: Observer | None = None) -> Iterator[SparseSession]:
    """Run ``model`` with sparse attention inside the block; yields the :class:`SparseSession`
    (``num_tokens``: the length of the input a trace is recorded of, without it nothing is audited;
    ``observe``: shown each layer's post-RoPE query and key and the selection, e.g. for references)."""
    previous = model.config._attn_implementation
    session = SparseSession(config, edit=edit, record=record, num_tokens=num_tokens, observe=observe)
    token = _ACTIVE.set(session)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield session
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
