"""Analyses of traces. Each reads a :class:`sparsetrace.store.Trace` only, never the model.

``sentences``  sentences of the traced text with token spans
``anchors``    thought anchors: sentence attention, vertical scores, receiver heads
``routes``     needle-in-a-haystack: needle mass per head, the needle-to-answer route across layers
``sources``    what a span read: attention flow from a token span back through all layers to its sources
"""
