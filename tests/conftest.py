"""Shared pytest setup: one hypothesis profile (no deadlines: the first torch call in a process is
slow) and the default model, loaded once per session."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "sparsetrace",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sparsetrace")


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the default SmolLM2-135M on real weights (converted to the cache on
    first use). Shared by every test module: tests must leave it as they found it."""
    from sparsetrace.models import load_model

    return load_model()
