"""softrank for PyTorch: soft rank and soft sort as registered operators.

``soft_rank`` and ``soft_sort`` act along any ``dim`` of a tensor of any
shape. They run on four operators of the ``softrank`` namespace, each
defined with :mod:`torch.library` with a kernel per device, a fake (meta)
kernel, an autograd kernel (reverse and forward mode) and a vmap rule. Every
operator acts along the last dim of ``x`` (shape ``(..., n)``):

``softrank::soft_forward(x, op, reg, descending, eps) -> (out, perm, block_start)``
    the engine's forward pass; ``perm`` and ``block_start`` are int32 and
    not differentiable.
``softrank::soft_vjp(x, out, perm, block_start, cotangent, op, reg, descending, eps)``
    the vector-Jacobian product, itself differentiable (w.r.t. ``x`` and
    ``cotangent``, in reverse and forward mode).
``softrank::soft_jvp(x, out, perm, block_start, tangent, op, reg, descending, eps)``
    the Jacobian-vector product, differentiable the same way (except the kl
    soft sort's in forward mode w.r.t. ``x``, see below).
``softrank::soft_hvp(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps)``
    the second derivative that double backward needs (not differentiable).

What works: autograd to second order, forward mode
(``torch.autograd.forward_ad``, ``torch.func.jvp``), every ``torch.func``
transform (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``
and their compositions), batched gradients (``is_grads_batched``,
``vectorize=True``), ``torch.compile(fullgraph=True)`` with static or
dynamic shapes, ``torch.export``, meta tensors. A vmapped dim is just more
rows to the engine, so ``vmap`` makes one engine call for the whole batch.
What raises, saying what to use instead: ``torch.jit.trace`` and
``torch.jit.script`` (use ``torch.compile`` or ``torch.export``), third
derivatives, and the operators called directly (``torch.ops.softrank.*``) under
a differentiating ``torch.func`` transform (the public functions support
them; direct calls support autograd, vmap, compile and export).

Devices: the CPU kernels hand the engine numpy views of the tensors, without
copies when they are contiguous. softrank has no CUDA core yet: the CUDA
kernels copy their inputs to the host, run the CPU engine and copy the
results back to the input's device (synchronising with the current stream);
results are exact, but each call pays two transfers.

An eager call on a plain CPU tensor (no torch.func transform, compile,
dispatch or function mode, forward-mode level, batched tensor or tensor
subclass active) calls the CPU engine without going through the
dispatcher, whose Python layers cost more than the engine needs for a row
of 100; its autograd function (:class:`_EagerForward`) turns to the
operators for anything beyond a plain first-order backward.
"""
from __future__ import annotations

import math
from typing import Any

try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.torch needs PyTorch: pip install 'softrank[torch]'") from exc
import numpy as np
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from softrank import _engine, _host
from softrank._engine import OP_RANK, OP_SORT, REG_L2
from softrank._types import Direction, Regularization
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
_NO_JIT = (
    "softrank.torch does not support TorchScript (torch.jit.trace would record "
    "the result as a constant, torch.jit.script cannot compile the engine call); "
    "use torch.compile or torch.export, which keep softrank's operators in the graph"
)


# --- kernels: the engine on host arrays -------------------------------------


def _host_array(tensor: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a host copy of a CUDA one)."""
    if tensor.is_cpu:
        return tensor.detach().numpy()
    return tensor.detach().cpu().numpy()


def _on_device(array: np.ndarray, like: Tensor) -> Tensor:
    result = torch.from_numpy(array)
    return result if like.is_cpu else result.to(like.device)


def _forward_kernel(x, op, reg, descending, eps):
    out, perm, block_start = _host.forward(_host_array(x), op, reg, descending, eps)
    return _on_device(out, x), _on_device(perm, x), _on_device(block_start, x)


def _forward_value_kernel(x, op, reg, descending, eps):
    """``out`` of :func:`_forward_kernel` alone, bit for bit (no state kept), of a
    C-contiguous ``(rows, n)`` CPU tensor (the eager path's layout)."""
    return torch.from_numpy(_engine.engine().soft_forward_value(_host_array(x), op, reg, descending, eps))


def _vjp_kernel(x, out, perm, block_start, cotangent, op, reg, descending, eps):
    host = _host.vjp(
        _host_array(x), _host_array(out), _host_array(perm), _host_array(block_start),
        _host_array(cotangent), op, reg, descending, eps,
    )
    return _on_device(host, x)


def _jvp_kernel(x, out, perm, block_start, tangent, op, reg, descending, eps):
    host = _host.jvp(
        _host_array(x), _host_array(out), _host_array(perm), _host_array(block_start),
        _host_array(tangent), op, reg, descending, eps,
    )
    return _on_device(host, x)


def _hvp_kernel(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps):
    host = _host.hvp(
        _host_array(x), _host_array(out), _host_array(perm), _host_array(block_start),
        _host_array(cotangent), _host_array(tangent), op, reg, descending, eps,
    )
    return _on_device(host, x)


def _forward_fake(x, op, reg, descending, eps):
    index = x.new_empty(x.shape, dtype=torch.int32)
    return x.new_empty(x.shape), index, torch.empty_like(index)


def _like_x_fake(x, *rest):
    return x.new_empty(x.shape)


# --- the operators ------------------------------------------------------------

_LIB = torch.library.Library("softrank", "DEF")
_PARAMS = "int op, int reg, bool descending, float eps"
_STATE = "Tensor x, Tensor out, Tensor perm, Tensor block_start"
_LIB.define(f"soft_forward(Tensor x, {_PARAMS}) -> (Tensor, Tensor, Tensor)")
_LIB.define(f"soft_vjp({_STATE}, Tensor cotangent, {_PARAMS}) -> Tensor")
_LIB.define(f"soft_jvp({_STATE}, Tensor tangent, {_PARAMS}) -> Tensor")
_LIB.define(f"soft_hvp({_STATE}, Tensor cotangent, Tensor tangent, {_PARAMS}) -> Tensor")
_OPS = torch.ops.softrank

for _name, _kernel, _fake in (
    ("soft_forward", _forward_kernel, _forward_fake),
    ("soft_vjp", _vjp_kernel, _like_x_fake),
    ("soft_jvp", _jvp_kernel, _like_x_fake),
    ("soft_hvp", _hvp_kernel, _like_x_fake),
):
    # A CUDA core registers its own kernel here; until then CUDA tensors
    # take the host round trip of the kernels above.
    for _device in ("CPU", "CUDA"):
        _LIB.impl(_name, _kernel, _device)
    # (The fake kernel also serves eager meta tensors.)
    torch.library.register_fake(f"softrank::{_name}", _fake, lib=_LIB)


# --- when the kernels may be called directly -----------------------------------

_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_below_autograd = torch._C._AutoDispatchBelowAutograd
# (torch.autograd.functional's vectorize=True still batches with the legacy vmap.)
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _eager(tensor: Tensor) -> bool:
    """Whether nothing needs to see the operator: a direct kernel call is equivalent.

    Anything that records or transforms operators (torch.func transforms,
    compile and export, dispatch and function modes, forward-mode levels,
    batched tensors, tensor subclasses such as FakeTensor) must see the
    dispatcher call.
    """
    return (
        not _is_compiling()
        and type(tensor) is Tensor
        and not _functorch_active()
        and not _dispatch_modes()
        and not _function_modes()
        and _forward_ad._current_level < 0
        and not _is_legacy_batched(tensor)
    )


# --- autograd -------------------------------------------------------------------
# The forward's derivative is J(x): soft_vjp gives J(x)^T c, soft_jvp J(x) t.
# Both are linear in their vector, so their derivative w.r.t. the vector is
# the other one, and their derivative w.r.t. x is the second derivative
# soft_hvp (the gradient of <c, J(x) t>, symmetric in how x enters). ``out``,
# ``perm`` and ``block_start`` are functions of x whose effect soft_hvp
# already contains, so they get no derivative.
#
# functorch handles an autograd.Function only where it is applied from
# Python, not where it is an operator's autograd kernel inside the
# dispatcher: under a torch.func transform, the public functions and the
# _soft_* helpers below apply the operator's autograd.Function themselves;
# elsewhere they call the operator.


def _forward_mode_possible() -> bool:
    """Whether a tangent can reach a jvp: only under a dual level or a torch.func transform."""
    return _forward_ad._current_level >= 0 or _functorch_active()


def _soft_vjp(x, out, perm, block_start, cotangent, *params):
    if _functorch_active():
        return _Vjp.apply(x, out, perm, block_start, cotangent, *params)
    if not torch.is_grad_enabled() and x.is_cpu and _eager(cotangent):
        return _vjp_kernel(x, out, perm, block_start, cotangent, *params)
    return _OPS.soft_vjp(x, out, perm, block_start, cotangent, *params)


def _soft_jvp(*args):
    return _Jvp.apply(*args) if _functorch_active() else _OPS.soft_jvp(*args)


def _soft_hvp(*args):
    return _Hvp.apply(*args) if _functorch_active() else _OPS.soft_hvp(*args)


def _sum(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class _Forward(torch.autograd.Function):
    """The autograd kernel of softrank::soft_forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, op, reg, descending, eps):
        if x.is_cpu and _eager(x):
            return _forward_kernel(x, op, reg, descending, eps)
        with _below_autograd():
            return _OPS.soft_forward.default(x, op, reg, descending, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *params = inputs
        out, perm, block_start = output
        ctx.mark_non_differentiable(perm, block_start)
        # No zero gradients made for perm and block_start, which the backward ignores.
        ctx.set_materialize_grads(False)
        # Saved so that autograd catches in-place changes to them.
        ctx.save_for_backward(x, out, perm, block_start)
        if _forward_mode_possible():
            ctx.save_for_forward(x, out, perm, block_start)
        ctx.params = tuple(params)

    @staticmethod
    def backward(ctx, grad_out, grad_perm, grad_block_start):
        if grad_out is None:
            return None, None, None, None, None
        grad = _soft_vjp(*ctx.saved_tensors, grad_out, *ctx.params)
        return grad, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *param_tangents):
        tangent_out = _soft_jvp(*ctx.saved_tensors, x_tangent, *ctx.params)
        return tangent_out, None, None


class _Vjp(torch.autograd.Function):
    """The autograd kernel of softrank::soft_vjp (J(x)^T cotangent)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, out, perm, block_start, cotangent, *params):
        with _below_autograd():
            return _OPS.soft_vjp.default(x, out, perm, block_start, cotangent, *params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.save_for_forward(*inputs[:5])
        ctx.params = tuple(inputs[5:])

    @staticmethod
    def backward(ctx, grad_grad):
        x, out, perm, block_start, cotangent = ctx.saved_tensors
        grad_x = grad_cotangent = None
        if ctx.needs_input_grad[0]:
            grad_x = _soft_hvp(x, out, perm, block_start, cotangent, grad_grad, *ctx.params)
        if ctx.needs_input_grad[4]:
            grad_cotangent = _soft_jvp(x, out, perm, block_start, grad_grad, *ctx.params)
        return grad_x, None, None, None, grad_cotangent, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, out_tangent, perm_tangent, block_tangent, cotangent_tangent, *rest):
        x, out, perm, block_start, cotangent = ctx.saved_tensors
        state = (x, out, perm, block_start)
        tangent_out = None
        if cotangent_tangent is not None:
            tangent_out = _soft_vjp(*state, cotangent_tangent, *ctx.params)
        if x_tangent is not None:
            tangent_out = _sum(tangent_out, _soft_hvp(*state, cotangent, x_tangent, *ctx.params))
        return torch.zeros_like(x) if tangent_out is None else tangent_out


class _Jvp(torch.autograd.Function):
    """The autograd kernel of softrank::soft_jvp (J(x) tangent)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, out, perm, block_start, tangent, *params):
        with _below_autograd():
            return _OPS.soft_jvp.default(x, out, perm, block_start, tangent, *params)

    setup_context = _Vjp.setup_context

    @staticmethod
    def backward(ctx, grad_out):
        x, out, perm, block_start, tangent = ctx.saved_tensors
        grad_x = grad_tangent = None
        if ctx.needs_input_grad[0]:
            grad_x = _soft_hvp(x, out, perm, block_start, grad_out, tangent, *ctx.params)
        if ctx.needs_input_grad[4]:
            grad_tangent = _soft_vjp(x, out, perm, block_start, grad_out, *ctx.params)
        return grad_x, None, None, None, grad_tangent, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, out_tangent, perm_tangent, block_tangent, tangent_tangent, *rest):
        x, out, perm, block_start, tangent = ctx.saved_tensors
        state = (x, out, perm, block_start)
        op, reg = ctx.params[:2]
        tangent_out = None
        if tangent_tangent is not None:
            tangent_out = _soft_jvp(*state, tangent_tangent, *ctx.params)
        # d/dx (J(x) t) s: the second derivative contracted with t and s on
        # its input sides. 0 for l2, whose Jacobian is locally constant.
        if x_tangent is not None and reg != REG_L2:
            tangent_out = _sum(tangent_out, _second_derivative(state, tangent, x_tangent, ctx.params))
        return torch.zeros_like(x) if tangent_out is None else tangent_out


def _second_derivative(state, t, u, params):
    """``D^2 f(x)[t, u]``, symmetric and bilinear in ``t`` and ``u``.

    The soft rank is the gradient of a scalar potential, so its second
    derivative is symmetric in all three indices and equals the engine's
    ``soft_hvp(cotangent=t, tangent=u)``. For the kl soft sort, ``J v`` is the
    softmax mean of ``v`` over each PAV block, written at the block's sorted
    positions; differentiating the softmax weights gives
    ``D^2 f[t, u] = sign * J[(t - tbar) (u - ubar)]``, with ``tbar`` the block
    mean of ``t`` read back at each column and ``sign = +1`` for a descending
    sort, ``-1`` for an ascending one (sort = projection of -x or x).
    """
    x, out, perm, block_start = state
    op, descending = params[0], params[2]
    if op == OP_RANK:
        return _soft_hvp(*state, t, u, *params)
    index = perm.long()
    positions = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    inverse = torch.zeros_like(index).scatter(-1, index, positions)

    def centred(v):
        return v - torch.gather(_soft_jvp(*state, v, *params), -1, inverse)

    second = _soft_jvp(*state, centred(t) * centred(u), *params)
    return second if descending else -second


def _third_derivative(*args):
    raise NotImplementedError(
        "softrank: third derivatives of soft_rank/soft_sort are not implemented "
        "(first and second derivatives are)"
    )


class _Hvp(torch.autograd.Function):
    """The autograd kernel of softrank::soft_hvp: its derivatives are third derivatives."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        with _below_autograd():
            return _OPS.soft_hvp.default(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_third_derivative)
    jvp = staticmethod(_third_derivative)


class _EagerForward(torch.autograd.Function):
    """softrank::soft_forward's autograd on the eager path, with the same CPU kernels.

    At a row of 100 the autograd bookkeeping is a visible share of the time:
    this function returns ``out`` alone (autograd tracks no perm and
    block_start outputs) and keeps the host arrays of the forward pass for a
    backward that needs no conversion of them. A backward that records a
    graph (create_graph=True) or runs under a transform calls the
    differentiable operators, as :class:`_Forward` does. Applied through the
    base class: Function.apply binds its arguments by inspect.signature on
    every call (tens of microseconds), which only functorch needs.
    """

    @staticmethod
    def forward(ctx, x, op, reg, descending, eps):
        # x: C-contiguous (rows, n), the engine's own layout.
        x_host = _host_array(x)
        out_host, perm, block_start = _engine.engine().soft_forward(x_host, op, reg, descending, eps)
        out = torch.from_numpy(out_host)
        # Saved so that autograd catches in-place changes to them: the
        # backward reads their buffers through the host arrays.
        ctx.save_for_backward(x, out)
        ctx.host = (x_host, out_host, perm, block_start)
        ctx.params = (op, reg, descending, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        x_host, out_host, perm, block_start = ctx.host
        if not torch.is_grad_enabled() and _eager(grad_out):
            if grad_out.dtype != x.dtype:
                grad_out = grad_out.to(x.dtype)
            if not grad_out.is_contiguous():  # (a broadcast cotangent, as from sum().backward())
                grad_out = grad_out.contiguous()
            grad = _engine.engine().soft_vjp(
                x_host, out_host, perm, block_start, _host_array(grad_out), *ctx.params
            )
            grad = torch.from_numpy(grad)
        else:
            state = (x, out, torch.from_numpy(perm), torch.from_numpy(block_start))
            grad = _soft_vjp(*state, grad_out, *ctx.params)
        return grad, None, None, None, None


_apply_forward_eager = super(torch.autograd.Function, _EagerForward).apply

_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _autograd_kernel(name, function):
    def kernel(*args):
        if _functorch_active() and any(
            isinstance(a, Tensor) and _is_functorch_wrapped(a) for a in args
        ):
            raise NotImplementedError(
                f"softrank: torch.ops.softrank.{name} was called directly under a "
                "torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian), "
                "which cannot differentiate it from inside the dispatcher; call "
                "softrank.torch.soft_rank / soft_sort, which support every torch.func "
                "transform"
            )
        return function.apply(*args)

    return kernel


for _name, _function in (
    ("soft_forward", _Forward), ("soft_vjp", _Vjp), ("soft_jvp", _Jvp), ("soft_hvp", _Hvp)
):
    _LIB.impl(_name, _autograd_kernel(_name, _function), "Autograd")


# --- vmap: a vmapped dim is more rows ---------------------------------------------


def _forward_vmap(info, in_dims, x, op, reg, descending, eps):
    x = x.movedim(in_dims[0], 0)
    return _OPS.soft_forward(x, op, reg, descending, eps), (0, 0, 0)


def _product_vmap(name, tensor_count):
    operator = getattr(_OPS, name)

    def rule(info, in_dims, *args):
        tensors = [
            t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            for t, dim in zip(args[:tensor_count], in_dims)
        ]
        return operator(*tensors, *args[tensor_count:]), 0

    return rule


torch.library.register_vmap("softrank::soft_forward", _forward_vmap, lib=_LIB)
torch.library.register_vmap("softrank::soft_vjp", _product_vmap("soft_vjp", 5), lib=_LIB)
torch.library.register_vmap("softrank::soft_jvp", _product_vmap("soft_jvp", 5), lib=_LIB)
torch.library.register_vmap("softrank::soft_hvp", _product_vmap("soft_hvp", 6), lib=_LIB)


# --- public functions ------------------------------------------------------------


def _soft_op(x: Any, eps: Any, regularization: Any, direction: Any, dim: Any, op: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if torch._C._get_tracing_state() is not None:
        raise RuntimeError(_NO_JIT)
    if type(eps) is not float or not eps >= 0.0:
        if isinstance(eps, Tensor):
            if _is_compiling():
                raise TypeError(
                    "eps must be a Python number under torch.compile (a tensor's value "
                    "is data the graph cannot depend on); pass float(eps)"
                )
            eps = eps.detach()
        eps = check_eps(eps)
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
    if _functorch_active():
        out = _Forward.apply(rows, op, reg, descending, eps)[0]
    elif not (rows.is_cpu and _eager(rows)):
        out = _OPS.soft_forward(rows, op, reg, descending, eps)[0]
    elif rows.requires_grad and torch.is_grad_enabled():
        out = _apply_forward_eager(rows, op, reg, descending, eps)
    else:
        out = _forward_value_kernel(rows, op, reg, descending, eps)
    if ndim != 2:
        out = out.view(shape)
    if not last:
        out = out.movedim(-1, axis)
    return out if compute_dtype is dtype else out.to(dtype)


def soft_rank(
    x: Tensor,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
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
        Regularization strength, >= 0, not differentiated: a Python number
        (a constant of the graph under ``torch.compile``), or in eager mode
        also a 0-d tensor (``torch.compile`` raises for a tensor: its value
        is data the graph cannot depend on). ``eps = 0`` gives the hard
        ranks (ties get their mean rank), ``eps = inf`` gives ``(n + 1) / 2``
        everywhere.
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
    differentiable (the second derivative is 0 almost everywhere for l2), in
    reverse and forward mode and under every ``torch.func`` transform
    (``vmap`` makes one engine call for the whole batch); see the module
    docstring for compile, export and TorchScript.

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
    regularization: Regularization = "l2",
    direction: Direction = "ascending",
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
        Regularization strength, >= 0, as in :func:`soft_rank`. ``eps = 0`` returns the sorted values;
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
    through the sorting permutation. Twice differentiable, in every mode, as
    :func:`soft_rank`.

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import soft_sort
    >>> soft_sort(torch.tensor([3.0, 1.0, 2.0]), eps=0.1)
    tensor([1., 2., 3.])
    """
    return _soft_op(x, eps, regularization, direction, dim, OP_SORT)


# TorchScript reads this attribute (for direct and recursive scripting) and
# raises with the message instead of compiling the function's Python.
for _public in (soft_rank, soft_sort):
    _public.__script_unsupported = _NO_JIT
