"""Shared pytest setup: one hypothesis profile (no deadlines: the first torch call in a process is
slow), the default model, loaded once per session, and headless Chromium, launched once per
session through Playwright on Debian's ``chromium`` (never a downloaded browser)."""

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "sparsetrace",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sparsetrace")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the default SmolLM2-135M on real weights (converted to the cache on
    first use). Shared by every test module: tests must leave it as they found it."""
    from sparsetrace.tracing.models import load_model

    return load_model()


def chromium_path() -> str | None:
    """Debian's chromium: ``$SPARSETRACE_CHROMIUM`` if set, else ``chromium`` on the PATH, else
    /usr/bin/chromium; None when there is none."""
    env = os.environ.get("SPARSETRACE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture(scope="session")
def browser():
    """A Playwright ``Browser``: headless Debian chromium, launched once for the session.

    A missing chromium (or Playwright) fails the tests that use it, never skips them: the viewer's
    tests are the only check that the block map is drawn at all."""
    binary = chromium_path()
    if binary is None:
        pytest.fail("no chromium for the browser tests: run `make browser` (or `apt-get install "
                    "chromium`), or point $SPARSETRACE_CHROMIUM at a Chromium binary", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
