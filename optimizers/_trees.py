"""Tree reductions and the float32 upcast, shared by every transformation.

Every reduction here is an elementwise product and a sum, never a ``ravel``
(``optax.tree.vdot``/``optax.tree.norm`` ravel their leaves, which fails on
leaves sharded with ``AxisType.Explicit`` mesh axes): the results are replicated
scalars on any mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "compute_dtype",
    "max_scaled",
    "nonzero",
    "tree_l2_norm",
    "tree_max_abs",
    "tree_upcast",
    "tree_vdot",
    "upcast",
    "vdot",
]


def compute_dtype(x: Any) -> jnp.dtype:
  """float32, or the dtype of ``x`` when it is wider (float64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  """``x`` in :func:`compute_dtype` (bf16/f16 -> float32; float32/float64 unchanged)."""
  return x.astype(compute_dtype(x))


def tree_upcast(tree: Any) -> Any:
  """:func:`upcast` on every leaf."""
  return jax.tree.map(upcast, tree)


def nonzero(x: jax.Array) -> jax.Array:
  """``x`` with exact zeros replaced by 1: the guard of a division by a (squared) norm."""
  return jnp.where(x == 0, jnp.ones_like(x), x)


def vdot(x: jax.Array, y: jax.Array) -> jax.Array:
  """``<x, y>`` of two arrays as an elementwise product and a sum (sharding-safe)."""
  return jnp.sum(x * y)


def tree_vdot(x: Any, y: Any) -> jax.Array:
  """``<x, y>`` global over two trees: the sum of the leaves' :func:`vdot`, float32
  (or wider); 0 for empty trees."""
  return sum(jax.tree.leaves(jax.tree.map(vdot, x, y)), jnp.zeros([], jnp.float32))


def tree_max_abs(tree: Any) -> jax.Array:
  """``max |x|`` over all leaves of a pytree, a float32 (or wider) scalar.

  0 for an empty or all-zero tree (zero-size leaves are fine); NaN if a leaf holds
  a NaN. The scale that makes inner products of whole trees overflow- and
  underflow-safe (divide by it first).
  """
  leaves = jax.tree.leaves(tree)
  dtype = jnp.result_type(jnp.float32, *(x.dtype for x in leaves))
  out = jnp.zeros([], dtype)
  for x in leaves:
    out = jnp.maximum(out, jnp.max(jnp.abs(x), initial=0).astype(dtype))
  return out


def max_scaled(tree: Any) -> tuple[jax.Array, Any]:
  """``(s, tree / s)`` with ``s = max |x|`` over the tree (1 for a zero tree).

  Inner products of the scaled trees neither overflow (``|x| ~ 1e20`` squares past
  float32's range) nor underflow (``|x| ~ 1e-20`` squares to 0), so they are exact
  up to rounding for any finite input; a NaN or Inf still propagates.
  """
  s = tree_max_abs(tree)
  s = jnp.where(s > 0, s, jnp.ones_like(s))
  return s, jax.tree.map(lambda x: x / s, tree)


def tree_l2_norm(tree: Any) -> jax.Array:
  r"""Overflow- and underflow-safe global L2 norm of a pytree.

  :math:`s \, \| x / s \|_2` with ``s = max |x|`` (:func:`tree_max_abs`), so a
  finite tree gives a finite norm even where ``sum x^2`` would overflow (``|x| ~
  1e20`` in float32) or underflow to 0 (``|x| ~ 1e-20``); 0 for a zero tree,
  NaN/Inf for a tree with NaN/Inf.
  """
  leaves = jax.tree.leaves(tree)
  scale = tree_max_abs(leaves)
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  total = sum((jnp.sum(jnp.square(x.astype(scale.dtype) / safe)) for x in leaves),
              jnp.zeros([], scale.dtype))
  return scale * jnp.sqrt(total)
