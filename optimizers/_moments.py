"""Adam moments stored in a chosen dtype, the update computed in float32 (private).

``optax.scale_by_adam`` takes a ``mu_dtype`` for the first moment only, and
computes in the dtype of the incoming updates. :func:`scale_by_adam` here keeps
optax's state type (``optax.ScaleByAdamState``: tools that look for ``mu`` and
``nu`` fields keep working) and names, adds ``nu_dtype``, and computes the
moment updates and the direction in float32 (or wider) whatever the storage:

``mu = b1 mu + (1 - b1) g``, ``nu = b2 nu + (1 - b2) g^2`` (float32, from the
stored values), ``u = (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps)``; then
``mu`` and ``nu`` are rounded to their storage dtypes. ``None`` stores a moment in
the dtype of the parameter it belongs to (optax's default).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_floating_dtype as check_moment_dtype
from optimizers._trees import upcast

__all__ = ["check_moment_dtype", "scale_by_adam"]


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Adam's direction with moments stored in ``mu_dtype`` / ``nu_dtype`` (see module doc).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(nu_hat)``.
    mu_dtype: storage dtype of the first moment (``None``: the parameter's).
    nu_dtype: storage dtype of the second moment (``None``: the parameter's).

  Returns:
    An ``optax.GradientTransformation`` with ``optax.ScaleByAdamState``; updates keep
    the incoming updates' dtypes.
  """
  mu_dtype = check_moment_dtype("mu_dtype", mu_dtype)
  nu_dtype = check_moment_dtype("nu_dtype", nu_dtype)

  def init_fn(params):
    zeros = lambda dtype: jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=dtype or p.dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(mu_dtype),
                                  nu=zeros(nu_dtype))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda g, m: b1 * upcast(m) + (1 - b1) * upcast(g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * upcast(v) + (1 - b2) * jnp.square(upcast(g)),
                      updates, state.nu)
    c = count.astype(jnp.float32)
    bc1, bc2 = 1 - jnp.asarray(b1, jnp.float32) ** c, 1 - jnp.asarray(b2, jnp.float32) ** c
    out = jax.tree.map(lambda g, m, v: ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(g.dtype),
                       updates, mu, nu)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
    nu = jax.tree.map(lambda v, old: v.astype(old.dtype), nu, state.nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
