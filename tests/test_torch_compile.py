"""softrank.torch under torch.compile(fullgraph=True): no graph breaks, same
forward and gradient as eager."""
from __future__ import annotations

import pytest

from frameworks import require

torch = require("torch")
import softrank.torch as srt  # noqa: E402
from torch_fd import fd_jacobian  # noqa: E402

# Inductor's own imports use a deprecated torch.jit API; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def spearman_loss(pred, target, eps=0.5, regularization="l2", dim=-1):
    """1 - Spearman correlation between soft ranks of ``pred`` and ``target``'s ranks."""
    pred_rank = srt.soft_rank(pred, eps, regularization=regularization, dim=dim)
    target_rank = srt.soft_rank(target, 0.0, dim=dim)
    pred_rank = pred_rank - pred_rank.mean(dim=dim, keepdim=True)
    target_rank = target_rank - target_rank.mean(dim=dim, keepdim=True)
    pred_rank = pred_rank / pred_rank.norm(dim=dim, keepdim=True)
    target_rank = target_rank / target_rank.norm(dim=dim, keepdim=True)
    return 1 - (pred_rank * target_rank).sum(dim=dim).mean()


def sort_loss(x, regularization="l2", dim=-1):
    return srt.soft_sort(x, 0.3, regularization=regularization, direction="descending", dim=dim).pow(2).sum()


def _eager_and_compiled(fn, backend, *inputs, **kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a, **kwargs), fullgraph=True, backend=backend)
    results = []
    for run in (lambda *a: fn(*a, **kwargs), compiled):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        loss = run(*leaves)
        grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
        results.append((loss.detach(), [g.detach() for g in grads]))
    return results


@pytest.mark.parametrize("regularization", ["l2", "kl"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_spearman_loss_matches_eager(backend, regularization):
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(8, 30, generator=generator, requires_grad=True)
    target = torch.randn(8, 30, generator=generator)
    (eager_loss, eager_grads), (loss, grads) = _eager_and_compiled(
        spearman_loss, backend, pred, target, regularization=regularization
    )
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grads[0], eager_grads[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_sort_any_dim_and_dtype(dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 5, generator=generator).to(dtype).requires_grad_(True)
    (eager_loss, eager_grads), (loss, grads) = _eager_and_compiled(
        sort_loss, "aot_eager", x, regularization="kl", dim=1
    )
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grads[0], eager_grads[0])


def test_no_graph_breaks():
    torch._dynamo.reset()
    x = torch.randn(3, 12)
    explanation = torch._dynamo.explain(spearman_loss)(x, x.flip(-1))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    ops = [node.target for graph in explanation.graphs for node in graph.graph.nodes]
    assert {torch.ops.softrank.soft_forward, torch.ops.softrank.soft_forward.default} & set(ops)


def test_compiled_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: srt.soft_rank(t, 0.5).pow(2).sum(), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    for n in (5, 17, 40):
        x = torch.randn(2, n, requires_grad=True)
        (grad,) = torch.autograd.grad(compiled(x), x)
        x2 = x.detach().clone().requires_grad_(True)
        (want,) = torch.autograd.grad(srt.soft_rank(x2, 0.5).pow(2).sum(), x2)
        torch.testing.assert_close(grad, want)


def test_exported_float16_projection_with_a_dynamic_n_bounds_n_for_the_default_w():
    """With a symbolic n (torch.export with a dynamic dim) the float16 check of the
    default w was skipped (it compared only a Python int): the exported program
    ran any n, and past n = 65504 its output was inf. The check now bounds n as
    soft_rank's does: export asks for the constraint, and runs with it."""

    class Projection(torch.nn.Module):
        def forward(self, z):
            return srt.permutahedron_projection(z)

    example = (torch.randn(1, 8, dtype=torch.float16),)
    with pytest.raises(Exception, match=r"max=65504"):
        torch.export.export(Projection(), example,
                            dynamic_shapes=({1: torch.export.Dim("n", min=2)},))
    exported = torch.export.export(Projection(), example,
                                   dynamic_shapes=({1: torch.export.Dim("n", min=2, max=65504)},))
    for n in (5, 300):
        z = torch.randn(1, n, dtype=torch.float16)
        torch.testing.assert_close(exported.module()(z), srt.permutahedron_projection(z),
                                   rtol=0, atol=0)
    with pytest.raises(Exception, match=r"n|65504"):
        exported.module()(torch.randn(1, 65505, dtype=torch.float16))


# --- a gradient penalty (double backward) through a compiled graph ----------------------
# AOTAutograd cannot differentiate its compiled backward: it raises, as for
# torch.sin, where the tensor the backward needs is the graph's input. A 1-D x
# was reshaped to rows before the operator, an intermediate that it saves
# detached: the penalty's dependence on x was then silently dropped.

_PENALIZED = {
    "soft_rank": lambda t: srt.soft_rank(t, 5.0, regularization="kl"),
    "soft_sort": lambda t: srt.soft_sort(t, 5.0, regularization="kl", direction="descending"),
    "spearman": lambda t: srt.spearman(t, torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)
                                       .expand(t.shape), 5.0, regularization="kl"),
}


def _penalized_loss(name):
    op = _PENALIZED[name]

    def loss(x):
        y = op(x)
        # (not summing to 0: a kl soft sort pooled into one block would give no gradient)
        weights = torch.linspace(0.5, 2.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        (g,) = torch.autograd.grad((y * weights).sum(), x, create_graph=True)
        return (g ** 2).sum() + x.sum()

    return loss


@pytest.mark.parametrize("shape", [(6,), (2, 6), (2, 1, 6)])
@pytest.mark.parametrize("name", list(_PENALIZED))
def test_compiled_gradient_penalty_raises_instead_of_dropping_it(name, shape):
    loss = _penalized_loss(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                    requires_grad=True)
    torch._dynamo.reset()
    value = torch.compile(loss)(x)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        torch.autograd.grad(value, x)


@pytest.mark.parametrize("shape", [(6,), (2, 6)])
@pytest.mark.parametrize("name", list(_PENALIZED))
def test_eager_gradient_penalty_matches_finite_differences(name, shape):
    loss = _penalized_loss(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def value(t):
        with torch.enable_grad():  # (fd_jacobian evaluates under no_grad)
            return loss(t.detach().requires_grad_(True)).detach()

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    want = fd_jacobian(value, x)
    # (the penalty's share, not the constant 1 of x.sum(): the test of it being kept)
    assert (want - 1).abs().max() > 1e-3
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)


# --- Python-number arguments that change between calls ----------------------------------
# dynamo passes an int (and, once its value changes, a float) as a SymInt /
# SymFloat; softrank specializes eps and q to the numbers they hold, so that each
# value is a constant of a graph, as a float eps always was.

_EPS_CALLS = {
    "soft_rank": lambda t, e: srt.soft_rank(t, e),
    "soft_sort": lambda t, e: srt.soft_sort(t, e, regularization="kl"),
    "soft_topk_mask": lambda t, e: srt.soft_topk_mask(t, 2, e),
    "spearman": lambda t, e: srt.spearman(t, t.flip(-1), e),
    "soft_quantile": lambda t, e: srt.soft_quantile(t, 0.3, e),
    "soft_median": lambda t, e: srt.soft_median(t, e, regularization="kl"),
}


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("name", list(_EPS_CALLS))
def test_compiled_int_and_float_eps_that_change_give_the_eager_values(name, dynamic):
    f = _EPS_CALLS[name]
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    for eps in (1, 2, 3, 0, 0.5, 1.5):
        torch.testing.assert_close(compiled(x, eps), f(x, float(eps)), rtol=0, atol=0,
                                   msg=f"eps={eps!r}")


def test_compiled_negative_int_eps_raises_the_library_error():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, e: srt.soft_rank(t, e), fullgraph=True, backend="eager")
    compiled(x, 1)
    with pytest.raises(Exception, match="eps must be >= 0"):
        compiled(x, -2)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_compiled_q_argument_that_changes_gives_the_eager_quantiles(as_list, dynamic):
    def f(t, q):
        return srt.soft_quantile(t, [q, 0.5] if as_list else q, 0.5, regularization="kl")

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    for q in (0.2, 0.7, 0.4, 0, 1):
        torch.testing.assert_close(compiled(x, q), f(x, q), rtol=0, atol=0, msg=f"q={q!r}")
    with pytest.raises(Exception, match=r"q must lie in \[0, 1\]"):
        compiled(x, 1.5)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_k_argument_that_changes_gives_the_eager_mask(dynamic):
    """An int k argument arrives as a SymInt once it changes (or with
    dynamic=True): check_k crashed dynamo ("Unsupported hasattr call")."""
    def f(t, k):
        return srt.soft_topk_mask(t, k, 0.5)

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    for k in (2, 3, 0, 6):
        torch.testing.assert_close(compiled(x, k), f(x, k), rtol=0, atol=0, msg=f"k={k}")
    with pytest.raises(Exception, match=r"k must lie in \[0, n\]"):
        compiled(x, 7)


@pytest.mark.parametrize("q, error", [(1.5, ValueError), (float("nan"), ValueError),
                                      ([[0.1]], ValueError), ("a", TypeError),
                                      (True, TypeError), ([0.2, 2.0], ValueError)])
def test_compiled_invalid_q_raises_the_eager_exception_type(q, error):
    """An invalid q under torch.compile raised dynamo's InternalTorchDynamoError
    (the check ran inside a constant-result function), which `except
    ValueError` misses; now the eager ValueError / TypeError, naming q."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: srt.soft_quantile(t, q, 0.5), backend="eager")
    with pytest.raises(error, match=r"^q must"):
        srt.soft_quantile(x, q, 0.5)
    with pytest.raises(error, match=r"^q must"):
        compiled(x)


def test_compile_around_a_func_transform_with_graph_breaks_gives_the_eager_results():
    # (fullgraph=True there stops in dynamo itself: see the README's table)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(61))
    torch._dynamo.reset()
    batched = torch.compile(lambda v: torch.func.vmap(lambda r: srt.soft_rank(r, 0.5))(v))
    torch.testing.assert_close(batched(x), srt.soft_rank(x, 0.5), rtol=1e-12, atol=1e-12)

    def loss(r):
        return (srt.soft_sort(r, 0.5, regularization="kl") ** 2).sum()

    gradient = torch.compile(lambda v: torch.func.grad(loss)(v))
    torch.testing.assert_close(gradient(x), torch.func.grad(loss)(x), rtol=1e-12, atol=1e-12)


def test_softrank_marks_constant_results_as_torch_s_decorator_does():
    """softrank.torch marks ``_checked_levels`` (q's checks: a constant of the
    graph) without importing torch._dynamo at import (which would also import
    torch.distributed.tensor): it sets the attribute that
    ``torch.compiler.assume_constant_result`` sets. A torch that marks functions
    otherwise fails here, not silently in the compiled quantiles."""
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", None) is True
    assert getattr(srt._checked_levels, "_dynamo_marked_constant", None) is True


def test_compiled_operators_on_parameters_made_inside_the_function():
    """nn.Parameters built inside a compiled function (a graph break: dynamo
    refuses the constructor under fullgraph) reach every tensor check of the
    operators; dynamo cannot guard ``type()`` of such a tensor (it failed hard,
    "name 'SYNTHETIC_LOCAL' is not defined"), so the checks must not use it."""
    torch.manual_seed(0)
    z, w = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    cases = [
        lambda: srt.permutahedron_projection(z, torch.nn.Parameter(w)),
        lambda: srt.permutahedron_projection(torch.nn.Parameter(z), torch.nn.Parameter(w)),
        lambda: srt.spearman(z, torch.nn.Parameter(w)),
        lambda: srt.soft_rank(torch.nn.Parameter(z), 0.5),
        lambda: srt.soft_quantile(torch.nn.Parameter(z), [0.3, 0.5], 0.5),
        lambda: srt.isotonic_regression(torch.nn.Parameter(z), weights=torch.nn.Parameter(w.exp())),
    ]
    for case in cases:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(case)(), case(),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_compiled_top_k_gradients_at_a_subnormal_eps_are_the_eager_ones(regularization):
    """Where 1 / eps overflows, _derivatives scales by two finite constants
    (ops.times_factors): a compiler that folded them into their product, inf,
    would turn a singleton block's exact 0 into NaN, as TensorFlow's grappler
    and XLA did. Inductor's gradients equal eager's, bitwise."""
    x = torch.tensor([[1e12, 0.5, -3.0, 2.0], [1.0, 1.0, 1.0, -1.0], [0.3, -0.2, 0.1, 0.3],
                      [3.0, 1.0, 3.0, -2.0], [-1e12, 1e12, 0.25, 0.25]], dtype=torch.float64,
                     requires_grad=True)
    weights = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for eps in (5e-324, 1e-310):
        for k in (1, 2):
            def loss(v, c, eps=eps, k=k):
                return (srt.soft_topk_mask(v, k, eps, regularization=regularization) * c).sum()

            x.requires_grad_(True)
            (eager_loss, eager_grads), (compiled_loss, grads) = _eager_and_compiled(
                loss, "inductor", x, weights)
            assert not torch.isnan(grads[0]).any()
            assert torch.equal(grads[0], eager_grads[0]), (eps, k)
            assert torch.equal(compiled_loss, eager_loss)
