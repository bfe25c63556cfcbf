"""softrank.pretext.losses and models: reorder, classification and Gumbel-Sinkhorn losses."""
from __future__ import annotations

import importlib
import os

import pytest


def _require(module: str):
    """Import ``module``; skip when it is missing, except under CI where it must be there."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


torch = _require("torch")
_require("softrank.torch")
from softrank.pretext import losses  # noqa: E402
from softrank.pretext.models import PatchEncoder, PretextModel  # noqa: E402
from softrank.pretext.permutations import (  # noqa: E402
    apply_permutations,
    random_permutations,
    ranks_that_unshuffle,
)


def _shuffled_batch(batch=8, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, n, 1, 3, 3, generator=g)
    permutations = random_permutations(batch, n, generator=g)
    return apply_permutations(patches, permutations), permutations


def test_reorder_loss_is_zero_at_the_right_answer():
    _, permutations = _shuffled_batch()
    targets = ranks_that_unshuffle(permutations, torch.float64)
    for eps in (0.1, 1.0):
        scores = (targets * eps).requires_grad_()  # gaps of eps: the hard ranks, up to rounding
        assert losses.reorder_loss(scores, targets, eps).item() < 1e-24
        wider = (targets * 2 * eps).requires_grad_()  # gaps of 2 eps: every PAV block is a singleton
        loss = losses.reorder_loss(wider, targets, eps)
        assert loss.item() < 1e-24
        loss.backward()
        assert wider.grad.abs().max() < 1e-12
    # Any scale of at least eps and any shift keep the loss at zero.
    assert losses.reorder_loss(3.0 * targets - 7.0, targets, 1.0).item() < 1e-24


def test_reorder_loss_penalises_wrong_orders_and_is_normalised():
    _, permutations = _shuffled_batch(n=9)
    targets = ranks_that_unshuffle(permutations, torch.float64)
    reversed_scores = -10.0 * targets
    worst = losses.reorder_loss(reversed_scores, targets, 1.0).item()
    assert 0.0 < worst < 1.0
    # Hard reversed ranks r' = n + 1 - r: mean((n + 1 - 2r)^2) / n^2 = (n^2 - 1) / (3 n^2).
    assert worst == pytest.approx((81 - 1) / (3 * 81))
    tied = losses.reorder_loss(torch.zeros_like(targets), targets, 1.0).item()
    assert 0.0 < tied < worst


def test_reorder_loss_gradient_flows_to_the_encoder():
    shuffled, permutations = _shuffled_batch()
    torch.manual_seed(0)
    model = PretextModel(PatchEncoder((1, 3, 3), 8, 16), "soft_rank", 6, head_hidden_dim=16)
    loss = model(shuffled, permutations)
    assert loss.item() > 0
    loss.backward()
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_reorder_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        losses.reorder_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        losses.reorder_loss(torch.zeros(3), torch.zeros(3))


def test_classification_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    expected = (-torch.log_softmax(logits, 1)[[0, 1], [0, 2]]).mean()
    assert losses.permutation_classification_loss(logits, labels).item() == pytest.approx(expected.item())


def test_gumbel_sinkhorn_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 7, generator=g, dtype=torch.float64)
    noise = losses.sample_gumbel((4, 7, 7), generator=g, dtype=torch.float64)
    log_s = losses.gumbel_sinkhorn(logits, temperature=1.0, num_iterations=500, gumbel_noise=noise)
    s = log_s.exp()
    ones = torch.ones(4, 7, dtype=torch.float64)
    torch.testing.assert_close(s.sum(1), ones, atol=1e-9, rtol=0)  # the last step normalises columns
    torch.testing.assert_close(s.sum(2), ones, atol=1e-6, rtol=0)
    huge = losses.gumbel_sinkhorn(logits * 1e4, num_iterations=5)
    assert torch.isfinite(huge).all()


def test_gumbel_sinkhorn_loss_prefers_the_true_assignment():
    _, permutations = _shuffled_batch(n=5)
    truth = torch.nn.functional.one_hot(permutations, 5).double()
    good = losses.gumbel_sinkhorn_loss(10.0 * truth, permutations, num_iterations=30).item()
    bad = losses.gumbel_sinkhorn_loss(10.0 * truth.flip(2), permutations, num_iterations=30).item()
    assert 0.0 <= good < 1e-3 < bad


@pytest.mark.parametrize("method", ["soft_rank", "classification", "sinkhorn"])
def test_every_head_trains_the_same_encoder(method):
    shuffled, permutations = _shuffled_batch(batch=4, n=6)
    torch.manual_seed(0)
    model = PretextModel(PatchEncoder((1, 3, 3), 8, 16), method, 6, num_permutations=5, head_hidden_dim=16)
    labels = torch.tensor([0, 1, 2, 4]) if method == "classification" else None
    noise = losses.sample_gumbel((4, 6, 6)) if method == "sinkhorn" else None
    loss = model(shuffled, permutations, labels, noise)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0


def test_pretext_model_validates_its_arguments():
    encoder = PatchEncoder((4,), 8, 8)
    with pytest.raises(ValueError):
        PretextModel(encoder, "jigsaw", 4)
    with pytest.raises(ValueError):
        PretextModel(encoder, "classification", 4)
    model = PretextModel(encoder, "classification", 4, num_permutations=3)
    with pytest.raises(ValueError):
        model(torch.zeros(2, 4, 4), torch.zeros(2, 4, dtype=torch.int64))
