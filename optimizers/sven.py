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

Separable residuals. With ``example_residual_fn(params, example)`` (a scalar or
``(T,)`` per example) and ``batch`` (leading axis = examples) in place of
``residual_fn``, the rows of ``M`` come from ONE vmapped per-example forward +
backward pass (``B`` per-example backward passes, where ``jax.jacrev`` of a
whole-batch function runs ``B`` backward passes over the whole batch). The
per-example function is traced once to a jaxpr; a parameter leaf that enters it
exactly once, as an operand of a ``dot_general`` without batch dimensions
(possibly through a cast, transpose or reshape, possibly inside a ``jit``), is
*dense*: with the layer input ``a_{it}`` and output cotangent ``g_{it}`` of
example ``i`` at position ``t`` (``t`` runs over the activation's free axes,
e.g. a sequence), its per-example gradient is ``sum_t a_{it} g_{it}^T`` and

.. math::

  (M_l M_l^T)_{ij} = \sum_{t,s} (a_{it} \cdot a_{js}) (g_{it} \cdot g_{js})

(the "ghost" inner products of per-example gradient clipping; for ``T = 1`` it
is ``(A A^T) * (G G^T)``; when ``T^2`` outgrows the leaf the per-example
gradients are formed instead). The ``g`` are the gradients of the residuals with
respect to a zero added to the layer's output, so one backward pass gives all
of them and no per-example weight gradient is formed; the step's block for the
leaf is ``sum_{i,t} w_i a_{it} g_{it}^T``, one contraction. Leaves used any other
way (biases, norm scales, embeddings, weight-tied or reused kernels) take the
per-example pass; a leaf used inside control flow, a custom-derivative function
or a convolution does too, with a warning (once). :func:`sven_leaf_paths` lists
each leaf's path; ``dense_leaves`` declares it instead. The refinement pass of
the Gram form (above) forms the rotated rows of a dense leaf a block of its input
axis at a time, so it too never holds per-example gradients of a whole leaf. With
``rms_decay`` or ``param_fraction`` (a column scaling inside ``M``) every leaf takes
the per-example pass. ``"matrix_free"`` and microbatched ``"gram"`` use the
batch's residuals ``vmap(example_residual_fn)`` as ``residual_fn``.

Materialised rows. When rows are formed (per-example rows of non-dense leaves, or
``jax.jacrev``), each leaf's block ``(B, *leaf_shape)`` is formed once, in the leaf's
own shape, and the Gram, the refinement and ``M^T w`` all read it ~1 MiB at a time
(loops over slices along the leaf's first axis): no second copy of the ``B x P`` rows.
On the ~1M-parameter MLP of ``bench/bench_sven.py`` at ``B = 32`` (every leaf through
the per-example pass) the compiled step's temporaries are 131 MiB, one copy of the
128 MiB of rows, and the whole step takes about the time of forming the rows alone by
``vmap(grad)`` (0.9-1.1x on CPU).

Sharding. Under ``jit`` with the batch sharded over a mesh axis (params
replicated), cross-example entries of ``M M^T`` pair examples of different devices,
so some gather is intrinsic. The ghost path gathers the examples' layer inputs,
output cotangents, other leaves' rows and residuals as ONE concatenated block (one
all-gather of ``B`` rows of ``sum_l (T K_l + T_out T N_l) + T_out P_other + T_out``
floats, never ``B x P``); the Gram, its eigendecomposition, the refinement and the
weights ``w`` are then computed replicated, and ``M^T w`` is summed over each
device's own examples with one (combined) all-reduce of the update, as a
data-parallel gradient step. Compiled on 8 devices (automatic and explicit mesh
axes alike) that is 1 all-gather + 1 all-reduce and no other collective.

The reference's options. Polyak step (``polyak``): the direction is scaled by
``eta = clip((mean R - f*) / (mean U_k U_k^T R + 1e-8), 0, polyak_max)``, where
``mean U_k U_k^T R = g . delta`` with ``g = M^T 1 / m``: the step length at which the
linearised mean residual reaches ``f*`` (the authors' Polyak rule
``(loss - f*) / (||g||^2 + eps)``, capped, with the Sven direction in place of the
gradient; meant for residuals that are per-sample losses, the reference's default;
``eta = 0`` when the direction does not decrease the mean residual). Row
reduction: ``row_group_size`` averages residuals (and rows) over consecutive
groups, as the authors' ``microbatch_size`` averages losses; ``row_fraction`` masks
all but a random ``int(row_fraction * n)`` rows each step. Parameter masking
(``param_fraction``): only ``int(param_fraction * P)`` parameters move each step,
``delta = D pinv_k(M D) R`` with ``D`` a 0/1 mask, drawn entry by entry or
(``mask_by_block``) as the authors draw blocks: leaves in random order, whole
until the next would reach the target, that one in part. The random draws come
from the state's key: ``key, draw = split(key)``, rows from ``fold_in(draw, 0)``,
parameters from ``fold_in(draw, 1)``.

The incoming ``updates`` are not used for the direction (only for the output
dtypes): Sven reads the residuals and ``params`` instead.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers._checks import (
  check_bool,
  check_choice,
  check_int,
  check_real_floating,
  reject_masked_nodes,
)
from optimizers._sven_ghost import (
  _analyse,
  _batch_size,
  _declared_flags,
  _example_out_size,
  _leaf_names,
  _trace,
)
from optimizers._sven_steps import (
  _choose_method,
  _complete_step,
  _draw_reductions,
  _ghost_step,
  _is_scaled,
  _materialised_step,
  _materialises,
  _operator_step,
  _Options,
  _problem,
  _separable_analysis,
)
from optimizers._trees import tree_upcast

__all__ = ["ScaleBySvenState", "scale_by_sven", "sven", "sven_leaf_paths"]

_METHODS = ("auto", "gram", "svd", "matrix_free")


class ScaleBySvenState(NamedTuple):
  """State of :func:`scale_by_sven`.

  Attributes:
    key: legacy ``uint32`` PRNG key data, shape ``(2,)``; advanced by
      ``method="matrix_free"`` on each update, unused by the exact methods.
    singular_values: ``(rank,)`` float32, the singular values of the (pre-scaled)
      Jacobian used by the last step, descending, zero-padded.
    effective_rank: int32 scalar, how many singular directions the last step used.
    nu: EMA of the squared mean per-sample gradient (same tree as params, stored
      in ``nu_dtype``, float32 by default) when ``rms_decay`` is set, else ``()``.
    step_size: float32 scalar, the Polyak step ``eta`` of the last update with
      ``polyak=True`` (else 1).
  """

  key: jax.Array
  singular_values: jax.Array
  effective_rank: jax.Array
  nu: optax.Params
  step_size: jax.Array



def _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                  oversampling) -> None:
  check_int("rank", rank)
  if isinstance(rtol, (int, float)) and not rtol >= 0:
    raise ValueError(f"rtol must be >= 0, got {rtol!r}")
  check_choice("method", method, _METHODS)
  if microbatch_size is not None:
    check_int("microbatch_size", microbatch_size)
  if method == "svd" and microbatch_size is not None:
    raise ValueError("microbatch_size is not supported with method='svd' (it needs the full "
                     "Jacobian); use method='gram'")
  if isinstance(rms_decay, (int, float)) and not 0 <= rms_decay < 1:
    raise ValueError(f"rms_decay must be None or in [0, 1), got {rms_decay!r}")
  if isinstance(rms_eps, (int, float)) and not rms_eps > 0:
    raise ValueError(f"rms_eps must be > 0, got {rms_eps!r}")
  if isinstance(power_iterations, int) and power_iterations < 0:
    raise ValueError(f"power_iterations must be >= 0, got {power_iterations!r}")
  if oversampling is not None:
    check_int("oversampling", oversampling, minimum=0)


def _check_options(nu_dtype, ghost, polyak, polyak_f_star, polyak_max, row_fraction,
                   row_group_size, param_fraction, mask_by_block, rms_decay) -> None:
  if nu_dtype is not None and not jnp.issubdtype(jnp.dtype(nu_dtype), jnp.floating):
    raise ValueError(f"nu_dtype must be None or a floating dtype, got {nu_dtype!r}")
  if nu_dtype is not None and rms_decay is None:
    raise ValueError("nu_dtype needs rms_decay (there is no nu state without it)")
  for name, flag in (("ghost", ghost), ("polyak", polyak), ("mask_by_block", mask_by_block)):
    check_bool(name, flag)
  if isinstance(polyak_max, (int, float)) and not polyak_max > 0:
    raise ValueError(f"polyak_max must be > 0, got {polyak_max!r}")
  if not isinstance(polyak_f_star, (int, float, jax.Array)):
    raise ValueError(f"polyak_f_star must be a number, got {polyak_f_star!r}")
  for name, frac in (("row_fraction", row_fraction), ("param_fraction", param_fraction)):
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float))
                             or not 0 < frac <= 1):
      raise ValueError(f"{name} must be None or a Python float in (0, 1], got {frac!r}")
  if row_group_size is not None:
    check_int("row_group_size", row_group_size)
  if row_fraction is not None and row_group_size is not None:
    raise ValueError("row_fraction and row_group_size cannot be combined (choose one way of "
                     "reducing the rows)")
  if mask_by_block and param_fraction is None:
    raise ValueError("mask_by_block needs param_fraction (the fraction of parameters kept)")


def _check_update_args(updates, params, residual_fn, example_residual_fn, batch) -> None:
  """The keyword arguments of ``update``: one residual form, params, real leaves."""
  if (residual_fn is None) == (example_residual_fn is None):
    raise ValueError("scale_by_sven requires exactly one of the keyword arguments "
                     "residual_fn(params) -> (B,) or example_residual_fn(params, example) "
                     "(with batch)")
  if example_residual_fn is not None and batch is None:
    raise ValueError("example_residual_fn needs the keyword argument batch (a pytree of "
                     "arrays with a leading example axis)")
  if residual_fn is not None and batch is not None:
    raise ValueError("batch goes with example_residual_fn, not with residual_fn")
  if params is None:
    raise ValueError("scale_by_sven requires params (the residuals are differentiated at "
                     "params)")
  reject_masked_nodes(params, owner="scale_by_sven", reason="residual_fn needs the full params.")
  check_real_floating(params, owner="scale_by_sven", name="params")
  check_real_floating(updates, owner="scale_by_sven")


def scale_by_sven(
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    nu_dtype: Any = None,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
    ghost: bool = True,
    dense_leaves: Any = None,
    polyak: bool = False,
    polyak_f_star: float | jax.Array = 0.0,
    polyak_max: float | jax.Array = 1.0,
    row_fraction: float | None = None,
    row_group_size: int | None = None,
    param_fraction: float | None = None,
    mask_by_block: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven direction: truncated pseudoinverse of the residual Jacobian times the residuals.

  With residuals ``R`` (``n`` rows) and ``M = dR/dparams`` (``n x P``), returns

  .. math::

    \mathrm{pinv}_k(M) R = V_k S_k^{-1} U_k^T R = M^T U_k S_k^{-2} U_k^T R,

  with the top ``k = rank`` singular triplets of ``M`` and singular values
  ``S_i <= rtol * S_0`` or ``<= 1e-10`` dropped (no damping, no ``1/B``). The
  direction has the gradient's sign (for ``R = f - y`` it is aligned with the
  gradient of ``0.5 ||R||^2``); chain a learning rate or use :func:`sven`. See
  the module docstring for the methods, the separable (per-example) mode and its
  ghost Gram, their float32 accuracy, the RMSProp pre-scaling
  ``delta = D pinv_k(M D) R`` and the reference's options.

  ``update`` takes the residuals one of two ways (keywords):

  * ``residual_fn(params) -> (B,)``: residuals of the whole batch (rows by
    ``jax.jacrev``, i.e. ``B`` backward passes over the whole batch);
  * ``example_residual_fn(params, example) -> () or (T,)`` with ``batch`` (a
    pytree of arrays whose leading axis indexes the examples): the separable
    form. ``R`` is ``vmap(example_residual_fn)`` over the batch, flattened
    example-major (``n = B T``); rows come from ONE vmapped per-example backward
    pass, and with ``ghost=True`` the leaves that enter through a matmul
    (:func:`sven_leaf_paths` lists them) contribute to ``M M^T`` from their
    inputs and output cotangents without per-example gradients.

  The incoming ``updates`` are NOT used for the direction, only for the output
  dtypes. Parameters are upcast to float32 (at least) before the residuals are
  differentiated; the output has the updates' dtypes. Non-finite residuals
  or Jacobians give a non-finite output (so ``optax.apply_if_finite`` can skip
  the step); a zero Jacobian gives a zero step. Integer or complex leaves raise
  ``TypeError``; inside ``optax.masked``/``optax.partition`` (the residuals need
  the full params) ``ValueError``; an empty params tree gives an empty step.

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
    nu_dtype: dtype in which ``nu`` is stored (``None``: float32). As optax's
      ``nu_dtype``: the EMA and the step are computed in float32 from the stored
      value, and only the new state is rounded to ``nu_dtype``.
    power_iterations: subspace iterations of ``"matrix_free"`` (may be traced).
    oversampling: extra test vectors of ``"matrix_free"``: subspace size
      ``min(B, rank + oversampling)``; ``None`` means 4. A Python int (it fixes
      shapes; ``None`` keeps ``optax.inject_hyperparams`` from tracing it).
    seed: seed of the PRNG key (``"matrix_free"`` and the random masks).
    ghost: separable mode only: use the ghost Gram for dense leaves
      (``False``: every leaf's rows come from the per-example pass).
    dense_leaves: separable mode only: ``None`` (find dense leaves in the
      per-example residual's jaxpr) or a pytree like params (or a callable
      ``params -> pytree``) of ``True`` (must be dense: ``ValueError`` naming
      the leaf otherwise), ``False`` (per-example rows) or ``None`` (automatic).
    polyak: scale the direction by the Polyak step ``eta`` (module docstring);
      ``state.step_size`` records it.
    polyak_f_star: the Polyak rule's target mean residual (``0`` for losses of
      an interpolating model).
    polyak_max: upper bound of ``eta``.
    row_fraction: row masking: each step uses a random ``int(row_fraction * n)``
      of the ``n`` residual rows (at least one).
    row_group_size: row reduction as the reference's ``microbatch_size``:
      residuals (and Jacobian rows) averaged over consecutive groups of this size.
    param_fraction: random parameter masking: each step only ``int(param_fraction
      * P)`` parameters move (``delta = D pinv_k(M D) R`` with ``D`` a 0/1 mask).
    mask_by_block: draw the parameter mask by whole leaves (random leaf order,
      the last one in part) instead of entry by entry.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params`` and either ``residual_fn`` or ``example_residual_fn`` and ``batch``.

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
    >>> # the same step from a per-example residual (x_i, y_i) -> scalar
    >>> example_fn = lambda p, xy: p["w"] * xy[0] + p["b"] - xy[1]
    >>> updates, _ = tx.update(grads, state, params, example_residual_fn=example_fn,
    ...                        batch=(x, 2.0 * x + 1.0))
    >>> new = optax.apply_updates(params, updates)
    >>> print(f"{float(new['w']):.4f} {float(new['b']):.4f}")
    2.0000 1.0000

  References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
    Computationally Efficient Natural Gradient Method", 2026,
    https://arxiv.org/abs/2604.01279

    Goodfellow, "Efficient Per-Example Gradient Computations", 2015,
    https://arxiv.org/abs/1510.01799 (per-example gradient norms of dense layers)

    Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners", 2021, https://arxiv.org/abs/2110.05679
    (ghost norms with a sequence axis)
  """
  _check_config(rank, rtol, method, microbatch_size, rms_decay, rms_eps, power_iterations,
                oversampling)
  _check_options(nu_dtype, ghost, polyak, polyak_f_star, polyak_max, row_fraction,
                 row_group_size, param_fraction, mask_by_block, rms_decay)
  store = jnp.float32 if nu_dtype is None else jnp.dtype(nu_dtype)
  opts = _Options(rank, rtol, method, microbatch_size, rms_decay, rms_eps, store,
                  power_iterations, oversampling, ghost, dense_leaves, polyak, polyak_f_star,
                  polyak_max, row_fraction, row_group_size, param_fraction, mask_by_block)

  def init_fn(params):
    nu = () if rms_decay is None else jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=store), params)
    # `+ zeros` gives the key the sharding spec P(None,) that a jitted update
    # returns; a bare PRNGKey carries P(), which would retrace under explicit meshes.
    return ScaleBySvenState(
        key=jnp.zeros((2,), jnp.uint32) + jax.random.PRNGKey(seed),
        singular_values=jnp.zeros((rank,), jnp.float32),
        effective_rank=jnp.zeros((), jnp.int32),
        nu=nu,
        step_size=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, *, residual_fn=None, example_residual_fn=None,
                batch=None, **extra_args):
    del extra_args
    _check_update_args(updates, params, residual_fn, example_residual_fn, batch)
    if not jax.tree.leaves(params):  # nothing to optimise: an empty step
      return updates, state
    params_c = tree_upcast(params)
    problem = _problem(params_c, residual_fn, example_residual_fn, batch)
    draw = _draw_reductions(state.key, problem.num_res, params_c, opts)
    materialise = _materialises(opts, problem)
    chosen = _choose_method(opts, problem, materialise)
    analysis = None
    if problem.separable and materialise:  # the ghost Gram needs "gram" and no scaling
      analysis = _separable_analysis(problem, params_c, opts,
                                     ghost=chosen == "gram" and not _is_scaled(opts, draw))
    if analysis is not None and analysis.dense:
      step = _ghost_step(analysis, params_c, problem, draw, state.nu, opts)
    elif materialise:
      step = _materialised_step(analysis, params_c, problem, draw, state.nu, chosen, opts)
    else:
      step = _operator_step(params_c, problem, draw, state.nu, chosen, opts)
    delta, *fields = _complete_step(step, updates, params, state.step_size, draw, problem, opts)
    return delta, ScaleBySvenState(*fields)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sven(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    *,
    rtol: float | jax.Array = 1e-3,
    method: str = "auto",
    microbatch_size: int | None = None,
    rms_decay: float | jax.Array | None = None,
    rms_eps: float | jax.Array = 1e-8,
    nu_dtype: Any = None,
    power_iterations: int | jax.Array = 1,
    oversampling: int | None = None,
    seed: int | jax.Array = 0,
    ghost: bool = True,
    dense_leaves: Any = None,
    polyak: bool = False,
    polyak_f_star: float | jax.Array = 0.0,
    polyak_max: float | jax.Array = 1.0,
    row_fraction: float | None = None,
    row_group_size: int | None = None,
    param_fraction: float | None = None,
    mask_by_block: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sven optimizer: ``-learning_rate * pinv_k(dR/dparams) R``.

  :func:`scale_by_sven` followed by ``optax.scale_by_learning_rate``: the
  update is

  .. math::

    \Delta\theta = -\eta \, V_k S_k^{-1} U_k^T R,

  added to the params by ``optax.apply_updates``. With ``R = f(x) - y`` and
  ``learning_rate = 1`` a step solves the linearised residual equations
  (Gauss-Newton / minimum norm); the paper uses learning rates 0.05 to 1.
  ``update`` requires ``params`` and either ``residual_fn(params) -> (B,)`` or
  ``example_residual_fn(params, example)`` with ``batch`` (see
  :func:`scale_by_sven`; with ``polyak=True`` the step is ``-learning_rate * eta
  * direction``).

  Args:
    learning_rate: scalar or schedule.
    rank: number of singular directions kept.
    rtol: relative singular-value cutoff.
    method: ``"auto"``, ``"gram"``, ``"svd"`` or ``"matrix_free"``.
    microbatch_size: see :func:`scale_by_sven`.
    rms_decay: ``None`` or the decay of the RMSProp pre-scaling.
    rms_eps: epsilon of the pre-scaling.
    nu_dtype: storage dtype of the pre-scaling's ``nu`` (``None``: float32).
    power_iterations: subspace iterations of ``"matrix_free"``.
    oversampling: extra test vectors of ``"matrix_free"`` (``None``: 4).
    seed: PRNG seed of ``"matrix_free"`` and the random masks.
    ghost: ghost Gram for dense leaves in the separable mode.
    dense_leaves: declaration of the dense leaves (``None``: found automatically).
    polyak: scale by the Polyak step ``eta``.
    polyak_f_star: target mean residual of the Polyak step.
    polyak_max: upper bound of the Polyak step.
    row_fraction: random row masking (fraction of residual rows used per step).
    row_group_size: residuals averaged over groups of this size.
    param_fraction: random parameter masking (fraction of parameters moved).
    mask_by_block: draw the parameter mask by whole leaves.

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
          rms_eps=rms_eps, nu_dtype=nu_dtype, power_iterations=power_iterations,
          oversampling=oversampling, seed=seed, ghost=ghost, dense_leaves=dense_leaves,
          polyak=polyak, polyak_f_star=polyak_f_star, polyak_max=polyak_max,
          row_fraction=row_fraction, row_group_size=row_group_size,
          param_fraction=param_fraction, mask_by_block=mask_by_block),
      optax.scale_by_learning_rate(learning_rate),
  )


def sven_leaf_paths(example_residual_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batch: Any, *, dense_leaves: Any = None, ghost: bool = True
                    ) -> dict[str, str]:
  """Which path each parameter leaf takes in :func:`scale_by_sven`'s separable mode.

  ``"ghost"``: the leaf enters the per-example residual exactly once, as an operand of
  a ``dot_general`` (a Dense/Linear kernel, an attention projection), so its block of
  ``M M^T`` comes from the layer's inputs and output cotangents without per-example
  gradients. ``"per_example (...)"``: its Jacobian rows come from the vmapped
  per-example backward pass (biases, norm scales, embeddings, weight-tied or
  otherwise reused leaves), with the reason.

  Args:
    example_residual_fn: ``(params, example) -> scalar or (T,)``.
    params: the parameter pytree.
    batch: pytree of arrays with a leading example axis (only shapes are used).
    dense_leaves: as in :func:`scale_by_sven`.
    ghost: as in :func:`scale_by_sven`.

  Returns:
    ``{leaf path: path}`` in the params' leaf order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers import sven_leaf_paths
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "v": jnp.ones(4)}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
    >>> for leaf, path in sven_leaf_paths(fn, params, jnp.ones((8, 3))).items():
    ...   print(leaf, path)
    ['b'] per_example (used by add)
    ['v'] ghost
    ['w'] ghost
  """
  params_c = tree_upcast(params)
  _batch_size(batch)
  _example_out_size(example_residual_fn, params_c, batch)
  names = _leaf_names(params_c)
  flat = jax.tree.leaves(params_c)
  analysis = _analyse(_trace(example_residual_fn, params_c, batch), len(flat), ghost,
                      _declared_flags(dense_leaves, params_c, len(flat)), names)
  return {name: "ghost" if i in analysis.dense else f"per_example ({analysis.reasons[i]})"
          for i, name in enumerate(names)}
