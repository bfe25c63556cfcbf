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


def _numpy_sinkhorn_loss(logits, noise, permutations, temperature, iterations):
    """Independent float64 reference: Sinkhorn in numpy, then the mean of -log S[b, j, perm[b, j]]."""
    import numpy as np

    log_alpha = (np.asarray(logits, dtype=np.float64) + np.asarray(noise, dtype=np.float64)) / temperature
    for _ in range(iterations):
        for axis in (2, 1):
            peak = log_alpha.max(axis=axis, keepdims=True)
            log_alpha = log_alpha - (peak + np.log(np.exp(log_alpha - peak).sum(axis=axis, keepdims=True)))
    b, n = np.indices(np.asarray(permutations).shape)
    return float(-log_alpha[b, n, np.asarray(permutations)].mean())


def test_gumbel_sinkhorn_loss_matches_a_numpy_reference():
    _, permutations = _shuffled_batch(batch=3, n=5, seed=2)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    noise = losses.sample_gumbel((3, 5, 5), generator=g, dtype=torch.float64)
    for temperature, iterations in ((1.0, 1), (0.5, 7), (2.0, 20)):
        got = losses.gumbel_sinkhorn_loss(logits, permutations, temperature=temperature,
                                          num_iterations=iterations, gumbel_noise=noise).item()
        assert got == pytest.approx(_numpy_sinkhorn_loss(logits, noise, permutations, temperature, iterations),
                                    rel=1e-12, abs=1e-12)
    # numpy integer and float scalars are accepted like Python ones.
    import numpy as np

    same = losses.gumbel_sinkhorn_loss(logits, permutations, temperature=np.float64(0.5), num_iterations=np.int64(7),
                                       gumbel_noise=noise).item()
    assert same == pytest.approx(_numpy_sinkhorn_loss(logits, noise, permutations, 0.5, 7), rel=1e-12, abs=1e-12)


def _good_sinkhorn_inputs():
    return torch.randn(2, 3, 3), torch.tensor([[0, 1, 2], [2, 0, 1]])


@pytest.mark.parametrize("logits, permutations, match", [
    (torch.randn(2, 3, 3), torch.tensor([[0, 1], [1, 0]]), r"permutations must have shape \(B, n\) = \(2, 3\)"),
    (torch.randn(2, 3, 3), torch.tensor([0, 1, 2]), "permutations must have shape"),
    (torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [2, 1, 0]]), r"assignment_logits must have shape \(B, n, n\)"),
    (torch.randn(3, 3), torch.tensor([[0, 1, 2]]), "assignment_logits must have shape"),
    (torch.randn(0, 3, 3), torch.zeros(0, 3, dtype=torch.int64), "B, n >= 1"),
    (torch.randn(2, 3, 3), torch.tensor([[0, 0, 1], [2, 0, 1]]), "permutation of 0..2"),
    (torch.randn(2, 3, 3), torch.tensor([[0, 1, 3], [2, 0, 1]]), "permutation of 0..2"),
    (torch.randn(2, 3, 3), torch.tensor([[-1, 0, 1], [2, 0, 1]]), "permutation of 0..2"),
])
def test_gumbel_sinkhorn_loss_refuses_bad_shapes_and_non_permutations(logits, permutations, match):
    # Each used to return a number: a loss over the wrong entries, or over a repeated one.
    with pytest.raises(ValueError, match=match):
        losses.gumbel_sinkhorn_loss(logits, permutations)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, "temperature"),  # used to give NaN
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(temperature=torch.tensor(1.0)), TypeError, "temperature"),
    (dict(num_iterations=0), ValueError, "num_iterations must be >= 1"),
    (dict(num_iterations=-3), ValueError, "num_iterations"),
    (dict(num_iterations=2.0), TypeError, "num_iterations"),
    (dict(num_iterations=True), TypeError, "num_iterations"),
    (dict(gumbel_noise=torch.randn(3, 3)), ValueError, "gumbel_noise must have the shape"),
    (dict(gumbel_noise=torch.ones(2, 3, 3, dtype=torch.int64)), TypeError, "gumbel_noise"),
])
def test_gumbel_sinkhorn_refuses_bad_settings(kwargs, error, match):
    logits, permutations = _good_sinkhorn_inputs()
    with pytest.raises(error, match=match):
        losses.gumbel_sinkhorn_loss(logits, permutations, **kwargs)
    with pytest.raises(error, match=match):
        losses.gumbel_sinkhorn(logits, **kwargs)


def test_gumbel_sinkhorn_refuses_non_float_inputs():
    logits, permutations = _good_sinkhorn_inputs()
    with pytest.raises(TypeError, match="assignment_logits must have a floating-point dtype"):
        losses.gumbel_sinkhorn(torch.zeros(2, 3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="permutations must have an integer dtype"):
        losses.gumbel_sinkhorn_loss(logits, permutations.float())
    with pytest.raises(TypeError, match="assignment_logits must be a torch.Tensor"):
        losses.gumbel_sinkhorn_loss(logits.numpy(), permutations)


@pytest.mark.parametrize("logits, labels, error, match", [
    (torch.randn(2, 3), torch.tensor([0, 3]), ValueError, r"lie in 0..2"),
    (torch.randn(2, 3), torch.tensor([0, -1]), ValueError, r"lie in 0..2"),
    (torch.randn(2, 3), torch.tensor([0, -100]), ValueError, r"lie in 0..2"),  # cross_entropy's ignore_index
    (torch.randn(2, 3), torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\) = \(2,\)"),
    (torch.randn(2, 3), torch.tensor([[0], [1]]), ValueError, "permutation_labels must have shape"),
    (torch.randn(2, 3, 4), torch.tensor([0, 1]), ValueError, r"logits must have shape \(B, K\)"),
    (torch.randn(3), torch.tensor(0), ValueError, "logits must have shape"),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.int64), ValueError, "B, K >= 1"),  # mean of nothing: NaN
    (torch.randn(2, 3), torch.softmax(torch.randn(2, 3), 1), TypeError, "integer dtype"),  # read as probabilities
    (torch.randint(0, 3, (2, 3)), torch.tensor([0, 1]), TypeError, "logits must have a floating-point dtype"),
])
def test_classification_loss_refuses_bad_input(logits, labels, error, match):
    with pytest.raises(error, match=match):
        losses.permutation_classification_loss(logits, labels)


def test_classification_loss_accepts_any_integer_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [2, 1]]).mean()
    for dtype in (torch.int64, torch.int32, torch.uint8):
        got = losses.permutation_classification_loss(logits, torch.tensor([2, 1], dtype=dtype))
        assert got.item() == pytest.approx(expected.item(), rel=1e-14)


def test_reorder_loss_refuses_empty_and_non_float_input():
    for shape in ((0, 4), (3, 0)):  # the mean over no patches would be NaN
        with pytest.raises(ValueError, match="at least one example"):
            losses.reorder_loss(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(TypeError, match="scores must have a floating-point dtype"):
        losses.reorder_loss(torch.tensor([[1, 2, 3]]), torch.tensor([[1.0, 2.0, 3.0]]))
    with pytest.raises(TypeError, match="target_ranks must be a torch.Tensor"):
        losses.reorder_loss(torch.tensor([[1.0, 2.0, 3.0]]), [[1.0, 2.0, 3.0]])


def test_pretext_model_refuses_a_wrong_number_of_patches_and_bad_permutations():
    shuffled, permutations = _shuffled_batch(batch=4, n=5)
    encoder = PatchEncoder((1, 3, 3), 8, 8)
    for method in ("soft_rank", "sinkhorn"):
        model = PretextModel(encoder, method, 6, head_hidden_dim=8)
        # The soft-rank head scores any number of patches: n = 5 used to train a 6-patch model silently.
        with pytest.raises(ValueError, match=r"shuffled_patches must have shape \(B, n=6"):
            model(shuffled, permutations)
        model = PretextModel(encoder, method, 5, head_hidden_dim=8)
        with pytest.raises(ValueError, match="permutation of 0..4"):
            model(shuffled, torch.zeros_like(permutations))
    with pytest.raises(ValueError, match="temperature"):
        PretextModel(encoder, "sinkhorn", 5, sinkhorn_temperature=0.0)
    with pytest.raises(ValueError, match="num_iterations"):
        PretextModel(encoder, "sinkhorn", 5, sinkhorn_iterations=0)
    with pytest.raises(TypeError, match="num_permutations"):
        PretextModel(encoder, "classification", 5, num_permutations=2.5)
    with pytest.raises(ValueError, match="num_patches"):
        PretextModel(encoder, "soft_rank", 0)


def test_reorder_loss_refuses_target_ranks_outside_one_to_n():
    """NaN targets gave a NaN loss and targets outside 1..n a loss above the
    documented [0, 1), silently."""
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    for bad in ([[float("nan"), 1.0, 2.0]], [[10.0, 0.0, 0.0]], [[0.0, 1.0, 2.0]]):
        with pytest.raises(ValueError, match=r"target_ranks must hold ranks in \[1, n\] = \[1, 3\]"):
            losses.reorder_loss(scores, torch.tensor(bad))
    assert float(losses.reorder_loss(scores, torch.tensor([[1.0, 2.5, 2.5]]), eps=1e-3)) >= 0.0


def test_sample_gumbel_refuses_an_integer_dtype():
    """It returned integer 'noise' such as [0, 0, 0, 1]."""
    with pytest.raises(TypeError, match="dtype must be a floating torch dtype"):
        losses.sample_gumbel((4,), dtype=torch.int64)
    assert losses.sample_gumbel((4,), dtype=torch.float64).dtype == torch.float64
