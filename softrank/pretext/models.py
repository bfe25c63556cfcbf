"""A small patch encoder and the heads of the three pretext tasks (torch).

The encoder embeds every patch on its own (a shared MLP), so all pretext
tasks train exactly the same network and differ only in their head:

- ``"soft_rank"``: a per-patch MLP gives one score per patch ->
  :func:`~softrank.pretext.losses.reorder_loss` (all ``n!`` permutations);
- ``"classification"``: an MLP on the concatenated ``n`` embeddings gives
  ``K`` logits -> :func:`~softrank.pretext.losses.permutation_classification_loss`;
- ``"sinkhorn"``: a per-patch MLP gives ``n`` assignment logits per patch ->
  :func:`~softrank.pretext.losses.gumbel_sinkhorn_loss`.

Every head has one hidden layer of the same width. After pre-training the
heads are dropped; an example is represented by the concatenation of its
patches' embeddings in their natural order (:meth:`PatchEncoder.features`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.pretext needs PyTorch: pip install 'softrank[pretext]'") from exc
from torch import nn

from softrank.pretext._checks import as_count
from softrank.pretext.losses import (
    DEFAULT_EPS,
    _check_num_iterations,
    _check_permutations,
    _check_temperature,
    _reorder_loss,
    gumbel_sinkhorn_loss,
    permutation_classification_loss,
)
from softrank.pretext.permutations import ranks_that_unshuffle

__all__ = ["METHODS", "PatchEncoder", "PretextModel"]

METHODS = ("soft_rank", "classification", "sinkhorn")


class PatchEncoder(nn.Module):
    """Shared MLP that embeds each patch: ``(B, n, *patch_shape) -> (B, n, d)``.

    Parameters
    ----------
    patch_shape : sequence of int
        Shape of one patch, e.g. ``(C, h, w)``; patches are flattened.
    embedding_dim : int, default 64
        ``d``, the size of one patch embedding.
    hidden_dim : int, default 128
    """

    def __init__(self, patch_shape: Sequence[int], embedding_dim: int = 64, hidden_dim: int = 128):
        super().__init__()
        self.patch_shape = tuple(int(s) for s in patch_shape)
        self.embedding_dim = int(embedding_dim)
        self.net = nn.Sequential(
            nn.Linear(math.prod(self.patch_shape), hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, embedding_dim),
            nn.ReLU(),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Embed every patch.

        Parameters
        ----------
        patches : torch.Tensor, shape (B, n, *patch_shape), float32

        Returns
        -------
        torch.Tensor, shape (B, n, embedding_dim), float32
        """
        batch, num_patches = patches.shape[:2]
        flat = patches.reshape(batch * num_patches, -1)
        return self.net(flat).reshape(batch, num_patches, self.embedding_dim)

    @torch.no_grad()
    def features(self, patches: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Frozen representation for a linear probe: the concatenated patch embeddings.

        Parameters
        ----------
        patches : torch.Tensor, shape (N, n, *patch_shape), float32
            Unshuffled patches, in their natural order.
        batch_size : int, default 1024

        Returns
        -------
        torch.Tensor, shape (N, n * embedding_dim), float32
        """
        batch_size = as_count(batch_size, "batch_size", minimum=1)
        chunks = [self(patches[i:i + batch_size]).flatten(1) for i in range(0, len(patches), batch_size)]
        return torch.cat(chunks) if chunks else patches.new_zeros(0, patches.shape[1] * self.embedding_dim)


def _mlp_head(in_dim: int, hidden_dim: int, out_dim: int, output_bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim, bias=output_bias))


def _check_training_eps(eps: object) -> float:
    """``eps`` as a float in (0, inf): at 0 the soft ranks are the hard ones and
    at inf constant, and either way the reorder loss has a zero gradient, so a
    model built with it would train nothing, silently."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) and not (
            hasattr(eps, "__float__") and not isinstance(eps, (str, bytes))):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be finite and > 0 to train (at 0 or inf the reorder loss has "
                         f"a zero gradient), got {value!r}")
    return value


class PretextModel(nn.Module):
    """Encoder plus the head of one pretext task; ``forward`` returns the loss.

    Putting the loss inside ``forward`` lets the whole step run under
    ``torch.nn.parallel.DistributedDataParallel``.

    Parameters
    ----------
    encoder : PatchEncoder
    method : {"soft_rank", "classification", "sinkhorn"}
    num_patches : int
        ``n``.
    num_permutations : int, optional
        ``K``; required for ``"classification"``.
    head_hidden_dim : int, default 128
    eps : float, default :data:`~softrank.pretext.losses.DEFAULT_EPS`
        Soft-rank strength (``"soft_rank"`` only), finite and > 0 (at 0 or inf
        the reorder loss has a zero gradient).
    sinkhorn_temperature : float, default 1.0
    sinkhorn_iterations : int, default 20
    """

    def __init__(
        self,
        encoder: PatchEncoder,
        method: str,
        num_patches: int,
        num_permutations: Optional[int] = None,
        *,
        head_hidden_dim: int = 128,
        eps: float = DEFAULT_EPS,
        sinkhorn_temperature: float = 1.0,
        sinkhorn_iterations: int = 20,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.encoder = encoder
        self.method = method
        self.num_patches = as_count(num_patches, "num_patches", minimum=1)
        # (eps is read by the soft_rank method only: the others keep it unchecked, as before)
        self.eps = _check_training_eps(eps) if method == "soft_rank" else eps
        # Checked here, where the model is built, rather than at the first training step.
        self.sinkhorn_temperature = _check_temperature(sinkhorn_temperature)
        self.sinkhorn_iterations = _check_num_iterations(sinkhorn_iterations)
        d = encoder.embedding_dim
        # The soft ranks are invariant to a shift of all scores, and Sinkhorn to a shift of a
        # column of logits, so an output bias would get no gradient: leave it out.
        if method == "soft_rank":
            self.head = _mlp_head(d, head_hidden_dim, 1, output_bias=False)
        elif method == "sinkhorn":
            self.head = _mlp_head(d, head_hidden_dim, self.num_patches, output_bias=False)
        else:
            if num_permutations is None:
                raise ValueError("num_permutations (K >= 1) is required for method='classification'")
            num_permutations = as_count(num_permutations, "num_permutations", minimum=1)
            self.head = _mlp_head(self.num_patches * d, head_hidden_dim, num_permutations)
        # K, the classification head's classes (None for the other methods).
        self.num_permutations = num_permutations if method == "classification" else None

    def forward(
        self,
        shuffled_patches: torch.Tensor,
        permutations: torch.Tensor,
        permutation_labels: Optional[torch.Tensor] = None,
        gumbel_noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The pretext loss of a batch.

        Parameters
        ----------
        shuffled_patches : torch.Tensor, shape (B, n, *patch_shape), float32
        permutations : torch.Tensor, shape (B, n), int64
            ``shuffled_patches[b, j] = patches[b, permutations[b, j]]``.
        permutation_labels : torch.Tensor, shape (B,), int64, optional
            Index of each permutation in the fixed set (``"classification"``).
        gumbel_noise : torch.Tensor, shape (B, n, n), float32, optional
            Noise for ``"sinkhorn"`` (drawn by the caller so that it is
            reproducible and identical across processes).

        Returns
        -------
        torch.Tensor, shape (), float32

        Raises
        ------
        ValueError
            If the patches are not ``(B, n, ...)`` with the model's ``n``, or
            ``permutations`` is not a ``(B, n)`` batch of permutations of ``0..n-1``
            (``"soft_rank"``, ``"sinkhorn"``).
        """
        shape = tuple(shuffled_patches.shape)
        if len(shape) < 2 or shape[1] != self.num_patches:
            # The soft-rank head scores any number of patches, so a wrong n would train silently.
            raise ValueError(
                f"shuffled_patches must have shape (B, n={self.num_patches}, ...), got {shape}"
            )
        if self.method == "soft_rank":  # (gumbel_sinkhorn_loss checks its own, once)
            _check_permutations(permutations, shape[0], self.num_patches)
        embeddings = self.encoder(shuffled_patches)
        if self.method == "soft_rank":
            scores = self.head(embeddings).squeeze(-1)
            # (ranks of checked permutations: reorder_loss's own check would sync again)
            return _reorder_loss(scores, ranks_that_unshuffle(permutations, scores.dtype), self.eps)
        if self.method == "sinkhorn":
            return gumbel_sinkhorn_loss(
                self.head(embeddings),
                permutations,
                temperature=self.sinkhorn_temperature,
                num_iterations=self.sinkhorn_iterations,
                gumbel_noise=gumbel_noise,
            )
        if permutation_labels is None:
            raise ValueError("permutation_labels are required for method='classification'")
        return permutation_classification_loss(self.head(embeddings.flatten(1)), permutation_labels)
