"""Pretext losses on shuffled patches (torch): reorder, classification, Gumbel-Sinkhorn.

All three see the same thing: a batch of shuffled patch sequences, embedded
patch by patch by one shared encoder, and the permutations that shuffled them
(convention of :mod:`softrank.pretext.permutations`: ``shuffled[b, j] =
patches[b, perm[b, j]]``).

- :func:`reorder_loss` (Carr et al. 2021): one scalar score per patch, turned
  into soft ranks by ``softrank.torch.soft_rank`` and compared with the ranks
  that undo the shuffle. Any of the ``n!`` permutations can be used; cost
  O(n log n) per example on top of the encoder.
- :func:`permutation_classification_loss` (Noroozi & Favaro 2016): which of a
  fixed set of ``K`` permutations was applied, as a ``K``-way cross entropy.
- :func:`gumbel_sinkhorn_loss` (Mena et al. 2018): an ``n x n`` matrix of
  assignment logits, Gumbel noise, then Sinkhorn normalisation, O(n^2) per
  iteration, scored against the true permutation matrix.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.pretext needs PyTorch: pip install 'softrank[pretext]'") from exc
import torch.nn.functional as F
from softrank.pretext._checks import as_count

__all__ = [
    "DEFAULT_EPS",
    "reorder_loss",
    "permutation_classification_loss",
    "gumbel_sinkhorn",
    "gumbel_sinkhorn_loss",
    "sample_gumbel",
]

DEFAULT_EPS = 1.0
"""Default soft-rank strength of :func:`reorder_loss`.

With l2 regularisation the soft ranks equal the hard ranks exactly once every
two consecutive sorted scores are at least ``eps`` apart, so ``eps = 1``
asks the scores to be separated by one unit, the spacing of the ranks
themselves; for scores closer than that the soft ranks blend linearly and the
loss behaves like a regression of the scores onto ``eps * ranks``.
"""


def _check_float_tensor(value: Any, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")


def _check_index_tensor(value: Any, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        # A float tensor would be read as class probabilities by cross_entropy, a silently different loss.
        raise TypeError(f"{name} must have an integer dtype (int64), got {value.dtype}")


def _check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; raise unless it is a real number, finite and > 0.

    The logits are divided by it: 0 gives NaN (0/0) or inf, a negative value
    reverses the preferred assignment, and inf erases the logits. A tensor is
    refused rather than converted, since converting would silently cut the
    gradient of a learnt temperature.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number (float), got {type(temperature).__name__} {temperature!r}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return value


def _check_num_iterations(num_iterations: Any) -> int:
    """``num_iterations`` as an int >= 1: with 0 iterations the "soft
    permutation" is the raw scaled logits, not a normalised matrix, and the
    loss is not a cross entropy."""
    return as_count(num_iterations, "num_iterations", minimum=1)


def _check_permutations(permutations: Any, batch: int, num_patches: int, name: str = "permutations") -> None:
    """Raise unless ``permutations`` is an integer ``(batch, n)`` tensor whose rows permute ``0..n-1``.

    A repeated or out-of-range index would otherwise score one patch twice (a
    wrong loss, silently) or fail deep inside ``gather``.
    """
    _check_index_tensor(permutations, name)
    if tuple(permutations.shape) != (batch, num_patches):
        raise ValueError(
            f"{name} must have shape (B, n) = {(batch, num_patches)}, got {tuple(permutations.shape)}"
        )
    identity = torch.arange(num_patches, device=permutations.device, dtype=permutations.dtype)
    if not bool((permutations.sort(dim=1).values == identity).all()):
        raise ValueError(f"every row of {name} must be a permutation of 0..{num_patches - 1}")


def reorder_loss(
    scores: torch.Tensor,
    target_ranks: torch.Tensor,
    eps: float = DEFAULT_EPS,
    *,
    regularization: str = "l2",
) -> torch.Tensor:
    """Mean squared error between the soft ranks of ``scores`` and the target ranks.

    ``loss = mean_{b, j} ((soft_rank(scores, eps)[b, j] - target_ranks[b, j]) / n)^2``

    Normalisation: the rank error is divided by ``n``, so the loss lies in
    ``[0, 1)`` whatever the number of patches, and averaged over the batch and
    the patches. It is exactly 0 when the scores are ordered like the targets
    and (l2) every two consecutive sorted scores are at least ``eps`` apart.

    Gradient: flows to ``scores`` through ``soft_rank``'s exact O(n) backward;
    zero for an example whose scores are already correctly ordered with gaps
    ``>= eps`` (l2).

    Parameters
    ----------
    scores : torch.Tensor, shape (B, n), float
        One score per shuffled patch; a higher score means later in the order.
    target_ranks : torch.Tensor, shape (B, n)
        1-based ascending ranks that undo the shuffle
        (:func:`softrank.pretext.permutations.ranks_that_unshuffle`).
    eps : float, default :data:`DEFAULT_EPS` (1.0)
        Strength of ``soft_rank``, in units of the scores.
    regularization : {"l2", "kl"}, default "l2"

    Returns
    -------
    torch.Tensor, shape (), dtype of ``scores``

    Raises
    ------
    TypeError
        If ``scores`` is not a floating-point tensor or ``target_ranks`` not a tensor.
    ValueError
        If the shapes differ or are not ``(B, n)`` with ``B, n >= 1``, or
        ``eps``/``regularization`` is invalid (checked by ``soft_rank``).

    Examples
    --------
    >>> scores = torch.tensor([[3.0, 1.0, 2.0]])
    >>> float(reorder_loss(scores, torch.tensor([[3.0, 1.0, 2.0]]), eps=0.5))
    0.0
    """
    _check_float_tensor(scores, "scores")
    if not isinstance(target_ranks, torch.Tensor):
        raise TypeError(f"target_ranks must be a torch.Tensor, got {type(target_ranks).__name__}")
    if scores.shape != target_ranks.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and target_ranks {tuple(target_ranks.shape)} "
            "must both have shape (B, n)"
        )
    if scores.numel() == 0:
        # The mean over no patches is 0/0 = NaN.
        raise ValueError(
            f"scores must hold at least one example of at least one patch, got shape {tuple(scores.shape)}"
        )
    num_patches = scores.shape[1]
    if target_ranks.is_complex() or target_ranks.dtype == torch.bool or not bool(
            ((target_ranks >= 1) & (target_ranks <= num_patches)).all()):
        # (NaN fails both comparisons; outside [1, n] the loss would leave [0, 1))
        raise ValueError(f"target_ranks must hold ranks in [1, n] = [1, {num_patches}] (1-based, "
                         f"no NaN)")
    return _reorder_loss(scores, target_ranks, eps, regularization)


def _reorder_loss(scores: torch.Tensor, target_ranks: torch.Tensor, eps: float,
                  regularization: str = "l2") -> torch.Tensor:
    """:func:`reorder_loss` without its checks, for target ranks valid by
    construction (PretextModel's, from checked permutations: one device sync
    per step fewer)."""
    from softrank.torch import soft_rank  # lazy: the torch adapter is optional

    num_patches = scores.shape[1]
    ranks = soft_rank(scores, eps, regularization=regularization, direction="ascending", dim=1)
    error = (ranks - target_ranks.to(ranks.dtype)) / num_patches
    return error.pow(2).mean()


def permutation_classification_loss(logits: torch.Tensor, permutation_labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy over the ``K`` permutations of a fixed set (jigsaw baseline).

    ``loss = mean_b -log softmax(logits[b])[label[b]]``

    Parameters
    ----------
    logits : torch.Tensor, shape (B, K), float
        From a head that sees all ``n`` patch embeddings of an example at once.
    permutation_labels : torch.Tensor, shape (B,), int64
        Index in the fixed set (:func:`~softrank.pretext.permutations.hamming_permutation_set`)
        of the permutation that shuffled each example.

    Returns
    -------
    torch.Tensor, shape (), dtype of ``logits``

    Raises
    ------
    TypeError
        If ``logits`` is not floating point or ``permutation_labels`` not integer
        (``cross_entropy`` would read float labels as class probabilities).
    ValueError
        If ``logits`` is not ``(B, K)`` with ``B, K >= 1``, the labels are not
        ``(B,)``, or a label lies outside ``0..K-1`` (``cross_entropy`` would
        silently ignore ``-100``).
    """
    _check_float_tensor(logits, "logits")
    _check_index_tensor(permutation_labels, "permutation_labels")
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (B, K) with B, K >= 1, got {tuple(logits.shape)}")
    batch, num_permutations = logits.shape
    if tuple(permutation_labels.shape) != (batch,):
        raise ValueError(
            f"permutation_labels must have shape (B,) = ({batch},), got {tuple(permutation_labels.shape)}"
        )
    if bool(((permutation_labels < 0) | (permutation_labels >= num_permutations)).any()):
        raise ValueError(f"permutation_labels must lie in 0..{num_permutations - 1} (K = {num_permutations})")
    return F.cross_entropy(logits, permutation_labels.to(device=logits.device, dtype=torch.int64))


def sample_gumbel(shape: torch.Size | tuple, *, generator: Optional[torch.Generator] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(U))``, ``U ~ Uniform(0, 1)``, on the CPU.

    Returns
    -------
    torch.Tensor, shape ``shape``, ``dtype``
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    tiny = torch.finfo(torch.float64).tiny
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(tiny, 1.0 - 1e-16)
    return (-torch.log(-torch.log(uniform))).to(dtype)


def _check_assignment_logits(assignment_logits: Any) -> None:
    _check_float_tensor(assignment_logits, "assignment_logits")
    shape = tuple(assignment_logits.shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"assignment_logits must have shape (B, n, n) with B, n >= 1 (square: one row and one "
            f"column per patch), got {shape}"
        )


def gumbel_sinkhorn(
    assignment_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_iterations: int = 20,
    gumbel_noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Log of a soft permutation matrix by Sinkhorn normalisation (Mena et al. 2018).

    ``log S = Sinkhorn^L((logits + noise) / temperature)``, alternating row and
    column log-normalisation (log-sum-exp, so large logits stay finite); each
    iteration costs O(n^2) per example. As ``temperature -> 0`` and
    ``L -> inf`` ``S`` tends to the permutation matrix that maximises
    ``sum_j logits[j, sigma(j)]``.

    Parameters
    ----------
    assignment_logits : torch.Tensor, shape (B, n, n), float
        ``[b, j, i]``: how much shuffled patch ``j`` belongs at original position ``i``.
    temperature : float, default 1.0
    num_iterations : int, default 20
    gumbel_noise : torch.Tensor, shape (B, n, n), optional
        Added to the logits before scaling (training); ``None`` for none.

    Returns
    -------
    torch.Tensor, shape (B, n, n), dtype of ``assignment_logits``
        ``log S``; ``S`` is (approximately) doubly stochastic.

    Raises
    ------
    TypeError
        If the logits or the noise are not floating point, ``temperature`` is not
        a real number or ``num_iterations`` not an integer.
    ValueError
        If the logits are not ``(B, n, n)`` with ``B, n >= 1``, the noise has
        another shape, ``temperature`` is not finite and > 0, or
        ``num_iterations < 1``.
    """
    _check_assignment_logits(assignment_logits)
    temperature = _check_temperature(temperature)
    num_iterations = _check_num_iterations(num_iterations)
    if gumbel_noise is not None:
        _check_float_tensor(gumbel_noise, "gumbel_noise")
        if gumbel_noise.shape != assignment_logits.shape:
            # Broadcasting would silently share one noise draw between examples.
            raise ValueError(
                f"gumbel_noise must have the shape of assignment_logits {tuple(assignment_logits.shape)}, "
                f"got {tuple(gumbel_noise.shape)}"
            )
    log_alpha = assignment_logits
    if gumbel_noise is not None:
        log_alpha = log_alpha + gumbel_noise.to(log_alpha)
    log_alpha = log_alpha / temperature
    for _ in range(num_iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=2, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
    return log_alpha


def gumbel_sinkhorn_loss(
    assignment_logits: torch.Tensor,
    permutations: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_iterations: int = 20,
    gumbel_noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross entropy between the Gumbel-Sinkhorn soft permutation and the true one.

    ``loss = mean_{b, j} -log S[b, j, perm[b, j]]``: each shuffled patch ``j``
    should be assigned to the original position it came from. Zero only in the
    limit of a hard, correct ``S``; O(n^2) per Sinkhorn iteration.

    Parameters
    ----------
    assignment_logits : torch.Tensor, shape (B, n, n), float
    permutations : torch.Tensor, shape (B, n), int64
        The permutations that shuffled the patches.
    temperature, num_iterations, gumbel_noise : as in :func:`gumbel_sinkhorn`

    Returns
    -------
    torch.Tensor, shape (), dtype of ``assignment_logits``

    Raises
    ------
    TypeError, ValueError
        As :func:`gumbel_sinkhorn`; also if ``permutations`` is not an integer
        ``(B, n)`` tensor whose every row is a permutation of ``0..n-1``.
    """
    _check_assignment_logits(assignment_logits)
    batch, num_patches = assignment_logits.shape[:2]
    _check_permutations(permutations, batch, num_patches)
    log_assignment = gumbel_sinkhorn(
        assignment_logits,
        temperature=temperature,
        num_iterations=num_iterations,
        gumbel_noise=gumbel_noise,
    )
    chosen = log_assignment.gather(2, permutations.unsqueeze(2).to(device=log_assignment.device, dtype=torch.int64))
    return -chosen.mean()
