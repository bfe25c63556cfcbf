"""Central finite differences of torch functions: the reference the torch tests share."""
from __future__ import annotations

import torch

STEP = 1e-6  # first derivatives (float64)
STEP2 = 1e-4  # each of the two nested differences of a Hessian


def fd_jacobian(f, x, step=STEP):
    """Central differences of ``f`` at ``x``: shape ``f(x).shape + x.shape``."""
    with torch.no_grad():
        flat = x.detach().reshape(-1)
        columns = []
        for j in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[j] = step
            columns.append((f((flat + e).view(x.shape)) - f((flat - e).view(x.shape))) / (2 * step))
        out_shape = columns[0].shape
        return torch.stack(columns, dim=-1).reshape(*out_shape, *x.shape)


def fd_hessian(g, x):
    """Hessian of a scalar ``g`` by central differences of its central-difference gradient."""
    return fd_jacobian(lambda t: fd_jacobian(g, t, STEP2), x, STEP2)


def contract(jacobian, tangent):
    """``J t`` for a Jacobian of shape ``out.shape + x.shape``."""
    return (jacobian * tangent).flatten(-tangent.dim()).sum(-1)
