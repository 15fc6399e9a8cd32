"""Every test session gets an empty trace cache and a key of its own (pahq_fx.passes.trace_cache): nothing is read from or
written to the user's cache, and a test that traces a model the session traced before takes the cached path.

Hypothesis draws the same examples on every run (``derandomize``), so that a suite that passes passes again on a clean
clone; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones (and remembers failures) to look for new counterexamples."""

import os

import pytest
from hypothesis import settings

from pahq_fx.passes.trace_cache import ENV, KEY_ENV

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True, scope="session")
def trace_cache_of_this_session(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv(ENV, str(tmp_path_factory.mktemp("traces")))
    patch.setenv(KEY_ENV, str(tmp_path_factory.mktemp("key") / "trace_cache.key"))
    yield
    patch.undo()
