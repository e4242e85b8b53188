"""Runs that execute a model to answer one question (the analyses never touch the model; these do).

``fidelity``     dense vs sparse: the two-token criterion, top-1 agreement, KL, the k search
``niah``         needle-in-a-haystack cases decoded dense and sparse, scored, with their traces
``anchors``      the dense reference of thought anchors (sentence attention from full patterns)
``suppression``  the causal check of thought anchors (KL when a sentence's blocks are removed)
"""
