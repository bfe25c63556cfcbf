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


# Every operator, float64, on an array sharded along its batch axis ("batch",
# (4, 8) as P("b", None)) or along the sorted axis ("row": P(None, "b"); "row_1d":
# (8,) as P("b")): values, gradients and a second forward derivative under jit,
# each against the same call on the unsharded numpy array (eager); the output
# and gradient shardings; the collectives in the batch-sharded gradients.
OPERATORS_SCRIPT = r"""
import json, re, sys
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import softrank.jax as srj

axis_type, layout = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 2
mesh = jax.make_mesh((2,), ("b",), axis_types=(getattr(AxisType, axis_type),))
shape, spec = {"batch": ((4, 8), P("b", None)), "row": ((4, 8), P(None, "b")),
               "row_1d": ((8,), P("b"))}[layout]
rng = np.random.default_rng(0)
x = rng.normal(size=shape)
w = rng.normal(size=shape)
u = rng.uniform(0.5, 2.0, size=shape)
target = rng.integers(0, 3, size=shape)  # integers with ties
t = rng.normal(size=shape)  # the direction of the second derivative
xs = jax.device_put(x, NamedSharding(mesh, spec))

# name: (function, whether its output has x's shape)
ops = {
    "soft_rank": (lambda v: srj.soft_rank(v, 0.5, regularization="kl"), True),
    "soft_sort": (lambda v: srj.soft_sort(v, 0.5, regularization="kl"), True),
    "spearman": (lambda v: srj.spearman(v, w, 0.5), False),
    "spearman_int": (lambda v: srj.spearman(v, target, 0.5, regularization="kl"), False),
    "soft_topk_mask": (lambda v: srj.soft_topk_mask(v, 3, 0.5), True),
    "soft_topk_mask_kl": (lambda v: srj.soft_topk_mask(v, 3, 0.5, regularization="kl"), True),
    "permutahedron_projection": (lambda v: srj.permutahedron_projection(v, w), True),
    "permutahedron_projection_kl": (lambda v: srj.permutahedron_projection(
        v, w.reshape(-1, 8)[0], regularization="kl"), True),
    "isotonic_regression": (lambda v: srj.isotonic_regression(v), True),
    "isotonic_regression_kl": (lambda v: srj.isotonic_regression(  # weights unsharded
        v, weights=u, increasing=False, regularization="kl"), True),
    "soft_quantile": (lambda v: srj.soft_quantile(v, [0.2, 0.5, 0.9], 0.5,
                                                  regularization="kl"), False),
    "soft_median": (lambda v: srj.soft_median(v, 0.5), False),
}
report = {"errors": {}, "worst": {}, "shardings": {}, "collectives": {}}
for name, (fn, same_shape) in ops.items():
    def loss(v, fn=fn):
        return jnp.sum(jnp.cos(fn(v)))

    transforms = {
        "value": fn,
        "grad": jax.grad(loss),
        "second": lambda v, loss=loss: jax.jvp(
            lambda a: jax.jvp(loss, (a,), (t,))[1], (v,), (t,))[1],
    }
    for kind, g in transforms.items():
        key = name + "/" + kind
        try:
            want = np.asarray(g(x))
            got = jax.jit(g)(xs)
            report["worst"][key] = float(np.max(np.abs(np.asarray(got) - want))
                                         / max(1.0, float(np.max(np.abs(want)))))
            if kind == "grad" or (kind == "value" and same_shape):
                report["shardings"][key] = str(got.sharding.spec)
            if kind == "grad" and layout == "batch":
                text = jax.jit(g).lower(xs).compile().as_text()
                report["collectives"][key] = sorted(set(re.findall(
                    r"\b(all-gather|all-reduce|all-to-all|collective-permute)\(", text)))
        except Exception as exc:
            report["errors"][key] = type(exc).__name__ + ": " + str(exc).splitlines()[0][:300]
report["spec"] = str(xs.sharding.spec)
print(json.dumps(report))
"""


def _run(*args: str, script: str = SCRIPT) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = run_python(script, *args, env=env, timeout=600)
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


@pytest.mark.parametrize("layout", ["batch", "row", "row_1d"])
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_operators_on_a_sharded_array_equal_the_unsharded_call(axis_type, layout):
    """Every operator under jit on an array sharded along its batch axis or
    along the sorted axis (Explicit mesh axes: jax's gathers along a sharded
    axis raised ShardingTypeError): values, gradients and second forward
    derivatives equal the unsharded call to 1e-12 (float64); in Explicit
    mode the outputs of x's shape and the gradients keep x's sharding; a
    batch-sharded gradient of the XLA custom calls moves no data."""
    report = _run(axis_type, layout, script=OPERATORS_SCRIPT)
    assert report["errors"] == {}
    assert len(report["worst"]) == 12 * 3
    for key, worst in report["worst"].items():
        assert worst <= 1e-12, (key, worst)
    if axis_type == "Explicit":
        for key, spec in report["shardings"].items():
            assert spec == report["spec"], key
    if srj._ffi_ready():
        for key, collectives in report["collectives"].items():
            assert collectives == [], key
