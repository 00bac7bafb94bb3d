"""Viewing parameter leaves as batches of matrices.

Matrix methods (spectral clipping, low-rank projection) act on 2-D slices of
parameter tensors. This module decides, per leaf, which two (groups of) axes
form the matrix and turns a leaf into an array of shape ``(*batch, m, n)`` and
back:

* ``m`` is the product of the *reduction* axes (a Flax ``Dense`` kernel is
  ``(in, out)``, so its reduction axis is 0),
* ``n`` is the product of the *output* axes,
* every remaining axis is a batch axis, kept in its original order (stacked or
  scanned layers, attention heads), wherever it sits.

The default view treats every leaf with ``ndim >= 2`` as a batch of matrices
over its last two axes and leaves ``ndim < 2`` untouched (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

__all__ = [
    "MatrixDims",
    "WeightDimensionNumbers",
    "as_matrix_dims",
    "resolve_matrix_dims",
    "matrix_shape",
    "to_matrix",
    "from_matrix",
    "map_matrices",
    "leaf_spec",
    "check_real_floating",
    "check_tree_match",
    "reject_masked_nodes",
    "concrete_hyperparameter",
]


class MatrixDims(NamedTuple):
  """Which axes of a leaf form the matrix; all other axes are batch axes.

  Same fields as ``optax.contrib.MuonDimensionNumbers`` and
  ``optax.contrib.GaLoreDimensionNumbers`` (both are accepted wherever a
  ``MatrixDims`` is). Axes may be negative and may be tuples, in which case
  they are flattened (in the given order) into one matrix dimension.

  Attributes:
    reduction_axis: axis (or axes) forming the rows ``m`` (``in`` of ``x @ W``).
    output_axis: axis (or axes) forming the columns ``n``.
  """

  reduction_axis: Sequence[int] | int = -2
  output_axis: Sequence[int] | int = -1


# A pytree (params structure) of MatrixDims/None, a single MatrixDims for every
# leaf, or a callable params -> such a pytree.
WeightDimensionNumbers = Any | Callable[[Any], Any] | None

_DIMS_TYPES = (MatrixDims, MuonDimensionNumbers, GaLoreDimensionNumbers)


def _is_dims(x: Any) -> bool:
  return isinstance(x, _DIMS_TYPES)


def as_matrix_dims(dims: Any) -> MatrixDims:
  """Converts optax's Muon/GaLore dimension numbers to ``MatrixDims``."""
  if not _is_dims(dims):
    raise TypeError(f"expected MatrixDims (or optax Muon/GaLore dimension numbers), got {dims!r}")
  return MatrixDims(dims.reduction_axis, dims.output_axis)


def _axes(axis: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes:
    raise ValueError("MatrixDims axes must not be empty")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} out of range for a leaf with ndim={ndim}")
  return tuple(a % ndim for a in axes)


def _layout(shape: tuple[int, ...], dims: MatrixDims):
  ndim = len(shape)
  red = _axes(dims.reduction_axis, ndim)
  out = _axes(dims.output_axis, ndim)
  if set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(out):
    raise ValueError(f"reduction axes {red} and output axes {out} must be distinct (shape {shape})")
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  return batch, red, out


def matrix_shape(shape: tuple[int, ...], dims: Any) -> tuple[tuple[int, ...], int, int]:
  """Returns ``(batch_shape, m, n)`` of a leaf of ``shape`` viewed with ``dims``."""
  batch, red, out = _layout(tuple(shape), as_matrix_dims(dims))
  return (
      tuple(shape[a] for a in batch),
      math.prod(shape[a] for a in red),
      math.prod(shape[a] for a in out),
  )


def to_matrix(x: jax.Array, dims: Any) -> jax.Array:
  """Views ``x`` as an array of shape ``(*batch, m, n)`` (see module docstring)."""
  batch, red, out = _layout(x.shape, as_matrix_dims(dims))
  perm = batch + red + out
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  batch_shape = tuple(x.shape[: len(batch)])
  m = math.prod(x.shape[len(batch) : len(batch) + len(red)])
  n = math.prod(x.shape[len(batch) + len(red) :])
  if len(red) == 1 and len(out) == 1:
    return x
  return x.reshape(batch_shape + (m, n))


def from_matrix(y: jax.Array, dims: Any, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`to_matrix`: back to a leaf of ``shape``."""
  batch, red, out = _layout(tuple(shape), as_matrix_dims(dims))
  perm = batch + red + out
  y = y.reshape(tuple(shape[a] for a in perm))
  if perm == tuple(range(len(shape))):
    return y
  inverse = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
  return jnp.transpose(y, inverse)


def _default_dims(leaf: Any) -> MatrixDims | None:
  return MatrixDims(-2, -1) if getattr(leaf, "ndim", 0) >= 2 else None


def resolve_matrix_dims(weight_dimension_numbers: WeightDimensionNumbers, tree: Any) -> Any:
  """Returns a pytree (``tree``'s structure) of ``MatrixDims`` or ``None``.

  Args:
    weight_dimension_numbers: ``None`` for the default view (ndim >= 2 ->
      last two axes, else ``None``); a single ``MatrixDims`` applied to every
      leaf with ndim >= 2; a pytree matching ``tree`` whose leaves are
      ``MatrixDims`` or ``None`` (leave that leaf alone); or a callable
      ``tree -> such a pytree``.
    tree: the params or updates (only shapes are read).

  Returns:
    A pytree with ``tree``'s structure, ``MatrixDims`` or ``None`` per leaf.
  """
  spec = weight_dimension_numbers
  if callable(spec) and not _is_dims(spec):
    spec = spec(tree)
  if spec is None:
    return jax.tree.map(_default_dims, tree)
  if _is_dims(spec):
    single = as_matrix_dims(spec)
    return jax.tree.map(lambda l: single if getattr(l, "ndim", 0) >= 2 else None, tree)
  try:
    resolved = jax.tree.map(
        lambda d, _: None if d is None else as_matrix_dims(d),
        spec,
        tree,
        is_leaf=lambda d: d is None or _is_dims(d),
    )
  except ValueError as e:  # jax's structure mismatch, reworded to name the argument
    raise ValueError(
        "weight_dimension_numbers must be None, a MatrixDims, a callable or a pytree of "
        f"MatrixDims/None with the params' structure; the structures differ: {e}"
    ) from e
  return resolved


def dims_leaves(dims_tree: Any, tree: Any) -> list[MatrixDims | None]:
  """Flattens a resolved dims tree in the leaf order of ``tree``."""
  return jax.tree.structure(tree).flatten_up_to(dims_tree)


def map_matrices(fn: Callable[[jax.Array], jax.Array], tree: Any, dims_tree: Any) -> Any:
  """Applies ``fn`` to the ``(*batch, m, n)`` view of every matrix leaf.

  Leaves whose dims are ``None`` (and ``optax.MaskedNode``/``None`` leaves)
  pass through unchanged. ``fn`` must return an array of the same shape.
  """
  leaves, treedef = jax.tree.flatten(tree)
  dims = treedef.flatten_up_to(dims_tree)
  out = []
  for x, d in zip(leaves, dims, strict=True):
    if d is None or isinstance(x, optax.MaskedNode) or x is None:
      out.append(x)
    else:
      out.append(from_matrix(fn(to_matrix(x, d)), d, x.shape))
  return treedef.unflatten(out)


# ---------------------------------------------------------------------------
# Input validation shared by every transformation (Python-level, trace-time).
# ---------------------------------------------------------------------------


def leaf_spec(x: Any) -> str:
  """``dtype[shape]`` of an array or scalar, e.g. ``float32[3, 5]`` (for error messages)."""
  return f"{jnp.result_type(x).name}{list(jnp.shape(x))}"


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_real_floating(tree: Any, *, owner: str, name: str = "updates") -> None:
  """Raises ``TypeError`` unless every leaf of ``tree`` has a real floating dtype.

  The transformations are real-valued: after float32 math an integer leaf would
  be silently truncated and a complex one would lose its imaginary coupling
  (inner products without conjugation). ``None`` and ``optax.MaskedNode``
  leaves are skipped, so the usual remedy, keeping such leaves out with
  ``optax.masked`` or ``optax.partition``, works.

  Args:
    tree: the updates or params.
    owner: the transformation's name, for the message.
    name: what ``tree`` is, for the message.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: {name}{jax.tree_util.keystr(path)} has dtype {dtype.name}; only real "
          "floating-point leaves (float16, bfloat16, float32, float64) are supported. Keep "
          "integer or complex leaves out with optax.masked or optax.partition."
      )


def check_tree_match(
    reference: Any, other: Any, *, owner: str, name: str, reference_name: str = "updates",
    dtypes: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``other`` has ``reference``'s tree and leaf shapes
  (and dtypes, with ``dtypes=True``); the message names the first mismatching leaf."""
  expected, got = jax.tree.structure(reference), jax.tree.structure(other)
  if expected != got:
    raise ValueError(
        f"{owner}: {name} must have the same tree structure as the {reference_name}; "
        f"got {name} {got}, {reference_name} {expected}."
    )
  paths = jax.tree_util.tree_flatten_with_path(reference)[0]
  for (path, r), o in zip(paths, jax.tree.leaves(other), strict=True):
    if jnp.shape(r) != jnp.shape(o) or (dtypes and jnp.result_type(r) != jnp.result_type(o)):
      what = "tree, shapes and dtypes" if dtypes else "tree and shapes"
      raise ValueError(
          f"{owner}: {name}{jax.tree_util.keystr(path)} is {leaf_spec(o)} but the "
          f"{reference_name}' leaf is {leaf_spec(r)}; {name} must match the {reference_name} "
          f"in {what}."
      )


def reject_masked_nodes(tree: Any, *, owner: str, reason: str) -> None:
  """Raises ``ValueError`` if ``tree`` holds ``optax.MaskedNode`` leaves, i.e. the
  transformation runs inside ``optax.masked``/``optax.partition`` although it needs
  the whole tree (``reason`` says why)."""
  if any(map(_is_masked_node, jax.tree.leaves(tree, is_leaf=_is_masked_node))):
    raise ValueError(
        f"{owner} cannot run inside optax.masked or optax.partition: {reason} Apply the "
        "mask to the transformation chained after it instead."
    )


def concrete_hyperparameter(value: Any, name: str) -> np.ndarray | None:
  """A hyperparameter's value as a float64 NumPy array when it is known at construction.

  Python numbers and concrete arrays (``optax.inject_hyperparams`` builds the
  transformation with concrete arrays in ``init``) are returned for validation;
  ``None`` (unset), traced values and schedules (callables) give ``None``, as they
  cannot be checked before tracing. A string or other non-numeric value raises
  ``TypeError`` naming ``name``.
  """
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be a number or a numeric array, got {value!r}")
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number or a numeric array, got {value!r}") from e
