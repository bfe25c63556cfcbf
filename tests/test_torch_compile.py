"""softrank.torch under torch.compile(fullgraph=True): no graph breaks, same
forward and gradient as eager."""
from __future__ import annotations

import pytest

from frameworks import require

torch = require("torch")
import softrank.torch as srt  # noqa: E402

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
