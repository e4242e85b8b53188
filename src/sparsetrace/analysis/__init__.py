"""Analyses of traces (anchors, NIAH retrieval routes, ...): they read `Trace` only, never the model."""
