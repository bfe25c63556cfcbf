"""softrank: fast differentiable sorting and ranking.

Exact soft rank and soft sort (Blondel et al. 2020, "Fast Differentiable
Sorting and Ranking") in O(n log n), with O(n) gradients, for numpy
(``softrank.numpy``), PyTorch (``softrank.torch``), JAX (``softrank.jax``) and
TensorFlow (``softrank.tensorflow``). The framework modules are imported only
when asked for, so ``import softrank`` stays light.

Environment: ``SOFTRANK_BACKEND=numba`` forces the numba engine;
``SOFTRANK_DISABLE_AVX512=1`` makes the native core use its portable (AVX2 or
baseline) code paths on any CPU. Both are read once, when the engine loads.
"""
from softrank._engine import backend

__version__ = "0.1.0"
__all__ = ["backend", "simd_level", "set_num_threads", "get_num_threads", "__version__"]


def simd_level() -> str:
    """The instruction set the engine's CPU code runs at.

    Returns
    -------
    str
        ``"avx512"``, ``"avx2"`` or ``"baseline"`` for the native core: the
        best the CPU supports, capped at AVX2 by ``SOFTRANK_DISABLE_AVX512=1``
        (read once, when the core loads); ``"baseline"`` on any CPU for a
        core built without its x86 variants (arm64, or the CMake option
        ``SOFTRANK_PORTABLE_ONLY``). ``"numba"`` for the numba engine,
        whose code LLVM compiles for the host CPU.
    """
    from softrank._engine import engine

    if backend() != "native":
        return "numba"
    return str(engine().simd_level())


# More threads only multiply the per-call costs (the core caps its pool here too).
MAX_NUM_THREADS = 1024


def set_num_threads(num_threads: int) -> None:
    """Bound the CPU threads the engine uses (default: all cores).

    Results are bitwise identical for every thread count.

    Parameters
    ----------
    num_threads : int
        In [1, 1024]. The numba engine clips it to its pool size
        (``NUMBA_NUM_THREADS``, by default the number of cores).
    """
    import numbers

    from softrank._engine import engine

    from softrank._validate import is_time_value

    if (isinstance(num_threads, bool) or is_time_value(num_threads)
            or not isinstance(num_threads, numbers.Integral)):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if not 1 <= num_threads <= MAX_NUM_THREADS:
        raise ValueError(f"num_threads must lie in [1, {MAX_NUM_THREADS}], got {num_threads}")
    engine().set_num_threads(int(num_threads))


def get_num_threads() -> int:
    """The number of CPU threads the engine uses."""
    from softrank._engine import engine

    return int(engine().get_num_threads())
