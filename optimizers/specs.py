r"""PartitionSpecs of optimizer states, derived from the params' PartitionSpecs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers._sharding import box_names, box_value, is_box, mesh_axis_names, spec_of

__all__ = ["subspace_partition_specs", "logical_partition_specs"]


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
  replicated, except SVD bases, also sharded along the projected axis like the
  parameter; counters replicated). Use the result with
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


def logical_partition_specs(
    optimizer: optax.GradientTransformation, params: Any, param_axes: Any = None
) -> Any:
  r"""Logical axis names of ``optimizer.init(params)``, from the params' logical names.

  The same traversal as :func:`subspace_partition_specs`, with logical axis
  names (``"embed"``, ``"mlp"``, ``"layers"`` ...) in place of mesh axes:

  * parameter-shaped state (Adam moments, EMAs, teachers) takes its parameter's names;
  * rank-space moments of the subspace optimizers keep the names of the
    unprojected side and of the stacked (batch) axes; the rank axis is ``None``
    (replicated);
  * projector state (DCT indices, SVD / online-PCA bases) keeps the names of the
    stacked axes (and of the projected side for SVD bases), ``None`` elsewhere;
  * counters and other scalars: ``P()``.

  Each leaf's spec has one entry per axis of the state leaf, so the result
  plugs into the frameworks' logical-axis machinery:
  ``flax.linen.logical_to_mesh_sharding(specs, mesh, rules)`` (MaxText),
  ``nn.logical_to_mesh_axes(spec, rules)`` per leaf, or used directly as a
  ``PartitionSpec`` when the logical names are mesh axes.

  Args:
    optimizer: any optax transformation (full optimizers, chains with optax
      transforms).
    params: arrays, ``jax.ShapeDtypeStruct`` or boxed params (flax linen
      ``nn.LogicallyPartitioned``/``nn.Partitioned``, nnx variables with
      ``out_sharding`` metadata); only shapes are read.
    param_axes: a tree like the (unboxed) params of tuples of logical names (or
      ``PartitionSpec``, ``None``: replicated); ``None`` reads them from the boxes
      (an unboxed leaf is replicated).

  Returns:
    A tree like ``optimizer.init(unboxed params)`` with a ``PartitionSpec`` of
    logical names per leaf.

  Raises:
    ValueError: a names tuple whose length differs from its parameter's ndim,
      naming the leaf path.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optimizers import dct_adamw, logical_partition_specs
    >>> params = {"w": jax.ShapeDtypeStruct((16, 64), jnp.float32)}
    >>> specs = logical_partition_specs(dct_adamw(1e-3, 4), params, {"w": ("embed", "mlp")})
    >>> specs[0].inner_state.mu["w"], specs[0].projector_state.indices["w"]
    (P('mlp', None), P(None,))
  """
  if param_axes is None:
    param_axes = jax.tree.map(lambda b: box_names(b) if is_box(b) else None, params,
                              is_leaf=is_box)
  params = jax.tree.map(lambda b: box_value(b) if is_box(b) else b, params, is_leaf=is_box)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
  try:
    flat_axes = jax.tree.structure(params).flatten_up_to(param_axes)
  except (ValueError, TypeError) as e:
    raise ValueError(f"param_axes must be a tree like the params with a tuple of logical "
                     f"names (or None) per leaf: {e}") from e
  specs = []
  for (path, x), axes in zip(jax.tree_util.tree_flatten_with_path(params)[0], flat_axes,
                             strict=True):
    names = () if axes is None else tuple(axes)
    if len(names) > x.ndim:
      raise ValueError(f"param_axes{jax.tree_util.keystr(path)}: {len(names)} names {names} "
                       f"for a leaf of shape {list(x.shape)}.")
    specs.append(P(*names))
  state_specs = subspace_partition_specs(
      optimizer, params, jax.tree.structure(params).unflatten(specs))
  abstract = jax.eval_shape(optimizer.init, params)
  return jax.tree.map(
      lambda x, s: P(*(tuple(s) + (None,) * (x.ndim - len(s)))), abstract, state_specs)
