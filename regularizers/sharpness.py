r"""Sharpness-aware minimisation: SAM, ASAM, p-norm perturbations and m-sharpness.

SAM (Foret et al. 2021) replaces the gradient ``g = grad L(w)`` by the gradient
at an adversarially perturbed point::

  e     = rho * sign(g) |g|^(q-1) / (||g||_q^q)^(1/p)      (1/p + 1/q = 1)
  g_sam = grad L(w + stop_gradient(e))

with the norm GLOBAL over the whole parameter tree (``p = 2``:
``e = rho g / ||g||_2``; ``p = inf``: ``e = rho sign(g)``). ASAM (Kwon et al.
2021) measures the neighbourhood in the coordinates ``T_w^{-1} w`` with
``T_w = |w| + eta``; for ``p = 2`` this gives ``e = rho T_w^2 g / ||T_w g||_2``.

:func:`sam` is a gradient-like transformation chained FIRST, before any optax
optimizer::

  tx = optax.chain(regularizers.sam(0.05), optax.sgd(schedule, momentum=0.9))
  grads = jax.grad(loss)(params, batch)
  updates, opt_state = tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))

It costs exactly two gradient evaluations per step (the incoming one and one
``grad_fn`` call), keeps no copy of the parameters in its state (only a step
count and two diagnostic scalars), and the optimizer behind it sees one
gradient per step, so learning-rate schedules count real steps (unlike
``optax.contrib.sam``'s transparent mode, which spends two ``update`` calls per
step).

m-sharpness: SAM generalises best when each group of ``m`` examples computes
its own perturbation (as each device did in the reference code). A ``jit`` over
a globally sharded batch silently uses the global-batch perturbation instead;
:func:`m_sharpness_gradient` splits the batch into groups (``vmap``) and/or runs
per device inside ``shard_map`` (``axis_name``) and averages the per-group SAM
gradients.

Models with state and randomness (BatchNorm, dropout): run both passes in train
mode on the same batch, keep the statistics of the FIRST (unperturbed) pass and
use the same dropout key in both. With flax nnx, split the model into
parameters and the rest, and give ``grad_fn`` the rest as it was *before* the
first pass (same running-stat inputs, same RNG counter, hence the same dropout
mask); keep the rest returned by the first pass::

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    return loss, nnx.state(model, nnx.Not(nnx.Param))  # new stats, RNG counts

  grad = jax.grad(loss_fn, has_aux=True)
  grads, new_rest = grad(params, rest, x, y)
  grad_fn = lambda p: grad(p, rest, x, y)[0]   # same `rest`; its new state dropped
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
  params, rest = optax.apply_updates(params, updates), new_rest

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

  Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers._checks import (
    check_nonnegative,
    check_real_floating,
    check_tree_match,
    concrete_hyperparameter,
    is_static_number,
    reject_masked_nodes,
)
from optimizers._trees import compute_dtype, tree_l2_norm, tree_max_abs, tree_upcast, upcast

__all__ = ["SAMState", "sam", "sam_perturbation", "m_sharpness_gradient"]


class SAMState(NamedTuple):
  """State of :func:`sam`: no parameter-sized arrays, only scalars.

  Attributes:
    count: number of updates (real optimisation steps), int32.
    grad_norm: global L2 norm of the last incoming gradient, float32.
    perturbation_norm: global L2 norm of the last perturbation ``e``, float32.
  """

  count: jax.Array
  grad_norm: jax.Array
  perturbation_norm: jax.Array


def _check_sam_config(rho: Any, eta: Any, p: Any) -> None:
  check_nonnegative("rho", rho)
  check_nonnegative("eta", eta)
  value = concrete_hyperparameter(p, "p")
  if value is not None and not np.all(value > 1):
    raise ValueError(f"p must be > 1 (2 or math.inf are the usual choices), got p={p!r}.")


def _global_l2_norm(tree: Any) -> jax.Array:
  """Global L2 norm in one pass over the tree when ``sum x^2`` is representable.

  ``sqrt(sum x^2)`` is exact to float32 rounding whenever the sum is finite and
  at least ``2^-60`` (squares flushed to zero then weigh less than ``1e-20`` of
  it per coordinate); otherwise (huge, tiny, zero or non-finite entries) the
  max-scaled two-pass norm runs instead, inside a ``lax.cond``, so the common case
  reads the gradient once.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  total = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros([], jnp.result_type(*leaves)))
  representable = jnp.isfinite(total) & (total >= 2.0**-60)
  return jax.lax.cond(representable, lambda: jnp.sqrt(total), lambda: tree_l2_norm(leaves))


def _dual_direction(g: Any, g_norm: jax.Array, p: Any) -> Any:
  """The unit-p-norm ``d`` maximising ``<d, g>``: ``sign(g)|g|^(q-1)/||g||_q^(q-1)``.

  Zero for a zero ``g``; NaN/Inf in ``g`` propagate. ``g_norm`` is ``||g||_2``.
  """
  if is_static_number(p) and p == 2:
    inv = 1.0 / jnp.where(g_norm == 0, jnp.inf, g_norm)
    return jax.tree.map(lambda x: x * inv, g)
  if is_static_number(p) and math.isinf(p):
    return jax.tree.map(jnp.sign, g)
  # General (or traced) p. q = 1 / (1 - 1/p) is 1 for p = inf. The formula is
  # invariant to scaling g, so divide by max|g| first to keep |g|^q in range.
  q = 1.0 / (1.0 - 1.0 / p)
  g_max = tree_max_abs(g)
  inv_max = 1.0 / jnp.where(g_max == 0, 1.0, g_max)
  u = jax.tree.map(lambda x: jnp.abs(x) * inv_max, g)
  s = sum(jax.tree.leaves(jax.tree.map(lambda a: jnp.sum(jnp.power(a, q)), u)),
          jnp.zeros([], g_max.dtype))
  inv_s = 1.0 / jnp.where(s == 0, 1.0, jnp.power(s, 1.0 / p))
  return jax.tree.map(lambda x, a: jnp.sign(x) * jnp.power(a, q - 1.0) * inv_s, g, u)


def _perturbation(
    grads: Any, params: Any, rho: Any, adaptive: bool, eta: Any, p: Any,
    norm: Callable[[Any], jax.Array] = _global_l2_norm,
) -> tuple[Any, jax.Array]:
  """Returns ``(e, ||g||_2)``, ``e`` in float32 under stop_gradient. ``norm`` is
  safe for |g| ~ 1e-30 and ~ 1e30 (both choices); under ``vmap`` (m-sharpness) the
  ``lax.cond`` of :func:`_global_l2_norm` would run both branches, so the two-pass
  ``tree_l2_norm`` is used there."""
  g = tree_upcast(grads)
  g_norm = norm(g)
  if adaptive:
    t = jax.tree.map(lambda w: jnp.abs(upcast(w)) + eta, params)
    tg = jax.tree.map(jnp.multiply, t, g)
    d = _dual_direction(tg, norm(tg), p)
    e = jax.tree.map(lambda t_, d_: rho * t_ * d_, t, d)
  else:
    e = jax.tree.map(lambda d_: rho * d_, _dual_direction(g, g_norm, p))
  return jax.lax.stop_gradient(e), g_norm


def _perturb(params: Any, e: Any) -> Any:
  """``w + e`` at float32 or wider (NOT rounded back to a bf16/f16 parameter dtype).

  Rounding ``w + e`` to bf16 would move each coordinate to the nearest bf16 value,
  and once ``|e_i|`` falls below half an ulp of ``w_i`` (``rho / sqrt(n)`` does as
  ``n`` grows) the perturbation largely vanishes: at ``rho = 0.05`` its norm was
  0.050 at 1e3 parameters but 0.017 at 1e5.
  """
  return jax.tree.map(lambda w, d: w.astype(d.dtype) + d, params, e)


def _default_rho(rho: Any, adaptive: bool) -> Any:
  """``rho`` if given, else 0.5 for ASAM (``adaptive=True``) and 0.05 for SAM."""
  if rho is None:
    return 0.5 if adaptive else 0.05
  return rho


def sam_perturbation(
    grads: Any,
    params: Any = None,
    *,
    rho: float | jax.Array | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    p: float | jax.Array = 2,
) -> Any:
  r"""The SAM / ASAM ascent step ``e`` for the gradient ``grads`` (global norm).

  .. math::
    e = \rho\, T\, \mathrm{sign}(T g) |T g|^{q-1} / \|T g\|_q^{q-1},
    \qquad 1/p + 1/q = 1,

  with ``T = 1`` (SAM) or ``T = |w| + eta`` (ASAM, ``adaptive=True``). ``p = 2``:
  ``e = rho T^2 g / ||T g||_2``; ``p = inf``: ``e = rho T sign(g)``. A zero
  gradient gives ``e = 0``; NaN/Inf propagate.

  Args:
    grads: gradient pytree at ``params``.
    params: the parameters (needed only when ``adaptive``).
    rho: neighbourhood radius, >= 0; None: 0.05, or 0.5 with ``adaptive=True``.
    adaptive: ASAM's parameter-scaled neighbourhood.
    eta: ASAM's offset in ``T_w = |w| + eta``.
    p: the neighbourhood's norm, ``p > 1`` (``math.inf`` allowed).

  Returns:
    ``e`` with the tree of ``grads``, float32 (or wider), under stop_gradient.

  Examples:
    >>> import jax.numpy as jnp
    >>> from regularizers import sam_perturbation
    >>> sam_perturbation({"w": jnp.array([3.0, 4.0])}, rho=0.5)["w"]
    Array([0.3, 0.4], dtype=float32)
  """
  rho = _default_rho(rho, adaptive)
  _check_sam_config(rho, eta, p)
  if adaptive and params is None:
    raise ValueError("sam_perturbation with adaptive=True needs params (T_w = |w| + eta).")
  return _perturbation(grads, params, rho, adaptive, eta, p)[0]


def sam(
    rho: float | jax.Array | None = None,
    *,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    p: float | jax.Array = 2,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimisation as a gradient-like transformation (SAM / ASAM).

  From the incoming gradient ``g`` at ``params`` it forms the ascent step ``e``
  (:func:`sam_perturbation`, norm global over the tree) and returns the gradient
  at the perturbed point,

  .. math::
    g_{sam} = \nabla L(w + \mathrm{sg}(e)), \qquad
    e = \rho\, g / \|g\|_2 \;\; (p = 2),

  evaluated by ONE call of the required keyword ``grad_fn(params) -> grads``.
  The optimizer chained after it steps from ``w`` (not ``w + e``). Chain it
  FIRST: ``optax.chain(sam(0.05), optax.sgd(...))``. A zero gradient gives
  ``e = 0`` (plain gradient); ``rho = 0`` returns ``grad_fn(params)``. A
  non-finite incoming gradient makes the whole output NaN, so that
  ``optax.apply_if_finite`` skips the step; finite gradients of any magnitude
  (1e-30 to 1e30) give the same ``e`` (the global norm is one pass of ``sum
  g^2`` when that is representable in float32, and is otherwise computed on the
  gradient divided by its largest entry). The state holds no parameter-sized
  arrays. ``params`` and ``grad_fn``'s output must match the updates' tree and
  shapes, leaves must be real floating point (``TypeError`` otherwise), and
  ``sam`` cannot run inside ``optax.masked``/``optax.partition`` (``grad_fn``
  needs the full params: ``ValueError``). See the module docstring for
  m-sharpness and the BatchNorm/dropout pattern. Under ``optax.MultiSteps`` the
  perturbation comes from the accumulated gradient, and ``grad_fn`` is evaluated
  once, with the batch of the call that completes the accumulation.

  Low-precision parameters: ``grad_fn`` receives ``w + e`` in float32 (the
  parameters' dtype promoted to at least float32), not rounded back to bf16/f16,
  so the perturbation it sees has norm ``rho`` to float32 accuracy whatever the
  model size (rounded to bf16 it was 0.017 instead of 0.05 at 1e5 parameters, and
  shrinks further with ``n``, since each ``|e_i| ~ rho / sqrt(n)`` falls below half
  a bf16 ulp of ``w_i``). ``grad_fn`` must accept float32 parameters; its gradient
  is cast back to the updates' dtype. The transient perturbed copy is float32 (4
  bytes per parameter instead of 2). A model that casts its parameters down to
  bf16 inside its forward pass still rounds ``w + e`` there, so its loss and
  gradient are those at ``bf16(w + e)`` and it loses the same part of the
  perturbation as before (0.017 of 0.05 at 1e5 bf16 parameters), whatever the
  dtype of its stored parameters; only a forward pass on the float32 parameters
  (e.g. bf16 activations but float32 weights) keeps the full radius. Sharpness
  diagnostics:
  ``hessian_top_eigenvalue`` and ``directional_sharpness`` (re-exported here
  from ``optimizers``).

  Args:
    rho: neighbourhood radius (>= 0). None (the default): 0.05, SAM's
      default, or 0.5 with ``adaptive=True``, ASAM's recommended radius (the
      neighbourhood is measured relative to ``|w| + eta``, so it needs a larger
      radius). Measured on the demo byte-level LM (d_model 32, 2 layers,
      150 steps of AdamW 3e-3, 3 seeds; ``python -m bench.reference_defaults
      --groups asam_rho``): validation loss 2.869 +- 0.076 at rho 0.5 vs
      2.835 +- 0.089 at rho 0.05 (plain AdamW: 2.831), 0.5 worse on each seed
      by 0.02-0.05. That short run is far from overfitting, where a larger
      neighbourhood only slows training; the default follows ASAM's
      recommendation for the generalisation regime it targets, so measure on
      your own task.
    adaptive: ASAM: scale the neighbourhood by ``T_w = |w| + eta`` elementwise,
      ``e = rho T_w^2 g / ||T_w g||_2`` for ``p = 2``.
    eta: ASAM's offset (>= 0).
    p: norm of the neighbourhood, ``p > 1``; a Python number selects the
      specialised path (``2``, ``math.inf``: ``e = rho sign(g)``); an array is
      handled by the general formula.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params, *, grad_fn)`` requires ``params`` and ``grad_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from regularizers import sam
    >>> loss = lambda w: jnp.sum(w ** 2)
    >>> tx = optax.chain(sam(0.1), optax.sgd(0.1))
    >>> w = jnp.array([3.0, 4.0]); state = tx.init(w)
    >>> updates, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
    >>> updates  # -0.1 * 2 * (w + 0.1 * w / |w|)
    Array([-0.612, -0.816], dtype=float32)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  rho = _default_rho(rho, adaptive)
  _check_sam_config(rho, eta, p)

  def init_fn(params: optax.Params) -> SAMState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return SAMState(count=jnp.zeros([], jnp.int32), grad_norm=zero, perturbation_norm=zero)

  def update_fn(
      updates: optax.Updates,
      state: SAMState,
      params: optax.Params | None = None,
      *,
      grad_fn: Callable[[optax.Params], optax.Updates] | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, SAMState]:
    del extra_args
    if grad_fn is None:
      raise ValueError("sam: update requires the keyword argument grad_fn(params) -> grads.")
    if params is None:
      raise ValueError("sam: update requires params (the point to perturb).")
    reject_masked_nodes(params, owner="sam", reason="grad_fn needs the full params.")
    check_real_floating(updates, owner="sam")
    check_real_floating(params, owner="sam", name="params")
    check_tree_match(updates, params, owner="sam", name="params")
    e, g_norm = _perturbation(updates, params, rho, adaptive, eta, p)
    sam_grads = grad_fn(_perturb(params, e))
    expected, got = jax.tree.structure(updates), jax.tree.structure(sam_grads)
    if expected != got:
      raise ValueError(
          f"sam: grad_fn returned a tree {got}, expected the updates' tree {expected}.")
    check_tree_match(updates, sam_grads, owner="sam", name="grad_fn(params)")
    finite = jnp.isfinite(g_norm)
    new_updates = jax.tree.map(
        lambda s, u: jnp.where(finite, s.astype(u.dtype), jnp.nan).astype(u.dtype),
        sam_grads, updates,
    )
    if is_static_number(p) and p == 2 and not adaptive:
      e_norm = jnp.where(g_norm == 0, 0.0, rho * jnp.ones_like(g_norm))
    else:
      e_norm = tree_l2_norm(e)
    new_state = SAMState(
        count=optax.safe_increment(state.count),
        grad_norm=g_norm.astype(jnp.float32),
        perturbation_norm=jnp.asarray(e_norm, jnp.float32),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def m_sharpness_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    num_groups: int,
    rho: float | jax.Array | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    p: float | jax.Array = 2,
    groups_per_pass: int | None = None,
    axis_name: str | None = None,
) -> Any:
  r"""m-sharpness SAM gradient: each group of examples uses its own perturbation.

  The batch (every leaf has the example axis first) is split into
  ``num_groups`` groups ``B_k`` of ``m = B / num_groups`` examples, and

  .. math::
    g_k = \nabla L_{B_k}(w), \quad e_k = \rho\, g_k / \|g_k\|_2, \quad
    g = \frac{1}{K} \sum_k \nabla L_{B_k}(w + \mathrm{sg}(e_k)).

  Groups run ``groups_per_pass`` at a time under ``vmap`` (all at once by
  default; the transient memory is one perturbed parameter copy per group in a
  pass), passes in a ``lax.scan``. Inside ``shard_map`` over a data axis, give
  ``axis_name``: each device then splits its LOCAL batch into ``num_groups``
  groups and the result is averaged over the axis (``pmean``), which is the
  reference implementation's per-device perturbation with ``num_groups=1``.
  As in :func:`sam`, ``loss_fn`` sees each perturbed point in float32 (not
  rounded back to bf16 parameters).
  Feed the result to the base optimizer directly (no :func:`sam` in the chain).
  The cost is two gradient evaluations of the batch, as for :func:`sam`.

  Args:
    loss_fn: ``loss_fn(params, group_batch) -> scalar``, the mean loss of a group.
    params: the parameters.
    batch: pytree of arrays with a leading example axis divisible by ``num_groups``.
    num_groups: number of groups ``K`` (``m = B / K``); 1 is plain SAM.
    rho: neighbourhood radius (>= 0); None: 0.05, or 0.5 with ``adaptive=True``.
    adaptive: ASAM perturbation per group.
    eta: ASAM's offset.
    p: norm of the neighbourhood (see :func:`sam`).
    groups_per_pass: groups processed together by ``vmap``; must divide
      ``num_groups``. None: all of them.
    axis_name: the ``shard_map`` data axis to average over, or None.

  Returns:
    The averaged SAM gradient, same tree and dtypes as ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from regularizers import m_sharpness_gradient
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> m_sharpness_gradient(loss, jnp.ones(2), x, num_groups=2).shape
    (2,)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (section 4.1).
  """
  rho = _default_rho(rho, adaptive)
  _check_sam_config(rho, eta, p)
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got num_groups={num_groups!r}.")
  groups_per_pass = num_groups if groups_per_pass is None else groups_per_pass
  if not isinstance(groups_per_pass, int) or groups_per_pass < 1 or num_groups % groups_per_pass:
    raise ValueError(
        f"groups_per_pass must be a positive int dividing num_groups={num_groups}, "
        f"got groups_per_pass={groups_per_pass!r}."
    )
  sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes or next(iter(sizes)) % num_groups:
    raise ValueError(
        f"batch leaves need one common leading example axis divisible by "
        f"num_groups={num_groups}; got leading sizes {sorted(map(str, sizes))}."
    )
  if axis_name is not None:
    # Per-device gradients: without this, grad w.r.t. replicated params inside
    # shard_map is summed over the axis (the transpose of the implicit pcast).
    params = jax.lax.pcast(params, axis_name, to="varying")
  num_passes = num_groups // groups_per_pass
  chunks = jax.tree.map(
      lambda x: x.reshape(num_passes, groups_per_pass, x.shape[0] // num_groups, *x.shape[1:]),
      batch,
  )
  grad = jax.grad(loss_fn)

  def group_sam_grad(group: Any) -> Any:
    e, _ = _perturbation(grad(params, group), params, rho, adaptive, eta, p, tree_l2_norm)
    return tree_upcast(grad(_perturb(params, e), group))

  def one_pass(total: Any, chunk: Any) -> tuple[Any, None]:
    grads = jax.vmap(group_sam_grad)(chunk)
    return jax.tree.map(lambda t, g: t + jnp.sum(g, axis=0), total, grads), None

  zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, compute_dtype(w)), params)
  if axis_name is not None:
    zeros = jax.lax.pcast(zeros, axis_name, to="varying")
  total, _ = jax.lax.scan(one_pass, zeros, chunks)
  mean = jax.tree.map(lambda t: t / num_groups, total)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return jax.tree.map(lambda m, w: m.astype(w.dtype), mean, params)
