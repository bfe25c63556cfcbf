"""Whether the installed jaxlib accepts the XLA FFI handlers softrank was built with.

The handlers in ``softrank._C`` are compiled against XLA's header-only FFI API
(vendored in ``csrc/third_party/xla_ffi``), whose version is
``softrank._C.xla_ffi_api_version``. XLA accepts a handler built against the
same major version and a minor version no newer than its own; the installed
jaxlib's version is read from the FFI headers it ships (``jax.ffi.include_dir()``).
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

Version = Tuple[int, int]


def jaxlib_ffi_api_version() -> Optional[Version]:
    """``(major, minor)`` of the installed jaxlib's XLA FFI API, or None if unknown."""
    try:
        import jax.ffi

        path = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
        with open(path, encoding="utf-8") as header:
            text = header.read()
    except (ImportError, AttributeError, OSError):
        return None
    major = re.search(r"#define\s+XLA_FFI_API_MAJOR\s+(\d+)", text)
    minor = re.search(r"#define\s+XLA_FFI_API_MINOR\s+(\d+)", text)
    if major is None or minor is None:
        return None
    return int(major.group(1)), int(minor.group(1))


def incompatibility(built: Version, runtime: Optional[Version]) -> Optional[str]:
    """Why handlers built against FFI API ``built`` cannot run on ``runtime``, or None.

    An unknown runtime version is taken as compatible: XLA itself then checks the
    version when the handlers are registered.
    """
    if runtime is None:
        return None
    if built[0] != runtime[0] or built[1] > runtime[1]:
        return (
            f"softrank._C was built against XLA FFI API {built[0]}.{built[1]}, but the "
            f"installed jaxlib speaks {runtime[0]}.{runtime[1]}; softrank.jax falls back to "
            "jax.pure_callback (same results, slower). Upgrade jaxlib or rebuild softrank "
            "with SOFTRANK_XLA_FFI_INCLUDE_DIR pointing at jax.ffi.include_dir()."
        )
    return None
