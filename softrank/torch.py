"""softrank for PyTorch: soft rank and soft sort as real custom operators.

``soft_rank`` and ``soft_sort`` act along any ``dim`` of a tensor of any
shape and are differentiable twice. They are built on four operators in the
``softrank`` namespace, registered with :func:`torch.library.custom_op`, each
with a fake (meta) implementation, so ``torch.compile(fullgraph=True)``,
``torch.library.opcheck``, ``gradcheck`` and ``gradgradcheck`` all work:

``softrank::soft_forward(x, op, reg, descending, eps) -> (out, perm, block_start)``
    the engine's forward pass on ``(rows, n)``; ``perm`` and ``block_start``
    are int32 and not differentiable.
``softrank::soft_vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps)``
    the backward pass, itself differentiable (w.r.t. ``x`` and ``cotangent``).
``softrank::soft_jvp(...)``
    the Jacobian-vector product, differentiable the same way.
``softrank::soft_hvp(x, out, perm, block_start, cotangent, tangent, ...)``
    the second derivative that double backward needs (not differentiable).

CPU tensors reach the engine without copies (when already contiguous with the
operator's dim last). CUDA tensors: softrank has no CUDA core yet, so the
operators copy their inputs to the host, run the CPU engine and copy the
results back to the input's device (synchronising with the current stream);
results are exact, but each call pays two transfers.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np
import torch
from torch import Tensor

from softrank import _engine, _host
from softrank._engine import OP_RANK, OP_SORT
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float_dtype_kind,
    check_regularization,
)

__all__ = ["soft_rank", "soft_sort"]

# float64 stays float64, float32 stays float32, every narrower float runs in float32.
_COMPUTE_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
# The validated (regularization, direction) pairs, so that a call does one dict lookup.
_CODES = {
    (reg, direction): (check_regularization(reg), check_direction(direction))
    for reg in ("l2", "kl")
    for direction in ("ascending", "descending")
}


def _to_host(tensor: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a host copy of a CUDA one), C-contiguous."""
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.detach().numpy()


def _from_host(array: np.ndarray, like: Tensor) -> Tensor:
    result = torch.from_numpy(array)
    return result if like.is_cpu else result.to(like.device)


# --- host calls: what the operators run ------------------------------------


def _forward_host(x, op, reg, descending, eps):
    out, perm, block_start = _host.forward(_to_host(x), op, reg, descending, eps)
    return _from_host(out, x), _from_host(perm, x), _from_host(block_start, x)


def _vjp_host(x, out, perm, block_start, cotangent, op, reg, descending, eps):
    grad = _host.vjp(
        _to_host(x), _to_host(out), _to_host(perm), _to_host(block_start),
        _to_host(cotangent), op, reg, descending, eps,
    )
    return _from_host(grad, x)


def _jvp_host(x, out, perm, block_start, tangent, op, reg, descending, eps):
    tangent_out = _host.jvp(
        _to_host(x), _to_host(out), _to_host(perm), _to_host(block_start),
        _to_host(tangent), op, reg, descending, eps,
    )
    return _from_host(tangent_out, x)


def _hvp_host(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps):
    grad = _host.hvp(
        _to_host(x), _to_host(out), _to_host(perm), _to_host(block_start),
        _to_host(cotangent), _to_host(tangent), op, reg, descending, eps,
    )
    return _from_host(grad, x)


# --- the operators ---------------------------------------------------------


@torch.library.custom_op("softrank::soft_forward", mutates_args=())
def _soft_forward(
    x: Tensor, op: int, reg: int, descending: bool, eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_host(x, op, reg, descending, eps)


@_soft_forward.register_fake
def _soft_forward_fake(x, op, reg, descending, eps):
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape, dtype=torch.int32),
        x.new_empty(x.shape, dtype=torch.int32),
    )


@torch.library.custom_op("softrank::soft_vjp", mutates_args=())
def _soft_vjp(
    x: Tensor,
    out: Tensor,
    perm: Tensor,
    block_start: Tensor,
    cotangent: Tensor,
    op: int,
    reg: int,
    descending: bool,
    eps: float,
) -> Tensor:
    return _vjp_host(x, out, perm, block_start, cotangent, op, reg, descending, eps)


@_soft_vjp.register_fake
def _soft_vjp_fake(x, out, perm, block_start, cotangent, op, reg, descending, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("softrank::soft_jvp", mutates_args=())
def _soft_jvp(
    x: Tensor,
    out: Tensor,
    perm: Tensor,
    block_start: Tensor,
    tangent: Tensor,
    op: int,
    reg: int,
    descending: bool,
    eps: float,
) -> Tensor:
    return _jvp_host(x, out, perm, block_start, tangent, op, reg, descending, eps)


@_soft_jvp.register_fake
def _soft_jvp_fake(x, out, perm, block_start, tangent, op, reg, descending, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("softrank::soft_hvp", mutates_args=())
def _soft_hvp(
    x: Tensor,
    out: Tensor,
    perm: Tensor,
    block_start: Tensor,
    cotangent: Tensor,
    tangent: Tensor,
    op: int,
    reg: int,
    descending: bool,
    eps: float,
) -> Tensor:
    return _hvp_host(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps)


@_soft_hvp.register_fake
def _soft_hvp_fake(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps):
    return x.new_empty(x.shape)


# --- autograd --------------------------------------------------------------
# The forward's backward is soft_vjp. soft_vjp(x, c) = J(x)^T c is linear in
# c, so its derivative w.r.t. c is J(x) (soft_jvp) and w.r.t. x the second
# derivative soft_hvp; soft_jvp(x, t) = J(x) t likewise. ``out``, ``perm``
# and ``block_start`` are functions of x whose effect on the second
# derivative soft_hvp already contains, so they get no gradient.


def _forward_setup(ctx, inputs, output):
    x, op, reg, descending, eps = inputs
    out, perm, block_start = output
    ctx.mark_non_differentiable(perm, block_start)
    ctx.save_for_backward(x, out, perm, block_start)
    ctx.params = (op, reg, descending, eps)


def _forward_backward(ctx, grad_out, grad_perm, grad_block_start):
    x, out, perm, block_start = ctx.saved_tensors
    grad = torch.ops.softrank.soft_vjp(x, out, perm, block_start, grad_out, *ctx.params)
    return grad, None, None, None, None


def _linear_setup(ctx, inputs, output):
    x, out, perm, block_start, vector = inputs[:5]
    ctx.save_for_backward(x, out, perm, block_start, vector)
    ctx.params = tuple(inputs[5:])


def _vjp_backward(ctx, grad_grad):
    x, out, perm, block_start, cotangent = ctx.saved_tensors
    grad_x = grad_cotangent = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.softrank.soft_hvp(
            x, out, perm, block_start, cotangent, grad_grad, *ctx.params
        )
    if ctx.needs_input_grad[4]:
        grad_cotangent = torch.ops.softrank.soft_jvp(
            x, out, perm, block_start, grad_grad, *ctx.params
        )
    return grad_x, None, None, None, grad_cotangent, None, None, None, None


def _jvp_backward(ctx, grad_out):
    x, out, perm, block_start, tangent = ctx.saved_tensors
    grad_x = grad_tangent = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.softrank.soft_hvp(
            x, out, perm, block_start, grad_out, tangent, *ctx.params
        )
    if ctx.needs_input_grad[4]:
        grad_tangent = torch.ops.softrank.soft_vjp(
            x, out, perm, block_start, grad_out, *ctx.params
        )
    return grad_x, None, None, None, grad_tangent, None, None, None, None


def _hvp_backward(ctx, grad_out):
    raise NotImplementedError(
        "softrank: third derivatives of soft_rank/soft_sort are not implemented "
        "(first and second derivatives are)"
    )


def _hvp_setup(ctx, inputs, output):
    pass


_soft_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
_soft_vjp.register_autograd(_vjp_backward, setup_context=_linear_setup)
_soft_jvp.register_autograd(_jvp_backward, setup_context=_linear_setup)
_soft_hvp.register_autograd(_hvp_backward, setup_context=_hvp_setup)


# --- the eager fast path ---------------------------------------------------
# Going through the dispatcher costs a custom_op call tens of microseconds of
# Python (autograd wrapper, redispatch, alias checks), more than the engine
# itself needs for a row of 100. A plain eager call on a plain tensor runs the
# same host functions through this autograd.Function instead. Whenever
# anything might need to see the operator itself (torch.compile / export,
# functorch transforms, dispatch or function modes, tensor subclasses such as
# FakeTensor) the call goes through torch.ops.softrank.*; so does every
# backward that records a graph (create_graph=True), which is how double
# backward reaches the differentiable soft_vjp operator.


class _SoftForward(torch.autograd.Function):
    """The eager operator on a C-contiguous (rows, n) tensor.

    Talks to the engine directly (the (rows, n) layout is the engine's), since
    at n = 100 every Python call of the glue is a visible share of the time:
    on a CPU tensor with the compiled engine the values go by address (no
    numpy view of a tensor), otherwise as numpy views.
    """

    @staticmethod
    def forward(ctx, x, x_host, op, reg, descending, eps):
        # x_host: the caller's numpy view of x, or None where the compiled
        # engine reads x by address.
        ctx.params = (op, reg, descending, eps)
        if x_host is None:
            rows, n = x.shape
            out, perm, block_start = _engine.engine()._soft_forward_at(
                x.data_ptr(), rows, n, x.dtype == torch.float64, op, reg, descending, eps
            )
            ctx.host = None
        else:
            out, perm, block_start = _engine.engine().soft_forward(
                x_host, op, reg, descending, eps
            )
            ctx.host = (x_host, out)
        ctx.state = (perm, block_start)  # numpy arrays, read by the backward
        out = _from_host(out, x)
        # Saved so that autograd catches in-place changes to them: the
        # backward reads their buffers.
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        perm, block_start = ctx.state
        if torch.is_grad_enabled() or not _direct_call_allowed(grad_out):
            grad = torch.ops.softrank.soft_vjp(
                x, out, _from_host(perm, x), _from_host(block_start, x), grad_out, *ctx.params
            )
            return grad, None, None, None, None, None
        g = grad_out
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        if ctx.host is None:
            if not g.is_contiguous():  # (a broadcast cotangent, as from sum().backward())
                g = g.contiguous()
            grad = _engine.engine()._soft_vjp_at(
                x.data_ptr(), out.data_ptr(), perm, block_start, g.data_ptr(),
                x.dtype == torch.float64, *ctx.params,
            )
        else:
            x_host, out_host = ctx.host
            grad = _engine.engine().soft_vjp(
                x_host, out_host, perm, block_start, _to_host(g), *ctx.params
            )
        return _from_host(grad, x), None, None, None, None, None


_is_compiling = torch.compiler.is_compiling
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled


def _direct_call_allowed(x: Tensor) -> bool:
    return (
        not _is_compiling()
        and type(x) is Tensor
        and not _dispatch_modes()
        and not _function_modes()
        and not _is_functorch_wrapped(x)
    )


# --- public functions ------------------------------------------------------


def _soft_op(x: Any, eps: Any, regularization: Any, direction: Any, dim: Any, op: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if type(eps) is not float or not eps >= 0.0:
        eps = check_eps(eps.detach() if isinstance(eps, Tensor) else eps)
    try:
        reg, descending = _CODES[regularization, direction]
    except (KeyError, TypeError):
        reg = check_regularization(regularization)
        descending = check_direction(direction)
    dtype = x.dtype
    compute_dtype = _COMPUTE_DTYPE.get(dtype)
    if compute_dtype is None:
        if dtype.is_floating_point:
            compute_dtype = torch.float32
        else:
            kind = "c" if dtype.is_complex else "b" if dtype == torch.bool else "i"
            check_float_dtype_kind(kind, str(dtype).replace("torch.", ""), allow_int=False)
    ndim = x.dim()
    if type(dim) is int and dim == -1 and ndim > 0:
        moved = x
        last = True
    else:
        axis = check_axis(dim, ndim, name="dim")
        last = axis == ndim - 1
        moved = x if last else x.movedim(axis, -1)
    shape = moved.shape
    # (Each tensor method call costs a microsecond or two: the common 2-D
    # contiguous case makes none it does not need.)
    rows = moved if ndim == 2 else moved.reshape(math.prod(shape[:-1]), shape[-1])
    if compute_dtype is not dtype:
        rows = rows.to(compute_dtype)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if not _direct_call_allowed(rows):
        out = torch.ops.softrank.soft_forward(rows, op, reg, descending, eps)[0]
    elif rows.requires_grad and torch.is_grad_enabled():
        by_address = rows.is_cpu and _engine.backend() == "native"
        out = _SoftForward.apply(rows, None if by_address else _to_host(rows), op, reg,
                                 descending, eps)
    else:
        out = _from_host(
            _engine.engine().soft_forward_value(_to_host(rows), op, reg, descending, eps), rows
        )
    if ndim != 2:
        out = out.view(shape)
    if not last:
        out = out.movedim(-1, axis)
    return out if compute_dtype is dtype else out.to(dtype)


def soft_rank(
    x: Tensor,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    dim: int = -1,
) -> Tensor:
    """Soft (differentiable) ranks of ``x`` along ``dim``.

    ``soft_rank(x) = P(x / eps, rho)``: the exact projection of ``x / eps``
    onto the permutahedron of ``rho = (n, ..., 1)`` (Blondel et al. 2020),
    O(n log n) per row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : Tensor, shape (..., n, ...)
        float32 and float64 are computed natively; float16 and bfloat16 in
        float32 and returned in their own dtype. Integer, bool and complex
        tensors raise TypeError. CUDA tensors make a host round trip (see the
        module docstring); the result is on ``x``'s device.
    eps : float, default 1.0
        Regularization strength, >= 0 (a number or a 0-d tensor, not
        differentiated; under ``torch.compile`` a constant of the graph). ``eps = 0`` gives
        the hard ranks (ties get their mean rank), ``eps = inf`` gives
        ``(n + 1) / 2`` everywhere.
    regularization : {"l2", "kl"}
        Quadratic or entropic regularization.
    direction : {"ascending", "descending"}
        "ascending": rank 1 is the smallest value.
    dim : int, default -1
        The dimension to rank along.

    Returns
    -------
    Tensor
        Shape, dtype and device of ``x``; every row sums to ``n (n + 1) / 2``.

    Notes
    -----
    Gradient: ``(I - B) / eps`` in sorted order for l2 (``B`` averages over
    the PAV blocks), ``(diag(r) - r r^T / R_B) / eps`` per block for kl. Twice
    differentiable (the second derivative is 0 almost everywhere for l2).

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import soft_rank
    >>> soft_rank(torch.tensor([3.0, 1.0, 2.0]), eps=0.1)
    tensor([3., 1., 2.])
    """
    return _soft_op(x, eps, regularization, direction, dim, OP_RANK)


def soft_sort(
    x: Tensor,
    eps: float = 1.0,
    *,
    regularization: str = "l2",
    direction: str = "ascending",
    dim: int = -1,
) -> Tensor:
    """Soft (differentiable) sort of ``x`` along ``dim``.

    ``soft_sort(x) = P(rho / eps, x)``: the exact projection of ``rho / eps``
    onto the permutahedron of ``x`` (Blondel et al. 2020), O(n log n) per
    row; the gradient costs O(n) per row.

    Parameters
    ----------
    x : Tensor, shape (..., n, ...)
        As in :func:`soft_rank`.
    eps : float, default 1.0
        Regularization strength, >= 0. ``eps = 0`` returns the sorted values;
        ``eps = inf`` the mean (l2) or log-mean-exp (kl) of each row.
    regularization : {"l2", "kl"}
    direction : {"ascending", "descending"}
    dim : int, default -1

    Returns
    -------
    Tensor
        Shape, dtype and device of ``x``; l2 preserves every row's sum.

    Notes
    -----
    Gradient: the block mean of the cotangent (l2) or the block softmax of
    the sorted values times the block sum of the cotangent (kl), sent back
    through the sorting permutation. Twice differentiable.

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import soft_sort
    >>> soft_sort(torch.tensor([3.0, 1.0, 2.0]), eps=0.1)
    tensor([1., 2., 3.])
    """
    return _soft_op(x, eps, regularization, direction, dim, OP_SORT)
