r"""Owner-computes matrix functions on sharded meshes.

A matrix function ``f`` (spectral clip, Newton–Schulz orthogonalisation, ...)
applied to a matrix whose rows or columns are sharded over a device mesh is
partitioned by XLA operation by operation: every matrix product of every
iteration becomes a collective, so the communication grows with the number of
iterations. :func:`owner_computes` avoids that. It gives each device *whole*
matrices, runs ``f`` locally with no collective, and puts the results back in
the input's sharding:

1. the matrices of one *group* (same ``m x n`` shape, dtype, matrix-axis
   sharding and mesh axes of the batch axes: the stacked layer axis of a
   scanned leaf and separate leaves of equal shape together) are concatenated
   along their batch axis on every device, as local blocks of shape
   ``(b, m / S_m, n / S_n)``, ``S = S_m S_n`` the number of devices sharding
   the matrix axes;
2. inside :func:`jax.shard_map`, one :func:`jax.lax.all_to_all` over the mesh
   axes that shard the matrix axes sends the ``k``-th slice of ``ceil(b / S)``
   matrices to device ``k``, which reassembles them (a local reshape and
   transpose) into whole ``m x n`` matrices;
3. ``f`` runs on them locally; one all-to-all sends every block back to the
   device it came from.

Per device the collective bytes are ``2 * ceil(b / S) * S / b`` times the
bytes of the local blocks (2 for a group that fills the devices), independent
of ``f`` and of its iteration count, and the flops are those of
``ceil(b / S)`` whole matrices (groups of ``b < S`` matrices: packing, below).

Strategies (``strategy=``):

* ``"owner"``: the above, the group padded with zero matrices to a multiple of
  ``S`` (``f`` must map a zero matrix to a finite value; the padding is
  discarded).
* ``"replicate"``: one all-gather of the group's whole matrices onto every
  device, ``f`` on all of them, each device keeps its own block (one
  collective, ``S`` times the local bytes; every device computes every matrix).
* ``"gspmd"``: ``f`` on the global arrays, partitioned by XLA (today's path:
  collectives inside ``f``; no matrix is ever whole on one device, the choice
  for matrices too large for one device's memory).
* ``"auto"`` (default): per group, ``"owner"`` when each device holds blocks of
  at least 2 matrices (fewer bytes and no more flops than ``"replicate"``),
  ``"replicate"`` for a group of a single matrix (half the bytes of a padded
  owner round trip, the same flops); no collective at all when the matrix
  axes are not sharded. Then *packing*: groups that share the mesh, the set of
  mesh axes of the matrix axes (in either order: a transposed view, rows over
  ``model`` and columns over ``data``, packs with the others), the dtype and
  the batch axes but not the shape run as ONE owner round trip when that moves
  strictly fewer bytes than their own strategies (below).

Groups of fewer matrices than devices (``b < S``), and packing. A group padded
to ``S`` matrices moves ``2 S / b`` times its local bytes (4.0 for the 4 stacked
layers of a transformer on 8 devices) and every device computes a matrix, half
of them zeros. That is close to the floor for a group on its own: an owner must
receive the ``(S - 1) / S`` of its matrix that it lacks and send back the same,
``2 (S - 1) / b`` times the local bytes for the busiest device (3.5 at ``b = 4``,
``S = 8``), and an all-to-all moves equal chunks to every device (the ``S``-th
chunk is the owner's own block: ``2 S / b``); computing each matrix on 2 devices
(an all-to-all over half the devices, then an all-gather in pairs) moves the
same ``2 S / b``. What beats it is to fill the idle owners with the matrices of
OTHER groups: every matrix of every packed group gets one owner (largest blocks
first to the least loaded device), each device sends one chunk of ``C`` elements
to every owner (``C`` the largest owner load: the blocks of all its matrices
from one source), and each device runs ``f`` on its own matrices only, chosen by
``lax.switch`` on its mesh index (no zero matrix computed; XLA's cost analysis
counts the costliest branch: the busiest device). Per device ``2 S C`` elements
against ``2 sum_g e_g ceil(b_g / S) S`` for padded groups (``e_g`` the elements
of a local block); the floor is ``C >= sum_g b_g e_g / S`` (perfect balance: 2.0 times the local
bytes) and ``C >=`` one block of the largest matrix. For the 4-layer GPT of
``bench/pretrain.py`` (per layer ``256 x 1024``, ``1024 x 256``, ``256 x 768``,
``256 x 256``; blocks of 32K, 32K, 24K, 8K elements on 8 devices) every device
must own exactly one of the 8 largest matrices (two would make ``C = 64K``) and
some device one ``256 x 768`` too, so ``C = 56K`` is optimal: ``2 * 8 * 56K /
384K = 2.33`` times the matrix bytes (4.0 padded), and the busiest device
computes ``256 x 1024`` and ``256 x 768`` instead of one matrix of every shape.

Where the sharding comes from. Under ``AxisType.Explicit`` mesh axes every
array's type carries its ``PartitionSpec`` (``jax.typeof(x).sharding``), which
is read. Under ``Auto`` axes (a plain ``jax.jit`` with ``in_shardings``) the
type carries the mesh but not the spec: pass ``specs`` (the ``PartitionSpec``
of each matrix), or the group takes the ``"gspmd"`` path. No mesh argument is
ever needed.

Bad input: a shard count that does not divide its axis, a sharded axis that the
matrix view merges behind an unsharded one, or a mesh that differs between
arrays falls back to ``"gspmd"`` (correct, with collectives inside ``f``) with
one warning naming the leaf.

References:
  Jordan et al., Muon (2024), https://kellerjordan.github.io/posts/muon/;
  Ahn et al., "Dion: distributed orthonormalized updates",
  https://arxiv.org/abs/2504.05295
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from optimizers._owner_maps import map_rows, owner_map, row_pmax, row_psum
from optimizers._owners import (
  STRATEGIES,
  OwnedMatrix,
  PackedGroup,
  Packing,
  check_strategy,
  group_matrices,
  packed_map,
  packs,
  warn_fallback,
)
from optimizers._sharding import explicit_mesh, padded_spec, reshard, spec_of, unshard_axes

__all__ = [
    "STRATEGIES",
    "map_matrix_leaves",
    "map_rows",
    "matrix_view_spec",
    "owner_computes",
    "owner_map",
    "row_pmax",
    "row_psum",
]

def matrix_view_spec(spec: Any, shape: Sequence[int], dims: Any) -> tuple | None:
  """The spec of the ``(*batch, m, n)`` matrix view of a leaf (see
  :mod:`optimizers.matrices`) from the leaf's ``spec``.

  Axes keep their mesh axes through the view's transpose; merged axes (tuple
  ``MatrixDims`` axes) keep the mesh axes of their first axis when the others
  are unsharded (a block of the merged axis is then a block of the first).
  Returns ``None`` when the view cannot be expressed as a spec (a sharded axis
  merged behind another), ``()`` padding included otherwise.

  Examples:
    >>> from jax.sharding import PartitionSpec as P
    >>> from optimizers.matrices import MatrixDims
    >>> matrix_view_spec(P("data", None, "model"), (4, 8, 16), MatrixDims(0, 2))
    (None, 'data', 'model')
  """
  from optimizers.matrices import _layout, as_matrix_dims

  shape = tuple(shape)
  spec = padded_spec(spec, len(shape))
  batch, red, out = _layout(shape, as_matrix_dims(dims))
  merged = []
  for axes in (red, out):
    if any(spec[a] is not None for a in axes[1:]):
      return None
    merged.append(spec[axes[0]])
  return tuple(spec[a] for a in batch) + tuple(merged)


def _merged_tail_axes(shape: Sequence[int], dims: Any) -> tuple[int, ...]:
  """The axes that a matrix view merges behind the first of their group."""
  from optimizers.matrices import _layout, as_matrix_dims

  _, red, out = _layout(tuple(shape), as_matrix_dims(dims))
  return red[1:] + out[1:]


def _run_group(fn: Callable[..., jax.Array], items: list[OwnedMatrix], args: tuple,
               strategy: str) -> list[jax.Array]:
  """One shard_map over a group of matrices with equal shape and matrix-axis sharding."""
  g = PackedGroup(items)
  axes = g.row_axes + g.col_axes
  s = g.s_m * g.s_n
  if strategy == "auto":
    strategy = "owner" if g.b >= 2 else "replicate"
  q = -(-g.b // s)

  def body(*operands):
    xs, a = operands[: len(items)], operands[len(items):]
    cat = jnp.concatenate([x.reshape(c, g.ml, g.nl) for x, c in zip(xs, g.counts, strict=True)])
    if strategy == "owner":
      cat = jnp.pad(cat, ((0, q * s - g.b), (0, 0), (0, 0))).reshape(s, q, g.ml, g.nl)
      back = g.blocks(fn(g.whole(jax.lax.all_to_all(cat, axes, 0, 0, tiled=True)), *a))
      res = jax.lax.all_to_all(back, axes, 0, 0, tiled=True).reshape(s * q, g.ml, g.nl)[: g.b]
    else:  # replicate
      out = fn(g.whole(jax.lax.all_gather(cat, axes, axis=0, tiled=False)), *a)
      row = jax.lax.axis_index(g.row_axes) if g.row_axes else 0
      col = jax.lax.axis_index(g.col_axes) if g.col_axes else 0
      res = jax.lax.dynamic_slice(out, (0, row * g.ml, col * g.nl), (g.b, g.ml, g.nl))
    return tuple(g.split(res))

  specs = tuple(P(*it.spec) for it in items)
  mapped = jax.shard_map(body, mesh=g.items[0].mesh, in_specs=specs + (P(),) * len(args),
                         out_specs=specs)
  return list(mapped(*(it.x for it in items), *args))


def _run_packed(fn: Callable[..., jax.Array], groups: list[PackedGroup], args: tuple) -> list[list]:
  """One shard_map and one all-to-all each way for several groups of matrices that share
  the mesh, the matrix-axis mesh axes and the dtype but not the shape.

  Every matrix of every group gets one owner device (:class:`Packing`); the blocks
  of all of a device's matrices travel as one chunk of ``C`` elements (the largest
  owner load) of a ``(S, C)`` all-to-all; each device runs ``fn`` on its own matrices
  only, selected by ``lax.switch`` on its mesh index (no padding matrices computed),
  and a second all-to-all brings the blocks back. Per device the collective bytes are
  ``2 S C`` elements, against ``2 S sum_g ceil(b_g / S) e_g`` for padded groups.
  """
  pack = Packing(groups)
  axes = pack.axes

  def compute(signature, recv, a):
    """``fn`` on the device's whole matrices, batched per group; the result blocks in
    the received layout."""
    out = jnp.zeros_like(recv)
    for gi, starts, whole in pack.whole(signature, recv):
      g = groups[gi]
      res = g.blocks(fn(whole, *a))[np.argsort(pack.block_devices[gi])]  # in device order
      for k, st in enumerate(starts):
        out = out.at[:, st : st + g.block].set(res[:, k])
    return out

  def body(*operands):
    back = jax.lax.all_to_all(pack.owned(compute, operands), axes, 0, 0,
                              tiled=True)  # row = owner device
    res = [[None] * g.b for g in groups]
    for d, rows in enumerate(pack.offsets):
      for gi, j, o in rows:
        res[gi][j] = back[d, o : o + groups[gi].block].reshape(groups[gi].ml, groups[gi].nl)
    return tuple(y for g, r in zip(groups, res, strict=True) for y in g.split(jnp.stack(r)))

  return packed_map(body, groups, args, lambda it: P(*it.spec))


def owner_computes(
    fn: Callable[..., jax.Array],
    matrices: Sequence[jax.Array],
    *,
    args: Sequence[Any] = (),
    specs: Sequence[Any] | None = None,
    strategy: str = "auto",
    names: Sequence[str] | None = None,
) -> list[jax.Array]:
  r"""Applies a batched matrix function to sharded matrices, each computed whole on one device.

  ``fn(x, *args)`` maps a batch ``x`` of shape ``(..., m, n)`` to the same
  shape, matrix by matrix (no mixing across the batch), e.g.
  :func:`optimizers.soft_spectral_clip`. Each array of ``matrices`` has shape
  ``(*batch, m, n)``; the result is ``[fn(x) for x in matrices]`` (up to
  float rounding of the batched products, bit for bit in practice) with each
  input's sharding, computed as described in the module docstring.

  Args:
    fn: the matrix function, ``(..., m, n), *args -> (..., m, n)``; it must not
      use collectives, and must map zero matrices to finite values (padding).
    matrices: arrays of shape ``(*batch, m, n)`` (any mix of shapes: grouped
      by shape, dtype and sharding).
    args: extra operands of ``fn`` (scalars, e.g. a traced threshold),
      replicated.
    specs: the ``PartitionSpec`` of each matrix (``None`` entries: read from
      the array's type). Needed under ``Auto`` mesh axes, where the type
      carries no spec; ignored for arrays with Explicit axes.
    strategy: ``"auto"``, ``"owner"``, ``"replicate"`` or ``"gspmd"`` (module
      docstring).
    names: a name per matrix for the fallback warning (default: its index).

  Returns:
    The list of results, in the order and sharding of ``matrices``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P, AxisType
    >>> from optimizers import orthogonalize
    >>> from optimizers.distributed import owner_computes
    >>> n = jax.device_count()
    >>> mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Explicit,))
    >>> x = jax.random.normal(jax.random.key(0), (n, 4, 4 * n))  # n stacked matrices
    >>> w = jax.device_put(x, jax.NamedSharding(mesh, P(None, None, "x")))  # columns sharded
    >>> (out,) = owner_computes(orthogonalize, [w])  # each device orthogonalises one
    >>> bool(jnp.allclose(out, orthogonalize(x), atol=1e-5)), out.sharding == w.sharding
    (True, True)
  """
  out, groups = group_matrices(list(matrices), specs, names, strategy,
                               lambda x: fn(x, *args))
  for pack in packs(groups, strategy):
    if len(pack) == 1:
      results = [_run_group(fn, pack[0], tuple(args), strategy)]
    else:
      results = _run_packed(fn, [PackedGroup(items) for items in pack], tuple(args))
    for items, ys in zip(pack, results, strict=True):
      for it, y in zip(items, ys, strict=True):
        out[it.index] = y
  return out


def map_matrix_leaves(
    fn: Callable[..., jax.Array],
    leaves: Sequence[Any],
    dims: Sequence[Any],
    *,
    args: Sequence[Any] = (),
    param_specs: Sequence[Any] | None = None,
    strategy: str = "auto",
    names: Sequence[str] | None = None,
) -> list[Any]:
  """:func:`owner_computes` on the matrix views of parameter-shaped leaves.

  Every leaf with ``dims`` not ``None`` is viewed as ``(*batch, m, n)``
  (:func:`optimizers.matrices.to_matrix`), the views go through
  :func:`owner_computes` together (equal shapes across leaves form one group),
  and the results are put back in the leaves' layout; other leaves are returned
  as they are.

  Args:
    fn: the matrix function (see :func:`owner_computes`).
    leaves: the leaves (arrays).
    dims: a ``MatrixDims`` (or ``None``) per leaf.
    args: extra replicated operands of ``fn``.
    param_specs: a ``PartitionSpec`` (or ``None``) per leaf, used where the
      arrays' types carry no spec (``Auto`` mesh axes); mapped through the
      matrix view by :func:`matrix_view_spec`.
    strategy: see :func:`owner_computes`.
    names: a name per leaf for the fallback warning.

  Returns:
    The list of output leaves.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import orthogonalize
    >>> from optimizers.distributed import map_matrix_leaves
    >>> from optimizers.matrices import MatrixDims
    >>> out = map_matrix_leaves(orthogonalize, [jnp.eye(3), jnp.ones(3)], [MatrixDims(), None])
    >>> [o.shape for o in out]
    [(3, 3), (3,)]
  """
  from optimizers.matrices import from_matrix, to_matrix

  check_strategy(strategy)
  leaves, dims = list(leaves), list(dims)
  if len(dims) != len(leaves):
    raise ValueError(f"dims must have one entry per leaf ({len(leaves)}), got {len(dims)}")
  names = [f"leaf {i}" for i in range(len(leaves))] if names is None else list(names)
  out = list(leaves)
  index, views, view_specs, view_names = [], [], [], []
  for i, (x, d) in enumerate(zip(leaves, dims, strict=True)):
    if d is None:
      continue
    mesh = explicit_mesh(x)
    leaf_spec = spec_of(x) if mesh is not None else (
        None if param_specs is None else param_specs[i])
    spec = None if leaf_spec is None else matrix_view_spec(leaf_spec, x.shape, d)
    if leaf_spec is not None and spec is None:
      # A sharded axis merged behind another: the view has no block structure.
      warn_fallback(names[i], f"spec {leaf_spec} does not give blocks of the matrix view {d}")
      whole = unshard_axes(x, _merged_tail_axes(x.shape, d))  # Explicit axes only
      y = from_matrix(fn(to_matrix(whole, d), *args), d, x.shape)
      out[i] = reshard(y, spec_of(x), mesh)
      continue
    if mesh is not None:
      spec = None  # read from the view's own type
    index.append(i)
    views.append(to_matrix(x, d))
    view_specs.append(spec)
    view_names.append(names[i])
  results = owner_computes(fn, views, args=args, specs=view_specs, strategy=strategy,
                           names=view_names)
  for i, y in zip(index, results, strict=True):
    out[i] = from_matrix(y, dims[i], leaves[i].shape)
  return out
