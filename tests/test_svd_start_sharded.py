"""Online Subspace Descent's SVD start in a sharded scanned step on 8 CPU devices.

The step used to hang (most runs) in its first execution: jaxlib's CPU SVD of a stack of
matrices waits on chunks scheduled on XLA's intra-op pool, and with all 8 devices in it
at once no pool thread was left to run them. The SVD is now called one matrix at a time
on CPU (``optimizers/_lapack.py``). The sharded step runs in a subprocess under a timeout,
so that a regression fails instead of hanging the suite.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers._lapack import per_matrix

TIMEOUT_S = 240
# A scanned residual MLP (stacked layer weights, rows over `data`, columns over `model`),
# trained 3 steps with OSD(init="svd") on a 4 x 2 mesh and on one device. Prints the
# losses, the final params and bases, and the batch rank of every LAPACK call in the
# compiled sharded step and in a plain batched SVD of the same stack (the control).
DRIVER = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import optimizers as opt

def lapack_batch_dims(text):
  lines = [l for l in text.splitlines() if 'custom_call_target="lapack_' in l]
  return [int(m.group(1)) if (m := re.search(r'num_batch_dims="(\d+)"', l)) else 0
          for l in lines]

def run(devices):
  mesh = jax.make_mesh(devices, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:devices[0] * devices[1]])
  rng = np.random.default_rng(0)
  L, d = 2, 32
  params = {"w1": rng.standard_normal((L, d, 2 * d)) / d**0.5,
            "w2": rng.standard_normal((L, 2 * d, d)) / d**0.5}
  sh = NamedSharding(mesh, P(None, "data", "model"))
  params = jax.device_put({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, sh)
  x = jax.device_put(jnp.asarray(rng.standard_normal((16, d)), jnp.float32),
                     NamedSharding(mesh, P("data", None)))
  tx = opt.online_subspace_descent(1e-2, 4, init="svd")
  state = jax.jit(tx.init)(params)

  def loss(p, x):
    def layer(h, w):
      return h + jnp.tanh(h @ w[0]) @ w[1], None
    return jnp.mean(jax.lax.scan(layer, x, (p["w1"], p["w2"]))[0] ** 2)

  def step(p, s, x):
    value, g = jax.value_and_grad(loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  control = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False)).lower(params["w2"])
  losses = []
  for _ in range(3):
    params, state, value = compiled(params, state, x)
    losses.append(float(value))
  bases = [np.asarray(b).tolist() for b in jax.tree.leaves(state[0].projector_state.basis)]
  return {"losses": losses, "params": {k: np.asarray(v).tolist() for k, v in params.items()},
          "bases": bases, "batch_dims": lapack_batch_dims(compiled.as_text()),
          "control_batch_dims": lapack_batch_dims(control.compile().as_text())}

print("RESULT " + json.dumps({"mesh": run((4, 2)), "single": run((1, 1))}))
"""


def test_svd_start_sharded_scanned_step_completes_and_matches_one_device():
  root = Path(__file__).resolve().parent.parent
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
  try:
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=root, env=env, timeout=TIMEOUT_S,
                          capture_output=True, text=True)
  except subprocess.TimeoutExpired as e:  # the hang this guards against
    raise AssertionError(f"the sharded step did not finish in {TIMEOUT_S} s") from e
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  out = json.loads(line[len("RESULT "):])
  mesh, single = out["mesh"], out["single"]
  # the cause: every LAPACK call of the sharded step is on one matrix (no batch to split
  # over the pool); the check can fail: a plain SVD of the stack is batched
  assert mesh["batch_dims"] and set(mesh["batch_dims"]) == {0}, mesh["batch_dims"]
  assert set(mesh["control_batch_dims"]) == {1}, mesh["control_batch_dims"]
  # the same training on 8 devices as on one (up to the order of sharded sums)
  np.testing.assert_allclose(mesh["losses"], single["losses"], rtol=1e-5)
  assert mesh["losses"][2] < mesh["losses"][0]
  for k in mesh["params"]:
    np.testing.assert_allclose(mesh["params"][k], single["params"][k], rtol=1e-4, atol=1e-5)
  assert len(mesh["bases"]) == 2
  for a, b in zip(mesh["bases"], single["bases"], strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _svd(a):
  return jnp.linalg.svd(a, full_matrices=False)


def _lapack_batch_dims(text):
  lines = [line for line in text.splitlines() if 'custom_call_target="lapack_' in line]
  return [int(m.group(1)) if (m := re.search(r'num_batch_dims="(\d+)"', line)) else 0
          for line in lines]


def test_per_matrix_svd_equals_the_batched_call():
  rng = np.random.default_rng(1)
  for shape in [(2, 3, 5, 7), (4, 9, 6), (6, 4)]:  # two batch axes, one, none; both ways
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    got, want = jax.jit(lambda a: per_matrix(_svd, a))(x), _svd(x)
    for g, w in zip(got, want, strict=True):
      assert g.shape == w.shape
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))  # the same LAPACK call
    # one call per matrix in the CPU program (the batched call: a batch rank per lead axis)
    dims = _lapack_batch_dims(jax.jit(lambda a: per_matrix(_svd, a)).lower(x).compile().as_text())
    assert dims == [0], dims
    assert _lapack_batch_dims(jax.jit(_svd).lower(x).compile().as_text()) == [len(shape) - 2]


def test_per_matrix_under_explicit_axes_keeps_the_batched_shardings():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6, 8)), jnp.float32)
  x = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
  got = jax.jit(lambda a: per_matrix(_svd, a))(x)
  want = jax.jit(_svd)(x)
  for g, w in zip(got, want, strict=True):
    assert g.sharding.spec == w.sharding.spec
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
