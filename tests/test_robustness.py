"""Registry-wide robustness: finite inputs of any magnitude, the non-finite policy, and
bit-identical determinism across an orbax checkpoint, for EVERY public transformation.

Every case of ``conformance.REGISTRY`` runs inside ONE jitted training step (one
compilation per case, shared by all tests of this file)::

  optax.apply_if_finite(                       # the outer guard: checks the incoming gradient
      optax.chain(poison_stage,                # adds extra arg `poison` to the updates
                  <the transform>,
                  optax.apply_if_finite(scale_to_param_update, K)),   # the downstream guard
      K)

A NaN put into the gradient is seen by the outer guard; a NaN put in by the poison
stage (or, for Sven, into the params its residuals are evaluated at) passes the outer
guard and reaches the transform, so the downstream guard sees exactly what the
transform returns. The README's
robustness table states the resulting policy per transform; this file checks it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import IDS, REGISTRY, Case, aux_loss_fn, grad_fn, make_params, residual_fn

import optimizers
import regularizers

MAX_ERRORS = 100  # consecutive non-finite steps a guard skips before giving up (never reached)
LR = 0.05
TINY, HUGE = 1e-30, 1e30
# Finite inputs are squared by some transforms; float32 then overflows past sqrt(3.4e38):
ADAM_HUGE = 1e18  # Adam's second moment g^2 (optax.scale_by_adam, as in optax.adam)
SVEN_HUGE = 1e15  # Sven's Gram matrix M M^T of the residual Jacobian (sum over parameters)

FULL_OPTIMIZERS = (
    optimizers.spectra_adamw, optimizers.dct_adamw, optimizers.online_subspace_descent,
    optimizers.sven,
)
cases = pytest.mark.parametrize("case", REGISTRY, ids=IDS)


# ---------------------------------------------------------------------------
# What the README's robustness table says, as predicates on a registry case.
# ---------------------------------------------------------------------------


def _has_moments(inner: optax.GradientTransformation) -> bool:
  """Whether ``inner`` keeps parameter-shaped state (Adam/Lion moments)."""
  return any(jnp.ndim(x) > 0 for x in jax.tree.leaves(inner.init(jnp.zeros(3))))


def nan_enters_state(case: Case) -> bool:
  """The transform keeps an EMA of the gradient (Adam or Lion moments, Bloop's EMA, Sven's
  RMS pre-scaling): a NaN that reaches it stays in the state and in every later update."""
  if case.factory in (regularizers.bloop, optimizers.spectra_adamw, optimizers.dct_adamw,
                      optimizers.online_subspace_descent, optimizers.clipped_adamw,
                      optimizers.scale_by_clipped_adam, optimizers.trion,
                      optimizers.scale_by_trion):
    return True
  if case.factory in (regularizers.pcgrad, regularizers.dynamic_barrier):
    return case.kwargs.get("decay") is not None  # EMAs of the gradients
  if case.factory is optimizers.subspace:
    return _has_moments(case.kwargs["inner"])
  if case.factory in (optimizers.scale_by_sven, optimizers.sven):
    return case.kwargs.get("rms_decay") is not None
  return False


def draws_random_numbers(case: Case) -> bool:
  """Sven's randomized eigensolver advances its PRNG key on every update, even one that
  the downstream guard rejects."""
  return case.factory in (optimizers.scale_by_sven, optimizers.sven) and (
      case.kwargs.get("method") == "matrix_free")


def largest_finite_input(case: Case) -> float:
  """The largest input magnitude whose squares stay finite in float32 (see README)."""
  if case.factory in (optimizers.scale_by_sven, optimizers.sven):
    return SVEN_HUGE
  state = case.make().init(make_params())
  adam_states = (optax.ScaleByAdamState, optimizers.ScaleByClippedAdamState)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, adam_states))
          if isinstance(s, adam_states)]
  trion = case.factory in (optimizers.trion, optimizers.scale_by_trion)  # AdamW leaves
  return ADAM_HUGE if adam or trion else HUGE


# ---------------------------------------------------------------------------
# The guarded training step (one compilation per case).
# ---------------------------------------------------------------------------


def poison_stage() -> optax.GradientTransformationExtraArgs:
  """Adds the extra arg ``poison`` (0 or NaN) to the first coordinate of the first leaf."""

  def update_fn(updates, state, params=None, *, poison=0.0, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(poison)
    return treedef.unflatten(leaves), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def guarded(case: Case) -> optax.GradientTransformation:
  to_param_update = 1.0 if case.factory in FULL_OPTIMIZERS else -LR
  downstream = optax.apply_if_finite(optax.scale(to_param_update), MAX_ERRORS)
  return optax.apply_if_finite(optax.chain(poison_stage(), case.make(), downstream), MAX_ERRORS)


def transform_state(state) -> Any:
  """The registry transform's own state inside :func:`guarded`'s state."""
  return state.inner_state[1]


def downstream_state(state) -> optax.ApplyIfFiniteState:
  return state.inner_state[2]


@functools.cache
def compiled_step(name: str):
  """``step(params, state, scale, grad_poison, inner_poison) -> (params, state)``.

  The gradient, the auxiliary gradient and Sven's residuals are multiplied by
  ``scale``; ``grad_poison`` is added to the gradient (and to the params Sven's
  residuals are evaluated at, as a NaN loss would poison them) and ``inner_poison``
  to what the transform receives only.
  """
  case = next(c for c in REGISTRY if c.name == name)
  tx = guarded(case)

  @jax.jit
  def step(params, state, scale, grad_poison, inner_poison):
    grads = jax.tree.map(lambda g: scale * g, grad_fn(params))
    grads = {**grads, "head": grads["head"].at[0, 0].add(grad_poison)}
    extras = {
        "grad_fn": lambda p: jax.tree.map(lambda g: scale * g, grad_fn(p)),
        # A NaN loss poisons both the residuals and their Jacobian:
        "residual_fn": lambda p: scale * residual_fn(
            jax.tree.map(lambda x: x + (grad_poison + inner_poison), p)),
        "aux_grads": jax.tree.map(lambda g: scale * g, jax.grad(aux_loss_fn)(params)),
        "poison": inner_poison,
    }
    updates, state = tx.update(grads, state, params, **extras)
    return optax.apply_updates(params, updates), state

  return tx, step


def run(case: Case, schedule, *, scale: float = 1.0, state=None, params=None,
        advance: bool = True):
  """Runs the guarded step over ``schedule``, a list of ``(grad_poison, inner_poison)``;
  with ``advance=False`` every step sees the same params (the updates are not applied)."""
  tx, step = compiled_step(case.name)
  params = make_params() if params is None else params
  state = tx.init(params) if state is None else state
  # Committed to one device, like orbax's restored arrays: one compilation serves both.
  params, state = jax.device_put((params, state), jax.devices()[0])
  history = []
  for grad_poison, inner_poison in schedule:
    new_params, state = step(params, state, jnp.float32(scale), jnp.float32(grad_poison),
                             jnp.float32(inner_poison))
    params = new_params if advance else params
    history.append((new_params, state))
  return params, state, history


def is_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


CLEAN = [(0.0, 0.0)] * 5
NAN = float("nan")


# ---------------------------------------------------------------------------
# Finite inputs, including zeros, tiny and huge values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", ["zero", "tiny", "huge"])
@cases
def test_finite_inputs_give_finite_updates_and_state(case, magnitude):
  """Inputs scaled to 0, 1e-30 and the largest magnitude the transform's math can square
  in float32 (1e30; 1e18 with an Adam second moment; 1e15 for Sven's residuals)."""
  scale = {"zero": 0.0, "tiny": TINY, "huge": largest_finite_input(case)}[magnitude]
  _, state, history = run(case, [(0.0, 0.0)] * 3, scale=scale, advance=False)
  for new_params, s in history:
    assert bool(downstream_state(s).last_finite), f"non-finite update for finite {magnitude} input"
    assert is_finite(transform_state(s)), f"non-finite state for finite {magnitude} input"
    assert is_finite(new_params)
  assert int(downstream_state(state).total_notfinite) == 0


def test_adam_second_moment_overflow_is_the_documented_limit():
  """Past sqrt(float32 max) ~ 1.8e19 a gradient's square overflows Adam's second moment:
  plain optax.adam and the Adam-based transforms alike (README: finite input range)."""
  case = next(c for c in REGISTRY if c.factory is optimizers.spectra_adamw)
  _, state, _ = run(case, [(0.0, 0.0)], scale=HUGE)
  assert not is_finite(transform_state(state))
  plain = optax.adam(1e-3)
  g = jax.tree.map(lambda x: HUGE * x, grad_fn(make_params()))
  _, plain_state = plain.update(g, plain.init(make_params()))
  assert not is_finite(plain_state)


# ---------------------------------------------------------------------------
# Non-finite policy.
# ---------------------------------------------------------------------------

# Bad steps land on a refresh step (count 2) and on a step between refreshes (count 3)
# of the projectors with update_every=2.
WITH_BAD_GRADIENTS = [(0.0, 0.0), (0.0, 0.0), (NAN, 0.0), (0.0, 0.0), (NAN, 0.0), (0.0, 0.0),
                      (0.0, 0.0)]
WITH_BAD_INNER = [(0.0, g) for g, _ in WITH_BAD_GRADIENTS]


@cases
def test_nan_gradient_under_apply_if_finite_leaves_no_trace(case):
  """The outer ``optax.apply_if_finite`` skips the bad steps: params and the whole inner
  state end bit-identical to a run that never saw them."""
  params, state, _ = run(case, WITH_BAD_GRADIENTS)
  clean_params, clean_state, _ = run(case, CLEAN)
  assert int(state.total_notfinite) == 2
  chex.assert_trees_all_equal(params, clean_params)
  chex.assert_trees_all_equal(state.inner_state, clean_state.inner_state)


@cases
def test_nan_reaching_the_transform_stays_visible_and_never_poisons_silently(case):
  """With only a guard AFTER the transform, the NaN reaches it. Its output must be
  non-finite on that step (the downstream guard skips it); then either training goes on
  as if the step never happened (bit-identical params; finite and continuing when a PRNG
  key advanced), or the NaN sits in an EMA in the state and EVERY later update is NaN
  (visible: README says to wrap the chain in apply_if_finite)."""
  params, state, history = run(case, WITH_BAD_INNER)
  bad_steps = [i for i, (_, p) in enumerate(WITH_BAD_INNER) if p != 0.0]
  for i in bad_steps:
    assert not bool(downstream_state(history[i][1]).last_finite), (
        f"a NaN reaching the transform at step {i} came out finite")
  assert is_finite(params)
  if nan_enters_state(case):
    later = [bool(downstream_state(s).last_finite) for _, s in history[bad_steps[0]:]]
    assert not any(later), "state holds a NaN but some later update came out finite"
    assert not is_finite(transform_state(state))
    chex.assert_trees_all_equal(params, history[bad_steps[0] - 1][0])  # visibly stalled
    return
  assert is_finite(transform_state(state)), "a NaN entered the state"
  good_steps = [s for i, (_, s) in enumerate(history) if i not in bad_steps]
  assert all(bool(downstream_state(s).last_finite) for s in good_steps)
  if not draws_random_numbers(case):  # else: finite and continuing, on other random draws
    clean_params, _, _ = run(case, CLEAN)
    chex.assert_trees_all_equal(params, clean_params)


# ---------------------------------------------------------------------------
# Determinism and checkpoint resume.
# ---------------------------------------------------------------------------


def orbax_roundtrip(tree, path):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


@cases
def test_bit_identical_runs_and_resume_from_orbax(case, tmp_path):
  """Two independently built transforms give bit-identical states and updates on the same
  inputs; saving the state (projector indices, EMA buffers, PRNG keys, ...) with orbax
  after 2 of 5 steps and resuming reproduces the remaining 3 steps bit for bit."""
  tx_a, tx_b = guarded(case), guarded(case)
  params = make_params()
  chex.assert_trees_all_equal(tx_a.init(params), tx_b.init(params))
  _, _, straight = run(case, CLEAN, state=tx_a.init(params))
  _, _, again = run(case, CLEAN, state=tx_b.init(params))
  chex.assert_trees_all_equal(straight, again)
  mid_params, mid_state = straight[1]
  restored = orbax_roundtrip({"params": mid_params, "state": mid_state}, tmp_path / "ckpt")
  chex.assert_trees_all_equal(restored["state"], mid_state)
  _, _, resumed = run(case, CLEAN[2:], params=restored["params"], state=restored["state"])
  chex.assert_trees_all_equal(resumed, straight[2:])


def test_saf_and_mesa_resume_from_orbax_bit_identical(tmp_path):
  """SAF's per-example ring buffer and MESA's EMA teacher survive an orbax save/restore
  mid-run: the continued losses, buffers and teacher are bit-identical."""
  rng = np.random.default_rng(3)
  num_examples, num_classes, batch = 12, 4, 6
  reg = regularizers.saf(num_examples, num_classes, lag=1, start_epoch=1)
  teacher = regularizers.mesa(0.5)
  weights = {"w": jnp.asarray(rng.standard_normal((3, num_classes)), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((num_examples, 3)), jnp.float32)

  @jax.jit
  def step(saf_state, mesa_state, weights, indices, epoch):
    logits = x[indices] @ weights["w"]
    teacher_logits = x[indices] @ mesa_state.teacher["w"]
    loss = reg.loss(saf_state, logits, indices, epoch) + teacher.loss(logits, teacher_logits)
    weights = {"w": weights["w"] * 0.9 + 0.01}
    return reg.record(saf_state, logits, indices, epoch), teacher.update_teacher(
        mesa_state, weights), weights, loss

  plan = [(np.arange(i, i + batch) % num_examples, i // 2) for i in range(0, 6 * batch, batch)]

  def go(states, steps):
    out = []
    for indices, epoch in steps:
      *states, loss = step(*states, jnp.asarray(indices), epoch)
      out.append((tuple(states), loss))
    return out

  start = (reg.init(), teacher.init(weights), weights)
  straight = go(start, plan)
  assert any(float(loss) > 0 for _, loss in straight)  # the buffer was read
  restored = orbax_roundtrip(straight[2][0], tmp_path / "saf")
  chex.assert_trees_all_equal(restored, straight[2][0])
  chex.assert_trees_all_equal(go(tuple(restored), plan[3:]), straight[3:])


# ---------------------------------------------------------------------------
# State memory: the README's formulas, evaluated on the harness shapes.
# ---------------------------------------------------------------------------

# The harness params: matrices (batch, m, n) and non-matrix leaves (size).
MATRICES = [(1, 8, 12), (4, 8, 12), (1, 12, 4)]  # dense/kernel, stack, head
VECTORS = [12]  # dense/bias
P = sum(b * m * n for b, m, n in MATRICES) + sum(VECTORS)
F32, I32, BF16 = 4, 4, 2


def _subspace_bytes(rank: int, projector: str, inner_moments: int, side: str = "smaller",
                    moment: int = F32) -> int:
  """README: inner moments on the low-rank tree + the projector's per-matrix state."""
  total = 4  # count
  for b, m, n in MATRICES:
    r = min(rank, m, n)
    d = {"smaller": min(m, n), "larger": max(m, n)}[side]
    k = m * n // d
    total += inner_moments * b * k * r * moment
    total += {"dct": b * r * I32, "svd": b * d * r * F32, "online_pca": 3 * b * d * r * F32}[
        projector]
  total += sum(inner_moments * v * moment for v in VECTORS)
  total += sum({"dct": I32, "svd": F32, "online_pca": 3 * F32}[projector] for _ in VECTORS)
  return total


def _trion_bytes(rank: int) -> int:
  """README: a full-size buffer per matrix + ``r`` int32 indices; AdamW moments for the
  other leaves; scalar placeholders (nu of a matrix, indices of a vector) and counters."""
  total = sum(b * m * n * F32 + b * min(rank, m, n) * I32 + F32 for b, m, n in MATRICES)
  total += sum(2 * v * F32 + I32 for v in VECTORS)
  return total + 2 * I32  # Adam's count, the subspace's count


ADAM_COUNT = 4
STATE_BYTES = {
    # name: bytes of the state for the harness params (formulas of the README table)
    "clip_coordinatewise_fraction": 2 * F32,
    "clip_coordinatewise_threshold": 2 * F32,
    "clip_coordinatewise_bisect": 2 * F32,
    "spectral_clip_soft": I32 + F32,
    "spectral_clip_hard": I32 + F32,
    "spectra_adamw": 2 * P * F32 + ADAM_COUNT + (I32 + F32),
    "spectra_adamw_bf16_moments": 2 * P * BF16 + ADAM_COUNT + (I32 + F32),
    "spectra_adamw_hard_preclip": 2 * P * F32 + ADAM_COUNT + 2 * (I32 + F32),
    "subspace_dct": _subspace_bytes(2, "dct", 2) + ADAM_COUNT,
    "subspace_dct_l1_rotate_larger": _subspace_bytes(3, "dct", 2, "larger") + ADAM_COUNT,
    "subspace_online_pca": _subspace_bytes(2, "online_pca", 2) + ADAM_COUNT,
    "subspace_svd_reset": _subspace_bytes(2, "svd", 1) + ADAM_COUNT,
    "dct_adamw": _subspace_bytes(2, "dct", 2) + ADAM_COUNT,
    "online_subspace_descent": _subspace_bytes(3, "online_pca", 2) + ADAM_COUNT,
    "online_subspace_descent_dct_bf16": _subspace_bytes(2, "online_pca", 2, moment=BF16)
    + ADAM_COUNT,
    "dct_adamw_bf16_moments": _subspace_bytes(2, "dct", 2, moment=BF16) + ADAM_COUNT,
    "scale_by_trion": _trion_bytes(2),
    "trion": _trion_bytes(3) + I32,  # + the two learning rates' step count
    # key + singular values (rank) + effective rank + the Polyak step size (+ nu)
    "scale_by_sven": 2 * I32 + 3 * F32 + I32 + F32,
    "scale_by_sven_matrix_free": 2 * I32 + 2 * F32 + I32 + F32,
    "sven": 2 * I32 + 3 * F32 + I32 + F32 + P * F32,
    "sam": I32 + 2 * F32,
    "sam_asam": I32 + 2 * F32,
    "sam_pinf": I32 + 2 * F32,
    "bloop": P * F32 + 2 * F32,
    "bloop_per_leaf_after": P * F32 + 2 * F32,
    "mixed": F32,
    "pcgrad": F32,
    "dynamic_barrier": 2 * F32,
    "perp_grad": F32,
    "clipped_adamw": 2 * P * F32 + ADAM_COUNT + 2 * F32,
    "scale_by_clipped_adam_bisect": 2 * P * F32 + ADAM_COUNT + 2 * F32,
    "bloop_reference_options": P * F32 + 2 * F32,
    "pcgrad_ema": 2 * P * F32 + F32,
    "perp_grad_rescale": F32,
}


@cases
def test_state_memory_matches_readme_formula(case):
  if case.name not in STATE_BYTES:
    pytest.fail(f"{case.name}: add its state-memory formula to README.md and STATE_BYTES")
  state = case.make().init(make_params())
  nbytes = sum(math.prod(jnp.shape(x)) * jnp.result_type(x).itemsize
               for x in jax.tree.leaves(state))
  assert nbytes == STATE_BYTES[case.name]
