"""Reference: the O(n^2) Sinkhorn soft rank and soft sort (Cuturi, Teboul & Vert 2019).

The baseline that Blondel et al. (2020) improve on, written plainly in torch for
the benchmarks (not part of the package). Each row of ``x`` is squashed to
``[0, 1]`` (a sigmoid of the standardised values), transported with uniform
weights onto ``n`` equispaced targets ``y_j = (j - 1) / (n - 1)`` under the
cost ``(z_i - y_j)^2`` with entropic regularization ``tau``, by a fixed number
of log-domain Sinkhorn iterations; the soft rank of ``x_i`` is ``n * sum_j
P_ij * j``, the soft sort ``n * sum_i P_ij * x_i``.

Cost: O(n^2) time and memory per row and iteration (a ``(batch, n, n)`` cost
matrix, and autograd keeps one per half-iteration for the backward pass), which
is why the benchmarks cap it (``_benchutil.SINKHORN_MAX_*``).
"""
from __future__ import annotations

import torch

ITERATIONS = 50
TAU = 1e-2


def _plan(x: torch.Tensor, iterations: int = ITERATIONS, tau: float = TAU) -> torch.Tensor:
    """The entropic transport plan, ``(batch, n, n)``, rows: inputs, columns: targets."""
    batch, n = x.shape
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    z = torch.sigmoid((x - mean) / std)
    y = torch.linspace(0.0, 1.0, n, dtype=x.dtype, device=x.device)
    log_k = -((z.unsqueeze(-1) - y) ** 2) / tau  # (batch, n, n)
    log_w = -torch.log(torch.tensor(float(n), dtype=x.dtype, device=x.device))
    f = torch.zeros_like(x)
    g = torch.zeros_like(x)
    for _ in range(iterations):
        f = log_w - torch.logsumexp(log_k + g.unsqueeze(-2), dim=-1)
        g = log_w - torch.logsumexp(log_k + f.unsqueeze(-1), dim=-2)
    return torch.exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2))


def soft_rank(x: torch.Tensor, iterations: int = ITERATIONS, tau: float = TAU) -> torch.Tensor:
    """Ascending Sinkhorn soft ranks (1 = smallest) of the rows of a 2-D tensor."""
    n = x.shape[-1]
    ranks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    return n * (_plan(x, iterations, tau) @ ranks)


def soft_sort(x: torch.Tensor, iterations: int = ITERATIONS, tau: float = TAU) -> torch.Tensor:
    """Ascending Sinkhorn soft sort of the rows of a 2-D tensor."""
    n = x.shape[-1]
    return n * (x.unsqueeze(-2) @ _plan(x, iterations, tau)).squeeze(-2)
