"""Smoke check of an installed wheel (cibuildwheel's test-command): the compiled
core loads and one soft rank at small eps equals the hard rank.

Run as a script, from any directory: ``python tests/wheel_smoke.py``.
"""
import numpy as np

import softrank
from softrank.numpy import soft_rank

x = np.array([[0.3, -1.2, 2.5, 0.0]])
ranks = soft_rank(x, eps=1e-3)
expected = np.argsort(np.argsort(x, axis=-1), axis=-1) + 1.0
assert softrank.backend() == "native", softrank.backend()
assert np.array_equal(ranks, expected), (ranks, expected)
print(f"softrank {softrank.__version__}: native core ({softrank.simd_level()}), soft_rank ok")
