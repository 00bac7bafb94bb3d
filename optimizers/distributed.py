r"""Owner-computes matrix functions on sharded meshes.

A matrix function ``f`` (spectral clip, Newton–Schulz orthogonalisation, ...)
applied to a matrix whose rows or columns are sharded over a device mesh is
partitioned by XLA operation by operation: every matrix product of every
iteration becomes a collective, so the communication grows with the number of
iterations. :func:`owner_computes` avoids that. It gives each device *whole*
matrices, runs ``f`` locally with no collective, and puts the results back in
the input's sharding:

1. the matrices of one *group* (same ``m x n`` shape, dtype and matrix-axis
   sharding: the stacked layer axis of a scanned leaf and separate leaves of
   equal shape together) are concatenated along their batch axis on every
   device, as local blocks of shape ``(b, m / S_m, n / S_n)``, ``S = S_m S_n``
   the number of devices sharding the matrix axes;
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
  axes are not sharded. Then *packing*: groups that share the mesh, the mesh
  axes of the matrix axes and the dtype but not the shape run as ONE owner
  round trip when that moves strictly fewer bytes than their own strategies
  (below).

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

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from optimizers._sharding import (
    explicit_mesh,
    named_sharding,
    padded_spec,
    reshard,
    spec_of,
    unshard_axes,
)

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

STRATEGIES = ("auto", "owner", "replicate", "gspmd")


def _names(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")


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


class _Item:
  """One matrix array with what :func:`owner_computes` found out about it."""

  def __init__(self, index: int, x: jax.Array, name: str):
    self.index, self.x, self.name = index, x, name
    self.mesh: Any = None
    self.spec: tuple | None = None


def _mesh_of(x: Any) -> Any:
  sharding = named_sharding(x)
  mesh = None if sharding is None else sharding.mesh
  if mesh is None or mesh.empty:
    mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _warn(name: str, reason: str) -> None:
  warnings.warn(
      f"owner_computes: {name}: {reason}; using the partitioner's path (correct, with "
      "collectives inside the matrix function)", stacklevel=4)


def _resolve(item: _Item, spec: Any) -> str | None:
  """Fills ``item.mesh`` / ``item.spec``; returns why the owner path cannot run."""
  x = item.x
  mesh = _mesh_of(x)
  if mesh is None:
    return "local"
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    spec = named_sharding(x).spec  # the type is authoritative
  elif spec is None:
    return "unknown"  # Auto axes: the type carries no spec
  spec = padded_spec(spec, x.ndim)
  if len(spec) != x.ndim:
    return f"spec {spec} does not fit shape {x.shape}"
  for dim, entry in zip(x.shape, spec, strict=True):
    names = _names(entry)
    if any(n not in mesh.axis_names for n in names):
      return f"spec {spec} names an axis not in the mesh {mesh.axis_names}"
    if dim % math.prod(mesh.shape[n] for n in names):
      return f"a mesh axis does not divide the shape {x.shape} (spec {spec})"
  item.mesh, item.spec = mesh, spec
  return None


def _local_shape(shape: tuple[int, ...], spec: tuple, mesh: Any) -> tuple[int, ...]:
  return tuple(d // math.prod(mesh.shape[n] for n in _names(e))
               for d, e in zip(shape, spec, strict=True))


def _run_group(fn: Callable[..., jax.Array], items: list[_Item], args: tuple,
               strategy: str) -> list[jax.Array]:
  """One shard_map over a group of matrices with equal shape and matrix-axis sharding."""
  mesh = items[0].mesh
  m, n = items[0].x.shape[-2:]
  row_axes, col_axes = _names(items[0].spec[-2]), _names(items[0].spec[-1])
  axes = row_axes + col_axes
  s_m = math.prod(mesh.shape[a] for a in row_axes)
  s_n = math.prod(mesh.shape[a] for a in col_axes)
  s = s_m * s_n
  ml, nl = m // s_m, n // s_n
  local_shapes = [_local_shape(it.x.shape, it.spec, mesh) for it in items]
  counts = [math.prod(shape[:-2]) for shape in local_shapes]
  b = sum(counts)
  if strategy == "auto":
    strategy = "owner" if b >= 2 else "replicate"
  q = -(-b // s)

  def whole(blocks):  # (s, k, ml, nl), axis 0 = source device -> (k, m, n)
    k = blocks.shape[1]
    y = blocks.reshape(s_m, s_n, k, ml, nl).transpose(2, 0, 3, 1, 4)
    return y.reshape(k, m, n)

  def body(*operands):
    xs, a = operands[: len(items)], operands[len(items):]
    cat = jnp.concatenate([x.reshape(c, ml, nl) for x, c in zip(xs, counts, strict=True)])
    if strategy == "owner":
      cat = jnp.pad(cat, ((0, q * s - b), (0, 0), (0, 0)))
      mine = whole(jax.lax.all_to_all(cat.reshape(s, q, ml, nl), axes, 0, 0, tiled=True))
      out = fn(mine, *a)
      back = out.reshape(q, s_m, ml, s_n, nl).transpose(1, 3, 0, 2, 4).reshape(s, q, ml, nl)
      res = jax.lax.all_to_all(back, axes, 0, 0, tiled=True).reshape(s * q, ml, nl)[:b]
    else:  # replicate
      out = fn(whole(jax.lax.all_gather(cat, axes, axis=0, tiled=False)), *a)
      row = jax.lax.axis_index(row_axes) if row_axes else 0
      col = jax.lax.axis_index(col_axes) if col_axes else 0
      res = jax.lax.dynamic_slice(out, (0, row * ml, col * nl), (b, ml, nl))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return tuple(res[st : st + c].reshape(shape)
                 for st, c, shape in zip(starts, counts, local_shapes, strict=True))

  specs = tuple(P(*it.spec) for it in items)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=specs + (P(),) * len(args), out_specs=specs)
  return list(mapped(*(it.x for it in items), *args))


class _Group:
  """The static layout of one group inside a packed round trip (:func:`_run_packed`)."""

  def __init__(self, items: list[_Item]):
    self.items = items
    mesh, spec = items[0].mesh, items[0].spec
    self.m, self.n = items[0].x.shape[-2:]
    row_axes, col_axes = _names(spec[-2]), _names(spec[-1])
    self.s_m = math.prod(mesh.shape[a] for a in row_axes)
    self.s_n = math.prod(mesh.shape[a] for a in col_axes)
    self.ml, self.nl = self.m // self.s_m, self.n // self.s_n
    self.local_shapes = [_local_shape(it.x.shape, it.spec, mesh) for it in items]
    self.counts = [math.prod(shape[:-2]) for shape in self.local_shapes]
    self.b = sum(self.counts)
    self.block = self.ml * self.nl  # elements of one local block

  def owner_elements(self, s: int) -> int:
    """Per-device elements of the auto strategy's collectives for this group alone."""
    if self.b >= 2:
      return 2 * -(-self.b // s) * s * self.block  # padded owner: in and out
    return s * self.block  # replicate: one all-gather


def _pack_plan(groups: list[_Group], s: int) -> tuple[list[list[tuple[int, int]]], int]:
  """Assigns every matrix ``(group, index)`` to one of ``s`` owner devices, largest
  blocks first to the least loaded device (LPT); returns the per-device lists (in
  assignment order) and the chunk size ``C`` (elements), the largest load."""
  order = sorted(((gi, j) for gi, g in enumerate(groups) for j in range(g.b)),
                 key=lambda t: (-groups[t[0]].block, t[0], t[1]))
  owned: list[list[tuple[int, int]]] = [[] for _ in range(s)]
  load = [0] * s
  for gi, j in order:
    d = min(range(s), key=lambda k: (load[k], k))
    owned[d].append((gi, j))
    load[d] += groups[gi].block
  return owned, max(load)


def _run_packed(fn: Callable[..., jax.Array], groups: list[_Group], args: tuple) -> list[list]:
  """One shard_map and one all-to-all each way for several groups of matrices that share
  the mesh, the matrix-axis mesh axes and the dtype but not the shape.

  Every matrix of every group gets one owner device (:func:`_pack_plan`); the blocks
  of all of a device's matrices travel as one chunk of ``C`` elements (the largest
  owner load) of a ``(S, C)`` all-to-all; each device runs ``fn`` on its own matrices
  only, selected by ``lax.switch`` on its mesh index (no padding matrices computed),
  and a second all-to-all brings the blocks back. Per device the collective bytes are
  ``2 S C`` elements, against ``2 S sum_g ceil(b_g / S) e_g`` for padded groups.
  """
  first = groups[0].items[0]
  mesh = first.mesh
  axes = _names(first.spec[-2]) + _names(first.spec[-1])
  s = math.prod(mesh.shape[a] for a in axes)
  owned, chunk = _pack_plan(groups, s)
  offsets = []  # per device: (group, index, offset in the chunk)
  for mine in owned:
    o, rows = 0, []
    for gi, j in mine:
      rows.append((gi, j, o))
      o += groups[gi].block
    offsets.append(rows)
  signatures = sorted({tuple(gi for gi, _ in mine) for mine in owned})
  branch_of = [signatures.index(tuple(gi for gi, _ in mine)) for mine in owned]

  def compute(signature, recv, a):
    """A device owning the groups ``signature`` (in chunk order): ``fn`` on its whole
    matrices, batched per group; the result blocks in the received layout."""
    out = jnp.zeros_like(recv)
    o, by_group = 0, {}
    for gi in signature:
      by_group.setdefault(gi, []).append(o)
      o += groups[gi].block
    for gi, starts in by_group.items():
      g = groups[gi]
      blocks = jnp.stack([recv[:, st : st + g.block] for st in starts], 1)  # (s, k, e)
      whole = blocks.reshape(g.s_m, g.s_n, len(starts), g.ml, g.nl).transpose(2, 0, 3, 1, 4)
      res = fn(whole.reshape(len(starts), g.m, g.n), *a)
      res = res.reshape(len(starts), g.s_m, g.ml, g.s_n, g.nl).transpose(1, 3, 0, 2, 4)
      res = res.reshape(s, len(starts), g.block)
      for k, st in enumerate(starts):
        out = out.at[:, st : st + g.block].set(res[:, k])
    return out

  n_items = [len(g.items) for g in groups]

  def body(*operands):
    xs, a = operands[: sum(n_items)], operands[sum(n_items):]
    cats, k = [], 0
    for g, n in zip(groups, n_items, strict=True):
      cats.append(jnp.concatenate([x.reshape(c, g.block) for x, c in
                                   zip(xs[k : k + n], g.counts, strict=True)]))
      k += n
    zero = jnp.zeros((0,), cats[0].dtype)
    send = jnp.stack([jnp.pad(jnp.concatenate([cats[gi][j] for gi, j, _ in rows] or [zero]),
                              (0, chunk - sum(groups[gi].block for gi, _, _ in rows)))
                      for rows in offsets])  # (s, chunk): row d = my blocks of d's matrices
    recv = jax.lax.all_to_all(send, axes, 0, 0, tiled=True)  # row = source device
    me = jnp.asarray(branch_of, jnp.int32)[jax.lax.axis_index(axes)]
    out = jax.lax.switch(me, [lambda r, *a, sig=sig: compute(sig, r, a) for sig in signatures],
                         recv, *a)
    back = jax.lax.all_to_all(out, axes, 0, 0, tiled=True)  # row = owner device
    res = [[None] * g.b for g in groups]
    for d, rows in enumerate(offsets):
      for gi, j, o in rows:
        g = groups[gi]
        res[gi][j] = back[d, o : o + g.block].reshape(g.ml, g.nl)
    results = []
    for g, r in zip(groups, res, strict=True):
      stacked = jnp.stack(r)
      starts = [sum(g.counts[:i]) for i in range(len(g.counts))]
      results.extend(stacked[st : st + c].reshape(shape)
                     for st, c, shape in zip(starts, g.counts, g.local_shapes, strict=True))
    return tuple(results)

  items = [it for g in groups for it in g.items]
  specs = tuple(P(*it.spec) for it in items)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=specs + (P(),) * len(args), out_specs=specs)
  flat = list(mapped(*(it.x for it in items), *args))
  out, k = [], 0
  for n in n_items:
    out.append(flat[k : k + n])
    k += n
  return out


def _packs(groups: list[list[_Item]], strategy: str) -> list[list[list[_Item]]]:
  """Groups to run together by :func:`_run_packed` (``"auto"`` only): those sharing the
  mesh, the matrix-axis mesh axes and the dtype, when one packed round trip moves
  strictly fewer bytes than the groups' own strategies; every other group alone."""
  if strategy != "auto":
    return [[g] for g in groups]
  by_key: dict[tuple, list[list[_Item]]] = {}
  for g in groups:
    it = g[0]
    by_key.setdefault((it.mesh, tuple(it.spec[-2:]), it.x.dtype), []).append(g)
  out = []
  for members in by_key.values():
    layouts = [_Group(g) for g in members]
    it = members[0][0]
    s = math.prod(it.mesh.shape[a] for a in _names(it.spec[-2]) + _names(it.spec[-1]))
    _, chunk = _pack_plan(layouts, s)
    own = sum(g.owner_elements(s) for g in layouts)
    if len(members) > 1 and 2 * s * chunk < own:
      out.append(members)
    else:
      out.extend([g] for g in members)
  return out


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
  _check_strategy(strategy)
  matrices = list(matrices)
  if specs is not None and len(specs) != len(matrices):
    raise ValueError(f"specs must have one entry per matrix ({len(matrices)}), got {len(specs)}")
  if names is not None and len(names) != len(matrices):
    raise ValueError(f"names must have one entry per matrix ({len(matrices)}), got {len(names)}")
  out: list[Any] = [None] * len(matrices)
  groups: dict[tuple, list[_Item]] = {}
  for i, x in enumerate(matrices):
    if x.ndim < 2:
      raise ValueError(f"matrices[{i}] must have ndim >= 2, got shape {x.shape}")
    item = _Item(i, x, str(names[i]) if names is not None else f"matrix {i}")
    why = "gspmd" if strategy == "gspmd" else _resolve(item, None if specs is None else specs[i])
    matrix_axes = () if why else _names(item.spec[-2]) + _names(item.spec[-1])
    if why or not matrix_axes:
      if why not in ("gspmd", "local", "unknown", None):
        _warn(item.name, why)
      out[i] = fn(x, *args)
      continue
    key = (x.shape[-2:], x.dtype, item.spec[-2:], item.mesh)
    groups.setdefault(key, []).append(item)
  for pack in _packs(list(groups.values()), strategy):
    if len(pack) == 1:
      results = [_run_group(fn, pack[0], tuple(args), strategy)]
    else:
      results = _run_packed(fn, [_Group(items) for items in pack], tuple(args))
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

  _check_strategy(strategy)
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
      _warn(names[i], f"spec {leaf_spec} does not give blocks of the matrix view {d}")
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


# ---------------------------------------------------------------------------
# Matrix functions whose per-matrix outputs have other shapes (the low-rank
# projectors): rows with a whole last axis, and owners returning small results.
# ---------------------------------------------------------------------------


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
  return tuple(a for a in _names(entry) if mesh.shape[a] > 1)


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
  _check_strategy(strategy)
  if x.ndim < 2:
    raise ValueError(f"x must have ndim >= 2, got shape {x.shape}")
  operands, args = tuple(operands), tuple(args)
  item = _Item(0, x, name)
  why = "gspmd" if strategy == "gspmd" else _resolve(item, spec)
  if why not in ("gspmd", "local", "unknown", None):
    _warn(name, why)
  if why or not (_names(item.spec[-2]) or _names(item.spec[-1])):
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


def _whole(blocks: jax.Array, s_m: int, s_n: int, ml: int, nl: int) -> jax.Array:
  """``(s, k, ml, nl)`` blocks (axis 0 the source device, row-major over the row then
  column mesh axes) -> the ``k`` whole ``(s_m ml) x (s_n nl)`` matrices."""
  k = blocks.shape[1]
  y = blocks.reshape(s_m, s_n, k, ml, nl).transpose(2, 0, 3, 1, 4)
  return y.reshape(k, s_m * ml, s_n * nl)


def owner_map(
    fn: Callable[..., Any],
    matrices: Sequence[jax.Array],
    *,
    args: Sequence[Any] = (),
    specs: Sequence[Any] | None = None,
    strategy: str = "auto",
    names: Sequence[str] | None = None,
) -> list[Any]:
  r"""A matrix function with small per-matrix results, each matrix computed whole on one device.

  The generalisation of :func:`owner_computes` to functions whose outputs are
  not matrices of the input's shape, e.g. the top-``r`` right singular vectors
  (``d x r``) of an SVD projector refresh. The matrices are grouped and sent to
  their owners as there (one all-to-all in, the group padded to a multiple of
  the ``S`` devices sharding the matrix axes); ``fn`` runs locally on
  ``q = ceil(b / S)`` whole matrices; its outputs (a pytree of arrays
  ``(q, ...)``) are all-gathered over the matrix axes, so every device of the
  group holds the results of all the group's matrices: per device
  ``S q / b`` times the bytes of the results (small by design), replicated over
  the matrix axes and sharded like the matrices' batch axes, the layout of the
  low-rank projectors' states. ``"replicate"`` (the ``"auto"`` choice for a
  group of a single matrix) all-gathers the whole matrices instead and computes
  all of them on every device; ``"gspmd"``, missing sharding information and
  bad shardings (with a warning) run ``fn`` on the global arrays, as
  :func:`owner_computes` does.

  Args:
    fn: ``(x, *args) -> pytree`` of arrays with leading axis the matrices of
      ``x`` (``(q, m, n)``), matrix by matrix, no collective; zero matrices
      (padding) must not raise.
    matrices: arrays ``(*batch, m, n)``.
    args: replicated extra operands of ``fn``.
    specs: the ``PartitionSpec`` of each matrix (see :func:`owner_computes`).
    strategy: ``"auto"``, ``"owner"``, ``"replicate"`` or ``"gspmd"``.
    names: a name per matrix for the fallback warning.

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
  _check_strategy(strategy)
  matrices = list(matrices)
  if specs is not None and len(specs) != len(matrices):
    raise ValueError(f"specs must have one entry per matrix ({len(matrices)}), got {len(specs)}")
  if names is not None and len(names) != len(matrices):
    raise ValueError(f"names must have one entry per matrix ({len(matrices)}), got {len(names)}")
  args = tuple(args)

  def unbatched(x):  # fn on the global (*batch, m, n) array
    batch = x.shape[:-2]
    out = fn(x.reshape(-1, *x.shape[-2:]), *args)
    return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), out)

  out: list[Any] = [None] * len(matrices)
  groups: dict[tuple, list[_Item]] = {}
  for i, x in enumerate(matrices):
    if x.ndim < 2:
      raise ValueError(f"matrices[{i}] must have ndim >= 2, got shape {x.shape}")
    item = _Item(i, x, str(names[i]) if names is not None else f"matrix {i}")
    why = "gspmd" if strategy == "gspmd" else _resolve(item, None if specs is None else specs[i])
    matrix_axes = () if why else _names(item.spec[-2]) + _names(item.spec[-1])
    if why or not matrix_axes:
      if why not in ("gspmd", "local", "unknown", None):
        _warn(item.name, why)
      out[i] = unbatched(x)
      continue
    groups.setdefault((x.shape[-2:], x.dtype, item.spec[-2:], item.mesh), []).append(item)
  for items in groups.values():
    for it, y in zip(items, _owner_map_group(fn, items, args, strategy), strict=True):
      out[it.index] = y
  return out


def _owner_map_group(fn: Callable[..., Any], items: list[_Item], args: tuple,
                     strategy: str) -> list[Any]:
  """One shard_map of :func:`owner_map` over a group (equal shape and matrix sharding)."""
  mesh = items[0].mesh
  m, n = items[0].x.shape[-2:]
  row_axes = _split_axes(items[0].spec[-2], mesh)
  col_axes = _split_axes(items[0].spec[-1], mesh)
  axes = row_axes + col_axes
  s_m = math.prod(mesh.shape[a] for a in row_axes)
  s_n = math.prod(mesh.shape[a] for a in col_axes)
  s = s_m * s_n
  ml, nl = m // s_m, n // s_n
  batch_shapes = [_local_shape(it.x.shape, it.spec, mesh)[:-2] for it in items]
  counts = [math.prod(shape) for shape in batch_shapes]
  b = sum(counts)
  if strategy == "auto":
    strategy = "owner" if b >= 2 else "replicate"
  q = -(-b // s)

  def body(*operands):
    xs, a = operands[: len(items)], operands[len(items):]
    cat = jnp.concatenate([x.reshape(c, ml, nl) for x, c in zip(xs, counts, strict=True)])
    if s == 1:  # only mesh axes of size 1: the matrices are whole already
      res = fn(cat, *a)
    elif strategy == "owner":
      cat = jnp.pad(cat, ((0, q * s - b), (0, 0), (0, 0)))
      mine = _whole(jax.lax.all_to_all(cat.reshape(s, q, ml, nl), axes, 0, 0, tiled=True),
                    s_m, s_n, ml, nl)
      res = jax.tree.map(lambda y: jax.lax.all_gather(y, axes, axis=0, tiled=True)[:b],
                         fn(mine, *a))
    else:  # replicate
      res = fn(_whole(jax.lax.all_gather(cat, axes, axis=0, tiled=False), s_m, s_n, ml, nl), *a)
    starts = [sum(counts[:i]) for i in range(len(counts))]

    def part(st, c, sh):  # one matrix array's results, with its own batch shape
      return jax.tree.map(lambda y: y[st : st + c].reshape(*sh, *y.shape[1:]), res)

    return tuple(part(*z) for z in zip(starts, counts, batch_shapes, strict=True))

  in_specs = tuple(P(*it.spec) for it in items) + (P(),) * len(args)
  out_specs = tuple(_batch_spec(it.spec) for it in items)
  # The all-gathered results are replicated over the matrix axes (not inferable: no check).
  mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  return list(mapped(*(it.x for it in items), *args))
