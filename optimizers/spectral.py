r"""SPECTRA: spectral clipping of matrix updates (Jiang, Semenov, Stich, arXiv 2603.14315).

:func:`spectral_clip` is gradient-like: it maps every matrix leaf
``U = sum_i s_i u_i v_i^T`` to ``sum_i h(s_i) u_i v_i^T`` with

* soft: ``h(s) = s / sqrt(1 + s^2 / c^2)``, i.e. ``H_c(U) = (I + U U^T / c^2)^{-1/2} U``;
* hard: ``h(s) = min(s, c)``,

computed without an SVD (Newton–Schulz iterations of :mod:`optimizers.linalg`).
:func:`spectra_adamw` is the full optimizer of the paper: AdamW whose
bias-corrected direction is post-clipped, scaled by a shape factor, with the
decoupled weight decay added after the clip (never clipped).

Matrix view. By default every leaf with ``ndim >= 2`` is a batch of matrices
over its last two axes, ``(..., m, n)`` with ``m`` = reduction (fan-in) and
``n`` = output (fan-out): the layout of a Flax ``Dense`` kernel ``(in, out)``.
``weight_dimension_numbers`` (see :mod:`optimizers.matrices`) places the
matrix axes anywhere, e.g. ``MatrixDims(reduction_axis=0, output_axis=2)`` for
a MaxText-style ``(embed, layers, mlp)`` kernel with the scanned layer axis at
position 1; for torch-style ``(out, in)`` weights pass
``MatrixDims(reduction_axis=-1, output_axis=-2)``. Leaves with ``ndim < 2`` (or
dims ``None``) pass through unclipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optimizers._checks import (
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_real_floating,
)
from optimizers._moments import scale_by_adam
from optimizers._trees import tree_l2_norm
from optimizers.distributed import STRATEGIES, map_matrix_leaves
from optimizers.linalg import (
    SIGN_STEPS,
    SOFT_NS_STEPS,
    hard_spectral_clip,
    soft_spectral_clip,
)
from optimizers.matrices import (
    WeightDimensionNumbers,
    matrix_shape,
    resolve_matrix_dims,
)

__all__ = [
    "SpectralClipState",
    "spectral_clip",
    "scale_by_shape_factor",
    "spectra_threshold_schedule",
    "spectra_adamw",
]

_MODES = ("soft", "hard")
# Bound of lr_peak / lr_t during warm-up (lr_t = 0 at the first step of a linear warm-up).
_MAX_WARMUP_RATIO = 1e6
# Steps scanned for the peak of a learning-rate schedule when warmup_steps is None.
_WARMUP_HORIZON = 100_000


class SpectralClipState(NamedTuple):
  """State of :func:`spectral_clip`.

  Attributes:
    count: int32 step counter (drives a ``max_singular_value`` schedule).
    norm_ratio: diagnostic, ``||clip(U)||_F / ||U||_F`` over all matrix leaves
      of the last update (float32; 1 when no matrix leaf is nonzero).
  """

  count: jax.Array
  norm_ratio: jax.Array


def _check_steps(ns_steps: Any, sign_steps: Any) -> int:
  """Validates the static iteration counts; returns ``ns_steps`` (default filled in)."""
  if ns_steps is None:
    ns_steps = SOFT_NS_STEPS
  if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
    raise ValueError(
        f"ns_steps must be a Python int >= 1, got {ns_steps!r} (with optax.inject_hyperparams,"
        " list it in static_args)"
    )
  if (
      not isinstance(sign_steps, tuple)
      or len(sign_steps) != 2
      or not all(isinstance(s, int) and s >= 0 for s in sign_steps)
  ):
    raise ValueError(f"sign_steps must be a pair of Python ints >= 0, got {sign_steps!r}")
  return ns_steps


def _dims_source(weight_dimension_numbers: WeightDimensionNumbers, updates: Any, params: Any):
  """The tree a callable ``weight_dimension_numbers`` is applied to: params if given."""
  if callable(weight_dimension_numbers) and params is not None:
    return params
  return updates


def spectral_clip(
    max_singular_value: float | jax.Array | optax.Schedule,
    *,
    mode: str = "soft",
    ns_steps: int | None = None,
    sign_steps: tuple[int, int] = SIGN_STEPS,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    param_specs: Any = None,
    sharding_strategy: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the singular values of every matrix leaf of the updates (no SVD).

  For each matrix ``U`` (see the module docstring for the matrix view) with
  singular values ``s`` and threshold ``c``:

  * ``mode="soft"``: ``H_c(U) = (I + U U^T / c^2)^{-1/2} U``, ``s -> s / sqrt(1 + s^2/c^2)``;
  * ``mode="hard"``: ``s -> min(s, c)``.

  Singular vectors are kept; the output has the gradient's sign (chain it
  before an optimizer or a learning-rate scaling). Computed by
  :func:`optimizers.soft_spectral_clip` / :func:`optimizers.hard_spectral_clip`
  in float32 whatever the updates' dtype; zero gives zero, NaN/Inf propagate.

  Args:
    max_singular_value: threshold ``c > 0``: a float, a (possibly traced)
      scalar, or a schedule ``count -> c`` (``count`` counts updates).
    mode: ``"soft"`` (the paper's default) or ``"hard"``.
    ns_steps: inverse square root iterations (static int; ``None``: 10, the
      :mod:`optimizers.linalg` default, converged for ``s_max / c`` up to ~300).
    sign_steps: ``(fast, polish)`` matrix-sign iterations of the hard clip.
    weight_dimension_numbers: ``None`` (default view), a ``MatrixDims`` (or
      optax ``MuonDimensionNumbers``/``GaLoreDimensionNumbers``) for every
      leaf with ``ndim >= 2``, a pytree of those (``None`` = pass the leaf
      through) or a callable ``params -> pytree``.
    param_specs: the params' ``PartitionSpec`` tree (``None``: replicated), for
      sharded updates under ``Auto`` mesh axes, whose array types carry no spec
      (under ``Explicit`` axes the specs are read from the arrays).
    sharding_strategy: how sharded matrices are clipped
      (:func:`optimizers.distributed.owner_computes`): ``"auto"`` (whole
      matrices on owner devices, one all-to-all in and one out, no
      collective inside the iterations), ``"owner"``, ``"replicate"`` or
      ``"gspmd"`` (XLA partitions every product).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a
    :class:`SpectralClipState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import spectral_clip
    >>> tx = optax.chain(spectral_clip(1.0, mode="hard"), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> grads = {"w": jnp.diag(jnp.array([3.0, 0.5])), "b": jnp.array([3.0, 0.5])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["w"].round(4).tolist(), updates["b"].round(4).tolist()
    ([[-0.1, 0.0], [0.0, -0.05]], [-0.3, -0.05])

  References:
    Jiang, Semenov, Stich, "SPECTRA: spectral clipping", https://arxiv.org/abs/2603.14315
  """
  check_positive("max_singular_value", max_singular_value)
  check_choice("mode", mode, _MODES)
  ns_steps = _check_steps(ns_steps, sign_steps)
  check_choice("sharding_strategy", sharding_strategy, STRATEGIES)

  def clip(x: jax.Array, c: jax.Array) -> jax.Array:
    if mode == "soft":
      return soft_spectral_clip(x, c, ns_steps=ns_steps)
    return hard_spectral_clip(x, c, ns_steps=ns_steps, sign_steps=sign_steps)

  def init_fn(params):
    del params
    return SpectralClipState(
        count=jnp.zeros([], jnp.int32), norm_ratio=jnp.ones([], jnp.float32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_real_floating(updates, owner="spectral_clip")
    c = max_singular_value(state.count) if callable(max_singular_value) else max_singular_value
    dims_tree = resolve_matrix_dims(
        weight_dimension_numbers, _dims_source(weight_dimension_numbers, updates, params)
    )
    with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [x for _, x in with_path]
    dims = treedef.flatten_up_to(dims_tree)
    specs = None if param_specs is None else treedef.flatten_up_to(param_specs)
    out = map_matrix_leaves(
        clip, leaves, dims, args=(jnp.asarray(c),), param_specs=specs,
        strategy=sharding_strategy, names=[jax.tree_util.keystr(p) for p, _ in with_path])
    clipped_in = [x for x, d in zip(leaves, dims, strict=True) if d is not None]
    clipped_out = [y for y, d in zip(out, dims, strict=True) if d is not None]
    # Overflow-safe norms: sum(x^2) would overflow (NaN ratio) for |x| ~ 1e19 in float32.
    norm_in, norm_out = tree_l2_norm(clipped_in), tree_l2_norm(clipped_out)
    ratio = jnp.where(norm_in > 0, norm_out / jnp.where(norm_in > 0, norm_in, 1.0), 1.0)
    new_state = SpectralClipState(
        count=optax.safe_increment(state.count), norm_ratio=ratio.astype(jnp.float32)
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _real_floating_updates() -> optax.GradientTransformationExtraArgs:
  """``optax.identity`` that rejects integer and complex updates (``TypeError``)."""

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    check_real_floating(updates, owner="spectra_adamw")
    return updates, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def scale_by_shape_factor(
    weight_dimension_numbers: WeightDimensionNumbers = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales every matrix leaf by ``a = sqrt(max(1, fan_out / fan_in))``.

  ``fan_in = m`` (product of the reduction axes) and ``fan_out = n`` (product
  of the output axes) of the :mod:`optimizers.matrices` view; by default the
  last two axes of an ``ndim >= 2`` leaf, i.e. a Flax ``Dense`` kernel
  ``(in, out)``. Non-matrix leaves are unchanged. Stateless.

  Args:
    weight_dimension_numbers: the matrix view (see :func:`spectral_clip`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.spectral import scale_by_shape_factor
    >>> tx = scale_by_shape_factor()
    >>> u, _ = tx.update({"w": jnp.ones((2, 8))}, tx.init(None))
    >>> float(u["w"][0, 0])  # sqrt(8 / 2)
    2.0
  """

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    dims_tree = resolve_matrix_dims(
        weight_dimension_numbers, _dims_source(weight_dimension_numbers, updates, params)
    )
    leaves, treedef = jax.tree.flatten(updates)
    dims = treedef.flatten_up_to(dims_tree)
    out = []
    for x, d in zip(leaves, dims, strict=True):
      if d is None or x.size == 0:
        out.append(x)
        continue
      _, m, n = matrix_shape(x.shape, d)
      a = math.sqrt(max(1.0, n / m))
      out.append(x if a == 1.0 else (x * a).astype(x.dtype))
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def spectra_threshold_schedule(
    max_singular_value: float | jax.Array,
    learning_rate: optax.Schedule,
    warmup_steps: int | None = None,
) -> optax.Schedule:
  r"""The warm-up threshold ``c_t = c * lr_peak / lr_t`` (``c`` after warm-up).

  Keeps ``c_t * lr_t = c * lr_peak`` constant while the learning rate warms up,
  so the clipped step ``lr_t * H_{c_t}`` is bounded like the step at the peak.
  ``lr_peak`` is the maximum of the schedule over steps ``0 .. warmup_steps``;
  with ``warmup_steps=None`` the warm-up is detected as the steps before the
  first maximum of the schedule over its first 100 000 steps (a schedule that
  starts at its maximum has no warm-up). The ratio ``lr_peak / lr_t`` is capped
  at ``1e6`` (``lr_t = 0`` at the first step of a linear warm-up; the update is
  zero there anyway). The schedule is evaluated once, at construction.

  Args:
    max_singular_value: ``c`` (float or scalar).
    learning_rate: the learning-rate schedule ``count -> lr``.
    warmup_steps: length of the warm-up (Python int >= 0) or ``None`` to detect it.

  Returns:
    A schedule ``count -> c_t``.

  Examples:
    >>> import optax
    >>> from optimizers.spectral import spectra_threshold_schedule
    >>> lr = optax.linear_schedule(0.0, 1e-3, transition_steps=10)
    >>> c_t = spectra_threshold_schedule(5.0, lr)
    >>> [round(float(c_t(k)), 3) for k in (1, 5, 10, 20)]
    [50.0, 10.0, 5.0, 5.0]
  """
  if warmup_steps is not None:
    check_int("warmup_steps", warmup_steps, minimum=0)
  horizon = _WARMUP_HORIZON if warmup_steps is None else warmup_steps
  with jax.ensure_compile_time_eval():
    lrs = np.asarray(jax.vmap(learning_rate)(jnp.arange(horizon + 1, dtype=jnp.int32)))
  lrs = np.broadcast_to(lrs, (horizon + 1,)).astype(np.float64)
  if warmup_steps is None:
    warmup_steps = int(np.argmax(lrs))
  lr_peak = float(np.max(lrs[: warmup_steps + 1]))

  def schedule(count):
    if warmup_steps == 0 or not lr_peak > 0:
      return jnp.asarray(max_singular_value, jnp.float32)
    lr_t = jnp.asarray(learning_rate(count), jnp.float32)
    factor = lr_peak / jnp.maximum(lr_t, lr_peak / _MAX_WARMUP_RATIO)
    factor = jnp.where(count < warmup_steps, jnp.maximum(factor, 1.0), 1.0)
    return max_singular_value * factor

  return schedule


def spectra_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    max_singular_value: float | jax.Array | optax.Schedule = 5.0,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    pre_clip: float | jax.Array | None = None,
    mode: str = "soft",
    ns_steps: int | None = None,
    sign_steps: tuple[int, int] = SIGN_STEPS,
    shape_factor: bool = True,
    warmup_steps: int | None = None,
    mu_dtype: Any | None = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    param_specs: Any = None,
    sharding_strategy: str = "auto",
    nu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with its direction spectrally post-clipped (SPECTRA).

  With ``U_t`` the bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)``
  (``optax.scale_by_adam``) of the (optionally pre-clipped) gradient ``G_t``:

  ``update_t = -lr_t * (a * H_{c_t}(U_t) + weight_decay * W_t)``

  per matrix leaf, with ``H_c`` the soft (or hard) spectral clip of
  :func:`spectral_clip`, ``a = sqrt(max(1, fan_out / fan_in))`` (``fan_in`` =
  reduction dimension ``m``, ``fan_out`` = output dimension ``n`` of the
  matrix view; by default the last two axes, a Flax ``Dense`` kernel
  ``(in, out)``: pass ``weight_dimension_numbers`` for other layouts), and
  the decoupled weight decay never clipped. Non-matrix leaves (biases, norms)
  get plain AdamW. Pre-clipping (off by default) applies ``H_{pre_clip}`` to
  the raw gradients before Adam (the paper uses ``0.1``).

  Warm-up. When ``learning_rate`` is a schedule and ``max_singular_value`` a
  number, the threshold follows :func:`spectra_threshold_schedule`:
  ``c_t = c * lr_peak / lr_t`` during the warm-up (``c_t * lr_t`` constant),
  ``c`` afterwards; ``warmup_steps`` fixes the warm-up length, ``None``
  detects it as the steps before the schedule's first maximum. A schedule
  passed as ``max_singular_value`` is used as given. (Under
  ``optax.inject_hyperparams`` a learning-rate schedule is evaluated outside
  the factory, so pass the threshold schedule explicitly there.)

  Args:
    learning_rate: scalar or schedule.
    max_singular_value: post-clip threshold ``c > 0`` (paper: 5 for AdamW,
      up to 10), or a schedule.
    b1: Adam ``beta1``.
    b2: Adam ``beta2``.
    eps: Adam ``eps``.
    weight_decay: decoupled weight decay (``>= 0``), added after the clip.
    mask: weight-decay mask, as in ``optax.adamw``.
    pre_clip: threshold of the optional pre-clip of raw gradients, or ``None``.
    mode: ``"soft"`` or ``"hard"`` (both clips).
    ns_steps: Newton–Schulz inverse square root iterations (``None``: default).
    sign_steps: matrix-sign iterations of the hard clip.
    shape_factor: apply ``a = sqrt(max(1, fan_out / fan_in))``.
    warmup_steps: warm-up length for the threshold schedule (see above).
    mu_dtype: storage dtype of Adam's first moment (``None``: the parameter's
      dtype). The moments are updated and the direction computed in float32
      whatever the storage, so ``"bfloat16"`` halves the moments' bytes at the
      cost of rounding only the stored values.
    weight_dimension_numbers: matrix view (see :func:`spectral_clip`).
    param_specs: the params' ``PartitionSpec`` tree, needed for the
      owner-computes clip under ``Auto`` mesh axes (see :func:`spectral_clip`).
    sharding_strategy: how sharded matrices are clipped (see :func:`spectral_clip`).
    nu_dtype: storage dtype of Adam's second moment (as ``mu_dtype``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` returning ``-lr * direction``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import spectra_adamw
    >>> params = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
    >>> opt = spectra_adamw(1e-3, max_singular_value=5.0, weight_decay=0.1)
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> updates["w"].shape
    (4, 8)

  References:
    Jiang, Semenov, Stich, "SPECTRA: spectral clipping", https://arxiv.org/abs/2603.14315;
    Loshchilov & Hutter, AdamW, https://arxiv.org/abs/1711.05101
  """
  check_positive("max_singular_value", max_singular_value)
  check_nonnegative("weight_decay", weight_decay)
  if pre_clip is not None:
    check_positive("pre_clip", pre_clip)
  check_choice("mode", mode, _MODES)
  _check_steps(ns_steps, sign_steps)
  if callable(learning_rate) and not callable(max_singular_value):
    threshold = spectra_threshold_schedule(max_singular_value, learning_rate, warmup_steps)
  else:
    if warmup_steps is not None:
      check_int("warmup_steps", warmup_steps, minimum=0)
    threshold = max_singular_value
  clip_kw = dict(mode=mode, ns_steps=ns_steps, sign_steps=sign_steps,
                 weight_dimension_numbers=weight_dimension_numbers, param_specs=param_specs,
                 sharding_strategy=sharding_strategy)
  return optax.chain(
      spectral_clip(pre_clip, **clip_kw) if pre_clip is not None else _real_floating_updates(),
      scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      spectral_clip(threshold, **clip_kw),
      scale_by_shape_factor(weight_dimension_numbers) if shape_factor else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
