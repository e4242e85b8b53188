"""Dense reference probe: run a model with its ordinary sdpa attention and hand every layer's post-RoPE
queries and keys to a callback, one layer at a time.

This is how references are computed (dense attention patterns for the anchors reference, the recall and
coverage benchmarks): the callback can build a layer's ``[Hq, T, T]`` probabilities, reduce them and drop
them before the next layer runs, so no more than one layer's dense pattern is alive. Registered like the
sparse backend (``AttentionInterface`` + the sdpa mask function under the name ``"sparsetrace_probe"``),
scoped by a ``with`` block, and O(T^2): for inputs where dense attention fits.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PROBE_NAME = "sparsetrace_probe"

# callback(layer, query [B,Hq,T,D], key [B,Hkv,S,D], scaling, sliding_window | None)
ProbeCallback = Callable[[int, torch.Tensor, torch.Tensor, float, "int | None"], None]
_CALLBACK: contextvars.ContextVar[ProbeCallback | None] = contextvars.ContextVar("probe", default=None)


def probe_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            **kwargs):
    """sdpa attention, after showing ``(layer, query, key, scaling, window)`` to the active callback."""
    callback = _CALLBACK.get()
    if callback is not None:
        callback(module.layer_idx, query, key, scaling, kwargs.get("sliding_window") or None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


AttentionInterface.register(PROBE_NAME, probe_attention_forward)
AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)


@contextlib.contextmanager
def probing(model, callback: ProbeCallback) -> Iterator[None]:
    """Inside the block, every forward of ``model`` shows each layer's q and k to ``callback``."""
    previous = model.config._attn_implementation
    token = _CALLBACK.set(callback)
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _CALLBACK.reset(token)


def capture_qk(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float, int | None]]:
    """One dense forward over ``input_ids [T]``; per layer ``(q [Hq,T,D], k [Hkv,T,D], scaling, window)``
    as float32 on the CPU. Memory O(L * T * D * heads): a few hundred MB at 4k tokens for SmolLM2."""
    layers = {}

    def keep(layer, query, key, scaling, window):
        layers[layer] = (query[0].float().cpu(), key[0].float().cpu(), scaling, window)

    device = next(model.parameters()).device
    with probing(model, keep), torch.no_grad():
        model(input_ids=torch.as_tensor(input_ids).view(1, -1).to(device), use_cache=False,
              logits_to_keep=1)
    return layers
