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
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    "MatrixRule",
    "MatrixRules",
    "MatrixView",
    "MATRIX_PRESETS",
    "LAST_TWO_AXES",
    "matrix_rules",
    "describe_matrix_dims",
    "key_path_str",
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
      last two axes, else ``None``); a preset name (``"flax_nnx"``,
      ``"flax_linen"``, ``"maxtext_scanned"``, ``"transformer"``, see
      :func:`matrix_rules`); a single ``MatrixDims`` applied to every
      leaf with ndim >= 2; a pytree matching ``tree`` whose leaves are
      ``MatrixDims`` or ``None`` (leave that leaf alone); or a callable
      ``tree -> such a pytree``.
    tree: the params or updates (only shapes are read).

  Returns:
    A pytree with ``tree``'s structure, ``MatrixDims`` or ``None`` per leaf.
  """
  spec = weight_dimension_numbers
  if isinstance(spec, str):
    spec = MatrixRules(_preset_rules(spec, "weight_dimension_numbers"), LAST_TWO_AXES,
                       "weight_dimension_numbers")
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
# Matrix views chosen by parameter path: regex rules and presets.
# ---------------------------------------------------------------------------

# Unmatched leaves get the library's default view: ndim >= 2 -> last two axes.
LAST_TWO_AXES = "last_two_axes"

_C = r"(?:^|/)"  # start of a path component
_E = r"(?:/|$)"  # end of a path component


class MatrixRule(NamedTuple):
  """One rule of :func:`matrix_rules`: leaves whose ``/``-joined key path matches
  ``pattern`` (``re.search``) and that have at least ``min_ndim`` axes get ``dims``
  (``None``: not a matrix, leave it alone). A 2-tuple ``(pattern, dims)`` is a rule
  with ``min_ndim=0``."""

  pattern: str
  dims: Any
  min_ndim: int = 0


# flax nnx and linen share the layouts: Linear/Dense kernels are (in, out); the
# attention projections (nnx.MultiHeadAttention and nn.MultiHeadDotProductAttention,
# both built from LinearGeneral/DenseGeneral) are (in, heads, head_dim) for
# query/key/value and (heads, head_dim, out) for out; Embed tables are
# (num_embeddings, features) (a lookup is one_hot(ids) @ table). Negative axes keep
# the views right under stacked (vmapped / scanned) leading layer axes.
_FLAX_RULES = (
    MatrixRule(rf"{_C}(query|key|value)/kernel$", MatrixDims(-3, (-2, -1)), 3),
    MatrixRule(rf"{_C}out/kernel$", MatrixDims((-3, -2), -1), 3),
    MatrixRule(rf"{_C}kernel$", MatrixDims(-2, -1), 2),
    MatrixRule(rf"{_C}embedding$", MatrixDims(-2, -1), 2),
    MatrixRule(rf"{_C}(bias|scale)$", None),
)

# MaxText's scanned decoder (param_scan_axis=1): the layer axis sits second,
# query/key/value (embed, layers, heads, head_dim), out (heads, layers, head_dim,
# embed), MLP wi/wi_0/wi_1 (embed, layers, mlp) and wo (mlp, layers, embed); norm
# scales (embed, layers) are stacks of vectors.
_MAXTEXT_RULES = (
    MatrixRule(rf"{_C}(query|key|value)/kernel$", MatrixDims(0, (2, 3)), 4),
    MatrixRule(rf"{_C}out/kernel$", MatrixDims((0, 2), 3), 4),
    MatrixRule(rf"{_C}kernel$", MatrixDims(0, -1), 3),
    MatrixRule(rf"{_C}kernel$", MatrixDims(0, 1), 2),
    MatrixRule(rf"{_C}embedding$", MatrixDims(0, 1), 2),
    MatrixRule(rf"{_C}(bias|scale)$", None),
)

# What GaLore-style methods leave full rank: token and position embeddings, the
# LM head, biases and normalisation parameters (any path component containing
# "embed" or "norm", ln*, wte/wpe, pos*/position*, head/lm_head/logits_dense).
_TRANSFORMER_EXCLUDE = (
    MatrixRule(rf"(?i){_C}[^/]*embed[^/]*{_E}", None),
    MatrixRule(rf"(?i){_C}(wte|wpe|pos|pos_[^/]*|position[^/]*){_E}", None),
    MatrixRule(rf"(?i){_C}(head|lm_head|logits_dense|output_head){_E}", None),
    MatrixRule(rf"(?i){_C}(ln[^/]*|[^/]*norm[^/]*){_E}", None),
    MatrixRule(rf"{_C}(bias|scale)$", None),
)

MATRIX_PRESETS: dict[str, tuple[MatrixRule, ...]] = {
    "flax_nnx": _FLAX_RULES,
    "flax_linen": _FLAX_RULES,
    "maxtext_scanned": _MAXTEXT_RULES,
    "transformer": _TRANSFORMER_EXCLUDE + _FLAX_RULES,
}


def key_path_str(path: Sequence[Any]) -> str:
  """A pytree key path as ``/``-joined names: ``blocks/0/attn/query/kernel``.

  Dict keys and sequence indices give one component each; the ``value`` field of
  boxes (flax ``nn.Partitioned``/``nn.LogicallyPartitioned``, nnx variables) is
  dropped, so a boxed tree has the same paths as the plain one.
  """
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


class MatrixView(NamedTuple):
  """One row of :func:`describe_matrix_dims`."""

  path: str
  shape: tuple[int, ...]
  dims: MatrixDims | None
  matrix: tuple[tuple[int, ...], int, int] | None  # (batch_shape, m, n)
  rule: str  # the matching rule's pattern, "default", or "given" (not a rule set)


class MatrixRules:
  """Matrix views chosen by regex rules on parameter paths (see :func:`matrix_rules`).

  Callable on a params tree (``tree -> tree of MatrixDims/None``), so it is a
  valid ``weight_dimension_numbers`` for every matrix transform (and, through
  :meth:`galore`, for ``optax.contrib.galore``).
  """

  def __init__(self, rules: Sequence[Any], default: Any, argname: str):
    self.argname = argname
    self.rules = tuple(self._rule(r) for r in rules)
    if not (default is None or default == LAST_TWO_AXES or _is_dims(default)):
      raise ValueError(
          f"{argname}: default must be None, {LAST_TWO_AXES!r} or a MatrixDims, got {default!r}")
    self.default = as_matrix_dims(default) if _is_dims(default) else default

  def _rule(self, rule: Any) -> MatrixRule:
    name = self.argname
    if isinstance(rule, MatrixRule):
      parts = tuple(rule)
    elif isinstance(rule, (tuple, list)) and len(rule) in (2, 3) and isinstance(rule[0], str):
      parts = tuple(rule)
    else:
      raise ValueError(f"{name}: each rule must be a (pattern, MatrixDims or None) pair, got "
                       f"{rule!r}")
    pattern, dims, min_ndim = (parts + (0,))[:3]
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{name}: rule pattern {pattern!r} is not a valid regex: {e}") from e
    if dims is not None and not _is_dims(dims):
      raise ValueError(f"{name}: rule {pattern!r} must map to a MatrixDims or None, got {dims!r}")
    return MatrixRule(pattern, None if dims is None else as_matrix_dims(dims), int(min_ndim))

  def _match(self, path: str, shape: tuple[int, ...]) -> tuple[MatrixDims | None, str]:
    ndim = len(shape)
    for rule in self.rules:
      if ndim >= rule.min_ndim and re.search(rule.pattern, path):
        dims, label = rule.dims, rule.pattern
        break
    else:
      if self.default is None or ndim < 2:
        return None, "default"
      return (MatrixDims(-2, -1) if self.default == LAST_TWO_AXES else self.default), "default"
    if dims is not None:
      if ndim < 2:
        raise ValueError(
            f"{self.argname}: rule {label!r} matches the {ndim}-D leaf '{path}' (shape "
            f"{list(shape)}); a matrix view needs at least 2 axes. Map it to None with an "
            "earlier rule or narrow the pattern.")
      try:
        _layout(shape, dims)
      except ValueError as e:
        raise ValueError(f"{self.argname}: rule {label!r} does not fit the leaf '{path}' "
                         f"(shape {list(shape)}): {e}") from e
    return dims, label

  def views(self, tree: Any) -> list[tuple[str, tuple[int, ...], MatrixDims | None, str]]:
    """``(path, shape, dims, matching rule)`` of every leaf, in leaf order."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      p, shape = key_path_str(path), tuple(jnp.shape(leaf))
      out.append((p, shape, *self._match(p, shape)))
    return out

  def __call__(self, tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    dims = [d for _, _, d, _ in self.views(tree)]
    del leaves
    return treedef.unflatten(dims)

  def galore(self, tree: Any) -> Any:
    """The same views as ``optax.contrib.GaLoreDimensionNumbers`` (optax's GaLore
    recognises only its own type), restricted to views without batch axes (optax's
    GaLore has none: stacked layers stay full rank there)."""
    def convert(x: Any, d: Any) -> Any:
      if d is None or matrix_shape(jnp.shape(x), d)[0]:
        return None
      return GaLoreDimensionNumbers(d.reduction_axis, d.output_axis)

    return jax.tree.map(convert, tree, self(tree))

  def __repr__(self) -> str:
    return f"MatrixRules({len(self.rules)} rules, default={self.default!r})"


def matrix_rules(
    rules: Sequence[Any] = (),
    *,
    preset: str | None = None,
    default: Any = LAST_TWO_AXES,
) -> MatrixRules:
  r"""Matrix views chosen by regex rules on the parameters' key paths.

  Each leaf's key path is joined with ``/`` (``blocks/0/attn/query/kernel``; the
  ``value`` field of flax boxes is dropped). The first rule whose pattern
  ``re.search``-es the path (and whose ``min_ndim`` the leaf meets) gives the leaf's
  view: a ``MatrixDims`` (axes may be negative or tuples) or ``None`` (not a
  matrix). ``rules`` are tried before the preset's, so they override it. Leaves no
  rule matches get ``default``.

  Presets (also accepted by name as ``weight_dimension_numbers`` by every matrix
  transform):

  * ``"flax_nnx"`` / ``"flax_linen"``: ``Linear``/``Dense`` kernels ``(in, out)``;
    ``MultiHeadAttention``'s ``LinearGeneral``/``DenseGeneral`` projections
    ``query|key|value/kernel`` ``(in, heads, head_dim)`` as ``in x (heads*head_dim)``
    and ``out/kernel`` ``(heads, head_dim, out)`` as ``(heads*head_dim) x out``;
    ``Embed`` tables ``(num_embeddings, features)``; biases and scales ``None``.
    Stacked leading axes (scanned or vmapped layers) are batch axes. A
    ``LinearGeneral`` with several input or output axes needs a rule of its own.
  * ``"maxtext_scanned"``: MaxText's scanned decoder, layer axis second:
    ``query|key|value`` ``(embed, layers, heads, head_dim)``, ``out`` ``(heads,
    layers, head_dim, embed)``, MLP ``(embed, layers, mlp)``/``(mlp, layers,
    embed)``; norm scales ``(embed, layers)`` ``None``.
  * ``"transformer"``: what GaLore and Online Subspace Descent project, attention
    and MLP linears only: token and position embeddings (a path component
    containing ``embed``, ``wte``, ``wpe``, ``pos*``, ``position*``), the LM head
    (``head``, ``lm_head``, ``logits_dense``), biases and normalisation parameters
    (``bias``, ``scale``, ``ln*``, components containing ``norm``) are ``None``;
    the rest as ``"flax_nnx"``.

  Args:
    rules: ``(pattern, dims)`` pairs or :class:`MatrixRule`\ s (with ``min_ndim``).
    preset: a preset name (its rules follow ``rules``).
    default: the view of unmatched leaves: ``"last_two_axes"`` (the library
      default: ``ndim >= 2`` leaves over their last two axes, others ``None``),
      ``None`` (leave them alone) or a ``MatrixDims`` (for ``ndim >= 2`` leaves).

  Returns:
    A :class:`MatrixRules`: ``rules(params)`` is the tree of ``MatrixDims``/``None``
    any matrix transform takes as ``weight_dimension_numbers``.

  Raises:
    ValueError: naming the argument for an unknown preset, a bad pattern or
      value, and naming the leaf path when a rule gives a matrix view to a 1-D
      leaf or axes the leaf does not have.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.matrices import matrix_rules
    >>> params = {"embed": jnp.zeros((256, 8)), "mlp": {"kernel": jnp.zeros((8, 32)),
    ...           "bias": jnp.zeros(32)}, "head": {"kernel": jnp.zeros((8, 256))}}
    >>> matrix_rules(preset="transformer")(params)["mlp"]
    {'bias': None, 'kernel': MatrixDims(reduction_axis=-2, output_axis=-1)}
    >>> matrix_rules([(r"^embed$", None)], default=None)(params)["head"]
    {'kernel': None}
  """
  extra: tuple[MatrixRule, ...] = ()
  if preset is not None:
    extra = _preset_rules(preset, "preset")
  return MatrixRules(tuple(rules) + extra, default, "matrix_rules")


def _preset_rules(name: Any, argname: str) -> tuple[MatrixRule, ...]:
  if not isinstance(name, str) or name not in MATRIX_PRESETS:
    raise ValueError(f"{argname}: unknown matrix preset {name!r}; known presets: "
                     f"{sorted(MATRIX_PRESETS)}")
  return MATRIX_PRESETS[name]


def describe_matrix_dims(
    weight_dimension_numbers: WeightDimensionNumbers,
    params: Any,
    *,
    print_fn: Callable[[str], Any] | None = None,
) -> list[MatrixView]:
  """Which leaves get which matrix view: one :class:`MatrixView` per leaf.

  Args:
    weight_dimension_numbers: anything a matrix transform accepts (a preset name,
      :func:`matrix_rules`, ``None``, a ``MatrixDims``, a tree or a callable).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``; boxes allowed).
    print_fn: if given (e.g. ``print``), called with a table of path, shape,
      view ``batch x m x n`` (``-`` for leaves left alone) and the matching rule.

  Returns:
    The rows, in leaf order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers.matrices import describe_matrix_dims
    >>> rows = describe_matrix_dims("transformer", {"embed": jnp.zeros((9, 4)),
    ...                                             "up": {"kernel": jnp.zeros((4, 8))}})
    >>> [(r.path, r.matrix) for r in rows]
    [('embed', None), ('up/kernel', ((), 4, 8))]
  """
  spec = weight_dimension_numbers
  if isinstance(spec, str):
    spec = MatrixRules(_preset_rules(spec, "weight_dimension_numbers"), LAST_TWO_AXES,
                       "weight_dimension_numbers")
  if isinstance(spec, MatrixRules):
    matched = spec.views(params)
  else:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    dims = dims_leaves(resolve_matrix_dims(spec, params), params)
    matched = [(key_path_str(p), tuple(jnp.shape(x)), d, "given")
               for (p, x), d in zip(flat, dims, strict=True)]
  rows = [MatrixView(p, s, d, None if d is None else matrix_shape(s, d), r)
          for p, s, d, r in matched]
  if print_fn is not None:
    def view(r: MatrixView) -> str:
      if r.matrix is None:
        return "-"
      batch, m, n = r.matrix
      return " x ".join(str(v) for v in (*batch, m, n)) + (f"  (batch {list(batch)})"
                                                            if batch else "")
    table = [("path", "shape", "matrix view", "rule")] + [
        (r.path, str(list(r.shape)), view(r), r.rule) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    print_fn("\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in table))
  return rows
