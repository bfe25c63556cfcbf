"""The CUDA kernels of softrank's torch operators: the CUDA core on device memory.

:mod:`softrank.torch` registers these as the ``CUDA`` kernels of
``softrank::soft_forward``, ``soft_vjp`` and ``soft_jvp`` where the compiled
core was built with CUDA (``softrank._C.cuda_compiled()``); see
:func:`cuda_kernels`. Each kernel:

- takes the operator's tensors (shape ``(..., n)``) as a C-contiguous
  ``(rows, n)`` block of float32 or float64 (int32 for ``perm`` and
  ``block_start``), the layout the CPU kernels hand the CPU engine;
- allocates its outputs (``out`` like ``x``; ``perm`` and ``block_start``
  int32, shaped like ``x``, as the fake kernels say) and its scratch space
  (a uint8 tensor) with ``torch.empty`` on ``x``'s device, so that memory
  comes from torch's caching allocator;
- enqueues the core's work on the current stream of ``x``'s device
  (``torch.cuda.current_stream(x.device)``) and returns without
  synchronising, as any torch CUDA operation.

The second derivative ``soft_hvp`` has no CUDA core of its own: its CUDA
kernel composes the CUDA ``soft_vjp`` / ``soft_jvp`` with torch operations
(:func:`composed_hvp`), so double backward stays on the GPU too.
"""
from __future__ import annotations

import contextlib
import math
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import Tensor

from softrank import _engine
from softrank._codes import OP_RANK, REG_L2

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def core() -> Optional[ModuleType]:
    """The compiled core (``softrank._C``) when it was built with CUDA and
    ``SOFTRANK_DISABLE_CUDA`` is not set, else None (:func:`softrank._engine.cuda_core`)."""
    return _engine.cuda_core()


@contextlib.contextmanager
def _launch(device: torch.device) -> Iterator[int]:
    """``device`` made current; yields the handle of its current stream (a cudaStream_t)."""
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def _rows(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``tensor`` (shape ``(..., n)``) as a C-contiguous ``(rows, n)`` tensor of ``dtype``."""
    tensor = tensor.to(device=device, dtype=dtype)
    if tensor.dim() != 2:
        tensor = tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])
    return tensor.contiguous()


def _dtype_name(x: Tensor) -> str:
    try:
        return _DTYPE_NAMES[x.dtype]
    except KeyError:
        raise TypeError(
            f"softrank's CUDA core computes float32 and float64, got {x.dtype} "
            "(softrank.torch.soft_rank / soft_sort compute float16 and bfloat16 in float32)"
        ) from None


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    return torch.empty((nbytes,), dtype=torch.uint8, device=device)


def _forward_kernel(cuda: ModuleType):
    def soft_forward(x, op, reg, descending, eps):
        dtype = _dtype_name(x)
        rows = _rows(x, x.dtype, x.device)
        count, n = rows.shape
        # Allocated in x's shape, C-contiguous: the (rows, n) memory the core
        # writes, returned as they are. (A view of a (rows, n) tensor would make
        # the outputs views, which autograd refuses to let a user modify in
        # place.)
        out = torch.empty(x.shape, dtype=rows.dtype, device=x.device)
        perm = torch.empty(x.shape, dtype=torch.int32, device=x.device)
        block_start = torch.empty_like(perm)
        if rows.numel():
            # (The size is the current device's: CUB's scratch and the schedule
            # depend on it, so it is asked with x's device made current.)
            with _launch(x.device) as stream:
                workspace = _workspace(
                    cuda.cuda_soft_forward_workspace(dtype, count, n), x.device
                )
                cuda.cuda_soft_forward(
                    dtype, rows.data_ptr(), count, n, op, reg, bool(descending), float(eps),
                    out.data_ptr(), perm.data_ptr(), block_start.data_ptr(),
                    workspace.data_ptr(), workspace.numel(), stream,
                )
        return out, perm, block_start

    return soft_forward


def _product_kernel(cuda: ModuleType, transpose: bool):
    def soft_product(x, out, perm, block_start, vector, op, reg, descending, eps):
        dtype = _dtype_name(x)
        device = x.device
        rows = _rows(x, x.dtype, device)
        count, n = rows.shape
        out_rows = _rows(out, x.dtype, device)
        perm_rows = _rows(perm, torch.int32, device)
        block_rows = _rows(block_start, torch.int32, device)
        vector_rows = _rows(vector, x.dtype, device)
        result = torch.empty(x.shape, dtype=rows.dtype, device=device)  # (not a view)
        if rows.numel():
            with _launch(device) as stream:
                workspace = _workspace(cuda.cuda_soft_product_workspace(dtype, count, n), device)
                cuda.cuda_soft_product(
                    dtype, rows.data_ptr(), out_rows.data_ptr(), perm_rows.data_ptr(),
                    block_rows.data_ptr(), vector_rows.data_ptr(), count, n, op, reg,
                    bool(descending), float(eps), transpose, result.data_ptr(),
                    workspace.data_ptr(), workspace.numel(), stream,
                )
        return result

    return soft_product


def composed_hvp(vjp: Callable, jvp: Callable) -> Callable:
    """``soft_hvp`` written with ``vjp`` and ``jvp`` kernels and torch operations.

    The engine's second derivative (``soft_hvp_row`` in csrc/softrank/soft_ops.h),
    expressed through the first derivatives, so that it runs wherever they do:

    - zero for l2, at ``eps = 0`` and for the rank at ``eps = inf``;
    - kl rank: ``J v = g r (v - vbar)`` per block (``r`` the soft ranks,
      ``vbar = sum_B r v / R_B``, ``g = +-1 / eps``, negative for a
      descending rank), and the engine's ``g^2 r (q - qbar)`` with ``q = (c -
      cbar) (t - tbar)`` is ``J[(J c) (J t) / r^2] / g``;
    - kl sort: ``sgn C_B p_k (t_k - tbar)`` is ``sgn (J^T c)_k (t_k - (J t)_i)``
      at column ``k = perm[i]`` (``sgn = +1`` for a descending sort, -1 for an
      ascending one);
    - NaN on a non-finite row (``block_start`` -1).
    """

    def soft_hvp(x, out, perm, block_start, cotangent, tangent, op, reg, descending, eps):
        params = (op, reg, descending, eps)
        out = out.to(device=x.device, dtype=x.dtype)  # (the rank's r^2 below is a torch op)
        state = (x, out, perm, block_start)
        cotangent = cotangent.to(device=x.device, dtype=x.dtype)
        tangent = tangent.to(device=x.device, dtype=x.dtype)
        # (an eps past the dtype's largest value is inf in the products: the rank's
        # second derivative, O(1 / eps^2), is 0 there, as the engine computes it)
        if reg == REG_L2 or eps == 0.0 or (op == OP_RANK and eps > torch.finfo(x.dtype).max):
            result = torch.zeros_like(x)
        elif op == OP_RANK:
            # 1 / g = sign * eps applied to J c before the product, as softrank.jax
            # does: J c and J t are O(g) each, so applying it after the outer jvp
            # passed through O(g^3), which overflowed (inf, then NaN) for tied
            # values at eps ~1e-13 in float32 and ~1e-104 in float64, where the
            # engine's g^2 result is finite.
            inverse_scale = -eps if descending else eps
            jc = jvp(*state, cotangent, *params) * inverse_scale
            jt = jvp(*state, tangent, *params)
            result = jvp(*state, jc * jt / (out * out), *params)
        else:
            index = perm.to(device=x.device, dtype=torch.int64)
            positions = torch.arange(index.shape[-1], device=x.device).expand_as(index)
            inverse = torch.empty_like(index).scatter_(-1, index, positions)
            t_bar = torch.gather(jvp(*state, tangent, *params), -1, inverse)
            result = vjp(*state, cotangent, *params) * (tangent - t_bar)
            if not descending:
                result = -result
        non_finite = block_start.to(x.device)[..., :1] < 0
        return torch.where(non_finite, torch.full_like(result, math.nan), result)

    return soft_hvp


def cuda_kernels(cuda: Optional[ModuleType],
                 host_kernels: Dict[str, Callable]) -> Dict[str, Callable]:
    """The CUDA kernel of each operator, by name.

    Parameters
    ----------
    cuda : module or None
        The compiled core built with CUDA (:func:`core`), or None.
    host_kernels : dict
        The host round-trip kernel of each operator (``softrank.torch``'s
        CPU kernels, which also accept CUDA tensors).

    Returns
    -------
    dict
        ``host_kernels`` where ``cuda`` is None. Otherwise the CUDA core for
        ``soft_forward``, ``soft_vjp`` and ``soft_jvp``, :func:`composed_hvp`
        of those two for ``soft_hvp``, and the host round trip for the rest
        (``projection_forward``, ``isotonic_forward``).
    """
    kernels = dict(host_kernels)
    if cuda is None:
        return kernels
    sees_a_gpu = _engine.CudaDeviceCheck(cuda, "torch", "CUDA tensors")
    for name, kernel in (("soft_forward", _forward_kernel(cuda)),
                         ("soft_vjp", _product_kernel(cuda, transpose=True)),
                         ("soft_jvp", _product_kernel(cuda, transpose=False))):
        kernels[name] = _on_the_core_where_it_sees_a_gpu(sees_a_gpu, kernel, host_kernels[name])
    kernels["soft_hvp"] = composed_hvp(kernels["soft_vjp"], kernels["soft_jvp"])
    return kernels


def _on_the_core_where_it_sees_a_gpu(sees_a_gpu: _engine.CudaDeviceCheck, kernel: Callable,
                                     host_kernel: Callable) -> Callable:
    def dispatch(*args):
        if not sees_a_gpu.answered and args[0].is_cuda:
            # (the core asks its current device: make it the tensor's, once)
            with torch.cuda.device(args[0].device):
                on_the_core = sees_a_gpu()
        else:
            on_the_core = sees_a_gpu()
        return (kernel if on_the_core else host_kernel)(*args)

    dispatch.__name__ = dispatch.__qualname__ = getattr(kernel, "__name__", "kernel")
    return dispatch
