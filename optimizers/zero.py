r"""ZeRO stage 1: optimizer-state PartitionSpecs sharded over the data axis.

Data parallelism replicates the optimizer state on every data-parallel device;
ZeRO-1 (Rajbhandari et al., 2020) shards it instead, so each device holds about
``1/|data|`` of the state, while the parameters may stay replicated. Under
``jax.jit`` with these shardings XLA computes each state shard's update locally
and all-gathers the updates for the replicated parameters.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", 2020, https://arxiv.org/abs/1910.02054
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = ["zero1_partition_specs"]


def _mesh_sizes(mesh: Any) -> dict[str, int]:
  shape = getattr(mesh, "shape", mesh)
  try:
    return {str(k): int(v) for k, v in dict(shape).items()}
  except (TypeError, ValueError) as e:
    raise ValueError(f"mesh must be a jax Mesh/AbstractMesh or a dict of axis sizes, got "
                     f"{mesh!r}") from e


def _entry_names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def zero1_partition_specs(
    state: Any,
    state_specs: Any,
    mesh: Any,
    *,
    data_axis: str = "data",
    replicate_below: int = 0,
) -> Any:
  r"""ZeRO stage 1: shards every optimizer-state leaf over the data axis as well.

  For each leaf of ``state`` (shape ``s``) with spec ``state_specs`` (``p``), the
  data axis is added to the leaf's largest axis ``i`` that it divides, i.e.
  ``s[i] % (|p[i]| * |data|) == 0`` where ``|p[i]|`` is the product of the mesh
  axes already on ``i`` (first such axis on ties), whatever the parameter's own
  spec was. Leaves already sharded over ``data_axis`` keep their spec, 0-d leaves
  (counters, scalars) stay replicated. Each device then holds about ``1/|data|``
  of the state; the parameters themselves can stay replicated over ``data``
  (only the update is computed on shards and all-gathered).

  Args:
    state: the state or its abstract value (``jax.eval_shape(tx.init, params)``).
    state_specs: a tree like ``state`` of ``PartitionSpec`` (``None``: replicated),
      e.g. from :func:`subspace_partition_specs`.
    mesh: the mesh (or a dict ``{axis name: size}``).
    data_axis: the mesh axis to shard the state over.
    replicate_below: leaves with fewer elements than this stay as they are
      (e.g. rank-sized index sets); every other leaf must be placeable.

  Returns:
    A tree like ``state_specs`` of ``PartitionSpec``.

  Raises:
    ValueError: ``data_axis`` or a spec's axis name is not on the mesh, or a
      leaf (named by its path) has no axis that the data axis divides.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from optimizers import zero1_partition_specs
    >>> state = {"mu": jnp.zeros((6, 16)), "count": jnp.zeros((), jnp.int32)}
    >>> zero1_partition_specs(state, {"mu": P(None, "model"), "count": P()},
    ...                       {"data": 4, "model": 2})
    {'count': P(), 'mu': P(None, ('model', 'data'))}
  """
  sizes = _mesh_sizes(mesh)
  if data_axis not in sizes:
    raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {sorted(sizes)}")
  n_data = sizes[data_axis]

  def place(path: Any, spec: Any, leaf: Any) -> P:
    where = jax.tree_util.keystr(path)
    shape = tuple(jnp.shape(leaf))
    entries = list(spec or P()) + [None] * (len(shape) - len(spec or P()))
    if len(entries) > len(shape):
      raise ValueError(f"state_specs{where}: {spec} has more entries than the leaf's shape "
                       f"{list(shape)}")
    used = [_entry_names(e) for e in entries]
    for names in used:
      for n in names:
        if n not in sizes:
          raise ValueError(f"state_specs{where}: axis name {n!r} is not an axis of the mesh "
                           f"{sorted(sizes)}")
    if any(data_axis in names for names in used) or not shape or (
        math.prod(shape) < replicate_below):
      return spec if isinstance(spec, P) else P()  # unchanged
    best = None
    for i, (dim, names) in enumerate(zip(shape, used, strict=True)):
      if dim % (math.prod(sizes[n] for n in names) * n_data) == 0 and (
          best is None or dim > shape[best]):
        best = i
    if best is None:
      raise ValueError(
          f"zero1_partition_specs: the state leaf {where} of shape {list(shape)} (spec {spec}) "
          f"has no axis divisible by the {data_axis!r} axis ({n_data} devices) on top of its "
          "spec; pad it, shard the parameter differently, or replicate leaves this small with "
          "replicate_below.")
    names = used[best] + (data_axis,)
    entries[best] = names[0] if len(names) == 1 else names
    return P(*entries)

  try:
    flat_specs = jax.tree.structure(state).flatten_up_to(state_specs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"state_specs must be a tree like the state with a PartitionSpec (or None) "
                     f"per leaf: {e}") from e
  flat = jax.tree_util.tree_flatten_with_path(state)
  out = [place(path, s, x) for (path, x), s in zip(flat[0], flat_specs, strict=True)]
  return flat[1].unflatten(out)
