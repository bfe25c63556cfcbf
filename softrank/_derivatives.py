"""Derivatives of the projection onto the permutahedron and of isotonic regression.

Written once, over an ``ops`` namespace that each adapter supplies (numpy,
torch, jax, tensorflow), so that every framework runs the same formulas. The
engine computes the forward pass and its integer structure (the sorting
permutations and the PAV blocks, see :mod:`softrank._host`); the derivatives
are linear maps over that structure, written in the framework's own
differentiable operations. Hence every transform a framework offers (vmap,
forward and reverse mode, higher derivatives, jit, sharding) composes with
them without further code: a derivative of these formulas is again computed
by the framework.

The maps (Blondel et al. 2020, section 4; blocks B of the isotonic solution):

- projection, l2, ``out = P(z / eps, w)``: on sorted position i of block B,
  ``out = (s_i - mean_B s) / eps + mean_B ws`` (s, ws: z, w sorted
  decreasingly), so ``d out = (I - mean_B) dz / eps + mean_B dw``;
- projection, kl: ``out = s_i / eps - LSE_B(s / eps) + LSE_B(ws)``, so
  ``d out = dz / eps - sum_B p dz / eps + sum_B q dw`` with p = softmax_B(s /
  eps), q = softmax_B(ws);
- isotonic, l2 (weights u): ``v_B = sum_B u y / sum_B u``, so
  ``dv = sum_B (u dy + du (y - v)) / sum_B u``;
- isotonic, kl: ``v_B = LSE_B(y) - log sum_B u``, so
  ``dv = sum_B softmax_B(y) dy - sum_B du / sum_B u``.

``eps = 0`` (the hard operator) and ``eps = inf`` have no derivative in z
(the output is locally constant in z); their derivative in w is the one
above. A row whose output is NaN gets NaN derivatives.

The ``ops`` namespace provides, for arrays of shape ``(..., n)``:
``take(a, index)`` (take_along_axis on the last axis), ``block_sum(v,
block_start)`` (each position's sum of ``v`` over its block; blocks are
contiguous runs of positions named by their first position), ``exp``, ``log``,
``ones_like``, ``stop_gradient``, ``nan_of(a)`` (NaN where ``a`` is NaN,
else 0, never differentiated) and ``row_scale(a)`` (``max(1, 2^-64 * the
largest of a along the last axis)``, shape ``(..., 1)``, never differentiated;
or None where it is 1 in every row, which an adapter of concrete arrays may
tell), and ``times_factors(value, before, after)``: ``value * before *
after`` for :func:`_split_scale`'s two finite factors (Python floats, ``after
!= 0``), multiplied in that order and never folded into their product, which
overflows (the plain product where no optimiser folds constants; see
:func:`times_scale`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

from softrank._codes import REG_KL, REG_L2  # noqa: F401 (the adapters read them here too)


# ops.row_scale's factor: weights above 2^64 are scaled (see _isotonic_parts).
ROW_SCALE_FACTOR = 2.0**-64


def z_scale(eps: float) -> float:
    """The factor of dz in the projection's derivative: 1/eps, or 0 at eps = 0 and inf."""
    if eps == 0.0 or math.isinf(eps):
        return 0.0
    return 1.0 / eps


# float32 (also where float16 and bfloat16 compute) and float64: the largest
# finite value, and log2 of the largest factor _split_scale uses.
_LARGEST = {4: 3.4028234663852886e38, 8: 1.7976931348623157e308}
_FACTOR_EXPONENT = {4: 63, 8: 537}


def _itemsize(value) -> int:
    """4 (float32) or 8 (float64): the compute dtype of ``value`` (numpy,
    torch and jax dtypes have ``itemsize``, TensorFlow's ``size``)."""
    dtype = value.dtype
    size = getattr(dtype, "itemsize", None)
    if not isinstance(size, int):
        size = getattr(dtype, "size", 8)
    return 4 if size <= 4 else 8


def _split_scale(eps: float, itemsize: int) -> Tuple[float, float]:
    """``(before, after)``, finite in the compute dtype, whose product is ``1 / eps``.

    A linear map ``v -> C v / eps`` (C a block centring) is computed as
    ``after * C(before * v)``: ``(1, 1 / eps)`` where ``1 / eps`` fits the
    dtype; else two powers of two near its square root, each at most 2^537
    (float64: a subnormal eps) or 2^63 (float32). Then an exact 0 of ``C``
    (a singleton block) stays 0 instead of ``0 * inf = NaN``, and so does it
    in the transposed map that reverse mode derives from a jvp (``before *
    C^T(after * g)``), which would overflow ``g / eps`` before centring.
    (``v / eps`` would not do either: XLA flushes a subnormal eps to 0.)
    float32 below eps ~ 1e-38: the factor saturates at 2^126, so a pooled
    block's derivative, beyond float32's range in truth, comes out as that
    saturated value, and a singleton's stays 0.

    The vjp is computed the same way, ``after * C^T(before * g)``, because
    TensorFlow's forward mode transposes it. The price, in every map and its
    transpose alike (jax's reverse mode always paid it): a tangent or cotangent
    entry beyond ``largest / before`` (float64: 2^487, about 4e146; float32:
    2^65) overflows before the centring, and every entry of its block, a
    singleton's too, comes out NaN where centring first gives 0 or +-inf. A
    float32 second derivative at an eps below ~3e-39 reaches it (kl): its
    cotangent is a first derivative, up to the saturated 2^126.
    """
    scale = 1.0 / eps
    if scale <= _LARGEST[itemsize]:
        return 1.0, scale
    cap = _FACTOR_EXPONENT[itemsize]
    half = min((math.frexp(scale)[1] if math.isfinite(scale) else 1075) // 2 + 1, cap)
    return 2.0**half, min(2.0**-half / eps, 2.0**cap)


def times_scale(value, eps: float, ops: Any):
    """``value * z_scale(eps)``, finite where the product is (see :func:`_split_scale`).

    Where ``1 / eps`` overflows, ``value * before * after`` goes through
    ``ops.times_factors``: a graph optimiser that folds the two constants into
    one (TensorFlow's grappler, XLA's simplifier) would multiply by their
    product, inf, and turn an exact 0 into NaN. Where ``1 / eps`` fits, one
    multiply, as every adapter computes it.
    """
    before, after = _split_scale(eps, _itemsize(value))
    if before == 1.0:
        return value * after
    return ops.times_factors(value, before, after)


def _block_softmax(ops, values, block_start, eps: Optional[float] = None):
    """softmax of ``values`` (divided by ``eps`` where given) within each
    block; ``values`` sorted decreasingly per block.

    The block's largest value is subtracted before the division by eps: with
    ``|z| / eps`` beyond the float range (z = 1e10 at eps = 1e-300, finite
    outputs) the quotients would be inf and ``inf - inf`` NaN, while the
    differences divide to 0 (the head) and -inf (exp 0), the exact softmax.
    """
    head = ops.stop_gradient(ops.take(values, block_start))  # the block's largest value
    shifted = values - head
    e = ops.exp(shifted if eps is None else times_scale(shifted, eps, ops))
    return e / ops.block_sum(e, block_start)


def projection_jvp(ops, z, w, out, state, tz: Optional[Any], tw: Optional[Any], eps: float,
                   reg: int):
    """Tangent of ``out = P(z / eps, w)`` (l2) or ``P_E(z / eps, w)`` (kl).

    ``state``: ``perm_z, inv_z, perm_w, inv_w, block_start`` (framework
    integer arrays, see :func:`softrank._host.projection`); ``tz``/``tw`` may
    be None (no tangent). All arrays have shape ``(..., n)``.
    """
    perm_z, inv_z, perm_w, inv_w, block_start = state
    scale = z_scale(eps)
    sorted_tangent = None
    if tz is not None and scale != 0.0:
        # Centred, then scaled: a singleton block's exact 0 stays 0 at any eps.
        a = ops.take(tz, perm_z)
        before, after = _split_scale(eps, _itemsize(a))
        if before != 1.0:
            a = a * before
        if reg == REG_L2:
            count = ops.block_sum(ops.ones_like(a), block_start)
            sorted_tangent = (a - ops.block_sum(a, block_start) / count) * after
        else:
            p = _block_softmax(ops, ops.take(z, perm_z), block_start, eps)
            sorted_tangent = (a - ops.block_sum(p * a, block_start)) * after
    if tw is not None:
        b = ops.take(tw, perm_w)
        if reg == REG_L2:
            count = ops.block_sum(ops.ones_like(b), block_start)
            w_part = ops.block_sum(b, block_start) / count
        else:
            q = _block_softmax(ops, ops.take(w, perm_w), block_start)
            w_part = ops.block_sum(q * b, block_start)
        sorted_tangent = w_part if sorted_tangent is None else sorted_tangent + w_part
    if sorted_tangent is None:
        return ops.nan_of(out)  # zeros (NaN on NaN rows)
    return ops.take(sorted_tangent, inv_z) + ops.nan_of(out)


def projection_vjp(ops, z, w, out, state, cotangent, eps: float, reg: int,
                   need_z: bool = True, need_w: bool = True) -> Tuple[Any, Any]:
    """``(grad_z, grad_w)`` of ``sum(cotangent * out)``; None for an input not needed.

    A zero derivative in z (eps = 0 or inf) is returned as zeros.
    """
    perm_z, inv_z, perm_w, inv_w, block_start = state
    scale = z_scale(eps)
    g = ops.take(cotangent, perm_z)
    total = ops.block_sum(g, block_start)
    poison = ops.nan_of(out)
    count = ops.block_sum(ops.ones_like(g), block_start) if reg == REG_L2 else None
    grad_z = grad_w = None
    if need_z:
        if scale == 0.0:
            grad_z = cotangent * 0.0 + poison
        else:
            # after * C^T(before * g), as _split_scale computes a scaled map: its
            # transpose (TensorFlow's forward mode transposes this vjp) is then
            # before * C(after * t), finite too, where scaling first would give
            # inf - inf inside the centring.
            before, after = _split_scale(eps, _itemsize(g))
            scaled, scaled_total = g, total
            if before != 1.0:  # (one product, so that the transpose sums before scaling)
                scaled = g * before
                scaled_total = ops.block_sum(scaled, block_start)
            if reg == REG_L2:
                centred = scaled - scaled_total / count
            else:
                p = _block_softmax(ops, ops.take(z, perm_z), block_start, eps)
                centred = scaled - p * scaled_total
            grad_z = ops.take(centred * after, inv_z) + poison
    if need_w:
        if reg == REG_L2:
            sorted_grad = total / count
        else:
            sorted_grad = _block_softmax(ops, ops.take(w, perm_w), block_start) * total
        grad_w = ops.take(sorted_grad, inv_w) + poison  # (poison is constant along a row)
    return grad_z, grad_w


def _isotonic_parts(ops, y, weights, solution, block_start, reg):
    """``(unit, total_weight, scale, p)``: the weights divided by ``scale``, their
    block totals, and for kl ``softmax_B(y)``.

    ``scale`` is 1 unless the row's largest weight exceeds 2^64; then it is
    that weight / 2^64, so that a block's total of weights near the largest
    float stays finite, while 1 / scale stays a normal number (XLA flushes
    subnormals: dividing by the largest weight itself would give 0). A
    constant of the graph: every formula below is exact under the scaling.
    """
    if weights is None:
        unit, scale = ops.ones_like(y), None
    else:
        scale = ops.row_scale(weights)
        unit = weights if scale is None else weights / scale
    total_weight = ops.block_sum(unit, block_start)
    if reg == REG_L2:
        return unit, total_weight, scale, None
    # softmax_B(y); the block's LSE from the forward pass is only a shift
    # that keeps exp in range (the result does not depend on it).
    log_total = ops.log(total_weight) if scale is None else ops.log(total_weight) + ops.log(scale)
    shift = ops.stop_gradient(solution + log_total)
    e = ops.exp(y - shift)
    return unit, total_weight, scale, e / ops.block_sum(e, block_start)


def _l2_block_mean(ops, y, unit, total_weight, block_start):
    """The weighted mean of ``y`` over each block, as a formula in ``y`` and the
    weights (each term a fraction of a ``y``: no overflow near the largest float)."""
    return ops.block_sum(unit / total_weight * y, block_start)


def isotonic_jvp(ops, y, weights, solution, block_start, ty: Optional[Any],
                 tweights: Optional[Any], reg: int):
    """Tangent of the isotonic solution (l2: weighted mean; kl: log ratio) per block.

    ``block_start`` over positions (a valid index everywhere, see
    :func:`softrank._host.isotonic`); ``weights`` None means unit weights (then
    ``tweights`` must be None).
    """
    unit, total_weight, scale, p = _isotonic_parts(ops, y, weights, solution, block_start, reg)
    result = ops.nan_of(solution)
    if ty is not None:
        if reg == REG_L2:
            result = result + ops.block_sum(unit * ty, block_start) / total_weight
        else:
            result = result + ops.block_sum(p * ty, block_start)
    if tweights is not None and scale is not None:
        tweights = tweights / scale
    if tweights is not None:
        if reg == REG_L2:
            mean = _l2_block_mean(ops, y, unit, total_weight, block_start)
            result = result + ops.block_sum(tweights * (y - mean), block_start) / total_weight
        else:
            result = result - ops.block_sum(tweights, block_start) / total_weight
    return result


def isotonic_vjp(ops, y, weights, solution, block_start, cotangent, reg: int,
                 need_y: bool = True, need_weights: bool = True) -> Tuple[Any, Any]:
    """``(grad_y, grad_weights)`` of ``sum(cotangent * solution)``; None where not needed."""
    unit, total_weight, scale, p = _isotonic_parts(ops, y, weights, solution, block_start, reg)
    total = ops.block_sum(cotangent, block_start)
    poison = ops.nan_of(solution)
    grad_y = grad_weights = None
    if need_y:
        grad_y = (unit * total / total_weight if reg == REG_L2 else p * total) + poison
    if need_weights and weights is not None:
        if reg == REG_L2:
            mean = _l2_block_mean(ops, y, unit, total_weight, block_start)
            grad_weights = (y - mean) * (total / total_weight)
        else:
            grad_weights = -total / total_weight
        if scale is not None:
            grad_weights = grad_weights / scale
        grad_weights = grad_weights + poison
    return grad_y, grad_weights
