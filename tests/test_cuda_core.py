"""The CUDA core's entry points in softrank._C (csrc/cuda, bindings/module.cpp).

Everything here but the last section runs on any machine: the build flag, the
device count, the argument checks (made before the device is touched) and the
errors of a build or a machine without CUDA. The last section compares the
device forward pass and products with the CPU engine where torch sees a GPU.
"""
from __future__ import annotations

import ctypes
import math
import os
import zlib

import numpy as np
import pytest

from softrank._engine import available_backends

pytestmark = pytest.mark.skipif("native" not in available_backends(), reason="needs softrank._C")

CUDA_TARGETS = {"softrank_forward_v1", "softrank_forward_value_v1", "softrank_vjp_v1", "softrank_jvp_v1"}
FAKE = 1 << 20  # a non-null address that is never dereferenced: the calls fail before


def _C():
    from softrank import _C

    return _C


def forward_args(**override):
    args = dict(
        dtype="float32", x=FAKE, rows=4, n=10, op=0, reg=0, descending=False, eps=1.0, out=FAKE,
        perm=FAKE, block_start=FAKE, workspace=FAKE, workspace_bytes=1 << 40, stream=0,
    )
    args.update(override)
    return args


def product_args(**override):
    args = dict(
        dtype="float64", x=FAKE, out=FAKE, perm=FAKE, block_start=FAKE, vec=FAKE, rows=4, n=10,
        op=1, reg=1, descending=True, eps=0.5, transpose=True, result=FAKE, workspace=FAKE,
        workspace_bytes=1 << 40, stream=0,
    )
    args.update(override)
    return args


@pytest.mark.skipif(
    os.environ.get("SOFTRANK_EXPECT_CUDA") not in ("0", "1"),
    reason="SOFTRANK_EXPECT_CUDA (1 or 0: whether the build had a CUDA compiler) not set; .ci/run sets it",
)
def test_cuda_compiled_matches_the_build():
    assert _C().cuda_compiled() is (os.environ["SOFTRANK_EXPECT_CUDA"] == "1")


def test_cuda_ffi_targets_are_the_cpu_names():
    c = _C()
    targets = c.xla_ffi_cuda_targets()
    if not c.cuda_compiled():
        assert targets == {}
        return
    assert set(targets) == CUDA_TARGETS
    assert CUDA_TARGETS <= set(c.xla_ffi_targets())
    # Handlers of their own, not the CPU ones under the same names.
    address = ctypes.pythonapi.PyCapsule_GetPointer
    address.restype = ctypes.c_void_p
    address.argtypes = [ctypes.py_object, ctypes.c_char_p]
    cpu = c.xla_ffi_targets()
    cuda = {address(targets[name], None) for name in CUDA_TARGETS}
    assert len(cuda) == len(CUDA_TARGETS) and 0 not in cuda and None not in cuda
    assert not cuda & {address(cpu[name], None) for name in CUDA_TARGETS}


def test_device_count_never_raises():
    c = _C()
    count = c.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    assert c.cuda_device_count() == count  # a failed query leaves no error behind
    if not c.cuda_compiled() or not os.path.exists("/dev/nvidiactl"):
        assert count == 0
    # The kernel-image check of the current device: never raises either.
    runs, capability = c.cuda_device_runs_kernels(), c.cuda_device_capability()
    assert isinstance(runs, bool) and isinstance(capability, int)
    assert c.cuda_device_count() == count
    if count == 0:
        assert not runs and capability == -1
    else:
        assert capability >= 10


def test_without_the_core_every_op_raises_runtime_error():
    c = _C()
    if c.cuda_compiled():
        pytest.skip("built with the CUDA core")
    for call in (
        lambda: c.cuda_soft_forward_workspace("float32", 4, 10),
        lambda: c.cuda_soft_product_workspace("float32", 4, 10),
        lambda: c.cuda_soft_forward(**forward_args()),
        lambda: c.cuda_soft_product(**product_args()),
    ):
        with pytest.raises(RuntimeError, match="built without the CUDA core"):
            call()


BAD_FORWARD = [
    ("dtype", dict(dtype="float16")),
    ("dtype", dict(dtype="int32")),
    ("rows", dict(rows=-1)),
    ("n", dict(n=0)),
    ("n", dict(n=-3)),
    ("n", dict(n=2**31)),
    ("rows", dict(rows=2**40, n=2**10)),
    ("op", dict(op=2)),
    ("reg", dict(reg=-1)),
    ("eps", dict(eps=-1.0)),
    ("eps", dict(eps=math.nan)),
    ("x", dict(x=0)),
    ("out", dict(out=0)),
    ("perm", dict(perm=0)),
    ("block_start", dict(block_start=0)),
    ("workspace", dict(workspace=0)),
]

BAD_PRODUCT = [
    ("dtype", dict(dtype="float")),
    ("rows", dict(rows=-2)),
    ("n", dict(n=0)),
    ("op", dict(op=7)),
    ("reg", dict(reg=2)),
    ("eps", dict(eps=-0.5)),
    ("eps", dict(eps=math.nan)),
    ("x", dict(x=0)),
    ("out", dict(out=0)),
    ("perm", dict(perm=0)),
    ("block_start", dict(block_start=0)),
    ("vec", dict(vec=0)),
    ("result", dict(result=0)),
    ("workspace", dict(workspace=0)),
]


def _require_core():
    if not _C().cuda_compiled():
        pytest.skip("built without the CUDA core (its ops raise RuntimeError first)")


@pytest.mark.parametrize("name,override", BAD_FORWARD)
def test_forward_bad_argument_raises_value_error_naming_it(name, override):
    _require_core()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _C().cuda_soft_forward(**forward_args(**override))


@pytest.mark.parametrize("name,override", BAD_PRODUCT)
def test_product_bad_argument_raises_value_error_naming_it(name, override):
    _require_core()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _C().cuda_soft_product(**product_args(**override))


@pytest.mark.parametrize("fn", ["cuda_soft_forward_workspace", "cuda_soft_product_workspace"])
@pytest.mark.parametrize(
    "name,args", [("dtype", ("float16", 4, 10)), ("rows", ("float32", -1, 10)), ("n", ("float64", 4, 0))]
)
def test_workspace_bad_argument_raises_value_error_naming_it(fn, name, args):
    _require_core()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        getattr(_C(), fn)(*args)


def test_empty_batch_touches_nothing():
    # rows = 0: no work and no scratch, null pointers allowed, on any machine.
    _require_core()
    c = _C()
    assert c.cuda_soft_forward_workspace("float32", 0, 10) == 0
    assert c.cuda_soft_product_workspace("float64", 0, 10) == 0
    zeros = dict(x=0, out=0, perm=0, block_start=0, workspace=0, workspace_bytes=0)
    assert c.cuda_soft_forward(**forward_args(rows=0, **zeros)) is None
    assert c.cuda_soft_product(**product_args(rows=0, vec=0, result=0, **zeros)) is None


def test_without_a_device_the_ops_raise_runtime_error():
    _require_core()
    c = _C()
    if c.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present (the fake addresses would be dereferenced)")
    for call in (
        lambda: c.cuda_soft_forward_workspace("float32", 4, 10),
        lambda: c.cuda_soft_product_workspace("float64", 4, 10),
        lambda: c.cuda_soft_forward(**forward_args()),
        lambda: c.cuda_soft_product(**product_args()),
    ):
        with pytest.raises(RuntimeError, match="CUDA"):
            call()
    assert c.cuda_device_count() == 0


# --- On a GPU: the device results against the CPU engine ---------------------------


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not _C().cuda_compiled():
        pytest.skip("built without the CUDA core")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


def _rows(dtype, rows, n, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((rows, n))
    elif kind == "ties":
        x = rng.integers(0, 4, (rows, n)).astype(float)
    elif kind == "constant":
        x = np.full((rows, n), 1.5)
    elif kind == "presorted":
        # Decreasing by pi / 3, not 1: with a step of 1 (that of rho) every kl
        # merge test at eps = 1 is an exact tie, decided by the last bit of
        # exp, where the GPU's portable exp and a host's FMA exp may differ.
        x = np.tile(np.arange(n, 0, -1, dtype=float) * (math.pi / 3), (rows, 1))
    elif kind == "signed_zeros":
        x = rng.choice([0.0, -0.0, 1.0], (rows, n))
    else:  # "nan": every other row holds a NaN or an inf
        x = rng.standard_normal((rows, n))
        x[::2, n // 2] = np.nan
        x[1::4, 0] = np.inf
    return np.ascontiguousarray(x, dtype=dtype)


def _device_forward(torch, x, op, reg, descending, eps):
    c = _C()
    rows, n = x.shape
    dtype = str(x.dtype)
    xd = torch.from_numpy(x).cuda()
    out = torch.empty_like(xd)
    perm = torch.empty(x.shape, dtype=torch.int32, device="cuda")
    blocks = torch.empty_like(perm)
    nbytes = c.cuda_soft_forward_workspace(dtype, rows, n)
    work = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    c.cuda_soft_forward(dtype, xd.data_ptr(), rows, n, op, reg, descending, eps, out.data_ptr(),
                        perm.data_ptr(), blocks.data_ptr(), work.data_ptr(), nbytes, stream)
    torch.cuda.synchronize()
    return xd, out, perm, blocks


def _device_product(torch, xd, out, perm, blocks, vec, op, reg, descending, eps, transpose):
    c = _C()
    rows, n = vec.shape
    dtype = str(vec.dtype)
    vd = torch.from_numpy(vec).cuda()
    result = torch.empty_like(vd)
    nbytes = c.cuda_soft_product_workspace(dtype, rows, n)
    work = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    c.cuda_soft_product(dtype, xd.data_ptr(), out.data_ptr(), perm.data_ptr(), blocks.data_ptr(),
                        vd.data_ptr(), rows, n, op, reg, descending, eps, transpose,
                        result.data_ptr(), work.data_ptr(), nbytes, stream)
    torch.cuda.synchronize()
    return result.cpu().numpy()


@pytest.mark.cuda
def test_the_device_runs_the_core_s_kernels():
    """The GPU check machine's device has a kernel image (the fallback's
    question, asked of a GPU the core was built for) and reports its capability
    as torch does."""
    torch = _torch_cuda()
    c = _C()
    torch.cuda.init()
    assert c.cuda_device_runs_kernels()
    major, minor = torch.cuda.get_device_capability()
    assert c.cuda_device_capability() == 10 * major + minor


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["random", "ties", "constant", "presorted", "signed_zeros", "nan"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (3, 7), (64, 200), (1, 5000)])
def test_device_matches_the_cpu_engine(dtype, kind, shape):
    torch = _torch_cuda()
    c = _C()
    tol = 1e-5 if dtype == "float32" else 1e-12
    x = _rows(dtype, *shape, kind, seed=zlib.crc32(f"{dtype}{kind}{shape}".encode()))
    rng = np.random.default_rng(7)
    vec = rng.standard_normal(shape).astype(dtype)
    for op in (0, 1):
        for reg in (0, 1):
            for descending in (False, True):
                for eps in (0.0, 0.1, 1.0, math.inf):
                    out, perm, blocks = c.soft_forward(x, op, reg, descending, eps)
                    xd, out_d, perm_d, blocks_d = _device_forward(torch, x, op, reg, descending, eps)
                    np.testing.assert_array_equal(perm_d.cpu().numpy(), perm)
                    np.testing.assert_array_equal(blocks_d.cpu().numpy(), blocks)
                    # (absolute tolerances in units of the largest value: a
                    # rank product of a row of 5000 reaches 5000, whose ulp
                    # in float64 is about 1e-12)
                    scale = max(1.0, float(np.nanmax(np.abs(out), initial=0.0)))
                    np.testing.assert_allclose(out_d.cpu().numpy(), out, rtol=tol,
                                               atol=tol * scale)
                    for transpose in (True, False):
                        expected = (c.soft_vjp if transpose else c.soft_jvp)(
                            x, out, perm, blocks, vec, op, reg, descending, eps
                        )
                        got = _device_product(torch, xd, out_d, perm_d, blocks_d, vec, op, reg,
                                              descending, eps, transpose)
                        scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
                        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 7), (2, 70_001)])
def test_a_forged_perm_stays_inside_its_row_on_the_device(dtype, shape):
    # A device op cannot check the state it is handed without a host
    # synchronisation: the products read perm clamped (soft_row.h,
    # ClampedPositions), so a forged one gives unspecified values, never an
    # illegal address, which would poison the CUDA context for every later op.
    torch = _torch_cuda()
    c = _C()
    x = _rows(dtype, *shape, "ties", seed=5)
    vec = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    int_max, int_min = 2**31 - 1, -(2**31)
    for op in (0, 1):
        for reg in (0, 1):
            xd, out_d, perm_d, blocks_d = _device_forward(torch, x, op, reg, False, 0.7)
            for forged in (-1, shape[1], int_max, int_min):
                bad = perm_d.clone()
                bad[:, ::3] = forged
                for transpose in (True, False):
                    _device_product(torch, xd, out_d, bad, blocks_d, vec, op, reg, False, 0.7,
                                    transpose)
            # The context still works, and the state the forward made still
            # gives the CPU engine's products.
            out, perm, blocks = c.soft_forward(x, op, reg, False, 0.7)
            expected = c.soft_vjp(x, out, perm, blocks, vec, op, reg, False, 0.7)
            got = _device_product(torch, xd, out_d, perm_d, blocks_d, vec, op, reg, False, 0.7,
                                  True)
            tol = 1e-5 if dtype == "float32" else 1e-12
            scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
            np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["random", "ties", "constant", "nan"])
@pytest.mark.parametrize(
    "shape", [(3, 513), (5, 4096), (128, 4096), (2, 70_001), (2, 2**20 + 3)]
)
def test_device_long_rows_match_the_cpu_engine(dtype, kind, shape):
    # Rows of 512 items or more are a team's on the device: one block of
    # threads per row, or the whole grid (a cooperative launch) for a few rows
    # of 2^20 or more, each row cut into PAV chunks and product pieces of about
    # one per thread (csrc/cuda/soft_ops.cu, "Schedules"). The blocks are the
    # CPU's; a block sum over other chunks rounds otherwise, so the tolerance is
    # relative to the row's largest value. The sort: fewer than 128 rows of
    # 4096 or more are sorted whole, by key and then by row (ties across rows:
    # "ties", "constant"); (3, 513) and (128, 4096) by the segmented sort.
    torch = _torch_cuda()
    c = _C()
    tol = 1e-5 if dtype == "float32" else 1e-12
    x = _rows(dtype, *shape, kind, seed=zlib.crc32(f"long{dtype}{kind}{shape}".encode()))
    x *= 50.0  # spread, so that both singleton and pooled blocks occur
    vec = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    for op, reg in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for eps in (0.0, 1.0, 1e4):
            out, perm, blocks = c.soft_forward(x, op, reg, True, eps)
            xd, out_d, perm_d, blocks_d = _device_forward(torch, x, op, reg, True, eps)
            np.testing.assert_array_equal(perm_d.cpu().numpy(), perm)
            np.testing.assert_array_equal(blocks_d.cpu().numpy(), blocks)
            scale = max(1.0, float(np.nanmax(np.abs(out), initial=0.0)))
            np.testing.assert_allclose(out_d.cpu().numpy(), out, rtol=tol, atol=tol * scale)
            for transpose in (True, False):
                expected = (c.soft_vjp if transpose else c.soft_jvp)(
                    x, out, perm, blocks, vec, op, reg, True, eps)
                got = _device_product(torch, xd, out_d, perm_d, blocks_d, vec, op, reg, True,
                                      eps, transpose)
                scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
                np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
def test_device_workspace_too_small_raises_value_error():
    torch = _torch_cuda()
    c = _C()
    nbytes = c.cuda_soft_forward_workspace("float32", 4, 10)
    assert nbytes > 0
    with pytest.raises(ValueError, match=r"^workspace_bytes\b"):
        x = torch.zeros((4, 10), device="cuda")
        c.cuda_soft_forward("float32", x.data_ptr(), 4, 10, 0, 0, False, 1.0, x.data_ptr(),
                            x.data_ptr(), x.data_ptr(), x.data_ptr(), nbytes - 1, 0)


FORCED_SORT_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_cuda_core as t
import torch
c = t._C()
sizes = {}
for dtype in ("float32", "float64"):
    tol = 1e-5 if dtype == "float32" else 1e-12
    for shape in t.FORCED_SORT_SHAPES:
        sizes[f"{dtype}{shape}"] = c.cuda_soft_forward_workspace(dtype, *shape)
        for kind in ("random", "ties", "constant", "nan"):
            x = t._rows(dtype, *shape, kind, seed=len(sizes))
            for op in (0, 1):
                for reg in (0, 1):
                    for descending in (False, True):
                        out, perm, blocks = c.soft_forward(x, op, reg, descending, 1.0)
                        _, out_d, perm_d, blocks_d = t._device_forward(torch, x, op, reg,
                                                                       descending, 1.0)
                        what = f"{dtype} {shape} {kind} op={op} reg={reg} desc={descending}"
                        np.testing.assert_array_equal(perm_d.cpu().numpy(), perm, err_msg=what)
                        np.testing.assert_array_equal(blocks_d.cpu().numpy(), blocks, err_msg=what)
                        np.testing.assert_allclose(out_d.cpu().numpy(), out, rtol=tol, atol=tol,
                                                   err_msg=what)
print(json.dumps(sizes))
"""
# Shapes whose default sort is the segmented one ((64, 200), (300, 100)) and
# the whole one ((5, 4096)); (2, 3) is tiny.
FORCED_SORT_SHAPES = [(2, 3), (64, 200), (300, 100), (5, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["segmented", "whole"])
def test_device_forced_sort_method_matches_the_cpu_engine(method):
    # SOFTRANK_CUDA_SORT (read once per process, for benchmarks/gpu_tune.py)
    # forces how a batch is sorted: a thread block per row, or whole by key and
    # then by row. Either must give the CPU's permutation (ties in column order,
    # ties across rows) and outputs; the workspace sizes show that the setting
    # took effect (each method asks CUB for its own temporary storage).
    import json

    from child_python import run_python

    _torch_cuda()
    env = dict(os.environ, SOFTRANK_CUDA_SORT=method)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = run_python(FORCED_SORT_SCRIPT, here, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    forced = json.loads(proc.stdout.strip().splitlines()[-1])
    c = _C()
    default = {f"{dtype}{shape}": c.cuda_soft_forward_workspace(dtype, *shape)
               for dtype in ("float32", "float64") for shape in FORCED_SORT_SHAPES}
    assert forced.keys() == default.keys()
    # Where the default method is the other one, the sizes differ.
    changed = [(64, 200), (300, 100)] if method == "whole" else [(5, 4096)]
    for dtype in ("float32", "float64"):
        for shape in changed:
            key = f"{dtype}{shape}"
            assert forced[key] != default[key], (key, forced[key])
