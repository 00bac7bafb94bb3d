r"""The low-rank wrapper: any params-free optax transformation on projected matrix leaves.

:func:`subspace` runs an optax transformation (``scale_by_adam``,
``scale_by_lion``, ...) on low-rank projections of the matrix leaves of the
gradient and maps its output back to the full space. *Where* the subspace
comes from is a :class:`~optimizers.Projector` (:mod:`optimizers.projectors`:
DCT, online PCA, SVD); the full optimizers built on it are in
:mod:`optimizers.lowrank`, the PartitionSpecs of their states in
:mod:`optimizers.specs`.

Conventions. A matrix leaf is viewed as ``(*batch, m, n)`` by
:mod:`optimizers.matrices` (default: the last two axes, leading axes are
stacked layers). One of the two dimensions is *projected* (reduced to the rank
``r``), the other is *kept*; internally every matrix is oriented as
``(*batch, k, d)`` with the projected dimension ``d`` last, so a basis is
``Q`` of shape ``(*batch, d, r)`` with orthonormal columns, the low-rank
gradient is ``G Q`` of shape ``(*batch, k, r)`` and the back-projection of a
low-rank update ``U`` is ``U Q^T``.

Sharding. Low-rank tensors (the inner optimizer's moments) keep the
parameter's sharding on the batch and kept axes and are replicated along the
rank axis; projector arrays (indices, bases) are sharded like the parameter's
batch axes and replicated otherwise (SVD bases: also along the projected axis,
``Projector.shards_basis``). A refresh of a sharded matrix runs on an
owner path of :mod:`optimizers.distributed` (``sharding_strategy``): the DCT
selection and the online-PCA step on whole rows (one all-to-all of the
gradient's block in, the ``k x r`` projection all-gathered back, small
reductions between), the SVD of every sharded leaf on whole matrices in one
packed round trip (one all-to-all in; each device's rows of the ``d x r`` bases
back by a second all-to-all). The sharding is read from the arrays'
types under ``AxisType.Explicit`` mesh axes and from ``param_specs`` under
``Auto`` axes. Otherwise (``sharding_strategy="gspmd"``, no sharding
information) the gradient is resharded so that the projected axis is unsharded
before the transforms (FFT, top-k and SVD need it whole; under Explicit axes)
and the partitioner decides. The update is resharded back to the gradient's
sharding.
"""

from __future__ import annotations

import importlib
import math
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_choice, check_positive, check_real_floating
from optimizers._sharding import explicit_mesh, is_box, reshard, reshard_like, spec_of, unshard_axes
from optimizers._trees import upcast
from optimizers.distributed import STRATEGIES, matrix_view_spec
from optimizers.matrices import (
  WeightDimensionNumbers,
  from_matrix,
  matrix_shape,
  resolve_matrix_dims,
  to_matrix,
)
from optimizers.projectors import Projector

__all__ = ["SubspaceState", "subspace"]

_SIDES = ("smaller", "larger", "reduction", "output")
_ON_REFRESH = ("keep", "reset", "rotate")
# Names this module held before it was split, still importable from here (on first
# access: ``optimizers.lowrank`` imports this module).
_MOVED = {
    **dict.fromkeys(("dct_matrix", "dct_transform"), "optimizers.dct"),
    **dict.fromkeys(("DctProjectorState", "OnlinePcaProjectorState", "SvdProjectorState",
                     "dct_projector", "online_pca_gradient", "online_pca_loss",
                     "online_pca_projector", "svd_projector"), "optimizers.projectors"),
    **dict.fromkeys(("dct_adamw", "online_subspace_descent"), "optimizers.lowrank"),
    "subspace_partition_specs": "optimizers.specs",
}


def __getattr__(name: str) -> Any:
  if name in _MOVED:
    return getattr(importlib.import_module(_MOVED[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Per-leaf plans and state plumbing.
# ---------------------------------------------------------------------------


class SubspaceState(NamedTuple):
  """State of :func:`subspace`.

  Attributes:
    count: number of updates so far, int32 scalar.
    inner_state: the inner transformation's state, built on the low-rank tree
      (matrix leaves ``(*batch, k, r)``, other leaves full size).
    projector_state: the projector's per-matrix state NamedTuple; each field is
      a tree with the params' structure (a dummy int32/float32 scalar for
      leaves that are not projected).
  """

  count: jax.Array
  inner_state: optax.OptState
  projector_state: Any


class _Plan(NamedTuple):
  dims: Any
  project_m: bool  # True: the reduction dimension m is projected
  batch_shape: tuple[int, ...]
  k: int
  d: int
  r: int


def _plans(tree: Any, weight_dimension_numbers: WeightDimensionNumbers, rank: int, side: str):
  leaves, treedef = jax.tree.flatten(tree)
  dims = treedef.flatten_up_to(resolve_matrix_dims(weight_dimension_numbers, tree))
  plans = []
  for x, d in zip(leaves, dims, strict=True):
    if d is None or math.prod(x.shape) == 0:  # a zero-size leaf has nothing to project
      plans.append(None)
      continue
    batch, m, n = matrix_shape(x.shape, d)
    project_m = {"smaller": m < n, "larger": m > n, "reduction": True, "output": False}[side]
    k, dd = (n, m) if project_m else (m, n)
    plans.append(_Plan(d, project_m, batch, k, dd, min(rank, m, n)))
  return leaves, treedef, plans


def _oriented(x: jax.Array, plan: _Plan) -> jax.Array:
  v = to_matrix(x, plan.dims)
  return v.mT if plan.project_m else v


def _oriented_float32(x: jax.Array, plan: _Plan | None) -> jax.Array | None:
  """A projected leaf as its oriented ``(*batch, k, d)`` float32 view (None otherwise)."""
  return None if plan is None else upcast(_oriented(x, plan))


def _from_oriented(y: jax.Array, plan: _Plan, shape: tuple[int, ...]) -> jax.Array:
  return from_matrix(y.mT if plan.project_m else y, plan.dims, shape)


def _low_spec(oriented_spec: tuple) -> tuple:
  return oriented_spec[:-1] + (None,)


def _is_second_moment(path) -> bool:
  return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == "nu" for k in path)


def _transform_moments(inner, inner_state, treedef, plans, rotations):
  """The inner state with the rank-shaped leaves of projected leaves reset to zero
  (``rotations`` None) or rotated by ``rotations[i]`` (see :func:`subspace`)."""
  index_tree = treedef.unflatten(list(range(len(plans))))
  owner = optax.tree_map_params(
      inner, lambda _, i: i, inner_state, index_tree, transform_non_params=lambda _: -1
  )

  def apply(path, x, i):
    plan = plans[i] if i >= 0 else None
    if plan is None or x.shape != (*plan.batch_shape, plan.k, plan.r):
      return x
    if rotations is None:
      return jnp.zeros_like(x)
    rot = rotations[i] * rotations[i] if _is_second_moment(path) else rotations[i]
    return reshard_like((x.astype(jnp.float32) @ rot).astype(x.dtype), x)

  return jax.tree_util.tree_map_with_path(apply, inner_state, owner)


def _dummy_state(projector: Projector) -> Any:
  """The projector state of a leaf that is not projected: scalars of the right dtypes."""
  template = jax.eval_shape(lambda: projector.init((), 1, 1, 1))
  return jax.tree.map(lambda t: jnp.zeros((), t.dtype), template)


def _per_leaf(stacked: Any, treedef) -> list:
  """The projector state (a NamedTuple of trees) as a list of per-leaf NamedTuples."""
  fields = [treedef.flatten_up_to(f) for f in stacked]
  return [type(stacked)(*f) for f in zip(*fields, strict=True)]


def _stacked(per_leaf: list, treedef) -> Any:
  """Inverse of :func:`_per_leaf`."""
  return type(per_leaf[0])(*(treedef.unflatten(list(f)) for f in zip(*per_leaf, strict=True)))


def _init_leaf(projector: Projector, x: Any, plan: _Plan | None, dummy: Any):
  """``(low-rank zeros, projector state)`` of one leaf, placed like the parameter."""
  if plan is None:
    return x, dummy
  low = jnp.zeros((*plan.batch_shape, plan.k, plan.r), x.dtype)
  pstate = projector.init(plan.batch_shape, plan.k, plan.d, plan.r)
  mesh = explicit_mesh(x)
  if mesh is None:
    return low, pstate
  spec = spec_of(jax.eval_shape(lambda x: _oriented(x, plan), x))
  nb = len(plan.batch_shape)
  basis_spec = (*spec[:nb], spec[-1]) if projector.shards_basis else spec[:nb]
  return (reshard(low, _low_spec(spec), mesh), jax.tree.map(
      lambda a: reshard(a, basis_spec if a.ndim == nb + 2 else spec[:nb], mesh), pstate))


def _oriented_specs(leaves: list, plans: list, param_specs: Any, treedef) -> list:
  """Per projected leaf the ``PartitionSpec`` entries of its oriented ``(*batch, k, d)``
  view: from the type under Explicit axes, else from ``param_specs`` (None: unknown)."""
  flat = [None] * len(leaves) if param_specs is None else treedef.flatten_up_to(param_specs)
  out = []
  for x, plan, spec in zip(leaves, plans, flat, strict=True):
    if plan is None:
      out.append(None)
      continue
    if explicit_mesh(x) is not None:
      spec = spec_of(x)
    view = None if spec is None else matrix_view_spec(spec, x.shape, plan.dims)
    out.append(None if view is None else
               view[:-2] + ((view[-1], view[-2]) if plan.project_m else view[-2:]))
  return out


def _select(projector: Projector, gs: list, pstates: list, count: jax.Array, refresh: bool,
            sharded: Any = None, defer: bool = False):
  """Per leaf ``(g_low, used, next)`` (see :class:`Projector`): a refresh, or the
  projection on the kept state; leaves that are not projected keep their state.
  ``sharded``: ``(raw gradients, oriented specs, names, strategy)``, the leaves whose
  matrix axes are sharded are refreshed together by ``projector.sharded_refresh`` on
  their raw (parameter-sharded) oriented gradients. ``defer``: for those leaves
  ``g_low`` is None (refreshed or not), the caller projects on ``used`` once, after the
  ``lax.cond``."""
  specs = [None] * len(gs) if sharded is None else sharded[1]
  owned = [i for i, (g, spec) in enumerate(zip(gs, specs, strict=True))
           if g is not None and spec is not None and any(e is not None for e in spec[-2:])]
  out: list[Any] = [None] * len(gs)
  if refresh and owned:
    raws, _, names, strategy = sharded
    got = projector.sharded_refresh(
        [raws[i] for i in owned], [pstates[i] for i in owned], count,
        specs=[specs[i] for i in owned], strategy=strategy, names=[names[i] for i in owned])
    for i, low, used, nxt in zip(owned, *got, strict=True):
      out[i] = (None if defer else low, reshard_like(used, pstates[i]),
                reshard_like(nxt, pstates[i]))
  for i, (g, ps) in enumerate(zip(gs, pstates, strict=True)):
    if out[i] is not None:
      continue
    if g is None or (defer and i in owned):
      out[i] = (None, ps, ps)
    elif refresh:
      low, used, nxt = projector.refresh(g, ps, count)
      out[i] = (low, reshard_like(used, ps), reshard_like(nxt, ps))
    else:
      out[i] = (projector.project(g, ps), ps, ps)
  return tuple(list(x) for x in zip(*out, strict=True))


def _low_leaf(x: jax.Array, g: jax.Array | None, low: jax.Array | None) -> jax.Array:
  """What the inner transformation sees for one leaf: the full leaf, or its projection."""
  if g is None:
    return x
  return reshard(low.astype(x.dtype), _low_spec(spec_of(g)), explicit_mesh(g))


def _full_leaf(projector, scale, u, x, g, used, plan):
  """The inner update of one leaf back in the full space, in the leaf's dtype and sharding."""
  if plan is None:
    return u
  full = scale * projector.back_project(u.astype(g.dtype), used, plan.d)
  return reshard_like(_from_oriented(full, plan, x.shape).astype(x.dtype), x)


def _sharded_inputs(projector: Projector, strategy: str, updates: Any, raws: list,
                    leaves: list, plans: list, treedef, param_specs: Any) -> tuple | None:
  """What a projector's sharded refresh needs, or ``None`` (the partitioner's path): the
  oriented float32 matrices ``raws`` (in the parameter's sharding), their specs, the
  leaves' names and the strategy."""
  if projector.sharded_refresh is None or strategy == "gspmd":
    return None
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  return raws, _oriented_specs(leaves, plans, param_specs, treedef), names, strategy


def _state_layout(updates: Any, leaves: list, plans: list, treedef) -> tuple[Any, Any]:
  """``(pdef, state_def)``: the structure of the per-leaf projector state, and an object
  whose ``unflatten`` lays per-leaf values out as ``init_fn`` did. Boxed trees (flax
  variables): the projector state and the projected moments unboxed, the other moments in
  their parameter's box."""
  boxes, boxes_def = jax.tree.flatten(updates, is_leaf=is_box)
  if len(boxes) != len(leaves):
    return treedef, treedef

  def unflatten(values):
    return boxes_def.unflatten([
        jax.tree.unflatten(jax.tree.structure(o), [v]) if p is None and is_box(o) else v
        for o, v, p in zip(boxes, values, plans, strict=True)])

  return boxes_def, types.SimpleNamespace(unflatten=unflatten)


def subspace(
    inner: optax.GradientTransformation,
    projector: Projector,
    *,
    scale: float | jax.Array = 1.0,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    on_refresh: str = "keep",
    side: str = "smaller",
    param_specs: Any = None,
    sharding_strategy: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on low-rank projections of the matrix leaves.

  For every matrix leaf ``G`` (viewed as ``(*batch, m, n)``, see
  :mod:`optimizers.matrices`) with projected dimension ``d`` and basis ``Q``
  (``d x r``, from ``projector``):

  ``g = G Q``  (``k x r``),  ``u = inner(g)``,  ``update = scale * u Q^T``.

  Leaves that are not matrices (dims ``None``: ndim < 2 by default) go through
  ``inner`` at full rank and are not scaled. The subspace is refreshed by
  ``projector.refresh`` when ``count % projector.update_every == 0``
  (``lax.cond``; statically every step when ``update_every == 1``), including
  the first step.

  Which dimension is projected (``side``) and the memory it costs, for an
  ``m x n`` matrix with kept dimension ``k`` and rank ``r``:

  ======================== =============================== ===========================
  ``side``                 projected ``d``                 inner Adam state
  ======================== =============================== ===========================
  ``"smaller"`` (default)  ``min(m, n)`` (ties: ``n``)     ``2 max(m, n) r``
  ``"larger"``             ``max(m, n)`` (ties: ``n``)     ``2 min(m, n) r``
  ``"reduction"``          ``m``                           ``2 n r``
  ``"output"``             ``n``                           ``2 m r``
  ======================== =============================== ===========================

  plus the projector's state: :func:`dct_projector` ``r`` int32,
  :func:`svd_projector` ``d r`` float32, :func:`online_pca_projector`
  ``3 d r`` float32. The default projects the smaller dimension (the
  references' choice: the basis is the small one); with the DCT projector, whose
  state is only ``r`` integers, ``side="larger"`` gives the leanest state at the
  price of a size-``max(m, n)`` transform. ``optax.contrib.galore`` projects the
  larger dimension.

  The rank is clamped to ``min(m, n)`` per matrix (at ``r = min(m, n)`` the
  projection onto the smaller side is a full orthonormal change of basis).
  Leaves with a zero-size axis go to ``inner`` unprojected, an empty tree goes
  to ``inner`` as is, and integer or complex leaves raise ``TypeError``.

  On a refresh (``on_refresh``), the inner state's rank-shaped leaves (the
  moments of projected leaves; other leaves and counters are untouched) are:

  * ``"keep"``: left as they are (GaLore; Online Subspace Descent);
  * ``"reset"``: set to zero (counters such as Adam's ``count`` are not reset,
    so bias correction continues);
  * ``"rotate"``: mapped to the new basis by ``R = Q_old^T Q_new``
    (``r x r``): ``M -> M R``; leaves under a field named ``nu`` (optax's
    second moments) by ``R * R`` elementwise, which keeps them non-negative.
    For the DCT projector ``R`` is a partial permutation and both maps are
    exact: kept frequencies move with their moments, new ones start at zero.
    For a lagged projector (online PCA) the moments are rotated after the
    inner update, from the basis just used to the next one.

  Args:
    inner: a transformation that needs no params (``scale_by_adam``,
      ``scale_by_lion``, ``scale_by_rms``...). It receives neither params nor
      extra args.
    projector: a :class:`Projector` (``dct_projector``, ``svd_projector``,
      ``online_pca_projector``).
    scale: factor on the back-projected updates of matrix leaves (GaLore's
      ``alpha``), finite and ``> 0``.
    weight_dimension_numbers: which axes form the matrices (``None``: the last
      two axes of every leaf with ndim >= 2; a ``MatrixDims`` or optax
      Muon/GaLore dimension numbers for all such leaves; a pytree of those and
      ``None``; or a callable ``params -> pytree``). Stacked layers are batch
      axes, wherever they sit (e.g. ``MatrixDims(0, 2)`` for ``[m, L, n]``).
    on_refresh: ``"keep"``, ``"reset"`` or ``"rotate"``.
    side: ``"smaller"``, ``"larger"``, ``"reduction"`` or ``"output"``.
    param_specs: the params' ``PartitionSpec`` tree (``None``: replicated), for
      the owner path of sharded matrices under ``Auto`` mesh axes (under
      Explicit axes the arrays' types carry it).
    sharding_strategy: how a refresh of a sharded matrix is distributed (see
      :mod:`optimizers.distributed`): ``"auto"`` (default), ``"owner"`` or
      ``"replicate"`` take the owner path (DCT and online PCA on whole rows;
      the SVD on whole matrices, ``"owner"``/``"replicate"`` as in
      :func:`optimizers.distributed.owner_map`), ``"gspmd"`` leaves it to the
      partitioner.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; updates have the gradient's
    sign, dtype and sharding; matrix math runs in float32.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import subspace, dct_projector
    >>> tx = subspace(optax.scale_by_adam(), dct_projector(2), scale=0.25)
    >>> params = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    >>> updates, state = tx.update(grads, state)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (6,), 'w': (4, 6)}

  References:
    Zhao et al., GaLore, https://arxiv.org/abs/2403.03507;
    Modoranu et al., https://arxiv.org/abs/2505.17967;
    Liang et al., Online Subspace Descent, https://arxiv.org/abs/2408.12857
  """
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise TypeError(f"inner must be an optax GradientTransformation, got inner={inner!r}.")
  if not isinstance(projector, Projector):
    raise ValueError(f"projector must be a Projector, got projector={type(projector).__name__}.")
  check_positive("scale", scale)
  check_choice("on_refresh", on_refresh, _ON_REFRESH)
  check_choice("side", side, _SIDES)
  check_choice("sharding_strategy", sharding_strategy, STRATEGIES)
  inner = optax.with_extra_args_support(inner)
  rank, every = projector.rank, projector.update_every
  # A sharded leaf of a selection-type projector under a traced refresh condition is
  # projected once after the lax.cond (not in both branches: one reduction, not two).
  defer = not projector.lagged and not (isinstance(every, int) and every == 1)

  def init_fn(params):
    count, dummy = jnp.zeros([], jnp.int32), _dummy_state(projector)
    if not jax.tree.leaves(params):  # e.g. optax.tree_map_params' placeholder
      return SubspaceState(count, inner.init(params), jax.tree.map(lambda _: params, dummy))
    leaves, treedef, plans = _plans(params, weight_dimension_numbers, rank, side)
    lows, pstates = zip(*(_init_leaf(projector, x, p, dummy)
                          for x, p in zip(leaves, plans, strict=True)), strict=True)
    # Boxed params (flax linen nn.Partitioned / nnx variables) carry axis names for the
    # parameter's shape: full-size state keeps its parameter's box, projected state
    # (other shapes) and projector state are unboxed (see logical_partition_specs).
    outer, outer_def = jax.tree.flatten(params, is_leaf=is_box)
    if len(outer) == len(leaves):
      lows = [jax.tree.unflatten(jax.tree.structure(o), [low]) if plan is None and is_box(o)
              else low for o, low, plan in zip(outer, lows, plans, strict=True)]
      treedef = outer_def
    return SubspaceState(count, inner.init(treedef.unflatten(lows)), _stacked(pstates, treedef))

  def when(due, true_fn, false_fn, operand):
    """``lax.cond`` on a refresh being due (statically true with a refresh every step)."""
    if isinstance(every, int) and every == 1:
      return true_fn(operand)
    return jax.lax.cond(due, true_fn, false_fn, operand)

  def refit(inner_state, treedef, plans, old, new):
    """The inner state after the subspace moved from ``old`` to ``new`` (``on_refresh``)."""
    if on_refresh == "keep":
      return inner_state
    rotations = None if on_refresh == "reset" else [
        None if p is None else projector.change_of_basis(o, n)
        for p, o, n in zip(plans, old, new, strict=True)]
    return _transform_moments(inner, inner_state, treedef, plans, rotations)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_real_floating(updates, owner="subspace")
    count, next_count = state.count, optax.safe_int32_increment(state.count)
    if not jax.tree.leaves(updates):  # an empty tree: nothing to project
      inner_updates, inner_state = inner.update(updates, state.inner_state, None)
      return inner_updates, state._replace(count=next_count, inner_state=inner_state)
    leaves, treedef, plans = _plans(updates, weight_dimension_numbers, rank, side)
    raws = list(map(_oriented_float32, leaves, plans))
    gs = [None if r is None else unshard_axes(r, (-1,)) for r in raws]  # projected axis whole
    sharded = _sharded_inputs(projector, sharding_strategy, updates, raws, leaves, plans,
                              treedef, param_specs)
    pdef, state_def = _state_layout(updates, leaves, plans, treedef)
    pstates = _per_leaf(state.projector_state, pdef)

    def refreshed(inner_state):
      lows, used, nxt = _select(projector, gs, pstates, count, refresh=True, sharded=sharded,
                                defer=defer)
      if on_refresh == "reset" or not projector.lagged:  # lagged: rotated after the update
        inner_state = refit(inner_state, state_def, plans, pstates, used)
      return lows, used, nxt, inner_state

    def kept(inner_state):
      return (*_select(projector, gs, pstates, count, refresh=False, sharded=sharded,
                       defer=defer), inner_state)

    due = count % every == 0
    lows, used, nxt, inner_state = when(due, refreshed, kept, state.inner_state)
    # Deferred (owner-path) leaves: projected in the parameter's sharding (partial sums).
    lows = [projector.project(raw, us) if low is None and raw is not None else low
            for low, raw, us in zip(lows, raws, used, strict=True)]
    low_tree = state_def.unflatten(list(map(_low_leaf, leaves, gs, lows)))
    inner_updates, inner_state = inner.update(low_tree, inner_state, None)
    if on_refresh == "rotate" and projector.lagged:
      inner_state = when(due, lambda s: refit(s, state_def, plans, used, nxt), lambda s: s,
                         inner_state)
    out = [_full_leaf(projector, scale, u, x, g, us, plan) for u, x, g, us, plan in zip(
        jax.tree.leaves(inner_updates), leaves, gs, used, plans, strict=True)]
    new_state = SubspaceState(next_count, inner_state, _stacked(nxt, pdef))
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
