"""Type stub of softrank._C, the native engine (C++ core). The contract of each
function is in softrank/_engine.py; arrays are C-contiguous 2-D (rows, n)."""
from typing import Any, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

_Float = np.floating[Any]
_Int32 = np.int32

def soft_forward(
    x: NDArray[_Float], op: int, reg: int, descending: bool, eps: float
) -> Tuple[NDArray[_Float], NDArray[_Int32], NDArray[_Int32]]: ...
def soft_forward_value(x: NDArray[_Float], op: int, reg: int, descending: bool, eps: float) -> NDArray[_Float]: ...
def soft_vjp(
    x: NDArray[_Float], out: NDArray[_Float], perm: NDArray[_Int32], block_start: NDArray[_Int32],
    cotangent: NDArray[_Float], op: int, reg: int, descending: bool, eps: float,
) -> NDArray[_Float]: ...
def soft_jvp(
    x: NDArray[_Float], out: NDArray[_Float], perm: NDArray[_Int32], block_start: NDArray[_Int32],
    tangent: NDArray[_Float], op: int, reg: int, descending: bool, eps: float,
) -> NDArray[_Float]: ...
def soft_hvp(
    x: NDArray[_Float], out: NDArray[_Float], perm: NDArray[_Int32], block_start: NDArray[_Int32],
    cotangent: NDArray[_Float], tangent: NDArray[_Float], op: int, reg: int, descending: bool,
    eps: float,
) -> NDArray[_Float]: ...
def isotonic_forward(
    y: NDArray[_Float], weights: Optional[NDArray[_Float]], increasing: bool
) -> Tuple[NDArray[_Float], NDArray[_Int32]]: ...
def isotonic_vjp(
    weights: Optional[NDArray[_Float]], block_start: NDArray[_Int32], cotangent: NDArray[_Float]
) -> NDArray[_Float]: ...
def set_num_threads(num_threads: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def xla_ffi_targets() -> dict[str, Any]: ...

xla_ffi_api_version: Tuple[int, int]
