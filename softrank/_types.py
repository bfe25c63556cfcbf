"""Type aliases shared by the public signatures of every adapter."""
from __future__ import annotations

from typing import Literal

#: The regularization of the projection onto the permutahedron: quadratic or entropic.
Regularization = Literal["l2", "kl"]
#: ``"ascending"``: rank 1 is the smallest value and the soft sort is increasing.
Direction = Literal["ascending", "descending"]

__all__ = ["Regularization", "Direction"]
