r"""Coordinate-wise gradient clipping with a global adaptive threshold.

Pan & Li (2023) clip the largest coordinates of the gradient, ranked over the
WHOLE parameter tree: with ``N`` coordinates in all and a fraction ``k`` to clip,

.. math::
  \tau = |g|_{(\lfloor N k \rfloor)}, \qquad
  g_i \leftarrow \mathrm{sign}(g_i)\, \tau\, s \quad \text{if } |g_i| \ge \tau,

where ``|g|_{(j)}`` is the ``j``-th largest magnitude (0-indexed, descending) and
``s`` a scale (1 by default). ``k = 0`` disables the transform; a fixed ``tau``
is the simple special case. Chained before an optimizer, the clipped gradient
feeds both of Adam's moments (``optax.chain(clip_coordinatewise(0.1),
optax.adam(1e-3))``). The paper's clipped Adam clips only the FIRST moment's
input and feeds the raw gradient to the second: that is
:func:`optimizers.clipped_adamw` (and ``scale_by_clipped_adam``).

Two ways to find ``tau`` (:func:`coordinatewise_threshold`; the default
``method="auto"`` takes ``"bisect"`` when some leaf lives on a multi-device mesh,
sharded or possibly sharded, and ``"exact"`` otherwise: the same ``tau``):

* ``method="exact"`` concatenates the magnitudes of all leaves into one vector
  and sorts it: ``O(N log N)`` time, a float32 copy of the whole tree plus the
  sort's workspace, and, for sharded leaves, a gather of the whole tree onto
  every device.
* ``method="bisect"`` never concatenates: it bisects on the bit pattern of
  ``tau`` (non-negative floats order like their bit patterns read as integers),
  each step counting ``#{i: |g_i| >= t}`` by one fused reduction per leaf,
  summed over leaves. Memory is ``O(1)`` beyond the inputs and time is
  ``bisect_steps`` passes over the tree. On a sharded tree each device counts its
  own blocks of every leaf and a step costs ONE all-reduce of two int32 over the
  whole mesh, however many leaves and mesh axes (the partitioner alone would
  all-reduce once per sharded axis: 66 all-reduces instead of 33 for a tree sharded
  over a ``4 x 2`` mesh); in all, ``bisect_steps + 2`` all-reduces (the maximum
  magnitude and the clipped count) and no other collective. With the default (31 steps for float32,
  63 for float64) the search interval shrinks to a single float and the result
  is EXACTLY the exact mode's ``tau``, bit for bit. With ``s`` fewer steps the
  returned ``tau_s`` is the lower end of the final interval:
  ``tau_s <= tau`` and ``tau_s >= tau * exp(-2^(8 - s))`` for float32 (for
  ``tau`` a normal number; ``s = 16``: 0.4%, ``s = 20``: 2.4e-4, ``s = 24``:
  1.5e-5), so the set of clipped coordinates is a superset of the exact one, the
  extra coordinates having ``tau_s <= |g_i| < tau``; with ``scale = 1`` every
  output is within ``tau - tau_s`` of the exact output.

Ranking is done in float32 (float64 when a leaf is float64); bf16/f16 leaves keep
their dtype. Counts are kept as two int32 halves, so trees beyond ``2^31``
coordinates are counted exactly (one leaf must have fewer than ``2^31``
elements).

Non-finite values: a NaN ranks as ``+inf`` (the largest magnitude) and every
non-finite coordinate passes through unchanged, so a NaN or Inf stays visible to
``optax.apply_if_finite`` and cannot poison ``tau`` into a finite value used for
the other coordinates. A zero gradient gives ``tau = 0`` and zero output. If more
than ``N (1 - k)`` coordinates are exactly zero, ``tau = 0`` and the whole output
is zero: that is the definition, and a reason to keep very sparse leaves (e.g.
embeddings) out of the ranking with ``optax.masked``/``optax.partition``.

References:
  Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
  Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers._checks import (
    check_choice,
    check_int,
    check_interval,
    check_positive,
    check_real_floating,
    concrete_hyperparameter,
    is_static_number,
)

__all__ = ["ClipCoordinatewiseState", "clip_coordinatewise", "coordinatewise_threshold"]

_METHODS = ("auto", "exact", "bisect")
_HALF = 1 << 16  # counts are kept as (high, low) int32 halves in base 2^16


class ClipCoordinatewiseState(NamedTuple):
  """Diagnostics of :func:`clip_coordinatewise` (float32 scalars).

  Attributes:
    threshold: the ``tau`` of the last update (before ``scale``); 0 when disabled.
    clip_fraction: fraction of all coordinates that the last update replaced by
      ``sign(g) tau scale`` (finite coordinates with ``|g| >= tau``).
  """

  threshold: jax.Array
  clip_fraction: jax.Array


def _rank_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  """float32, or float64 when some leaf is float64 (x64 mode)."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def _bit_dtype(dtype: jnp.dtype) -> jnp.dtype:
  return jnp.int64 if dtype == jnp.float64 else jnp.int32


def _rank(n: int, fraction: Any) -> int | jax.Array:
  """``k = floor(n * fraction)`` clamped to ``[0, n - 1]``.

  A Python ``fraction`` gives a Python int (with a relative slack of 2^-50, so
  that ``0.57 * 100`` counts as 57). A traced one gives a float32 scalar holding
  an integer, with a slack of 2^-22 that absorbs float32 rounding of
  ``fraction`` (``float32(0.7) * 10 < 7``); exact for ``n`` up to ~2^22.
  """
  if is_static_number(fraction):
    return min(max(math.floor(n * fraction * (1 + 2**-50)), 0), n - 1)
  p = jnp.float32(n) * jnp.asarray(fraction, jnp.float32)
  return jnp.clip(jnp.floor(p * (1 + 2**-22)), 0, n - 1)


def _split_count(m: int | jax.Array) -> tuple[jax.Array, jax.Array]:
  """A count as (high, low) int32 halves in base 2^16."""
  if isinstance(m, int):
    hi, lo = divmod(m, _HALF)
    return jnp.int32(hi), jnp.int32(lo)
  hi = jnp.floor(m / _HALF)
  return hi.astype(jnp.int32), (m - hi * _HALF).astype(jnp.int32)


def _below(x: jax.Array, t: jax.Array, scale: jax.Array) -> jax.Array:
  """Indicator of ``scale |x| < t`` in ``t.dtype`` (0 for NaN), in ops XLA:CPU fuses.

  XLA:CPU does not fuse compares, selects, clamps or int32 converts into a
  reduction; it materialises them (4 bytes per coordinate). So the indicator is
  built from subtract/multiply/max and an int8 convert, which it does fuse:
  ``d = (t - scale |x|) / tiny`` is ``>= 1`` when ``scale |x| < t`` and ``<= 0``
  otherwise (exact unless both ``t`` and ``scale |x|`` are below ``tiny *
  2^mantissa_bits``: 2^-102 ~ 2e-31 in float32, as XLA:CPU flushes the denormal
  differences there to zero; :func:`_magnitude_scale` keeps the values that matter
  above it); ``1 - max(1 - max(d, 0), 0)`` maps that to {1, 0} and NaN to NaN,
  which the int8 convert maps to 0.
  """
  d = (t - jnp.abs(x.astype(t.dtype)) * scale) * (1 / float(jnp.finfo(t.dtype).tiny))
  return (1 - jnp.maximum(1 - jnp.maximum(d, 0), 0)).astype(jnp.int8).astype(t.dtype)


def _max_magnitude(x: jax.Array, ts: tuple) -> jax.Array:
  """``max |x|`` in ``ts[0].dtype`` (0 for an empty ``x``), NaN as ``+inf``."""
  m = jnp.max(jnp.abs(x.astype(ts[0].dtype)), initial=0)
  return jnp.where(jnp.isnan(m), jnp.inf, m)


def _magnitude_scale(leaves: list[jax.Array], dtype: jnp.dtype,
                     sharded: bool = False) -> jax.Array:
  """A power of two ``s`` in ``[2^-64, 2^126]`` that brings ``max |g|`` to about ``2^64``.

  Multiplying by ``s`` is exact, and on ``s |g|`` :func:`_below` is exact down to
  ``max |g| * 2^-166`` instead of ``2^-102`` (gradients of ~1e-31 and below would
  otherwise be miscounted). ``s = 1`` for a zero or non-finite tree (its NaN/Inf
  already make the update non-finite). ``sharded``: one all-reduce over the mesh
  (:func:`_mesh_reduction`).
  """
  zero = jnp.zeros([], dtype)
  m = _tree_reduce(_max_magnitude, leaves, (zero, zero), "max", sharded)
  _, exponent = jnp.frexp(m)  # m = f 2^exponent, f in [0.5, 1)
  power = jnp.clip(64 - exponent, -64, 126)
  s = jnp.ldexp(jnp.ones([], dtype), power.astype(jnp.int32))
  return jnp.where(jnp.isfinite(m) & (m > 0), s, jnp.ones([], dtype))


def _finite(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Indicator of ``isfinite(x)`` in ``dtype``: ``x - x + 1`` is 1 or NaN; int8 maps NaN to 0."""
  xf = x.astype(dtype)
  return (xf - xf + 1).astype(jnp.int8).astype(dtype)


def _exact_sum(indicator: jax.Array) -> jax.Array:
  """Sum of a 0/1 array as int32: float partial sums over trailing axes that hold at
  most ``2^mantissa_bits`` elements (exact integers), then int32."""
  split = indicator.ndim
  limit = 2 ** (jnp.finfo(indicator.dtype).nmant + 1)
  while split > 0 and math.prod(indicator.shape[split - 1 :]) <= limit:
    split -= 1
  partial = jnp.sum(indicator, axis=tuple(range(split, indicator.ndim)))
  return jnp.sum(partial.astype(jnp.int32), dtype=jnp.int32)


def _spec_axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _add_halves(hi: jax.Array, lo: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Adds an int32 count ``c >= 0`` to a (high, low) base-2^16 pair, unnormalised."""
  return hi + (c >> 16), lo + (c & (_HALF - 1))


def _normalised(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
  return hi + (lo >> 16), lo & (_HALF - 1)


def _reduce_leaves(local: Callable[..., jax.Array], leaves: Any, ts: tuple, op: str,
                   masks: Any = None) -> Any:
  """``local`` over the leaves combined: ``"sum"``: (high, low) halves of the summed int32
  counts (``masks``: a 0/1 multiplier per leaf, or None); ``"max"``: the maximum."""
  if op == "max":
    m = jnp.zeros([], ts[0].dtype)
    for x in leaves:
      m = jnp.maximum(m, local(x, ts))
    return m
  hi = lo = jnp.int32(0)
  for i, x in enumerate(leaves):
    c = local(x, ts)
    hi, lo = _add_halves(hi, lo, c if masks is None else c * masks[i])
  return _normalised(hi, lo)


@functools.cache
def _mesh_reduction(local: Callable[..., jax.Array], ndims: tuple[int, ...], op: str) -> Any:
  """``local(x, ts)`` (a scalar over the coordinates of a leaf ``x``; ``ts`` two scalars)
  reduced over sharded leaves of ranks ``ndims`` with ONE all-reduce over every device of
  the mesh (``op``: ``"sum"`` of counts, as (high, low) int32 halves, or ``"max"``).

  The partitioner left to itself all-reduces a reduction once per sharded axis (two
  all-reduces for a leaf sharded over ``data`` and ``model``), and leaves sharded over
  different axes cannot share them. This op reads the leaves' actual shardings when the
  program is partitioned (``custom_partitioning``; Auto and Explicit mesh axes alike),
  computes ``local`` on each device's blocks and combines the leaves there, then reduces
  two int32 (or one float) over the whole mesh; a block replicated over some mesh axis is
  counted on that axis's index-0 device only. So each search step is one all-reduce of 8
  bytes, whatever the number of leaves and mesh axes. Unpartitioned (one device), it is
  the plain combination.
  """

  @custom_partitioning
  def reduce(t, u, *leaves):
    return _reduce_leaves(local, leaves, (t, u), op)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    specs = []
    for shape, ndim in zip(arg_shapes[2:], ndims, strict=True):
      sharding = shape.sharding
      spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
      specs.append(spec + (None,) * (ndim - len(spec)))

    def lower(t, u, *leaves):
      if op == "max":
        return jax.lax.pmax(_reduce_leaves(local, leaves, (t, u), op), mesh.axis_names)
      masks = []
      for spec in specs:  # a replicated block counts once
        used = {a for e in spec for a in _spec_axes(e)}
        mask = jnp.int32(1)
        for axis in mesh.axis_names:
          if axis not in used:
            mask = mask * (jax.lax.axis_index(axis) == 0).astype(jnp.int32)
        masks.append(mask)
      hi, lo = _reduce_leaves(local, leaves, (t, u), op, masks)
      return _normalised(*jax.lax.psum((hi, lo), mesh.axis_names))

    replicated = NamedSharding(mesh, P())
    result = replicated if op == "max" else (replicated, replicated)
    return mesh, lower, result, (replicated, replicated) + tuple(
        NamedSharding(mesh, P(*spec)) for spec in specs)

  operands = [" ".join(f"l{i}d{j}" for j in range(ndim)) for i, ndim in enumerate(ndims)]
  factors = tuple(f"l{i}d{j}" for i, ndim in enumerate(ndims) for j in range(ndim))
  replicated_result = lambda mesh, arg_shapes, result_shape: (
      NamedSharding(mesh, P()) if op == "max" else (NamedSharding(mesh, P()),) * 2)
  reduce.def_partition(
      partition, infer_sharding_from_operands=replicated_result,
      sharding_rule=f", , {', '.join(operands)} -> " + ("" if op == "max" else ", "),
      reduction_factors=factors)
  return reduce


def _use_mesh_reduction(leaves: list[jax.Array]) -> bool:
  """Whether the counts go through :func:`_mesh_reduction`: some leaf is (or may be)
  sharded over a multi-device mesh and no mesh axis is Manual (inside ``shard_map``
  the blocks are local and the plain reductions are already local)."""
  meshes = [getattr(jax.typeof(x).sharding, "mesh", None) for x in leaves]
  meshes.append(jax.sharding.get_abstract_mesh())
  if any(m is not None and not m.empty and AxisType.Manual in m.axis_types for m in meshes):
    return False
  return _any_sharded(leaves)


def _tree_reduce(local: Callable[..., jax.Array], leaves: list[jax.Array], ts: tuple, op: str,
                 sharded: bool) -> Any:
  """:func:`_reduce_leaves` of all leaves; with ``sharded``, one all-reduce over the mesh
  (:func:`_mesh_reduction`)."""
  if not sharded:
    return _reduce_leaves(local, leaves, ts, op)
  return _mesh_reduction(local, tuple(x.ndim for x in leaves), op)(*ts, *leaves)


def _tree_count(
    leaves: list[jax.Array], ts: tuple, count_leaf: Any, sharded: bool = False
) -> tuple[jax.Array, jax.Array]:
  """``sum(count_leaf(x, ts))`` over leaves (each an int32 below 2^31) as (high, low)
  int32 halves in base 2^16, exact beyond 2^31 coordinates in all. ``sharded``: one
  all-reduce over the whole mesh per call (:func:`_mesh_reduction`)."""
  # The barrier makes the leaves depend on ``ts``: inside the bisection loop XLA
  # then cannot hoist |g| (a copy of the tree) out of the loop, and in an update it
  # cannot share |g| with the clipping pass; either would materialise it.
  leaves, ts = jax.lax.optimization_barrier((leaves, ts))
  return _tree_reduce(count_leaf, leaves, ts, "sum", sharded)


def _at_least_leaf(x: jax.Array, ts: tuple) -> jax.Array:
  return x.size - _exact_sum(_below(x, *ts))


def _clipped_leaf(x: jax.Array, ts: tuple) -> jax.Array:
  return _exact_sum(_finite(x, ts[0].dtype) * (1 - _below(x, *ts)))


def _count_at_least(
    leaves: list[jax.Array], t: jax.Array, scale: jax.Array, sharded: bool = False
) -> tuple[jax.Array, jax.Array]:
  """``#{i: scale |g_i| >= t}``, NaN counting as +inf, one fused pass per leaf."""
  return _tree_count(leaves, (t, scale), _at_least_leaf, sharded)


def _count_clipped(
    leaves: list[jax.Array], t: jax.Array, scale: jax.Array, sharded: bool = False
) -> tuple[jax.Array, jax.Array]:
  """``#{i: g_i finite, |g_i| >= t}`` (counted on ``scale |g|``), one fused pass per leaf."""
  return _tree_count(leaves, (t * scale, scale), _clipped_leaf, sharded)


def _as_float(count: tuple[jax.Array, jax.Array]) -> jax.Array:
  return count[0].astype(jnp.float32) * _HALF + count[1].astype(jnp.float32)


def _flatten(x: jax.Array) -> jax.Array:
  """``x.ravel()``, gathered (replicated) when ``x`` has explicitly sharded axes."""
  sharding = jax.typeof(x).sharding
  if any(s is not None for s in getattr(sharding, "spec", ())):
    return jax.lax.reshape(x, (x.size,), out_sharding=NamedSharding(sharding.mesh, P()))
  return jnp.ravel(x)


def _exact_threshold(leaves: list[jax.Array], k: int | jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Sorts the bit patterns of ``|g|`` (NaN as +inf): non-negative floats order like
  their bit patterns read as integers, and XLA sorts integers several times faster."""
  bits = _bit_dtype(dtype)
  inf_bits = jnp.array(np.array(np.inf, dtype).view(bits))

  def magnitude_bits(x):
    return jnp.minimum(jax.lax.bitcast_convert_type(jnp.abs(_flatten(x).astype(dtype)), bits),
                       inf_bits)

  mags = jnp.sort(jnp.concatenate([magnitude_bits(x) for x in leaves]))
  n = mags.shape[0]
  if isinstance(k, int):
    tau = mags[n - 1 - k]
  else:
    tau = jax.lax.dynamic_index_in_dim(mags, n - 1 - k.astype(jnp.int32), keepdims=False)
  return jax.lax.bitcast_convert_type(tau, dtype)


def _bisect_threshold(
    leaves: list[jax.Array], k: int | jax.Array, dtype: jnp.dtype, steps: int | None
) -> jax.Array:
  """Largest ``t`` with ``#{|g| >= t} >= k + 1``, by bisection on its bit pattern."""
  bits = _bit_dtype(dtype)
  upper = int(np.array(np.inf, dtype).view(bits)) + 1  # one past +inf
  if steps is None:
    steps = math.ceil(math.log2(upper))
  m_hi, m_lo = _split_count(k + 1)
  sharded = _use_mesh_reduction(leaves)  # one all-reduce per step over the whole mesh
  scale = _magnitude_scale(leaves, dtype, sharded)  # the search runs on scale |g| (exactly)

  def body(_, interval):
    lo, hi = interval  # invariant: count(lo) >= k + 1 > count(hi)
    mid = lo + (hi - lo) // 2
    c_hi, c_lo = _count_at_least(leaves, jax.lax.bitcast_convert_type(mid, dtype), scale,
                                 sharded)
    ok = (c_hi > m_hi) | ((c_hi == m_hi) & (c_lo >= m_lo))
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, steps, body, (jnp.zeros([], bits), jnp.array(upper, bits)))
  return jax.lax.bitcast_convert_type(lo, dtype) / scale


def _any_sharded(leaves: list[jax.Array]) -> bool:
  """Whether some leaf lives on a multi-device mesh with a sharded axis (Explicit axes)
  or a possibly sharded one (Auto axes: the type carries the mesh, not the spec).
  Manual axes (inside ``shard_map``) hold local blocks: not sharded."""
  meshes = [getattr(jax.typeof(x).sharding, "mesh", None) for x in leaves]
  meshes.append(jax.sharding.get_abstract_mesh())
  for x, mesh in zip([*leaves, None], meshes, strict=True):
    if mesh is None or mesh.empty:
      continue
    for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True):
      if size == 1 or kind == AxisType.Manual:
        continue
      if kind == AxisType.Auto:
        return True
      spec = () if x is None else tuple(getattr(jax.typeof(x).sharding, "spec", ()) or ())
      if any(name in ((e,) if isinstance(e, str) else tuple(e or ())) for e in spec):
        return True
  return False


def _check_method(method: str, bisect_steps: int | None) -> None:
  check_choice("method", method, _METHODS)
  if bisect_steps is not None:
    check_int("bisect_steps", bisect_steps)


def coordinatewise_threshold(
    updates: optax.Updates,
    fraction: float | jax.Array,
    *,
    method: str = "auto",
    bisect_steps: int | None = None,
) -> jax.Array:
  r"""The global adaptive threshold ``tau`` of :func:`clip_coordinatewise`.

  .. math::
    \tau = |g|_{(\lfloor N k \rfloor)}

  the ``floor(N * fraction)``-th largest magnitude over all ``N`` coordinates of
  ``updates`` (0-indexed, descending; NaN ranks as ``+inf``). See the module
  docstring for the cost and accuracy of the two methods.

  Args:
    updates: a pytree of arrays (``None`` and ``optax.MaskedNode`` leaves are
      ignored).
    fraction: ``k`` in ``[0, 1)``; a Python float or a traced scalar.
    method: ``"exact"`` (concatenate and sort), ``"bisect"`` (per-leaf counts,
      no concatenation) or ``"auto"`` (``"bisect"`` when some leaf is sharded,
      see :func:`clip_coordinatewise`).
    bisect_steps: bisection steps for ``"bisect"``; ``None`` (default) runs
      enough steps (31 in float32) for the exact value.

  Returns:
    ``tau`` as a float32 (float64 for float64 leaves) scalar; 0 for an empty tree.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.clipping import coordinatewise_threshold
    >>> g = {"a": jnp.array([3.0, -1.0]), "b": jnp.array([[0.5, -4.0]])}
    >>> coordinatewise_threshold(g, 0.25), coordinatewise_threshold(g, 0.5, method="bisect")
    (Array(3., dtype=float32), Array(1., dtype=float32))
  """
  _check_method(method, bisect_steps)
  check_interval("fraction", fraction, 0, 1)
  leaves = jax.tree.leaves(updates)
  dtype = _rank_dtype(leaves)
  n = sum(x.size for x in leaves)
  if n == 0:
    return jnp.zeros([], dtype)
  k = _rank(n, fraction)
  if method == "auto":
    method = "bisect" if _any_sharded(leaves) else "exact"
  if method == "exact":
    return _exact_threshold(leaves, k, dtype)
  return _bisect_threshold(leaves, k, dtype, bisect_steps)


def clip_coordinatewise(
    fraction: float | jax.Array | None = None,
    *,
    threshold: float | jax.Array | None = None,
    scale: float | jax.Array = 1.0,
    method: str = "auto",
    bisect_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the largest coordinates of the gradient to a global threshold.

  .. math::
    g_i \leftarrow \mathrm{sign}(g_i)\, \tau\, s \quad \text{if } |g_i| \ge \tau,
    \qquad \tau = |g|_{(\lfloor N k \rfloor)} \ \text{or given}

  with ``|g|_{(j)}`` the ``j``-th largest magnitude over ALL ``N`` coordinates of
  the tree (0-indexed, descending). Exactly one of ``fraction`` (adaptive
  ``tau``, :func:`coordinatewise_threshold`) or ``threshold`` (fixed ``tau``)
  is given. ``fraction = 0`` is the identity. Gradient-like: chain it before an
  optimizer. Non-finite coordinates pass through unchanged (NaN ranks as the
  largest magnitude), zero gradients give zeros, bf16 leaves keep their dtype
  (ranking in float32). See the module docstring for ``"exact"`` vs
  ``"bisect"`` (same ``tau`` bit for bit with the default ``bisect_steps``).

  Args:
    fraction: fraction ``k`` of coordinates to clip, in ``[0, 1)``.
    threshold: a fixed ``tau > 0`` instead of the adaptive one (``inf``: nothing
      is clipped).
    scale: clipped coordinates become ``sign(g) * tau * scale``; finite, ``> 0``.
    method: how the adaptive ``tau`` is found: ``"exact"`` (concatenate and sort,
      ``O(N log N)`` and a copy of the tree), ``"bisect"`` (per-leaf
      reductions, no concatenation; for large or sharded trees) or ``"auto"``
      (default): ``"bisect"`` when some leaf lives on a multi-device mesh and is
      sharded (``Explicit`` axes, read from its type) or may be (``Auto`` axes,
      whose types carry no spec), so a sharded tree is never gathered;
      ``"exact"`` otherwise. Both give the same ``tau``.
    bisect_steps: bisection steps (``None``: enough for the exact ``tau``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ClipCoordinatewiseState` (the threshold and the clipped fraction).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from optimizers import clip_coordinatewise
    >>> g = {"a": jnp.array([3.0, -1.0]), "b": jnp.array([[0.5, -4.0]])}
    >>> tx = clip_coordinatewise(0.25)  # tau = 2nd largest |g| = 3
    >>> updates, state = tx.update(g, tx.init(g))
    >>> updates["b"], state.clip_fraction
    (Array([[ 0.5, -3. ]], dtype=float32), Array(0.5, dtype=float32))

  References:
    Pan & Li, `Toward Understanding Why Adam Converges Faster Than SGD for
    Transformers <https://arxiv.org/abs/2306.00204>`_, 2023.
  """
  if (fraction is None) == (threshold is None):
    raise ValueError(
        "clip_coordinatewise needs exactly one of fraction or threshold, got "
        f"fraction={fraction!r}, threshold={threshold!r}."
    )
  check_interval("fraction", fraction, 0, 1)
  value = concrete_hyperparameter(threshold, "threshold")
  if value is not None and not np.all(value > 0):
    raise ValueError(f"threshold must be > 0, got threshold={threshold}.")
  check_positive("scale", scale)
  _check_method(method, bisect_steps)

  def init_fn(params: optax.Params) -> ClipCoordinatewiseState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return ClipCoordinatewiseState(threshold=zero, clip_fraction=zero)

  def update_fn(
      updates: optax.Updates,
      state: ClipCoordinatewiseState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, ClipCoordinatewiseState]:
    del params, extra_args
    check_real_floating(updates, owner="clip_coordinatewise")
    leaves = jax.tree.leaves(updates)
    n = sum(x.size for x in leaves)
    if n == 0 or (fraction is not None and is_static_number(fraction) and fraction == 0):
      return updates, init_fn(None)
    dtype = _rank_dtype(leaves)
    if threshold is not None:
      tau = jnp.asarray(threshold).astype(dtype)
      enabled = None
    else:
      tau = coordinatewise_threshold(
          updates, fraction, method=method, bisect_steps=bisect_steps
      ).astype(dtype)
      enabled = None if is_static_number(fraction) else jnp.asarray(fraction) > 0
    clipped_value = tau * jnp.asarray(scale).astype(dtype)

    def clip(x):
      xf = x.astype(dtype)
      hit = jnp.isfinite(xf) & (jnp.abs(xf) >= tau)
      if enabled is not None:
        hit &= enabled
      return jnp.where(hit, jnp.sign(xf) * clipped_value, xf).astype(x.dtype)

    new_updates = jax.tree.map(clip, updates)
    sharded = _use_mesh_reduction(leaves)
    num_clipped = _as_float(_count_clipped(leaves, tau, _magnitude_scale(leaves, dtype, sharded),
                                           sharded))
    clip_fraction = num_clipped / n
    if enabled is not None:
      tau, clip_fraction = jnp.where(enabled, tau, 0), jnp.where(enabled, clip_fraction, 0)
    return new_updates, ClipCoordinatewiseState(
        threshold=tau.astype(jnp.float32), clip_fraction=clip_fraction.astype(jnp.float32)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
