"""pytest configuration for the benchmark suites (never collected by the test suite:
pyproject's testpaths is ["tests"]; run them with ``pytest benchmarks``).

- registers the ``quick`` marker (``-m quick``: a few cells that run in seconds);
- orders the cases so that every member of a pytest-benchmark group (one grid
  cell: softrank, references, peers, across the numpy/torch/jax files) runs
  back to back, then the thread-scaling cases;
- keeps the saved JSON small (no per-round raw data, see the last hook);
- lowers pytest-benchmark's time budget per benchmark to 0.5 s (a
  ``benchmark`` marker) unless ``--benchmark-max-time`` is given, so the full grid fits in well under 30 min.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

DEFAULT_MAX_TIME = 0.5


def _loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # not on every platform
        return "?"


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a small subset of the benchmark grid (seconds)")
    config.addinivalue_line("markers", "threads: thread-scaling benchmarks")
    config.addinivalue_line("markers", "fresh: the same array against fresh arrays each call")
    config._softrank_loadavg_start = _loadavg()


def _versions() -> str:
    import importlib
    import importlib.metadata

    import softrank

    parts = [f"{softrank.__version__} backend={softrank.backend()} "
             f"threads={softrank.get_num_threads()}"]
    for name in ("numpy", "torch", "jax", "torchsort", "torchisotonic", "torchpsort", "numba"):
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional, any import failure means absent
            continue
        extra = f" (threads={mod.get_num_threads()})" if name == "torch" else ""
        if name == "jax":
            try:
                import softrank.jax as srj

                extra = " (softrank.jax: XLA custom calls)" if srj._ffi_ready() else \
                    " (softrank.jax: pure_callback)"
            except Exception:  # noqa: BLE001 - the suite reports its own failure
                pass
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(mod, "__version__", "?")
        parts.append(f"{name} {version}{extra}")
    if os.environ.get("SOFTRANK_FAST_SOFT_SORT"):
        parts.append(f"fast-soft-sort from {os.environ['SOFTRANK_FAST_SOFT_SORT']}")
    return ", ".join(parts)


def _simd_level() -> str:
    """The instruction set the core runs at (softrank.simd_level()), and the
    SOFTRANK_DISABLE_AVX512 switch where it is set."""
    import softrank

    level = softrank.simd_level()
    switch = os.environ.get("SOFTRANK_DISABLE_AVX512")
    return f"{level} (SOFTRANK_DISABLE_AVX512={switch})" if switch else level


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["loadavg_start"] = getattr(config, "_softrank_loadavg_start", "?")
    machine_info["loadavg_end"] = _loadavg()
    machine_info["softrank"] = _versions()
    machine_info["simd_level"] = _simd_level()


def _max_time_given(config) -> bool:
    return any(str(a).startswith("--benchmark-max-time") for a in config.invocation_params.args)


def _order(item):
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("case") if callspec is not None else None
    order = getattr(case, "order", None)
    if order is None:
        return (1, (0, 0))
    return (0, order)


def pytest_collection_modifyitems(session, config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    bench = [i for i in items if os.path.dirname(str(i.path)) == here]
    if not bench:
        return
    ids = {id(i) for i in bench}
    position = {id(item): k for k, item in enumerate(items)}
    rest = [i for i in items if id(i) not in ids]
    bench.sort(key=lambda i: (_order(i), position[id(i)]))
    if not _max_time_given(config):
        for item in bench:
            item.add_marker(pytest.mark.benchmark(max_time=DEFAULT_MAX_TIME))
    items[:] = rest + bench


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Drop every round's raw timing from the saved JSON (200 MB for the full grid)
    unless SOFTRANK_BENCH_RAW=1; the statistics stay."""
    if os.environ.get("SOFTRANK_BENCH_RAW") == "1":
        return
    for bench in output_json.get("benchmarks", []):
        bench.pop("params", None)  # the Case objects: an unserialisable repr; "param" has the id
        bench.get("stats", {}).pop("data", None)
