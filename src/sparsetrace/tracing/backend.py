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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..config import TraceConfig
from ..ops import select_blocks, sparse_attention
from ..selection.blocks import BlockMask

ATTN_NAME = "sparsetrace"

MaskEdit = Callable[[int, BlockMask], BlockMask]


@dataclass
class SparseSession:
    """What the registered attention does while active: select, (optionally) edit, attend, record.

    ``edit(layer, mask) -> mask`` may change the selection before attention runs (e.g. suppress a
    sentence's key blocks); ``record`` collects ``(indices, mass)`` per layer for the current chunk.
    """

    config: TraceConfig
    edit: MaskEdit | None = None
    record: bool = True
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def select(self, query: torch.Tensor, key: torch.Tensor, window: int | None) -> BlockMask:
        return select_blocks(query, key, self.config.mask, window=window)

    def take_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices int32 and mass float32, ``[L, H, nQ_chunk, top_k]`` (batch 0) on the CPU, and reset.

        Each layer's rows sit on that layer's device (a model spread over GPUs by a device map), so every
        layer is brought to the CPU before the layers are stacked."""
        order = sorted(self.layers)
        assert order == list(range(len(order))), f"layers recorded out of order: {order}"
        indices = torch.stack([self.layers[i][0][0].cpu() for i in order])
        mass = torch.stack([self.layers[i][1][0].cpu() for i in order])
        self.layers.clear()
        return indices, mass


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
    mask = session.select(query, key, window)
    if session.edit is not None:
        mask = session.edit(module.layer_idx, mask)
    out, mass = sparse_attention(query, key, value, mask, scale=scaling, return_mass=True, window=window)
    if session.record:
        session.layers[module.layer_idx] = (mask.indices, mass)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask function for the 'sparsetrace' backend: none, since the attention is causal by construction."""
    return None


AttentionInterface.register(ATTN_NAME, stream_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


@contextlib.contextmanager
def sparse_model(model, config: TraceConfig, *, edit: MaskEdit | None = None,
                 record: bool = True) -> Iterator[SparseSession]:
    """Run ``model`` with STREAM attention inside the block; yields the :class:`SparseSession`."""
    previous = model.config._attn_implementation
    session = SparseSession(config, edit=edit, record=record)
    token = _ACTIVE.set(session)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield session
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
