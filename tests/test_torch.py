"""softrank.torch: custom operators, autograd to second order, dtypes, devices, errors.

Agreement with softrank.numpy over ops, regularizations, directions, shapes and
axes is in test_cross_adapter.py; torch.compile in test_torch_compile.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import softrank.numpy as srn
from frameworks import require

torch = require("torch")
import softrank.torch as srt  # noqa: E402
from softrank import _engine  # noqa: E402

OPS = {"rank": srt.soft_rank, "sort": srt.soft_sort}
NUMPY_OPS = {"rank": srn.soft_rank, "sort": srn.soft_sort}
REGULARIZATIONS = ("l2", "kl")
DIRECTIONS = ("ascending", "descending")


@pytest.fixture(params=["eager", "dispatcher"])
def path(request, monkeypatch):
    """Run a test through the eager fast path and through torch.ops.softrank.*."""
    if request.param == "dispatcher":
        monkeypatch.setattr(srt, "_eager", lambda tensor: False)
    return request.param


def _x(shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


# --- gradients ---------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("regularization", REGULARIZATIONS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_gradcheck_and_gradgradcheck(op, regularization, direction, path):
    # eps chosen so that rows mix singleton and pooled PAV blocks.
    x = _x((3, 7), seed=1).requires_grad_(True)
    for eps, dim in ((0.8, -1), (2.5, 0)):
        def fn(t):
            return OPS[op](t, eps, regularization=regularization, direction=direction, dim=dim)

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_kl_second_derivative_is_nonzero_and_l2_is_zero():
    x = _x((1, 8), seed=2).requires_grad_(True)
    for op in OPS:
        hessians = {
            reg: torch.autograd.functional.hessian(
                lambda t: (OPS[op](t, 2.0, regularization=reg) ** 3).sum(), x
            )
            for reg in REGULARIZATIONS
        }
        # l2: the Jacobian is locally constant, so only the cube's own curvature remains.
        out = OPS[op](x, 2.0, regularization="l2").detach()
        jac = torch.autograd.functional.jacobian(lambda t: OPS[op](t, 2.0), x).reshape(8, 8)
        expected_l2 = jac.T @ torch.diag(6 * out.reshape(8)) @ jac
        torch.testing.assert_close(hessians["l2"].reshape(8, 8), expected_l2)
        assert not torch.allclose(hessians["kl"], hessians["l2"])


def test_second_derivative_hits_the_hvp_operator(path):
    x = _x((2, 6), seed=3).requires_grad_(True)
    out = srt.soft_rank(x, 1.5, regularization="kl")
    (grad,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    assert grad.grad_fn is not None
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert torch.isfinite(second).all()


def test_third_derivative_raises():
    x = _x((1, 5), seed=4).requires_grad_(True)
    (g,) = torch.autograd.grad(srt.soft_rank(x, regularization="kl").pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(h.sum(), x)


def test_gradient_matches_numpy_vjp(path):
    x = _x((4, 3, 5), seed=5).requires_grad_(True)
    cotangent = _x((4, 3, 5), seed=6)
    for op, vjp in (("rank", srn.soft_rank_vjp), ("sort", srn.soft_sort_vjp)):
        out = OPS[op](x, 0.6, regularization="kl", direction="descending", dim=1)
        (grad,) = torch.autograd.grad(out, x, cotangent)
        want = vjp(x.detach().numpy(), cotangent.numpy(), 0.6, regularization="kl",
                   direction="descending", axis=1)
        np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_in_place_change_of_the_output_is_caught():
    x = _x((2, 5), seed=7).requires_grad_(True)
    out = srt.soft_rank(x, regularization="kl")
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --- the operators -------------------------------------------------------------


def _operator_samples(op, reg):
    x = _x((3, 6), seed=8)
    out, perm, block_start = torch.ops.softrank.soft_forward(x, op, reg, False, 1.3)
    cotangent, tangent = _x((3, 6), seed=9), _x((3, 6), seed=10)
    params = (op, reg, False, 1.3)
    x_grad = x.clone().requires_grad_(True)
    c_grad = cotangent.clone().requires_grad_(True)
    return {
        "soft_forward": (x_grad,) + params,
        "soft_vjp": (x_grad, out, perm, block_start, c_grad) + params,
        "soft_jvp": (x_grad, out, perm, block_start, c_grad) + params,
        "soft_hvp": (x, out, perm, block_start, cotangent, tangent) + params,
    }


@pytest.mark.parametrize("reg", [_engine.REG_L2, _engine.REG_KL])
@pytest.mark.parametrize("op", [_engine.OP_RANK, _engine.OP_SORT])
@pytest.mark.parametrize("name", ["soft_forward", "soft_vjp", "soft_jvp", "soft_hvp"])
def test_opcheck(name, op, reg):
    args = _operator_samples(op, reg)[name]
    torch.library.opcheck(getattr(torch.ops.softrank, name).default, args)


def test_forward_operator_outputs():
    x = _x((2, 5), seed=11)
    out, perm, block_start = torch.ops.softrank.soft_forward(x, _engine.OP_RANK, _engine.REG_L2, False, 0.1)
    assert perm.dtype == torch.int32 and block_start.dtype == torch.int32
    assert not out.requires_grad
    torch.testing.assert_close(out, srt.soft_rank(x, 0.1))


def test_cpu_input_reaches_the_engine_without_copies(monkeypatch, path):
    seen = {}
    real = _engine.engine()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def soft_forward(x, *args):
            seen["x"] = x.__array_interface__["data"][0]
            result = real.soft_forward(x, *args)
            seen["out"] = result[0].__array_interface__["data"][0]
            return result

        @staticmethod
        def soft_forward_value(x, *args):  # the no-grad path: no state kept
            seen["x"] = x.__array_interface__["data"][0]
            result = real.soft_forward_value(x, *args)
            seen["out"] = result.__array_interface__["data"][0]
            return result

    monkeypatch.setattr(_engine, "_engine", Spy())
    x = _x((4, 50), seed=12, dtype=torch.float32)
    for requires_grad in (False, True):
        seen.clear()
        out = srt.soft_rank(x.requires_grad_(requires_grad))
        assert seen["x"] == x.data_ptr()
        assert seen["out"] == out.data_ptr()


# --- shapes, dtypes, devices ----------------------------------------------------


def test_any_dim_and_non_contiguous_input(path):
    base = _x((6, 8, 10), seed=13)
    views = [base.transpose(0, 2), base[:, ::2, 1:], base.permute(1, 2, 0)]
    for view in views:
        assert not view.is_contiguous()
        for dim in range(-view.dim(), view.dim()):
            for op in OPS:
                got = OPS[op](view, 0.4, regularization="kl", dim=dim)
                want = NUMPY_OPS[op](view.numpy(), 0.4, regularization="kl", axis=dim)
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
                assert got.shape == view.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float32(dtype, path):
    x = _x((3, 20), seed=14, dtype=torch.float32).to(dtype).requires_grad_(True)
    for op in OPS:
        out = OPS[op](x, 0.5, dim=0)
        assert out.dtype == dtype
        want = OPS[op](x.detach().float(), 0.5, dim=0).to(dtype)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(out.float().sum(), x)
        assert grad.dtype == dtype


def test_float32_is_computed_in_float32():
    x = _x((2, 30), seed=15, dtype=torch.float32)
    out = srt.soft_sort(x, 0.3, regularization="kl")
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), srn.soft_sort(x.numpy(), 0.3, regularization="kl"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_raise(dtype):
    x = torch.zeros(5, dtype=dtype)
    with pytest.raises(TypeError, match=r"^x must have a floating dtype"):
        srt.soft_rank(x)


def test_complex_raises():
    with pytest.raises(TypeError, match=r"^x must have a real floating dtype"):
        srt.soft_sort(torch.zeros(4, dtype=torch.complex64))


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        srt.soft_rank([1.0, 2.0])


def test_bad_arguments_name_themselves():
    x = _x((3, 4))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        srt.soft_rank(torch.tensor(1.0))
    for eps, error in ((-1.0, ValueError), (float("nan"), ValueError), ("a", TypeError),
                       (torch.tensor([1.0, 2.0]), TypeError)):
        with pytest.raises(error, match="eps"):
            srt.soft_rank(x, eps)
    with pytest.raises(ValueError, match="regularization"):
        srt.soft_rank(x, regularization="l1")
    with pytest.raises(ValueError, match="direction"):
        srt.soft_sort(x, direction="up")
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        srt.soft_rank(x, dim=2)
    with pytest.raises(ValueError, match="dim=-3 is out of range"):
        srt.soft_rank(x, dim=-3)
    with pytest.raises(TypeError, match="dim must be an int"):
        srt.soft_rank(x, dim=1.0)


def test_eps_as_tensor_or_numpy_scalar():
    x = _x((2, 6), seed=16)
    want = srt.soft_rank(x, 0.25)
    for eps in (torch.tensor(0.25), np.float64(0.25), 0.25,
                torch.tensor(0.25, requires_grad=True).detach()):
        torch.testing.assert_close(srt.soft_rank(x, eps), want, rtol=0, atol=0)
    torch.testing.assert_close(srt.soft_rank(x, 1), srt.soft_rank(x, 1.0), rtol=0, atol=0)
    # An eps that requires a gradient would get None back for it: refused, as
    # softrank.jax refuses a traced eps and softrank.tensorflow a watched one.
    with pytest.raises(TypeError, match="eps must not require a gradient"):
        srt.soft_rank(x, torch.tensor(0.25, requires_grad=True))


def test_a_learnable_eps_or_q_is_read_where_no_gradient_is_recorded():
    """An eps or q that requires a gradient (an nn.Parameter temperature, in
    evaluation) was refused under no_grad and inference_mode too, where autograd
    records nothing and no derivative can be asked for. Where it records, and
    under a torch.func.grad started inside no_grad, it is still refused."""
    x = _x((2, 6), seed=17)
    eps = torch.nn.Parameter(torch.tensor(0.25, dtype=torch.float64))
    q = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            torch.testing.assert_close(srt.soft_rank(x, eps), srt.soft_rank(x, 0.25), rtol=0, atol=0)
            torch.testing.assert_close(srt.soft_quantile(x, q, eps), srt.soft_quantile(x, 0.3, 0.25),
                                       rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(TypeError, match="eps must not require a gradient"):
        torch.func.grad(lambda e: srt.soft_sort(x, e).sum())(torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="eps must not require a gradient"):
        srt.soft_rank(x, eps)
    with pytest.raises(TypeError, match="q must not require a gradient"):
        srt.soft_quantile(x, q, 0.25)


def test_a_further_argument_that_is_not_numbers_is_named():
    # torch.as_tensor's own errors ("new(): invalid data type 'str'", "Could not
    # infer dtype of object") named neither the argument nor what it takes.
    x = _x((2, 4), seed=18)
    for value in ("abcd", object(), [[1.0, "a", 2.0, 3.0]] * 2):
        with pytest.raises(TypeError, match="w must be a tensor or an array_like of real numbers"):
            srt.permutahedron_projection(x, value)
        with pytest.raises(TypeError, match="target must be a tensor or an array_like of real"):
            srt.spearman(x, value)
        with pytest.raises(TypeError, match="weights must be a tensor or an array_like of real"):
            srt.isotonic_regression(x, weights=value)
    # A numpy array with negative strides is numbers too (torch.as_tensor refused it).
    w = np.arange(1.0, 5.0)
    torch.testing.assert_close(srt.permutahedron_projection(x, w[::-1]),
                               srt.permutahedron_projection(x, w[::-1].copy()), rtol=0, atol=0)


def test_limits_eps_zero_and_infinity():
    x = torch.tensor([[3.0, 1.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    hard = srt.soft_rank(x, 0.0)
    torch.testing.assert_close(hard, torch.tensor([[4.0, 1.5, 3.0, 1.5]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(hard.sum(), x)
    assert (grad == 0).all()
    torch.testing.assert_close(srt.soft_rank(x, math.inf), torch.full_like(x, 2.5))
    torch.testing.assert_close(srt.soft_sort(x, 0.0, direction="descending"),
                               torch.tensor([[3.0, 2.0, 1.0, 1.0]], dtype=torch.float64))


def test_empty_and_single_element_rows(path):
    for shape in ((0,), (3, 0), (0, 5), (4, 1)):
        x = torch.ones(shape, dtype=torch.float64, requires_grad=True)
        for op in OPS:
            out = OPS[op](x)
            assert out.shape == x.shape
            out.sum().backward()
    torch.testing.assert_close(srt.soft_rank(torch.tensor([[7.0]])), torch.tensor([[1.0]]))
    torch.testing.assert_close(srt.soft_sort(torch.tensor([[7.0]])), torch.tensor([[7.0]]))


def test_nan_row_is_nan_other_rows_exact(path):
    x = _x((3, 5), seed=17)
    x[1, 2] = float("nan")
    out = srt.soft_rank(x, 0.5)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], srt.soft_rank(x[[0, 2]], 0.5), rtol=0, atol=0)


def test_no_grad_and_inference_mode():
    x = _x((2, 5), seed=18).requires_grad_(True)
    with torch.no_grad():
        assert not srt.soft_rank(x).requires_grad
    with torch.inference_mode():
        assert not srt.soft_sort(x).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip_is_exact_and_returns_on_device():
    x = _x((4, 33), seed=19).cuda().requires_grad_(True)
    for op in OPS:
        for reg in REGULARIZATIONS:
            out = OPS[op](x, 0.7, regularization=reg, dim=0)
            assert out.device == x.device
            torch.testing.assert_close(out.cpu(), OPS[op](x.detach().cpu(), 0.7, regularization=reg, dim=0),
                                       rtol=0, atol=0)
            (grad,) = torch.autograd.grad(out.pow(2).sum(), x)
            assert grad.device == x.device
    xh = x.detach().half().requires_grad_(True)
    assert srt.soft_rank(xh).device == x.device
