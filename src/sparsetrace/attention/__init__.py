"""Softmax attention restricted to the kept blocks, and the mass each kept block receives.

``blockwise``  the vectorised implementation (gathers kept blocks; O(T * top_k * block * D) memory)
``dense``      dense float64 references (attention under a mask rebuilt by loops, full patterns, block masses)

``sparsetrace.sparse_attention`` (in ``sparsetrace.ops``) dispatches between these and the GPU path.
"""
