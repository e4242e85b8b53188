"""The trace store: write a trace chunk by chunk, resume after a crash, read it back lazily.

This package's names below are the store API, the only part of the package that analyses and the viewer
use. Every file is written atomically (``files``), a shard before the manifest that lists it, so a killed
run leaves a valid prefix plus files the manifest does not list; those are ignored, and deleted when the
run resumes. Only safetensors and JSON are read: nothing here unpickles.

``format``    the directory layout, manifest keys, errors
``files``     atomic writes and hashes
``encoding``  index and mass encodings, kept-pair counts and sparsity (the trace math)
``writer``    :class:`TraceWriter`
``trace``     :class:`Trace`
"""

from .encoding import (
    FLOAT16_MAX_REL_ERROR,
    LOG8_MAX_REL_ERROR,
    block_sparsity,
    decode_mass,
    encode_mass,
    human_bytes,
    kept_pairs_per_row,
)
from .files import atomic_write_bytes, atomic_write_json
from .format import MANIFEST, TraceError, TraceIndexError
from .trace import Trace, register_html_view
from .writer import TraceWriter

__all__ = [
    "FLOAT16_MAX_REL_ERROR",
    "LOG8_MAX_REL_ERROR",
    "MANIFEST",
    "Trace",
    "TraceError",
    "TraceIndexError",
    "TraceWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "block_sparsity",
    "decode_mass",
    "encode_mass",
    "human_bytes",
    "kept_pairs_per_row",
    "register_html_view",
]
