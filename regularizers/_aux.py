"""What the auxiliary-gradient surgeries share: the ``aux_grads`` check and the
max-scaled global inner products of the main and auxiliary gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optimizers._checks import check_real_floating, check_tree_match, is_masked_node
from optimizers._trees import max_scaled, nonzero, tree_vdot

__all__ = ["check_aux_grads", "combine", "cosine", "main_aux_dots", "mask_like"]


def mask_like(updates: Any, aux_grads: Any) -> Any:
  """``aux_grads`` with ``optax.MaskedNode`` wherever ``updates`` has one.

  Inside ``optax.masked``/``optax.partition`` the updates hold ``MaskedNode``
  leaves while the caller passes the full ``aux_grads``; the masked leaves are
  dropped so that the surgery (and its global inner products) runs over the
  unmasked leaves only. Trees that do not line up are returned unchanged (and
  rejected by :func:`check_aux_grads`).
  """
  if not any(map(is_masked_node, jax.tree.leaves(updates, is_leaf=is_masked_node))):
    return aux_grads
  try:
    return jax.tree.map(lambda u, a: u if is_masked_node(u) else a, updates, aux_grads,
                        is_leaf=is_masked_node)
  except (ValueError, TypeError):
    return aux_grads


def check_aux_grads(name: str, updates: Any, aux_grads: Any) -> Any:
  """``aux_grads`` present and matching ``updates`` leaf by leaf (tree, shape, dtype);
  returns it masked like ``updates`` (see :func:`mask_like`)."""
  if aux_grads is None:
    raise ValueError(
        f"{name}: update requires the keyword argument aux_grads (the gradient of the "
        "auxiliary loss, same tree, shapes and dtypes as the updates)."
    )
  check_real_floating(updates, owner=name)
  aux_grads = mask_like(updates, aux_grads)
  check_tree_match(updates, aux_grads, owner=name, name="aux_grads", dtypes=True)
  return aux_grads


def cosine(xy: jax.Array, xx: jax.Array, yy: jax.Array) -> jax.Array:
  """``<x, y>/(||x|| ||y||)`` from the dot products; 0 when either vector is zero."""
  return (xy / nonzero(jnp.sqrt(xx) * jnp.sqrt(yy))).astype(jnp.float32)


def main_aux_dots(g: Any, a: Any) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """``((<g^, a^>, ||g^||^2, ||a^||^2), (s_g, s_a))``, global over the tree, for the
  max-scaled ``g^ = g / s_g`` and ``a^ = a / s_a`` (see ``max_scaled``):
  ``<g, a> / ||g||^2 = (s_a / s_g) <g^, a^> / ||g^||^2``."""
  s_g, g_hat = max_scaled(g)
  s_a, a_hat = max_scaled(a)
  dots = tree_vdot(g_hat, a_hat), tree_vdot(g_hat, g_hat), tree_vdot(a_hat, a_hat)
  return dots, (s_g, s_a)


def combine(updates: Any, g: Any, a: Any, cg: jax.Array, ca: jax.Array) -> Any:
  """``cg g + ca a`` leaf by leaf, cast to the updates' dtypes."""
  return jax.tree.map(lambda u, x, y: (cg * x + ca * y).astype(u.dtype), updates, g, a)
