"""Low-rank methods on an 8-device mesh: the owner paths of optimizers/distributed.py.

dct_adamw (DCT selection and projection on whole rows), online_subspace_descent (the
online-PCA step on whole rows), subspace(..., svd_projector) (SVD on whole matrices) and
trion (DCT selection on whole rows, Newton–Schulz on whole projected matrices)
with sharded gradients must give the single-device updates (the single-device methods are
tested against float64 references in tests/test_lowrank_reference.py); map_rows and
owner_map are compared with the same functions on the global arrays.
"""

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import rel_err
from bench.hlo import collectives
from optimizers import (
    dct_adamw,
    dct_projector,
    online_subspace_descent,
    subspace,
    svd_projector,
    trion,
)
from optimizers.distributed import map_rows, owner_map, row_pmax, row_psum

AXES = [AxisType.Explicit, AxisType.Auto]
AXIS_IDS = ["explicit", "auto"]
# Mesh (data 2, model 4). Projected side (the smaller) and its sharding per leaf:
#   s: stacked (4, 8, 16): d = 8 rows over data, k = 16 columns over model (rows split 8 ways)
#   t: (16, 8): d = 8 columns over model, k = 16 rows over data (the other orientation)
#   u: (12, 8): k = 12 not divisible by 8 devices: rows all-gathered over model instead
#   v: (4, 8, 16) stacked axis over data, d = 8 rows unsharded: no relayout
#   b: a vector (plain Adam)
SHAPES = {"s": (4, 8, 16), "t": (16, 8), "u": (12, 8), "v": (4, 8, 16), "b": (16,)}
SPECS = {"s": P(None, "data", "model"), "t": P("data", "model"), "u": P("data", "model"),
         "v": P("data", None, "model"), "b": P("model")}
METHODS = {
    "dct_adamw": lambda specs: dct_adamw(1e-2, 3, param_specs=specs),
    "online_subspace_descent": lambda specs: online_subspace_descent(
        1e-2, 3, projector_learning_rate=0.1, init="dct", param_specs=specs),
    # the SVD start on whole matrices (owners), then the online-PCA steps on whole rows
    "online_subspace_descent_svd": lambda specs: online_subspace_descent(
        1e-2, 3, projector_learning_rate=0.1, init="svd", param_specs=specs),
    # SVD every 2 steps: the refresh (steps 0, 2) and the kept basis (step 1)
    "svd_subspace": lambda specs: optax.chain(
        subspace(optax.scale_by_adam(), svd_projector(3, update_every=2), param_specs=specs),
        optax.scale_by_learning_rate(1e-2)),
    # DCT every 2 steps: the kept indices project the sharded gradient (partial sums)
    "dct_subspace_every_2": lambda specs: optax.chain(
        subspace(optax.scale_by_adam(), dct_projector(3, update_every=2), param_specs=specs),
        optax.scale_by_learning_rate(1e-2)),
    # Newton–Schulz on the projected momenta (k x 3) on owner devices. The convergent
    # "quintic" coefficients: Muon's (the default) amplify the float32 rounding differences
    # of the sharded DCT (summation order) about tenfold, up to 1.3e-6 measured here.
    "trion": lambda specs: trion(2e-2, 3, ns_coeffs="quintic", param_specs=specs),
}
STEPS = 3


def mesh_of(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def gradients(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {n: jax.random.normal(k, s) for k, (n, s) in zip(keys, SHAPES.items(), strict=True)}


def run_steps(tx, params, grads_list, shard=None):
  """``STEPS`` jitted updates; returns the updates of every step and the compiled update."""
  put = (lambda t: t) if shard is None else (lambda t: jax.device_put(t, shard))
  mesh = None if shard is None else next(iter(shard.values())).mesh
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    params = put(params)
    state = jax.jit(tx.init)(params)

    def step(g, s, p):
      return tx.update(g, s, p)

    # The state keeps its placement from step to step (the partitioner may choose otherwise).
    keep = None if shard is None else (None, jax.tree.map(lambda x: x.sharding, state))
    compiled = jax.jit(step, out_shardings=keep).lower(put(grads_list[0]), state,
                                                       params).compile()
    out = []
    for g in grads_list:
      u, state = compiled(put(g), state, params)
      out.append(u)
  return out, compiled


@functools.cache
def single_device_updates(name):
  return run_steps(METHODS[name](None), gradients(100), [gradients(s) for s in range(STEPS)])[0]


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
@pytest.mark.parametrize("name", list(METHODS))
def test_sharded_updates_equal_single_device(name, axis_type):
  """rel err <= 1e-6 per leaf and step; the sharded program takes the owner path (an
  all-to-all: the gradient's rows made whole, or whole matrices), the single-device one
  has no collective."""
  mesh = mesh_of(axis_type)
  params = gradients(100)
  grads = [gradients(s) for s in range(STEPS)]
  ref = single_device_updates(name)
  shard = {n: NamedSharding(mesh, s) for n, s in SPECS.items()}
  specs = None if axis_type == AxisType.Explicit else SPECS
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback warning for these shardings
    got, compiled = run_steps(METHODS[name](specs), params, grads, shard)
  for t, (u, r) in enumerate(zip(got, ref, strict=True)):
    for n in SHAPES:
      assert u[n].shape == r[n].shape
      assert rel_err(u[n], r[n]) <= 1e-6, (name, t, n, rel_err(u[n], r[n]))
  kinds = collectives(compiled.as_text())["by_kind"]
  assert "all-to-all" in kinds, kinds


def test_trion_collectives_do_not_grow_with_ns_steps():
  """No collective inside trion's Newton–Schulz iterations: the compiled update (Auto
  axes, specs from ``param_specs``) holds the same collectives with 5 and 10 steps."""
  mesh = mesh_of(AxisType.Auto)
  shard = {n: NamedSharding(mesh, s) for n, s in SPECS.items()}
  figures = [collectives(run_steps(trion(2e-2, 3, ns_steps=k, param_specs=SPECS),
                                   gradients(100), [gradients(0)], shard)[1].as_text())
             for k in (5, 10)]
  assert figures[0]["by_kind"] == figures[1]["by_kind"], figures
  assert "all-to-all" in figures[0]["by_kind"], figures[0]


def test_gspmd_strategy_has_no_owner_path():
  """``sharding_strategy="gspmd"`` leaves the refresh to the partitioner (no all-to-all),
  with the same result."""
  mesh = mesh_of(AxisType.Auto)
  params, grads = gradients(100), [gradients(0)]  # the first step of the reference run
  shard = {n: NamedSharding(mesh, s) for n, s in SPECS.items()}
  plain, compiled = run_steps(dct_adamw(1e-2, 3, param_specs=SPECS, sharding_strategy="gspmd"),
                              params, grads, shard)
  assert "all-to-all" not in collectives(compiled.as_text())["by_kind"]
  ref = single_device_updates("dct_adamw")[0]
  for n in SHAPES:
    assert rel_err(plain[0][n], ref[n]) <= 1e-6


def test_bad_sharding_falls_back_with_a_warning():
  """A spec whose mesh axis does not divide the leaf: the partitioner's path, correct,
  one warning naming the leaf."""
  mesh = mesh_of(AxisType.Auto)
  params = {"w": jnp.ones((6, 8)), "ok": jnp.ones((16, 8))}
  grads = [{"w": jax.random.normal(jax.random.key(1), (6, 8)),
            "ok": jax.random.normal(jax.random.key(2), (16, 8))}]
  specs = {"w": P("model", None), "ok": P("data", "model")}  # 6 rows over 4 devices
  ref, _ = run_steps(dct_adamw(1e-2, 3), params, grads)
  shard = {"w": NamedSharding(mesh, P()), "ok": NamedSharding(mesh, specs["ok"])}
  with pytest.warns(UserWarning, match=r"\['w'\].*does not divide"):
    got, _ = run_steps(dct_adamw(1e-2, 3, param_specs=specs), params, grads, shard)
  for n in params:
    assert rel_err(got[0][n], ref[0][n]) <= 1e-6


def _rows_fn(rows, axis_name):
  """Per row a cumulative sum; the column sums and the largest magnitude, reduced."""
  amax = row_pmax(jnp.max(jnp.abs(rows), axis=(-2, -1)), axis_name)
  return jnp.cumsum(rows, -1), (row_psum(rows.sum(-2), axis_name), amax)


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_map_rows_equals_global(axis_type):
  """Split rows (k divisible by the 8 devices), gathered rows (k = 12), columns unsharded;
  against NumPy on the global arrays."""
  mesh = mesh_of(axis_type)
  cases = [((2, 16, 8), P(None, "data", "model")), ((12, 8), P("data", "model")),
           ((2, 8, 16), P("data", "model", None))]
  for i, (shape, spec) in enumerate(cases):
    x = np.asarray(jax.random.normal(jax.random.key(i), shape))
    w = jax.device_put(x, NamedSharding(mesh, spec))
    fn = jax.jit(lambda w, spec=spec: map_rows(
        _rows_fn, w, spec=None if axis_type == AxisType.Explicit else spec))
    cums, (cols, amax) = fn(w)
    np.testing.assert_allclose(cums, np.cumsum(x, -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cols, x.sum(-2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(amax, np.abs(x).max(axis=(-2, -1)), rtol=0)
    assert cums.sharding.spec[:-1] == spec[:-1] or axis_type == AxisType.Auto


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_owner_map_singular_values(strategy):
  """A group of 5 matrices on 8 devices (padded owner path) and a lone matrix; against
  NumPy's singular values; "owner" sends the matrices by all-to-all."""
  mesh = mesh_of(AxisType.Auto)
  xs = [np.asarray(jax.random.normal(jax.random.key(3), (5, 8, 12))),
        np.asarray(jax.random.normal(jax.random.key(4), (12, 8)))]
  specs = [P(None, "data", "model"), P("model", "data")]
  ws = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, specs, strict=True)]

  def top(a):
    return {"s": jnp.linalg.svd(a, compute_uv=False)[:, :3]}

  fn = jax.jit(lambda ws: owner_map(top, ws, specs=specs, strategy=strategy))
  out = fn(ws)
  for x, o in zip(xs, out, strict=True):
    ref = np.linalg.svd(x.astype(np.float64), compute_uv=False)[..., :3]
    np.testing.assert_allclose(o["s"], ref, rtol=1e-5)
  kinds = collectives(fn.lower(ws).compile().as_text())["by_kind"]
  assert ("all-to-all" in kinds) == (strategy == "owner"), kinds


def test_size_one_mesh_axis():
  """Matrix axes sharded only over a mesh axis of size 1 (Explicit): no collective, the
  functions run on the whole local matrices (their types still name the axis)."""
  mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  x = np.asarray(jax.random.normal(jax.random.key(5), (8, 16, 12)))
  w = jax.device_put(x, NamedSharding(mesh, P("model", "data", None)))

  @jax.jit
  def run(w):
    rows = map_rows(_rows_fn, w)
    (vals,) = owner_map(lambda a: jnp.linalg.svd(a, compute_uv=False), [w])
    return rows, vals

  (cums, (cols, _)), vals = run(w)
  np.testing.assert_allclose(cums, np.cumsum(x, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cols, x.sum(-2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vals, np.linalg.svd(x.astype(np.float64), compute_uv=False),
                             rtol=1e-5)
  assert collectives(run.lower(w).compile().as_text())["count"] == 0


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_owner_map_packs_groups_into_one_round_trip(axis_type):
  """Groups of other shapes whose matrix axes use the same mesh axes in either order (a
  transposed view) share one owner round trip: one all-to-all in, one all-gather of the
  results; each result equals NumPy's on the global matrix (float64 SVD)."""
  mesh = mesh_of(axis_type)
  shapes = [(4, 8, 12), (12, 8), (3, 16, 8), (2, 8, 8)]
  specs = [P(None, "data", "model"), P("model", "data"), P(None, "model", "data"),
           P(None, "data", "model")]
  xs = [np.asarray(jax.random.normal(jax.random.key(10 + i), s)) for i, s in enumerate(shapes)]
  ws = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, specs, strict=True)]

  def top(a):  # results of two shapes, neither the input's
    return {"s": jnp.linalg.svd(a, compute_uv=False)[:, :3], "col": (a * a).sum(-2)}

  with jax.set_mesh(mesh):
    fn = jax.jit(lambda ws: owner_map(top, ws, specs=specs))
    out = fn(ws)
    kinds = collectives(fn.lower(ws).compile().as_text())["by_kind"]
  for x, o in zip(xs, out, strict=True):
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(o["s"], np.linalg.svd(x64, compute_uv=False)[..., :3], rtol=1e-5)
    np.testing.assert_allclose(o["col"], (x64 * x64).sum(-2), rtol=1e-5)
  assert kinds == {"all-to-all": kinds["all-to-all"], "all-gather": kinds["all-gather"]}, kinds
  assert kinds["all-to-all"]["count"] == 1 and kinds["all-gather"]["count"] == 1, kinds


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
@pytest.mark.parametrize("name", ["svd_subspace", "online_subspace_descent_svd"])
def test_svd_of_every_leaf_in_one_round_trip(name, axis_type):
  """The SVD refresh (and the online-PCA SVD start) of all sharded leaves share one owner
  round trip per set of mesh axes of the matrix axes: s, t and u (data and model, in
  either order) one, v (model only) another. The SVD projector's bases come back as
  each device's rows of them (an all-to-all each way: 4 in all, no all-gather under
  Explicit axes: between refreshes the gradient is projected in its own sharding);
  the online-PCA start all-gathers its bases (2 all-to-alls). (Under Auto axes the
  partitioner also places this small test's moments by all-gathers of its own.)"""
  mesh = mesh_of(axis_type)
  shard = {n: NamedSharding(mesh, s) for n, s in SPECS.items()}
  specs = None if axis_type == AxisType.Explicit else SPECS
  _, compiled = run_steps(METHODS[name](specs), gradients(100), [gradients(0)], shard)
  kinds = collectives(compiled.as_text())["by_kind"]
  assert kinds["all-to-all"]["count"] == (4 if name == "svd_subspace" else 2), kinds
  if name == "svd_subspace" and axis_type == AxisType.Explicit:
    assert "all-gather" not in kinds, kinds


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_owner_map_split_results_by_column(axis_type):
  """split_results_by_column: each device receives only its rows of every matrix's
  ``n x r`` result, sharded like the matrix's columns (one all-to-all each way, no
  all-gather); the results span NumPy's float64 top right singular vectors. A function
  whose result does not start with the column axis is refused."""
  mesh = mesh_of(axis_type)
  shapes = [(4, 8, 12), (12, 8), (3, 16, 8)]
  specs = [P(None, "data", "model"), P("model", "data"), P(None, "model", "data")]
  xs = [np.asarray(jax.random.normal(jax.random.key(20 + i), s)) for i, s in enumerate(shapes)]
  ws = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, specs, strict=True)]

  def top(a):
    return jnp.linalg.svd(a, full_matrices=False)[2][..., :3, :].mT

  with jax.set_mesh(mesh):
    fn = jax.jit(lambda ws: owner_map(top, ws, specs=specs, split_results_by_column=True))
    out = fn(ws)
    kinds = collectives(fn.lower(ws).compile().as_text())["by_kind"]
    with pytest.raises(ValueError, match="split_results_by_column"):
      owner_map(lambda a: a[:, :2], ws, specs=specs, split_results_by_column=True)
  for x, o, spec in zip(xs, out, specs, strict=True):
    if axis_type == AxisType.Explicit:
      assert o.sharding.spec[-2] == spec[-1]
    v = np.asarray(o, np.float64)
    _, _, vh = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    want = np.swapaxes(vh[..., :3, :], -1, -2)
    np.testing.assert_allclose(v @ np.swapaxes(v, -1, -2), want @ np.swapaxes(want, -1, -2),
                               atol=1e-5)
  assert kinds == {"all-to-all": {"count": 2, "bytes": kinds["all-to-all"]["bytes"]}}, kinds
