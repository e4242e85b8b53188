"""What a trace missed, said by the trace itself.

``exact``     the exact audit of sampled rows: missed mass by a dense pass over those queries only, the
              exact block top-k's row and the recall of the kept selection against it
``estimate``  an estimate of the missed mass of every row with a confidence interval (importance
              sampling of the unkept keys), calibrated against the audit

The tracer runs both inside the registered attention (``sparsetrace.tracing.backend``) and the store keeps
them beside the rows (``Trace.missed``, ``Trace.audit``).
"""
