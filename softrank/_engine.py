"""Engine selection and the contract every engine keeps.

softrank has two engines with one interface: the compiled C++ core
(``softrank._C``, "native") and a numba port of the same algorithms
(``softrank._numba``, "numba"), used when the compiled module is absent or when
``SOFTRANK_BACKEND=numba`` is set. Adapters never talk to an engine directly:
they call :func:`engine`, which loads the engine once, lazily, so that
``import softrank`` imports neither numba nor the compiled module.

Engine contract
---------------
Every array argument is a C-contiguous 2-D numpy array of shape ``(rows, n)``
(``n`` may be 0, ``rows`` may be 0); values are float32 or float64 and the
outputs have the dtype of ``x`` (``y`` for isotonic). Integer bookkeeping is
int32 (``n < 2**31``). The engine checks shapes, dtypes and contiguity and
raises ``ValueError``/``TypeError``; it never crashes. Cotangents,
tangents and weights must have the dtype of ``x`` (``y``).

``op``: 0 = soft rank, 1 = soft sort. ``reg``: 0 = l2, 1 = kl (the table is
:mod:`softrank._codes`).
``descending``: bool. ``eps``: float >= 0 (0 = hard operator, inf = the
limit). The caller has validated the arguments already.

soft_forward(x, op, reg, descending, eps) -> (out, perm, block_start)
    out[r]: the operator on row r. perm[r, i]: the column of x that sits at
    sorted position i (sorted by decreasing ``x'``, where ``x' = x`` for an
    ascending rank or a descending sort and ``x' = -x`` otherwise; ties keep
    increasing column order). block_start[r, i]: the sorted position where the
    PAV block holding sorted position i starts. A row holding NaN or +-inf gets
    NaN output and block_start = -1 everywhere.
soft_forward_value(x, op, reg, descending, eps) -> out
    soft_forward's ``out`` alone, bit for bit, for callers that need no
    backward pass (the native engine then keeps perm and block_start in
    per-thread scratch instead of returning two more arrays).
soft_vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps) -> grad
    The gradient of sum(cotangent * op(x)) with respect to x, from the stored
    forward state, in O(n) per row.
soft_jvp(x, out, perm, block_start, tangent, op, reg, descending, eps) -> tangent_out
    The Jacobian-vector product, O(n) per row.
soft_hvp(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps) -> grad
    The gradient with respect to x of <cotangent, J(x) tangent> (the second
    derivative that double backward needs), O(n) per row; 0 for l2.
isotonic_forward(y, weights_or_None, increasing, reg=0) -> (solution, block_start)
    Weighted isotonic regression by PAV, l2: argmin_v sum_i w_i (v_i - y_i)^2,
    kl: argmin_v sum_i exp(y_i - v_i) + w_i v_i, subject to v non-decreasing
    (increasing=True) or non-increasing. Adjacent blocks with equal values are
    pooled. block_start as above, over positions.
projection_forward(z, w, eps, reg) -> (out, perm_z, perm_w, block_start)
    The projection of z / eps onto the permutahedron of w (z and w of the
    same shape and dtype), l2: argmin_{mu in P(w)} 1/2 ||mu - z / eps||^2,
    kl: log argmin_{mu in P(exp w)} KL(mu, exp(z / eps)); eps = 0 is the
    hard limit, eps = inf pools every row. perm_z / perm_w: the columns of
    z / w at each decreasing sorted position (ties by column); block_start:
    the PAV blocks over sorted positions. Under kl w may hold -inf where the
    row's largest w is finite. Other non-finite rows give NaN output,
    identity permutations and singleton blocks.
projection_forward_value(z, w, eps, reg) -> out
    projection_forward's ``out`` alone, bit for bit (the native engine then
    sorts w's values without their order where it can).
isotonic_vjp(weights_or_None, block_start, cotangent) -> grad_y
    grad_y[j] = w_j / W_B * sum_{i in B} cotangent[i] for j in block B.
isotonic_vjp_weighted(y, solution, weights, block_start, cotangent) -> (grad_y, grad_weights)
    Both l2 gradients in one pass: grad_y as isotonic_vjp, and
    grad_weights[j] = (y_j - solution_B) / W_B * sum_{i in B} cotangent[i].
inverse_permutations(perm) -> inverse
    int32 (rows, n): inverse[r, perm[r, i]] = i (ValueError unless every row is
    a permutation of 0..n-1).
pearson(a, b) -> corr
    The Pearson correlation of each row of a with the same row of b, shape
    (rows,), dtype of a (sums in float64); NaN for a row of a or b that is
    constant or holds NaN or inf.
pearson_vjp(a, b, cotangent) -> grad_a
    The gradient in a of sum(cotangent * pearson(a, b)) (cotangent of shape
    (rows,)): cotangent * (b_c / (|a_c| |b_c|) - corr * a_c / |a_c|^2) with
    a_c, b_c the centred rows; NaN across a row whose corr is NaN.
set_num_threads(k), get_num_threads()
    Bound the CPU threads (k >= 1). Results are bitwise identical for any k.
"""
from __future__ import annotations

import os
from types import ModuleType

from softrank._codes import OP_RANK, OP_SORT, REG_KL, REG_L2  # noqa: F401 (re-exported)

_engine: ModuleType | None = None
_engine_name: str | None = None


def _load() -> None:
    global _engine, _engine_name
    forced = os.environ.get("SOFTRANK_BACKEND", "").strip().lower()
    if forced not in ("", "native", "numba"):
        raise ValueError(
            f"SOFTRANK_BACKEND must be 'native' or 'numba', got {forced!r}"
        )
    if forced != "numba":
        try:
            from softrank import _C  # type: ignore[attr-defined]
        except ImportError:
            if forced == "native":
                raise
        else:
            _engine, _engine_name = _C, "native"
            return
    shadowed = _shadowed_installation() if forced != "numba" else None
    try:
        from softrank import _numba
    except ImportError as exc:  # numba missing and no compiled core
        if shadowed is not None:
            raise ImportError(_shadow_message(shadowed)) from exc
        if forced == "numba":  # (the compiled core may well be here: it was not asked)
            raise ImportError(
                "SOFTRANK_BACKEND=numba asks for the numba engine, but numba is not "
                "installed: `pip install numba`, or unset SOFTRANK_BACKEND to use the "
                "compiled core"
            ) from exc
        raise ImportError(
            "softrank has no compiled core here and numba is not installed; "
            "reinstall softrank with a C++ compiler or `pip install numba`"
        ) from exc
    if shadowed is not None:
        import warnings

        warnings.warn(_shadow_message(shadowed) + " Using the slower numba engine meanwhile.",
                      RuntimeWarning, stacklevel=3)
    _engine, _engine_name = _numba, "numba"


def _shadowed_installation() -> str | None:
    """The directory of another softrank with a compiled core further down sys.path.

    Run from the root of a source checkout, ``import softrank`` finds the
    uncompiled ``./softrank`` before the installed package.
    """
    import sys
    from importlib.machinery import EXTENSION_SUFFIXES

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "softrank")
        if candidate != here and any(
            os.path.isfile(os.path.join(candidate, "_C" + suffix)) for suffix in EXTENSION_SUFFIXES
        ):
            return candidate
    return None


def _shadow_message(installed: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return (
        f"softrank was imported from {here}, a source tree without the compiled core, which "
        f"shadows the installed softrank in {installed}. Run from another directory, use the "
        "console scripts (softrank-pretext-demo, softrank-bench), or install in editable mode "
        "(pip install -e .)."
    )


def engine() -> ModuleType:
    """Return the engine module, loading it on first use."""
    if _engine is None:
        _load()
    return _engine  # type: ignore[return-value]


def backend() -> str:
    """Name the engine in use: ``"native"`` (the C++ core) or ``"numba"``."""
    if _engine_name is None:
        _load()
    return _engine_name  # type: ignore[return-value]


def available_backends() -> list:
    """The engines that can be loaded here, native first (used by the tests)."""
    names = []
    try:
        from softrank import _C  # type: ignore[attr-defined]  # noqa: F401

        names.append("native")
    except ImportError:
        pass
    try:
        import numba  # noqa: F401

        names.append("numba")
    except ImportError:
        pass
    return names


def cuda_disabled_by_environment() -> bool:
    """Whether ``SOFTRANK_DISABLE_CUDA`` is set (to anything but "" or "0").

    The switch of the GPU path, read where the adapters register their CUDA
    kernels (when ``softrank.torch`` / ``softrank.jax`` is imported), as
    ``SOFTRANK_DISABLE_AVX512`` is for the CPU's.
    """
    value = os.environ.get("SOFTRANK_DISABLE_CUDA", "").strip()
    return value not in ("", "0")


def cuda_core() -> ModuleType | None:
    """The compiled core (``softrank._C``) where it was built with its CUDA core and
    ``SOFTRANK_DISABLE_CUDA`` is not set; otherwise None.

    Where it is None, the adapters compute CUDA tensors and arrays on the host
    (a copy to the host, the CPU engine, a copy back), as a build without the
    CUDA core does. The CUDA core is the GPU's engine whichever engine runs on
    the CPU (``SOFTRANK_BACKEND`` does not affect it).
    """
    if cuda_disabled_by_environment():
        return None
    try:
        from softrank import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    compiled = getattr(_C, "cuda_compiled", None)
    return _C if compiled is not None and compiled() else None


class CudaDeviceCheck:
    """Whether the CUDA core sees a GPU: asked once, at the first use on a GPU
    (never at import: the CUDA runtime's first call initialises the driver in
    this process, which a forked child then cannot use), and remembered.

    A framework can see a GPU that the core does not: the core links its CUDA
    runtime statically, and a driver older than the toolkit that built it makes
    every call fail. A GPU older than every architecture the core was built for
    (a T4 or V100 under the default ``80;90``) runs none of its kernels. The
    adapters then compute on the host, as in a build without the CUDA core, with
    one RuntimeWarning that says why, rather than failing every op.

    Parameters
    ----------
    cuda : module
        The compiled core with its CUDA core (:func:`cuda_core`).
    framework : str
        Who sees the GPU, for the warning: "torch" or "jax".
    what : str
        What is computed on the host instead, for the warning: "CUDA tensors".
    """

    def __init__(self, cuda: ModuleType, framework: str, what: str):
        self._cuda = cuda
        self._framework = framework
        self._what = what
        self._answer: bool | None = None

    @property
    def answered(self) -> bool:
        """Whether the core has been asked (the answer is remembered)."""
        return self._answer is not None

    def __call__(self) -> bool:
        if self._answer is None:
            count = self._cuda.cuda_device_count()
            # (asked of the current device, the one the first op runs on)
            self._answer = count > 0 and self._cuda.cuda_device_runs_kernels()
            if not self._answer:
                self._warn(self._reason(count))
        return self._answer

    def _reason(self, count: int) -> str:
        """Why the core runs no kernel here, and the rebuild that would."""
        if count == 0:
            return (f"softrank's CUDA core sees no GPU although {self._framework} does: its CUDA "
                    "runtime (linked statically) needs a newer driver than this machine's "
                    "(compare nvidia-smi's CUDA version with that of the nvcc that built "
                    "softrank). Rebuild softrank with a toolkit the driver supports")
        capability = self._cuda.cuda_device_capability()
        named = (f"compute capability {capability // 10}.{capability % 10}"
                 if capability > 0 else "its compute capability")
        return (f"softrank's CUDA core has no kernel for this GPU ({named}): it was built for "
                "newer architectures (CMAKE_CUDA_ARCHITECTURES, 80;90 by default). Rebuild "
                "softrank for this GPU (pip install with -C cmake.define."
                "CMAKE_CUDA_ARCHITECTURES=native)")

    def _warn(self, reason: str) -> None:
        warn_at_user_code(
            f"{reason}, or set SOFTRANK_DISABLE_CUDA=1 to choose the host path without this "
            f"warning. {self._what} are computed on the host instead (a copy each way).")


# The packages whose frames lie between a user's call and a warning raised on
# its behalf (torch.ops dispatch, jax's tracing and lowering, softrank itself).
_LIBRARY_PACKAGES = frozenset({"softrank", "torch", "jax", "jaxlib"})


def warn_at_user_code(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside softrank, torch
    and jax, the line that asked for the work, however deep in dispatch or
    tracing the warning arises (what Python 3.12's ``skip_file_prefixes`` does,
    by module name, on every Python)."""
    import sys
    import warnings

    level, frame = 2, sys._getframe(1)
    while (frame is not None
           and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARY_PACKAGES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def force_backend(name: str) -> None:
    """Switch the engine in this process ("native" or "numba"); for tests and benchmarks."""
    global _engine, _engine_name
    if name == "native":
        from softrank import _C as module  # type: ignore[attr-defined]
    elif name == "numba":
        from softrank import _numba as module
    else:
        raise ValueError(f"backend must be 'native' or 'numba', got {name!r}")
    _engine, _engine_name = module, name
