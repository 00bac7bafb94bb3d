"""Shared pieces of the owner-computes paths (:mod:`optimizers.distributed`):
the strategies, a matrix with its mesh and spec, and the check that the owner
path can run on it (otherwise the partitioner's path, with one warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from optimizers._sharding import named_sharding, padded_spec

STRATEGIES = ("auto", "owner", "replicate", "gspmd")


def axis_names(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_axes(spec: tuple) -> tuple[str, ...]:
  """The mesh axes that shard the batch axes of a ``(*batch, m, n)`` spec, sorted."""
  return tuple(sorted({n for e in spec[:-2] for n in axis_names(e)}))


def check_strategy(strategy: str) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")


class OwnedMatrix:
  """One matrix array with what :func:`owner_computes` found out about it."""

  def __init__(self, index: int, x: jax.Array, name: str):
    self.index, self.x, self.name = index, x, name
    self.mesh: Any = None
    self.spec: tuple | None = None


def mesh_of(x: Any) -> Any:
  sharding = named_sharding(x)
  mesh = None if sharding is None else sharding.mesh
  if mesh is None or mesh.empty:
    mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def warn_fallback(name: str, reason: str) -> None:
  warnings.warn(
      f"owner_computes: {name}: {reason}; using the partitioner's path (correct, with "
      "collectives inside the matrix function)", stacklevel=4)


def resolve_sharding(item: OwnedMatrix, spec: Any) -> str | None:
  """Fills ``item.mesh`` / ``item.spec``; returns why the owner path cannot run."""
  x = item.x
  mesh = mesh_of(x)
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
    names = axis_names(entry)
    if any(n not in mesh.axis_names for n in names):
      return f"spec {spec} names an axis not in the mesh {mesh.axis_names}"
    if dim % math.prod(mesh.shape[n] for n in names):
      return f"a mesh axis does not divide the shape {x.shape} (spec {spec})"
  item.mesh, item.spec = mesh, spec
  return None


def local_shape(shape: tuple[int, ...], spec: tuple, mesh: Any) -> tuple[int, ...]:
  return tuple(d // math.prod(mesh.shape[n] for n in axis_names(e))
               for d, e in zip(shape, spec, strict=True))


def group_matrices(
    matrices: Sequence[jax.Array],
    specs: Sequence[Any] | None,
    names: Sequence[str] | None,
    strategy: str,
    local: Callable[[jax.Array], Any],
) -> tuple[list[Any], list[list[OwnedMatrix]]]:
  """Checks the arguments of an owner map and sorts its matrices: ``local(x)`` for those
  the owner path cannot take (no mesh, ``Auto`` axes without a spec, ``"gspmd"``, unsharded
  matrix axes, or a spec that does not fit: the last with one warning), groups of equal
  shape, dtype, matrix-axis sharding and mesh for the others.

  Returns ``(out, groups)``: ``out[i]`` holds the local results (``None`` where grouped).
  """
  check_strategy(strategy)
  if specs is not None and len(specs) != len(matrices):
    raise ValueError(f"specs must have one entry per matrix ({len(matrices)}), got {len(specs)}")
  if names is not None and len(names) != len(matrices):
    raise ValueError(f"names must have one entry per matrix ({len(matrices)}), got {len(names)}")
  out: list[Any] = [None] * len(matrices)
  groups: dict[tuple, list[OwnedMatrix]] = {}
  for i, x in enumerate(matrices):
    if x.ndim < 2:
      raise ValueError(f"matrices[{i}] must have ndim >= 2, got shape {x.shape}")
    item = OwnedMatrix(i, x, str(names[i]) if names is not None else f"matrix {i}")
    spec = None if specs is None else specs[i]
    why = "gspmd" if strategy == "gspmd" else resolve_sharding(item, spec)
    matrix_axes = () if why else axis_names(item.spec[-2]) + axis_names(item.spec[-1])
    if why or not matrix_axes:
      if why not in ("gspmd", "local", "unknown", None):
        warn_fallback(item.name, why)
      out[i] = local(x)
      continue
    # The mesh axes of the batch axes are part of the key: a group's results vary over
    # the union of its members' batch axes (shard_map's replication check).
    groups.setdefault((x.shape[-2:], x.dtype, item.spec[-2:], item.mesh,
                       batch_axes(item.spec)), []).append(item)
  return out, list(groups.values())


class PackedGroup:
  """The static layout of one group (equal shape and matrix sharding) inside a packed
  owner round trip, which runs several groups with one all-to-all in."""

  def __init__(self, items: list[OwnedMatrix]):
    self.items = items
    mesh, spec = items[0].mesh, items[0].spec
    self.m, self.n = items[0].x.shape[-2:]
    self.row_axes, self.col_axes = axis_names(spec[-2]), axis_names(spec[-1])
    self.s_m = math.prod(mesh.shape[a] for a in self.row_axes)
    self.s_n = math.prod(mesh.shape[a] for a in self.col_axes)
    self.ml, self.nl = self.m // self.s_m, self.n // self.s_n
    self.local_shapes = [local_shape(it.x.shape, it.spec, mesh) for it in items]
    self.counts = [math.prod(shape[:-2]) for shape in self.local_shapes]
    self.b = sum(self.counts)
    self.block = self.ml * self.nl  # elements of one local block

  def owner_elements(self, s: int) -> int:
    """Per-device elements of the auto strategy's collectives for this group alone."""
    if self.b >= 2:
      return 2 * -(-self.b // s) * s * self.block  # padded owner: in and out
    return s * self.block  # replicate: one all-gather

  def whole(self, blocks: jax.Array) -> jax.Array:
    """``(s, k, ...)`` local blocks (axis 0 in block order, row-major over the row then
    the column mesh axes) -> the ``k`` whole matrices ``(k, m, n)``."""
    k = blocks.shape[1]
    y = blocks.reshape(self.s_m, self.s_n, k, self.ml, self.nl).transpose(2, 0, 3, 1, 4)
    return y.reshape(k, self.m, self.n)

  def blocks(self, y: jax.Array) -> jax.Array:
    """Inverse of :meth:`whole`: ``(k, m, n)`` -> ``(s, k, ml nl)`` in block order."""
    k = y.shape[0]
    y = y.reshape(k, self.s_m, self.ml, self.s_n, self.nl).transpose(1, 3, 0, 2, 4)
    return y.reshape(self.s_m * self.s_n, k, self.block)

  def block_devices(self, axes: tuple[str, ...]) -> np.ndarray:
    """``(s,)``: for block ``p = row * s_n + col`` of a matrix (row-major over the row
    then the column mesh axes, as in the spec), the device's index in an all-to-all
    over ``axes`` (mixed radix in the order of ``axes``, which hold the same axes)."""
    mesh = self.items[0].mesh
    stride, st = {}, 1
    for a in reversed(axes):
      stride[a] = st
      st *= mesh.shape[a]
    out = np.zeros((), np.int64)
    for a in self.row_axes + self.col_axes:  # block index: row axes first, most significant
      out = out[..., None] + stride[a] * np.arange(mesh.shape[a])
    return out.reshape(-1)

  def split(self, stacked: Any) -> list[Any]:
    """``(b, ...)`` per-matrix values (a pytree) -> one per array, ``(*batch, ...)``."""
    starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
    return [jax.tree.map(
        lambda y, st=st, c=c, sh=sh: y[st : st + c].reshape(*sh[:-2], *y.shape[1:]), stacked)
            for st, c, sh in zip(starts, self.counts, self.local_shapes, strict=True)]


class Packing:
  """Which device owns which matrix of the packed groups, and the chunk layout.

  Every matrix ``(group, index)`` gets one owner device, largest blocks first to the
  least loaded device (LPT); ``chunk`` (elements) is the largest owner load: each device
  sends every owner one chunk holding its blocks of that owner's matrices. ``offsets[d]``
  lists ``(group, index, offset in the chunk)`` for device ``d``; devices owning the same
  groups in the same order share a ``signature`` (one ``lax.switch`` branch each).
  """

  def __init__(self, groups: list[PackedGroup]):
    mesh = groups[0].items[0].mesh
    used = set(groups[0].row_axes + groups[0].col_axes)
    self.axes = tuple(a for a in mesh.axis_names if a in used)  # of the all-to-all
    self.s = s = math.prod(mesh.shape[a] for a in self.axes)
    self.groups = groups
    # Source device (all-to-all order) of each block: groups may shard their rows and
    # columns over the same mesh axes in different orders (e.g. transposed views).
    self.block_devices = [g.block_devices(self.axes) for g in groups]
    order = sorted(((gi, j) for gi, g in enumerate(groups) for j in range(g.b)),
                   key=lambda t: (-groups[t[0]].block, t[0], t[1]))
    owned: list[list[tuple[int, int]]] = [[] for _ in range(s)]
    load = [0] * s
    for gi, j in order:
      d = min(range(s), key=lambda k: (load[k], k))
      owned[d].append((gi, j))
      load[d] += groups[gi].block
    self.chunk = max(load)
    self.offsets = []
    for mine in owned:
      o, rows = 0, []
      for gi, j in mine:
        rows.append((gi, j, o))
        o += groups[gi].block
      self.offsets.append(rows)
    self.signatures = sorted({tuple(gi for gi, _ in mine) for mine in owned})
    self.branch_of = [self.signatures.index(tuple(gi for gi, _ in mine)) for mine in owned]

  def owned(self, compute: Callable[..., jax.Array], operands: tuple) -> jax.Array:
    """In a ``shard_map`` body over every matrix array of the groups then replicated
    extra operands: the blocks to their owners (one all-to-all), then
    ``compute(signature, received, extras)`` on this device's own matrices only
    (``lax.switch`` on its mesh index)."""
    n = sum(len(g.items) for g in self.groups)
    recv = jax.lax.all_to_all(self.send(operands[:n]), self.axes, 0, 0, tiled=True)
    me = jnp.asarray(self.branch_of, jnp.int32)[jax.lax.axis_index(self.axes)]
    return jax.lax.switch(me, [lambda r, *a, sig=sig: compute(sig, r, a)
                               for sig in self.signatures], recv, *operands[n:])

  def send(self, xs: Sequence[jax.Array]) -> jax.Array:
    """The ``(s, chunk)`` all-to-all operand: row ``d`` holds this device's blocks of
    device ``d``'s matrices; ``xs`` are the local blocks of every group's arrays."""
    cats, k = [], 0
    for g in self.groups:
      n = len(g.items)
      cats.append(jnp.concatenate([x.reshape(c, g.block) for x, c in
                                   zip(xs[k : k + n], g.counts, strict=True)]))
      k += n
    zero = jnp.zeros((0,), cats[0].dtype)
    return jnp.stack([
        jnp.pad(jnp.concatenate([cats[gi][j] for gi, j, _ in rows] or [zero]),
                (0, self.chunk - sum(self.groups[gi].block for gi, _, _ in rows)))
        for rows in self.offsets])

  def whole(self, signature: tuple, recv: jax.Array) -> list[tuple[int, list[int], jax.Array]]:
    """On a device owning the groups ``signature`` (in chunk order), from the received
    ``(s, chunk)`` blocks: per group ``(group, chunk offsets, whole matrices (k, m, n))``."""
    o, by_group = 0, {}
    for gi in signature:
      by_group.setdefault(gi, []).append(o)
      o += self.groups[gi].block
    out = []
    for gi, starts in by_group.items():
      g = self.groups[gi]
      blocks = jnp.stack([recv[self.block_devices[gi], st : st + g.block] for st in starts], 1)
      out.append((gi, starts, g.whole(blocks)))
    return out


def packed_map(body: Callable[..., tuple], groups: list[PackedGroup], args: tuple,
                out_spec: Callable[[OwnedMatrix], P]) -> list[list]:
  """``shard_map(body)`` over every matrix of the packed ``groups`` and the replicated
  ``args``; its flat outputs (one per matrix array, spec ``out_spec(item)``) per group."""
  items = [it for g in groups for it in g.items]
  mapped = jax.shard_map(body, mesh=items[0].mesh,
                         in_specs=tuple(P(*it.spec) for it in items) + (P(),) * len(args),
                         out_specs=tuple(out_spec(it) for it in items), check_vma=False)
  flat = list(mapped(*(it.x for it in items), *args))
  out, k = [], 0
  for g in groups:
    out.append(flat[k : k + len(g.items)])
    k += len(g.items)
  return out


def packs(groups: list[list[OwnedMatrix]], strategy: str,
          own_elements: Callable[[PackedGroup, int], int] = PackedGroup.owner_elements,
          packed_elements: Callable[[Packing], int] = lambda p: 2 * p.s * p.chunk,
          ) -> list[list[list[OwnedMatrix]]]:
  """Groups to run as one packed round trip (``"auto"`` only): those sharing the
  mesh, the set of mesh axes of the matrix axes (in any order: a transposed view
  packs with the others), the dtype and the batch axes, when the packed round
  trip moves strictly fewer elements (``packed_elements``) than the groups' own
  strategies (``own_elements`` summed); every other group alone."""
  if strategy != "auto":
    return [[g] for g in groups]
  by_key: dict[tuple, list[list[OwnedMatrix]]] = {}
  for g in groups:
    it = g[0]
    matrix_axes = frozenset(axis_names(it.spec[-2]) + axis_names(it.spec[-1]))
    by_key.setdefault((it.mesh, matrix_axes, it.x.dtype, batch_axes(it.spec)), []).append(g)
  out = []
  for members in by_key.values():
    layouts = [PackedGroup(g) for g in members]
    pack = Packing(layouts)
    own = sum(own_elements(g, pack.s) for g in layouts)
    if len(members) > 1 and packed_elements(pack) < own:
      out.append(members)
    else:
      out.extend([g] for g in members)
  return out
