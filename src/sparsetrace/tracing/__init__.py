"""Running a model: loading it, plugging in the sparse attention, and tracing long inputs.

``models``   load the supported architectures offline (GGUF from PyPI -> cached safetensors)
``backend``  the attention registered with transformers' AttentionInterface, scoped by ``sparse_model``
``forward``  chunked prefill through a KV cache, greedy decoding after it
``tracer``   ``trace_ids`` / ``trace_text``: run the model and write the trace to the store
``probe``    a dense probe that shows each layer's post-RoPE q and k to a callback (references)
``cpu``      the CPU allocator setting that keeps the estimator fast
"""
