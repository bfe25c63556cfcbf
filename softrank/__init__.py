"""softrank: fast differentiable sorting and ranking.

Exact soft rank and soft sort (Blondel et al. 2020, "Fast Differentiable
Sorting and Ranking") in O(n log n), with O(n) gradients, for numpy
(``softrank.numpy``), PyTorch (``softrank.torch``), JAX (``softrank.jax``) and
TensorFlow (``softrank.tensorflow``). The framework modules are imported only
when asked for, so ``import softrank`` stays light.
"""
from __future__ import annotations

from softrank._engine import backend

__version__ = "0.1.0"
__all__ = ["backend", "set_num_threads", "get_num_threads", "__version__"]


def set_num_threads(num_threads: int) -> None:
    """Bound the CPU threads the engine uses (default: all cores).

    Results are bitwise identical for every thread count.

    Parameters
    ----------
    num_threads : int
        At least 1.
    """
    import numbers

    from softrank._engine import engine

    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    engine().set_num_threads(int(num_threads))


def get_num_threads() -> int:
    """The number of CPU threads the engine uses."""
    from softrank._engine import engine

    return int(engine().get_num_threads())
