r"""Trion: Newton–Schulz orthogonalised momentum in a DCT subspace (SVD-free Dion).

For every matrix leaf ``G`` (viewed as ``(*batch, m, n)``, see
:mod:`optimizers.matrices`), oriented as ``(k, d)`` with the projected dimension
``d`` last (:func:`optimizers.subspace`'s ``side``), with ``C`` the orthonormal
DCT-II matrix of size ``d``:

1. ``A = M + G`` (``M``: a full-size momentum buffer);
2. ``T = A C^T``; keep the ``r`` columns ``S`` of ``T`` with the largest scores
   (``l1`` column norms by default, as the reference code);
3. ``a = T[:, S] = A C_S^T`` (``k x r``), ``O = NS(a)`` (Newton–Schulz polar factor,
   :func:`optimizers.orthogonalize`), direction ``O C_S`` (``k x d``);
4. ``M <- A - (1 - mu) a C_S``: the selected part of the momentum decays by ``mu``, the
   rest is kept whole (error feedback: nothing the projection drops is lost).

The direction is scaled by ``sqrt(max(1, fan_out / fan_in))`` (Muon's shape factor;
the reference's ``"kj"`` scaling of a torch ``(out, in)`` weight). Leaves that are not
matrices (biases, norms, and whatever ``weight_dimension_numbers`` leaves out, such as
embeddings) take AdamW, as in the reference. Steps 2–3 are :func:`optimizers.subspace`
with a :func:`optimizers.dct_projector` and a Newton–Schulz inner transformation; the
buffer ``M`` is the only full-size state (as Muon's momentum), plus ``r`` int32 indices
per matrix. No SVD, QR or eigendecomposition.

Sharding. On a device mesh the DCT selection runs on whole rows and the Newton–Schulz
iterations on whole ``k x r`` matrices on owner devices (:mod:`optimizers.distributed`,
``sharding_strategy``): one all-to-all in and one out per group of projected momenta,
no collective inside the iterations. The rank-space momenta keep the parameter's mesh
axes on the batch and kept axes, the rank axis replicated; the specs are read from the
arrays' types under ``AxisType.Explicit`` mesh axes and derived from ``param_specs``
under ``Auto`` axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import (
  check_choice,
  check_floating_dtype,
  check_int,
  check_interval,
  check_nonnegative,
  check_real_floating,
)
from optimizers._moments import scale_by_adam
from optimizers._sharding import box_value, is_box, reshard_like
from optimizers.distributed import STRATEGIES, map_matrix_leaves
from optimizers.linalg import NS_COEFFS, orthogonalize
from optimizers.matrices import MatrixDims, WeightDimensionNumbers, resolve_matrix_dims
from optimizers.projectors import dct_projector
from optimizers.spectral import scale_by_shape_factor
from optimizers.subspace import (
  SubspaceState,
  _from_oriented,
  _low_spec,
  _oriented_specs,
  _plans,
  subspace,
)

__all__ = ["TrionState", "scale_by_trion", "trion"]


class TrionState(NamedTuple):
  """State of :func:`scale_by_trion`.

  Attributes:
    momentum: params-shaped: the error-feedback buffer ``M`` of matrix leaves and
      Adam's first moment of the other leaves (dtype ``mu_dtype``, default the
      parameter's).
    nu: Adam's second moment of the non-matrix leaves (``nu_dtype``); a float32
      scalar placeholder for matrix leaves.
    count: Adam's step count (bias correction), int32.
    subspace: the :func:`optimizers.subspace` state (the kept DCT indices).
  """

  momentum: Any
  nu: Any
  count: jax.Array
  subspace: SubspaceState


def _orthogonalized(ns_steps: int, coeffs: Any, specs: list | None = None,
                    strategy: str = "auto", seen: list | None = None
                    ) -> optax.GradientTransformation:
  """Stateless: Newton–Schulz polar factor of every leaf with ndim >= 2 (the low-rank
  momenta inside :func:`subspace`, viewed over their last two axes), sharded ones whole
  on owner devices (:func:`optimizers.distributed.map_matrix_leaves`); scalar
  placeholders pass through. ``specs``: per leaf (tree order) its ``PartitionSpec`` or
  None, for ``Auto`` mesh axes (Explicit axes: read from the arrays). ``seen``: a list
  that receives the input leaves (the projections ``a = A C_S^T``, which the buffer
  update reuses instead of projecting ``A`` a second time)."""
  ortho = lambda x: orthogonalize(x, ns_steps=ns_steps, coeffs=coeffs)

  def update_fn(updates, state, params=None):
    del params
    with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [x for _, x in with_path]
    if seen is not None:
      seen[:] = leaves
    dims = [MatrixDims() if x.ndim >= 2 else None for x in leaves]
    out = map_matrix_leaves(ortho, leaves, dims, param_specs=specs, strategy=strategy,
                            names=[jax.tree_util.keystr(p) for p, _ in with_path])
    return treedef.unflatten(out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _is_dims_leaf(x: Any) -> bool:
  return x is None or isinstance(x, MatrixDims)


def _entries(tree: Any) -> tuple[list, Any]:
  """The leaves of ``tree`` with flax boxes (linen ``Partitioned``, nnx variables) kept whole."""
  return jax.tree.flatten(tree, is_leaf=is_box)


def _val(entry: Any) -> Any:
  return box_value(entry) if is_box(entry) else entry


def _like(entry: Any, value: Any) -> Any:
  """``value`` in ``entry``'s box (if it has one): parameter-shaped state keeps the box."""
  return jax.tree.unflatten(jax.tree.structure(entry), [value]) if is_box(entry) else value


def scale_by_trion(
    rank: int,
    *,
    momentum: float | jax.Array = 0.95,
    ns_steps: int = 5,
    ns_coeffs: str | tuple[float, float, float] = "muon",
    score: str = "l1",
    update_every: int = 1,
    side: str = "smaller",
    method: str = "auto",
    adam_b1: float | jax.Array = 0.9,
    adam_b2: float | jax.Array = 0.95,
    adam_eps: float | jax.Array = 1e-8,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    param_specs: Any = None,
    sharding_strategy: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Trion's direction (module docstring) for matrix leaves, Adam's for the others.

  Args:
    rank: kept DCT columns per matrix (clamped to ``min(m, n)``).
    momentum: ``mu``, the decay of the selected part of the buffer (reference 0.95).
    ns_steps: Newton–Schulz iterations (reference 5).
    ns_coeffs: a preset of :data:`optimizers.linalg.NS_COEFFS` or ``(a, b, c)``
      (reference: Muon's).
    score: DCT column score, ``"l1"`` (reference) or ``"l2"``.
    update_every: selection period (reference: every step).
    side: projected dimension (see :func:`optimizers.subspace`; reference: the smaller).
    method: DCT application (see :func:`optimizers.dct_transform`).
    adam_b1: Adam ``beta1`` of the non-matrix leaves (reference 0.9).
    adam_b2: Adam ``beta2`` of the non-matrix leaves (reference 0.95).
    adam_eps: Adam ``eps`` of the non-matrix leaves.
    mu_dtype: storage dtype of the buffer ``M`` and Adam's first moment.
    nu_dtype: storage dtype of Adam's second moment.
    weight_dimension_numbers: matrix view (see :func:`optimizers.subspace`).
    param_specs: the params' ``PartitionSpec`` tree (``None``: replicated), needed for
      the owner path of sharded matrices under ``Auto`` mesh axes (the DCT selection
      and the Newton–Schulz iterations; see :func:`optimizers.subspace`).
    sharding_strategy: how sharded matrices are distributed (see
      :mod:`optimizers.distributed`): ``"auto"`` (default), ``"owner"`` or
      ``"replicate"`` run the DCT selection on whole rows and Newton–Schulz on whole
      projected matrices, ``"gspmd"`` leaves both to the partitioner.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (updates in the gradient's dtype).
  """
  check_int("ns_steps", ns_steps, minimum=0)
  if isinstance(ns_coeffs, str):
    check_choice("ns_coeffs", ns_coeffs, tuple(NS_COEFFS))
  check_interval("momentum", momentum, 0.0, 1.0)
  check_interval("adam_b1", adam_b1, 0.0, 1.0)
  check_interval("adam_b2", adam_b2, 0.0, 1.0)
  check_nonnegative("adam_eps", adam_eps)
  mu_dtype = check_floating_dtype("mu_dtype", mu_dtype)
  nu_dtype = check_floating_dtype("nu_dtype", nu_dtype)
  check_choice("sharding_strategy", sharding_strategy, STRATEGIES)
  projector = dct_projector(rank, update_every=update_every, score=score, method=method)
  adam = scale_by_adam(adam_b1, adam_b2, adam_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  subspace(_orthogonalized(ns_steps, ns_coeffs), projector, side=side)  # validates side

  def matrix_dims(tree):
    """Per leaf of :func:`_entries` (flax boxes count as their array; ``None`` params have
    no entry): its MatrixDims or None."""
    dims = jax.tree.leaves(resolve_matrix_dims(weight_dimension_numbers, tree),
                           is_leaf=_is_dims_leaf)
    entries = jax.tree.leaves(tree, is_leaf=lambda x: x is None or is_box(x))
    return [d for d, e in zip(dims, entries, strict=True) if e is not None]

  def wrapper(dims, specs=None, low_specs=None, seen=None):
    """The subspace of the matrix leaves ``dims``; ``specs``: the params' specs (None
    for the other leaves), ``low_specs``: those of the projected momenta (a list);
    ``seen`` receives the projected momenta (see :func:`_orthogonalized`)."""
    inner = _orthogonalized(ns_steps, ns_coeffs, low_specs, sharding_strategy, seen)
    return subspace(inner, projector, side=side, weight_dimension_numbers=dims,
                    param_specs=specs, sharding_strategy=sharding_strategy)

  def rank_specs(tree, dims, specs):
    """Per leaf of ``tree`` the ``PartitionSpec`` of its projected momentum ``(*batch, k,
    r)`` (as :func:`optimizers.subspace_partition_specs` places it: the parameter's mesh
    axes on the batch and kept axes, the rank axis replicated), None if unknown."""
    if specs is None:
      return None
    leaves, treedef, plans = _plans(tree, dims, projector.rank, side)
    return [None if o is None else _low_spec(o)
            for o in _oriented_specs(leaves, plans, specs, treedef)]

  scalar = lambda: jnp.zeros((), jnp.float32)
  up = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))

  def init_fn(params):
    if not jax.tree.leaves(params):  # optax.tree_map_params' placeholder
      return TrionState(params, params, jnp.zeros([], jnp.int32), wrapper(None).init(params))
    ps, pdef = _entries(params)
    dims = matrix_dims(params)
    zeros = lambda o, dtype: _like(o, jnp.zeros_like(_val(o), dtype=dtype or _val(o).dtype))
    # The subspace sees the matrix leaves unboxed and a scalar for every other leaf.
    sub_in = pdef.unflatten([scalar() if d is None else _val(o)
                             for o, d in zip(ps, dims, strict=True)])
    return TrionState(
        momentum=pdef.unflatten([zeros(o, mu_dtype) for o in ps]),  # M, or Adam's mu
        nu=pdef.unflatten([scalar() if d is not None else zeros(o, nu_dtype)
                           for o, d in zip(ps, dims, strict=True)]),
        count=jnp.zeros([], jnp.int32),
        subspace=wrapper(pdef.unflatten(dims)).init(sub_in),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_real_floating(updates, owner="trion")
    gs, gdef = _entries(updates)
    dims = matrix_dims(updates)
    ms, mdef = _entries(state.momentum)
    ns, ndef = _entries(state.nu)
    is_matrix = [d is not None for d in dims]
    acc = [up(_val(m)) + up(_val(g)) if f else scalar()
           for g, m, f in zip(gs, ms, is_matrix, strict=True)]
    sub_dims = gdef.unflatten(dims)
    sub_specs = None if param_specs is None else gdef.unflatten(
        [s if f else None for s, f in zip(gdef.flatten_up_to(param_specs), is_matrix,
                                          strict=True)])
    acc_tree, lows = gdef.unflatten(acc), []
    directions, sub_state = wrapper(
        sub_dims, sub_specs, rank_specs(acc_tree, sub_dims, sub_specs), lows).update(
            acc_tree, state.subspace)
    selected = _selected_part(acc_tree, lows, sub_state, sub_dims, projector, side)
    # Adam on the other leaves (a scalar stands in for each matrix leaf)
    vec = lambda x, f: jnp.zeros((), x.dtype) if f else x
    adam_out, adam_state = adam.update(
        [vec(_val(g), f) for g, f in zip(gs, is_matrix, strict=True)],
        optax.ScaleByAdamState(
            state.count, [vec(_val(m), f) for m, f in zip(ms, is_matrix, strict=True)],
            [n if f else _val(n) for n, f in zip(ns, is_matrix, strict=True)]))
    out = [_like(g, (d if f else a).astype(_val(g).dtype)) for g, d, a, f in zip(
        gs, jax.tree.leaves(directions), adam_out, is_matrix, strict=True)]
    new_momentum = [
        _like(m, (a - (1 - momentum) * sel).astype(_val(m).dtype) if f else mu)
        for m, a, sel, mu, f in zip(ms, acc, selected, adam_state.mu, is_matrix, strict=True)]
    nu = [n if f else _like(n, v) for n, v, f in zip(ns, adam_state.nu, is_matrix, strict=True)]
    return gdef.unflatten(out), TrionState(mdef.unflatten(new_momentum), ndef.unflatten(nu),
                                           adam_state.count, sub_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _selected_part(acc: Any, lows: list, sub_state: SubspaceState, dims: Any, projector,
                   side: str) -> list:
  """``A C_S^T C_S`` per matrix leaf of ``acc`` on the indices just selected (zeros for
  the other leaves), as a list in leaf order; ``lows``: the projections ``A C_S^T`` (the
  inner transformation's input, per leaf), mapped back (no second projection of ``A``:
  on a mesh that would all-reduce a sharded contraction), in the leaf's sharding."""
  leaves, treedef, plans = _plans(acc, dims, projector.rank, side)
  indices = jax.tree.leaves(sub_state.projector_state.indices)  # unboxed (see subspace)
  out = []
  for x, low, plan, idx in zip(leaves, lows, plans, indices, strict=True):
    if plan is None:
      out.append(jnp.zeros_like(x))
      continue
    pstate = type(sub_state.projector_state)(idx)
    full = projector.back_project(low.astype(x.dtype), pstate, plan.d)
    out.append(reshard_like(_from_oriented(full, plan, x.shape), x))
  return out


def trion(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    momentum: float | jax.Array = 0.95,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    ns_steps: int = 5,
    ns_coeffs: str | tuple[float, float, float] = "muon",
    score: str = "l1",
    update_every: int = 1,
    side: str = "smaller",
    method: str = "auto",
    shape_factor: bool = True,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float | jax.Array = 0.9,
    adam_b2: float | jax.Array = 0.95,
    adam_eps: float | jax.Array = 1e-8,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    param_specs: Any = None,
    sharding_strategy: str = "auto",
) -> optax.GradientTransformation:
  r"""Trion (Modoranu et al.): DCT low-rank, Newton–Schulz orthogonalised momentum.

  Matrix leaves: ``W <- W - lr (a O C_S + weight_decay W)`` with the orthogonalised
  low-rank momentum ``O C_S`` of :func:`scale_by_trion` (module docstring) and the shape
  factor ``a = sqrt(max(1, fan_out / fan_in))``. Other leaves: AdamW with
  ``adam_learning_rate`` (default: ``learning_rate``, as ``optax.contrib.muon``; the
  reference trains them with a separate, smaller rate: pass one). State: a full-size
  buffer per matrix (as Muon) and ``r`` int32 indices; no SVD. ``mu_dtype`` / ``nu_dtype``
  store the buffer and Adam's first moment / Adam's second moment in a low dtype (the
  update is computed in float32). On the demo language model (``bench/lowrank_defaults.py``:
  300 steps, rank 16, peak rates 2e-2 / 3e-3) the validation loss is 2.471 (``dct_adamw``
  at 3e-3: 2.422), and 2.471 again with bf16 state (difference +0.0001).

  Args:
    learning_rate: scalar or schedule of the matrix leaves (reference default 0.02).
    rank: kept DCT columns per matrix (clamped to ``min(m, n)``).
    momentum: decay ``mu`` of the selected part of the buffer (reference 0.95).
    weight_decay: decoupled weight decay (both groups, times their learning rates).
    mask: weight-decay mask (as ``optax.adamw``).
    ns_steps: Newton–Schulz iterations.
    ns_coeffs: Newton–Schulz coefficients (preset name or ``(a, b, c)``).
    score: DCT column score, ``"l1"`` (reference) or ``"l2"``.
    update_every: selection period.
    side: projected dimension (see :func:`optimizers.subspace`).
    method: DCT application.
    shape_factor: multiply the matrix directions by ``sqrt(max(1, fan_out / fan_in))``.
    adam_learning_rate: scalar or schedule of the non-matrix leaves (None: ``learning_rate``).
    adam_b1: Adam ``beta1`` of the non-matrix leaves.
    adam_b2: Adam ``beta2`` of the non-matrix leaves (reference 0.95).
    adam_eps: Adam ``eps`` of the non-matrix leaves.
    mu_dtype: storage dtype of the momentum buffer and Adam's first moment.
    nu_dtype: storage dtype of Adam's second moment.
    weight_dimension_numbers: matrix view (see :func:`optimizers.subspace`).
    param_specs: the params' ``PartitionSpec`` tree, needed for the owner path of
      sharded matrices under ``Auto`` mesh axes (see :func:`scale_by_trion`).
    sharding_strategy: how sharded matrices are distributed (see
      :func:`scale_by_trion`).

  Returns:
    An ``optax.GradientTransformation`` returning ``-lr * direction``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import trion
    >>> params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
    >>> opt = trion(0.02, rank=4)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((8, 16)), "b": jnp.ones(16)}, state, params)
    >>> updates["w"].shape, state[0].subspace.projector_state.indices["w"].shape
    ((8, 16), (4,))

  References:
    Modoranu et al., "SVD-free low-rank adaptive gradient optimization for large language
    models", https://arxiv.org/abs/2505.17967;
    Ahn et al., Dion, https://arxiv.org/abs/2504.05295;
    Jordan et al., Muon (2024), https://kellerjordan.github.io/posts/muon/
  """
  direction = scale_by_trion(
      rank, momentum=momentum, ns_steps=ns_steps, ns_coeffs=ns_coeffs, score=score,
      update_every=update_every, side=side, method=method, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
      weight_dimension_numbers=weight_dimension_numbers, param_specs=param_specs,
      sharding_strategy=sharding_strategy,
  )
  return optax.chain(
      direction,
      scale_by_shape_factor(weight_dimension_numbers) if shape_factor else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      _scale_by_learning_rates(learning_rate, adam_learning_rate, weight_dimension_numbers),
  )


def _scale_by_learning_rates(learning_rate, adam_learning_rate, weight_dimension_numbers):
  """``-lr`` on matrix leaves and ``-adam_lr`` on the others (one rate when None)."""
  if adam_learning_rate is None:
    return optax.scale_by_learning_rate(learning_rate)
  value = lambda lr, count: lr(count) if callable(lr) else lr

  def update_fn(updates, state, params=None):
    del params
    dims = resolve_matrix_dims(weight_dimension_numbers, updates)
    lr, adam_lr = value(learning_rate, state.count), value(adam_learning_rate, state.count)
    out = jax.tree.map(
        lambda d, u: u if u is None else (-(adam_lr if d is None else lr) * u).astype(u.dtype),
        dims, updates, is_leaf=_is_dims_leaf)
    return out, optax.ScaleByScheduleState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(
      lambda params: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), update_fn)
