"""The CUDA paths of softrank.torch and softrank.jax, against the CPU engine.

Tests marked ``cuda`` need a CUDA GPU and a softrank built with its CUDA core
(``pytest -m cuda tests/test_cuda.py``, run by ``benchmarks/gpu_check.sh``);
elsewhere they skip, saying which of the two is missing. They compare every
GPU result (values, the forward state, torch autograd, ``torch.func.jvp``,
double backward, ``torch.compile``, jax ``grad`` / ``jvp``) with the CPU
engine's on random and adversarial rows (ties, constant, presorted, reverse
sorted, n = 1, a NaN row, one row of 1e7), to 1e-5 in float32 and 1e-12 in
float64; check that results stay on the GPU, that nothing goes through the
host engine, and that an op issued on a side stream runs on that stream.

The other tests run anywhere: the kernel registration without the CUDA core,
the CUDA kernels' calls into the core's interface (``softrank._C.cuda_*``)
against an emulation of that interface on host memory, the second derivative
composed from the first ones (what the CUDA ``soft_hvp`` kernel runs) against
the engine's, and jax's lowering for the cuda platform.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
import os
import re
import warnings

import numpy as np
import pytest

from child_python import run_python
from frameworks import jax_x64, require

torch = require("torch")

import softrank.torch as srt  # noqa: E402
from softrank import _engine, _torch_cuda  # noqa: E402

try:
    from softrank import _C
except ImportError:  # the numba engine only
    _C = None

CUDA_COMPILED = _C is not None and getattr(_C, "cuda_compiled", lambda: False)()
CUDA_DEVICES = _C.cuda_device_count() if CUDA_COMPILED else 0

needs_torch_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
    pytest.mark.skipif(not CUDA_COMPILED,
                       reason="softrank was built without the CUDA core (SOFTRANK_CUDA=OFF "
                       "or no CUDA compiler at build time)"),
    pytest.mark.skipif(CUDA_COMPILED and CUDA_DEVICES == 0,
                       reason="softrank._C.cuda_device_count() is 0 (no driver or device)"),
]



def _gpu_test(fn):
    """Mark a test ``cuda`` and skip it without a GPU or the CUDA core."""
    for mark in needs_torch_cuda:
        fn = mark(fn)
    return fn


OPS = ("rank", "sort")
CODES = {"rank": 0, "sort": 1}
PUBLIC = {"rank": srt.soft_rank, "sort": srt.soft_sort}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def adversarial_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, n) float64: random, ties, constant, presorted, reverse sorted, tiny
    gaps, huge values and (n > 1) a NaN row."""
    base = rng.normal(size=n)
    rows = [
        base,
        rng.integers(0, 3, size=n).astype(np.float64),
        np.full(n, 2.5),
        np.sort(base),
        np.sort(base)[::-1],
        base * 1e-4,
        base * 1e4,
    ]
    if n > 1:
        nan_row = rng.normal(size=n)
        nan_row[n // 2] = np.nan
        rows.append(nan_row)
    return np.stack(rows)


def assert_close(actual, expected, dtype):
    """Elementwise to TOL[dtype], relative to the row's scale (NaN where expected is NaN)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    scale = 1.0 + expected.nan_to_num().abs().amax(-1, keepdim=True)
    error = ((actual - expected).abs() / scale).nan_to_num()
    assert float(error.max()) <= TOL[dtype] if error.numel() else True


@contextlib.contextmanager
def host_engine_forbidden(monkeypatch):
    """Fail if anything reaches the host engine (a CUDA tensor copied to the host)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA tensor went through the host engine")

    with monkeypatch.context() as patch:
        for name in ("forward", "forward_value", "vjp", "jvp", "hvp"):
            patch.setattr(srt._host, name, refuse)
        patch.setattr(_engine, "engine", refuse)
        yield


# --- runnable anywhere: registration ---------------------------------------------------


def test_without_cuda_core_the_cuda_key_gets_the_host_kernels():
    if CUDA_COMPILED:
        pytest.skip("softrank here was built with the CUDA core")
    assert _torch_cuda.core() is None
    # (pearson's CUDA kernel is torch operations on the device in every build.)
    assert srt._CUDA_KERNELS["pearson"] is srt._pearson_device_kernel
    hosted = {name: kernel for name, kernel in srt._CUDA_KERNELS.items() if name != "pearson"}
    assert hosted == {name: k for name, k in srt._HOST_KERNELS.items() if name != "pearson"}
    for name in srt._HOST_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softrank::{name}", "CUDA")


SWITCH_PROBE = r"""
import json
import softrank.torch as srt
from softrank import _torch_cuda
result = {
    "core": _torch_cuda.core() is not None,
    "hosted": all(srt._CUDA_KERNELS[name] is srt._HOST_KERNELS[name]
                  for name in srt._HOST_KERNELS if name != "pearson"),
}
try:
    import softrank.jax as srj
except ImportError:
    result["jax_cuda_targets"] = None
else:
    result["jax_cuda_targets"] = sorted(srj._CUDA_FFI_TARGETS)
print(json.dumps(result))
"""


@pytest.mark.parametrize("value, disabled", [("1", True), ("yes", True), ("0", False),
                                             ("", False), (None, False)])
def test_disable_cuda_switch_routes_cuda_to_the_host(value, disabled):
    # SOFTRANK_DISABLE_CUDA, read when the adapters import: set (to anything but
    # "" or "0"), the CUDA dispatch keys get the host round trip and jax
    # registers no CUDA handler, even in a build with the CUDA core.

    env = dict(os.environ)
    env.pop("SOFTRANK_DISABLE_CUDA", None)
    if value is not None:
        env["SOFTRANK_DISABLE_CUDA"] = value
    proc = run_python(SWITCH_PROBE, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    uses_core = CUDA_COMPILED and not disabled
    assert got["core"] is uses_core
    assert got["hosted"] is not uses_core
    if got["jax_cuda_targets"] is not None:
        srj = require("softrank.jax")
        expected = sorted(_C.xla_ffi_cuda_targets()) if uses_core and srj._HAVE_FFI_TARGETS else []
        assert got["jax_cuda_targets"] == expected


def test_with_cuda_core_the_cuda_kernels_are_the_core_s():
    if CUDA_COMPILED:
        assert _torch_cuda.core() is _C
        kernels = srt._CUDA_KERNELS
    else:
        kernels = _torch_cuda.cuda_kernels(HostCore(), srt._HOST_KERNELS)
    for name in ("soft_forward", "soft_vjp", "soft_jvp", "soft_hvp"):
        assert kernels[name] is not srt._HOST_KERNELS[name]
        assert kernels[name].__module__ == "softrank._torch_cuda"
    for name in ("projection_forward", "isotonic_forward"):
        assert kernels[name] is srt._HOST_KERNELS[name]


# --- runnable anywhere: the kernels' calls into the core interface -----------------------

_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double}


def _view(address: int, ctype, rows: int, n: int) -> np.ndarray:
    """The (rows, n) array at ``address`` (writable, no copy)."""
    dtype = {ctypes.c_float: np.float32, ctypes.c_double: np.float64,
             ctypes.c_int32: np.int32}[ctype]
    if rows * n == 0:
        return np.empty((rows, n), dtype=dtype)
    buffer = (ctype * (rows * n)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype).reshape(rows, n)


class HostCore:
    """softrank._C's CUDA interface (CUDA-BRIEF), emulated on host memory with the
    CPU engine: the pointers are those of CPU tensors. Checks every argument's type
    and that the workspace has the size the sizing function asked for."""

    def __init__(self, device_count: int = 1, runs_kernels: bool = True, capability: int = 90):
        self.streams = []
        self.device_count = device_count
        self.runs_kernels = runs_kernels
        self.capability = capability

    def cuda_device_count(self) -> int:
        return self.device_count

    def cuda_device_runs_kernels(self) -> bool:
        return self.device_count > 0 and self.runs_kernels

    def cuda_device_capability(self) -> int:
        return self.capability if self.device_count > 0 else -1

    @staticmethod
    def cuda_soft_forward_workspace(dtype: str, rows: int, n: int) -> int:
        assert dtype in _CTYPES and type(rows) is int and type(n) is int
        return 24 * rows * n + 8

    cuda_soft_product_workspace = cuda_soft_forward_workspace

    def _common(self, dtype, rows, n, op, reg, descending, eps, workspace, workspace_bytes,
                stream):
        assert dtype in _CTYPES
        assert all(type(v) is int for v in (rows, n, op, reg, workspace, workspace_bytes))
        assert type(descending) is bool and type(eps) is float and type(stream) is int
        assert rows * n > 0
        assert workspace_bytes == self.cuda_soft_forward_workspace(dtype, rows, n)
        # The scratch must be writable over its whole length.
        ctypes.memset(workspace, 0xAB, workspace_bytes)
        self.streams.append(stream)

    def cuda_soft_forward(self, dtype, x, rows, n, op, reg, descending, eps, out, perm,
                          block_start, workspace, workspace_bytes, stream):
        self._common(dtype, rows, n, op, reg, descending, eps, workspace, workspace_bytes,
                     stream)
        ctype = _CTYPES[dtype]
        result = _C.soft_forward(_view(x, ctype, rows, n).copy(), op, reg, descending, eps)
        for address, value, kind in zip((out, perm, block_start), result,
                                        (ctype, ctypes.c_int32, ctypes.c_int32)):
            _view(address, kind, rows, n)[...] = value

    def cuda_soft_product(self, dtype, x, out, perm, block_start, vec, rows, n, op, reg,
                          descending, eps, transpose, result, workspace, workspace_bytes,
                          stream):
        self._common(dtype, rows, n, op, reg, descending, eps, workspace, workspace_bytes,
                     stream)
        assert type(transpose) is bool
        ctype = _CTYPES[dtype]
        args = [_view(a, ctype, rows, n).copy() for a in (x, out)]
        args += [_view(a, ctypes.c_int32, rows, n).copy() for a in (perm, block_start)]
        args.append(_view(vec, ctype, rows, n).copy())
        product = _C.soft_vjp if transpose else _C.soft_jvp
        _view(result, ctype, rows, n)[...] = product(*args, op, reg, descending, eps)


@pytest.fixture
def host_core(monkeypatch):
    if _C is None:
        pytest.skip("the emulated CUDA interface runs the compiled CPU engine")
    if _engine.backend() != "native":
        # (its results are compared bit for bit with the host kernels', which
        # run the engine chosen here: SOFTRANK_BACKEND=numba)
        pytest.skip(f"the host kernels run the {_engine.backend()} engine, the emulation the native one")
    core = HostCore()

    @contextlib.contextmanager
    def launch(device):
        assert device == torch.device("cpu")
        yield 0x5EED

    monkeypatch.setattr(_torch_cuda, "_launch", launch)
    return core


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 5), (4, 1), (0, 6), (3, 0)])
def test_cuda_kernels_call_the_core_interface(host_core, dtype, shape):
    """The CUDA kernels, run on CPU tensors through the emulated interface, give the
    CPU kernels' results: pointers, sizes, codes and argument order are right."""
    kernels = _torch_cuda.cuda_kernels(host_core, srt._HOST_KERNELS)
    rng = np.random.default_rng(1)
    rows = math.prod(shape[:-1])
    values = np.resize(adversarial_rows(max(shape[-1], 1), rng), (rows, shape[-1]))
    # A transposed (non-contiguous) view: the kernels make it contiguous.
    x = torch.tensor(values.reshape(shape), dtype=dtype).mT.contiguous().mT
    vec = torch.tensor(rng.normal(size=shape), dtype=torch.float64)  # cast by the kernels
    combinations = list(itertools.product((0, 1), (0, 1), (False, True), (0.5, 0.0)))
    for params in combinations:
        got = kernels["soft_forward"](x, *params)
        expected = srt._forward_kernel(x, *params)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype
            assert torch.equal(g.nan_to_num(), e.nan_to_num())
        state = (x,) + expected
        for name in ("soft_vjp", "soft_jvp"):
            product = kernels[name](*state, vec, *params)
            reference = srt._HOST_KERNELS[name](*state, vec, *params)
            assert product.shape == x.shape and product.dtype == dtype
            assert torch.equal(product.nan_to_num(), reference.nan_to_num())
    assert set(host_core.streams) <= {0x5EED}
    # One forward and two products per combination, none for an empty tensor.
    assert len(host_core.streams) == (0 if x.numel() == 0 else 3 * len(combinations))


def test_cuda_kernels_take_the_host_path_where_the_core_sees_no_gpu(host_core):
    """torch sees a GPU that the core does not (its static CUDA runtime needs a
    newer driver): every op would fail in the core; CUDA tensors go to the host
    kernels instead, with one warning, and the core is asked once, at the first
    call (not at import)."""
    blind = HostCore(device_count=0)
    asked = []
    count = blind.cuda_device_count
    blind.cuda_device_count = lambda: asked.append(1) or count()
    kernels = _torch_cuda.cuda_kernels(blind, srt._HOST_KERNELS)
    assert asked == []
    x = torch.tensor([[0.3, -1.0, 2.0, 0.3]], dtype=torch.float64)
    params = (0, 1, False, 0.5)
    with pytest.warns(RuntimeWarning, match="CUDA core sees no GPU") as record:
        state = kernels["soft_forward"](x, *params)
    # (attributed to the line that called the kernel, not a frame inside softrank)
    assert [w.filename for w in record] == [__file__]
    expected = srt._forward_kernel(x, *params)
    for got, want in zip(state, expected):
        assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("soft_vjp", "soft_jvp"):
            got = kernels[name](x, *expected, torch.ones_like(x), *params)
            assert torch.equal(got, srt._HOST_KERNELS[name](x, *expected, torch.ones_like(x), *params))
    assert asked == [1] and blind.streams == []  # asked once; the core never launched
    # A core that sees a GPU runs the kernels (the interface's stream recorded).
    kernels = _torch_cuda.cuda_kernels(host_core, srt._HOST_KERNELS)
    kernels["soft_forward"](x, *params)
    assert host_core.streams == [0x5EED]


def test_cuda_kernels_take_the_host_path_on_a_gpu_the_core_has_no_kernel_for(host_core):
    """A GPU older than every architecture the core was built for (a T4, compute
    capability 7.5, under the default 80;90): each launch would fail with "no
    kernel image is available". The check asks the core once; CUDA tensors take
    the host kernels, with one warning naming the capability and the rebuild."""
    old_gpu = HostCore(device_count=1, runs_kernels=False, capability=75)
    asked = []
    runs = old_gpu.cuda_device_runs_kernels
    old_gpu.cuda_device_runs_kernels = lambda: asked.append(1) or runs()
    kernels = _torch_cuda.cuda_kernels(old_gpu, srt._HOST_KERNELS)
    x = torch.tensor([[0.3, -1.0, 2.0, 0.3]], dtype=torch.float64)
    params = (1, 1, True, 0.5)
    with pytest.warns(RuntimeWarning, match=r"no kernel for this GPU \(compute capability 7\.5\)"
                      r".*CMAKE_CUDA_ARCHITECTURES"):
        state = kernels["soft_forward"](x, *params)
    for got, want in zip(state, srt._forward_kernel(x, *params)):
        assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels["soft_vjp"](x, *state, torch.ones_like(x), *params)
    assert asked == [1] and old_gpu.streams == []


def test_cuda_kernels_refuse_half_types(host_core):
    kernels = _torch_cuda.cuda_kernels(host_core, srt._HOST_KERNELS)
    with pytest.raises(TypeError, match="float32 and float64"):
        kernels["soft_forward"](torch.zeros(2, 3, dtype=torch.float16), 0, 0, False, 1.0)


# --- runnable anywhere: the second derivative from the first ones -------------------------


def _hvp_scale(x, out, perm, block_start, c, t, params):
    """Per row, the magnitude of the terms the second derivative sums: its own
    size, and for the kl rank ``r |J c| |J t| / r^2`` (the composition's last
    input times the ranks); roundoff is relative to it."""
    op, reg = params[:2]
    scale = 1.0 + srt._hvp_kernel(x, out, perm, block_start, c, t, *params).double()
    scale = scale.nan_to_num().abs().amax(-1, keepdim=True)
    if op == 0 and reg == 1:
        jc = srt._jvp_kernel(x, out, perm, block_start, c, *params).double()
        jt = srt._jvp_kernel(x, out, perm, block_start, t, *params).double()
        terms = out.double() * (jc * jt / out.double() ** 2)
        scale = scale + terms.nan_to_num().abs().amax(-1, keepdim=True)
    return scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_composed_hvp_is_the_engine_s(dtype, n):
    """What the CUDA soft_hvp kernel computes (from soft_vjp / soft_jvp), with the CPU
    products: the engine's soft_hvp, to TOL relative to the terms' scale."""
    hvp = _torch_cuda.composed_hvp(srt._vjp_kernel, srt._jvp_kernel)
    rng = np.random.default_rng(n)
    x = torch.tensor(adversarial_rows(n, rng), dtype=dtype)
    c = torch.tensor(rng.normal(size=x.shape), dtype=dtype)
    t = torch.tensor(rng.normal(size=x.shape), dtype=dtype)
    for params in itertools.product((0, 1), (0, 1), (False, True),
                                    (1e-3, 0.3, 1.0, 20.0, 0.0, math.inf)):
        state = srt._forward_kernel(x, *params)
        expected = srt._hvp_kernel(x, *state, c, t, *params)
        got = hvp(x, *state, c, t, *params)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), params
        scale = _hvp_scale(x, *state, c, t, params)
        error = ((got.double() - expected.double()).abs() / scale).nan_to_num()
        assert float(error.max()) <= TOL[dtype], params


@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-13), (torch.float32, 1e-16),
                                        (torch.float64, 1e-104), (torch.float64, 1e-140)])
@pytest.mark.parametrize("descending", [False, True])
def test_composed_hvp_of_tied_values_at_a_small_eps_stays_finite(dtype, eps, descending):
    """The kl rank's composed second derivative applied 1 / g = eps after the
    outer jvp: its intermediate, O(g^3), overflowed to inf (then NaN) where the
    engine's O(g^2) result is finite. Tied values pool at any eps."""
    hvp = _torch_cuda.composed_hvp(srt._vjp_kernel, srt._jvp_kernel)
    x = torch.tensor([[1.0, 1.0, 1.0, 3.0, 2.0], [2.0, 2.0, 0.5, 0.5, 0.5]], dtype=dtype)
    c = torch.tensor([[0.3, -1.2, 0.5, 0.7, 0.1], [0.2, -0.4, 0.9, -0.3, 0.6]], dtype=dtype)
    t = torch.tensor([[1.1, 0.4, -0.2, -0.9, 0.6], [-0.5, 0.8, 0.3, 0.1, -0.7]], dtype=dtype)
    params = (0, 1, descending, eps)
    state = srt._forward_kernel(x, *params)
    expected = srt._hvp_kernel(x, *state, c, t, *params)
    assert torch.isfinite(expected).all() and expected.abs().max() > 1 / eps  # (the test's premise)
    got = hvp(x, *state, c, t, *params)
    assert torch.isfinite(got).all()
    scale = _hvp_scale(x, *state, c, t, params)
    assert float(((got.double() - expected.double()).abs() / scale).max()) <= TOL[dtype]


def test_composed_hvp_with_an_eps_past_float32_s_range_is_the_engine_s_zero():
    # eps = 1e39 is inf in float32 products: 0 * inf gave NaN where the engine's
    # rank second derivative (computed in double, O(1 / eps^2)) is 0.
    hvp = _torch_cuda.composed_hvp(srt._vjp_kernel, srt._jvp_kernel)
    x = torch.tensor([[1.0, 1.0, 3.0, 2.0]], dtype=torch.float32)
    c, t = torch.ones_like(x), torch.arange(4.0).reshape(1, 4)
    for descending in (False, True):
        params = (0, 1, descending, 1e39)
        state = srt._forward_kernel(x, *params)
        expected = srt._hvp_kernel(x, *state, c, t, *params)
        assert torch.equal(hvp(x, *state, c, t, *params), expected)


# --- runnable anywhere: jax's lowering for the cuda platform ------------------------------


def _cuda_lowering_text(fn, x):
    """The StableHLO of ``fn`` lowered for the cuda platform, or None where the
    lowering needs a CUDA backend (a host callback) and this jax has none."""
    jax = require("jax")
    try:
        return jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    except ValueError as exc:
        assert "lowering platform cuda" in str(exc)
        return None


def test_jax_registers_the_core_s_cuda_handlers():
    srj = require("softrank.jax")
    expected = getattr(_C, "xla_ffi_cuda_targets", dict)() if srj._HAVE_FFI_TARGETS else {}
    assert srj._CUDA_FFI_TARGETS == frozenset(expected)


def test_jax_cuda_lowering_calls_the_cuda_handlers(monkeypatch):
    jax = require("jax")
    srj = require("softrank.jax")
    import jax.numpy as jnp

    x = jnp.ones((3, 4), jnp.float32)
    monkeypatch.setattr(srj, "_CUDA_FFI_TARGETS", frozenset(
        ["softrank_forward_v1", "softrank_forward_value_v1", "softrank_vjp_v1",
         "softrank_jvp_v1"]))
    text = _cuda_lowering_text(lambda x: srj.soft_rank(x), x)
    assert "custom_call @softrank_forward_value_v1" in text
    text = _cuda_lowering_text(jax.grad(lambda x: srj.soft_sort(x, regularization="kl").sum()), x)
    assert "custom_call @softrank_forward_v1" in text and "custom_call @softrank_vjp_v1" in text
    text = _cuda_lowering_text(lambda x: jax.jvp(srj.soft_rank, (x,), (x,))[1], x)
    assert "custom_call @softrank_jvp_v1" in text
    # The CPU engine's choice does not matter on the GPU.
    monkeypatch.setattr(srj, "_ffi_ready", lambda: False)
    text = _cuda_lowering_text(lambda x: srj.soft_rank(x), x)
    assert "custom_call @softrank_forward_value_v1" in text
    # The second derivative has no CUDA handler: it is composed of the jvp and
    # vjp calls (the rank's hessian binds the hvp primitive).
    for op in (srj.soft_rank, srj.soft_sort):
        hessian = jax.hessian(lambda v, op=op: (op(v, 0.5, regularization="kl") * v).sum())
        text = _cuda_lowering_text(hessian, x[0])
        assert "softrank_hvp_v1" not in text and "callback" not in text
        assert "custom_call @softrank_jvp_v1" in text
    # Without the jvp / vjp handlers, the hvp is the host callback.
    monkeypatch.setattr(srj, "_CUDA_FFI_TARGETS", frozenset(["softrank_forward_v1"]))
    hessian = jax.hessian(lambda v: (srj.soft_rank(v, 0.5, regularization="kl") * v).sum())
    text = _cuda_lowering_text(hessian, x[0])
    assert text is None or ("softrank_hvp_v1" not in text and "callback" in text)


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_jax_hvp_from_state_is_the_engine_s(n):
    """What the hvp primitive lowers to on CUDA (from softrank_jvp / softrank_vjp),
    evaluated on the CPU: the engine's hvp, to 1e-12 relative to the terms' scale."""
    require("jax")
    srj = require("softrank.jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(n)
    values = adversarial_rows(n, rng)
    c = rng.normal(size=values.shape)
    t = rng.normal(size=values.shape)
    with jax_x64(True):
        x = jnp.asarray(values)
        for op, reg, descending, eps in itertools.product((0, 1), (0, 1), (False, True),
                                                          (1e-3, 0.3, 1.0, 20.0, 0.0, math.inf)):
            params = {"op": op, "reg": reg, "descending": descending, "eps": eps}
            state = srj._forward_p.bind(x, **params)
            expected = np.asarray(srj._hvp_p.bind(x, *state, jnp.asarray(c), jnp.asarray(t),
                                                  **params))
            got = np.asarray(srj._hvp_from_state(x, *state, jnp.asarray(c), jnp.asarray(t),
                                                 params))
            assert np.array_equal(np.isnan(got), np.isnan(expected)), params
            torch_state = tuple(torch.tensor(np.asarray(a)) for a in state)
            scale = _hvp_scale(torch.from_numpy(values), *torch_state, torch.from_numpy(c),
                               torch.from_numpy(t), (op, reg, descending, eps)).numpy()
            error = np.nan_to_num(np.abs(got - expected) / scale)
            assert error.max() <= TOL[torch.float64], params


def test_jax_cuda_lowering_without_handlers_is_the_callback(monkeypatch):
    srj = require("softrank.jax")
    import jax.numpy as jnp

    monkeypatch.setattr(srj, "_CUDA_FFI_TARGETS", frozenset())
    text = _cuda_lowering_text(lambda x: srj.soft_rank(x), jnp.ones((3, 4), jnp.float32))
    assert text is None or ("softrank_forward_value_v1" not in text and "callback" in text)


def test_jax_cuda_lowering_takes_the_callback_where_the_core_sees_no_gpu(monkeypatch):
    """jax runs a GPU that the core does not see (its static CUDA runtime needs a
    newer driver): the CUDA lowering takes the host callback, with one warning,
    the core asked once; where the core sees one, the custom calls; and where
    jax only lowers for CUDA (an export for another machine), the custom calls
    without asking the core; a jax.export for CUDA, the custom calls even where
    the core sees no GPU (the callback cannot be serialized)."""
    srj = require("softrank.jax")
    import jax
    import jax.numpy as jnp

    x = jnp.ones((3, 4), jnp.float32)
    monkeypatch.setattr(srj, "_CUDA_FFI_TARGETS", frozenset(
        ["softrank_forward_v1", "softrank_forward_value_v1", "softrank_vjp_v1",
         "softrank_jvp_v1"]))
    asked = []

    def device_check(count):
        core = HostCore(device_count=count)
        core.cuda_device_count = lambda: asked.append(count) or count
        return _engine.CudaDeviceCheck(core, "jax", "CUDA arrays")

    # Lowering for CUDA on a machine where jax runs none: the core is not asked.
    monkeypatch.setattr(srj, "_jax_has_cuda_devices", lambda: False)
    monkeypatch.setattr(srj, "_CUDA_CORE_SEES_A_GPU", device_check(0))
    text = _cuda_lowering_text(lambda x: srj.soft_rank(x), x)
    assert "custom_call @softrank_forward_value_v1" in text and asked == []
    # jax runs a GPU, the core sees none: the callback, one warning, one question.
    monkeypatch.setattr(srj, "_jax_has_cuda_devices", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUDA core sees no GPU although jax does") as record:
        text = _cuda_lowering_text(lambda x: srj.soft_rank(x), x)
    # (attributed to this file's code that asked for the lowering, not to a
    # frame inside softrank or jax's tracing)
    assert [w.filename for w in record] == [__file__]
    assert text is None or ("softrank_forward_value_v1" not in text and "callback" in text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = _cuda_lowering_text(lambda x: srj.soft_sort(x * 2.0), x)
    assert text is None or ("softrank_forward_value_v1" not in text and "callback" in text)
    assert asked == [0]
    # ... but a jax.export for CUDA (a module serialized to run elsewhere, where
    # the host callback cannot go) emits the custom calls, the core not asked again.
    from jax import export

    for fn in (lambda x: srj.soft_rank(x), lambda x: srj.soft_sort(x, regularization="kl")):
        exported = export.export(jax.jit(jax.grad(lambda x: fn(x).sum())), platforms=["cuda"],
                                 disabled_checks=srj.export_disabled_checks())(x)
        calls = set(re.findall(r"custom_call @(\w+)", exported.mlir_module()))
        assert calls == {"softrank_forward_v1", "softrank_vjp_v1"}  # (no host callback)
    assert asked == [0]
    # ... the core sees it: the custom calls.
    monkeypatch.setattr(srj, "_CUDA_CORE_SEES_A_GPU", device_check(1))
    text = _cuda_lowering_text(lambda x: srj.soft_rank(x), x)
    assert "custom_call @softrank_forward_value_v1" in text and asked == [0, 1]


# --- on a GPU: torch ------------------------------------------------------------------


def _cuda(array, dtype):
    return torch.tensor(array, dtype=dtype, device="cuda")


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 33, 1000, 5000])
@pytest.mark.parametrize("op", [0, 1])
@pytest.mark.parametrize("reg", [0, 1])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", [0.1, 1.0, 0.0, math.inf])
def test_cuda_forward_state_and_products(dtype, n, op, reg, descending, eps):
    rng = np.random.default_rng(n)
    values = adversarial_rows(n, rng)
    x = _cuda(values, dtype)
    x_cpu = x.cpu()
    params = (op, reg, descending, eps)
    out, perm, block_start = torch.ops.softrank.soft_forward(x, *params)
    assert {out.device, perm.device, block_start.device} == {x.device}
    assert perm.dtype == block_start.dtype == torch.int32
    expected = srt._forward_kernel(x_cpu, *params)
    assert_close(out, expected[0], dtype)
    # The sort is arithmetic-free: the same permutation.
    assert torch.equal(perm.cpu(), expected[1])
    vec = _cuda(rng.normal(size=values.shape), dtype)
    for name in ("soft_vjp", "soft_jvp"):
        reference = srt._HOST_KERNELS[name](x_cpu, *expected, vec.cpu(), *params)
        got = getattr(torch.ops.softrank, name)(x, out, perm, block_start, vec, *params)
        assert got.device == x.device
        assert_close(got, reference, dtype)
        # The CPU products accept the GPU's state, and the GPU's the CPU's.
        gpu_state = (out.cpu(), perm.cpu(), block_start.cpu())
        assert_close(srt._HOST_KERNELS[name](x_cpu, *gpu_state, vec.cpu(), *params), reference,
                     dtype)
        cpu_state = tuple(a.cuda() for a in expected)
        assert_close(getattr(torch.ops.softrank, name)(x, *cpu_state, vec, *params), reference,
                     dtype)


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("direction", ["ascending", "descending"])
def test_cuda_public_forward_backward(monkeypatch, dtype, op, reg, direction):
    rng = np.random.default_rng(3)
    values = adversarial_rows(257, rng)
    cot = rng.normal(size=values.shape)
    fn = PUBLIC[op]
    x_cpu = torch.tensor(values, dtype=dtype, requires_grad=True)
    y_cpu = fn(x_cpu, 0.5, regularization=reg, direction=direction)
    y_cpu.backward(torch.tensor(cot, dtype=dtype))
    x = _cuda(values, dtype).requires_grad_()
    with host_engine_forbidden(monkeypatch):
        y = fn(x, 0.5, regularization=reg, direction=direction)
        y.backward(_cuda(cot, dtype))
    assert y.device == x.device and x.grad.device == x.device
    assert_close(y, y_cpu, dtype)
    assert_close(x.grad, x_cpu.grad, dtype)


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_cuda_forward_mode_and_other_dims(monkeypatch, dtype, op, reg):
    rng = np.random.default_rng(4)
    values = rng.normal(size=(5, 64, 3))
    tangent = rng.normal(size=values.shape)
    fn = PUBLIC[op]

    def f(v):
        return fn(v, 0.3, regularization=reg, dim=1)

    expected = torch.func.jvp(f, (torch.tensor(values, dtype=dtype),),
                              (torch.tensor(tangent, dtype=dtype),))
    with host_engine_forbidden(monkeypatch):
        got = torch.func.jvp(f, (_cuda(values, dtype),), (_cuda(tangent, dtype),))
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        assert_close(g.movedim(1, -1), e.movedim(1, -1), dtype)


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS)
def test_cuda_double_backward(monkeypatch, dtype, op):
    rng = np.random.default_rng(5)
    values = adversarial_rows(40, rng)[:-1]  # (the NaN row's second derivative is NaN)
    cot = rng.normal(size=values.shape)
    fn = PUBLIC[op]

    def second(x):
        y = fn(x, 0.7, regularization="kl")
        (g,) = torch.autograd.grad(y, x, torch.tensor(cot, dtype=dtype, device=x.device),
                                   create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), x)
        return g, h

    x_cpu = torch.tensor(values, dtype=dtype, requires_grad=True)
    expected = second(x_cpu)
    with host_engine_forbidden(monkeypatch):
        got = second(_cuda(values, dtype).requires_grad_())
    assert got[1].device.type == "cuda"
    assert_close(got[0], expected[0], dtype)
    # h = soft_hvp(cotangent, 2 g): roundoff relative to the terms it sums.
    params = (CODES[op], 1, False, 0.7)
    x_cpu = x_cpu.detach()
    state = srt._forward_kernel(x_cpu, *params)
    scale = _hvp_scale(x_cpu, *state, torch.tensor(cot, dtype=dtype), 2 * expected[0].detach(),
                       params)
    error = (got[1].cpu().double() - expected[1].double()).abs() / scale
    assert float(error.max()) <= TOL[dtype]


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_compute_in_float32(dtype):
    x = torch.randn(8, 100, device="cuda").to(dtype)
    y = srt.soft_rank(x, 0.5)
    assert y.dtype == dtype and y.device == x.device
    # The float32 results agree to 1e-5; rounded to the half type, by one unit at most.
    expected = srt.soft_rank(x.cpu().float(), 0.5)
    error = (y.cpu().float() - expected).abs() / expected.abs()
    assert float(error.max()) <= torch.finfo(dtype).eps


@_gpu_test
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)])
def test_cuda_empty(shape):
    x = torch.empty(shape, device="cuda")
    for fn in PUBLIC.values():
        y = fn(x)
        assert y.shape == x.shape and y.device == x.device


@_gpu_test
@pytest.mark.parametrize("op, reg, dtype", [("rank", "l2", torch.float32),
                                            ("sort", "kl", torch.float64)])
def test_cuda_one_long_row(op, reg, dtype):
    rng = np.random.default_rng(7)
    values = rng.normal(size=(1, 10_000_000))
    cot = rng.normal(size=values.shape)
    fn = PUBLIC[op]
    x_cpu = torch.tensor(values, dtype=dtype, requires_grad=True)
    y_cpu = fn(x_cpu, 0.01, regularization=reg)
    y_cpu.backward(torch.tensor(cot, dtype=dtype))
    x = _cuda(values, dtype).requires_grad_()
    y = fn(x, 0.01, regularization=reg)
    y.backward(_cuda(cot, dtype))
    assert_close(y, y_cpu, dtype)
    assert_close(x.grad, x_cpu.grad, dtype)


DISABLED_CUDA_SCRIPT = r"""
import numpy as np
import torch
import softrank.numpy as srn
import softrank.torch as srt
from softrank import _torch_cuda
assert _torch_cuda.core() is None
rng = np.random.default_rng(9)
values, cot = rng.normal(size=(4, 300)), rng.normal(size=(4, 300))
for name in ("soft_rank", "soft_sort"):
    for reg in ("l2", "kl"):
        x = torch.tensor(values, device="cuda", requires_grad=True)
        y = getattr(srt, name)(x, 0.5, regularization=reg)
        assert y.device == x.device, y.device
        (grad,) = torch.autograd.grad(y, x, torch.tensor(cot, device="cuda"))
        assert grad.device == x.device, grad.device
        # the host round trip runs the CPU engine: softrank.numpy's bits
        want, pullback = getattr(srn, name + "_with_vjp")(values, 0.5, regularization=reg)
        np.testing.assert_array_equal(y.detach().cpu().numpy(), want)
        np.testing.assert_array_equal(grad.cpu().numpy(), pullback(cot))
try:
    import jax
    import softrank.jax as srj
except ImportError:
    print("torch ok; jax absent")
else:
    assert not srj._CUDA_FFI_TARGETS
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if gpus:
        x = jax.device_put(values.astype(np.float32), gpus[0])
        y = jax.jit(lambda t: srj.soft_rank(t, 0.5))(x)
        np.testing.assert_array_equal(np.asarray(y), srn.soft_rank(values.astype(np.float32), 0.5))
        print("torch ok; jax ok on", gpus[0])
    else:
        print("torch ok; jax sees no GPU")
"""


@_gpu_test
def test_cuda_disabled_by_the_switch_computes_on_the_host():
    """``SOFTRANK_DISABLE_CUDA=1``: CUDA tensors (and jax GPU arrays) take the host
    round trip, whose results are the CPU engine's bit for bit and stay on the GPU."""

    env = dict(os.environ, SOFTRANK_DISABLE_CUDA="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = run_python(DISABLED_CUDA_SCRIPT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch ok" in proc.stdout


@_gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_side_stream(dtype):
    """An op issued under ``torch.cuda.stream(s)`` runs on s: with the default
    stream held busy (a long sleep kernel), s finishes and its results are right
    while the default stream is still asleep. Work on the default stream would
    wait behind the sleep, leaving s's copy to read unwritten memory; a
    synchronisation inside the op would outlast the sleep."""
    rng = np.random.default_rng(8)
    values = rng.normal(size=(64, 2000))
    cot = rng.normal(size=values.shape)
    x = _cuda(values, dtype).requires_grad_()
    c = _cuda(cot, dtype)
    x_cpu = torch.tensor(values, dtype=dtype, requires_grad=True)
    y_cpu = srt.soft_rank(x_cpu, 0.5, regularization="kl")
    y_cpu.backward(torch.tensor(cot, dtype=dtype))
    side = torch.cuda.Stream()
    # Once beforehand on s, so that torch's caching allocator holds s's blocks
    # and the timed run allocates no device memory.
    with torch.cuda.stream(side):
        torch.autograd.grad(srt.soft_rank(x, 0.5, regularization="kl"), x, c)
    torch.cuda.synchronize()
    default = torch.cuda.default_stream()
    asleep = torch.cuda.Event()
    with torch.cuda.stream(default):
        torch.cuda._sleep(2_000_000_000)  # ~1 s on any current GPU
        asleep.record(default)
    with torch.cuda.stream(side):
        y = srt.soft_rank(x, 0.5, regularization="kl")
        (grad,) = torch.autograd.grad(y, x, c)
        y_host = y.detach().to("cpu", non_blocking=False)
        grad_host = grad.to("cpu", non_blocking=False)
    side.synchronize()
    assert not asleep.query(), (
        "the default stream's sleep ended before s's results were read: the op waited for "
        "the default stream or the device (a synchronisation), or the sleep is too short")
    assert_close(y_host, y_cpu, dtype)
    assert_close(grad_host, x_cpu.grad, dtype)
    torch.cuda.synchronize()


@_gpu_test
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compile(dynamic):
    rng = np.random.default_rng(9)
    values = rng.normal(size=(16, 300))

    def loss(x):
        return (srt.soft_rank(x, 0.5, regularization="kl") ** 2).sum() + srt.soft_sort(x).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    x = _cuda(values, torch.float64).requires_grad_()
    value = compiled(x)
    value.backward()
    x_cpu = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    expected = loss(x_cpu)
    expected.backward()
    assert value.device == x.device
    assert_close(value.reshape(1, 1), expected.reshape(1, 1), torch.float64)
    assert_close(x.grad, x_cpu.grad, torch.float64)


# --- on a GPU: jax ----------------------------------------------------------------------


def _jax_gpu():
    """(jax, softrank.jax, the first GPU device), or skip saying what is missing."""
    jax = require("jax")
    srj = require("softrank.jax")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("jax sees no GPU")
    if not srj._CUDA_FFI_TARGETS:
        pytest.skip("softrank was built without the CUDA core's XLA FFI handlers")
    if CUDA_DEVICES == 0:
        # (as the torch tests: jax may see a GPU that the core's statically
        # linked runtime cannot use, e.g. a driver older than the toolkit)
        pytest.skip("softrank._C.cuda_device_count() is 0 (no driver or device for the core)")
    return jax, srj, devices[0]


@pytest.mark.cuda
@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("direction", ["ascending", "descending"])
def test_jax_gpu_values_and_derivatives(x64, op, reg, direction):
    jax, srj, gpu = _jax_gpu()
    import jax.numpy as jnp

    dtype = torch.float64 if x64 else torch.float32
    rng = np.random.default_rng(10)
    values = adversarial_rows(129, rng)
    tangent = rng.normal(size=values.shape)
    fn = getattr(srj, f"soft_{op}")

    def f(v):
        return fn(v, 0.5, regularization=reg, direction=direction)

    def weighted(v):
        return (f(v) * jnp.asarray(tangent, v.dtype)).sum()

    cpu = jax.devices("cpu")[0]
    with jax_x64(x64):
        results = {}
        for device in (cpu, gpu):
            x = jax.device_put(jnp.asarray(values, jnp.float64 if x64 else jnp.float32), device)
            t = jax.device_put(jnp.asarray(tangent, x.dtype), device)
            value = jax.jit(f)(x)
            grad = jax.jit(jax.grad(weighted))(x)
            primal, tan = jax.jvp(jax.jit(f), (x,), (t,))
            results[device.platform] = (value, grad, tan)
            for array in (value, grad, primal, tan):
                assert array.devices() == {device}
        text = jax.jit(f).lower(jax.device_put(jnp.asarray(values), gpu)).as_text()
        assert "custom_call @softrank_forward_value_v1" in text
    for g, e in zip(results["gpu"], results["cpu"]):
        assert_close(torch.tensor(np.asarray(g)), torch.tensor(np.asarray(e)), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_jax_gpu_hessian(op):
    """Second derivatives on the GPU (the hvp composed of the CUDA jvp / vjp calls)
    against the CPU's (the engine's hvp)."""
    jax, srj, gpu = _jax_gpu()
    import jax.numpy as jnp

    rng = np.random.default_rng(11)
    values = rng.normal(size=30)
    weights = rng.normal(size=30)
    fn = getattr(srj, f"soft_{op}")

    def loss(v):
        return (fn(v, 0.4, regularization="kl") * jnp.asarray(weights, v.dtype)).sum()

    with jax_x64(True):
        results = []
        for device in (jax.devices("cpu")[0], gpu):
            x = jax.device_put(jnp.asarray(values), device)
            hessian = jax.jit(jax.hessian(loss))(x)
            assert hessian.devices() == {device}
            results.append(np.asarray(hessian))
        text = jax.jit(jax.hessian(loss)).lower(jax.device_put(jnp.asarray(values), gpu)).as_text()
        assert "softrank_hvp_v1" not in text and "callback" not in text
    # Each entry sums n = 30 terms at most as large as the largest entry.
    scale = 1.0 + np.abs(results[0]).max() * 30
    assert np.abs(results[1] - results[0]).max() / scale <= 1e-12
