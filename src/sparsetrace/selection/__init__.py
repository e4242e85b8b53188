"""Which key blocks each query block keeps.

``blocks``     the shared block operations (BlockMask, padding, gathering, the causal/window rule, tile scores)
``stream``     STREAM, the paper's hierarchical search (torch)
``shortlist``  SHORTLIST: every candidate pre-scored from pooled keys, the best few rescored exactly (torch)
``oracle``     the exact block top-k, same contract (O(T^2))
``reference``  plain-loop references of all three, for tests

The public entry points ``sparsetrace.stream_mask`` / ``shortlist_mask`` / ``oracle_mask`` (in
``sparsetrace.ops``) choose the implementation (torch, the GPU scorer, or the loop reference).
"""
