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

The second derivative ``soft_hvp`` has no CUDA core: its CUDA kernel is the
host round trip (copy to the host, CPU engine, copy back, which synchronises
with the stream), announced by one RuntimeWarning per process.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import Tensor

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def core() -> Optional[ModuleType]:
    """The compiled core (``softrank._C``) when it was built with CUDA, else None."""
    try:
        from softrank import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    compiled = getattr(_C, "cuda_compiled", None)
    return _C if compiled is not None and compiled() else None


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
        out = torch.empty_like(rows)
        perm = torch.empty(rows.shape, dtype=torch.int32, device=x.device)
        block_start = torch.empty_like(perm)
        if rows.numel():
            workspace = _workspace(cuda.cuda_soft_forward_workspace(dtype, count, n), x.device)
            with _launch(x.device) as stream:
                cuda.cuda_soft_forward(
                    dtype, rows.data_ptr(), count, n, op, reg, bool(descending), float(eps),
                    out.data_ptr(), perm.data_ptr(), block_start.data_ptr(),
                    workspace.data_ptr(), workspace.numel(), stream,
                )
        return out.view(x.shape), perm.view(x.shape), block_start.view(x.shape)

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
        result = torch.empty_like(rows)
        if rows.numel():
            workspace = _workspace(cuda.cuda_soft_product_workspace(dtype, count, n), device)
            with _launch(device) as stream:
                cuda.cuda_soft_product(
                    dtype, rows.data_ptr(), out_rows.data_ptr(), perm_rows.data_ptr(),
                    block_rows.data_ptr(), vector_rows.data_ptr(), count, n, op, reg,
                    bool(descending), float(eps), transpose, result.data_ptr(),
                    workspace.data_ptr(), workspace.numel(), stream,
                )
        return result.view(x.shape)

    return soft_product


_hvp_warned = False


def _host_hvp_kernel(host_kernel: Callable) -> Callable:
    def soft_hvp(*args):
        global _hvp_warned
        if not _hvp_warned:
            _hvp_warned = True
            warnings.warn(
                "softrank: soft_hvp (the second derivative of soft_rank / soft_sort, used by "
                "double backward and forward-over-reverse) has no CUDA core; CUDA tensors "
                "are copied to the host for it and the result copied back",
                RuntimeWarning,
                stacklevel=2,
            )
        return host_kernel(*args)

    return soft_hvp


def cuda_kernels(cuda: Optional[ModuleType], host_kernels: Dict[str, Callable]) -> Dict[str, Callable]:
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
        ``soft_forward``, ``soft_vjp`` and ``soft_jvp``, the host round trip
        with a one-time warning for ``soft_hvp``, and the host round trip for
        the rest (``projection_forward``, ``isotonic_forward``).
    """
    kernels = dict(host_kernels)
    if cuda is None:
        return kernels
    kernels["soft_forward"] = _forward_kernel(cuda)
    kernels["soft_vjp"] = _product_kernel(cuda, transpose=True)
    kernels["soft_jvp"] = _product_kernel(cuda, transpose=False)
    kernels["soft_hvp"] = _host_hvp_kernel(host_kernels["soft_hvp"])
    return kernels
