"""Sharding helpers: they act only under ``AxisType.Explicit`` mesh axes (a no-op otherwise).

Two ways to find the mesh. The *array's own type* (:func:`explicit_mesh`,
:func:`spec_of`, :func:`reshard`): works with or without a ``jax.set_mesh``
context, used by the low-rank wrapper. The *ambient* abstract mesh
(:func:`ambient_spec`, :func:`restore_spec`, :func:`rows_unsharded`): the spec
of ``x`` only when the surrounding context sets an Explicit mesh, used by the
matrix functions of :mod:`optimizers.linalg`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "ambient_spec",
    "box_names",
    "box_value",
    "explicit_mesh",
    "is_box",
    "mesh_axis_names",
    "named_sharding",
    "padded_spec",
    "reshard",
    "reshard_like",
    "restore_spec",
    "rows_unsharded",
    "sharded_matmul",
    "spec_of",
    "unshard_axes",
]


def named_sharding(x: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of an array, tracer or ``ShapeDtypeStruct``, else None."""
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  return sharding if isinstance(sharding, NamedSharding) else None


def explicit_mesh(x: Any) -> Any:
  """The mesh of ``x``'s sharding if it has Explicit axes (the array's own type, so
  this works with or without a ``jax.set_mesh`` context), else None."""
  sharding = named_sharding(x)
  if sharding is None or sharding.mesh.empty:
    return None
  return sharding.mesh if AxisType.Explicit in sharding.mesh.axis_types else None


def padded_spec(spec: Any, ndim: int) -> tuple:
  """PartitionSpec entries padded with ``None`` to ``ndim``."""
  spec = tuple(spec) if spec is not None else ()
  return spec + (None,) * (ndim - len(spec))


def spec_of(x: Any) -> tuple:
  """The (padded) PartitionSpec entries of an array, tracer or ShapeDtypeStruct."""
  sharding = named_sharding(x)
  return padded_spec(None if sharding is None else sharding.spec, len(x.shape))


def reshard(x: jax.Array, spec: tuple, mesh: Any) -> jax.Array:
  """Reshards ``x`` to ``spec`` on the Explicit ``mesh`` (no-op when ``mesh`` is None)."""
  if mesh is None:
    return x
  spec = padded_spec(spec, x.ndim)
  if explicit_mesh(x) == mesh and spec_of(x) == spec:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, P(*spec)))


def reshard_like(new: Any, old: Any) -> Any:
  """Every leaf of ``new`` resharded like the matching leaf of ``old``."""
  return jax.tree.map(lambda n, o: reshard(n, spec_of(o), explicit_mesh(o)), new, old)


def sharded_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b``; under Explicit axes, a contraction over an axis sharded in both
  operands is all-reduced into ``a``'s batch and row sharding and ``b``'s columns."""
  mesh = explicit_mesh(a) or explicit_mesh(b)
  sa, sb = spec_of(a), spec_of(b)
  if mesh is None or sa[-1] is None or sa[-1] != sb[-2]:
    return a @ b
  col = None if sb[-1] is not None and sb[-1] == sa[-2] else sb[-1]
  return jnp.matmul(a, b, out_sharding=NamedSharding(mesh, P(*sa[:-2], sa[-2], col)))


def project_on_sharded_rows(g: jax.Array, basis: jax.Array) -> jax.Array:
  """``g Q`` for ``g`` (``(*batch, k, d)``) with a sharded projected axis ``d`` and ``Q``
  (``(*batch, d, r)``) replicated over it: under Explicit axes ``Q`` is sliced like
  ``g``'s last axis and the partial products are summed (one all-reduce of the ``k x r``
  result); otherwise a plain product."""
  mesh = explicit_mesh(g)
  spec = spec_of(g)
  if mesh is None or spec[-1] is None:
    return g @ basis
  return sharded_matmul(g, reshard(basis, (*spec[:-2], spec[-1], None), mesh))


def rows_layout(low: jax.Array, g: jax.Array) -> jax.Array:
  """``low`` (``(*batch, k, r)``) in the layout of ``g``'s batch and row axes,
  replicated along the last axis (under Explicit axes; otherwise ``low``)."""
  mesh = explicit_mesh(g)
  return low if mesh is None else reshard(low, (*spec_of(g)[:-1], None), mesh)


def unshard_axes(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Reshards ``x`` (Explicit axes only) so that ``axes`` are not sharded."""
  spec = list(spec_of(x))
  for a in axes:
    spec[a % x.ndim] = None
  return reshard(x, tuple(spec), explicit_mesh(x))


def mesh_axis_names(specs: Any) -> tuple[str, ...]:
  """The mesh axis names used in a tree of PartitionSpecs, in order of appearance."""
  names: list[str] = []
  for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)):
    if not isinstance(spec, P):
      continue
    for entry in spec:
      for name in (entry,) if isinstance(entry, str) else (entry or ()):
        if name not in names:
          names.append(name)
  return tuple(names)


# ---------------------------------------------------------------------------
# The ambient (context) mesh.
# ---------------------------------------------------------------------------


def ambient_spec(x: jax.Array) -> tuple | None:
  """The padded PartitionSpec of ``x`` under an Explicit ambient mesh, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return None
  return padded_spec(getattr(jax.typeof(x).sharding, "spec", None), x.ndim)


def restore_spec(x: jax.Array, spec: tuple | None) -> jax.Array:
  """``x`` resharded to ``spec`` (from :func:`ambient_spec`; None: unchanged)."""
  if spec is None or ambient_spec(x) in (None, spec):
    return x
  return jax.sharding.reshard(x, P(*spec))


def rows_unsharded(w: jax.Array) -> jax.Array:
  """``w`` with its row axis unsharded (Explicit ambient mesh only), columns kept."""
  spec = ambient_spec(w)
  if spec is None or spec[-2] is None:
    return w
  return jax.sharding.reshard(w, P(*spec[:-2], None, spec[-1]))


# ---------------------------------------------------------------------------
# Flax boxes (parameters carrying their logical axis names).
# ---------------------------------------------------------------------------


def is_box(x: Any) -> bool:
  """A flax box: linen ``nn.Partitioned``/``nn.LogicallyPartitioned`` or an nnx variable."""
  from flax import nnx
  from flax.core import meta

  return isinstance(x, (meta.Partitioned, nnx.Variable))


def box_names(x: Any) -> tuple | None:
  """The logical axis names of a flax box (None: an nnx variable without them)."""
  from flax import nnx

  if isinstance(x, nnx.Variable):
    names = x.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)
  return tuple(x.names)


def box_value(x: Any) -> Any:
  """The array inside a flax box."""
  from flax import nnx

  return x.get_value() if isinstance(x, nnx.Variable) else x.value
