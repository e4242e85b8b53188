"""Shared pytest setup: one hypothesis profile (no deadlines: the first torch call in a process is
slow)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sparsetrace",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sparsetrace")
