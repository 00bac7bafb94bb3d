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
from jax.sharding import AxisType

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
