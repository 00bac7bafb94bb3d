"""Sven's update, piece by piece: the residual problem, the random reductions, the three
ways of forming the step and the finishing touches (Polyak step, non-finite guard, dtypes).

Private to :mod:`optimizers.sven`, whose ``update_fn`` calls these in order. A step is
formed one of three ways:

* ghost: the separable mode with dense leaves, ``G`` from the ghost Gram of the dense
  leaves plus the per-example rows of the others;
* materialised: the Jacobian blocks exist whole (``jacrev``/``jacfwd`` of the batch
  residual, or the per-example pass), then ``"svd"`` of ``M`` or ``"gram"``;
* operator: ``G`` only through products ``G C = M (D^2 M^T C)`` of a linearisation
  (``"gram"`` with ``microbatch_size``, or ``"matrix_free"``'s subspace iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optimizers._sven_ghost import (
  _analyse,
  _Analysis,
  _batch_size,
  _declared_flags,
  _example_out_size,
  _gather_examples,
  _ghost_factors,
  _ghost_gram,
  _ghost_rotated_gram,
  _ghost_transpose_times,
  _leaf_names,
  _per_example_pass,
  _pin,
  _trace,
)
from optimizers._sven_rows import (
  _HIGHEST,
  _blocks_transpose_times,
  _diagnostics,
  _gram_of_blocks,
  _gram_times,
  _jacobian,
  _keep_mask,
  _param_mask,
  _pinv_weights,
  _polyak,
  _replicated,
  _rms,
  _rotated_gram_of_blocks,
  _row_reduction,
  _Rows,
  _sorted_eigh,
  _spectrum,
  _subspace_iteration,
)

# Extra test vectors of the randomized subspace iteration when oversampling=None.
_OVERSAMPLING = 4


class _Options(NamedTuple):
  """The hyperparameters of :func:`optimizers.sven.scale_by_sven` (validated)."""

  rank: int
  rtol: Any
  method: str
  microbatch_size: int | None
  rms_decay: Any
  rms_eps: Any
  store: Any  # storage dtype of nu
  power_iterations: Any
  oversampling: int | None
  ghost: bool
  dense_leaves: Any
  polyak: bool
  polyak_f_star: Any
  polyak_max: Any
  row_fraction: float | None
  row_group_size: int | None
  param_fraction: float | None
  mask_by_block: bool


class _Problem(NamedTuple):
  """The residuals of one update: ``whole_fn(params) -> (n,)`` and their sizes."""

  whole_fn: Callable[[Any], jax.Array]
  num_res: int  # n = B * t_out rows
  num_params: int
  t_out: int  # residuals per example (1 for residual_fn)
  example_residual_fn: Callable[[Any, Any], jax.Array] | None  # None: residual_fn
  batch: Any

  @property
  def separable(self) -> bool:
    return self.example_residual_fn is not None


class _Draw(NamedTuple):
  """The state's key after this update's draws, the row reduction and parameter mask."""

  key: jax.Array
  rows: _Rows | None
  pmask: Any


class _Step(NamedTuple):
  """One formed step: the direction and what its diagnostics and guards need."""

  delta: Any  # M^T w (times D^2 on the operator path), before the column scaling d
  d: Any  # column scaling still to apply to delta, or None
  r: jax.Array  # the residuals (all rows)
  r_used: jax.Array  # the residuals after the row reduction
  u: jax.Array
  s: jax.Array
  keep: jax.Array
  check: jax.Array  # G, M or Q^T G Q: non-finite when the Jacobian is
  nu: Any
  key: jax.Array


def _problem(params_c, residual_fn, example_residual_fn, batch) -> _Problem:
  """The residual function of the whole batch and the number of rows and parameters."""
  if example_residual_fn is not None:
    num_examples = _batch_size(batch)
    t_out = _example_out_size(example_residual_fn, params_c, batch)
    num_res = num_examples * t_out

    def whole_fn(p):
      out = jax.vmap(lambda ex: jnp.reshape(example_residual_fn(p, ex), (-1,)))(batch)
      return out.reshape(num_res)
  else:
    out_shape = jax.eval_shape(residual_fn, params_c)
    if not hasattr(out_shape, "shape") or len(out_shape.shape) != 1 or out_shape.shape[0] < 1:
      raise ValueError("residual_fn must return a 1-D array of per-sample residuals, got "
                       f"{out_shape}")
    num_res, t_out, whole_fn = out_shape.shape[0], 1, residual_fn
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params_c))
  return _Problem(whole_fn, num_res, num_params, t_out, example_residual_fn, batch)


def _draw_reductions(key, num_res: int, params_c, opts: _Options) -> _Draw:
  """The random row reduction and parameter mask (``key, draw = split(key)``)."""
  draw = None
  if opts.row_fraction is not None or opts.param_fraction is not None:
    key, draw = jax.random.split(key)
  rows = _row_reduction(num_res, opts.row_fraction, opts.row_group_size,
                        jax.random.fold_in(draw, 0) if opts.row_fraction is not None else None)
  pmask = None if opts.param_fraction is None else _param_mask(
      jax.random.fold_in(draw, 1), params_c, opts.param_fraction, opts.mask_by_block)
  return _Draw(key, rows, pmask)


def _is_scaled(opts: _Options, draw: _Draw) -> bool:
  """Whether the Jacobian's columns are scaled (RMS pre-scaling or parameter mask)."""
  return opts.rms_decay is not None or draw.pmask is not None


def _scaling(nu, mean_grad, opts: _Options, pmask):
  """``(nu, D)``: the new EMA and the column scaling (RMS times mask), or D None."""
  new_nu, d = nu, None
  if opts.rms_decay is not None:
    new_nu, d = _rms(nu, mean_grad, opts.rms_decay, opts.rms_eps)
  if pmask is not None:
    d = pmask if d is None else jax.tree.map(jnp.multiply, d, pmask)
  return new_nu, d


def _row_maps(rows: _Rows | None):
  """``(apply, transpose)`` of the row reduction (identities without one)."""
  if rows is None:
    return (lambda x: x), (lambda w: w)
  return rows.apply, rows.transpose


def _materialises(opts: _Options, problem: _Problem) -> bool:
  """Whether the Jacobian blocks are formed whole (else ``G`` only through products)."""
  return opts.method in ("gram", "svd", "auto") and (
      opts.microbatch_size is None or opts.microbatch_size >= problem.num_res)


def _choose_method(opts: _Options, problem: _Problem, materialise: bool) -> str:
  """``"auto"``: ``"svd"`` of the whole Jacobian when it is not much wider than tall."""
  if opts.method != "auto":
    return opts.method
  return "svd" if materialise and problem.num_params <= 2 * problem.num_res else "gram"


def _separable_analysis(problem: _Problem, params_c, opts: _Options, ghost: bool):
  """Which leaves take the ghost Gram (separable mode with materialised rows), or None."""
  flat = jax.tree.leaves(params_c)
  return _analyse(_trace(problem.example_residual_fn, params_c, problem.batch), len(flat),
                  opts.ghost and ghost,
                  _declared_flags(opts.dense_leaves, params_c, len(flat)),
                  _leaf_names(params_c))


def _ghost_step(analysis: _Analysis, params_c, problem: _Problem, draw: _Draw, nu,
                opts: _Options) -> _Step:
  """Ghost Gram for the dense leaves plus per-example rows for the rest."""
  rows = draw.rows
  row_apply, row_t = _row_maps(rows)
  leaves, treedef = jax.tree.flatten(params_c)
  r, free_rows, acts, cots = _per_example_pass(analysis, leaves, problem.batch, problem.t_out)
  uses = list(analysis.dense.values())
  # The step M^T w is summed over the (possibly batch-sharded) examples where they are:
  # one all-reduce of the update. Everything else reads the examples gathered once.
  step_factors = [_ghost_factors(u, a, c) for u, a, c in zip(uses, acts, cots, strict=True)]
  step_rows = free_rows
  num_examples = _batch_size(problem.batch)
  free_keys = list(free_rows)
  r, *rest = _gather_examples([r, *acts, *cots, *free_rows.values()], num_examples)
  acts, cots = rest[:len(uses)], rest[len(uses):2 * len(uses)]
  free_rows = dict(zip(free_keys, rest[2 * len(uses):], strict=True))
  factors = [_ghost_factors(u, a, c) for u, a, c in zip(uses, acts, cots, strict=True)]
  grams = [_ghost_gram(a, g) for a, g in factors]
  if free_rows:
    grams.append(_gram_of_blocks(free_rows))
  g = sum(grams[1:], grams[0])
  if rows is not None:
    g = rows.apply(rows.apply(g).T).T
  g = _pin(g)
  r_used = row_apply(r)

  def rotated_gram(t):  # (T^T M)(T^T M)^T from rotated rows, dense leaves in chunks
    t = _pin(jax.vmap(row_t, in_axes=1, out_axes=1)(t))
    terms = [_ghost_rotated_gram(a, gc, t) for a, gc in factors]
    if free_rows:
      terms.append(_rotated_gram_of_blocks(t, free_rows))
    return _pin(sum(terms[1:], terms[0]))

  u, s = _spectrum(*_sorted_eigh(g), opts.rank, opts.rtol, rotated_gram)
  keep = _keep_mask(s, opts.rank, opts.rtol)
  w = _pin(row_t(_pinv_weights(u, s, keep, r_used)))
  out = [None] * len(leaves)
  for use, (a, gc) in zip(uses, step_factors, strict=True):
    out[use.leaf] = _ghost_transpose_times(use, leaves[use.leaf], a, gc, w)
  for i, rws in zip(step_rows, _blocks_transpose_times(list(step_rows.values()), w),
                    strict=True):
    out[i] = rws
  delta = jax.tree.unflatten(treedef, out)
  return _Step(delta, None, r, r_used, u, s, keep, g, nu, draw.key)


def _jacobian_blocks(analysis: _Analysis | None, params_c, problem: _Problem):
  """``(R, blocks)``: the residuals and the whole per-leaf Jacobian blocks."""
  if not problem.separable:
    return _jacobian(problem.whole_fn, params_c, problem.num_res, problem.num_params)
  leaves, treedef = jax.tree.flatten(params_c)
  if analysis is None:
    analysis = _Analysis(_trace(problem.example_residual_fn, params_c, problem.batch), {}, {},
                         {}, set())
  r, free_rows, _, _ = _per_example_pass(analysis, leaves, problem.batch, problem.t_out)
  return r, jax.tree.unflatten(treedef, [free_rows[i] for i in range(len(leaves))])


def _materialised_step(analysis: _Analysis | None, params_c, problem: _Problem, draw: _Draw,
                       nu, chosen: str, opts: _Options) -> _Step:
  """SVD of ``M`` or eigendecomposition of ``G`` from the whole Jacobian blocks."""
  r, blocks = _jacobian_blocks(analysis, params_c, problem)
  d = None
  if _is_scaled(opts, draw):
    nu, d = _scaling(nu, jax.tree.map(lambda j: jnp.mean(j, axis=0), blocks), opts, draw.pmask)
  if d is not None:
    blocks = jax.tree.map(lambda j, dl: j * dl.astype(j.dtype), blocks, d)
  if draw.rows is not None:
    blocks = jax.tree.map(draw.rows.apply, blocks)
  r_used = _row_maps(draw.rows)[0](r)
  m_rows = r_used.shape[0]
  # jacrev's blocks come out of a batched matmul in a transposed layout: one row-major
  # (m, P_l) copy that every use reads (in the leaf's shape XLA made three copies)
  flat = chosen != "svd" and not problem.separable and _replicated() is None
  if chosen == "svd":
    check = jnp.concatenate(
        [jnp.reshape(j, (m_rows, -1), out_sharding=_replicated())
         for j in jax.tree.leaves(blocks)], axis=1)
    u, s, _ = jnp.linalg.svd(check, full_matrices=False)
  else:  # every use reads the same blocks, a slice at a time (see _chunked_gram)
    if flat:
      blocks = jax.tree.map(lambda j: jnp.reshape(j, (m_rows, -1)), blocks)
    check = _gram_of_blocks(blocks)
    u, s = _spectrum(*_sorted_eigh(check), opts.rank, opts.rtol,
                     lambda t: _rotated_gram_of_blocks(t, blocks))
  keep = _keep_mask(s, opts.rank, opts.rtol)
  delta = _blocks_transpose_times(blocks, _pinv_weights(u, s, keep, r_used))
  if flat:
    delta = jax.tree.map(lambda x, p: jnp.reshape(x, p.shape), delta, params_c)
  return _Step(delta, d, r, r_used, u, s, keep, check, nu, draw.key)


def _operator_step(params_c, problem: _Problem, draw: _Draw, nu, chosen: str,
                   opts: _Options) -> _Step:
  """``G`` only through products of a linearisation: all of it, or a random subspace."""
  r, jvp_fn = jax.linearize(problem.whole_fn, params_c)
  vjp_fn = jax.linear_transpose(jvp_fn, params_c)
  mt = lambda v: vjp_fn(v)[0]
  if _is_scaled(opts, draw):
    mean_grad = None
    if opts.rms_decay is not None:
      mean_grad = mt(jnp.full_like(r, 1.0 / problem.num_res))
    nu, d = _scaling(nu, mean_grad, opts, draw.pmask)
    d2 = jax.tree.map(lambda dl: dl * dl, d)
    mt = lambda v, mt=mt: jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), mt(v), d2)
  row_apply, row_t = _row_maps(draw.rows)
  if draw.rows is not None:
    jvp0, mt0 = jvp_fn, mt
    jvp_fn = lambda t, jvp0=jvp0: row_apply(jvp0(t))
    mt = lambda v, mt0=mt0: mt0(row_t(v))
  r_used = row_apply(r)
  m_rows = r_used.shape[0]
  chunk = (opts.microbatch_size or 1) if chosen == "matrix_free" else opts.microbatch_size
  gram_times = lambda c: _gram_times(jvp_fn, mt, c, chunk)
  sub = min(m_rows, opts.rank + (_OVERSAMPLING if opts.oversampling is None
                                 else opts.oversampling))
  key = draw.key
  if chosen == "matrix_free" and sub < m_rows:
    key, draw_mf = jax.random.split(key)
    lam, u, check = _subspace_iteration(gram_times, draw_mf, m_rows, sub,
                                        opts.power_iterations, r.dtype)
  else:  # the whole of G from B products
    check = gram_times(jnp.eye(m_rows, dtype=r.dtype))
    lam, u = _sorted_eigh(check)
  u, s = _spectrum(lam, u, opts.rank, opts.rtol,
                   lambda t: jnp.matmul(t.T, gram_times(t), precision=_HIGHEST))
  keep = _keep_mask(s, opts.rank, opts.rtol)
  delta = mt(_pinv_weights(u, s, keep, r_used))
  # d is None: mt already carries D^2 = D (D pinv(M D) R = D^2 M^T w)
  return _Step(delta, None, r, r_used, u, s, keep, check, nu, key)


def _complete_step(step: _Step, updates, params, step_size, draw: _Draw, problem: _Problem,
            opts: _Options) -> tuple:
  """``(delta, key, singular_values, effective_rank, nu, step_size)`` of the update.

  Applies the column scaling and the Polyak step, makes a step from non-finite residuals
  or Jacobian non-finite, casts to the updates' dtypes and rounds ``nu`` to its storage.
  """
  delta, nu = step.delta, step.nu
  if step.d is not None:
    delta = jax.tree.map(lambda x, dl: x * dl.astype(x.dtype), delta, step.d)
  if opts.polyak:
    num_kept = problem.num_res if draw.rows is None else draw.rows.count
    step_size = _polyak(step.u, step.s, step.keep, step.r_used, num_kept, opts.polyak_f_star,
                        opts.polyak_max)
    delta = jax.tree.map(lambda x: x * step_size.astype(x.dtype), delta)
  finite = jnp.all(jnp.isfinite(step.r)) & jnp.all(jnp.isfinite(step.check))
  delta = jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), delta)
  delta = jax.tree.map(lambda x, ref: x.astype(ref.dtype), delta,
                       params if updates is None else updates)
  if opts.rms_decay is not None:
    nu = jax.tree.map(lambda v: v.astype(opts.store), nu)
  singular_values, effective_rank = _diagnostics(step.s, step.keep, opts.rank)
  return delta, step.key, singular_values, effective_rank, nu, step_size

