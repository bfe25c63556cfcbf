"""softrank.torch's operators on the permutahedron: values, gradients, transforms, limits.

References, never softrank.torch's own backward:
- values: softrank.numpy (itself checked against brute force in the numpy tests),
  scipy.stats.spearmanr, np.quantile, np.median and a brute-force top-k indicator;
- first derivatives: central finite differences (float64) of the torch function
  and softrank.numpy's ``*_with_vjp`` pullbacks;
- second derivatives: nested fourth-order central differences (torch_fd.fd_hessian,
  which checks itself at two steps), and torch's numerical gradgradcheck;
- batched and compiled calls: the unbatched eager call.
"""
from __future__ import annotations

import typing

import numpy as np
import pytest

from frameworks import require

torch = require("torch")
import softrank.numpy as srn  # noqa: E402
import softrank.torch as srt  # noqa: E402
from torch_fd import HESSIAN_ATOL, HESSIAN_RTOL, contract, fd_hessian, fd_jacobian  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from softrank import _engine, _operators  # noqa: E402
from softrank._types import Regularization  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning"),
]

REGS = ["l2", "kl"]
RTOL, ATOL = 1e-6, 1e-7  # against finite differences (torch_fd.STEP)
RTOL2, ATOL2 = HESSIAN_RTOL, HESSIAN_ATOL  # second derivatives (torch_fd.fd_hessian)
PUBLIC = ["permutahedron_projection", "soft_topk_mask", "spearman", "soft_quantile", "soft_median",
          "isotonic_regression"]


def _x(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _positive(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def _pull(jacobian, cotangent):
    """``c^T J`` for a Jacobian of shape ``out.shape + x.shape``."""
    return (jacobian * cotangent.reshape(*cotangent.shape, *([1] * (jacobian.dim() - cotangent.dim())))
            ).sum(tuple(range(cotangent.dim())))


# --- the operators, each as (torch call, numpy call, numpy call with its pullback) ---------
# ``extra`` holds the further arguments for an input of a given shape and dim.


def _extra(shape, dim, seed=50):
    n = shape[dim]
    return {
        "w": _x((n,), seed) * 2.0,
        "w_full": _x(shape, seed + 1) * 2.0,
        "target": _x(shape, seed + 2),
        "weights": _positive(shape, seed + 3),
    }


def _np(extra):
    return {key: value.numpy() for key, value in extra.items()}


OPERATORS = {
    "projection": (
        lambda x, e, reg, dim: srt.permutahedron_projection(x, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.permutahedron_projection_with_vjp(x, regularization=reg, axis=ax),
    ),
    "projection_w": (
        lambda x, e, reg, dim: srt.permutahedron_projection(x, e["w"], regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.permutahedron_projection_with_vjp(x, e["w"], regularization=reg,
                                                                    axis=ax),
    ),
    "projection_w_full": (
        lambda x, e, reg, dim: srt.permutahedron_projection(x, e["w_full"], regularization=reg,
                                                            dim=dim),
        lambda x, e, reg, ax: srn.permutahedron_projection_with_vjp(x, e["w_full"], regularization=reg,
                                                                    axis=ax),
    ),
    "topk": (
        lambda x, e, reg, dim: srt.soft_topk_mask(x, 2, 0.7, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.soft_topk_mask_with_vjp(x, 2, 0.7, regularization=reg, axis=ax),
    ),
    "spearman": (
        lambda x, e, reg, dim: srt.spearman(x, e["target"], 0.6, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.spearman_with_vjp(x, e["target"], 0.6, regularization=reg, axis=ax),
    ),
    "quantile": (
        lambda x, e, reg, dim: srt.soft_quantile(x, 0.3, 0.6, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.soft_quantile_with_vjp(x, 0.3, 0.6, regularization=reg, axis=ax),
    ),
    "quantiles": (
        lambda x, e, reg, dim: srt.soft_quantile(x, [0.1, 0.5, 0.95], 0.6, regularization=reg,
                                                 dim=dim),
        lambda x, e, reg, ax: srn.soft_quantile_with_vjp(x, [0.1, 0.5, 0.95], 0.6,
                                                         regularization=reg, axis=ax),
    ),
    "median": (
        lambda x, e, reg, dim: srt.soft_median(x, 0.6, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.soft_median_with_vjp(x, 0.6, regularization=reg, axis=ax),
    ),
    "isotonic": (
        lambda x, e, reg, dim: srt.isotonic_regression(x, regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.isotonic_regression_with_vjp(x, regularization=reg, axis=ax),
    ),
    "isotonic_weights_decreasing": (
        lambda x, e, reg, dim: srt.isotonic_regression(x, weights=e["weights"], increasing=False,
                                                       regularization=reg, dim=dim),
        lambda x, e, reg, ax: srn.isotonic_regression_with_vjp(
            x, weights=e["weights"], increasing=False, regularization=reg, axis=ax),
    ),
}
NAMES = list(OPERATORS)
CASES = [(name, reg) for name in NAMES for reg in REGS]


def _torch_fn(name, reg, extra, dim=-1):
    return lambda t: OPERATORS[name][0](t, extra, reg, dim)


def _numpy_with_vjp(name, reg, extra, x, axis=-1):
    value, vjp = OPERATORS[name][1](x.numpy(), _np(extra), reg, axis)

    def grad_x(cotangent):
        grad = vjp(cotangent.numpy())
        return torch.from_numpy(np.asarray(grad[0] if isinstance(grad, tuple) else grad))

    return torch.from_numpy(np.asarray(value)), grad_x


def _spread(x):
    """Scaled so that the PAV pools some entries and leaves others alone."""
    return 1.5 * x


# --- values ----------------------------------------------------------------------


@pytest.mark.parametrize("shape, dim", [((7,), 0), ((3, 6), -1), ((6, 3), 0), ((2, 5, 4), 1)])
@pytest.mark.parametrize("name, reg", CASES)
def test_values_equal_numpy(name, reg, shape, dim):
    x = _spread(_x(shape, seed=1))
    extra = _extra(shape, dim)
    got = _torch_fn(name, reg, extra, dim)(x)
    want, _ = _numpy_with_vjp(name, reg, extra, x, dim)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, reg", CASES)
def test_float32_values_equal_numpy_float32(name, reg):
    x = _spread(_x((4, 6), seed=2))
    extra = _extra((4, 6), -1)
    got = _torch_fn(name, reg, {k: v.float() for k, v in extra.items()})(x.float())
    value, _ = OPERATORS[name][1](x.float().numpy(), {k: v.float().numpy() for k, v in extra.items()},
                                  reg, -1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(np.asarray(value)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(name, dtype):
    x = _spread(_x((3, 6), seed=3)).to(dtype)
    extra = _extra((3, 6), -1)
    got = _torch_fn(name, "l2", extra)(x)
    assert got.dtype == dtype
    want = _torch_fn(name, "l2", {k: v.float() for k, v in extra.items()})(x.float())
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 0), (0, 4)])
@pytest.mark.parametrize("name", ["projection", "topk", "spearman", "isotonic"])
def test_empty_inputs_give_numpy_shapes(name, shape):
    x = torch.zeros(shape, dtype=torch.float64)
    k = 0 if name == "topk" else None
    calls = {
        "projection": (lambda t: srt.permutahedron_projection(t), lambda a: srn.permutahedron_projection(a)),
        "topk": (lambda t: srt.soft_topk_mask(t, k), lambda a: srn.soft_topk_mask(a, k)),
        "spearman": (lambda t: srt.spearman(t, t), lambda a: srn.spearman(a, a)),
        "isotonic": (lambda t: srt.isotonic_regression(t), lambda a: srn.isotonic_regression(a)),
    }[name]
    with np.errstate(invalid="ignore"):
        want = calls[1](x.numpy())
    got = calls[0](x)
    assert tuple(got.shape) == want.shape
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=0, equal_nan=True)


def test_quantile_of_empty_rows_and_of_n_zero_match_numpy():
    assert srt.soft_quantile(torch.zeros(0, 4, dtype=torch.float64), 0.5).shape == (0,)
    for bad in (torch.zeros(3, 0), torch.zeros(0)):
        with pytest.raises(ValueError, match="soft_quantile needs at least one value"):
            srn.soft_quantile(bad.numpy(), 0.5)
        with pytest.raises(ValueError, match="soft_quantile needs at least one value"):
            srt.soft_quantile(bad, 0.5)


# --- first derivatives -----------------------------------------------------------


def _pooled(name, reg, x, extra, dim=-1):
    """Whether some PAV block of the forward pass at ``x`` (along ``dim``) holds several entries.

    The tests of the derivatives assert it, so that they cover the block maps
    (means and softmaxes over a block), not only singletons.
    """
    code = _engine.REG_KL if reg == "kl" else _engine.REG_L2
    x = x.movedim(dim, -1)
    extra = {key: value if value.dim() == 1 else value.movedim(dim, -1) for key, value in extra.items()}
    n = x.shape[-1]
    if name.startswith("isotonic"):
        weights = extra["weights"] if "weights" in name else None
        _, blocks = torch.ops.softrank.isotonic_forward(x, weights, "decreasing" not in name, code)
    elif name.startswith("projection") or name == "topk":
        w = {
            "projection": lambda: torch.arange(n, 0, -1, dtype=x.dtype),
            "projection_w": lambda: extra["w"],
            "projection_w_full": lambda: extra["w_full"],
            "topk": lambda: torch.from_numpy(_operators.topk_weights(n, 2, code, np.dtype(np.float64))),
        }[name]().expand(x.shape)
        *_, blocks = torch.ops.softrank.projection_forward(x, w, 0.7 if name == "topk" else 1.0, code)
    else:
        op = _engine.OP_RANK if name == "spearman" else _engine.OP_SORT
        _, _, blocks = torch.ops.softrank.soft_forward(x, op, code, False, 0.6)
    return bool((blocks != torch.arange(n, dtype=blocks.dtype)).any())


@pytest.mark.parametrize("name, reg", CASES)
def test_gradient_matches_finite_differences_and_the_numpy_pullback(name, reg):
    x = _spread(_x((6, 3), seed=4))
    extra = _extra((6, 3), 0)
    assert _pooled(name, reg, x, extra, dim=0)
    f = _torch_fn(name, reg, extra, dim=0)
    value = f(x)
    cotangent = _x(value.shape, seed=5)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(leaf), leaf, cotangent)
    jacobian = fd_jacobian(f, x)
    assert jacobian.abs().max() > 0.05
    torch.testing.assert_close(grad, _pull(jacobian, cotangent), rtol=RTOL, atol=ATOL)
    _, numpy_vjp = _numpy_with_vjp(name, reg, extra, x, 0)
    torch.testing.assert_close(grad, numpy_vjp(cotangent), rtol=1e-12, atol=1e-12)
    # .backward() accumulates the same gradient
    leaf = x.clone().requires_grad_(True)
    (f(leaf) * cotangent).sum().backward()
    torch.testing.assert_close(leaf.grad, grad, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("full", [False, True], ids=["w_vector", "w_full"])
def test_projection_gradient_in_w(reg, full):
    z = 3.0 * _x((3, 5), seed=6)
    w = _x((3, 5) if full else (5,), seed=7)
    cotangent = _x((3, 5), seed=8)
    leaves = [z.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    grad_z, grad_w = torch.autograd.grad(
        srt.permutahedron_projection(*leaves, regularization=reg), leaves, cotangent)
    assert grad_w.shape == w.shape
    want_w = _pull(fd_jacobian(lambda t: srt.permutahedron_projection(z, t, regularization=reg), w),
                   cotangent)
    assert want_w.std() > 0.05  # not one block per row: the map in w is not a plain mean
    torch.testing.assert_close(grad_w, want_w, rtol=RTOL, atol=ATOL)
    _, vjp = srn.permutahedron_projection_with_vjp(z.numpy(), w.numpy(), regularization=reg)
    numpy_z, numpy_w = vjp(cotangent.numpy())
    torch.testing.assert_close(grad_z, torch.from_numpy(numpy_z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_w, torch.from_numpy(np.asarray(numpy_w)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_isotonic_gradient_in_the_weights(reg):
    y, weights = _spread(_x((4, 6), seed=9)), _positive((4, 6), seed=10)
    cotangent = _x((4, 6), seed=11)
    leaves = [y.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
    grad_y, grad_weights = torch.autograd.grad(
        srt.isotonic_regression(leaves[0], weights=leaves[1], regularization=reg), leaves, cotangent)
    f = lambda t: srt.isotonic_regression(y, weights=t, regularization=reg)
    want = _pull(fd_jacobian(f, weights), cotangent)
    assert want.abs().max() > 0.05
    torch.testing.assert_close(grad_weights, want, rtol=RTOL, atol=ATOL)
    _, vjp = srn.isotonic_regression_with_vjp(y.numpy(), weights=weights.numpy(), regularization=reg)
    numpy_y, numpy_weights = vjp(cotangent.numpy())
    torch.testing.assert_close(grad_y, torch.from_numpy(numpy_y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weights, torch.from_numpy(numpy_weights), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unit", "weighted"])
def test_isotonic_eager_route_matches_the_operator(reg, weighted):
    """Eager CPU calls take a direct engine route (no dispatcher); its values,
    gradients (a broadcast cotangent too) and second derivatives are those of
    the registered operator that transforms and the compiler see."""
    code = _engine.REG_L2 if reg == "l2" else _engine.REG_KL
    y = _spread(_x((5, 7), seed=30))
    y[3, 2] = float("nan")
    weights = _positive((5, 7), seed=31) if weighted else None
    cotangent = _x((5, 7), seed=32)

    def run(route):
        leaves = [y.clone().requires_grad_(True)]
        if weighted:
            leaves.append(weights.clone().requires_grad_(True))
        w = leaves[1] if weighted else None
        if route == "public":
            out = srt.isotonic_regression(leaves[0], weights=w, regularization=reg)
        else:
            out = torch.ops.softrank.isotonic_forward(leaves[0], w, True, code)[0]
        grads = torch.autograd.grad(out, leaves, cotangent, create_graph=True)
        # (l2 with unit weights: the gradient is piecewise constant, no graph.)
        differentiable = [g for g in grads if g.requires_grad]
        second = torch.autograd.grad(sum((g * g.detach()).nansum() for g in differentiable),
                                     leaves, allow_unused=True) if differentiable else ()
        leaves_again = [t.detach().requires_grad_(True) for t in leaves]
        w_again = leaves_again[1] if weighted else None
        if route == "public":
            again = srt.isotonic_regression(leaves_again[0], weights=w_again, regularization=reg)
        else:
            again = torch.ops.softrank.isotonic_forward(leaves_again[0], w_again, True, code)[0]
        again.sum().backward()  # a broadcast (expanded) cotangent
        return out, grads, second, [t.grad for t in leaves_again]

    public, operator = run("public"), run("operator")
    torch.testing.assert_close(public[0], operator[0], rtol=0, atol=0, equal_nan=True)
    for got, want in zip(public[1:], operator[1:]):
        for a, b in zip(got, want):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, equal_nan=True)
    assert torch.isnan(public[1][0][3]).all() and torch.isfinite(public[1][0][:3]).all()


@pytest.mark.parametrize("reg", REGS)
def test_spearman_eager_route_matches_a_reference_graph(reg):
    """Eager CPU calls take one autograd node over the engine; its value,
    gradient and second derivative (create_graph) are those of soft_rank and
    torch.corrcoef composed by autograd. A constant target row gives NaN."""
    pred = _x((4, 9), seed=40)
    target = _x((4, 9), seed=41)
    target[2] = 1.5
    cotangent = _x((4,), seed=42)
    tangent = _x((4, 9), seed=43)

    def reference(p):
        ranks = srt.soft_rank(p, 0.7, regularization=reg)
        hard = srt.soft_rank(target, 0.0)
        return torch.stack([torch.corrcoef(torch.stack([ranks[r], hard[r]]))[0, 1]
                            for r in range(p.shape[0])])

    results = []
    for f in (lambda p: srt.spearman(p, target, 0.7, regularization=reg), reference):
        leaf = pred.clone().requires_grad_(True)
        value = f(leaf)
        (grad,) = torch.autograd.grad(value, leaf, cotangent, create_graph=True)
        (second,) = torch.autograd.grad((grad * tangent).nansum(), leaf)
        results.append((value.detach(), grad.detach(), second))
    (value, grad, second), (want_value, want_grad, want_second) = results
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isnan(value[2]) and torch.isfinite(value[[0, 1, 3]]).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(grad[keep], want_grad[keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second[keep], want_second[keep], rtol=1e-8, atol=1e-10)
    assert grad[keep].abs().max() > 1e-3
    if reg == "kl":
        assert second[keep].abs().max() > 1e-6  # (l2's soft rank is piecewise linear)
    # Without a graph: the engine's pullback, the same gradient.
    leaf = pred.clone().requires_grad_(True)
    srt.spearman(leaf, target, 0.7, regularization=reg).backward(cotangent)
    torch.testing.assert_close(leaf.grad[keep], want_grad[keep], rtol=1e-10, atol=1e-12)


# --- forward mode and torch.func ---------------------------------------------------


@pytest.mark.parametrize("name, reg", CASES)
def test_forward_mode_gives_the_jacobian_times_the_tangent(name, reg):
    x, tangent = _spread(_x((3, 6), seed=12)), _x((3, 6), seed=13)
    extra = _extra((3, 6), -1)
    assert _pooled(name, reg, x, extra)
    f = _torch_fn(name, reg, extra)
    want = contract(fd_jacobian(f, x), tangent)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        got = torch.autograd.forward_ad.unpack_dual(f(dual)).tangent
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    value, got = torch.func.jvp(f, (x,), (tangent,))
    torch.testing.assert_close(value, f(x), rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name, reg", CASES)
def test_func_grad_vjp_jacrev_jacfwd_match_finite_differences(name, reg):
    x = _spread(_x((2, 5), seed=14))
    extra = _extra((2, 5), -1)
    assert _pooled(name, reg, x, extra)
    f = _torch_fn(name, reg, extra)
    jacobian = fd_jacobian(f, x)
    torch.testing.assert_close(torch.func.jacrev(f)(x), jacobian, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), jacobian, rtol=RTOL, atol=ATOL)
    cotangent = _x(jacobian.shape[:-2], seed=15)
    value, pullback = torch.func.vjp(f, x)
    torch.testing.assert_close(value, f(x), rtol=0, atol=0)
    torch.testing.assert_close(pullback(cotangent)[0], _pull(jacobian, cotangent), rtol=RTOL, atol=ATOL)
    g = lambda t: (f(t) * cotangent).sum()
    torch.testing.assert_close(torch.func.grad(g)(x), _pull(jacobian, cotangent), rtol=RTOL, atol=ATOL)


def _cube_loss(f, weights):
    """A scalar with a non-zero second derivative even where f is piecewise linear."""
    return lambda t: (f(t) * weights).pow(3).sum()


@pytest.mark.parametrize("name, reg", CASES)
def test_second_derivatives_by_every_route_match_finite_differences(name, reg):
    # a point that fd_hessian's stencils keep away from every kink of every case (it checks)
    x = _spread(_x((2, 4), seed=27))
    extra = _extra((2, 4), -1)
    assert _pooled(name, reg, x, extra)
    f = _torch_fn(name, reg, extra)
    g = _cube_loss(f, _x(f(x).shape, seed=17))
    want = fd_hessian(g, x)
    routes = {
        "func.hessian": torch.func.hessian(g),
        "jacrev(jacrev)": torch.func.jacrev(torch.func.jacrev(g)),
        "jacrev(jacfwd)": torch.func.jacrev(torch.func.jacfwd(g)),
        "jacfwd(jacfwd)": torch.func.jacfwd(torch.func.jacfwd(g)),
    }
    for route_name, route in routes.items():
        torch.testing.assert_close(route(x), want, rtol=RTOL2, atol=ATOL2, msg=route_name)
    # double backward on the tape: the Hessian-vector product
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g(leaf), leaf, create_graph=True)
    direction = _x(x.shape, seed=18)
    (hvp,) = torch.autograd.grad(grad, leaf, direction)
    torch.testing.assert_close(hvp, contract(want, direction), rtol=RTOL2, atol=ATOL2)


@pytest.mark.parametrize("name, reg", CASES)
def test_gradcheck_and_gradgradcheck(name, reg):
    x = _spread(_x((2, 5), seed=19))
    extra = _extra((2, 5), -1)
    assert _pooled(name, reg, x, extra)
    x.requires_grad_(True)
    f = _torch_fn(name, reg, extra)
    assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, (x,), check_fwd_over_rev=True, check_rev_over_rev=True,
                                        check_batched_grad=True)


@pytest.mark.parametrize("reg", REGS)
def test_second_derivatives_in_w_and_in_the_weights(reg):
    z, w = _spread(_x((2, 4), seed=20)), _x((4,), seed=21) * 2.0
    y, weights = _spread(_x((2, 4), seed=22)), _positive((2, 4), seed=23)

    def projection(a, b):
        return srt.permutahedron_projection(a, b, regularization=reg)

    def isotonic(a, b):
        return srt.isotonic_regression(a, weights=b, regularization=reg)

    for fn, inputs in ((projection, (z, w)), (isotonic, (y, weights))):
        leaves = tuple(t.clone().requires_grad_(True) for t in inputs)
        assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(fn, leaves, check_fwd_over_rev=True)
        # the Hessian in the second input by forward over reverse and forward over forward
        cube = _x(inputs[0].shape, seed=24)
        g = lambda b: (fn(inputs[0], b) * cube).pow(3).sum()  # noqa: B023
        want = fd_hessian(g, inputs[1])
        torch.testing.assert_close(torch.func.hessian(g)(inputs[1]), want, rtol=RTOL2, atol=ATOL2)
        torch.testing.assert_close(torch.func.jacfwd(torch.func.jacfwd(g))(inputs[1]), want,
                                   rtol=RTOL2, atol=ATOL2)


# --- vmap -------------------------------------------------------------------------------


class EngineCalls:
    """Counts the engine's passes over the data (the engine itself runs as usual).

    ``inverse_permutations`` is bookkeeping of a projection's state, not a
    pass of its own: it is not counted.
    """

    def __init__(self, real):
        self._real = real
        self.counts = {}

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr) or name.startswith("_") or name == "inverse_permutations":
            return attr

        def counted(*args):
            self.counts[name] = self.counts.get(name, 0) + 1
            return attr(*args)

        return counted


@pytest.fixture
def engine_calls(monkeypatch):
    spy = EngineCalls(_engine.engine())
    monkeypatch.setattr(_engine, "_engine", spy)
    return spy.counts


@pytest.mark.parametrize("name, reg", CASES)
def test_vmap_over_any_dim_equals_the_unbatched_call(name, reg, engine_calls):
    x = _spread(_x((4, 5, 6), seed=25))
    extra = _extra((4, 6), 0)  # each sample is (4, 6), the operator acts along its dim 0
    engine_calls.clear()
    got = torch.func.vmap(_torch_fn(name, reg, extra, dim=0), in_dims=1)(x)
    # One pass (spearman: the soft ranks, the target's ranks, the correlation).
    assert sum(engine_calls.values()) == (3 if name == "spearman" else 1), engine_calls
    want = torch.stack([_torch_fn(name, reg, extra, dim=0)(x[:, j]) for j in range(5)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reg", REGS)
def test_vmap_over_a_batch_of_w(reg, engine_calls):
    z, ws = _spread(_x((3, 5), seed=26)), _x((4, 5), seed=27) * 2.0

    def f(w):
        return srt.permutahedron_projection(z, w, regularization=reg)

    engine_calls.clear()
    got = torch.func.vmap(f)(ws)
    assert engine_calls == {"projection_forward": 1}, engine_calls
    torch.testing.assert_close(got, torch.stack([f(w) for w in ws]), rtol=0, atol=0)
    # and the per-w gradients (summed over the rows of z) against finite differences
    cotangent = _x((3, 5), seed=28)
    grads = torch.func.vmap(torch.func.grad(lambda w: (f(w) * cotangent).sum()))(ws)
    want = torch.stack([_pull(fd_jacobian(f, w), cotangent) for w in ws])
    torch.testing.assert_close(grads, want, rtol=RTOL, atol=ATOL)
    # both batched, with a per-row w
    zs, w_full = _spread(_x((4, 3, 5), seed=29)), _x((4, 3, 5), seed=30)
    both = torch.func.vmap(lambda a, b: srt.permutahedron_projection(a, b, regularization=reg))
    want = torch.stack([srt.permutahedron_projection(a, b, regularization=reg) for a, b in zip(zs, w_full)])
    torch.testing.assert_close(both(zs, w_full), want, rtol=0, atol=0)


@pytest.mark.parametrize("reg", REGS)
def test_vmap_of_a_fixed_k_top_k_and_of_its_jacobian(reg, engine_calls):
    xs = _spread(_x((5, 2, 6), seed=31))

    def f(t):
        return srt.soft_topk_mask(t, 3, 0.4, regularization=reg)

    engine_calls.clear()
    got = torch.func.vmap(f)(xs)
    assert engine_calls == {"projection_forward": 1}, engine_calls
    torch.testing.assert_close(got, f(xs), rtol=0, atol=0)
    want = torch.stack([fd_jacobian(f, t) for t in xs])
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(f))(xs), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(f))(xs), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reg", REGS)
def test_vmap_of_isotonic_over_a_batch_of_weights(reg, engine_calls):
    y, weight_batch = _spread(_x((3, 6), seed=32)), _positive((4, 3, 6), seed=33)

    def f(weights):
        return srt.isotonic_regression(y, weights=weights, regularization=reg)

    engine_calls.clear()
    got = torch.func.vmap(f)(weight_batch)
    assert engine_calls == {"isotonic_forward": 1}, engine_calls
    torch.testing.assert_close(got, torch.stack([f(w) for w in weight_batch]), rtol=0, atol=0)
    cotangent = _x((3, 6), seed=34)
    grads = torch.func.vmap(torch.func.grad(lambda w: (f(w) * cotangent).sum()))(weight_batch)
    want = torch.stack([_pull(fd_jacobian(f, w), cotangent) for w in weight_batch])
    torch.testing.assert_close(grads, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("wrt", ["y", "weights"])
def test_weighted_isotonic_under_linearize_and_make_fx(reg, wrt):
    # torch.func.linearize traces with make_fx's proxy mode, under which the
    # weights' values cannot be read: the check of the weights is the kernel's.
    y = _spread(_x((3, 6), seed=38))
    weights = _positive((3, 6), seed=39)
    tangent = _x((3, 6), seed=40)

    def f(value):
        if wrt == "y":
            return srt.isotonic_regression(value, weights=weights, regularization=reg)
        return srt.isotonic_regression(y, weights=value, regularization=reg)

    point = y if wrt == "y" else weights
    out, linear = torch.func.linearize(f, point)
    torch.testing.assert_close(out, f(point), rtol=0, atol=0)
    torch.testing.assert_close(linear(tangent), contract(fd_jacobian(f, point), tangent),
                               rtol=RTOL, atol=ATOL)
    traced = make_fx(lambda a, b: srt.isotonic_regression(a, weights=b, regularization=reg))
    torch.testing.assert_close(traced(y, weights)(y, weights),
                               srt.isotonic_regression(y, weights=weights, regularization=reg),
                               rtol=0, atol=0)
    for bad in (-weights, weights * float("nan")):
        with pytest.raises(ValueError, match="weights must be finite and > 0"):
            traced(y, bad)


def test_values_are_read_under_a_dispatch_mode_that_runs_operations():
    """Only make_fx's proxy mode hides values: under a mode that runs the
    operations (FlopCounterMode) a tensor q is read and weights are checked
    as in plain eager code."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _x((3, 6), seed=41)
    weights = _positive((3, 6), seed=42)
    with FlopCounterMode(display=False):
        got = srt.soft_quantile(x, torch.tensor([0.25, 0.5]), 0.1)
        solution = srt.isotonic_regression(x, weights=weights)
        with pytest.raises(ValueError, match="weights must be finite and > 0"):
            srt.isotonic_regression(x, weights=-weights)
    torch.testing.assert_close(got, srt.soft_quantile(x, [0.25, 0.5], 0.1), rtol=0, atol=0)
    torch.testing.assert_close(solution, srt.isotonic_regression(x, weights=weights), rtol=0,
                               atol=0)


def test_vmapped_q_raises_clearly():
    x = _x((3, 5), seed=35)
    with pytest.raises(TypeError, match="q must be concrete"):
        torch.func.vmap(lambda q: srt.soft_quantile(x, q))(torch.tensor([0.2, 0.4]))


# --- compile, TorchScript, meta, CUDA ------------------------------------------------------


@pytest.mark.parametrize("name, reg", CASES)
def test_compile_gives_the_eager_values_and_gradients(name, reg):
    x = _spread(_x((3, 6), seed=36))
    extra = _extra((3, 6), -1)
    f = _torch_fn(name, reg, extra)
    g = _cube_loss(f, _x(f(x).shape, seed=37))
    torch._dynamo.reset()
    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    results = []
    for run in (g, compiled):
        leaf = x.clone().requires_grad_(True)
        value = run(leaf)
        results.append((value.detach(), torch.autograd.grad(value, leaf)[0]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(results[0][1], fd_jacobian(g, x), rtol=RTOL, atol=ATOL)


def test_compile_with_inductor_and_the_second_inputs():
    z, w = _spread(_x((3, 6), seed=38)), _x((6,), seed=39)
    y, weights = _spread(_x((3, 6), seed=40)), _positive((3, 6), seed=41)

    def loss(a, b, c, d):
        return (srt.permutahedron_projection(a, b, regularization="kl").pow(2).sum()
                + srt.isotonic_regression(c, weights=d).pow(2).sum())

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="inductor")
    results = []
    for run in (loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (z, w, y, weights)]
        value = run(*leaves)
        results.append([value.detach(), *torch.autograd.grad(value, leaves)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_export_keeps_both_operators():
    class Model(torch.nn.Module):
        def forward(self, t):
            return srt.soft_topk_mask(t, 2, 0.3, regularization="kl") + srt.isotonic_regression(t, dim=0)

    x = _x((4, 5), seed=42)
    exported = torch.export.export(Model(), (x,))
    targets = {node.target for node in exported.graph.nodes}
    assert {torch.ops.softrank.projection_forward.default,
            torch.ops.softrank.isotonic_forward.default} <= targets
    torch.testing.assert_close(exported.module()(x), Model()(x), rtol=0, atol=0)


class _Exported(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _ExportedProjection(torch.nn.Module):
    def __init__(self, reg):
        super().__init__()
        self.reg = reg

    def forward(self, z, w):
        return srt.permutahedron_projection(z, w, regularization=self.reg)


@pytest.mark.parametrize("reg", REGS)
def test_export_with_a_dynamic_batch_and_a_vector_w(reg):
    # comparing w.shape with z.shape guarded the batch size against len(w)
    z, w = _spread(_x((4, 6), seed=90)), _x((6,), seed=91)
    exported = torch.export.export(_ExportedProjection(reg), (z, w),
                                   dynamic_shapes=({0: torch.export.Dim("batch")}, None))
    for rows in (1, 3, 6, 9):
        z2 = _spread(_x((rows, 6), seed=92 + rows))
        want = torch.from_numpy(srn.permutahedron_projection(z2.numpy(), w.numpy(),
                                                             regularization=reg))
        torch.testing.assert_close(exported.module()(z2, w), want, rtol=1e-12, atol=1e-12)


_DYNAMIC_N = {
    "projection": (lambda t, reg: srt.permutahedron_projection(t, regularization=reg),
                   lambda a, reg: srn.permutahedron_projection(a, regularization=reg)),
    "topk": (lambda t, reg: srt.soft_topk_mask(t, 2, 0.7, regularization=reg),
             lambda a, reg: srn.soft_topk_mask(a, 2, 0.7, regularization=reg)),
    "quantiles": (lambda t, reg: srt.soft_quantile(t, [0.0, 0.1, 0.5, 0.95, 1.0], 0.6,
                                                   regularization=reg),
                  lambda a, reg: srn.soft_quantile(a, [0.0, 0.1, 0.5, 0.95, 1.0], 0.6,
                                                   regularization=reg)),
    "median": (lambda t, reg: srt.soft_median(t, 0.6, regularization=reg),
               lambda a, reg: srn.soft_median(a, 0.6, regularization=reg)),
}


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("name", list(_DYNAMIC_N))
def test_export_with_a_dynamic_n(name, reg):
    # the rows of w and the quantiles' positions depend on n: built in torch
    # operations when n is symbolic, not specialized to the example's n
    f, reference = _DYNAMIC_N[name]
    x = _spread(_x((3, 6), seed=93))
    exported = torch.export.export(_Exported(lambda t: f(t, reg)), (x,),
                                   dynamic_shapes=({1: torch.export.Dim("n", min=3, max=64)},))
    for n in (3, 4, 7, 16):
        x2 = _spread(_x((3, n), seed=94 + n))
        want = torch.from_numpy(np.asarray(reference(x2.numpy(), reg)))
        torch.testing.assert_close(exported.module()(x2), want, rtol=1e-12, atol=1e-12,
                                   msg=f"n={n}")


def test_export_with_a_dynamic_n_below_k_raises_naming_the_bound():
    x = _x((3, 6), seed=95)
    with pytest.raises(Exception, match=r"Constraints violated \(n\)"):
        torch.export.export(_Exported(lambda t: srt.soft_topk_mask(t, 5)), (x,),
                            dynamic_shapes=({1: torch.export.Dim("n", min=3, max=64)},))


def _traced_calls():
    return {
        "permutahedron_projection": lambda t: srt.permutahedron_projection(t),
        "soft_topk_mask": lambda t: srt.soft_topk_mask(t, 2),
        "spearman": lambda t: srt.spearman(t, t),
        "soft_quantile": lambda t: srt.soft_quantile(t, 0.3),
        "soft_median": lambda t: srt.soft_median(t),
        "isotonic_regression": lambda t: srt.isotonic_regression(t),
    }


@pytest.mark.parametrize("name", PUBLIC)
def test_jit_trace_and_script_raise_naming_the_alternatives(name):
    x = _x((2, 5), seed=43)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*use torch\.compile or torch\.export"):
        torch.jit.trace(_traced_calls()[name], (x,))
    with pytest.raises(RuntimeError, match=r"TorchScript.*use torch\.compile or torch\.export"):
        torch.jit.script(getattr(srt, name))


def test_operators_called_directly_under_torch_func_raise_naming_the_public_functions():
    z, w = _spread(_x((2, 5), seed=44)), _x((2, 5), seed=55)

    def direct(t):
        return torch.ops.softrank.projection_forward(t, w, 1.0, _engine.REG_KL)[0]

    with pytest.raises(NotImplementedError, match="permutahedron_projection / soft_topk_mask"):
        torch.func.grad(lambda t: direct(t).sum())(z)
    with pytest.raises(NotImplementedError, match="isotonic_regression"):
        torch.func.jacfwd(lambda t: torch.ops.softrank.isotonic_forward(t, None, True, 0)[0])(z)
    # autograd of a direct call goes through the same derivatives
    leaf = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(direct(leaf).pow(2).sum(), leaf)
    torch.testing.assert_close(grad, fd_jacobian(lambda t: direct(t).pow(2).sum(), z), rtol=RTOL, atol=ATOL)


def test_meta_tensors_propagate_shapes_and_gradients():
    x = torch.empty(3, 5, device="meta", requires_grad=True)
    for call in _traced_calls().values():
        out = call(x)
        assert out.device.type == "meta"
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name, reg", CASES)
def test_cuda_tensors_give_the_cpu_values_and_gradients_on_their_device(name, reg):
    x = _spread(_x((3, 6), seed=45))
    extra = _extra((3, 6), -1)
    results = []
    for device in ("cpu", "cuda"):
        leaf = x.to(device).requires_grad_(True)
        out = _torch_fn(name, reg, {k: v.to(device) for k, v in extra.items()})(leaf)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), leaf)
        assert out.device.type == device and grad.device.type == device
        results.append((out.cpu(), grad.cpu()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


# --- limits as eps -> 0 ---------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
def test_spearman_at_eps_zero_and_small_eps_equals_scipy(reg):
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(46)
    # integer-valued: ties in both pred and target (mean ranks)
    pred = torch.randint(0, 5, (6, 9), generator=generator).double()
    target = torch.randint(0, 5, (6, 9), generator=generator).double()
    want = torch.tensor([stats.spearmanr(p, t).statistic for p, t in zip(pred.numpy(), target.numpy())],
                        dtype=torch.float64)
    torch.testing.assert_close(srt.spearman(pred, target, 0.0, regularization=reg), want,
                               rtol=1e-12, atol=1e-12)
    # distinct predictions: a small eps is already the hard limit; dim 0 is removed
    distinct = _x((9, 6), seed=47)
    got = srt.spearman(distinct, target.T, 1e-6, regularization=reg, dim=0)
    want = torch.tensor([stats.spearmanr(p, t).statistic for p, t in zip(distinct.T.numpy(), target.numpy())],
                        dtype=torch.float64)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # an integer target (relevance labels) is accepted
    torch.testing.assert_close(srt.spearman(pred, target.long(), 0.0, regularization=reg),
                               srt.spearman(pred, target, 0.0, regularization=reg), rtol=0, atol=0)


@pytest.mark.parametrize("reg", REGS)
def test_quantiles_at_eps_zero_equal_np_quantile_with_its_layout(reg):
    x = _x((4, 7, 3), seed=48)
    for q in (0.0, 0.3, 0.5, 1.0, [0.1, 0.5, 0.77], np.array([1.0, 0.0]), torch.tensor([0.25, 0.6])):
        q_np = q.numpy() if isinstance(q, torch.Tensor) else q
        want = torch.from_numpy(np.quantile(x.numpy(), q_np, axis=1, method="linear"))
        got = srt.soft_quantile(x, q, 0.0, regularization=reg, dim=1)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        small = srt.soft_quantile(x, q, 1e-7, regularization=reg, dim=1)
        torch.testing.assert_close(small, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(srt.soft_median(x, 0.0, regularization=reg, dim=1),
                               torch.from_numpy(np.median(x.numpy(), axis=1)), rtol=1e-12, atol=1e-12)


def _hard_top_k(row, k):
    """Indicator of the k largest entries; a tie group crossing the boundary shares what is left."""
    values = sorted(row.tolist(), reverse=True)
    mask = torch.zeros_like(row)
    if k == 0:
        return mask
    threshold = values[k - 1]
    above = row > threshold
    tied = row == threshold
    mask[above] = 1.0
    mask[tied] = (k - int(above.sum())) / int(tied.sum())
    return mask


@pytest.mark.parametrize("reg", REGS)
def test_top_k_at_eps_zero_is_the_hard_indicator_with_shared_ties(reg):
    x = torch.tensor([[3.0, 1.0, 3.0, 0.0, 2.0], [1.0, 1.0, 1.0, 5.0, -2.0]], dtype=torch.float64)
    for k in range(0 if reg == "l2" else 1, 6):
        want = torch.stack([_hard_top_k(row, k) for row in x])
        got = srt.soft_topk_mask(x, k, 0.0, regularization=reg)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"k={k}")
        # transposed input, dim 0
        torch.testing.assert_close(srt.soft_topk_mask(x.T, k, 0.0, regularization=reg, dim=0), want.T,
                                   rtol=1e-12, atol=1e-12)
    distinct = _x((3, 8), seed=49)
    torch.testing.assert_close(srt.soft_topk_mask(distinct, 3, 1e-6, regularization=reg),
                               torch.stack([_hard_top_k(row, 3) for row in distinct]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("reg", REGS)
def test_top_k_rows_sum_to_k_with_values_in_the_unit_interval(reg):
    x = _x((5, 9), seed=51)
    for k in range(1, 10):
        for eps in (0.05, 0.5, 3.0, float("inf")):
            mask = srt.soft_topk_mask(x, k, eps, regularization=reg)
            assert bool((mask >= -1e-12).all()) and bool((mask <= 1 + 1e-12).all())
            torch.testing.assert_close(mask.sum(-1), torch.full((5,), float(k), dtype=torch.float64),
                                       rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(srt.soft_topk_mask(x, 4, float("inf")),
                               torch.full_like(x, 4 / 9), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_top_k_derivatives_where_x_over_eps_overflows(reg):
    """|x| / eps beyond the float range with finite masks: reverse and both
    forward modes give softrank.numpy's gradient (tested there against the
    closed form), with no NaN (kl: the zero block's out tangent overflows
    while its mask is exactly 0)."""
    c = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    for rows, k in (([[3e9, 1e9, 2e9, 5.0]], 2), ([[1e10, 1e10, -1e10, 0.0]], 1)):
        x = torch.tensor(rows, dtype=torch.float64)
        for eps in (1e-300, 1e-310):
            _, vjp = srn.soft_topk_mask_with_vjp(x.numpy(), k, eps, regularization=reg)
            with np.errstate(over="ignore"):
                want = torch.from_numpy(vjp(c.numpy()))

            def fn(v, k=k, eps=eps):
                return srt.soft_topk_mask(v, k, eps, regularization=reg)

            torch.testing.assert_close(torch.func.grad(lambda v: (c * fn(v)).sum())(x), want,
                                       rtol=0, atol=0)
            # (the mask's Jacobian is symmetric: the jvp along c is the same vector)
            torch.testing.assert_close(torch.func.jvp(fn, (x,), (c,))[1], want, rtol=0, atol=0)
            with torch.autograd.forward_ad.dual_level():
                dual = fn(torch.autograd.forward_ad.make_dual(x, c))
                tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
            torch.testing.assert_close(tangent, want, rtol=0, atol=0)


def test_top_k_gradient_is_zero_at_eps_zero():
    leaf = _x((2, 6), seed=52).requires_grad_(True)
    for reg in REGS:
        (grad,) = torch.autograd.grad(srt.soft_topk_mask(leaf, 2, 0.0, regularization=reg).pow(2).sum(), leaf)
        assert bool((grad == 0).all())


# --- bad arguments ---------------------------------------------------------------------


def test_bad_arguments_raise_naming_the_argument():
    x = _x((3, 5), seed=53)
    cases = [
        (lambda: srt.soft_topk_mask(x, 6), ValueError, r"k must lie in \[0, n\] = \[0, 5\]"),
        (lambda: srt.soft_topk_mask(x, -1), ValueError, "k must lie in"),
        (lambda: srt.soft_topk_mask(x, 2.0), TypeError, "k must be an int"),
        (lambda: srt.soft_topk_mask(x, 0, regularization="kl"), ValueError, "needs k >= 1"),
        (lambda: srt.soft_topk_mask(x, 2, -1.0), ValueError, "eps must be >= 0"),
        (lambda: srt.soft_quantile(x, 1.5), ValueError, r"q must lie in \[0, 1\]"),
        (lambda: srt.soft_quantile(x, [0.5, -0.1]), ValueError, r"q must lie in \[0, 1\]"),
        (lambda: srt.soft_quantile(x, float("nan")), ValueError, r"q must lie in \[0, 1\]"),
        (lambda: srt.soft_quantile(x, [[0.5]]), ValueError, "q must be a scalar or 1-D"),
        (lambda: srt.soft_quantile(x, "half"), TypeError, "q must be a real number"),
        (lambda: srt.permutahedron_projection(x, torch.ones(4)), ValueError,
         r"w must have length n = 5 .* or the shape of z \(3, 5\), got shape \(4,\)"),
        (lambda: srt.permutahedron_projection(x, torch.ones(5, 3)), ValueError, "w must have length n"),
        (lambda: srt.permutahedron_projection(x, torch.ones(5, dtype=torch.complex64)), TypeError,
         "w must have a real floating dtype"),
        (lambda: srt.permutahedron_projection(x, regularization="l1"), ValueError,
         "regularization must be 'l2' or 'kl'"),
        (lambda: srt.permutahedron_projection(x.long()), TypeError, "z must have a floating dtype"),
        (lambda: srt.permutahedron_projection(x.numpy()), TypeError, "z must be a torch.Tensor"),
        (lambda: srt.permutahedron_projection(x, dim=2), ValueError, "dim=2 is out of range"),
        (lambda: srt.isotonic_regression(x, weights=torch.zeros(3, 5)), ValueError,
         r"weights must be finite and > 0"),
        (lambda: srt.isotonic_regression(x, weights=-torch.ones(3, 5)), ValueError,
         r"weights must be finite and > 0"),
        (lambda: srt.isotonic_regression(x, weights=torch.full((3, 5), float("inf"))), ValueError,
         r"weights must be finite and > 0"),
        (lambda: srt.isotonic_regression(x, weights=torch.full((3, 5), float("nan"))), ValueError,
         r"weights must be finite and > 0"),
        (lambda: srt.isotonic_regression(x.float(), weights=torch.full((3, 5), 1e-300,
                                                                       dtype=torch.float64)),
         ValueError, r"weights must stay > 0 in float32 \(the compute dtype; they underflow\)"),
        (lambda: srt.isotonic_regression(x.float(), weights=torch.full((3, 5), 1e300,
                                                                       dtype=torch.float64)),
         ValueError, r"weights must stay finite in float32"),
        (lambda: srt.isotonic_regression(x, increasing="decreasing"), TypeError,
         "increasing must be True or False"),
        (lambda: srt.isotonic_regression(x, increasing=None), TypeError,
         "increasing must be True or False"),
        (lambda: srt.soft_topk_mask(x, torch.tensor(True)), TypeError, "k must be an int"),
        (lambda: srt.soft_quantile(x, True), TypeError, "q must be a real number"),
        (lambda: srt.soft_topk_mask(x, torch.tensor([2])), TypeError, "k must be an int"),
        (lambda: srt.soft_topk_mask(x, 2, torch.tensor(0.5, requires_grad=True)), TypeError,
         "eps must not require a gradient"),
        (lambda: srt.soft_rank(x, torch.tensor(0.5, requires_grad=True)), TypeError,
         "eps must not require a gradient"),
        (lambda: torch.func.grad(lambda e: srt.soft_sort(x, e).sum())(torch.tensor(0.5)),
         TypeError, "eps must not require a gradient"),
        (lambda: srt.soft_quantile(x, torch.tensor(0.5, requires_grad=True)), TypeError,
         "q must not require a gradient"),
        (lambda: srt.isotonic_regression(x, weights=torch.ones(5)), ValueError,
         "weights must have the shape of y"),
        (lambda: srt.isotonic_regression(torch.tensor(1.0)), ValueError,
         "y must have at least one dimension"),
        (lambda: srt.spearman(x, torch.ones(3, 4)), ValueError, "target must have the shape of pred"),
        (lambda: srt.spearman(x, torch.ones(3, 5, dtype=torch.complex64)), TypeError,
         "target must have a real floating dtype"),
        (lambda: srt.spearman(x.int(), x), TypeError, "pred must have a floating dtype"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_forward_mode_eps_or_q_is_refused_not_dropped():
    """A dual eps or q of torch.autograd.forward_ad requires no gradient and no
    functorch level wraps it: its tangent was dropped (a None output tangent,
    or zeros where x was dual too); torch.func.jvp with respect to q failed
    with "Cannot access data pointer". Every operator taking eps or q refuses."""
    from torch.autograd import forward_ad

    x = _x((2, 5), seed=58)
    one = torch.tensor(1.0, dtype=torch.float64)
    with forward_ad.dual_level():
        eps = forward_ad.make_dual(torch.tensor(1.3, dtype=torch.float64), one)
        q = forward_ad.make_dual(torch.tensor(0.3, dtype=torch.float64), one)
        dual_x = forward_ad.make_dual(x, torch.zeros_like(x))
        for op in (lambda e: srt.soft_rank(x, e), lambda e: srt.soft_sort(dual_x, e),
                   lambda e: srt.soft_topk_mask(x, 2, e), lambda e: srt.spearman(x, x.flip(-1), e),
                   lambda e: srt.soft_quantile(x, 0.3, e), lambda e: srt.soft_median(dual_x, e)):
            with pytest.raises(TypeError, match="eps must not require a gradient"):
                op(eps)
        for values in (q, torch.stack([q, q])):
            with pytest.raises(TypeError, match="q must not require a gradient"):
                srt.soft_quantile(dual_x, values, 1.0)
        # Plain eps and q inside a dual level: x's tangent still flows.
        out = srt.soft_quantile(forward_ad.make_dual(x, torch.ones_like(x)), torch.tensor(0.3),
                                torch.tensor(1.0))
        assert torch.allclose(forward_ad.unpack_dual(out).tangent, torch.ones(2, dtype=torch.float64))
    for q0, tangent in ((torch.tensor(0.3, dtype=torch.float64), one),
                        (torch.tensor([0.3, 0.6], dtype=torch.float64), torch.ones(2, dtype=torch.float64))):
        with pytest.raises(TypeError, match="q must not require a gradient"):
            torch.func.jvp(lambda v: srt.soft_quantile(x, v, 1.0), (q0,), (tangent,))


def test_a_plain_tensor_q_or_eps_under_the_differentiating_transforms():
    """A tensor q or eps that a torch.func transform does not differentiate
    (captured, an argument it does not differentiate, or made inside the
    function) is read as its value: q failed with "Cannot access data pointer"
    (numpy could not read it there) or was refused as differentiated."""
    x = _x((2, 5), seed=61)
    q0 = torch.tensor(0.3, dtype=torch.float64)
    levels = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def reference(q, eps=1.0, reg="l2"):
        a = x.clone().requires_grad_()
        srt.soft_quantile(a, float(q) if q.dim() == 0 else q.tolist(), eps, regularization=reg).sum().backward()
        return a.grad

    grad = torch.func.grad
    assert torch.allclose(grad(lambda a: srt.soft_quantile(a, q0, 1.0).sum())(x), reference(q0))
    assert torch.allclose(grad(lambda a, q: srt.soft_quantile(a, q, 1.0).sum())(x, q0), reference(q0))
    assert torch.allclose(grad(lambda a: srt.soft_quantile(a, levels.clone(), 1.0).sum())(x), reference(levels))
    jac = torch.func.jacrev(lambda a: srt.soft_quantile(a, levels, 1.0, regularization="kl"))(x)
    assert torch.allclose(jac.sum(dim=(0, 1)), reference(levels, reg="kl"))
    _, tangent = torch.func.jvp(lambda a: srt.soft_quantile(a, q0, 1.0), (x,), (torch.ones_like(x),))
    assert torch.allclose(tangent, torch.ones(2, dtype=torch.float64))  # a shift moves the quantile
    a = x.clone().requires_grad_()
    (srt.soft_rank(a, 0.7) ** 2).sum().backward()
    got = grad(lambda v: (srt.soft_rank(v, torch.tensor(0.7, dtype=torch.float64)) ** 2).sum())(x)
    assert torch.allclose(got, a.grad)
    # Differentiated ones are still refused, by name.
    with pytest.raises(TypeError, match="q must not require a gradient"):
        grad(lambda q: srt.soft_quantile(x, q, 1.0).sum())(q0)
    with pytest.raises(TypeError, match="eps must not require a gradient"):
        torch.func.jacfwd(lambda e: srt.soft_sort(x, e))(torch.tensor(0.5, dtype=torch.float64))


def test_autograd_functional_hvp_names_vhp():
    # torch.autograd.functional.hvp's double-backward trick asks for a third
    # derivative; the error names the routes that compute the same second derivative.
    import torch.autograd.functional as autograd_functional

    x = _x((5,), seed=59)
    v = _x((5,), seed=60)

    def f(a):
        return (srt.soft_rank(a, 1.0, regularization="kl") ** 3).sum()

    with pytest.raises(NotImplementedError, match=r"functional\.vhp"):
        autograd_functional.hvp(f, x, v)
    _, vhp = autograd_functional.vhp(f, x, v)
    _, jvp_of_grad = torch.func.jvp(torch.func.grad(f), (x,), (v,))
    assert torch.allclose(vhp, jvp_of_grad, rtol=1e-12, atol=1e-12)
    # Against central differences of the gradient.
    h = 1e-6
    fd = (torch.func.grad(f)(x + h * v) - torch.func.grad(f)(x - h * v)) / (2 * h)
    assert torch.allclose(vhp, fd, rtol=1e-6, atol=1e-8)


def test_weights_are_checked_under_the_differentiating_transforms():
    y = _x((2, 4), seed=54)
    with pytest.raises(ValueError, match=r"weights must be finite and > 0"):
        torch.func.grad(lambda w: srt.isotonic_regression(y, weights=w).sum())(-torch.ones(2, 4))


# --- the module ------------------------------------------------------------------------


def test_public_names_and_signatures():
    for name in PUBLIC:
        assert name in srt.__all__
        fn = getattr(srt, name)
        hints = typing.get_type_hints(fn)
        assert hints["regularization"] == Regularization
        assert "dim" in hints and "axis" not in hints
        assert fn.__doc__


@pytest.mark.parametrize("reg", REGS)
def test_rows_with_nan_are_nan_in_value_and_gradient_like_numpy(reg):
    x = _spread(_x((3, 5), seed=56))
    x[1, 2] = float("nan")
    cotangent = _x((3, 5), seed=57)
    for name in ("projection_w", "isotonic_weights_decreasing", "topk"):
        extra = _extra((3, 5), -1)
        leaf = x.clone().requires_grad_(True)
        out = _torch_fn(name, reg, extra)(leaf)
        (grad,) = torch.autograd.grad(out, leaf, cotangent)
        want, numpy_vjp = _numpy_with_vjp(name, reg, extra, x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(grad, numpy_vjp(cotangent), rtol=1e-12, atol=1e-12, equal_nan=True)
        assert bool(out[1].isnan().all()) and bool(grad[1].isnan().all())
        assert not bool(out[[0, 2]].isnan().any()) and not bool(grad[[0, 2]].isnan().any())


def test_tensor_eps_works_eagerly_and_raises_clearly_under_compile():
    x = _x((2, 6), seed=58)
    eps = torch.tensor(0.5, dtype=torch.float64)
    torch.testing.assert_close(srt.soft_topk_mask(x, 2, eps), srt.soft_topk_mask(x, 2, 0.5), rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, e: srt.soft_topk_mask(t, 2, e), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"eps must be a Python number under torch.compile"):
        compiled(x, eps)


@pytest.mark.parametrize("value", [np.float64(0.5), np.float32(0.5), np.array(0.5)],
                         ids=["float64", "float32", "0-d array"])
def test_numpy_eps_or_k_under_compile_is_refused_by_name(value):
    """Dynamo traces a numpy scalar as an array the checks cannot read: the
    error was "does not support tracing ndarray.dtype" (or a data-dependent
    guard); now a TypeError naming eps / k, and eager takes them as before."""
    x = _x((2, 6), seed=59)
    torch.testing.assert_close(srt.soft_rank(x, value), srt.soft_rank(x, 0.5), rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"eps must be a Python number under torch.compile"):
        torch.compile(lambda t: srt.soft_rank(t, value), fullgraph=True, backend="eager")(x)
    k = np.int64(2)
    torch.testing.assert_close(srt.soft_topk_mask(x, k), srt.soft_topk_mask(x, 2), rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"k must be a Python int under torch.compile"):
        torch.compile(lambda t: srt.soft_topk_mask(t, k), fullgraph=True, backend="eager")(x)
    # What compiled before stays compiled: a numpy array q, a Fraction eps.
    from fractions import Fraction

    torch._dynamo.reset()
    got = torch.compile(lambda t: srt.soft_quantile(t, np.array([0.25, 0.75]), Fraction(1, 2)),
                        fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, srt.soft_quantile(x, [0.25, 0.75], 0.5), rtol=0, atol=0)


def test_int_enum_eps_and_k_work_as_their_values():
    # guard_scalar asserted a plain int: an IntEnum eps or k failed with
    # "AssertionError: Expected int", where softrank.numpy takes it.
    import enum

    class Setting(enum.IntEnum):
        ONE = 1
        TWO = 2

    x = _x((2, 6), seed=62)
    torch.testing.assert_close(srt.soft_rank(x, Setting.ONE), srt.soft_rank(x, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(srt.soft_topk_mask(x, Setting.TWO), srt.soft_topk_mask(x, 2),
                               rtol=0, atol=0)


def test_tensor_k_works_eagerly_and_raises_clearly_under_compile():
    # (Inductor failed on it with GuardOnDataDependentSymNode.)
    x = _x((2, 6), seed=60)
    k = torch.tensor(2)
    torch.testing.assert_close(srt.soft_topk_mask(x, k), srt.soft_topk_mask(x, 2), rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, kk: srt.soft_topk_mask(t, kk), fullgraph=True)
    with pytest.raises(Exception, match=r"k must be a Python int under torch.compile"):
        compiled(x, k)


@pytest.mark.parametrize("through_vmap", [False, True])
@pytest.mark.parametrize("name", ["soft_topk_mask", "isotonic_regression",
                                  "permutahedron_projection", "soft_rank"])
def test_l2_gradient_penalty_is_zero_not_an_error(name, through_vmap):
    """l2 operators are piecewise linear, so a gradient penalty (the gradient
    of a function of the gradient, create_graph=True) has a zero gradient,
    as central differences of the penalty show away from ties. torch refused
    it for three of them ("element 0 of tensors does not require grad"),
    while soft_rank gave the zeros; and again through torch.func.vmap, whose
    generated rule saves batched inputs that do not read as requiring grad."""
    calls = {
        "soft_topk_mask": lambda a: srt.soft_topk_mask(a, 2, 0.7),
        "isotonic_regression": srt.isotonic_regression,
        "permutahedron_projection": srt.permutahedron_projection,
        "soft_rank": lambda a: srt.soft_rank(a, 0.7),
    }
    f = torch.func.vmap(calls[name]) if through_vmap else calls[name]
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(3, 6)), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(3, 6)))

    def penalty(a, create_graph):
        (g,) = torch.autograd.grad((f(a) * weights).sum(), a, create_graph=create_graph)
        return (g * g).sum()

    (penalty_grad,) = torch.autograd.grad(penalty(x, True), x)
    step = 1e-6
    expected = torch.zeros_like(x)
    for index in np.ndindex(*x.shape):
        shift = torch.zeros_like(x)
        shift[index] = step
        up = penalty((x.detach() + shift).requires_grad_(), False)
        down = penalty((x.detach() - shift).requires_grad_(), False)
        expected[index] = (up - down) / (2 * step)
    torch.testing.assert_close(penalty_grad, expected, rtol=0, atol=1e-6)


SAVED_HOOK_CASES = {
    "soft_sort kl": lambda a, w: srt.soft_sort(a, 3.0, regularization="kl"),
    "soft_rank kl": lambda a, w: srt.soft_rank(a, 3.0, regularization="kl"),
    "spearman kl": lambda a, w: srt.spearman(a, torch.arange(6.0).expand(3, 6), 3.0,
                                             regularization="kl"),
    "isotonic l2 weighted": lambda a, w: srt.isotonic_regression(a, weights=w),
    "isotonic kl weighted": lambda a, w: srt.isotonic_regression(a, weights=w,
                                                                 regularization="kl"),
}


@pytest.mark.parametrize("name", sorted(SAVED_HOOK_CASES))
def test_backward_reads_what_saved_tensor_hooks_unpack(name):
    """Under saved_tensors_hooks that pack a copy (activation offloading or
    compression), torch promises the backward the packed values; the eager
    CPU path read host views of the live buffers instead, so changing the
    input in place after the forward gave a wrong gradient (no error)."""
    f = SAVED_HOOK_CASES[name]
    rng = np.random.default_rng(4)
    x0 = torch.tensor(rng.normal(size=(3, 6)))
    w0 = torch.tensor(rng.uniform(0.5, 1.5, size=(3, 6)))

    def gradients(change_after_forward):
        leaf, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            x = leaf * 1.0
            out = f(x, w)
        if change_after_forward:
            with torch.no_grad():
                x.mul_(-3.0)
                w.mul_(5.0)
        cotangent = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
        return torch.autograd.grad(out, (leaf, w), cotangent, allow_unused=True)

    for got, expected in zip(gradients(True), gradients(False)):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _unusual_tensors():
    dense = torch.tensor([[0.3, 0.0, 2.0], [1.0, -1.0, 0.0]])
    yield "sparse", dense.to_sparse()
    yield "sparse", dense.to_sparse_csr()
    yield "nested", torch.nested.nested_tensor([dense[0], dense[1, :2]])
    yield "quantized", torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8)


LAYOUT_CALLS = [
    ("x", lambda v: srt.soft_rank(v, 0.5)),
    ("x", lambda v: srt.soft_sort(v, 0.5)),
    ("x", lambda v: srt.soft_topk_mask(v, 1, 0.5)),
    ("x", lambda v: srt.soft_quantile(v, 0.5, 0.5)),
    ("pred", lambda v: srt.spearman(v, torch.ones(2, 3), 0.5)),
    ("target", lambda v: srt.spearman(torch.ones(2, 3), v, 0.5)),
    ("y", srt.isotonic_regression),
    ("weights", lambda v: srt.isotonic_regression(torch.ones(2, 3), weights=v)),
    ("z", srt.permutahedron_projection),
    ("w", lambda v: srt.permutahedron_projection(torch.ones(2, 3), v)),
]


@pytest.mark.parametrize("name, call", LAYOUT_CALLS)
def test_sparse_nested_and_quantized_tensors_are_refused_by_name(name, call):
    """They failed inside the operators with errors naming neither the
    argument nor the problem ("unsupported memory format option", "Could not
    run 'softrank::projection_forward' ... SparseCPU", "NestedTensorImpl
    doesn't support sizes"), or a quantized operand was read as integers."""
    for kind, value in _unusual_tensors():
        if kind == "quantized" and name in ("x", "pred", "y", "z"):
            continue  # (refused by dtype, as before: a quantized x is not real)
        with pytest.raises(TypeError, match=rf"^{name} is a {kind}"):
            call(value)


def test_float8_and_odd_eps_tensors_are_refused():
    """float8 ranks saturated at 448 silently; a complex or bool eps tensor was
    read as its real part or as 1, a meta eps raised '.item() cannot be called
    on meta tensors'."""
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match=r"x must have dtype float16, bfloat16, float32 or"):
            srt.soft_rank(torch.zeros(500, dtype=torch.float8_e4m3fn), 0.0)
    x = torch.randn(2, 5)
    for eps in (torch.tensor(0.5 + 0j), torch.tensor(True)):
        with pytest.raises(TypeError, match="eps must be a real number"):
            srt.soft_rank(x, eps)
    with pytest.raises(TypeError, match="eps must be a Python number .* meta tensor"):
        srt.soft_rank(x.to("meta"), torch.tensor(0.5, device="meta"))
