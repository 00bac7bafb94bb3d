r"""Curvature diagnostics by Hessian-vector products: directional sharpness and the
top Hessian eigenvalue.

The Hessian ``H`` of a scalar loss is never formed. A Hessian-vector product is
one forward-over-reverse pass, ``H v = d/de grad L(w + e v)`` at ``e = 0``
(``jax.jvp`` of ``jax.grad``), costing about two gradient evaluations and no
memory beyond them. From it:

* :func:`directional_sharpness`: ``S(v) = v^T H v / ||v||^2``, the curvature of
  the loss along an update direction (Pan & Li 2023 use it to explain why
  coordinate-wise clipping speeds up SGD);
* :func:`hessian_top_eigenvalue`: the eigenvalue of LARGEST MAGNITUDE by power
  iteration (the "sharpness" SAM's papers report).

Computations run in float32 (or wider): bf16/f16 parameters and directions are
promoted before ``loss_fn`` is called, so ``loss_fn`` must accept float32
parameters. All functions are jit-compatible; ``loss_fn`` closes over the batch.

References:
  Pearlmutter, `Fast Exact Multiplication by the Hessian
  <https://doi.org/10.1162/neco.1994.6.1.147>`_, 1994.

  Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
  Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import check_int
from optimizers._trees import tree_l2_norm, tree_upcast, tree_vdot

__all__ = ["hessian_vector_product", "directional_sharpness", "hessian_top_eigenvalue"]

LossFn = Callable[[optax.Params], jax.Array]


def hessian_vector_product(loss_fn: LossFn, params: optax.Params, vector: Any) -> Any:
  r"""``H v`` for the Hessian ``H`` of ``loss_fn`` at ``params`` (forward-over-reverse).

  .. math::
    H v = \frac{d}{d\epsilon} \nabla L(w + \epsilon v) \Big|_{\epsilon = 0}

  Args:
    loss_fn: scalar loss of the parameters.
    params: the point ``w`` (a pytree).
    vector: ``v``, a pytree with the structure and shapes of ``params``.

  Returns:
    ``H v`` with the tree of ``params``, float32 (or wider).

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.curvature import hessian_vector_product
    >>> loss = lambda w: jnp.sum(w ** 3)  # H = diag(6 w)
    >>> hessian_vector_product(loss, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    Array([ 6., 12.], dtype=float32)
  """
  params = tree_upcast(params)
  vector = jax.tree.map(lambda v, p: v.astype(p.dtype), vector, params)
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def directional_sharpness(loss_fn: LossFn, params: optax.Params, direction: Any) -> jax.Array:
  r"""Curvature of ``loss_fn`` along ``direction``: ``v^T H v / ||v||^2``.

  .. math::
    S(v) = \frac{v^\top \nabla^2 L(w)\, v}{\|v\|_2^2}

  one Hessian-vector product; invariant to the scale of ``v``. A zero direction
  gives 0 (not NaN); a NaN in ``direction`` gives NaN.

  Args:
    loss_fn: scalar loss of the parameters.
    params: the point ``w``.
    direction: ``v`` (e.g. an update), same tree as ``params``.

  Returns:
    ``S(v)``, a float32 (or wider) scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import directional_sharpness
    >>> loss = lambda w: 0.5 * (w[0] ** 2 + 9.0 * w[1] ** 2)  # H = diag(1, 9)
    >>> directional_sharpness(loss, jnp.zeros(2), jnp.array([1.0, 1.0]))
    Array(5., dtype=float32)

  References:
    Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
    Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
  """
  v = tree_upcast(direction)
  hv = hessian_vector_product(loss_fn, params, v)
  curvature = tree_vdot(v, hv)
  norm_sq = tree_vdot(v, v)
  return jnp.where(norm_sq == 0, 0.0, curvature / jnp.where(norm_sq == 0, 1.0, norm_sq))


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: optax.Params,
    *,
    num_iters: int = 20,
    key: jax.Array | int | None = None,
) -> jax.Array:
  r"""Eigenvalue of largest magnitude of the Hessian of ``loss_fn``, by power iteration.

  .. math::
    v_{t+1} = H v_t / \|H v_t\|, \qquad
    \lambda_t = v_t^\top H v_t \ \ (\|v_t\| = 1)

  from a random Gaussian ``v_0``; returns ``lambda`` of the last iteration, the
  Rayleigh quotient, SIGNED: the estimate of the eigenvalue ``lambda_1`` with
  the largest ``|lambda|`` (for a non-convex loss that may be negative; it is
  the largest algebraic eigenvalue only when ``H`` is positive semi-definite or
  that one dominates). ``|lambda_t| <= |lambda_1|`` always, with error
  ``O((lambda_2 / lambda_1)^(2t))``; eigenvalues ``+a`` and ``-a`` of equal
  magnitude do not converge. One HVP per iteration (``num_iters`` in all); a zero
  Hessian gives 0.

  Args:
    loss_fn: scalar loss of the parameters.
    params: the point ``w``.
    num_iters: power iterations (Python int >= 1).
    key: PRNG key or int seed for ``v_0`` (``None``: seed 0).

  Returns:
    the eigenvalue estimate, a float32 (or wider) scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import hessian_top_eigenvalue
    >>> loss = lambda w: 0.5 * (w[0] ** 2 - 9.0 * w[1] ** 2)  # H = diag(1, -9)
    >>> hessian_top_eigenvalue(loss, jnp.ones(2), num_iters=10)
    Array(-9., dtype=float32)

  References:
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  check_int("num_iters", num_iters)
  if key is None or isinstance(key, int):
    key = jax.random.PRNGKey(0 if key is None else key)
  params = tree_upcast(params)

  def unit(v):
    norm = tree_l2_norm(v)
    return jax.tree.map(lambda x: x / jnp.where(norm == 0, 1.0, norm), v)

  def body(_, carry):
    v, _ = carry
    hv = hessian_vector_product(loss_fn, params, v)
    eigenvalue = tree_vdot(v, hv)
    norm = tree_l2_norm(hv)
    v = jax.tree.map(lambda x, h: jnp.where(norm == 0, x, h / jnp.where(norm == 0, 1.0, norm)),
                     v, hv)
    return v, eigenvalue

  v0 = unit(optax.tree.random_like(key, params))
  zero = jnp.zeros([], optax.tree.dtype(params, "highest"))
  return jax.lax.fori_loop(0, num_iters, body, (v0, zero))[1]
