"""The finite-difference Hessian that the torch tests compare with (tests/torch_fd.py).

Checked against a closed form, and for its refusal where a kink lies within reach.
"""
from __future__ import annotations

import pytest

from frameworks import require

torch = require("torch")
from torch_fd import fd_hessian  # noqa: E402


def test_fd_hessian_matches_a_closed_form_far_below_the_tests_tolerance():
    a = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    x = torch.tensor([0.3, -0.8, 1.1], dtype=torch.float64)

    def g(t):  # 40 * exp(a.t) + (t0 t1)^3 + 5 sin(t2)
        return 40.0 * torch.exp(a @ t) + (t[0] * t[1]) ** 3 + 5.0 * torch.sin(t[2])

    want = 40.0 * torch.exp(a @ x) * torch.outer(a, a)
    p, q = x[0].item(), x[1].item()
    want[0, 0] += 6 * p * q ** 3
    want[1, 1] += 6 * p ** 3 * q
    want[0, 1] += 9 * p ** 2 * q ** 2
    want[1, 0] += 9 * p ** 2 * q ** 2
    want[2, 2] += -5.0 * torch.sin(x[2])
    # the torch tests allow 1e-5 relative plus 1e-6; the reference is 100x inside it
    torch.testing.assert_close(fd_hessian(g, x), want, rtol=1e-7, atol=1e-8)


def test_fd_hessian_refuses_a_point_whose_stencil_reaches_a_kink():
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)

    def g(t, kink):  # the second derivative in t0 jumps from 0 to 2 at t0 = kink
        return torch.relu(t[0] - kink) ** 2 + t[1] ** 3

    # along one axis the coarse stencil reaches 4e-3 from x, the fine one 2e-3
    with pytest.raises(AssertionError, match="a kink of the function lies within 0.004"):
        fd_hessian(lambda t: g(t, 3e-3), x)
    torch.testing.assert_close(fd_hessian(lambda t: g(t, 4.5e-3), x),
                               torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=torch.float64),
                               rtol=1e-7, atol=1e-8)
