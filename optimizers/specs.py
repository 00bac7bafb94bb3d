r"""PartitionSpecs of optimizer states, derived from the params' PartitionSpecs."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers._sharding import mesh_axis_names, spec_of

__all__ = ["subspace_partition_specs"]


def subspace_partition_specs(
    optimizer: optax.GradientTransformation, params: Any, param_specs: Any
) -> Any:
  r"""PartitionSpecs of ``optimizer.init(params)`` from the params' PartitionSpecs.

  Works for any optimizer built from this module (and from optax pieces that
  create their state with ``zeros_like(params)``): the state is traced with
  ``jax.eval_shape`` on params carrying ``param_specs`` over an abstract mesh
  with ``AxisType.Explicit`` axes, where :func:`subspace` places every state
  leaf (rank-shaped moments: the parameter's batch and kept axes, rank axis
  replicated; indices and bases: the parameter's batch axes, the rest
  replicated; counters replicated). Use the result with
  ``NamedSharding(mesh, spec)`` to place the state, e.g. for a pretraining
  script; the jitted update keeps these shardings.

  Args:
    optimizer: the optimizer (a chain containing :func:`subspace` or not).
    params: the params (arrays or ``jax.ShapeDtypeStruct``; only shapes and
      dtypes are read).
    param_specs: a tree like ``params`` of ``PartitionSpec`` (or ``None`` for
      replicated).

  Returns:
    A tree like ``optimizer.init(params)`` with a ``PartitionSpec`` per leaf.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from optimizers import dct_adamw, subspace_partition_specs
    >>> params = {"w": jnp.zeros((16, 64))}
    >>> specs = subspace_partition_specs(dct_adamw(1e-3, 4), params, {"w": P(None, "model")})
    >>> specs[0].inner_state.mu["w"], specs[0].projector_state.indices["w"]
    (P('model', None), P(None,))
  """
  is_spec = lambda s: s is None or isinstance(s, P)
  names = mesh_axis_names(param_specs)
  mesh = jax.sharding.AbstractMesh(
      (1,) * len(names), names, axis_types=(AxisType.Explicit,) * len(names)
  )
  abstract = jax.tree.map(
      lambda s, p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=NamedSharding(mesh, s or P())),
      param_specs, params, is_leaf=is_spec,
  )
  with jax.sharding.use_abstract_mesh(mesh):
    state = jax.eval_shape(optimizer.init, abstract)
  return jax.tree.map(lambda x: P(*spec_of(x)) if x.sharding is not None else P(), state)
