"""Owner-computes matrix functions (optimizers/distributed.py) on an 8-device mesh.

The sharded results are compared with the same function on one device (the
matrix functions themselves are tested against float64 references in
tests/test_linalg.py); the communication is read from the compiled program.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import rel_err
from bench.hlo import collectives
from optimizers import (
    clip_coordinatewise,
    hard_spectral_clip,
    orthogonalize,
    soft_spectral_clip,
    spectra_adamw,
)
from optimizers.distributed import map_matrix_leaves, matrix_view_spec, owner_computes
from optimizers.matrices import MatrixDims

AXES = [AxisType.Explicit, AxisType.Auto]
AXIS_IDS = ["explicit", "auto"]
FNS = {
    "soft": lambda x, c: soft_spectral_clip(x, c),
    "hard": lambda x, c: hard_spectral_clip(x, c),
    "orthogonalize": lambda x, c: orthogonalize(x * c),
}
# Stacked (a scanned leaf), separate leaves of equal shape, rectangular both ways, one
# leaf sharded along its stacked axis, a lone matrix (replicated by "auto").
SHAPES = [(8, 8, 16), (8, 16), (8, 16), (4, 16, 8), (8, 16, 8), (16, 8)]
SPECS = [P(None, "data", "model"), P("data", "model"), P("data", "model"), P(None, "model", "data"),
         P("data", None, "model"), P("model", "data")]


def mesh_of(axis_type, shape=(2, 4)):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)


def sample(shapes, seed=0, scale=3.0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [scale * jax.random.normal(k, s) / np.sqrt(s[-1])
          for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_owner_computes_equals_single_device(axis_type):
  """Soft and hard clips and orthogonalisation, default strategy."""
  mesh = mesh_of(axis_type)
  xs = sample(SHAPES)
  sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, SPECS, strict=True)]
  specs = None if axis_type == AxisType.Explicit else SPECS

  @jax.jit
  def run(xs, c):
    return {name: owner_computes(fn, xs, args=(c,), specs=specs) for name, fn in FNS.items()}

  out = run(sharded, jnp.float32(0.7))
  for name, fn in FNS.items():
    for x, y, spec in zip(xs, out[name], SPECS, strict=True):
      ref = jax.jit(fn)(x, jnp.float32(0.7))
      assert y.shape == x.shape and y.sharding.spec == spec
      assert rel_err(y, ref) <= 1e-6, (name, x.shape, rel_err(y, ref))


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_strategies(strategy):
  """Each strategy gives the single-device result; "owner" communicates by all-to-alls
  only (one in, one out per group, which XLA may combine), "replicate" by all-gathers."""
  mesh = mesh_of(AxisType.Auto)
  xs = sample(SHAPES, 4)
  fn = FNS["soft"]
  sharded = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, SPECS, strict=True)]
  run = jax.jit(lambda xs: owner_computes(fn, xs, args=(0.7,), specs=SPECS, strategy=strategy))
  for x, y in zip(xs, run(sharded), strict=True):
    assert rel_err(y, fn(x, 0.7)) <= 1e-6
  kinds = collectives(run.lower(sharded).compile().as_text())["by_kind"]
  if strategy == "owner":
    assert set(kinds) == {"all-to-all"} and kinds["all-to-all"]["count"] <= 2 * 3
  else:
    assert set(kinds) == {"all-gather"}


def test_groups_of_fewer_matrices_than_devices_are_packed():
  """Four groups of 4 stacked matrices of different shapes on 8 devices (the 4-layer
  transformer's shape): the default strategy gives every matrix one owner across
  groups, one all-to-all in and one out for all of them, of the largest owner load
  (blocks of 64, 64, 48, 32 elements: 8 x 64 one per device, then 48 on devices 0-3,
  32 on 4-7: 112 elements per device and source), not one padded round trip per group
  (2 x (64 + 64 + 48 + 32)); single-device results; fewer flops than padding, as no
  device computes a padding matrix. (Auto axes; the layout code after reading the specs
  is the same under Explicit ones.)"""
  mesh = mesh_of(AxisType.Auto, (4, 2))
  shapes = [(4, 16, 32), (4, 32, 16), (4, 16, 24), (4, 16, 16)]
  xs = sample(shapes, 7)
  spec = P(None, "data", "model")
  sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in xs]
  fn = FNS["soft"]
  runs = {strategy: jax.jit(lambda xs, c, strategy=strategy: owner_computes(
      fn, xs, args=(c,), specs=[spec] * len(xs), strategy=strategy))
      for strategy in ("auto", "owner")}
  c = jnp.float32(0.7)
  want = jax.jit(lambda xs, c: [fn(x, c) for x in xs])(xs, c)
  for x, y, ref in zip(xs, runs["auto"](sharded, c), want, strict=True):
    assert y.sharding.spec == spec
    assert rel_err(y, ref) <= 1e-6, (x.shape, rel_err(y, ref))
  compiled = {k: r.lower(sharded, c).compile() for k, r in runs.items()}
  kinds = collectives(compiled["auto"].as_text())["by_kind"]
  assert set(kinds) == {"all-to-all"}, kinds
  assert kinds["all-to-all"] == {"count": 2, "bytes": 2 * 8 * 112 * 4}, kinds
  padded = collectives(compiled["owner"].as_text())["by_kind"]["all-to-all"]
  assert padded["bytes"] == 2 * 8 * (64 + 64 + 48 + 32) * 4, padded
  flops = {k: c.cost_analysis()["flops"] for k, c in compiled.items()}
  assert flops["auto"] < 0.7 * flops["owner"], flops


def _spectral_update(ns_steps, mesh, params, specs, mode="soft"):
  tx = spectra_adamw(1e-2, max_singular_value=0.5, ns_steps=ns_steps, mode=mode,
                     param_specs=specs)
  shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  state = jax.eval_shape(tx.init, params)

  def update(p, g):
    return tx.update(g, tx.init(p), p)[0]

  del state
  return jax.jit(update, in_shardings=(shard, shard), out_shardings=shard)


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_spectra_adamw_sharded_equals_single_device(axis_type):
  """Stacked and unstacked leaves, rectangular both ways, soft and hard clips."""
  mesh = mesh_of(axis_type, (4, 2))
  shapes = {"stack": (4, 8, 16), "a": (16, 8), "b": (16, 8), "vec": (8,)}
  params = dict(zip(shapes, sample(list(shapes.values()), 1), strict=True))
  grads = dict(zip(shapes, sample(list(shapes.values()), 2, scale=50.0), strict=True))
  specs = {"stack": P(None, "data", "model"), "a": P("data", "model"), "b": P("model", "data"),
           "vec": P()}
  for mode in ("soft", "hard"):
    ref = _spectral_update(5, mesh, params, jax.tree.map(lambda _: P(), specs), mode)
    want = ref(params, grads)  # replicated: one device's computation on every device
    with jax.set_mesh(mesh):
      put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
      got = _spectral_update(5, mesh, params, specs, mode)(put(params), put(grads))
    for k in shapes:
      assert got[k].sharding.spec == specs[k]
      assert rel_err(got[k], want[k]) <= 1e-6, (mode, k, rel_err(got[k], want[k]))


def test_collectives_do_not_grow_with_ns_steps():
  """The compiled update holds the same collectives for 5 and 10 Newton–Schulz steps
  (one all-to-all in and one out for the stacked leaf and the matrix of the same shape
  together, at most scalar all-reduces), and no all-gather."""
  mesh = mesh_of(AxisType.Auto, (4, 2))
  params = {"stack": jnp.zeros((8, 16, 32)), "w": jnp.zeros((16, 32))}
  specs = {"stack": P(None, "data", "model"), "w": P("data", "model")}
  found = []
  for steps in (5, 10):
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, s)), params, specs)
    run = _spectral_update(steps, mesh, params, specs)
    text = run.lower(abstract, abstract).compile().as_text()
    found.append(collectives(text))
  assert found[0] == found[1]
  kinds = found[0]["by_kind"]
  assert set(kinds) <= {"all-to-all", "all-reduce"} and kinds["all-to-all"]["count"] == 2
  reduces = kinds.get("all-reduce", {"count": 0, "bytes": 0})
  assert reduces["bytes"] <= 8 * reduces["count"]  # scalars only


def test_gspmd_strategy_is_the_partitioners_path():
  """The "gspmd" strategy compiles to collectives inside the iterations (more of them
  with more steps): what the owner path avoids."""
  mesh = mesh_of(AxisType.Auto, (4, 2))
  x = jnp.zeros((8, 16, 32))
  shard = NamedSharding(mesh, P(None, "data", "model"))
  counts = []
  for steps in (5, 10):
    fn = functools.partial(soft_spectral_clip, ns_steps=steps)
    run = jax.jit(lambda x, fn=fn: owner_computes(lambda y, c: fn(y, c), [x], args=(1.0,),
                                                  strategy="gspmd")[0],
                  in_shardings=shard, out_shardings=shard)
    counts.append(collectives(run.lower(x).compile().as_text())["count"])
  assert counts[1] > counts[0] > 2


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_bad_input_falls_back_with_one_warning(axis_type):
  """A mesh axis that does not divide the matrix, and a sharded axis merged behind an
  unsharded one: correct results through the partitioner, one warning naming each leaf."""
  mesh = mesh_of(axis_type, (2, 4))
  leaves = sample([(6, 8), (2, 4, 8)], 3)
  dims = [MatrixDims(-2, -1), MatrixDims(-3, (-2, -1))]
  specs = [P("model", None), P(None, None, "model")]  # 4 does not divide 6; merged (4, 8)
  want = [soft_spectral_clip(x, 0.5) for x in (leaves[0], leaves[1].reshape(2, 32))]
  want[1] = want[1].reshape(2, 4, 8)
  with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    put = [jax.device_put(leaves[1], NamedSharding(mesh, specs[1]))]
    run = jax.jit(lambda xs: map_matrix_leaves(
        soft_spectral_clip, xs, dims, args=(0.5,), param_specs=specs,
        names=["odd", "merged"]))
    got = run([leaves[0], put[0]])
  messages = [str(w.message) for w in caught if "owner_computes" in str(w.message)]
  # Explicit axes: the types are authoritative, and the first leaf's type is unsharded.
  expected = ["merged"] if axis_type == AxisType.Explicit else ["odd", "merged"]
  assert len(messages) == len(expected), messages
  assert all(any(name in m for m in messages) for name in expected), messages
  for g, w in zip(got, want, strict=True):
    assert rel_err(g, w) <= 1e-6


def test_matrix_view_spec():
  assert matrix_view_spec(P("a", None, "b"), (4, 8, 16), MatrixDims(0, 2)) == (None, "a", "b")
  assert matrix_view_spec(P(None, "a"), (4, 8, 16), MatrixDims(-1, -2)) == (None, None, "a")
  assert matrix_view_spec(P("a", None, None), (4, 8, 16), MatrixDims(0, (1, 2))) == ("a", None)
  assert matrix_view_spec(P(None, None, "a"), (4, 8, 16), MatrixDims(0, (1, 2))) is None


def test_bad_arguments():
  with pytest.raises(ValueError, match="strategy"):
    owner_computes(orthogonalize, [jnp.eye(2)], strategy="fast")
  with pytest.raises(ValueError, match="specs"):
    owner_computes(orthogonalize, [jnp.eye(2)], specs=[None, None])
  with pytest.raises(ValueError, match="sharding_strategy"):
    spectra_adamw(1e-3, sharding_strategy="fast")


@pytest.mark.parametrize("axis_type", AXES, ids=AXIS_IDS)
def test_clip_coordinatewise_on_sharded_tree_gathers_nothing(axis_type):
  """The default method on a sharded tree is the tree-reduction search: the same
  threshold, clipped fraction and output as the exact sort on one device, and no
  all-gather or all-to-all in the compiled update, only scalar all-reduces: one over
  the whole mesh per search step (31 in float32) plus the maximum and the clipped
  count, however many leaves and however they are sharded (both axes, one, none)."""
  mesh = mesh_of(axis_type)
  grads = dict(zip("wvcb", sample([(16, 32), (4, 16, 8), (8, 12), (32,)], 5), strict=True))
  grads["c"] = grads["c"].at[1, 2].set(jnp.nan)  # NaN ranks as +inf and passes through
  specs = {"w": P("data", "model"), "v": P(None, "model", "data"), "c": P("data"),
           "b": P()}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), grads, specs)
  tx = clip_coordinatewise(0.1)
  run = jax.jit(lambda g: tx.update(g, tx.init(g)))
  out, state = run(sharded)
  exact = clip_coordinatewise(0.1, method="exact")
  want, want_state = exact.update(grads, exact.init(grads))
  assert float(state.threshold) == float(want_state.threshold)
  assert float(state.clip_fraction) == float(want_state.clip_fraction)
  for k in grads:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[k]))
  kinds = collectives(run.lower(sharded).compile().as_text())["by_kind"]
  assert set(kinds) <= {"all-reduce"}, kinds
  assert kinds["all-reduce"]["count"] <= 31 + 2, kinds
  assert kinds["all-reduce"]["bytes"] <= 8 * kinds["all-reduce"]["count"], kinds  # 2 int32


def test_collective_count_takes_a_conditionals_costliest_branch():
  """`bench.hlo.collectives` counts one execution: a `lax.cond` as its branch with the
  most collective bytes (one all-reduce of 64 floats, not the other branch's 16), the
  loop body once per trip; `bytes_all_branches` adds both branches."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))

  def body(x, pred):
    big = lambda v: jax.lax.psum(v, "x")
    small = lambda v: v.at[:4].set(jax.lax.psum(v[:4], "x"))
    y = jax.lax.cond(pred, big, small, x)
    return jax.lax.fori_loop(0, 3, lambda i, v: jax.lax.psum(v[:1], "x") + v, y)

  run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"),
                              check_vma=False))
  x = jax.ShapeDtypeStruct((8 * 64,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  pred = jax.ShapeDtypeStruct((), jnp.bool_)
  found = collectives(run.lower(x, pred).compile().as_text())
  assert found["by_kind"] == {"all-reduce": {"count": 1 + 3, "bytes": 4 * 64 + 3 * 4}}
  assert found["bytes_all_branches"] == 4 * (64 + 4) + 3 * 4


def test_transposed_groups_pack_with_the_others():
  """Groups whose rows and columns use the same mesh axes in the opposite order (a
  transposed view) pack into one owner round trip (one all-to-all each way) and give
  the single-device results."""
  mesh = mesh_of(AxisType.Auto, (2, 4))
  xs = {"a": np.asarray(jax.random.normal(jax.random.key(7), (2, 8, 16))),
        "b": np.asarray(jax.random.normal(jax.random.key(8), (3, 16, 8))),
        "c": np.asarray(jax.random.normal(jax.random.key(9), (8, 8)))}
  specs = {"a": P(None, "data", "model"), "b": P(None, "model", "data"), "c": P("model", "data")}
  ws = {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in xs.items()}
  names = list(xs)
  run = jax.jit(lambda ws: owner_computes(FNS["soft"], [ws[k] for k in names], args=(1.5,),
                                          specs=[specs[k] for k in names]))
  got = run(ws)
  for k, g in zip(names, got, strict=True):
    assert g.sharding.spec == specs[k]
    assert rel_err(g, FNS["soft"](jnp.asarray(xs[k]), 1.5)) <= 1e-6
  kinds = collectives(run.lower(ws).compile().as_text())["by_kind"]
  assert kinds == {"all-to-all": {"count": 2, "bytes": kinds["all-to-all"]["bytes"]}}, kinds
