"""Central finite differences of torch functions: the reference the torch tests share."""
from __future__ import annotations

import torch

STEP = 1e-6  # first derivatives (float64)
# Hessians: fourth-order central differences of fourth-order central differences, at
# HESSIAN_STEP and again at half of it.  At 1e-3 the truncation error (~step**4) is below
# the round-off (~1e-16 * |g| / step**2, about 1e-10 * |g|): some thirty times more accurate
# than the plain nested differences at 1e-4, whose round-off (~1e-8 * |g|) reached the
# tests' tolerance of 1e-6.  The nested stencil evaluates at x + a e_i + b e_j with a, b
# in {-2, -1, 1, 2} steps: up to 4 steps from x along one axis.
HESSIAN_STEP = 1e-3
# The two estimates must agree to this fraction of the tolerance the tests compare with
# (HESSIAN_RTOL, HESSIAN_ATOL; the tests import it); a stencil that reaches across a kink of the piecewise-smooth
# function (a PAV block that splits or merges) is off by orders of magnitude more.
HESSIAN_AGREEMENT = 0.25
HESSIAN_RTOL, HESSIAN_ATOL = 1e-5, 1e-6


def fd_jacobian(f, x, step=STEP):
    """Second-order central differences of ``f`` at ``x``: shape ``f(x).shape + x.shape``."""
    return _jacobian(f, x, step, ((1, 1.0), (-1, -1.0)), 2.0)


def _jacobian_order4(f, x, step):
    """Fourth-order central differences: (f(-2h) - 8 f(-h) + 8 f(h) - f(2h)) / 12h."""
    return _jacobian(f, x, step, ((-2, 1.0), (-1, -8.0), (1, 8.0), (2, -1.0)), 12.0)


def _jacobian(f, x, step, stencil, denominator):
    with torch.no_grad():
        flat = x.detach().reshape(-1)
        columns = []
        for j in range(flat.numel()):
            total = 0
            for offset, weight in stencil:
                e = torch.zeros_like(flat)
                e[j] = offset * step
                total = total + weight * f((flat + e).view(x.shape))
            columns.append(total / (denominator * step))
        out_shape = columns[0].shape
        return torch.stack(columns, dim=-1).reshape(*out_shape, *x.shape)


def fd_hessian(g, x, step=HESSIAN_STEP):
    """Hessian of a scalar ``g`` at ``x`` by nested fourth-order central differences.

    The reference checks itself: it is computed at ``step`` and at ``step / 2``, and
    raises ``AssertionError`` where the two disagree by more than a quarter of the
    tests' tolerance.  That happens where a kink of ``g`` lies within ``4 * step`` of
    ``x`` along one axis (or 2 steps along two axes at once): the test point is then
    too close to a boundary between the smooth pieces for a finite-difference
    reference, and the test must move it.
    """
    coarse = _jacobian_order4(lambda t: _jacobian_order4(g, t, step), x, step)
    fine = _jacobian_order4(lambda t: _jacobian_order4(g, t, step / 2), x, step / 2)
    allowed = HESSIAN_AGREEMENT * (HESSIAN_ATOL + HESSIAN_RTOL * coarse.abs())
    worst = ((coarse - fine).abs() / allowed).max().item()
    assert worst <= 1.0, (
        f"the finite-difference Hessian changes with its step ({worst:.3g} times the agreement "
        f"allowed between steps {step:g} and {step / 2:g}): a kink of the function lies within "
        f"{4 * step:g} of the test point; move the point away from it")
    return coarse


def contract(jacobian, tangent):
    """``J t`` for a Jacobian of shape ``out.shape + x.shape``."""
    return (jacobian * tangent).flatten(-tangent.dim()).sum(-1)
