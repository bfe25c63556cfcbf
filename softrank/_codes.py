"""The codes the engines, the bindings and the adapters share: one table.

The C++ core defines the same numbers in ``csrc/softrank/common.h`` (``enum
class Op`` and ``Reg``); ``softrank._C.codes()`` reports them and the test
suite checks that they equal this table, so a code cannot drift between the
core, the numba engine (which reads its constants from here) and the adapters.
"""
from __future__ import annotations

# Operators of the soft_forward / soft_vjp / ... engine calls.
OP_RANK = 0
OP_SORT = 1
OPERATORS = {"rank": OP_RANK, "sort": OP_SORT}

# Regularizations, by the name users pass.
REG_L2 = 0
REG_KL = 1
REGULARIZATIONS = {"l2": REG_L2, "kl": REG_KL}
