r"""Sven: singular value descent, truncated-pseudoinverse steps on per-sample residuals.

For per-sample residuals ``R(theta)`` of shape ``(B,)`` and their Jacobian
``M = dR/dtheta`` (``B x P``, ``P`` = number of parameters), Sven steps along

.. math::

  \delta = \mathrm{pinv}_k(M) R = V_k S_k^{-1} U_k^T R,

the minimum-norm least-squares solution of ``M delta = R`` restricted to the top
``k`` singular triplets ``M ~ U_k S_k V_k^T``. Singular values with
``S_i <= rtol * S_0`` or ``S_i <= 1e-10`` are dropped. For ``R = f(x) - y`` this
is a Gauss-Newton step when ``M`` has full column rank (under-parametrised) and
the minimum-norm step that zeroes the linearised residuals otherwise.

Three ways to compute it (``method``):

* ``"gram"`` (exact; the natural choice when ``B << P``): the Jacobian blocks of
  every leaf (``jax.jacrev``, i.e. a ``vmap`` of VJPs, or ``jax.jacfwd`` when
  ``P < B``) give ``G = M M^T = sum_leaves M_l M_l^T`` (``B x B``);
  ``G = U S^2 U^T`` by ``eigh``; ``w = U_k S_k^{-2} U_k^T R`` and
  ``delta = M^T w``. With ``microbatch_size = b < B`` the Jacobian is never
  materialised: ``G`` is built ``b`` columns at a time as ``M (M^T C)`` from
  ``b`` VJPs and ``b`` JVPs (memory ``O(b P)``), and ``delta = M^T w`` is one
  VJP.
* ``"svd"`` (exact; when ``B`` is comparable to ``P``): SVD of the
  materialised ``M``.
* ``"matrix_free"``: top-``k`` eigenpairs of ``G`` by randomized subspace
  iteration (Halko, Martinsson & Tropp 2011) using only products
  ``G C = M (M^T C)`` (one VJP + one JVP per column, columns processed
  ``microbatch_size`` at a time, default one), so memory is
  ``O(P + B k)`` plus the activations of one linearisation: ``M`` is never
  formed. The Gaussian test matrix comes from a PRNG key kept in the state.
  With ``rank + oversampling >= B`` the whole of ``G`` is formed from ``B``
  products and the result is exact.

``"auto"`` (default) picks ``"svd"`` when the Jacobian is materialised and
``P <= 2 B``, else ``"gram"``.

Float32 accuracy of the Gram form. ``cond(G) = cond(M)^2``: rounding ``G`` (or
its ``eigh``) in float32 perturbs every eigenvalue by ``~eps * S_0^2``, i.e.
``S_i`` by a relative ``eps (S_0 / S_i)^2 / 2``: 6% at the default cutoff
``S_i = 1e-3 S_0``. (The reference implementation casts to float64, which TPUs
do not offer.) The cutoff is applied to singular values, i.e. eigenvalues
below ``rtol^2 * lambda_0`` are dropped. Whenever the kept spectrum is wider than float32
resolves (``eps * lambda_0 > 1e-5 * lambda_min_kept``), a second Gram pass
runs in the basis of the first (the CholeskyQR2 idea, Fukaya et al. 2014):
with ``T = U diag(max(lambda, eps lambda_0))^{-1/2}`` the rotated, whitened
rows ``X = T^T M`` are formed and ``X X^T = W Mu W^T`` (condition ~1 on the
resolved directions) is eigendecomposed; ``M = U diag(1/d) W Mu^{1/2} Q^T``
with orthonormal ``Q``, so the SVD of the ``B x B`` factor
``U diag(1/d) W Mu^{1/2}`` gives ``U_M`` and ``S_M`` with SVD-level accuracy
(absolute error ``~eps * S_0``). That pass costs one more Gram-sized matmul
(or ``B`` more VJP/JVP pairs when microbatched), and only when needed. The
matrix-free method works on ``G`` through its products and keeps the squared
conditioning: its small kept singular values carry the Gram-level error above.

RMSProp pre-scaling (``rms_decay``, as the reference offers): an EMA
``nu <- rms_decay * nu + (1 - rms_decay) g^2`` of the squared mean per-sample
gradient ``g = M^T 1 / B`` defines ``D = diag(1 / (sqrt(nu) + rms_eps))`` and
the step is the change of variables ``theta = D phi``:
``delta = D pinv_k(M D) R``. The reference applies ``pinv_k(M D) R`` without
the outer ``D``, which is not invariant to the scale of ``D``; with it the step
is invariant to rescaling ``nu`` (so no bias correction is needed).

The incoming ``updates`` are not used for the direction (only for the output
dtypes): Sven reads ``residual_fn`` and ``params`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.matrices import check_real_floating, reject_masked_nodes

__all__ = ["ScaleBySvenState", "scale_by_sven", "sven"]

_METHODS = ("auto", "gram", "svd", "matrix_free")
# Singular values at or below this are always dropped (the reference's pinv default).
_ABS_TOL = 1e-10
# A second Gram pass runs when eps * lambda_0 > _GRAM_TOL * (smallest kept eigenvalue).
_GRAM_TOL = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST
# Extra test vectors of the randomized subspace iteration when oversampling=None.
_OVERSAMPLING = 4


class ScaleBySvenState(NamedTuple):
  """State of :func:`scale_by_sven`.

  Attributes:
    key: legacy ``uint32`` PRNG key data, shape ``(2,)``; advanced by
      ``method="matrix_free"`` on each update, unused by the exact methods.
    singular_values: ``(rank,)`` float32, the singular values of the (pre-scaled)
      Jacobian used by the last step, descending, zero-padded.
    effective_rank: int32 scalar, how many singular directions the last step used.
    nu: float32 EMA of the squared mean per-sample gradient (same tree as
      params) when ``rms_decay`` is set, else ``()``.
  """

  key: jax.Array
  singular_values: jax.Array
  effective_rank: jax.Array
  nu: optax.Params


def _replicated() -> jax.sharding.PartitionSpec | None:
  """Out-sharding for contractions over (possibly sharded) parameter axes."""
  return None if jax.sharding.get_abstract_mesh().empty else jax.sharding.PartitionSpec()


def _gram_of_blocks(blocks: Any) -> jax.Array:
  """``M M^T = sum_l M_l M_l^T`` from per-leaf Jacobian blocks ``(B, *leaf_shape)``."""
  terms = [
      jnp.einsum("b...,c...->bc", j, j, precision=_HIGHEST, out_sharding=_replicated())
      for j in jax.tree.leaves(blocks)
  ]
  return sum(terms[1:], terms[0])


def _rotate_blocks(t: jax.Array, blocks: Any) -> Any:
  """Per-leaf rows of ``T^T M``."""
  return jax.tree.map(lambda j: jnp.einsum("bc,b...->c...", t, j, precision=_HIGHEST), blocks)


def _blocks_transpose_times(blocks: Any, w: jax.Array) -> Any:
  """``M^T w`` per leaf."""
  return jax.tree.map(lambda j: jnp.einsum("b,b...->...", w, j, precision=_HIGHEST), blocks)


def _sorted_eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenpairs of the symmetric part of ``a``, eigenvalues descending."""
  lam, u = jnp.linalg.eigh(0.5 * (a + a.T))
  return lam[::-1], u[:, ::-1]


def _keep_mask(s: jax.Array, rank: int, rtol: jax.Array) -> jax.Array:
  """Top ``rank`` of descending ``s`` with ``s > rtol * s_0`` and ``s > 1e-10``."""
  idx = jnp.arange(s.shape[0])
  return (idx < rank) & (s > rtol * s[0]) & (s > _ABS_TOL)


def _pinv_weights(u: jax.Array, s: jax.Array, keep: jax.Array, r: jax.Array) -> jax.Array:
  """``w = U_k S_k^{-2} U_k^T r``, so that ``M^T w = V_k S_k^{-1} U_k^T r``."""
  inv2 = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0) ** 2, 0.0)
  return jnp.matmul(u, inv2 * jnp.matmul(r, u, precision=_HIGHEST), precision=_HIGHEST)


def _refine(lam, u, rotated_gram: Callable[[jax.Array], jax.Array]):
  """Second Gram pass in the whitened eigenbasis of the first; returns ``(U_M, S_M)``.

  ``u`` (``B x n``, orthonormal columns, ``n <= B``) and ``lam`` are eigenpairs
  of ``G = M M^T`` (or of its restriction to ``span(u)``). With
  ``T = u diag(max(lam, eps lam_0))^{-1/2}``, ``rotated_gram(T)`` must return
  ``(T^T M)(T^T M)^T`` computed from the rotated rows (so its rounding is
  relative to the whitened scale) or as ``T^T (G T)`` from operator products.
  ``u u^T M = u diag(1/d) W Mu^{1/2} Q^T`` with orthonormal ``Q``, so the SVD of
  the ``B x n`` factor gives the singular pairs of ``u u^T M``.
  """
  eps = jnp.finfo(lam.dtype).eps
  floor = jnp.maximum(eps * lam[0], jnp.finfo(lam.dtype).tiny)
  scale = jnp.sqrt(jnp.maximum(lam, floor))  # 1 / d
  mu, w = _sorted_eigh(rotated_gram(u / scale))
  factor = jnp.matmul(u * scale, w * jnp.sqrt(jnp.maximum(mu, 0.0)), precision=_HIGHEST)
  u_m, s_m, _ = jnp.linalg.svd(factor, full_matrices=False)
  return u_m, s_m


def _spectrum(lam, u, rank, rtol, rotated_gram):
  """Singular pairs ``(U, S)`` of ``M`` from eigenpairs ``(lam desc, u)`` of ``G = M M^T``.

  Refines with :func:`_refine` (under ``lax.cond``) when the kept spectrum is
  wider than the working precision resolves through ``G``.
  """
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  keep = _keep_mask(s, rank, rtol)
  lam_min_kept = jnp.min(jnp.where(keep, lam, jnp.inf))
  eps = jnp.finfo(lam.dtype).eps
  refine = jnp.any(keep) & (eps * lam[0] > _GRAM_TOL * lam_min_kept)
  return jax.lax.cond(refine, lambda: _refine(lam, u, rotated_gram), lambda: (u, s))


def _gram_times(jvp_fn, mt_fn, c: jax.Array, chunk: int) -> jax.Array:
  """``G C = M (D^2 M^T C)`` for ``C`` of shape ``(B, m)``, ``chunk`` columns at a time.

  The columns are zero-padded to a multiple of ``chunk`` so that a single loop body
  (one vmapped VJP + JVP) is compiled.
  """
  num, m = c.shape
  steps = -(-m // chunk)
  cols = jnp.pad(c.T, ((0, steps * chunk - m), (0, 0))).reshape(steps, chunk, num)
  out = jax.lax.map(jax.vmap(lambda v: jvp_fn(mt_fn(v))), cols)
  return out.reshape(steps * chunk, num)[:m].T


def _diagnostics(s: jax.Array, keep: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  kept = jnp.where(keep, s, 0.0).astype(jnp.float32)
  n = kept.shape[0]
  kept = kept[:rank] if n >= rank else jnp.concatenate([kept, jnp.zeros(rank - n, jnp.float32)])
  return kept, jnp.sum(keep).astype(jnp.int32)


def _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                  oversampling) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a Python int >= 1, got {rank!r}")
  if isinstance(rtol, (int, float)) and not rtol >= 0:
    raise ValueError(f"rtol must be >= 0, got {rtol!r}")
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
      or microbatch_size < 1):
    raise ValueError(f"microbatch_size must be None or a Python int >= 1, got {microbatch_size!r}")
  if method == "svd" and microbatch_size is not None:
    raise ValueError("microbatch_size is not supported with method='svd' (it needs the full "
                     "Jacobian); use method='gram'")
  if isinstance(rms_decay, (int, float)) and not 0 <= rms_decay < 1:
    raise ValueError(f"rms_decay must be None or in [0, 1), got {rms_decay!r}")
  if isinstance(rms_eps, (int, float)) and not rms_eps > 0:
    raise ValueError(f"rms_eps must be > 0, got {rms_eps!r}")
  if isinstance(power_iterations, int) and power_iterations < 0:
    raise ValueError(f"power_iterations must be >= 0, got {power_iterations!r}")
  if oversampling is not None and (
      isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0):
    raise ValueError(f"oversampling must be None or a Python int >= 0, got {oversampling!r}")


def scale_by_sven(
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven direction: truncated pseudoinverse of the residual Jacobian times the residuals.

  With per-sample residuals ``R = residual_fn(params)`` (shape ``(B,)``) and
  ``M = dR/dparams`` (``B x P``), returns

  .. math::

    \mathrm{pinv}_k(M) R = V_k S_k^{-1} U_k^T R = M^T U_k S_k^{-2} U_k^T R,

  with the top ``k = rank`` singular triplets of ``M`` and singular values
  ``S_i <= rtol * S_0`` or ``<= 1e-10`` dropped (no damping, no ``1/B``). The
  direction has the gradient's sign (for ``R = f - y`` it is aligned with the
  gradient of ``0.5 ||R||^2``); chain a learning rate or use :func:`sven`. See
  the module docstring for the methods, their float32 accuracy and the RMSProp
  pre-scaling ``delta = D pinv_k(M D) R``.

  The incoming ``updates`` are NOT used for the direction, only for the output
  dtypes. Parameters are upcast to float32 (at least) before ``residual_fn``
  is differentiated; the output has the updates' dtypes. Non-finite residuals
  or Jacobians give a non-finite output (so ``optax.apply_if_finite`` can skip
  the step); a zero Jacobian gives a zero step. Integer or complex leaves raise
  ``TypeError``; inside ``optax.masked``/``optax.partition`` (``residual_fn``
  needs the full params) ``ValueError``; an empty params tree gives an empty step.

  Args:
    rank: ``k``, the number of singular directions kept (Python int >= 1).
    rtol: relative cutoff; singular values ``<= rtol * S_0`` are dropped.
    method: ``"auto"``, ``"gram"``, ``"svd"`` or ``"matrix_free"``.
    microbatch_size: ``"gram"``: build ``G`` from this many VJP/JVP pairs at a
      time instead of materialising the Jacobian (``None``: materialise).
      ``"matrix_free"``: columns per Gram product (``None``: 1, the
      ``O(P + B k)`` memory regime). Not allowed with ``"svd"``.
    rms_decay: ``None`` (off) or the EMA decay of the RMSProp pre-scaling.
    rms_eps: added to ``sqrt(nu)`` in the pre-scaling.
    power_iterations: subspace iterations of ``"matrix_free"`` (may be traced).
    oversampling: extra test vectors of ``"matrix_free"``: subspace size
      ``min(B, rank + oversampling)``; ``None`` means 4. A Python int (it fixes
      shapes; ``None`` keeps ``optax.inject_hyperparams`` from tracing it).
    seed: seed of the PRNG key of ``"matrix_free"`` (may be traced).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params`` and the keyword ``residual_fn(params) -> (B,)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import scale_by_sven
    >>> x = jnp.linspace(-1.0, 1.0, 8)
    >>> residual_fn = lambda p: p["w"] * x + p["b"] - (2.0 * x + 1.0)
    >>> params = {"w": jnp.zeros(()), "b": jnp.zeros(())}
    >>> tx = optax.chain(scale_by_sven(rank=2), optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: 0.5 * jnp.sum(residual_fn(p) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, residual_fn=residual_fn)
    >>> new = optax.apply_updates(params, updates)  # one Gauss-Newton step solves it
    >>> print(f"{float(new['w']):.4f} {float(new['b']):.4f}")
    2.0000 1.0000

  References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
    Computationally Efficient Natural Gradient Method", 2026,
    https://arxiv.org/abs/2604.01279
  """
  _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                oversampling)

  def init_fn(params):
    nu = () if rms_decay is None else jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
    # `+ zeros` gives the key the sharding spec P(None,) that a jitted update
    # returns; a bare PRNGKey carries P(), which would retrace under explicit meshes.
    return ScaleBySvenState(
        key=jnp.zeros((2,), jnp.uint32) + jax.random.PRNGKey(seed),
        singular_values=jnp.zeros((rank,), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        nu=nu,
    )

  def update_fn(updates, state, params=None, *, residual_fn=None, **extra_args):
    del extra_args
    if residual_fn is None:
      raise ValueError("scale_by_sven requires the keyword argument residual_fn(params) -> (B,)")
    if params is None:
      raise ValueError("scale_by_sven requires params (residual_fn is differentiated at params)")
    reject_masked_nodes(params, owner="scale_by_sven", reason="residual_fn needs the full params.")
    check_real_floating(params, owner="scale_by_sven", name="params")
    check_real_floating(updates, owner="scale_by_sven")
    if not jax.tree.leaves(params):  # nothing to optimise: an empty step
      return updates, state
    params_c = jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float32)), params)
    out_shape = jax.eval_shape(residual_fn, params_c)
    if not hasattr(out_shape, "shape") or len(out_shape.shape) != 1 or out_shape.shape[0] < 1:
      raise ValueError("residual_fn must return a 1-D array of per-sample residuals, got "
                       f"{out_shape}")
    num_res = out_shape.shape[0]
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params_c))
    materialise = method in ("gram", "svd", "auto") and (
        microbatch_size is None or microbatch_size >= num_res)
    chosen = method
    if method == "auto":
      chosen = "svd" if materialise and num_params <= 2 * num_res else "gram"

    key, nu = state.key, state.nu
    if materialise:
      r, blocks = _jacobian(residual_fn, params_c, num_res, num_params)
      if rms_decay is not None:
        nu, d = _rms(nu, jax.tree.map(lambda j: jnp.mean(j, axis=0), blocks), rms_decay, rms_eps)
        blocks = jax.tree.map(lambda j, dl: j * dl.astype(j.dtype), blocks, d)
      if chosen == "svd":
        m = jnp.concatenate(
            [jnp.reshape(j, (num_res, -1), out_sharding=_replicated())
             for j in jax.tree.leaves(blocks)], axis=1)
        u, s, _ = jnp.linalg.svd(m, full_matrices=False)
        check = m
      else:
        g = _gram_of_blocks(blocks)
        u, s = _spectrum(*_sorted_eigh(g), rank, rtol,
                         lambda t: _gram_of_blocks(_rotate_blocks(t, blocks)))
        check = g
      keep = _keep_mask(s, rank, rtol)
      delta = _blocks_transpose_times(blocks, _pinv_weights(u, s, keep, r))
      if rms_decay is not None:
        delta = jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), delta, d)
    else:
      r, jvp_fn = jax.linearize(residual_fn, params_c)
      vjp_fn = jax.linear_transpose(jvp_fn, params_c)
      mt = lambda v: vjp_fn(v)[0]
      if rms_decay is not None:
        mean_grad = mt(jnp.full_like(r, 1.0 / num_res))
        nu, d = _rms(nu, mean_grad, rms_decay, rms_eps)
        d2 = jax.tree.map(lambda dl: dl * dl, d)
        mt = lambda v, mt=mt: jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), mt(v), d2)
      eye = jnp.eye(num_res, dtype=r.dtype)
      chunk = (microbatch_size or 1) if chosen == "matrix_free" else microbatch_size
      gram_times = lambda c: _gram_times(jvp_fn, mt, c, chunk)
      sub = min(num_res, rank + (_OVERSAMPLING if oversampling is None else oversampling))
      if chosen == "matrix_free" and sub < num_res:
        key, draw = jax.random.split(key)
        lam, u, check = _subspace_iteration(gram_times, draw, num_res, sub, power_iterations,
                                            r.dtype)
      else:  # the whole of G from B products
        check = gram_times(eye)
        lam, u = _sorted_eigh(check)
      u, s = _spectrum(lam, u, rank, rtol,
                       lambda t: jnp.matmul(t.T, gram_times(t), precision=_HIGHEST))
      keep = _keep_mask(s, rank, rtol)
      delta = mt(_pinv_weights(u, s, keep, r))

    finite = jnp.all(jnp.isfinite(r)) & jnp.all(jnp.isfinite(check))
    delta = jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), delta)
    delta = jax.tree.map(lambda x, ref: x.astype(ref.dtype), delta,
                         params if updates is None else updates)
    singular_values, effective_rank = _diagnostics(s, keep, rank)
    return delta, ScaleBySvenState(key, singular_values, effective_rank, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _jacobian(residual_fn, params, num_res: int, num_params: int):
  """``(R, blocks)``: residuals and per-leaf Jacobian blocks ``(B, *leaf_shape)``.

  Reverse mode (a vmap of ``B`` VJPs) unless there are fewer parameters than
  residuals, then forward mode (``P`` JVPs).
  """
  def with_aux(p):
    r = residual_fn(p)
    return r, r

  jac = jax.jacfwd if num_params < num_res else jax.jacrev
  blocks, r = jac(with_aux, has_aux=True)(params)
  return r, blocks


def _rms(nu, mean_grad, decay, eps):
  """EMA of the squared mean gradient and the pre-scaling ``D = 1 / (sqrt(nu) + eps)``."""
  nu = jax.tree.map(
      lambda v, g: decay * v + (1.0 - decay) * jnp.square(g.astype(jnp.float32)), nu, mean_grad)
  d = jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + eps), nu)
  return nu, d


def _subspace_iteration(gram_times, key, num_res: int, sub: int, power_iterations: int, dtype):
  """Top eigenpairs of PSD ``G`` (``B x B``) from products ``G C`` only.

  Randomized subspace iteration with QR re-orthonormalisation, then
  Rayleigh-Ritz on the ``sub``-dimensional basis ``Q``: ``Q^T G Q = W Mu W^T``,
  eigenvectors ``Q W``. Returns ``(eigenvalues desc, eigenvectors, Q^T G Q)``.
  """
  q = jnp.linalg.qr(jax.random.normal(key, (num_res, sub), dtype))[0]
  q = jax.lax.fori_loop(0, power_iterations + 1, lambda _, q: jnp.linalg.qr(gram_times(q))[0], q)
  h = jnp.matmul(q.T, gram_times(q), precision=_HIGHEST)
  mu, w = _sorted_eigh(h)
  return mu, jnp.matmul(q, w, precision=_HIGHEST), h


def sven(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven optimizer: ``-learning_rate * pinv_k(dR/dparams) R``.

  :func:`scale_by_sven` followed by ``optax.scale_by_learning_rate``: the
  update is

  .. math::

    \Delta\theta = -\eta \, V_k S_k^{-1} U_k^T R,

  added to the params by ``optax.apply_updates``. With ``R = f(x) - y`` and
  ``learning_rate = 1`` a step solves the linearised residual equations
  (Gauss-Newton / minimum norm); the paper uses learning rates 0.05 to 1.
  ``update`` requires ``params`` and ``residual_fn(params) -> (B,)``.

  Args:
    learning_rate: scalar or schedule.
    rank: number of singular directions kept.
    rtol: relative singular-value cutoff.
    method: ``"auto"``, ``"gram"``, ``"svd"`` or ``"matrix_free"``.
    microbatch_size: see :func:`scale_by_sven`.
    rms_decay: ``None`` or the decay of the RMSProp pre-scaling.
    rms_eps: epsilon of the pre-scaling.
    power_iterations: subspace iterations of ``"matrix_free"``.
    oversampling: extra test vectors of ``"matrix_free"`` (``None``: 4).
    seed: PRNG seed of ``"matrix_free"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optimizers import sven
    >>> x = jnp.linspace(-1.0, 1.0, 16)
    >>> residual_fn = lambda p: p["a"] * jnp.exp(p["c"] * x) - 2.0 * jnp.exp(0.5 * x)
    >>> params = {"a": jnp.array(1.0), "c": jnp.array(0.0)}
    >>> opt = sven(learning_rate=1.0, rank=2)
    >>> state = opt.init(params)
    >>> for _ in range(10):
    ...   grads = jax.grad(lambda p: 0.5 * jnp.sum(residual_fn(p) ** 2))(params)
    ...   updates, state = opt.update(grads, state, params, residual_fn=residual_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{float(params['a']):.3f} {float(params['c']):.3f}")
    2.000 0.500

  References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
    Computationally Efficient Natural Gradient Method", 2026,
    https://arxiv.org/abs/2604.01279
  """
  return optax.chain(
      scale_by_sven(
          rank, rtol=rtol, method=method, microbatch_size=microbatch_size, rms_decay=rms_decay,
          rms_eps=rms_eps, power_iterations=power_iterations, oversampling=oversampling,
          seed=seed),
      optax.scale_by_learning_rate(learning_rate),
  )
