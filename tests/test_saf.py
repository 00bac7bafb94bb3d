"""Tests for regularizers.saf: SAF (past-logit ring buffer) and MESA (EMA teacher)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from _reference import count_lowerings
from regularizers import MESAState, SAFState, distillation_kl, mesa, saf

N, C = 16, 5


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_and_grad(logits, target, tau):
  """tau^2 KL(softmax(target/tau) || softmax(logits/tau)) per row and its gradient."""
  log_p = np_log_softmax(np.asarray(target, np.float64) / tau)
  log_q = np_log_softmax(np.asarray(logits, np.float64) / tau)
  p, q = np.exp(log_p), np.exp(log_q)
  return tau**2 * np.sum(p * (log_p - log_q), -1), tau * (q - p)


class Reference:
  """The regulariser the slow, obvious way: a dict {(example, epoch): logits}."""

  def __init__(self, lag, start_epoch, tau, weight):
    self.lag, self.start, self.tau, self.weight = lag, start_epoch, tau, weight
    self.records = {}

  def record(self, logits, indices, epoch):
    for row, i in zip(np.asarray(logits, np.float64), np.asarray(indices), strict=True):
      self.records[(int(i), epoch)] = row

  def loss_and_grad(self, logits, indices, epoch):
    logits = np.asarray(logits, np.float64)
    grad = np.zeros_like(logits)
    if epoch < self.start:
      return 0.0, grad
    rows = [(r, self.records[(int(i), epoch - self.lag)]) for r, i in enumerate(np.asarray(indices))
            if (int(i), epoch - self.lag) in self.records]
    if not rows:
      return 0.0, grad
    kl, g = np_kl_and_grad(logits[[r for r, _ in rows]], np.stack([t for _, t in rows]), self.tau)
    grad[[r for r, _ in rows]] = self.weight * g / len(rows)
    return self.weight * kl.mean(), grad


@pytest.mark.parametrize("lag,start_epoch", [(1, 1), (2, 3), (3, 5)])
def test_saf_loss_and_gradient_against_reference(lag, start_epoch):
  tau, weight = 2.5, 0.7
  reg = saf(N, C, lag=lag, start_epoch=start_epoch, temperature=tau, weight=weight)
  ref = Reference(lag, start_epoch, tau, weight)
  state = reg.init()
  rng = np.random.default_rng(lag)
  loss_and_grad = jax.jit(jax.value_and_grad(reg.loss, argnums=1))
  record = jax.jit(reg.record)
  checked_nonzero = False
  for epoch in range(start_epoch + lag + 2):
    # Each epoch sees a random subset of the examples (some skipped), so reads
    # hit rows never written and rows written at another epoch than epoch - lag.
    order = rng.permutation(N)[: rng.integers(N // 2, N)]
    for batch in np.array_split(order, 2):
      logits = jnp.asarray(3 * rng.standard_normal((len(batch), C)), jnp.float32)
      idx = jnp.asarray(batch, jnp.int32)
      value, grad = loss_and_grad(state, logits, idx, epoch)
      ref_value, ref_grad = ref.loss_and_grad(logits, idx, epoch)
      np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=1e-7)
      np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-7)
      checked_nonzero |= ref_value > 0
      state = record(state, logits, idx, epoch)
      ref.record(logits, idx, epoch)
  assert checked_nonzero


def test_saf_start_lag_and_masking_by_hand():
  reg = saf(4, 3, lag=2, start_epoch=2, temperature=1.0, weight=1.0)
  state = reg.init()
  a = jnp.array([[2.0, 0.0, -1.0]])
  b = jnp.array([[0.0, 1.0, 0.0]])
  state = reg.record(state, a, jnp.array([0]), 0)  # example 0 at epoch 0
  state = reg.record(state, a, jnp.array([1]), 1)  # example 1 at epoch 1
  # Epoch 1 < start_epoch: zero even though example 0 has a record... at epoch
  # -1 (none): zero.
  assert float(reg.loss(state, b, jnp.array([0]), 1)) == 0.0
  # Epoch 2 reads epoch 0: example 0 counted, example 1 (written at epoch 1) and
  # 3 (never written, zeros in the buffer) are masked and not counted.
  kl0 = float(np_kl_and_grad(b, a, 1.0)[0][0])
  got = reg.loss(state, jnp.concatenate([b, b, b]), jnp.array([0, 1, 3]), 2)
  np.testing.assert_allclose(got, kl0, rtol=1e-6)
  # Epoch 3 reads epoch 1: only example 1.
  got = reg.loss(state, jnp.concatenate([b, b]), jnp.array([0, 1]), 3)
  np.testing.assert_allclose(got, kl0, rtol=1e-6)
  # Epoch 3 writes slot 0 (epoch 3 mod 3): example 0's epoch-0 row is gone, so
  # at epoch 2 + 3 = 5 (reads epoch 3) only rows written at epoch 3 count.
  state = reg.record(state, b, jnp.array([2]), 3)
  assert int(state.epochs[0, 0]) == 0 and int(state.epochs[0, 2]) == 3
  assert float(reg.loss(state, a, jnp.array([0]), 5)) == 0.0
  np.testing.assert_allclose(reg.loss(state, a, jnp.array([2]), 5),
                             float(np_kl_and_grad(a, b, 1.0)[0][0]), rtol=1e-6)
  # No valid row: exactly zero with a finite (zero) gradient.
  g = jax.grad(reg.loss, argnums=1)(state, a, jnp.array([3]), 4)
  assert bool(jnp.all(g == 0))


def test_saf_gradient_only_through_current_logits_and_record_dtypes():
  reg = saf(N, C, lag=1, start_epoch=0)
  state = reg.init()
  logits = jax.random.normal(jax.random.key(0), (4, C), jnp.bfloat16)
  idx = jnp.array([3, 0, 7, 15])
  state = reg.record(state, logits, idx, 0)
  assert state.logits.dtype == jnp.float32 and state.epochs.dtype == jnp.int32
  np.testing.assert_array_equal(state.logits[0, idx], logits.astype(jnp.float32))
  np.testing.assert_array_equal(state.epochs[0, idx], 0)
  assert int(jnp.sum(state.epochs[0] == 0)) == 4
  # The buffer receives no gradient; the loss depends on it (nonzero value).
  current = jax.random.normal(jax.random.key(1), (4, C))
  value, state_grad = jax.value_and_grad(reg.loss, allow_int=True)(state, current, idx, 1)
  assert float(value) > 0
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(state_grad)
             if jnp.issubdtype(leaf.dtype, jnp.floating))
  # record stops gradients too: through a record(2 z)/loss(z) cycle the
  # gradient is that of a constant target 2 z.
  g = jax.grad(lambda z: reg.loss(reg.record(state, 2 * z, idx, 1), z, idx, 2))(current)
  expected = 0.3 * np_kl_and_grad(current, 2 * current, 5.0)[1] / 4
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
  # Shapes and dtypes fixed; memory formula.
  again = jax.jit(reg.record)(state, current, idx, 1)
  assert jax.tree.map(jax.typeof, again) == jax.tree.map(jax.typeof, state)
  assert isinstance(again, SAFState)
  assert state.logits.nbytes == N * C * (1 + 1) * 4


@pytest.mark.parametrize(
    "axis_type,batch_spec",
    [(AxisType.Auto, P("data")), (AxisType.Explicit, P()), (AxisType.Explicit, P("data"))],
    ids=["auto-batch_sharded", "explicit-batch_replicated", "explicit-batch_sharded"],
)
def test_saf_buffer_sharded_over_examples(axis_type, batch_spec):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  n, epochs = 64, 4
  reg = saf(n, C, lag=2, start_epoch=1, temperature=3.0, weight=0.5)
  specs = reg.partition_specs("data")
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  rng = np.random.default_rng(0)
  data = [(jnp.asarray(rng.standard_normal((24, C)), jnp.float32),
           jnp.asarray(rng.permutation(n)[:24], jnp.int32)) for _ in range(epochs)]

  def run(state, record, loss, place=lambda x: x):
    values = []
    for epoch, (logits, idx) in enumerate(jax.tree.map(place, data)):
      values.append(loss(state, logits, idx, epoch))
      state = record(state, logits, idx, epoch)
    return state, values

  with jax.set_mesh(mesh):
    state = jax.jit(reg.init, out_shardings=shardings)()
    assert state.logits.sharding.spec == specs.logits
    assert state.logits.addressable_shards[0].data.shape == (3, n // 8, C)
    record = jax.jit(reg.record, donate_argnums=0)
    with count_lowerings() as lowered:
      state, got = run(state, record, jax.jit(jax.value_and_grad(reg.loss, argnums=1)),
                       lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec)))
    assert state.logits.sharding.is_equivalent_to(shardings.logits, 3)
    assert state.epochs.sharding.is_equivalent_to(shardings.epochs, 2)
    assert lowered.count(reg.record.__name__) == 1, lowered.names  # compiled once, 4 epochs
  plain, expected = run(reg.init(), jax.jit(reg.record),
                        jax.jit(jax.value_and_grad(reg.loss, argnums=1)))
  assert float(expected[-1][0]) > 0
  for (value, grad), (ref_value, ref_grad) in zip(got, expected, strict=True):
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(state.logits), np.asarray(plain.logits))
  np.testing.assert_array_equal(np.asarray(state.epochs), np.asarray(plain.epochs))


def test_saf_bad_input():
  for kwargs, name in [({"lag": 0}, "lag"), ({"start_epoch": -1}, "start_epoch"),
                       ({"temperature": 0.0}, "temperature"), ({"weight": -0.1}, "weight"),
                       ({"lag": 2.0}, "lag")]:
    with pytest.raises(ValueError, match=name):
      saf(N, C, **kwargs)
  with pytest.raises(ValueError, match="num_examples"):
    saf(0, C)
  with pytest.raises(ValueError, match="num_classes"):
    saf(N, 0)
  reg = saf(N, C)
  state = reg.init()
  with pytest.raises(ValueError, match="logits"):
    reg.record(state, jnp.zeros((4, C + 1)), jnp.arange(4), 0)
  with pytest.raises(ValueError, match="indices"):
    reg.loss(state, jnp.zeros((4, C)), jnp.arange(3), 0)


# ---------------------------------------------------------------------------
# MESA
# ---------------------------------------------------------------------------


def test_distillation_kl_against_reference():
  rng = np.random.default_rng(3)
  z, t = rng.standard_normal((2, 7, C)) * 4
  for tau in (1.0, 5.0):
    np.testing.assert_allclose(distillation_kl(jnp.asarray(z, jnp.float32),
                                               jnp.asarray(t, jnp.float32), tau),
                               np_kl_and_grad(z, t, tau)[0], rtol=1e-5, atol=1e-6)
  assert distillation_kl(jnp.zeros((2, 3), jnp.bfloat16), jnp.zeros((2, 3)), 2.0).dtype == (
      jnp.float32)


def test_mesa_loss_and_gradient_against_reference():
  tau, weight = 4.0, 0.8
  reg = mesa(0.99, temperature=tau, weight=weight)
  rng = np.random.default_rng(4)
  student, teacher = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, 6, C)) * 3)
  value, (g_s, g_t) = jax.value_and_grad(reg.loss, argnums=(0, 1))(student, teacher)
  kl, grad = np_kl_and_grad(student, teacher, tau)
  np.testing.assert_allclose(value, weight * kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(g_s, weight * grad / 6, rtol=1e-5, atol=1e-7)
  assert bool(jnp.all(g_t == 0))  # the teacher is a constant target


def test_mesa_teacher_ema_against_reference():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}
  reg = mesa(0.9)
  state = reg.init(params)
  assert state.teacher["w"].dtype == jnp.float32  # bf16 would lose (1 - decay) w
  ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  update = jax.jit(reg.update_teacher)
  rng = np.random.default_rng(5)
  for _ in range(5):
    params = jax.tree.map(lambda x: (x + rng.standard_normal(x.shape)).astype(x.dtype), params)
    state = update(state, params)
    ref = {k: 0.9 * ref[k] + 0.1 * np.asarray(params[k].astype(jnp.float32), np.float64)
           for k in ref}
  for k in ref:
    np.testing.assert_allclose(state.teacher[k], ref[k], rtol=1e-5, atol=1e-6)
  assert int(state.count) == 5 and isinstance(state, MESAState)
  specs = reg.partition_specs({"w": P("data", None), "b": P()})
  assert specs == MESAState(teacher={"w": P("data", None), "b": P()}, count=P())


def test_mesa_decay_zero_on_stateless_model_gives_zero_regulariser():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
  apply = lambda p: jnp.tanh(x @ p["w"]) * 3
  ce = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p), y).mean()
  tx = optax.sgd(0.5)

  @jax.jit
  def step(p, opt_state, state, decay):
    reg = mesa(decay)

    def loss_fn(p):
      logits = apply(p)
      r = reg.loss(logits, apply(state.teacher))
      return ce(p) + r, r

    (_, r), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    ce_grads = jax.grad(ce)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    p = optax.apply_updates(p, updates)
    return p, opt_state, reg.update_teacher(state, p), r, grads, ce_grads

  def run(decay):
    p, opt_state, state = params, tx.init(params), mesa(decay).init(params)
    out = []
    for _ in range(3):
      p, opt_state, state, r, grads, ce_grads = step(p, opt_state, state, decay)
      out.append((float(r), grads, ce_grads))
    return out

  for r, grads, ce_grads in run(0.0):
    assert r == 0.0
    chex.assert_trees_all_close(grads, ce_grads, atol=1e-7)
  # With a slow teacher the regulariser is active after the first step.
  assert run(0.9)[-1][0] > 0


def test_mesa_bad_input():
  for kwargs, name in [({"decay": 1.5}, "decay"), ({"decay": -0.1}, "decay"),
                       ({"temperature": -1.0}, "temperature"), ({"weight": -1.0}, "weight")]:
    with pytest.raises(ValueError, match=name):
      mesa(**kwargs)
  with pytest.raises(ValueError, match="same shape"):
    mesa().loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_saf_training_step_writes_buffer_in_place():
  """loss reads the buffer and record writes it in the same jitted step: with the
  state donated, XLA must not copy the (lag + 1, N, C) buffer (it would, absent a
  data dependency ordering the write after the read)."""
  n, c = 4096, 7
  reg = saf(n, c, lag=3, start_epoch=0)
  x = jnp.ones((32, 6))
  idx = jnp.arange(32)

  def step(w, state, epoch):
    def loss(w):
      z = x @ w
      return jnp.mean(z**2) + reg.loss(state, z, idx, epoch), z
    g, z = jax.grad(loss, has_aux=True)(w)
    return w - 0.1 * g, reg.record(state, z, idx, epoch)

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(
      jnp.ones((6, c)), reg.init(), jnp.int32(5)).compile().as_text()
  copies = [line for line in hlo.splitlines() if " copy(" in line and f"{n}" in line]
  assert not copies, copies
