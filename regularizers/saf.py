r"""SAF and MESA: sharpness-aware training for free, as loss-side regularisers.

Both add a distillation term to the training loss that penalises a change of
the model's outputs along the trajectory, a proxy for sharpness that needs no
second gradient (Du et al. 2022):

.. math::
  L = CE + \lambda\, \tau^2\, \mathrm{mean}_i\,
      KL\big(\mathrm{softmax}(y_i / \tau) \,\|\, \mathrm{softmax}(f(x_i) / \tau)\big),

with the gradient flowing only through the current logits ``f(x_i)``. The
weight ``lambda`` is applied once (the paper's pseudo-code applies it twice)
and ``tau^2`` follows the reference code.

* :func:`saf`: the target ``y_i`` are the logits example ``i`` produced in the
  ordinary training forward pass ``lag`` epochs earlier, kept in a per-example
  ring buffer (no extra compute).
* :func:`mesa`: the target is the output of an exponential moving average of
  the weights (one extra forward pass, no per-example buffer).

These are not gradient transformations (they act on the loss, not on the
gradient), so they are objects of pure functions rather than
``optax.GradientTransformation``\ s.

References:
  Du et al., `Sharpness-Aware Training for Free
  <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from optimizers._checks import (
    check_floating_dtype,
    check_int,
    check_interval,
    check_nonnegative,
    check_positive,
)
from optimizers._trees import upcast

__all__ = ["SAFState", "SAF", "saf", "MESAState", "MESA", "mesa", "distillation_kl"]

_NEVER = jnp.iinfo(jnp.int32).min  # epoch tag of a row never written


def distillation_kl(
    logits: jax.Array, target_logits: jax.Array, temperature: float | jax.Array
) -> jax.Array:
  r"""Per-example ``tau^2 KL(softmax(target/tau) || softmax(logits/tau))``, float32.

  The target is under stop_gradient. Shapes ``(..., C) -> (...)``.

  Args:
    logits: the student's logits (the gradient flows through these).
    target_logits: the teacher's (or past) logits.
    temperature: ``tau > 0``.

  Returns:
    The scaled KL divergence per example.
  """
  inv_tau = 1.0 / temperature
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32) * inv_tau, axis=-1)
  log_p = jax.nn.log_softmax(
      jax.lax.stop_gradient(target_logits).astype(jnp.float32) * inv_tau, axis=-1
  )
  return temperature**2 * optax.losses.kl_divergence_with_log_targets(log_q, log_p)


# ---------------------------------------------------------------------------
# SAF
# ---------------------------------------------------------------------------


class SAFState(NamedTuple):
  """State of :func:`saf`: a ring of per-example logits with epoch tags.

  Attributes:
    logits: ``(lag + 1, N, C)`` float32; slot ``e mod (lag + 1)`` holds the
      logits recorded at epoch ``e``.
    epochs: ``(lag + 1, N)`` int32; the epoch each row was written at
      (``int32 min`` if never written).
  """

  logits: jax.Array
  epochs: jax.Array


class SAF(NamedTuple):
  """The pure functions of :func:`saf` (see there)."""

  init: Callable[[], SAFState]
  record: Callable[[SAFState, jax.Array, jax.Array, Any], SAFState]
  loss: Callable[[SAFState, jax.Array, jax.Array, Any], jax.Array]
  partition_specs: Callable[[Any], SAFState]


def saf(
    num_examples: int,
    num_classes: int,
    *,
    lag: int = 3,
    start_epoch: int = 5,
    temperature: float | jax.Array = 5.0,
    weight: float | jax.Array = 0.3,
) -> SAF:
  r"""Sharpness-Aware training for Free: distil from the model's own past logits.

  For epoch ``e >= start_epoch``,

  .. math::
    R = \lambda\, \tau^2 \frac{1}{|V|} \sum_{i \in V}
        KL\big(\mathrm{softmax}(y_i^{(e - lag)} / \tau) \,\|\,
               \mathrm{softmax}(f(x_i) / \tau)\big),

  where ``y_i^(e-lag)`` are the logits example ``i`` produced in the training
  forward pass at epoch ``e - lag`` and ``V`` the examples of the batch that
  have such a record. Rows never written, or last written at another epoch
  than ``e - lag``, are masked out (not read as zeros, not counted in the
  mean); ``R = 0`` before ``start_epoch`` or when no row qualifies. The
  gradient flows only through the current logits.

  State: a float32 ring buffer of ``lag + 1`` epochs x ``N`` examples x ``C``
  classes, written at slot ``e mod (lag + 1)`` and read at slot
  ``(e - lag) mod (lag + 1)``, plus an int32 epoch tag per (slot, example).
  Memory: ``N * C * (lag + 1) * 4`` bytes for the logits (ImageNet, N = 1.28M,
  C = 1000, lag = 3: ~20.5 GB; lag = 2: ~15.4 GB) and ``N * (lag + 1) * 4``
  bytes for the tags. Shard it
  along the example axis (``partition_specs(axis)``; ``N`` divisible by the
  axis size); ``record`` and ``loss`` then scatter/gather locally and reduce
  only ``(batch, C)`` values. Donate the state in the jitted training step,
  otherwise ``record`` copies the whole buffer every step. When ``loss`` and
  ``record`` run in the same step, call them with the same ``indices`` and
  ``epoch``: ``record`` then writes in place after ``loss``'s read (it repeats
  that read, merged by XLA, to order the two; ``record`` stores the logits
  exactly, up to the sign of a zero). With other arguments XLA copies the
  buffer to keep the read safe.

  Training loop::

    reg = saf(num_examples, num_classes)
    saf_state = reg.init()

    def loss_fn(params, saf_state, x, y, idx, epoch):
      logits = model_apply(params, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + reg.loss(saf_state, logits, idx, epoch), logits

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, saf_state, x, y, idx, epoch):
      grads, logits = jax.grad(loss_fn, has_aux=True)(params, saf_state, x, y, idx, epoch)
      updates, opt_state = tx.update(grads, opt_state, params)
      saf_state = reg.record(saf_state, logits, idx, epoch)
      return optax.apply_updates(params, updates), opt_state, saf_state

  Args:
    num_examples: ``N``, the size of the training set (indices in ``[0, N)``).
    num_classes: ``C``, the number of logits per example.
    lag: how many epochs back the target logits come from (>= 1).
    start_epoch: first epoch (>= 0) with a non-zero regulariser.
    temperature: ``tau > 0``.
    weight: ``lambda >= 0`` (0.3 in the paper).

  Returns:
    An :class:`SAF` with pure functions

    * ``init() -> SAFState``;
    * ``record(state, logits, indices, epoch) -> SAFState``: stores the batch's
      logits ``(B, C)`` (stop_gradient, float32) for the examples ``indices``
      ``(B,)`` (unique within a batch) at epoch ``epoch`` (int >= 0); indices
      outside ``[0, N)`` (negative ones included) are dropped, never wrapped or
      clamped onto another example's row, and ``loss`` does not count them;
    * ``loss(state, logits, indices, epoch) -> scalar``: the regulariser above;
    * ``partition_specs(example_axis) -> SAFState`` of ``PartitionSpec``\ s
      sharding the example axis over ``example_axis`` (a mesh axis name or
      tuple of names; None replicates).

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import saf
    >>> reg = saf(num_examples=4, num_classes=3, lag=1, start_epoch=1)
    >>> state = reg.init()
    >>> logits, idx = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), jnp.array([0, 2])
    >>> state = reg.record(state, logits, idx, 0)
    >>> float(reg.loss(state, logits, idx, 1))  # same logits as one epoch ago
    0.0

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  check_int("num_examples", num_examples)
  check_int("num_classes", num_classes)
  check_int("lag", lag)
  check_int("start_epoch", start_epoch, minimum=0)
  check_positive("temperature", temperature)
  check_nonnegative("weight", weight)
  slots = lag + 1

  def check_batch(logits: jax.Array, indices: jax.Array) -> None:
    if logits.ndim != 2 or logits.shape[-1] != num_classes:
      raise ValueError(f"logits must have shape (batch, {num_classes}), got {logits.shape}.")
    if indices.shape != logits.shape[:1]:
      raise ValueError(f"indices must have shape {logits.shape[:1]}, got {indices.shape}.")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
      raise TypeError(f"indices must be integers, got dtype {indices.dtype}.")

  def init_fn() -> SAFState:
    return SAFState(
        logits=jnp.zeros((slots, num_examples, num_classes), jnp.float32),
        epochs=jnp.full((slots, num_examples), _NEVER, jnp.int32),
    )

  def in_range(indices: jax.Array) -> jax.Array:
    """``indices`` with every entry outside ``[0, N)`` (negative ones included) mapped to
    ``N``: out of bounds, so reads fill and writes drop instead of aliasing another row."""
    return jnp.where((indices >= 0) & (indices < num_examples), indices, num_examples)

  def read(state: SAFState, logits: jax.Array, indices: jax.Array, epoch: jax.Array):
    """The rows of epoch - lag for ``indices``: (past logits, their epoch tags); an index
    outside ``[0, N)`` reads a row never written."""
    slot = (epoch - lag) % slots
    indices = in_range(indices)
    past = state.logits.at[slot, indices].get(
        mode="fill", fill_value=0, out_sharding=jax.typeof(logits).sharding)
    tags = state.epochs.at[slot, indices].get(
        mode="fill", fill_value=_NEVER, out_sharding=jax.typeof(indices).sharding)
    return past, tags

  def record_fn(state: SAFState, logits: jax.Array, indices: jax.Array, epoch: Any) -> SAFState:
    check_batch(logits, indices)
    epoch = jnp.asarray(epoch, jnp.int32)
    slot = epoch % slots
    values = jax.lax.stop_gradient(logits).astype(jnp.float32)
    tags = jnp.full_like(indices, epoch, dtype=jnp.int32)
    # In a training step `loss` reads the buffer and `record` writes it in
    # place; with no data dependency between the two, XLA copies the whole
    # buffer (twice) to keep the read safe. Repeating loss's read here (merged
    # with it by CSE) and making the written rows depend on it (an identity:
    # where(a == b, a, b) is b) orders the write after the read.
    past, past_tags = read(state, logits, indices, epoch)
    values = jnp.where(past == values, past, values)
    tags = jnp.where(past_tags == tags, past_tags, tags)
    # Explicit out_shardings keep the buffer's sharding (and are required under
    # Explicit mesh axes); the scatter stays local to each example shard.
    indices = in_range(indices)  # rows outside [0, N) are dropped
    return SAFState(
        logits=state.logits.at[slot, indices].set(
            values, mode="drop", out_sharding=jax.typeof(state.logits).sharding),
        epochs=state.epochs.at[slot, indices].set(
            tags, mode="drop", out_sharding=jax.typeof(state.epochs).sharding),
    )

  def loss_fn(state: SAFState, logits: jax.Array, indices: jax.Array, epoch: Any) -> jax.Array:
    check_batch(logits, indices)
    epoch = jnp.asarray(epoch, jnp.int32)
    past, tags = read(state, logits, indices, epoch)
    valid = (tags == epoch - lag) & (epoch >= start_epoch)
    kl = distillation_kl(logits, past, temperature)
    count = jnp.sum(valid)
    mean_kl = jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(count, 1)
    return weight * mean_kl

  def partition_specs(example_axis: Any) -> SAFState:
    return SAFState(logits=P(None, example_axis, None), epochs=P(None, example_axis))

  return SAF(init_fn, record_fn, loss_fn, partition_specs)


# ---------------------------------------------------------------------------
# MESA
# ---------------------------------------------------------------------------


class MESAState(NamedTuple):
  """State of :func:`mesa`.

  Attributes:
    teacher: the EMA of the parameters (same tree; float32 or wider leaves, so
      that ``(1 - decay) w`` is not lost to bf16 rounding).
    count: number of teacher updates, int32.
  """

  teacher: Any
  count: jax.Array


class MESA(NamedTuple):
  """The pure functions of :func:`mesa` (see there)."""

  init: Callable[[Any], MESAState]
  update_teacher: Callable[[MESAState, Any], MESAState]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  partition_specs: Callable[[Any], MESAState]


def mesa(
    decay: float | jax.Array = 0.9998,
    *,
    temperature: float | jax.Array = 5.0,
    weight: float | jax.Array = 0.8,
    teacher_dtype: Any = None,
) -> MESA:
  r"""Memory-Efficient Sharpness-Aware training: distil from an EMA teacher.

  The teacher's weights are an exponential moving average of the student's,
  updated after each optimizer step, ``v <- decay v + (1 - decay) w``; the
  regulariser is

  .. math::
    R = \lambda\, \tau^2\, \mathrm{mean}_i\,
        KL\big(\mathrm{softmax}(f_v(x_i) / \tau) \,\|\,
               \mathrm{softmax}(f_w(x_i) / \tau)\big),

  with the teacher's logits ``f_v(x_i)`` computed on the same batch in eval
  mode (one extra forward pass, no backward) and under stop_gradient. No
  per-example buffer; the state is one copy of the parameters (float32, or
  ``teacher_dtype``).

  Training loop::

    reg = mesa(0.9998)
    mesa_state = reg.init(params)

    def loss_fn(params, teacher, x, y):
      logits = model_apply(params, x, train=True)
      teacher_logits = model_apply(teacher, x, train=False)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + reg.loss(logits, teacher_logits)

    @jax.jit
    def step(params, opt_state, mesa_state, x, y):
      grads = jax.grad(loss_fn)(params, mesa_state.teacher, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, reg.update_teacher(mesa_state, params)

  (Cast ``mesa_state.teacher`` to the params' dtype in ``model_apply`` if the
  model must run in bf16.)

  Args:
    decay: EMA decay ``beta`` in ``[0, 1]`` (0.9998 in the paper); 0 makes the
      teacher the current weights.
    temperature: ``tau > 0``.
    weight: ``lambda >= 0`` (0.8 in the paper).
    teacher_dtype: storage dtype of the teacher (``None``: the params' dtype
      promoted to at least float32). The EMA is computed in float32 from the
      stored teacher and only the result is rounded, so ``"bfloat16"`` halves the
      teacher's bytes; with ``decay`` close to 1 a bf16 teacher moves only when
      ``(1 - decay) |w - v|`` exceeds bf16's rounding step near ``v`` (about
      ``|v| / 256``): keep float32 for slow EMAs.

  Returns:
    A :class:`MESA` with pure functions

    * ``init(params) -> MESAState``: the teacher starts at ``params``;
    * ``update_teacher(state, params) -> MESAState``: one EMA step (call it with
      the parameters after the optimizer step);
    * ``loss(student_logits, teacher_logits) -> scalar``: the regulariser;
    * ``partition_specs(param_specs) -> MESAState``: the teacher sharded like
      the parameters, the count replicated.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import mesa
    >>> reg = mesa(0.5)
    >>> state = reg.update_teacher(reg.init(jnp.zeros(2)), jnp.ones(2))
    >>> state.teacher
    Array([0.5, 0.5], dtype=float32)
    >>> float(reg.loss(jnp.zeros((4, 3)), jnp.zeros((4, 3))))
    0.0

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
  """
  check_interval("decay", decay, 0, 1, include_high=True)
  check_positive("temperature", temperature)
  check_nonnegative("weight", weight)
  teacher_dtype = check_floating_dtype("teacher_dtype", teacher_dtype)

  def init_fn(params: Any) -> MESAState:
    teacher = jax.tree.map(
        lambda w: w.astype(teacher_dtype) if teacher_dtype is not None else upcast(w), params)
    return MESAState(teacher=teacher, count=jnp.zeros([], jnp.int32))

  def update_teacher_fn(state: MESAState, params: Any) -> MESAState:
    # computed in (at least) float32 from the stored teacher; only the result is rounded
    new = jax.tree.map(lambda w, v: upcast(w.astype(jnp.promote_types(w.dtype, v.dtype))),
                       params, state.teacher)
    teacher = optax.incremental_update(new, jax.tree.map(upcast, state.teacher), 1.0 - decay)
    teacher = jax.tree.map(lambda t, v: t.astype(v.dtype), teacher, state.teacher)
    return MESAState(teacher=teacher, count=optax.safe_increment(state.count))

  def loss_fn(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    if student_logits.shape != teacher_logits.shape:
      raise ValueError(
          f"student_logits {student_logits.shape} and teacher_logits "
          f"{teacher_logits.shape} must have the same shape."
      )
    return weight * jnp.mean(distillation_kl(student_logits, teacher_logits, temperature))

  def partition_specs(param_specs: Any) -> MESAState:
    return MESAState(teacher=param_specs, count=P())

  return MESA(init_fn, update_teacher_fn, loss_fn, partition_specs)
