"""softrank for PyTorch: soft rank, soft sort and the operators on the permutahedron.

``soft_rank`` and ``soft_sort`` act along any ``dim`` of a tensor of any
shape. They run on four operators of the ``softrank`` namespace, each
defined with :mod:`torch.library` with a kernel per device, a fake (meta)
kernel, an autograd kernel (reverse and forward mode) and a vmap rule. Every
operator acts along the last dim of ``x`` (shape ``(..., n)``):

``softrank::soft_forward(x, op, reg, descending, eps) -> (out, perm, block_start)``
    the engine's forward pass; ``perm`` and ``block_start`` are int32 and
    not differentiable. The products below take that state as it came: on
    the CPU a ``perm`` outside ``[0, n)`` raises ValueError; on a GPU (where
    a check would synchronise with the host) it reads clamped, and any state
    not made by ``soft_forward`` gives unspecified values, never an access
    outside the row.
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
dynamic shapes (a Python-number ``eps`` or ``q`` is a constant of the graph:
a new value compiles again), ``torch.export`` (with dynamic dims, the
operator's own included), meta tensors, DTensors (``torch.distributed.tensor``)
replicated or sharded along any dim but the operator's (computed shard by
shard; one sharded along the operator's dim is gathered first; a further
tensor argument must then be a DTensor too). A vmapped dim is just more
rows to the engine, so ``vmap`` makes one engine call for the whole batch.
What raises, saying what to use instead: ``torch.jit.trace`` and
``torch.jit.script`` (use ``torch.compile`` or ``torch.export``), third
derivatives, and the operators called directly (``torch.ops.softrank.*``) under
a differentiating ``torch.func`` transform (the public functions support
them; direct calls support autograd, vmap, compile and export). The one
exception among third derivatives: the kl soft sort's (and so
``soft_quantile``'s and ``soft_median``'s) by forward over forward over
forward mode (``jacfwd(jacfwd(jacfwd(f)))``, nested ``torch.func.jvp``) and by
``jacrev`` of that, which are computed: its forward-mode second derivative
is a composition of ``soft_jvp``, which differentiates again.
A double backward through a graph compiled by ``torch.compile`` (a gradient
penalty) is not supported by torch: ``soft_rank``, ``soft_sort`` and
``spearman`` of an input of the compiled function raise its "torch.compile
with aot_autograd does not currently support double backward", as
``torch.sin`` does; where the compiled backward keeps only intermediates
(``soft_topk_mask``, ``isotonic_regression``, an input transformed before
the call; ``torch.softmax`` alike), torch drops the penalty's dependence on
the input without an error. Compute gradient penalties outside
``torch.compile``.

Devices: the CPU kernels hand the engine numpy views of the tensors, without
copies when they are contiguous. Where softrank was built with its CUDA core
(``softrank._C.cuda_compiled()``), the CUDA kernels of ``soft_forward``,
``soft_vjp`` and ``soft_jvp`` run it on the tensors' device, on the current
stream, with memory from torch's caching allocator (:mod:`softrank._torch_cuda`),
and the CUDA kernel of ``soft_hvp`` composes those two products with torch
operations: ``soft_rank``, ``soft_sort`` and their derivatives of every
supported order never leave the GPU. ``projection_forward`` and
``isotonic_forward`` are computed on the host for CUDA tensors: their CUDA
kernels copy the inputs to the host, run the CPU engine and copy the results
back to the input's device (synchronising with the current stream). Without
the CUDA core, or with ``SOFTRANK_DISABLE_CUDA`` set when this module is
imported, every CUDA kernel is that host round trip.

An eager call on a plain CPU tensor (no torch.func transform, compile,
dispatch or function mode, forward-mode level, batched tensor or tensor
subclass active) calls the CPU engine without going through the
dispatcher, whose Python layers cost more than the engine needs for a row
of 100; its autograd function (:class:`_EagerForward`) turns to the
operators for anything beyond a plain first-order backward.

The operators on the permutahedron (``permutahedron_projection``,
``soft_topk_mask``, ``isotonic_regression``; ``spearman``, ``soft_quantile``
and ``soft_median`` are compositions of ``soft_rank`` and ``soft_sort``) run
on two more operators, registered the same way (kernel per device, fake
kernel, vmap rule that folds the batch into the rows):

``softrank::projection_forward(z, w, eps, reg) -> (out, perm_z, inv_z, perm_w, inv_w, block_start)``
    ``P(z / eps, w)`` (l2) or ``P_E(z / eps, w)`` (kl) and the integer
    structure of the solution (int64, see :func:`softrank._host.projection`).
``softrank::isotonic_forward(y, weights, increasing, reg) -> (solution, block_start)``
    the isotonic regression and its PAV blocks (int64).

Their derivatives are the formulas of :mod:`softrank._derivatives` written
in torch operations (gather, scatter_add, exp, ...) over that integer
structure, in the backward and jvp of an autograd function per operator;
autograd, forward mode and every ``torch.func`` transform differentiate
those operations again, so derivatives of every order compose.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import sys
from typing import Any, Optional

try:
    import torch
except ImportError as exc:
    raise ImportError("softrank.torch needs PyTorch: pip install 'softrank[torch]'") from exc
import numpy as np
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.fx.experimental.proxy_tensor import get_proxy_mode as _proxy_mode
from torch.fx.experimental.symbolic_shapes import guard_scalar as _guard_scalar

from softrank import _derivatives, _engine, _host, _layout, _operators, _torch_cuda
from softrank._engine import OP_RANK, OP_SORT, REG_L2
from softrank._types import Direction, Regularization
from softrank._validate import (
    check_axis,
    check_direction,
    check_eps,
    check_float16_ranks,
    check_float_dtype_kind,
    check_increasing,
    check_regularization,
    not_numbers,
    WEIGHTS_INVALID,
    weights_overflow,
    weights_underflow,
)

__all__ = [
    "isotonic_regression",
    "permutahedron_projection",
    "soft_median",
    "soft_quantile",
    "soft_rank",
    "soft_sort",
    "soft_topk_mask",
    "spearman",
]

# softrank._layout's dtype policy for the floating dtypes, looked up once per call.
_COMPUTE_DTYPE = {
    dtype: getattr(torch, _layout.compute_dtype_name(
        str(dtype).replace("torch.", ""), "f", dtype.itemsize, allow_int=False))
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
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
_NO_FUNCTIONALIZE = (
    "softrank.torch does not support torch.func.functionalize (torch has no "
    "functionalization rule for the custom autograd functions that carry its "
    "derivatives); its operators never mutate their inputs, so they need none: "
    "call them outside functionalize, or use torch.compile or torch.export, "
    "which functionalize the rest of the graph around them"
)


# --- kernels: the engine on host arrays -------------------------------------


def _host_array(tensor: Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a host copy of a CUDA one)."""
    if tensor.is_cpu:
        # (detach() costs a microsecond; only a tensor that requires grad needs it.)
        return tensor.detach().numpy() if tensor.requires_grad else tensor.numpy()
    return tensor.detach().cpu().numpy()


def _saved_host(tensor: Optional[Tensor]) -> Optional[np.ndarray]:
    """The host array of a tensor from ``ctx.saved_tensors``.

    A backward reads the saved tensors, never host views kept from the
    forward: under ``torch.autograd.graph.saved_tensors_hooks`` (offloading,
    compression) they are what the hooks unpacked, which the backward must
    use, while the forward's buffers may have been changed in place since.
    """
    if tensor is None:
        return None
    return _host_array(tensor if tensor.is_contiguous() else tensor.contiguous())


def _rows_of(tensor: Tensor) -> Tensor:
    """``tensor`` (its operator dim last, ``dim() >= 1``) as C-contiguous ``(rows, n)``.

    Each tensor method call costs a microsecond or two: the common 2-D
    contiguous case makes none it does not need (the result is then
    ``tensor`` itself, and :func:`_unfold` leaves results as they are).
    """
    rows = tensor if tensor.dim() == 2 else tensor.reshape(
        math.prod(tensor.shape[:-1]), tensor.shape[-1])
    return rows if rows.is_contiguous() else rows.contiguous()


def _contiguous(tensor: Tensor) -> Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _unfold(result: Tensor, shape: torch.Size) -> Tensor:
    """A ``(rows, ...)`` result of :func:`_rows_of`'s rows back in ``shape``."""
    return result if result.shape == shape else result.view(shape)


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
    """The CPU kernel (and the CUDA one without the CUDA core: computed on the host)."""
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


def _projection_kernel(z, w, eps, reg):
    """The CPU kernel, and the CUDA kernel: CUDA tensors are computed on the host."""
    out, state = _host.projection(_host_array(z), _host_array(w), eps, reg)
    return (_on_device(out, z),) + tuple(_on_device(field, z) for field in state)


def _isotonic_kernel(y, weights, increasing, reg):
    """The CPU kernel, and the CUDA kernel: CUDA tensors are computed on the host."""
    solution, block_start = _host.isotonic(
        _host_array(y), None if weights is None else _host_array(weights), increasing, reg
    )
    return _on_device(solution, y), _on_device(block_start, y)


def _pearson_kernel(a, b):
    """The CPU kernel: the engine's Pearson correlation of the last axes of a and b."""
    corr = _engine.engine().pearson(_host_array(_rows_of(a)), _host_array(_rows_of(b)))
    return _unfold(torch.from_numpy(corr), a.shape[:-1])


def _pearson_device_kernel(a, b):
    """The CUDA kernel: the same formula in torch operations, on the device."""
    return _operators.pearson_last_axis(_TORCH_OPS, a, b)


def _pearson_fake(a, b):
    return a.new_empty(a.shape[:-1])


def _projection_fake(z, w, eps, reg):
    index = z.new_empty(z.shape, dtype=torch.int64)
    return (z.new_empty(z.shape), index) + tuple(torch.empty_like(index) for _ in range(4))


def _isotonic_fake(y, weights, increasing, reg):
    return y.new_empty(y.shape), y.new_empty(y.shape, dtype=torch.int64)


# --- the operators ------------------------------------------------------------

_LIB = torch.library.Library("softrank", "DEF")
_PARAMS = "int op, int reg, bool descending, float eps"
_STATE = "Tensor x, Tensor out, Tensor perm, Tensor block_start"
_LIB.define(f"soft_forward(Tensor x, {_PARAMS}) -> (Tensor, Tensor, Tensor)")
_LIB.define(f"soft_vjp({_STATE}, Tensor cotangent, {_PARAMS}) -> Tensor")
_LIB.define(f"soft_jvp({_STATE}, Tensor tangent, {_PARAMS}) -> Tensor")
_LIB.define(f"soft_hvp({_STATE}, Tensor cotangent, Tensor tangent, {_PARAMS}) -> Tensor")
_LIB.define(
    "projection_forward(Tensor z, Tensor w, float eps, int reg) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "isotonic_forward(Tensor y, Tensor? weights, bool increasing, int reg) -> (Tensor, Tensor)"
)
_LIB.define("pearson(Tensor a, Tensor b) -> Tensor")
_OPS = torch.ops.softrank

_HOST_KERNELS = {
    "soft_forward": _forward_kernel,
    "soft_vjp": _vjp_kernel,
    "soft_jvp": _jvp_kernel,
    "soft_hvp": _hvp_kernel,
    "projection_forward": _projection_kernel,
    "isotonic_forward": _isotonic_kernel,
    "pearson": _pearson_kernel,
}
# The CUDA core's kernels where softrank was built with it; the host round
# trip of the kernels above for the rest (see softrank._torch_cuda).
_CUDA_KERNELS = dict(_torch_cuda.cuda_kernels(_torch_cuda.core(), _HOST_KERNELS),
                     pearson=_pearson_device_kernel)

for _name, _fake in (
    ("soft_forward", _forward_fake),
    ("soft_vjp", _like_x_fake),
    ("soft_jvp", _like_x_fake),
    ("soft_hvp", _like_x_fake),
    ("projection_forward", _projection_fake),
    ("isotonic_forward", _isotonic_fake),
    ("pearson", _pearson_fake),
):
    _LIB.impl(_name, _HOST_KERNELS[_name], "CPU")
    _LIB.impl(_name, _CUDA_KERNELS[_name], "CUDA")
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
_functorch_levels = torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters
_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize


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


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_unwrap_for_grad = torch._C._functorch._unwrap_for_grad
_functorch_level = torch._C._functorch.maybe_get_level
_is_batched = torch._C._functorch.is_batchedtensor
_batch_dim = torch._C._functorch.maybe_get_bdim
_unwrap_batch = torch._C._functorch.get_unwrapped
_add_batch_dim = torch._C._functorch._add_batch_dim


def _grad_level(tensor: Tensor) -> int:
    """The level of the outermost grad/jvp wrapper of ``tensor`` (-1 if none).

    The vmap rule that ``generate_vmap_rule`` makes runs a jvp staticmethod
    under a vmap level of its own, above the transform's: the batch
    wrappers above the grad wrapper are looked through.
    """
    while _is_functorch_wrapped(tensor) and _is_batched(tensor):
        tensor = _unwrap_batch(tensor)
    return _functorch_level(tensor) if _is_functorch_wrapped(tensor) else -1


def _without_level(tensor: Optional[Tensor], level: int) -> Optional[Tensor]:
    """``tensor`` with its grad wrapper of ``level`` removed, its batch wrappers above kept."""
    if tensor is None or not _is_functorch_wrapped(tensor):
        return tensor
    if _is_batched(tensor) and _functorch_level(tensor) > level:
        inner = _without_level(_unwrap_batch(tensor), level)
        return _add_batch_dim(inner, _batch_dim(tensor), _functorch_level(tensor))
    return _unwrap_for_grad(tensor, level)


@contextlib.contextmanager
def _formula_inputs(saved, output_index):
    """The saved tensors with which a jvp staticmethod evaluates its formula.

    Under a torch.func transform, an autograd function's jvp runs with
    forward gradients off, so an enclosing forward transform (the outer
    jacfwd of jacfwd(jacfwd(f))) would not see how the formula depends on
    the saved inputs: its tangent of the result would be lost (silently
    zero). Unwrapped from the level whose tangent the formula computes (the
    grad level of the function's output, ``saved[output_index]``) and with
    forward gradients back on, the saved inputs carry the enclosing levels'
    tangents into the result. (Left wrapped at that level, with forward
    gradients on, they would make the formula's own autograd functions
    compute that level's tangent again, without end.)
    """
    level = _grad_level(saved[output_index]) if _functorch_active() else -1
    if level < 0:
        yield saved
        return
    with _forward_ad._set_fwd_grad_enabled(True):
        yield [_without_level(t, level) for t in saved]


def _joined_to(grad: Optional[Tensor], input: Tensor, needed: bool) -> Optional[Tensor]:
    """``grad`` (the gradient of ``input``) made a function of ``input`` with a zero derivative.

    In a backward that records a graph (``create_graph=True``), the l2
    projection's and isotonic regression's gradients are piecewise constant:
    they do not depend on ``input``, and torch then refuses a gradient of
    them ("element 0 of tensors does not require grad") where soft_rank and
    torch's relu give zeros. ``where`` joins ``input`` with a zero
    derivative, with no NaN where ``input`` is infinite (as ``0 * input`` would).
    ``needed``: ``ctx.needs_input_grad`` of ``input``, not ``input.requires_grad``,
    which is False for the batched tensors that ``vmap``'s generated rule saves
    (the double backward through ``vmap`` then failed so).
    """
    if grad is None or input is None or not needed or not torch.is_grad_enabled():
        return grad
    if grad.requires_grad:  # (already a function of the inputs)
        return grad
    return torch.where(torch.zeros((), dtype=torch.bool, device=grad.device), input, grad)


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
        # (Under nested forward transforms the enclosing levels' tangents must
        # reach soft_jvp's x: see _formula_inputs.)
        with _formula_inputs(ctx.saved_tensors, 1) as state:
            tangent_out = _soft_jvp(*state, x_tangent, *ctx.params)
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
        # The output too: its functorch level is the one the jvp computes the
        # tangent of (_formula_inputs), where no input need carry it. (Both
        # lists alike: the vmap rule that generate_vmap_rule makes keeps one
        # set of batch dims for the saved tensors, the last saved.)
        ctx.save_for_backward(*inputs[:5], output)
        ctx.save_for_forward(*inputs[:5], output)
        ctx.params = tuple(inputs[5:])

    @staticmethod
    def backward(ctx, grad_grad):
        x, out, perm, block_start, cotangent, _ = ctx.saved_tensors
        grad_x = grad_cotangent = None
        if ctx.needs_input_grad[0]:
            grad_x = _soft_hvp(x, out, perm, block_start, cotangent, grad_grad, *ctx.params)
        if ctx.needs_input_grad[4]:
            grad_cotangent = _soft_jvp(x, out, perm, block_start, grad_grad, *ctx.params)
        return grad_x, None, None, None, grad_cotangent, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, out_tangent, perm_tangent, block_tangent, cotangent_tangent, *rest):
        with _formula_inputs(ctx.saved_tensors, 5) as (x, out, perm, block_start, cotangent, _):
            state = (x, out, perm, block_start)
            tangent_out = None
            if cotangent_tangent is not None:
                tangent_out = _soft_vjp(*state, cotangent_tangent, *ctx.params)
            if x_tangent is not None:
                tangent_out = _sum(tangent_out,
                                   _soft_hvp(*state, cotangent, x_tangent, *ctx.params))
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
        x, out, perm, block_start, tangent, _ = ctx.saved_tensors
        grad_x = grad_tangent = None
        if ctx.needs_input_grad[0]:
            grad_x = _soft_hvp(x, out, perm, block_start, grad_out, tangent, *ctx.params)
        if ctx.needs_input_grad[4]:
            grad_tangent = _soft_vjp(x, out, perm, block_start, grad_out, *ctx.params)
        return grad_x, None, None, None, grad_tangent, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, out_tangent, perm_tangent, block_tangent, tangent_tangent, *rest):
        with _formula_inputs(ctx.saved_tensors, 5) as (x, out, perm, block_start, tangent, _):
            state = (x, out, perm, block_start)
            reg = ctx.params[1]
            tangent_out = None
            if tangent_tangent is not None:
                tangent_out = _soft_jvp(*state, tangent_tangent, *ctx.params)
            # d/dx (J(x) t) s: the second derivative contracted with t and s on
            # its input sides. 0 for l2, whose Jacobian is locally constant.
            if x_tangent is not None and reg != REG_L2:
                tangent_out = _sum(tangent_out,
                                   _second_derivative(state, tangent, x_tangent, ctx.params))
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
        "(first and second derivatives are). torch.autograd.functional.hvp asks for one to "
        "compute a second derivative (its double-backward trick): use "
        "torch.autograd.functional.vhp, equal to hvp for the symmetric Hessian of a scalar "
        "function, or torch.func.jvp of torch.func.grad"
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
        # The backward reads x and out from the saved tensors (_saved_host).
        ctx.save_for_backward(x, out)
        ctx.host = (perm, block_start)
        ctx.params = (op, reg, descending, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, out = ctx.saved_tensors
        perm, block_start = ctx.host
        if not torch.is_grad_enabled() and _eager(grad_out):
            if grad_out.dtype != x.dtype:
                grad_out = grad_out.to(x.dtype)
            if not grad_out.is_contiguous():  # (a broadcast cotangent, as from sum().backward())
                grad_out = grad_out.contiguous()
            grad = _engine.engine().soft_vjp(
                _saved_host(x), _saved_host(out), perm, block_start, _host_array(grad_out),
                *ctx.params
            )
            grad = torch.from_numpy(grad)
        else:
            state = (x, out, torch.from_numpy(perm), torch.from_numpy(block_start))
            grad = _soft_vjp(*state, grad_out, *ctx.params)
        return grad, None, None, None, None


_apply_forward_eager = super(torch.autograd.Function, _EagerForward).apply


def _autograd_kernel(name, function, public="soft_rank / soft_sort"):
    # Outside torch.func, Function.apply's Python wrapper only binds default
    # arguments (inspect.signature: tens of microseconds a call); the kernel
    # always receives every argument, so it goes to the C++ apply directly.
    apply_all_args = super(torch.autograd.Function, function).apply

    def kernel(*args):
        if _functorch_active():
            if any(isinstance(a, Tensor) and _is_functorch_wrapped(a) for a in args):
                raise NotImplementedError(
                    f"softrank: torch.ops.softrank.{name} was called directly under a "
                    "torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian), "
                    "which cannot differentiate it from inside the dispatcher; call "
                    f"softrank.torch.{public}, which support every torch.func "
                    "transform"
                )
            return function.apply(*args)
        return apply_all_args(*args)

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


# --- the operators on the permutahedron: derivatives in torch operations -----------


# --- DTensor (torch.distributed.tensor) ----------------------------------------------
# Every operator computes row by row along its last dim (the public functions
# move the operator's dim there): a DTensor replicated or sharded along a
# leading dim is computed shard by shard, exactly and without communication;
# the last dim must be whole. The strategies below say so to DTensor's sharding
# propagation, which redistributes any other placement (the ranked dim sharded,
# Partial) to one of them first: the ranked rows are gathered, never ranked per
# shard. They are registered the first time a DTensor reaches a public
# function, not at import: importing torch.distributed.tensor takes about a
# second, and a DTensor exists only once it has been imported.

# The number of tensor outputs of each operator.
_OUTPUT_COUNTS = {"soft_forward": 3, "soft_vjp": 1, "soft_jvp": 1, "soft_hvp": 1,
                  "projection_forward": 6, "isotonic_forward": 2, "pearson": 1}
_dtensor_registered = False


def _is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (without importing torch.distributed.tensor)."""
    # (isinstance only: dynamo cannot guard type() of a tensor made inside a
    # compiled function, an nn.Parameter built there, and fails hard)
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _row_strategy(output_count: int):
    """register_sharding's strategy of an operator computed along the last dim."""
    from torch.distributed.tensor import Replicate, Shard

    def strategy(*args):
        ndim = next(a.ndim for a in args if hasattr(a, "ndim"))

        def inputs(placement):
            # (None for the int, float and bool arguments and an absent weights)
            return [placement if hasattr(a, "ndim") and a.ndim == ndim
                    else Replicate() if hasattr(a, "ndim") else None for a in args]

        strategies = [([Replicate()] * output_count, inputs(Replicate()))]
        strategies += [([Shard(d)] * output_count, inputs(Shard(d))) for d in range(ndim - 1)]
        return strategies

    return strategy


def _dtensor_input(x: Tensor) -> None:
    """Register the operators' DTensor sharding strategies, once, if ``x`` is a DTensor."""
    global _dtensor_registered
    if _dtensor_registered or not _is_dtensor(x):
        return
    from torch.distributed.tensor.experimental import register_sharding

    for name, output_count in _OUTPUT_COUNTS.items():
        register_sharding(getattr(_OPS, name).default)(_row_strategy(output_count))
    _dtensor_registered = True


def _replicated_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a plain tensor) as ``like`` holds it: replicated on a DTensor ``like``'s mesh."""
    if not _is_dtensor(like):
        return value
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


class _TorchOps:
    """The namespace of :mod:`softrank._derivatives` and :mod:`softrank._operators`.

    Torch operations only, so that autograd, forward mode, vmap and compile
    see through the derivative formulas (and differentiate them again).
    """

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sqrt = staticmethod(torch.sqrt)
    ones_like = staticmethod(torch.ones_like)

    @staticmethod
    def take(a, index):
        return torch.gather(a, -1, index)

    @staticmethod
    def block_sum(v, block_start):
        # Each block's sum lands at its first position, then is read back at every position.
        return torch.zeros_like(v).scatter_add(-1, block_start, v).gather(-1, block_start)

    @staticmethod
    def stop_gradient(a):
        return a.detach()

    @staticmethod
    def nan_of(a):
        a = a.detach()
        return torch.where(torch.isnan(a), a, torch.zeros_like(a))

    @staticmethod
    def take_columns(a, index):
        return a.index_select(-1, _replicated_like(torch.as_tensor(index, device=a.device), a))

    @staticmethod
    def sum_last(a):
        return a.sum(-1)

    @staticmethod
    def constant(values, like):
        return _replicated_like(torch.as_tensor(values, dtype=like.dtype, device=like.device), like)

    @staticmethod
    def move_last_to_first(a):
        return a.movedim(-1, 0)

    @staticmethod
    def row_scale(a):
        a = a.detach()
        if a.shape[-1] == 0:
            return torch.ones((*a.shape[:-1], 1), dtype=a.dtype, device=a.device)
        return (a.amax(-1, keepdim=True) * _derivatives.ROW_SCALE_FACTOR).clamp_min(1.0)

    @staticmethod
    def times_factors(value, before, after):
        return value * before * after  # (inductor folds neither: test_torch_compile)

    @staticmethod
    def stop_gradient_where_neg_inf(a):
        return torch.where(torch.isneginf(a), a.detach(), a)


_TORCH_OPS = _TorchOps()


class _Projection(torch.autograd.Function):
    """softrank::projection_forward with the derivatives of :mod:`softrank._derivatives`.

    The autograd kernel of the operator, and applied directly under a
    torch.func transform. ``eps`` and ``reg`` are not differentiated; the
    integer outputs are not differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, w, eps, reg):
        with _below_autograd():
            return _OPS.projection_forward.default(z, w, eps, reg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, w, eps, reg = inputs
        out, *state = output
        ctx.mark_non_differentiable(*state)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, w, out, *state)
        if _forward_mode_possible():
            ctx.save_for_forward(z, w, out, *state)
        ctx.params = (eps, reg)

    @staticmethod
    def backward(ctx, grad_out, *state_grads):
        if grad_out is None:
            return None, None, None, None
        z, w, out, *state = ctx.saved_tensors
        grad_z, grad_w = _derivatives.projection_vjp(
            _TORCH_OPS, z, w, out, state, grad_out, *ctx.params,
            need_z=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1],
        )
        return (_joined_to(grad_z, z, ctx.needs_input_grad[0]),
                _joined_to(grad_w, w, ctx.needs_input_grad[1]), None, None)

    @staticmethod
    def jvp(ctx, z_tangent, w_tangent, *param_tangents):
        with _formula_inputs(ctx.saved_tensors, 2) as (z, w, out, *state):
            tangent_out = _derivatives.projection_jvp(
                _TORCH_OPS, z, w, out, state, z_tangent, w_tangent, *ctx.params
            )
        return tangent_out, None, None, None, None, None


class _Isotonic(torch.autograd.Function):
    """softrank::isotonic_forward with the derivatives of :mod:`softrank._derivatives`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y, weights, increasing, reg):
        with _below_autograd():
            return _OPS.isotonic_forward.default(y, weights, increasing, reg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, weights, _, reg = inputs
        solution, block_start = output
        ctx.mark_non_differentiable(block_start)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, weights, solution, block_start)
        if _forward_mode_possible():
            ctx.save_for_forward(y, weights, solution, block_start)
        ctx.reg = reg

    @staticmethod
    def backward(ctx, grad_solution, grad_block_start):
        if grad_solution is None:
            return None, None, None, None
        y, weights, solution, block_start = ctx.saved_tensors
        grad_y, grad_weights = _derivatives.isotonic_vjp(
            _TORCH_OPS, y, weights, solution, block_start, grad_solution, ctx.reg,
            need_y=ctx.needs_input_grad[0], need_weights=ctx.needs_input_grad[1],
        )
        return (_joined_to(grad_y, y, ctx.needs_input_grad[0]),
                _joined_to(grad_weights, weights, ctx.needs_input_grad[1]), None, None)

    @staticmethod
    def jvp(ctx, y_tangent, weights_tangent, *param_tangents):
        with _formula_inputs(ctx.saved_tensors, 2) as (y, weights, solution, block_start):
            if weights is None:
                weights_tangent = None
            tangent_out = _derivatives.isotonic_jvp(
                _TORCH_OPS, y, weights, solution, block_start, y_tangent, weights_tangent,
                ctx.reg,
            )
        return tangent_out, None


_LIB.impl(
    "projection_forward",
    _autograd_kernel("projection_forward", _Projection,
                     "permutahedron_projection / soft_topk_mask"),
    "Autograd",
)
_LIB.impl(
    "isotonic_forward",
    _autograd_kernel("isotonic_forward", _Isotonic, "isotonic_regression"),
    "Autograd",
)


class _Pearson(torch.autograd.Function):
    """softrank::pearson, differentiable in ``a`` (``b``, the target's ranks, is
    a constant): the gradient and the tangent by
    :func:`softrank._operators.pearson_gradient_last_axis` in torch operations,
    so that they differentiate again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        with _below_autograd():
            return _OPS.pearson.default(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, b, output)
        if _forward_mode_possible():
            ctx.save_for_forward(a, b, output)

    @staticmethod
    def backward(ctx, grad_corr):
        if grad_corr is None:
            return None, None
        a, b, corr = ctx.saved_tensors
        d_corr = _operators.pearson_gradient_last_axis(_TORCH_OPS, a, b, corr)
        return grad_corr[..., None] * d_corr, None

    @staticmethod
    def jvp(ctx, a_tangent, b_tangent):
        with _formula_inputs(ctx.saved_tensors, 2) as (a, b, corr):
            if a_tangent is None:
                return torch.zeros_like(corr)
            d_corr = _operators.pearson_gradient_last_axis(_TORCH_OPS, a, b, corr)
            return (d_corr * a_tangent).sum(dim=-1)


_LIB.impl("pearson", _autograd_kernel("pearson", _Pearson, "spearman"), "Autograd")


class _EagerIsotonic(torch.autograd.Function):
    """``isotonic_regression``'s eager route on the CPU: the engine on host views.

    Taken where :func:`_eager` holds (no transform, mode or compiler needs to
    see the operator), as :class:`_EagerForward` for the soft operators. The
    backward computes the l2 gradient with respect to ``y`` by the engine's
    ``isotonic_vjp`` / ``isotonic_vjp_weighted`` (one pass, both gradients);
    kl, and any backward that builds a graph (``create_graph=True``), take
    the differentiable formulas of :mod:`softrank._derivatives`, as
    :class:`_Isotonic` does. Applied through the base class (see
    :class:`_EagerForward`).
    """

    @staticmethod
    def forward(ctx, y, weights, increasing, reg):
        # y, weights: C-contiguous (rows, n) CPU tensors of one float dtype.
        y_host = _host_array(y)
        weights_host = None if weights is None else _host_array(weights)
        solution_host, block_start = _engine.engine().isotonic_forward(
            y_host, weights_host, increasing, reg)
        solution = torch.from_numpy(solution_host)
        # The backward reads y, weights and solution from the saved tensors (_saved_host).
        ctx.save_for_backward(y, weights, solution)
        ctx.host = block_start
        ctx.reg = reg
        return solution

    @staticmethod
    def backward(ctx, grad_solution):
        y, weights, solution = ctx.saved_tensors
        block_start = ctx.host
        y_host, weights_host, solution_host = map(_saved_host, (y, weights, solution))
        need_y, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reg == _engine.REG_L2 and not torch.is_grad_enabled() and _eager(grad_solution):
            cotangent = _host_array(grad_solution.to(y.dtype).contiguous())
            if weights_host is None:
                grad_y = _engine.engine().isotonic_vjp(None, block_start, cotangent)
                return torch.from_numpy(grad_y), None, None, None
            grad_y, grad_weights = _engine.engine().isotonic_vjp_weighted(
                y_host, solution_host, weights_host, block_start, cotangent)
            return (torch.from_numpy(grad_y) if need_y else None,
                    torch.from_numpy(grad_weights) if need_weights else None, None, None)
        # (A NaN row's blocks are -1: one block, whose formulas give NaN.)
        blocks = torch.from_numpy(np.maximum(block_start, 0).astype(np.int64))
        grad_y, grad_weights = _derivatives.isotonic_vjp(
            _TORCH_OPS, y, weights, solution, blocks, grad_solution, ctx.reg,
            need_y=need_y, need_weights=need_weights,
        )
        return (_joined_to(grad_y, y, ctx.needs_input_grad[0]),
                _joined_to(grad_weights, weights, ctx.needs_input_grad[1]), None, None)


_apply_isotonic_eager = super(torch.autograd.Function, _EagerIsotonic).apply


def _spearman_operators(pred, target_ranks, regularization, eps):
    """``spearman`` of ``(rows, n)`` tensors through the differentiable operators."""
    ranks = soft_rank(pred, eps, regularization=regularization)
    return _pearson(ranks, target_ranks)


class _EagerSpearman(torch.autograd.Function):
    """``spearman``'s eager route on the CPU: the engine on host views, one
    autograd node.

    The soft ranks, the target's hard ranks, the correlation
    (``pearson``) and its gradient (``pearson_vjp``) come from the engine,
    on host buffers (no graph), and the gradient in ``pred`` from its
    ``soft_vjp``, as in ``softrank.numpy``'s ``spearman_with_vjp``. A backward that records a graph
    (``create_graph=True``) recomputes the correlation through the
    differentiable operators and differentiates that. Applied through the
    base class (see :class:`_EagerForward`).
    """

    @staticmethod
    def forward(ctx, pred, target, regularization, eps):
        # pred, target: C-contiguous (rows, n) CPU tensors; target float64.
        reg = check_regularization(regularization)
        eng = _engine.engine()
        pred_host = _host_array(pred)
        ranks, perm, block_start = eng.soft_forward(pred_host, _engine.OP_RANK, reg, False, eps)
        target_ranks = _target_ranks(target, ranks.dtype)
        corr = torch.from_numpy(eng.pearson(ranks, target_ranks))
        ctx.save_for_backward(pred)
        ctx.host = (ranks, perm, block_start, target_ranks)  # (private: not the caller's)
        ctx.params = (regularization, reg, eps)
        return corr

    @staticmethod
    def backward(ctx, grad_corr):
        (pred,) = ctx.saved_tensors
        ranks, perm, block_start, target_ranks = ctx.host
        regularization, reg, eps = ctx.params
        if torch.is_grad_enabled() or not _eager(grad_corr):
            with torch.enable_grad():
                value = _spearman_operators(pred, torch.from_numpy(target_ranks), regularization,
                                            eps)
                (grad,) = torch.autograd.grad(value, pred, grad_corr, create_graph=True)
            return grad, None, None, None
        eng = _engine.engine()
        cotangent = eng.pearson_vjp(ranks, target_ranks,
                                    _host_array(grad_corr.to(pred.dtype).contiguous()))
        grad = eng.soft_vjp(_saved_host(pred), ranks, perm, block_start, cotangent,
                            _engine.OP_RANK, reg, False, eps)
        return torch.from_numpy(grad), None, None, None


_apply_spearman_eager = super(torch.autograd.Function, _EagerSpearman).apply


def _batch_first(info, in_dims, tensors):
    """Each tensor with the vmapped dim first (expanded where it has none); None stays None."""
    return [
        t if t is None
        else t.expand(info.batch_size, *t.shape) if dim is None
        else t.movedim(dim, 0)
        for t, dim in zip(tensors, in_dims)
    ]


def _projection_vmap(info, in_dims, z, w, eps, reg):
    z, w = _batch_first(info, in_dims, (z, w))
    return _OPS.projection_forward(z, w, eps, reg), (0,) * 6


def _isotonic_vmap(info, in_dims, y, weights, increasing, reg):
    y, weights = _batch_first(info, in_dims, (y, weights))
    return _OPS.isotonic_forward(y, weights, increasing, reg), (0, 0)


torch.library.register_vmap("softrank::projection_forward", _projection_vmap, lib=_LIB)
torch.library.register_vmap("softrank::isotonic_forward", _isotonic_vmap, lib=_LIB)


def _pearson_vmap(info, in_dims, a, b):
    a, b = _batch_first(info, in_dims, (a, b))
    return _OPS.pearson(a, b), 0


torch.library.register_vmap("softrank::pearson", _pearson_vmap, lib=_LIB)


def _projection(z, w, eps, reg):
    """``(out, perm_z, inv_z, perm_w, inv_w, block_start)`` of tensors shaped ``(..., n)``."""
    if _functorch_active():
        return _Projection.apply(z, w, eps, reg)
    return _OPS.projection_forward(z, w, eps, reg)


def _pearson(a, b):
    """The Pearson correlation of the last axes of ``a`` and ``b`` (removed);
    differentiable in ``a``."""
    if _functorch_active():
        return _Pearson.apply(a, b)
    return _OPS.pearson(a, b)


def _isotonic(y, weights, increasing, reg):
    """``(solution, block_start)`` of tensors shaped ``(..., n)``; ``weights`` may be None."""
    if _functorch_active():
        return _Isotonic.apply(y, weights, increasing, reg)
    return _OPS.isotonic_forward(y, weights, increasing, reg)


# --- public functions ------------------------------------------------------------


def _soft_op(x: Any, eps: Any, regularization: Any, direction: Any, dim: Any, op: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _dtensor_input(x)
    if x.layout is not torch.strided or x.is_nested or x.is_quantized:
        _refuse_layout(x, "x")
    if torch._C._get_tracing_state() is not None:
        raise RuntimeError(_NO_JIT)
    if type(eps) is not float or not eps >= 0.0:
        eps = _eps_argument(eps)
    try:
        reg, descending = _CODES[regularization, direction]
    except (KeyError, TypeError):
        reg = check_regularization(regularization)
        descending = check_direction(direction)
    dtype = x.dtype
    compute_dtype = _COMPUTE_DTYPE.get(dtype) or _compute_dtype(dtype, "x")
    ndim = x.dim()
    if type(dim) is int and dim == -1 and ndim > 0:
        moved = x
        last = True
    else:
        axis = check_axis(dim, ndim, name="dim")
        last = axis == ndim - 1
        moved = x if last else x.movedim(axis, -1)
    if compute_dtype is not dtype:
        if dtype is torch.float16 and op == OP_RANK:
            check_float16_ranks(moved.shape[-1])
        moved = moved.to(compute_dtype)
    # The operators take any (..., n): x goes to them as it is, not reshaped
    # to rows. Under torch.compile a reshaped x would be an intermediate of
    # the graph, which AOTAutograd saves for the backward detached: a double
    # backward (a gradient penalty) through the compiled graph would then
    # silently drop the penalty's dependence on x instead of raising
    # "torch.compile with aot_autograd does not currently support double
    # backward", as it does where the saved tensor is the input itself.
    if _functorch_active():
        _refuse_functionalize()
        out = _Forward.apply(_contiguous(moved), op, reg, descending, eps)[0]
    elif not (moved.is_cpu and _eager(moved)):
        out = _OPS.soft_forward(_contiguous(moved), op, reg, descending, eps)[0]
    else:
        # The engine's own layout, (rows, n), on the eager path.
        rows = _rows_of(moved)
        if rows.requires_grad and torch.is_grad_enabled():
            out = _apply_forward_eager(rows, op, reg, descending, eps)
        else:
            out = _forward_value_kernel(rows, op, reg, descending, eps)
        out = _unfold(out, moved.shape)
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
        tensors raise TypeError. CUDA tensors are computed on their device
        where softrank was built with its CUDA core, else on the host (see
        the module docstring); the result is on ``x``'s device.
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
        Regularization strength, >= 0, as in :func:`soft_rank`. ``eps = 0`` returns the
        sorted values; ``eps = inf`` the mean (l2) or, for kl, ``-log-mean-exp(-x)``
        ascending and ``log-mean-exp(x)`` descending, of each row.
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


# --- the operators on the permutahedron: public functions ----------------------------

_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _no_jit() -> None:
    if torch._C._get_tracing_state() is not None:
        raise RuntimeError(_NO_JIT)
    _refuse_functionalize()


def _refuse_functionalize() -> None:
    if not _is_compiling() and _functorch_active() and any(
            level.key() == _FUNCTIONALIZE for level in _functorch_levels()):
        raise RuntimeError(_NO_FUNCTIONALIZE)


def _refuse_layout(tensor: Tensor, name: str) -> None:
    """Raise, naming ``name``, for a sparse, nested or quantized tensor (their
    own errors in the operators named neither the argument nor the problem)."""
    if tensor.is_nested:
        kind, hint = "nested", f"{name}.unbind() and apply the operator to each tensor"
    elif tensor.is_quantized:
        kind, hint = "quantized", f"{name}.dequantize()"
    else:
        kind, hint = f"sparse ({_dtype_name(tensor.layout)})", f"{name}.to_dense()"
    raise TypeError(f"{name} is a {kind} tensor: softrank takes dense strided tensors; "
                    f"use {hint}")


def _dtype_kind(dtype: torch.dtype) -> str:
    """numpy's kind code of a torch dtype, for :func:`check_float_dtype_kind`."""
    if dtype.is_floating_point:
        return "f"
    return "c" if dtype.is_complex else "b" if dtype == torch.bool else "i"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compute_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    """The compute dtype of ``dtype`` (:func:`softrank._layout.compute_dtype_name`)."""
    return getattr(torch, _layout.compute_dtype_name(
        _dtype_name(dtype), _dtype_kind(dtype), dtype.itemsize, allow_int=False, name=name))


def _to_last(x: Any, dim: Any, name: str):
    """``(x with dim last in its compute dtype, dim normalised, compute dtype)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _dtensor_input(x)
    if x.layout is not torch.strided or x.is_nested or x.is_quantized:
        _refuse_layout(x, name)
    compute_dtype = _COMPUTE_DTYPE.get(x.dtype) or _compute_dtype(x.dtype, name)
    axis = check_axis(dim, x.dim(), name="dim", array_name=name)
    moved = x if axis == x.dim() - 1 else x.movedim(axis, -1)
    if compute_dtype is not x.dtype:
        moved = moved.to(compute_dtype)
    return moved, axis, compute_dtype


def _from_last(result: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """``result`` (the operator's dim last) back in the input's layout and dtype."""
    if axis != result.dim() - 1:
        result = result.movedim(-1, axis)
    return result if result.dtype == dtype else result.to(dtype)


def _operand(value: Any, name: str, like: Tensor, like_name: str) -> Tensor:
    """A further tensor argument (``w``, ``target``, ``weights``): real or integer, on ``like``'s device.

    With a DTensor ``like``, an array_like becomes a replicated DTensor; a
    plain tensor is refused, as torch's own operations refuse a plain tensor
    mixed with DTensors (and a DTensor with a plain ``like``).
    """
    like_is_dtensor = _is_dtensor(like)
    if isinstance(value, Tensor) and _is_dtensor(value) != like_is_dtensor:
        if like_is_dtensor:
            raise TypeError(
                f"{name} is a plain torch.Tensor but {like_name} is a DTensor: softrank, as "
                f"torch's own operations, does not mix them; pass {name} as a DTensor on "
                f"{like_name}'s device mesh (torch.distributed.tensor.distribute_tensor("
                f"{name}, {like_name}.device_mesh, [Replicate()]) or DTensor.from_local), or "
                "as a numpy array or list (replicated)")
        raise TypeError(
            f"{name} is a DTensor but {like_name} is a plain torch.Tensor: softrank, as "
            f"torch's own operations, does not mix them; pass {like_name} as a DTensor too, "
            f"or {name}.full_tensor()")
    if not isinstance(value, Tensor):
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)  # (torch reads no negative strides: a[::-1])
        try:
            value = torch.as_tensor(value, device=like.device)
        except (TypeError, RuntimeError) as error:
            # (torch's own message, "new(): invalid data type 'str'" or "Could
            # not infer dtype of object", names neither the argument nor what it
            # takes; other errors, out of memory among them, are not about that)
            if isinstance(error, RuntimeError) and "Could not infer dtype" not in str(error):
                raise
            raise TypeError(not_numbers(name, "a tensor", value, error)) from None
        value = _replicated_like(value, like)
    if value.layout is not torch.strided or value.is_nested or value.is_quantized:
        _refuse_layout(value, name)
    check_float_dtype_kind(_dtype_kind(value.dtype), _dtype_name(value.dtype), allow_int=True,
                           name=name)
    if value.device != like.device:
        raise ValueError(f"{name} must be on the device of the input ({like.device}), "
                         f"got {value.device}")
    return value


def _eps_argument(eps: Any) -> float:
    """``eps`` as a float, accepting a 0-d tensor outside torch.compile (every public function)."""
    if type(eps) is float and eps >= 0.0:
        return eps
    if isinstance(eps, Tensor):
        if _is_compiling():
            raise TypeError(
                "eps must be a Python number under torch.compile (a tensor's value "
                "is data the graph cannot depend on); pass float(eps)"
            )
        _refuse_differentiated(eps, "eps")
        if eps.is_complex() or eps.dtype == torch.bool:
            raise TypeError(f"eps must be a real number, got a {_dtype_name(eps.dtype)} tensor")
        if eps.is_meta:
            raise TypeError("eps must be a Python number or a tensor holding a value, got a "
                            "meta tensor (it has no value)")
        values = _known_values(eps)  # (unwrapped from a transform that does not differentiate it)
        eps = eps.detach() if values is None else values
    else:
        eps = _specialized(eps, "eps", scalar_only=True)
    return check_eps(eps)


def _refuse_differentiated(value: Tensor, name: str) -> None:
    """Raise where a derivative with respect to ``value`` (eps, q) is asked for:
    it would come back None (or zero) without an error."""
    if _is_vmapped(value):
        raise TypeError(
            f"{name} must be one value for every row (a Python number or a plain 0-d "
            f"tensor), got a tensor batched by vmap: call the operator once per {name}")
    if _is_differentiated(value):
        raise TypeError(
            f"{name} must not require a gradient: derivatives with respect to {name} are "
            f"not supported; pass {name}.detach() or a Python number")


def _is_differentiated(value: Tensor) -> bool:
    """Whether a derivative with respect to ``value`` is being taken at any level:
    it requires a gradient (autograd, a ``torch.func.grad`` / ``jacrev`` level) or
    carries a forward-mode tangent (``forward_ad``, a ``torch.func.jvp`` / ``jacfwd``
    level). A tensor a transform merely wraps (an argument it does not
    differentiate, or one made inside the transformed function) is not."""
    tensor = value
    # Under no_grad / inference_mode a tensor that requires a gradient (a learnable
    # temperature, an nn.Parameter, evaluated) records nothing: no derivative is taken.
    recording = torch.is_grad_enabled()
    while True:
        if (tensor.requires_grad and recording) or _has_forward_tangent(tensor):
            return True
        if not _is_functorch_wrapped(tensor):
            return False
        tensor = torch._C._functorch.get_unwrapped(tensor)


def _has_forward_tangent(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a dual tensor of ``torch.autograd.forward_ad``: it
    requires no gradient and no functorch level wraps it, but its tangent would
    be dropped (a None or zero output tangent). (Never reached under
    torch.compile: a tensor eps or q is refused there first.)"""
    return _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(tensor).tangent is not None


def _is_vmapped(tensor: Tensor) -> bool:
    """Whether a torch.func.vmap level batches ``tensor``."""
    while _is_functorch_wrapped(tensor):
        if torch._C._functorch.is_batchedtensor(tensor):
            return True
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return False


def _specialized(value: Any, name: str, integral: bool = False, scalar_only: bool = False) -> Any:
    """A Python number argument as a plain Python number.

    An int or float argument of a compiled function arrives symbolic (a
    SymInt or SymFloat) once its value changes between calls, or with
    ``dynamic=True``; the checks of :mod:`softrank._validate` (``math.isnan``,
    numpy) and ``torch.compiler.assume_constant_result`` cannot take it.
    ``guard_scalar`` specializes it, with a guard, to the number it holds:
    a constant of the graph (another value compiles again), as a float eps
    passed to the operators always was. Where ``scalar_only`` (eps, k), under
    compile, anything but a real number (int, float, Fraction, ...), a str, a
    bool or a tensor (a numpy scalar or array) is refused naming ``name``.
    Anything else is returned as it is.
    """
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool):
        if type(value) not in (int, float) and isinstance(value, (int, float)):
            # a subclass (an IntEnum, np.float64): guard_scalar asserts a plain int
            value = int(value) if isinstance(value, int) else float(value)
        return _guard_scalar(value)
    if (scalar_only and _is_compiling() and value is not None
            and not isinstance(value, (bool, str, Tensor, numbers.Real))):
        # Dynamo traces a numpy scalar or 0-d array (eps = np.float64(0.5), a
        # config's value) as an array that neither isinstance nor the checks
        # of softrank._validate can read ("does not support tracing
        # ndarray.dtype"), and its float() as data the graph cannot guard on
        # (float32): refused by name, as a tensor eps is.
        raise TypeError(
            f"{name} must be a Python {'int' if integral else 'number'} under torch.compile, "
            f"got a numpy value or another number type the compiler traces as data; pass "
            f"{'int' if integral else 'float'}({name}) from outside the compiled function")
    return value


def _constant(values: np.ndarray, like: Tensor) -> Tensor:
    """A numpy vector as a constant row, broadcast to ``like``'s shape (no copy per row)."""
    return _replicated_like(torch.as_tensor(values, device=like.device), like).expand(like.shape)


# A symbolic n (torch.export with a dynamic size along the operator's dim)
# cannot size the numpy rows of softrank._operators: the helpers below then
# build the same values in torch operations, which keep n symbolic.
# (torch.compile's dynamo shows a symbolic n as an int: there the numpy rows
# specialize n, and a new n compiles again.)


def _rho_row(n: Any, dtype: torch.dtype, like: Tensor) -> Tensor:
    """``rho = (n, ..., 1)`` (:func:`softrank._operators.rho`), broadcast to ``like``'s shape."""
    if isinstance(n, torch.SymInt):
        return torch.arange(n, 0, -1, device=like.device).to(dtype).expand(like.shape)
    return _constant(_operators.rho(n, _NUMPY_DTYPE[dtype]), like)


def _topk_row(n: Any, k: int, reg: int, dtype: torch.dtype, like: Tensor) -> Tensor:
    """The top-k ``w`` (:func:`softrank._operators.topk_weights`), broadcast to ``like``'s shape."""
    if not isinstance(n, torch.SymInt):
        return _constant(_operators.topk_weights(n, k, reg, _NUMPY_DTYPE[dtype]), like)
    # The row for n = k + 1 holds the selected value (first) and the other
    # (last), and topk_weights refuses k = 0 for kl itself.
    values = _operators.topk_weights(k + 1, k, reg, _NUMPY_DTYPE[dtype])
    pair = torch.as_tensor(values[[0, -1]], device=like.device)
    return pair[(torch.arange(n, device=like.device) >= k).long()].expand(like.shape)


def _quantile_from_sorted(s: Tensor, quantiles: np.ndarray, scalar: bool) -> Tensor:
    """:func:`softrank._operators.quantile_from_sorted` of ``s`` (sorted ascending)."""
    n = s.shape[-1]
    if not isinstance(n, torch.SymInt):
        return _operators.quantile_from_sorted(_TORCH_OPS, s, quantiles, scalar)
    # softrank._operators.quantile_positions in float64 torch operations, the
    # same arithmetic. (torch.export makes no dim of size 0 or 1 dynamic, so
    # n >= 2 here.)
    position = torch.as_tensor(quantiles, dtype=torch.float64, device=s.device) * (n - 1)
    lo = torch.clamp(torch.floor(position), max=n - 1).long()
    hi = torch.clamp(lo + 1, max=n - 1)
    frac = (position - lo).to(s.dtype)
    below = s.index_select(-1, lo)
    value = below + frac * (s.index_select(-1, hi) - below)
    return value[..., 0] if scalar else value.movedim(-1, 0)


def _known_values(tensor: Tensor):
    """The plain tensor of ``tensor``'s values, or None where they are not known here.

    Under torch.compile, export and vmap (and for meta tensors) the values
    are symbolic or batched: they cannot be inspected by Python control flow.
    Under the differentiating torch.func transforms they are concrete.
    """
    if _is_compiling() or _proxy_mode() is not None:
        # (make_fx's proxy mode, which torch.func.linearize uses too, traces
        # every operation: reading a value there fails. Other dispatch modes,
        # such as FlopCounterMode, run the operations and read values.)
        return None
    while _is_functorch_wrapped(tensor):
        if torch._C._functorch.is_batchedtensor(tensor):
            return None
        tensor = torch._C._functorch.get_unwrapped(tensor)
    # (An nn.Parameter holds plain values; other subclasses, fake or
    # functional tensors, may not.)
    if type(tensor) not in (Tensor, torch.nn.Parameter) or tensor.is_meta:
        return None
    return tensor.detach()


def permutahedron_projection(
    z: Tensor,
    w: Any = None,
    *,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """Projection onto the permutahedron of ``w``, along ``dim``.

    l2: ``argmin_{mu in P(w)} 1/2 ||mu - z||^2``; kl: ``log argmin_{mu in
    P(exp w)} KL(mu, exp z)``, where ``P(w)`` is the convex hull of the
    permutations of ``w`` (Blondel et al. 2020, section 3). ``soft_rank(x,
    eps)`` is ``P(x / eps, rho)`` and the descending ``soft_sort(x, eps)`` is
    ``P(rho / eps, x)``; other ``w`` give other operators
    (:func:`soft_topk_mask`). O(n log n) per row: one sort of each of z and
    w, then pool-adjacent-violators.

    Parameters
    ----------
    z : Tensor, shape (..., n, ...)
        float32 and float64 are computed natively; float16 and bfloat16 in
        float32 and returned in their own dtype. Integer, bool and complex
        tensors raise TypeError. CUDA tensors are computed on the host (a
        round trip, see the module docstring); the result is on ``z``'s device.
    w : Tensor or array_like, optional
        Shape (n,) (the same vector for every row) or the shape of ``z``; any
        order (only its sorted values matter); on ``z``'s device, computed in
        ``z``'s compute dtype. Default ``rho = (n, ..., 1)``. Under kl, ``w``
        may hold ``-inf`` (zeros of ``exp w``) where each row's largest ``w``
        is finite.
    regularization : {"l2", "kl"}
    dim : int, default -1

    Returns
    -------
    Tensor
        Shape, dtype and device of ``z``; the rows of l2 sum to ``sum(w)``.
        Rows with NaN or inf give NaN.

    Notes
    -----
    Differentiable in ``z`` and ``w`` (the gradient of a 1-D ``w`` is summed
    over the rows). The Jacobian is block diagonal over the PAV blocks in
    sorted order: l2 ``(I - mean_B)`` in z and ``mean_B`` in sorted w; kl
    ``I - 1 p^T`` in z and ``1 q^T`` in sorted w per block B, with ``p``,
    ``q`` the block softmaxes of sorted z and w. The derivatives are torch
    operations, so every order of autograd, forward mode and every
    ``torch.func`` transform works (``vmap`` makes one engine call for the
    batch), as does ``torch.compile``; TorchScript raises.

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import permutahedron_projection
    >>> permutahedron_projection(torch.tensor([0.0, 3.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]))
    tensor([1., 3., 2.])
    """
    _no_jit()
    reg = check_regularization(regularization)
    moved, axis, dtype = _to_last(z, dim, "z")
    n = moved.shape[-1]
    if w is None:
        _operators.check_default_w_fits(n, z.dtype)
        weights = _rho_row(n, dtype, moved)
    else:
        w = _operand(w, "w", z, "z")
        # (ndim first: comparing a 1-D w's length with z's batch size would
        # make torch.export guard a dynamic batch dim.)
        same_shape = w.dim() == z.dim() and w.shape == z.shape
        if _operators.projection_weights_shared(tuple(w.shape), tuple(z.shape), n, same_shape):
            weights = w.to(dtype).expand(moved.shape)
        else:
            weights = w.to(dtype)
            if axis != w.dim() - 1:
                weights = weights.movedim(axis, -1)
    out = _projection(moved, weights, 1.0, reg)[0]
    return _from_last(out, axis, z.dtype)


def soft_topk_mask(
    x: Tensor,
    k: int,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """A soft indicator of the ``k`` largest entries of ``x`` along ``dim``.

    The projection of ``x / eps`` onto the permutahedron of ``w = (1, ..., 1,
    0, ..., 0)`` (k ones): l2 ``P(x / eps, w)``; kl ``exp(P_E(x / eps, log
    w))``, the entropic projection onto the same polytope.

    Parameters
    ----------
    x : Tensor, shape (..., n, ...)
        As ``z`` in :func:`permutahedron_projection`.
    k : int
        0 <= k <= n (kl: k >= 1); a Python int (it selects w).
    eps : float, default 1.0
        >= 0, not differentiated (a Python number, or a 0-d tensor outside
        ``torch.compile``, as in :func:`soft_rank`). As ``eps -> 0`` the mask
        tends to the indicator of the k largest entries (tied entries at the
        boundary share what is left); ``eps = 0`` returns that limit,
        ``eps = inf`` the constant ``k / n``.
    regularization : {"l2", "kl"}
    dim : int, default -1

    Returns
    -------
    Tensor
        Shape, dtype and device of ``x``; values in [0, 1], each row sums to ``k``.

    Notes
    -----
    Differentiable in ``x`` (zero gradient at ``eps = 0`` and ``eps = inf``):
    the Jacobian of the projection (see :func:`permutahedron_projection`)
    divided by ``eps``, times the mask for kl. Every transform works as for
    :func:`permutahedron_projection`.

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import soft_topk_mask
    >>> soft_topk_mask(torch.tensor([0.1, 3.0, 2.0, -1.0]), k=2, eps=0.5)
    tensor([0., 1., 1., 0.])
    """
    _no_jit()
    eps = _eps_argument(eps)
    reg = check_regularization(regularization)
    moved, axis, dtype = _to_last(x, dim, "x")
    n = moved.shape[-1]
    if isinstance(k, Tensor) and _is_compiling():
        # (its value selects w: data the graph cannot depend on; Inductor
        # failed on it with GuardOnDataDependentSymNode)
        raise TypeError("k must be a Python int under torch.compile (a tensor's value is data "
                        "the graph cannot depend on); pass int(k)")
    k = _operators.check_k(_specialized(k, "k", integral=True, scalar_only=True), n)
    weights = _topk_row(n, k, reg, dtype, moved)
    out = _projection(moved, weights, eps, reg)[0]
    return _from_last(_operators.topk_mask_from_projection(_TORCH_OPS, out, reg), axis, x.dtype)


def spearman(
    pred: Tensor,
    target: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """Soft Spearman rank correlation of ``pred`` with ``target``, row by row.

    The Pearson correlation of ``soft_rank(pred, eps)`` with the ranks of
    ``target`` (mean ranks for ties: ``soft_rank(target, eps=0)``). As ``eps
    -> 0`` it equals ``scipy.stats.spearmanr`` of each row; ``1 - spearman``
    is a learning-to-rank loss.

    Parameters
    ----------
    pred : Tensor, shape (..., n, ...)
        As ``x`` in :func:`soft_rank`.
    target : Tensor or array_like, shape of ``pred``
        Real or integer (e.g. relevance labels), on ``pred``'s device. Not
        differentiated (its ranks are piecewise constant). A row of ``target``
        holding NaN or +-inf gives NaN, as a row of ``pred`` does
        (``scipy.stats.spearmanr`` ranks +-inf).
    eps : float, default 1.0
        As in :func:`soft_rank`.
    regularization : {"l2", "kl"}
    dim : int, default -1
        Removed from the result.

    Returns
    -------
    Tensor
        Shape of ``pred`` without ``dim``, dtype and device of ``pred``, values in [-1, 1];
        NaN for a constant row (as scipy) and at eps = inf (constant soft ranks); ill-
        conditioned as pred / eps nears a constant (see the README's Operators).

    Notes
    -----
    Differentiable in ``pred`` under every transform :func:`soft_rank`
    supports (a composition of it with torch operations).

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import spearman
    >>> float(spearman(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 3.0, 2.0]), eps=0.01))
    1.0
    """
    _no_jit()
    moved, axis, dtype = _to_last(pred, dim, "pred")
    target = _operand(target, "target", pred, "pred")
    if target.shape != pred.shape:
        raise ValueError(
            f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    # The target is ranked in float64 (where the device has it), then its
    # ranks are cast: cast first, distinct targets (int64 above 2^24 for
    # float32 pred) would merge into ties.
    target = target.detach().to(torch.float32 if target.device.type == "mps" else torch.float64)
    if axis != target.dim() - 1:
        target = target.movedim(axis, -1)
    if moved.is_cpu and moved.numel() and _eager(moved) and _eager(target):
        check_regularization(regularization)
        corr = _spearman_eager(moved, target, _eps_argument(eps), regularization)
    else:
        ranks = soft_rank(moved, eps, regularization=regularization)
        target_ranks = soft_rank(target, 0.0).detach().to(dtype)
        corr = _pearson(ranks, target_ranks)
    return corr if corr.dtype == pred.dtype else corr.to(pred.dtype)


def _spearman_eager(pred: Tensor, target: Tensor, eps: float, regularization: str) -> Tensor:
    """``spearman`` of ``pred`` (its dim last) by :class:`_EagerSpearman`."""
    shape = pred.shape
    rows = _rows_of(pred)
    target_rows = _rows_of(target)
    if torch.is_grad_enabled() and rows.requires_grad:
        corr = _apply_spearman_eager(rows, target_rows, regularization, eps)
    else:
        eng = _engine.engine()
        ranks = eng.soft_forward_value(_host_array(rows), _engine.OP_RANK,
                                       check_regularization(regularization), False, eps)
        target_ranks = _target_ranks(target_rows, ranks.dtype)
        corr = torch.from_numpy(eng.pearson(ranks, target_ranks))
    return _unfold(corr, shape[:-1])


def _target_ranks(target: Tensor, dtype: np.dtype) -> np.ndarray:
    """The hard ranks of ``target`` (C-contiguous (rows, n) float64 CPU) in ``dtype``."""
    return _engine.engine().soft_forward_value(
        _host_array(target), _engine.OP_RANK, _engine.REG_L2, False, 0.0).astype(dtype, copy=False)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result``, without importing torch._dynamo.

    That decorator imports torch._dynamo (and with it torch.distributed.tensor,
    about a second) only to set the attribute below, which dynamo reads when it
    traces a call of ``fn``: ``import softrank.torch`` stays fast.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _checked_levels(q: Any):
    """``q`` checked, as a tuple of floats and whether it was a scalar.

    A constant of the graph under torch.compile: the check runs in Python
    at trace time instead of being traced as data-dependent branches.
    """
    values, scalar = _operators.check_quantiles(q)
    return tuple(values.tolist()), scalar


def _quantile_levels(q: Any):
    if isinstance(q, Tensor):
        concrete_error = TypeError(
            "q must be concrete (a Python number, a list or a plain tensor): it selects "
            "sorted positions, so it cannot be traced, compiled or vmapped"
        )
        if _is_compiling():
            raise concrete_error
        if not _is_vmapped(q):  # (a vmapped q: the "concrete" error below)
            # A q under torch.func.jvp / forward_ad requires no gradient, but
            # its tangent would be dropped.
            _refuse_differentiated(q, "q")
        values = _known_values(q)
        if values is None:
            raise concrete_error
        try:
            q = values.cpu().numpy()
        except RuntimeError:
            # Under a differentiating torch.func transform even a captured
            # plain tensor has no storage numpy can read; tolist reads it.
            q = np.asarray(values.tolist())
    elif isinstance(q, (list, tuple)):
        q = tuple(_specialized(level, "q") for level in q)
        _operators.check_plain_quantile_levels(q, q)
    else:
        q = _specialized(q, "q")
        _operators.check_plain_quantile_levels((q,), q)
    levels, scalar = _checked_levels(q)
    return np.array(levels, dtype=np.float64), scalar


def soft_quantile(
    x: Tensor,
    q: Any,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """Soft quantiles of ``x`` along ``dim``: np.quantile's "linear" rule on the soft sort.

    With ``s = soft_sort(x, eps)`` ascending, ``p = q (n - 1)``, ``lo =
    floor(p)``, ``hi = min(lo + 1, n - 1)``: ``s[lo] + (p - lo) (s[hi] -
    s[lo])``.

    Parameters
    ----------
    x : Tensor, shape (..., n, ...)
        n >= 1; as in :func:`soft_sort`.
    q : float or 1-D sequence of floats in [0, 1]
        Concrete (it selects sorted positions): a Python number or list, a
        numpy array or a plain tensor, not differentiated.
    eps : float, default 1.0
        As ``eps -> 0`` (and at eps = 0) the result equals
        ``torch.quantile(x, q, dim=dim)`` (``np.quantile``, method "linear").
    regularization : {"l2", "kl"}
    dim : int, default -1

    Returns
    -------
    Tensor
        np.quantile's layout: shape of ``x`` without ``dim`` for a scalar
        ``q``, with ``len(q)`` in front for a 1-D ``q``; dtype and device of ``x``.

    Notes
    -----
    Differentiable in ``x`` under every transform :func:`soft_sort`
    supports (a composition of it with torch operations).

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import soft_quantile
    >>> float(soft_quantile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.5, eps=0.01))
    2.5
    """
    _no_jit()
    quantiles, scalar = _quantile_levels(q)
    moved = _to_last(x, dim, "x")[0]
    s = soft_sort(moved, eps, regularization=regularization)
    value = _quantile_from_sorted(s, quantiles, scalar)
    return value if value.dtype == x.dtype else value.to(x.dtype)


def soft_median(
    x: Tensor,
    eps: float = 1.0,
    *,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """Soft median of ``x`` along ``dim``: ``soft_quantile(x, 0.5, ...)`` (dim removed).

    As ``eps -> 0`` it equals ``np.median`` along ``dim`` (the mean of the
    two middle values for an even n, unlike ``torch.median``).
    """
    return soft_quantile(x, 0.5, eps, regularization=regularization, dim=dim)


def isotonic_regression(
    y: Tensor,
    *,
    weights: Any = None,
    increasing: bool = True,
    regularization: Regularization = "l2",
    dim: int = -1,
) -> Tensor:
    """Weighted isotonic regression along ``dim`` by pool-adjacent-violators.

    l2: ``argmin_v sum_i w_i (v_i - y_i)^2``; kl: ``argmin_v sum_i exp(y_i -
    v_i) + w_i v_i`` (fast-soft-sort's ``isotonic_kl`` with weights
    ``exp(its w)``); subject to ``v`` non-decreasing (``increasing=True``) or
    non-increasing. Exact, O(n) per row. On each block B of equal values the
    solution is ``sum_B w y / sum_B w`` (l2) or ``log sum_B exp(y) - log
    sum_B w`` (kl).

    Parameters
    ----------
    y : Tensor, shape (..., n, ...)
        As ``z`` in :func:`permutahedron_projection`: CUDA tensors are
        computed on the host (a round trip); the result is on ``y``'s device.
    weights : Tensor or array_like, shape of ``y``, optional
        Positive finite weights, on ``y``'s device, computed in ``y``'s
        compute dtype; default all ones. Checked (ValueError) where their
        values are known: in eager mode and under the differentiating
        ``torch.func`` transforms, not under ``vmap``, ``torch.compile`` or
        export, nor for meta tensors (where a non-positive weight gives
        meaningless values).
    increasing : bool, default True
    regularization : {"l2", "kl"}
    dim : int, default -1

    Returns
    -------
    Tensor
        Shape, dtype and device of ``y``.

    Notes
    -----
    Differentiable in ``y`` and ``weights``. Per block B (l2):
    ``d v = sum_B (w dy + dw (y - v)) / sum_B w``; (kl): ``d v = sum_B
    softmax_B(y) dy - sum_B dw / sum_B w``. Every order of autograd, forward
    mode and every ``torch.func`` transform works, as does ``torch.compile``.

    Examples
    --------
    >>> import torch
    >>> from softrank.torch import isotonic_regression
    >>> isotonic_regression(torch.tensor([1.0, 3.0, 2.0, 4.0]))
    tensor([1.0000, 2.5000, 2.5000, 4.0000])
    """
    _no_jit()
    reg = check_regularization(regularization)
    moved, axis, dtype = _to_last(y, dim, "y")
    moved_weights = None
    if weights is not None:
        weights = _operand(weights, "weights", y, "y")
        if weights.shape != y.shape:
            raise ValueError(
                f"weights must have the shape of y {tuple(y.shape)}, got {tuple(weights.shape)}")
        moved_weights = weights if weights.dtype == dtype else weights.to(dtype)
        if axis != weights.dim() - 1:
            moved_weights = moved_weights.movedim(axis, -1)
    eager = moved.is_cpu and moved.numel() and _eager(moved) and (
        moved_weights is None or _eager(moved_weights))
    if weights is not None:
        # (The engine checks the weights it is given in the eager route: then
        # only a conversion to the compute dtype is checked here, for overflow
        # to inf and underflow to 0. Checked in torch, on the weights' device.)
        values = _known_values(weights)
        if values is not None and not (eager and values.dtype == dtype):
            if not bool(torch.all(torch.isfinite(values) & (values > 0))):
                raise ValueError(WEIGHTS_INVALID)
            if values.dtype != dtype:
                cast = values.to(dtype)
                if not bool(torch.all(torch.isfinite(cast))):
                    raise ValueError(weights_overflow(_dtype_name(dtype), torch.finfo(dtype).max))
                if not bool(torch.all(cast > 0)):
                    raise ValueError(weights_underflow(_dtype_name(dtype)))
    increasing = check_increasing(increasing)
    if eager:
        solution = _isotonic_eager(moved, moved_weights, increasing, reg)
    else:
        solution = _isotonic(moved, moved_weights, increasing, reg)[0]
    return _from_last(solution, axis, y.dtype)


def _isotonic_eager(y: Tensor, weights: Optional[Tensor], increasing: bool, reg: int) -> Tensor:
    """The solution by :class:`_EagerIsotonic`, or the engine alone where nothing needs a gradient."""
    shape = y.shape
    rows = _rows_of(y)
    weight_rows = None if weights is None else _rows_of(weights)
    if torch.is_grad_enabled() and (rows.requires_grad or (
            weight_rows is not None and weight_rows.requires_grad)):
        solution = _apply_isotonic_eager(rows, weight_rows, increasing, reg)
    else:
        solution = torch.from_numpy(_engine.engine().isotonic_forward(
            _host_array(rows), None if weight_rows is None else _host_array(weight_rows),
            increasing, reg)[0])
    return _unfold(solution, shape)


# TorchScript reads this attribute (for direct and recursive scripting) and
# raises with the message instead of compiling the function's Python.
for _public in (soft_rank, soft_sort, permutahedron_projection, soft_topk_mask, spearman,
                soft_quantile, soft_median, isotonic_regression):
    _public.__script_unsupported = _NO_JIT
