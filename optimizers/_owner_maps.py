r"""Owner maps whose per-matrix outputs differ from the inputs' layout, for the
low-rank projectors on sharded meshes (re-exported by :mod:`optimizers.distributed`):

* :func:`map_rows`: functions that treat rows independently (DCT column scores,
  the online-PCA step) get whole rows with one all-to-all over the column axes;
  partial sums over rows are reduced with :func:`row_psum` / :func:`row_pmax`
  and the per-row results are gathered back to the input's row sharding;
* :func:`owner_map`: whole matrices on owner devices (as
  :func:`~optimizers.distributed.owner_computes`) for functions returning
  results of other shapes (an SVD basis), which come back replicated over the
  matrix axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from optimizers._owners import (
    OwnedMatrix,
    PackedGroup,
    Packing,
    axis_names,
    check_strategy,
    group_matrices,
    packed_map,
    packs,
    resolve_sharding,
    warn_fallback,
)

__all__ = ["map_rows", "owner_map", "row_pmax", "row_psum"]


def row_psum(x: jax.Array, axis_name: Any) -> jax.Array:
  """``x`` summed over the devices of ``axis_name`` (``None``: ``x``): the reduction a
  function run by :func:`map_rows` applies to its partial sums over rows."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def row_pmax(x: jax.Array, axis_name: Any) -> jax.Array:
  """``x``'s elementwise maximum over the devices of ``axis_name`` (``None``: ``x``)."""
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _batch_spec(spec: tuple) -> P:
  return P(*spec[:-2])


def _split_axes(entry: Any, mesh: Any) -> tuple[str, ...]:
  """The mesh axes of a spec entry that split it (size > 1: a size-1 axis moves no data)."""
  return tuple(a for a in axis_names(entry) if mesh.shape[a] > 1)


def map_rows(
    fn: Callable[..., tuple[Any, Any]],
    x: jax.Array,
    *,
    operands: Sequence[Any] = (),
    args: Sequence[Any] = (),
    spec: Any = None,
    strategy: str = "auto",
    name: str = "matrix",
) -> tuple[Any, Any]:
  r"""Runs a row-separable matrix function with each device holding whole rows.

  For functions of ``X`` (``(*batch, k, d)``) that treat the rows independently
  except for sums over rows, e.g. a transform of every row followed by a
  selection from column scores ``s_f = sum_i T_if^2`` (DCT), or the projection
  ``B = X Q`` and the Gram products ``X^T B``, ``B^T B`` (online PCA). With the
  rows sharded over ``S_k`` devices and the columns over ``S_d``:

  1. one :func:`jax.lax.all_to_all` over the column mesh axes makes the last
     axis whole and splits the rows further: every device holds a
     ``(k / (S_k S_d)) x d`` slice of rows (the same bytes as its block, no
     padding, no device holding a copy of another's rows);
  2. ``fn(rows, *operands, *args, axis_name=axes)`` runs on it; it reduces its
     partial sums over rows with :func:`row_psum` / :func:`row_pmax` over
     ``axis_name`` (small: ``d``-vectors, ``d x r`` and ``r x r`` matrices);
  3. its *row outputs* (per row, e.g. ``X Q`` of shape ``(k_local, r)``) are
     all-gathered over the column axes back to the input's row sharding
     (replicated over the column axes); its *replicated outputs* (identical on
     every device of the group: indices, bases) are returned sharded like the
     batch axes.

  Per device the collective bytes are those of the local block (in) plus the
  row outputs' block (out) plus the reductions; no matrix of size ``k x d`` is
  ever replicated. Without column sharding there is no relayout. When ``S_k S_d``
  does not divide ``k`` the rows are all-gathered over the column axes instead
  (``S_d`` times the bytes, correct). Without sharding information (no mesh,
  ``Auto`` axes and no ``spec``, or ``strategy="gspmd"``) ``fn`` runs on the
  global array with ``axis_name=None`` (sums over all rows) and the partitioner
  decides; a spec that does not fit the array does the same with a warning.

  Args:
    fn: ``(rows, *operands, *args, axis_name) -> (row_out, rep_out)``; ``rows``
      is ``(*batch, k_local, d)``; ``row_out`` a pytree of arrays
      ``(*batch, k_local, ...)``; ``rep_out`` a pytree of arrays ``(*batch, ...)``
      made identical across ``axis_name`` by the reductions. No other collective.
    x: the matrices, ``(*batch, k, d)``.
    operands: per-matrix arrays ``(*batch, ...)`` sharded like the batch axes
      and replicated otherwise (e.g. a basis and its moments).
    args: replicated extra operands (scalars).
    spec: ``x``'s ``PartitionSpec`` (read from the type under Explicit axes).
    strategy: ``"gspmd"`` runs ``fn`` on the global arrays; any other value of
      ``STRATEGIES`` takes the row layout.
    name: the matrix's name for the fallback warning.

  Returns:
    ``(row_out, rep_out)``: row outputs ``(*batch, k, ...)`` sharded like ``x``'s
    batch and row axes, replicated outputs ``(*batch, ...)`` like its batch axes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P, AxisType
    >>> from optimizers.distributed import map_rows, row_psum
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Explicit,))
    >>> x = jax.random.normal(jax.random.key(0), (2 * n, 4 * n))
    >>> w = jax.device_put(x, jax.NamedSharding(mesh, P(None, "x")))  # columns sharded
    >>> def fn(rows, axis_name):  # every row's cumulative sum, and the column sums
    ...   return jnp.cumsum(rows, -1), row_psum(rows.sum(-2), axis_name)
    >>> cums, cols = map_rows(fn, w)
    >>> bool(jnp.allclose(cums, jnp.cumsum(x, -1))), bool(jnp.allclose(cols, x.sum(0)))
    (True, True)

  References:
    Modoranu et al., DCT projection, https://arxiv.org/abs/2505.17967;
    Liang et al., Online Subspace Descent, https://arxiv.org/abs/2408.12857
  """
  check_strategy(strategy)
  if x.ndim < 2:
    raise ValueError(f"x must have ndim >= 2, got shape {x.shape}")
  operands, args = tuple(operands), tuple(args)
  item = OwnedMatrix(0, x, name)
  why = "gspmd" if strategy == "gspmd" else resolve_sharding(item, spec)
  if why not in ("gspmd", "local", "unknown", None):
    warn_fallback(name, why)
  if why or not (axis_names(item.spec[-2]) or axis_names(item.spec[-1])):
    return fn(x, *operands, *args, axis_name=None)
  mesh, spec = item.mesh, item.spec
  row_axes, col_axes = _split_axes(spec[-2], mesh), _split_axes(spec[-1], mesh)
  s = math.prod(mesh.shape[a] for a in row_axes + col_axes)
  split = bool(col_axes) and x.shape[-2] % s == 0
  row_dim, col_dim = x.ndim - 2, x.ndim - 1

  def body(xl, *rest):
    if split:  # whole columns, rows split over all the matrix axes
      xl = jax.lax.all_to_all(xl, col_axes, row_dim, col_dim, tiled=True)
    elif col_axes:  # rows not divisible: whole columns, rows as sharded (copies over columns)
      xl = jax.lax.all_gather(xl, col_axes, axis=col_dim, tiled=True)
    axes = row_axes + col_axes if split else row_axes
    rows, rep = fn(xl, *rest, axis_name=axes or None)
    if split:
      rows = jax.tree.map(lambda y: jax.lax.all_gather(y, col_axes, axis=row_dim, tiled=True),
                          rows)
    return rows, rep

  batch = _batch_spec(spec)
  mapped = jax.shard_map(
      body, mesh=mesh, in_specs=(P(*spec),) + (batch,) * len(operands) + (P(),) * len(args),
      out_specs=(P(*spec[:-1]), batch), check_vma=False)  # all_gather results are replicated
  return mapped(x, *operands, *args)


def owner_map(
    fn: Callable[..., Any],
    matrices: Sequence[jax.Array],
    *,
    args: Sequence[Any] = (),
    specs: Sequence[Any] | None = None,
    strategy: str = "auto",
    names: Sequence[str] | None = None,
    split_results_by_column: bool = False,
) -> list[Any]:
  r"""A matrix function with small per-matrix results, each matrix computed whole on one device.

  The generalisation of :func:`~optimizers.distributed.owner_computes` to functions
  whose outputs are not matrices of the input's shape, e.g. the top-``r`` right singular vectors
  (``d x r``) of an SVD projector refresh. The matrices are grouped and sent to
  their owners as there (one all-to-all in; with ``b`` matrices on ``S`` devices
  sharding the matrix axes, each owner gets ``ceil(b / S)`` whole matrices or
  fewer, and devices without one stay idle rather than computing padding);
  ``fn`` runs locally on its owner's matrices; the outputs (a pytree of arrays
  ``(q, ...)``) are all-gathered over the matrix axes, so every device of the
  group holds the results of all the group's matrices: per device
  ``S ceil(b / S) / b`` times the bytes of the results (small by design), replicated over
  the matrix axes and sharded like the matrices' batch axes, the layout of the
  low-rank projectors' states. ``"replicate"`` (the ``"auto"`` choice for a
  group of a single matrix) all-gathers the whole matrices instead and computes
  all of them on every device; ``"gspmd"``, missing sharding information and
  bad shardings (with a warning) run ``fn`` on the global arrays, as
  :func:`~optimizers.distributed.owner_computes` does.

  Packing (``"auto"``): groups of other shapes whose matrix axes use the same
  mesh axes (in either order), the same dtype and batch axes, run as ONE round
  trip when that moves fewer elements than their own strategies: every matrix
  gets one owner (largest blocks first to the least loaded device, as
  :func:`~optimizers.distributed.owner_computes` packs), one ``(S, C)``
  all-to-all carries the blocks (``C`` the busiest owner's), each device runs
  ``fn`` on its own matrices only (``lax.switch`` on its mesh index), and one
  all-gather of ``(S, R)`` flat results (``R`` the busiest owner's; results of
  one dtype) gives every device all the results. Per device ``S (C + R)``
  elements, against ``S ceil(b / S) (e + r)`` per padded group (``e`` a
  local block's elements, ``r`` a matrix's results). For the 16 matrices of the
  4-layer GPT of ``bench/pretrain.py`` on 8 devices: 1.17 times the matrix
  bytes in (2.0 padded, per leaf) and 0.67 times out (1.33 padded).

  Args:
    fn: ``(x, *args) -> pytree`` of arrays with leading axis the matrices of
      ``x`` (``(q, m, n)``), matrix by matrix, no collective; zero matrices
      (padding) must not raise.
    matrices: arrays ``(*batch, m, n)``.
    args: replicated extra operands of ``fn``.
    specs: the ``PartitionSpec`` of each matrix (see
      :func:`~optimizers.distributed.owner_computes`).
    strategy: ``"auto"``, ``"owner"``, ``"replicate"`` or ``"gspmd"``.
    names: a name per matrix for the fallback warning.
    split_results_by_column: ``fn`` returns one array ``(q, n, ...)`` per call (e.g.
      a basis ``d x r`` of the columns); each device receives only its slice of the
      axis ``n``, sharded like the matrix's columns: one all-to-all of the owners'
      slices instead of the all-gather (``1 / S_n`` of its bytes, ``S_n`` the devices
      sharding the columns). Every group takes the packed owner path (``"auto"`` and
      ``"owner"``); otherwise the results come back replicated.

  Returns:
    Per matrix, the pytree of ``fn``'s outputs with leading axes ``batch``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P, AxisType
    >>> from optimizers.distributed import owner_map
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Explicit,))
    >>> x = jax.random.normal(jax.random.key(0), (n, 4, 2 * n))
    >>> w = jax.device_put(x, jax.NamedSharding(mesh, P(None, None, "x")))
    >>> top = lambda a: jnp.linalg.svd(a, compute_uv=False)[:, :2]  # per matrix, (q, 2)
    >>> (s,) = owner_map(top, [w])
    >>> s.shape == (n, 2), bool(jnp.allclose(s, top(x), rtol=1e-5))
    (True, True)

  References:
    Ahn et al., "Dion: distributed orthonormalized updates",
    https://arxiv.org/abs/2504.05295; Zhao et al., GaLore (the SVD projector),
    https://arxiv.org/abs/2403.03507
  """
  args = tuple(args)

  def unbatched(x):  # fn on the global (*batch, m, n) array
    batch = x.shape[:-2]
    out = fn(x.reshape(-1, *x.shape[-2:]), *args)
    return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), out)

  out, groups = group_matrices(list(matrices), specs, names, strategy, unbatched)
  results = _ResultLayout(fn, args)
  split = split_results_by_column and strategy in ("auto", "owner")
  own = (lambda g, s: math.inf) if split else results.own_elements  # split: always packed
  for pack in packs(groups, strategy, own, results.packed_elements):
    layouts = [PackedGroup(items) for items in pack]
    lone = layouts[0] if len(pack) == 1 and not split else None
    if lone is not None and (strategy == "replicate" or lone.b == 1 or lone.s_m * lone.s_n == 1):
      ys = [_owner_map_replicated(fn, lone, args)]
    else:  # owners (a lone group: its matrices spread over the devices, none padded)
      ys = _owner_map_packed(fn, layouts, args, results, split)
    for items, group_ys in zip(pack, ys, strict=True):
      for it, y in zip(items, group_ys, strict=True):
        out[it.index] = y
  return out


class _ResultLayout:
  """The per-matrix results of ``fn`` (from ``jax.eval_shape``) as flat vectors, and the
  collective elements of the owner round trips that carry them."""

  def __init__(self, fn: Callable[..., Any], args: tuple):
    self.fn, self.args, self._shapes = fn, args, {}

  def shapes(self, g: PackedGroup) -> Any:
    """The pytree of ``fn``'s outputs for one matrix of ``g`` (leading axis 1)."""
    key = (g.m, g.n, g.items[0].x.dtype)
    if key not in self._shapes:
      x = jax.ShapeDtypeStruct((1, g.m, g.n), g.items[0].x.dtype)
      self._shapes[key] = jax.eval_shape(self.fn, x, *self.args)
    return self._shapes[key]

  def size(self, g: PackedGroup) -> int:
    return sum(math.prod(y.shape[1:]) for y in jax.tree.leaves(self.shapes(g)))

  def dtype(self, g: PackedGroup) -> Any:
    return jax.tree.leaves(self.shapes(g))[0].dtype

  def dtypes(self, g: PackedGroup) -> set:
    return {y.dtype for y in jax.tree.leaves(self.shapes(g))}

  def chunk(self, pack: Packing) -> int:
    """Result elements of the busiest owner."""
    return max(sum(self.size(pack.groups[gi]) for gi, _, _ in rows) for rows in pack.offsets)

  def own_elements(self, g: PackedGroup, s: int) -> int:
    """A group on its own: padded owners (blocks in, results gathered) or replicated."""
    if g.b >= 2:
      return -(-g.b // s) * s * (g.block + self.size(g))
    return s * g.block

  def packed_elements(self, pack: Packing) -> float:
    if pack.s == 1 or len(set.union(*(self.dtypes(g) for g in pack.groups))) > 1:
      return math.inf  # nothing to move, or results of several dtypes: not packed
    return pack.s * (pack.chunk + self.chunk(pack))

  def flatten(self, res: Any, k: int) -> jax.Array:
    """``fn``'s outputs for ``k`` matrices -> ``(k, size)``."""
    return jnp.concatenate([y.reshape(k, -1) for y in jax.tree.leaves(res)], axis=1)

  def unflatten(self, g: PackedGroup, vec: jax.Array, column_slice: bool = False) -> Any:
    """One matrix's flat results -> the pytree of ``fn``'s outputs (no leading axis);
    ``column_slice``: one array's slice ``n / s_n`` of its first axis."""
    shapes = self.shapes(g)
    leaves, o = [], 0
    for y in jax.tree.leaves(shapes):
      shape = (y.shape[1] // g.s_n, *y.shape[2:]) if column_slice else y.shape[1:]
      leaves.append(vec[o : o + math.prod(shape)].reshape(shape))
      o += math.prod(shape)
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def _owner_map_packed(fn: Callable[..., Any], groups: list[PackedGroup], args: tuple,
                      results: _ResultLayout, split: bool = False) -> list[list[Any]]:
  """:func:`owner_map` for several groups in one round trip (:class:`Packing`): one
  ``(S, C)`` all-to-all of the blocks in, ``fn`` on each device's own matrices
  (``lax.switch`` on its mesh index), one all-gather of every owner's results (``split``:
  one all-to-all of each device's column slices of them)."""
  for g in groups if split else ():
    shapes = [y.shape for y in jax.tree.leaves(results.shapes(g))]
    if len(shapes) != 1 or len(shapes[0]) < 2 or shapes[0][1] != g.n:
      raise ValueError(f"split_results_by_column needs fn to return one array (q, n, ...) "
                       f"with n = {g.n} the matrices' columns; got shapes {shapes}")
  pack = Packing(groups)
  axes = pack.axes
  # split: the column block of every device (all-to-all order) per group, and the
  # elements of one column slice of a matrix's results
  cols = [np.argsort(bd) % g.s_n for g, bd in zip(groups, pack.block_devices, strict=True)]
  size = [results.size(g) // (g.s_n if split else 1) for g in groups]
  rchunk = max(sum(size[gi] for gi, _, _ in rows) for rows in pack.offsets)
  width = (pack.s, rchunk) if split else (rchunk,)

  def compute(signature, recv, a):
    parts = {}  # chunk offset -> that matrix's flat results ((S, slice) with split)
    for gi, starts, whole in pack.whole(signature, recv):
      flat = results.flatten(fn(whole, *a), len(starts))
      if split:
        flat = flat.reshape(len(starts), groups[gi].s_n, -1)[:, cols[gi]]
      parts.update({st: flat[k] for k, st in enumerate(starts)})
    if not parts:  # a device that owns no matrix
      return jnp.zeros(width, results.dtype(groups[0]))
    vec = jnp.concatenate([parts[st] for st in sorted(parts)], axis=-1)
    return jnp.pad(vec, [(0, 0)] * (vec.ndim - 1) + [(0, rchunk - vec.shape[-1])])

  def body(*operands):
    mine = pack.owned(compute, operands)
    if split:  # row o: owner o's slices for this device
      every = jax.lax.all_to_all(mine, axes, 0, 0, tiled=True)
    else:
      every = jax.lax.all_gather(mine, axes, axis=0, tiled=False)  # (S, rchunk)
    res = [[None] * g.b for g in groups]
    for d, rows in enumerate(pack.offsets):
      o = 0
      for gi, j, _ in rows:
        res[gi][j] = results.unflatten(groups[gi], every[d, o : o + size[gi]], split)
        o += size[gi]
    return tuple(y for g, r in zip(groups, res, strict=True)
                 for y in g.split(jax.tree.map(lambda *ys: jnp.stack(ys), *r)))

  out_spec = (lambda it: P(*it.spec[:-2], it.spec[-1])) if split else (
      lambda it: _batch_spec(it.spec))
  return packed_map(body, groups, args, out_spec)


def _owner_map_replicated(fn: Callable[..., Any], g: PackedGroup, args: tuple) -> list[Any]:
  """:func:`owner_map`'s ``"replicate"`` strategy for one group: the whole matrices
  all-gathered, ``fn`` on all of them on every device (no collective when the matrix
  axes' mesh axes have size 1)."""
  axes = g.row_axes + g.col_axes

  def body(*operands):
    xs, a = operands[: len(g.items)], operands[len(g.items):]
    cat = jnp.concatenate([x.reshape(c, g.ml, g.nl) for x, c in zip(xs, g.counts, strict=True)])
    if g.s_m * g.s_n > 1:
      cat = g.whole(jax.lax.all_gather(cat, axes, axis=0, tiled=False))
    return tuple(g.split(fn(cat, *a)))

  # The all-gathered results are replicated over the matrix axes (not inferable: no check).
  return packed_map(body, [g], args, lambda it: _batch_spec(it.spec))[0]
