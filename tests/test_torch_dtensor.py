"""softrank.torch on DTensors (torch.distributed.tensor): two gloo processes on CPU.

Every operator computes row by row along its dim: a DTensor replicated or
sharded along another dim gives the plain call's values and gradients, with
the input's placement kept; one sharded along the operator's dim is gathered
first (never ranked per shard). One spawn of two processes computes every
case; the tests below check its records.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import zlib

import pytest
from frameworks import require

torch = require("torch")
require("softrank.torch")

WORLD = 2
Q = [0.2, 0.5, 0.9]


def _operators():
    """{name: (function of (x, extra), extra's kind)}; extra is a second tensor argument."""
    import softrank.torch as st

    return {
        "soft_rank": lambda x, e, d: st.soft_rank(x, 0.7, dim=d),
        "soft_rank_kl_desc": lambda x, e, d: st.soft_rank(x, 0.7, regularization="kl",
                                                         direction="descending", dim=d),
        "soft_sort": lambda x, e, d: st.soft_sort(x, 0.7, dim=d),
        "soft_sort_kl": lambda x, e, d: st.soft_sort(x, 0.7, regularization="kl", dim=d),
        "soft_topk_mask": lambda x, e, d: st.soft_topk_mask(x, 2, 0.7, dim=d),
        "soft_topk_mask_kl": lambda x, e, d: st.soft_topk_mask(x, 2, 0.7, regularization="kl",
                                                               dim=d),
        "spearman": lambda x, e, d: st.spearman(x, e, 0.7, dim=d),
        "spearman_kl": lambda x, e, d: st.spearman(x, e, 0.7, regularization="kl", dim=d),
        "soft_quantile": lambda x, e, d: st.soft_quantile(x, 0.3, 0.7, dim=d),
        "soft_quantile_vector": lambda x, e, d: st.soft_quantile(x, Q, 0.7, regularization="kl",
                                                                 dim=d),
        "soft_median": lambda x, e, d: st.soft_median(x, 0.7, dim=d),
        "permutahedron_projection": lambda x, e, d: st.permutahedron_projection(x, dim=d),
        "permutahedron_projection_w": lambda x, e, d: st.permutahedron_projection(
            x, e, regularization="kl", dim=d),
        "isotonic_regression": lambda x, e, d: st.isotonic_regression(x, dim=d),
        "isotonic_regression_weights": lambda x, e, d: st.isotonic_regression(
            x, weights=e, increasing=False, dim=d),
    }


# name: (global shape, placement, operator dim, expected output placement per kind of output)
# Output kinds: "same" (shape of x), "reduced" (dim removed), "front" (len(q) in front, dim removed).
PLACEMENTS = {
    "replicate": ((4, 6), "R", -1, {"same": "R", "reduced": "R", "front": "R"}),
    "shard0": ((4, 6), ("S", 0), -1, {"same": ("S", 0), "reduced": ("S", 0), "front": ("S", 1)}),
    "shard0_3d": ((4, 3, 6), ("S", 0), -1,
                  {"same": ("S", 0), "reduced": ("S", 0), "front": ("S", 1)}),
    "shard1_3d": ((2, 4, 6), ("S", 1), -1,
                  {"same": ("S", 1), "reduced": ("S", 1), "front": ("S", 2)}),
    "shard0_dim1": ((4, 6, 3), ("S", 0), 1,
                    {"same": ("S", 0), "reduced": ("S", 0), "front": ("S", 1)}),
    # The operator's dim sharded: gathered, the result replicated.
    "ranked_last": ((4, 6), ("S", 1), -1, {"same": "R", "reduced": "R", "front": "R"}),
    "ranked_dim0": ((6, 4), ("S", 0), 0, {"same": "R", "reduced": "R", "front": "R"}),
}
OUTPUT_KIND = {"spearman": "reduced", "spearman_kl": "reduced", "soft_quantile": "reduced",
               "soft_median": "reduced", "soft_quantile_vector": "front"}
EXTRA = {"spearman", "spearman_kl", "permutahedron_projection_w", "isotonic_regression_weights"}


def _placement(spec):
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if spec == "R" else Shard(spec[1])


def _run_case(mesh, op, shape, spec, dim, extra_kind):
    """(forward max error, gradient max error, output placements, warnings) of one case."""
    import warnings

    from torch.distributed.tensor import DTensor, distribute_tensor

    g = torch.Generator().manual_seed(zlib.crc32(f"{op}{shape}".encode()))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    extra = None
    if op in EXTRA:
        if op == "permutahedron_projection_w":
            extra = torch.randn(shape[dim], generator=g, dtype=torch.float64)  # a shared 1-D w
        else:
            extra = torch.randn(*shape, generator=g, dtype=torch.float64).round()  # ties too
            if op == "isotonic_regression_weights":
                extra = extra.abs() + 0.5
    fn = _operators()[op]
    plain_x = x.clone().requires_grad_()
    plain = fn(plain_x, extra, dim)
    cotangent = torch.randn(plain.shape, generator=g, dtype=torch.float64)
    (plain * cotangent).sum().backward()

    placement = [_placement(spec)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dx = distribute_tensor(x, mesh, placement).requires_grad_()
        if extra is None:
            dextra = None
        elif extra_kind == "numpy":
            dextra = extra.numpy()
        elif extra.dim() == 1:
            dextra = distribute_tensor(extra, mesh, [_placement("R")])
        else:
            dextra = distribute_tensor(extra, mesh, placement)
        out = fn(dx, dextra, dim)
        assert isinstance(out, DTensor), type(out)
        (out * distribute_tensor(cotangent, mesh, out.placements)).sum().backward()
        full, grad = out.full_tensor(), dx.grad.full_tensor()
    return ((full - plain.detach()).abs().max().item(), (grad - plain_x.grad).abs().max().item(),
            [repr(p) for p in out.placements], [str(w.message) for w in caught])


def _refusals(mesh):
    """{argument: message} of a plain tensor passed with a DTensor input (and the reverse)."""
    import softrank.torch as st
    from torch.distributed.tensor import Replicate, distribute_tensor

    x = torch.randn(4, 6, dtype=torch.float64)
    dx = distribute_tensor(x, mesh, [Replicate()])
    messages = {}
    for name, call in (
        ("w", lambda: st.permutahedron_projection(dx, torch.arange(6.0))),
        ("target", lambda: st.spearman(dx, x)),
        ("weights", lambda: st.isotonic_regression(dx, weights=x.abs())),
        ("w_dtensor", lambda: st.permutahedron_projection(x, distribute_tensor(
            torch.arange(6.0), mesh, [Replicate()]))),
    ):
        try:
            call()
        except Exception as error:  # recorded: the tests check its type and message
            messages[name] = (type(error).__name__, str(error))
        else:
            messages[name] = None
    return messages


def _worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        records = {}
        for placement, (shape, spec, dim, _) in PLACEMENTS.items():
            for op in _operators():
                kinds = ("dtensor", "numpy") if op in EXTRA else (None,)
                for extra_kind in kinds:
                    key = (op, placement, extra_kind)
                    try:
                        records[key] = _run_case(mesh, op, shape, spec, dim, extra_kind)
                    except Exception as error:  # recorded: the test names it
                        records[key] = f"{type(error).__name__}: {error}"
        records["refusals"] = _refusals(mesh)
        with open(f"{out_path}.{rank}", "wb") as f:
            pickle.dump(records, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_distributed = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo unavailable")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("dtensor") / "records")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True)
    result = []
    for rank in range(WORLD):
        with open(f"{out_path}.{rank}", "rb") as f:
            result.append(pickle.load(f))
    return result


def _cases():
    names = ["soft_rank", "soft_rank_kl_desc", "soft_sort", "soft_sort_kl", "soft_topk_mask",
             "soft_topk_mask_kl", "spearman", "spearman_kl", "soft_quantile",
             "soft_quantile_vector", "soft_median", "permutahedron_projection",
             "permutahedron_projection_w", "isotonic_regression", "isotonic_regression_weights"]
    return [pytest.param(op, placement, kind, id=f"{op}-{placement}" + (f"-{kind}" if kind else ""))
            for placement in PLACEMENTS for op in names
            for kind in (("dtensor", "numpy") if op in EXTRA else (None,))]


@_distributed
@pytest.mark.parametrize("op, placement, extra_kind", _cases())
def test_dtensor_matches_plain_call(records, op, placement, extra_kind):
    expected = PLACEMENTS[placement][3][OUTPUT_KIND.get(op, "same")]
    expected = [repr(_placement(expected))]
    for rank, record in enumerate(records):
        result = record[op, placement, extra_kind]
        assert not isinstance(result, str), f"rank {rank}: {result}"
        forward_error, gradient_error, placements, caught = result
        assert forward_error <= 1e-12, (rank, forward_error)
        assert gradient_error <= 1e-12, (rank, gradient_error)
        assert placements == expected, (rank, placements)
        assert caught == [], (rank, caught)


@_distributed
@pytest.mark.parametrize("argument", ["w", "target", "weights"])
def test_plain_tensor_with_dtensor_is_refused(records, argument):
    for record in records:
        assert record["refusals"][argument] is not None, f"a plain {argument} was accepted"
        kind, message = record["refusals"][argument]
        assert kind == "TypeError", (kind, message)
        assert message.startswith(f"{argument} is a plain torch.Tensor but ")
        assert "is a DTensor" in message


@_distributed
def test_dtensor_with_plain_input_is_refused(records):
    for record in records:
        assert record["refusals"]["w_dtensor"] is not None
        kind, message = record["refusals"]["w_dtensor"]
        assert kind == "TypeError", (kind, message)
        assert message.startswith("w is a DTensor but z is a plain"), message


def test_import_does_not_import_dtensor():
    """torch.distributed.tensor is imported (and the strategies registered) only on use."""
    code = ("import sys, softrank.torch, torch; "
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.tensor')))")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "[]", out
