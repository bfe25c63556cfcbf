"""softrank.jax on two (forced host) devices: batch sharding and shard_map.

Each test runs a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=2, so that this process
keeps its single device. References: the same call on the unsharded array
(and softrank.numpy); the compiled HLO text for where the work runs.
"""
from __future__ import annotations

import json
import os

import pytest

from child_python import run_python
from frameworks import require

jax = require("jax")
import softrank.jax as srj  # noqa: E402

SCRIPT = r"""
import json, re, sys
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import softrank.jax as srj
import softrank.numpy as srn

path, axis_type = sys.argv[1], sys.argv[2]
if path == "callback":
    srj._ffi_ready = lambda: False
assert len(jax.devices()) == 2
mesh = jax.make_mesh((2,), ("b",), axis_types=(getattr(AxisType, axis_type),))
x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
w = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
xs = jax.device_put(x, NamedSharding(mesh, P("b")))
report = {}

def fn(v):
    return srj.soft_rank(v, 0.5, regularization="kl")

def loss(v):
    return jnp.sum(w * srj.soft_sort(v, 0.5, regularization="kl"))

def hlo(f):
    text = f.lower(xs).compile().as_text()
    calls = [line for line in text.splitlines() if "custom_call_target=\"softrank_" in line]
    return {"calls": [re.search(r" = (.*?) custom-call\(", c).group(1)
                      + " " + re.search(r'custom_call_target="(\w+)"', c).group(1) for c in calls],
            "excerpt": calls,
            "collectives": sorted(set(re.findall(r"\b(all-gather|all-reduce|all-to-all|"
                                                 r"collective-permute)\(", text)))}

if path == "ffi":
    f = jax.jit(fn)
    report["forward"] = hlo(f)
    y = f(xs)
    report["forward_sharding"] = str(y.sharding.spec)
    report["forward_error"] = float(np.abs(np.asarray(y) - np.asarray(fn(x))).max())
    # sharded along the row: the rule gathers each row whole before the call
    xr = jax.device_put(x, NamedSharding(mesh, P(None, "b")))
    report["row_sharded_error"] = float(np.abs(np.asarray(f(xr)) - np.asarray(fn(x))).max())
    g = jax.jit(jax.grad(loss))
    report["grad"] = hlo(g)
    gy = g(xs)
    report["grad_sharding"] = str(gy.sharding.spec)
    report["grad_error"] = float(np.abs(np.asarray(gy) - srn.soft_sort_vjp(x, w, 0.5,
                                                                          regularization="kl")).max())

# grad inside shard_map and through it, with the default checks (check_vma=True)
want = np.asarray(jax.grad(lambda v: jnp.sum(fn(v) ** 2))(x))
inside = jax.jit(jax.shard_map(lambda v: jax.grad(lambda u: jnp.sum(fn(u) ** 2))(v), mesh=mesh,
                               in_specs=P("b"), out_specs=P("b")))
report["shard_map_inside_error"] = float(np.abs(np.asarray(inside(xs)) - want).max())
through = jax.jit(jax.grad(lambda v: jnp.sum(jax.shard_map(fn, mesh=mesh, in_specs=P("b"),
                                                           out_specs=P("b"))(v) ** 2)))
report["shard_map_through_error"] = float(np.abs(np.asarray(through(xs)) - want).max())
print(json.dumps(report))
"""


def _run(path: str, axis_type: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = run_python(SCRIPT, path, axis_type, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_batch_sharded_custom_calls_run_on_the_local_shard(axis_type):
    """jit of a batch-sharded (8, 16) array on two devices: every softrank
    custom call sees its (4, 16) shard, no collective moves data, the output
    stays sharded, and values and gradients equal the unsharded call."""
    if not srj._ffi_ready():
        pytest.skip("the compiled engine has no XLA FFI handlers")
    report = _run("ffi", axis_type)
    assert report["forward"]["calls"] == ["f32[4,16]{1,0} softrank_forward_value_v1"]
    assert sorted(report["grad"]["calls"]) == [
        "(f32[4,16]{1,0}, s32[4,16]{1,0}, s32[4,16]{1,0}) softrank_forward_v1",
        "f32[4,16]{1,0} softrank_vjp_v1"]
    assert report["forward"]["collectives"] == [] and report["grad"]["collectives"] == []
    assert report["forward_sharding"].startswith("P('b'")
    assert report["grad_sharding"].startswith("P('b'")
    assert report["forward_error"] == 0.0 and report["row_sharded_error"] == 0.0
    assert report["grad_error"] < 1e-5
    for key in ("shard_map_inside_error", "shard_map_through_error"):
        assert report[key] < 1e-5, key


def test_shard_map_on_the_callback_path():
    """The pure_callback path inside shard_map runs per shard, with vma checks."""
    report = _run("callback", "Auto")
    for key in ("shard_map_inside_error", "shard_map_through_error"):
        assert report[key] < 1e-5, key
