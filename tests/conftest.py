"""Shared fixtures: run every numpy-API test once per available engine.

Hypothesis profiles: "ci" (default; deterministic, moderate example counts, no
deadline) and "dev" (more examples, random seeds).  Select with the environment
variable HYPOTHESIS_PROFILE.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA GPU and softrank built with its CUDA core (skipped elsewhere; "
        "run them with -m cuda)",
    )


def _engine_params():
    try:
        from softrank._engine import available_backends
    except ImportError as exc:  # softrank itself not importable
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"softrank not importable: {exc}"))]
    names = available_backends()
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no softrank engine (neither softrank._C nor numba)"))]
    return names


@pytest.fixture(params=_engine_params())
def backend(request):
    """Force one engine for the duration of a test; restore the previous one."""
    from softrank import _engine

    saved = (_engine._engine, _engine._engine_name)
    _engine.force_backend(request.param)
    try:
        import softrank

        assert softrank.backend() == request.param
        yield request.param
    finally:
        _engine._engine, _engine._engine_name = saved
