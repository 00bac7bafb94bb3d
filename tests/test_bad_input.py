"""Bad input, for every public transformation: a clear error naming the problem, or the
documented behaviour (README, robustness table) -- never a crash deep inside XLA and
never a silent wrong answer.

Swept: wrong hyperparameters; integer and complex leaves; empty trees; ``None``
leaves; zero-size leaves; ``optax.MaskedNode`` leaves inside ``optax.masked`` and
``optax.partition``; missing or mismatched extra arguments (``grad_fn``,
``residual_fn``, ``aux_grads``, params); ranks larger than any dimension; SAF
indices outside the training set.
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import IDS, REGISTRY

import optimizers
import regularizers
from optimizers import MatrixDims

cases = pytest.mark.parametrize("case", REGISTRY, ids=IDS)
NUM_SAMPLES = 5


# ---------------------------------------------------------------------------
# Wrong hyperparameters: ValueError (TypeError for a non-number) naming the argument.
# ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_HYPERPARAMETERS = [
    # clip_coordinatewise
    (optimizers.clip_coordinatewise, {}, ValueError, "exactly one of fraction or threshold"),
    (optimizers.clip_coordinatewise, {"fraction": 0.1, "threshold": 1.0}, ValueError,
     "exactly one"),
    (optimizers.clip_coordinatewise, {"fraction": 1.0}, ValueError, "fraction"),
    (optimizers.clip_coordinatewise, {"fraction": -0.1}, ValueError, "fraction"),
    (optimizers.clip_coordinatewise, {"fraction": NAN}, ValueError, "fraction"),
    (optimizers.clip_coordinatewise, {"fraction": jnp.array(1.5)}, ValueError, "fraction"),
    (optimizers.clip_coordinatewise, {"fraction": "0.1"}, TypeError, "fraction"),
    (optimizers.clip_coordinatewise, {"threshold": 0.0}, ValueError, "threshold"),
    (optimizers.clip_coordinatewise, {"threshold": NAN}, ValueError, "threshold"),
    (optimizers.clip_coordinatewise, {"fraction": 0.1, "scale": 0.0}, ValueError, "scale"),
    (optimizers.clip_coordinatewise, {"fraction": 0.1, "scale": INF}, ValueError, "scale"),
    (optimizers.clip_coordinatewise, {"fraction": 0.1, "method": "sort"}, ValueError, "method"),
    (optimizers.clip_coordinatewise, {"fraction": 0.1, "bisect_steps": 0}, ValueError,
     "bisect_steps"),
    # spectral_clip, spectra_adamw
    (optimizers.spectral_clip, {"max_singular_value": 0.0}, ValueError, "max_singular_value"),
    (optimizers.spectral_clip, {"max_singular_value": INF}, ValueError, "max_singular_value"),
    (optimizers.spectral_clip, {"max_singular_value": NAN}, ValueError, "max_singular_value"),
    (optimizers.spectral_clip, {"max_singular_value": jnp.array(-1.0)}, ValueError,
     "max_singular_value"),
    (optimizers.spectral_clip, {"max_singular_value": 1.0, "mode": "soft_hard"}, ValueError,
     "mode"),
    (optimizers.spectral_clip, {"max_singular_value": 1.0, "ns_steps": 0}, ValueError,
     "ns_steps"),
    (optimizers.spectral_clip, {"max_singular_value": 1.0, "sign_steps": (8,)}, ValueError,
     "sign_steps"),
    (optimizers.spectra_adamw, {"learning_rate": 1e-3, "max_singular_value": -5.0}, ValueError,
     "max_singular_value"),
    (optimizers.spectra_adamw, {"learning_rate": 1e-3, "weight_decay": -0.1}, ValueError,
     "weight_decay"),
    (optimizers.spectra_adamw, {"learning_rate": 1e-3, "pre_clip": INF}, ValueError,
     "pre_clip"),
    # subspace, projectors, dct_adamw, online_subspace_descent
    (optimizers.subspace, {"inner": "adam", "projector": optimizers.dct_projector(2)},
     TypeError, "inner"),
    (optimizers.subspace, {"inner": optax.identity(), "projector": 2}, ValueError, "projector"),
    (optimizers.subspace, {"inner": optax.identity(), "projector": optimizers.dct_projector(2),
                           "scale": -1.0}, ValueError, "scale"),
    (optimizers.subspace, {"inner": optax.identity(), "projector": optimizers.dct_projector(2),
                           "side": "left"}, ValueError, "side"),
    (optimizers.subspace, {"inner": optax.identity(), "projector": optimizers.dct_projector(2),
                           "on_refresh": "drop"}, ValueError, "on_refresh"),
    (optimizers.dct_projector, {"rank": 0}, ValueError, "rank"),
    (optimizers.dct_projector, {"rank": 2.0}, ValueError, "rank"),
    (optimizers.dct_projector, {"rank": 2, "update_every": 0}, ValueError, "update_every"),
    (optimizers.dct_projector, {"rank": 2, "score": "l3"}, ValueError, "score"),
    (optimizers.svd_projector, {"rank": -1}, ValueError, "rank"),
    (optimizers.online_pca_projector, {"rank": 2, "learning_rate": NAN}, ValueError,
     "learning_rate"),
    (optimizers.online_pca_projector, {"rank": 2, "weight_decay": -1.0}, ValueError,
     "weight_decay"),
    (optimizers.online_pca_projector, {"rank": 2, "learning_rate": jnp.array(-1.0)},
     ValueError, "learning_rate"),
    (optimizers.dct_adamw, {"learning_rate": 1e-3, "rank": 0}, ValueError, "rank"),
    (optimizers.online_subspace_descent, {"learning_rate": 1e-3, "rank": 0}, ValueError, "rank"),
    (optimizers.online_subspace_descent,
     {"learning_rate": optax.constant_schedule(0.0), "rank": 2}, ValueError,
     "schedule_reference"),
    (optimizers.online_subspace_descent, {"learning_rate": 1e-3, "rank": 2, "init": "random"},
     ValueError, "init"),
    (optimizers.online_subspace_descent, {"learning_rate": 1e-3, "rank": 2, "nu_dtype": "int8"},
     ValueError, "nu_dtype"),
    (optimizers.dct_adamw, {"learning_rate": 1e-3, "rank": 2, "mu_dtype": jnp.int32},
     ValueError, "mu_dtype"),
    (optimizers.scale_by_trion, {"rank": 2, "momentum": 1.0}, ValueError, "momentum"),
    (optimizers.scale_by_trion, {"rank": 2, "ns_coeffs": "cubic"}, ValueError, "ns_coeffs"),
    (optimizers.trion, {"learning_rate": 0.02, "rank": 2, "sharding_strategy": "fast"},
     ValueError, "sharding_strategy"),
    (optimizers.trion, {"learning_rate": 0.02, "rank": 0}, ValueError, "rank"),
    (optimizers.trion, {"learning_rate": 0.02, "rank": 2, "score": "l3"}, ValueError, "score"),
    # scale_by_sven, sven
    (optimizers.scale_by_sven, {"rank": 0}, ValueError, "rank"),
    (optimizers.scale_by_sven, {"rank": 2, "rtol": -1e-3}, ValueError, "rtol"),
    (optimizers.scale_by_sven, {"rank": 2, "method": "qr"}, ValueError, "method"),
    (optimizers.scale_by_sven, {"rank": 2, "method": "svd", "microbatch_size": 2}, ValueError,
     "microbatch_size"),
    (optimizers.scale_by_sven, {"rank": 2, "rms_decay": 1.0}, ValueError, "rms_decay"),
    (optimizers.sven, {"learning_rate": 0.1, "rank": 2, "oversampling": -1}, ValueError,
     "oversampling"),
    # clipped Adam
    (optimizers.clipped_adamw, {"learning_rate": 1e-3, "clip_fraction": 1.0}, ValueError,
     "clip_fraction"),
    (optimizers.clipped_adamw, {"learning_rate": 1e-3, "clip_fraction": 0.1,
                                "weight_decay": -1.0}, ValueError, "weight_decay"),
    (optimizers.scale_by_clipped_adam, {"clip_fraction": 0.1, "b2": 1.0}, ValueError, "b2"),
    # sam
    (regularizers.sam, {"rho": -0.1}, ValueError, "rho"),
    (regularizers.sam, {"rho": INF}, ValueError, "rho"),
    (regularizers.sam, {"rho": jnp.array(-0.1)}, ValueError, "rho"),
    (regularizers.sam, {"rho": 0.05, "eta": -1.0}, ValueError, "eta"),
    (regularizers.sam, {"rho": 0.05, "p": 1.0}, ValueError, "p"),
    # surgery
    (regularizers.bloop, {"aux_weight": -0.1}, ValueError, "aux_weight"),
    (regularizers.bloop, {"aux_weight": INF}, ValueError, "aux_weight"),
    (regularizers.bloop, {"aux_weight": jnp.array(-1.0)}, ValueError, "aux_weight"),
    (regularizers.bloop, {"aux_weight": 0.1, "decay": 1.0}, ValueError, "decay"),
    (regularizers.bloop, {"aux_weight": 0.1, "eps": -1e-12}, ValueError, "eps"),
    (regularizers.bloop, {"aux_weight": 0.1, "projection": "local"}, ValueError, "projection"),
    (regularizers.bloop, {"aux_weight": 0.1, "ema_order": "during"}, ValueError, "ema_order"),
    (regularizers.mixed, {"aux_weight": NAN}, ValueError, "aux_weight"),
    (regularizers.pcgrad, {"aux_weight": -1.0}, ValueError, "aux_weight"),
    (regularizers.dynamic_barrier, {"aux_weight": INF}, ValueError, "aux_weight"),
    (regularizers.bloop, {"aux_weight": 0.1, "ema_init": "ones"}, ValueError, "ema_init"),
    (regularizers.bloop, {"aux_weight": 0.1, "rescale": "yes"}, ValueError, "rescale"),
    (regularizers.pcgrad, {"aux_weight": 0.1, "decay": 1.0}, ValueError, "decay"),
    (regularizers.dynamic_barrier, {"aux_weight": 0.1, "decay": 0.9, "ema_init": "x"},
     ValueError, "ema_init"),
    (regularizers.perp_grad, {"rescale": 1}, ValueError, "rescale"),
    # loss-side regularisers
    (regularizers.saf, {"num_examples": 0, "num_classes": 3}, ValueError, "num_examples"),
    (regularizers.saf, {"num_examples": 4, "num_classes": 3, "lag": 0}, ValueError, "lag"),
    (regularizers.saf, {"num_examples": 4, "num_classes": 3, "temperature": 0.0}, ValueError,
     "temperature"),
    (regularizers.mesa, {"decay": 1.5}, ValueError, "decay"),
    (regularizers.mesa, {"weight": -1.0}, ValueError, "weight"),
]


@pytest.mark.parametrize(
    "factory, kwargs, error, match", BAD_HYPERPARAMETERS,
    ids=[f"{f.__name__}-{'-'.join(map(str, k))}" for f, k, *_ in BAD_HYPERPARAMETERS],
)
def test_wrong_hyperparameters_raise_naming_the_argument(factory, kwargs, error, match):
  with pytest.raises(error, match=match):
    factory(**kwargs)


def test_every_factory_has_a_bad_hyperparameter_case():
  """The sweep above covers every public factory of the registry that has arguments."""
  swept = {factory for factory, *_ in BAD_HYPERPARAMETERS}
  missing = {c.factory.__name__ for c in REGISTRY
             if c.factory not in swept and inspect.signature(c.factory).parameters}
  assert not missing, f"no bad-hyperparameter case for {sorted(missing)}"


def test_invalid_threshold_from_a_schedule_raises_at_update():
  tx = optimizers.spectral_clip(lambda count: -1.0)
  with pytest.raises(ValueError, match="max_singular_value"):
    tx.update({"w": jnp.ones((2, 3))}, tx.init(None))


# ---------------------------------------------------------------------------
# Harness for small trees of any structure.
# ---------------------------------------------------------------------------


def residual_fn(params):
  """Per-sample residuals from the leaves "w" (4, 6) and "b" (6,) only, so that extra
  leaves (None, zero-size, masked) do not change the problem."""
  h = jnp.tanh(params["w"].astype(jnp.float32)) @ jnp.cos(jnp.arange(6.0 * NUM_SAMPLES)
                                                           ).reshape(6, NUM_SAMPLES)
  return jnp.sum(h, axis=0) + params["b"].astype(jnp.float32)[:NUM_SAMPLES] - 0.5


def loss_fn(params):
  """Least squares on the residuals plus a small weight decay on every leaf."""
  decay = sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(params))
  return 0.5 * jnp.sum(residual_fn(params) ** 2) + 0.1 * decay


grad_fn = jax.grad(loss_fn)


def extras_for(params) -> dict:
  return {
      "grad_fn": grad_fn,
      "residual_fn": residual_fn,
      "aux_grads": jax.tree.map(lambda x: 2.0 * (x - 0.3), params),
  }


def small_params(dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(7)
  return {"w": jnp.asarray(rng.standard_normal((4, 6)) / 2, jnp.float32).astype(dtype),
          "b": jnp.asarray(rng.standard_normal(6) / 2, jnp.float32).astype(dtype)}


def one_update(tx, params, grads=None):
  grads = grad_fn(params) if grads is None else grads
  return tx.update(grads, tx.init(params), params, **extras_for(params))


FIRST_CASE_PER_FACTORY = list({c.factory: c for c in reversed(REGISTRY)}.values())[::-1]
factories = pytest.mark.parametrize("case", FIRST_CASE_PER_FACTORY,
                                    ids=[c.factory.__name__ for c in FIRST_CASE_PER_FACTORY])


# ---------------------------------------------------------------------------
# Integer and complex leaves: TypeError naming the leaf and its dtype.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=["int32", "complex64"])
@cases
def test_integer_and_complex_leaves_raise_type_error(case, dtype):
  params = {"w": jnp.ones((4, 6), dtype), "b": jnp.ones(6, jnp.float32)}
  tx = case.make()
  with pytest.raises(TypeError, match=rf"\['w'\] has dtype {jnp.dtype(dtype).name}"):
    tx.update(params, tx.init(params), params, **extras_for(params))


# ---------------------------------------------------------------------------
# Empty trees, None leaves, zero-size leaves, MaskedNode leaves.
# ---------------------------------------------------------------------------


@cases
def test_empty_tree_gives_empty_updates(case):
  """Documented: an empty tree passes through (no parameters, nothing to do)."""
  tx = case.make()
  state = tx.init({})
  for _ in range(2):
    updates, state = tx.update({}, state, {}, grad_fn=lambda p: p, aux_grads={},
                               residual_fn=lambda p: jnp.zeros(NUM_SAMPLES))
    assert updates == {}


@factories
def test_none_and_zero_size_leaves_pass_through_and_change_nothing(case):
  """Documented: ``None`` leaves stay ``None``, zero-size leaves come back as they are,
  and the other leaves get exactly the update they get without them."""
  params = small_params()
  expected, _ = one_update(case.make(), params)
  extended = {**params, "z": jnp.zeros((0, 6)), "n": None}
  got, state = one_update(case.make(), extended)
  assert got["n"] is None and got["z"].shape == (0, 6)
  chex.assert_trees_all_close({k: got[k] for k in params}, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3)], ids=str)
def test_spectral_functions_return_zero_size_matrices_as_is(shape):
  x = jnp.zeros(shape)
  for f in (optimizers.soft_spectral_clip, optimizers.hard_spectral_clip):
    assert f(x, 1.0).shape == shape
    with pytest.raises(ValueError, match="max_singular_value"):
      f(x, -1.0)
  assert optimizers.orthogonalize(x).shape == shape


NEEDS_FULL_PARAMS = (regularizers.sam, optimizers.scale_by_sven, optimizers.sven)


@pytest.mark.parametrize("wrapper", ["masked", "partition"])
@factories
def test_masked_and_partitioned_leaves(case, wrapper):
  """Inside ``optax.masked``/``optax.partition`` the unmasked leaves get exactly the
  update of the transform run on them alone (Bloop & co. mask ``aux_grads`` like the
  updates); SAM and Sven, which evaluate the model at the full params, raise."""
  params = small_params()
  full = {**params, "x": jnp.ones((3, 3))}
  if wrapper == "masked":
    tx = optax.masked(case.make(), {"w": True, "b": True, "x": False})
  else:
    tx = optax.partition({"on": case.make(), "off": optax.set_to_zero()},
                         {"w": "on", "b": "on", "x": "off"})
  if case.factory in NEEDS_FULL_PARAMS:
    with pytest.raises(ValueError, match="cannot run inside optax.masked or optax.partition"):
      one_update(tx, full)
    return
  got, _ = one_update(tx, full)
  expected, _ = one_update(case.make(), params)
  chex.assert_trees_all_close({k: got[k] for k in params}, expected, rtol=1e-6, atol=1e-7)
  untouched = grad_fn(full)["x"] if wrapper == "masked" else jnp.zeros((3, 3))
  chex.assert_trees_all_equal(got["x"], untouched)


# ---------------------------------------------------------------------------
# Missing or mismatched extra arguments.
# ---------------------------------------------------------------------------

SURGERY = [regularizers.bloop, regularizers.mixed, regularizers.pcgrad,
           regularizers.dynamic_barrier]


@pytest.mark.parametrize("factory", SURGERY, ids=lambda f: f.__name__)
def test_aux_grads_missing_or_mismatched(factory):
  params = small_params()
  g = grad_fn(params)
  tx = factory(0.5)
  state = tx.init(params)
  with pytest.raises(ValueError, match="requires the keyword argument aux_grads"):
    tx.update(g, state)
  with pytest.raises(ValueError, match="aux_grads must have the same tree structure"):
    tx.update(g, state, aux_grads={"w": g["w"]})
  with pytest.raises(ValueError, match=r"aux_grads\['w'\] is float32\[6, 4\]"):
    tx.update(g, state, aux_grads={**g, "w": g["w"].T})
  with pytest.raises(ValueError, match=r"aux_grads\['b'\] is bfloat16\[6\]"):
    tx.update(g, state, aux_grads={**g, "b": g["b"].astype(jnp.bfloat16)})
  with pytest.raises(ValueError, match="aux_grads must have the same tree structure"):
    tx.update(g, state, aux_grads=[g["w"], g["b"]])


def test_sam_grad_fn_and_params_mismatched():
  params = small_params()
  g = grad_fn(params)
  tx = regularizers.sam(0.05)
  state = tx.init(params)
  with pytest.raises(ValueError, match="requires the keyword argument grad_fn"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="requires params"):
    tx.update(g, state, grad_fn=grad_fn)
  with pytest.raises(ValueError, match="grad_fn returned a tree"):
    tx.update(g, state, params, grad_fn=lambda p: {"w": p["w"]})
  with pytest.raises(ValueError, match=r"grad_fn\(params\)\['w'\] is float32\[6\]"):
    tx.update(g, state, params, grad_fn=lambda p: {**grad_fn(p), "w": p["w"][0]})
  with pytest.raises(ValueError, match=r"params\['w'\] is float32\[6\]"):
    tx.update(g, state, {**params, "w": params["w"][0]}, grad_fn=grad_fn)
  with pytest.raises(ValueError, match="params must have the same tree structure"):
    tx.update(g, state, {"w": params["w"]}, grad_fn=grad_fn)


def test_perp_grad_params_missing_or_mismatched():
  params = small_params()
  g = grad_fn(params)
  tx = regularizers.perp_grad()
  with pytest.raises(ValueError, match="requires params"):
    tx.update(g, tx.init(params))
  with pytest.raises(ValueError, match=r"params\['w'\] is float32\[6\]"):
    tx.update(g, tx.init(params), {**params, "w": params["w"][0]})


@pytest.mark.parametrize("factory", [optimizers.scale_by_sven, optimizers.sven],
                         ids=lambda f: f.__name__)
def test_sven_residual_fn_missing_or_malformed(factory):
  params = small_params()
  g = grad_fn(params)
  tx = factory(2) if factory is optimizers.scale_by_sven else factory(0.1, 2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="exactly one of the keyword arguments residual_fn.*"
                                       "example_residual_fn"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="requires params"):
    tx.update(g, state, residual_fn=residual_fn)
  for bad in (lambda p: p["w"], lambda p: jnp.sum(p["w"]), lambda p: p["w"][:0, 0]):
    with pytest.raises(ValueError, match="1-D array of per-sample residuals"):
      tx.update(g, state, params, residual_fn=bad)
  with pytest.raises(TypeError, match="real-valued outputs"):
    tx.update(g, state, params, residual_fn=lambda p: jnp.ones(NUM_SAMPLES, jnp.int32))


def test_weight_dimension_numbers_mismatched():
  g = grad_fn(small_params())
  for factory in (optimizers.spectral_clip, lambda weight_dimension_numbers: optimizers.subspace(
      optax.identity(), optimizers.dct_projector(2),
      weight_dimension_numbers=weight_dimension_numbers)):
    kwargs = {"max_singular_value": 1.0} if factory is optimizers.spectral_clip else {}
    tx = factory(weight_dimension_numbers={"v": MatrixDims()}, **kwargs)
    with pytest.raises(ValueError, match="weight_dimension_numbers must be"):
      tx.update(g, tx.init(g))
  tx = optimizers.spectral_clip(1.0, weight_dimension_numbers=MatrixDims(0, 2))
  with pytest.raises(ValueError, match="out of range"):
    tx.update(g, tx.init(g))
  tx = optimizers.spectral_clip(1.0, weight_dimension_numbers=MatrixDims(0, 0))
  with pytest.raises(ValueError, match="must be distinct"):
    tx.update(g, tx.init(g))


# ---------------------------------------------------------------------------
# Ranks larger than any dimension: clamped (documented), same result as the largest rank.
# ---------------------------------------------------------------------------

PROJECTORS = {
    "dct": optimizers.dct_projector,
    "svd": lambda r: optimizers.svd_projector(r, update_every=2),
    "online_pca": optimizers.online_pca_projector,
}


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_subspace_rank_above_every_dimension_is_clamped(name):
  params = small_params()
  big = optimizers.subspace(optax.scale_by_adam(), PROJECTORS[name](1000))
  exact = optimizers.subspace(optax.scale_by_adam(), PROJECTORS[name](4))  # min(4, 6)
  got, got_state = one_update(big, params)
  expected, expected_state = one_update(exact, params)
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal_shapes(got_state, expected_state)


def test_sven_rank_above_the_number_of_residuals():
  params = small_params()
  got, state = one_update(optimizers.scale_by_sven(50), params)
  expected, expected_state = one_update(optimizers.scale_by_sven(NUM_SAMPLES), params)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  assert state.singular_values.shape == (50,)
  np.testing.assert_array_equal(state.singular_values[NUM_SAMPLES:], 0.0)
  assert int(state.effective_rank) == int(expected_state.effective_rank) <= NUM_SAMPLES


# ---------------------------------------------------------------------------
# SAF: indices outside [0, N) never alias another example.
# ---------------------------------------------------------------------------


def test_saf_indices_outside_the_training_set_are_ignored():
  reg = regularizers.saf(num_examples=4, num_classes=3, lag=1, start_epoch=1)
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)), jnp.float32)
  state = reg.record(reg.init(), logits, jnp.array([0, 4, -1]), 0)
  np.testing.assert_array_equal(state.epochs[0], [0, *[np.iinfo(np.int32).min] * 3])
  full = reg.record(reg.init(), logits, jnp.array([0, 1, 2]), 0)
  now = logits[::-1] * 2.0
  # index 4 and -1 have no record: only example 0 counts, as if they were not in the batch
  expected = reg.loss(full, now[:1], jnp.array([0]), 1)
  assert float(expected) > 0
  for outside in ([0, 4, 5], [0, -1, -4]):
    np.testing.assert_allclose(reg.loss(full, now, jnp.array(outside), 1), expected, rtol=1e-6)
  with pytest.raises(TypeError, match="indices must be integers"):
    reg.loss(full, now, jnp.array([0.0, 1.0, 2.0]), 1)
  with pytest.raises(ValueError, match="indices must have shape"):
    reg.record(full, now, jnp.array([0, 1]), 1)


def test_full_optimizers_reject_int_params_before_adam():
  """Adam would turn an int32 gradient into float updates cast back onto int params."""
  params = {"w": jnp.ones((4, 6), jnp.int32)}
  for factory in (optimizers.spectra_adamw, optimizers.dct_adamw,
                  optimizers.online_subspace_descent):
    tx = factory(1e-3) if factory is optimizers.spectra_adamw else factory(1e-3, 2)
    with pytest.raises(TypeError, match="has dtype int32"):
      tx.update(params, tx.init(params), params)
