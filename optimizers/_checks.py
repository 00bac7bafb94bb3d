"""Argument validation shared by every transformation (Python-level, trace-time).

One family, one message style: ``check_*`` raises ``ValueError`` (``TypeError``
for a value of the wrong kind) whose message names the argument,
``"<name> must be <rule>, got <name>=<value>."``.

"Concrete" has one meaning here: a value known when the transformation is
built (a Python number or a concrete array; ``optax.inject_hyperparams`` builds
transformations with concrete arrays), as opposed to a traced value or a
schedule, which can only be checked once traced (:func:`concrete_hyperparameter`).
A *static number* is the narrower case of a Python (or NumPy) real scalar, on
which code may branch in Python (:func:`is_static_number`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "check_bool",
    "check_choice",
    "check_floating_dtype",
    "check_int",
    "check_interval",
    "check_nonnegative",
    "check_period",
    "check_positive",
    "check_real_floating",
    "check_tree_match",
    "concrete_hyperparameter",
    "is_masked_node",
    "is_static_number",
    "leaf_spec",
    "reject_masked_nodes",
]


def _fail(name: str, rule: str, value: Any) -> ValueError:
  return ValueError(f"{name} must be {rule}, got {name}={value!r}.")


def is_static_number(x: Any) -> bool:
  """Whether ``x`` is a Python or NumPy real scalar (not a bool): a value code may
  branch on in Python (an array, even a concrete one, is not)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def concrete_hyperparameter(value: Any, name: str) -> np.ndarray | None:
  """A hyperparameter's value as a float64 NumPy array when it is known at construction.

  Python numbers and concrete arrays are returned for validation; ``None`` (unset),
  traced values and schedules (callables) give ``None``, as they cannot be checked
  before tracing. A string or other non-numeric value raises ``TypeError`` naming
  ``name``.
  """
  if value is None or callable(value):
    return None
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be a number or a numeric array, got {name}={value!r}.")
  try:
    return np.asarray(value, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None  # traced: checked by nobody (there is nothing to check before tracing)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number or a numeric array, got {name}={value!r}.") from e


def check_positive(name: str, value: Any) -> None:
  """``value`` finite and ``> 0`` where concrete."""
  v = concrete_hyperparameter(value, name)
  if v is not None and not np.all((v > 0) & np.isfinite(v)):
    raise _fail(name, "finite and > 0", value)


def check_nonnegative(name: str, value: Any) -> None:
  """``value`` finite and ``>= 0`` where concrete."""
  v = concrete_hyperparameter(value, name)
  if v is not None and not np.all((v >= 0) & np.isfinite(v)):
    raise _fail(name, "finite and >= 0", value)


def check_interval(name: str, value: Any, low: float, high: float, *,
                   include_high: bool = False) -> None:
  """``low <= value < high`` (``<= high`` with ``include_high``) where concrete."""
  v = concrete_hyperparameter(value, name)
  if v is None:
    return
  below_high = v <= high if include_high else v < high
  if not np.all((low <= v) & below_high):
    raise _fail(name, f"in [{low}, {high}{']' if include_high else ')'}", value)


def check_int(name: str, value: Any, minimum: int = 1) -> None:
  """``value`` a Python int (not a bool) ``>= minimum``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise _fail(name, f"a Python int >= {minimum}", value)


def check_bool(name: str, value: Any) -> None:
  """``value`` a Python bool (a static switch; not a traced value)."""
  if not isinstance(value, bool):
    raise _fail(name, "a bool", value)


def check_period(name: str, value: Any) -> None:
  """A period: a Python int ``>= 1`` or an integer array (``optax.inject_hyperparams``)."""
  array = isinstance(value, (jax.Array, jax.ShapeDtypeStruct))
  if array and jnp.issubdtype(value.dtype, jnp.integer):
    return
  check_int(name, value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """``value`` one of ``choices``."""
  if value not in choices:
    raise _fail(name, f"one of {tuple(choices)}", value)


def check_floating_dtype(name: str, dtype: Any) -> Any:
  """The canonical floating dtype of ``dtype`` (``None`` stays ``None``), else ValueError."""
  if dtype is None:
    return None
  try:
    canonical = jnp.dtype(dtype)
  except TypeError:
    canonical = None
  if canonical is None or not jnp.issubdtype(canonical, jnp.floating):
    raise _fail(name, "a floating dtype or None", dtype)
  return canonical


# ---------------------------------------------------------------------------
# Trees.
# ---------------------------------------------------------------------------


def leaf_spec(x: Any) -> str:
  """``dtype[shape]`` of an array or scalar, e.g. ``float32[3, 5]`` (for error messages)."""
  return f"{jnp.result_type(x).name}{list(jnp.shape(x))}"


def is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_real_floating(tree: Any, *, owner: str, name: str = "updates") -> None:
  """Raises ``TypeError`` unless every leaf of ``tree`` has a real floating dtype.

  The transformations are real-valued: after float32 math an integer leaf would
  be silently truncated and a complex one would lose its imaginary coupling
  (inner products without conjugation). ``None`` and ``optax.MaskedNode``
  leaves are skipped, so the usual remedy, keeping such leaves out with
  ``optax.masked`` or ``optax.partition``, works.

  Args:
    tree: the updates or params.
    owner: the transformation's name, for the message.
    name: what ``tree`` is, for the message.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: {name}{jax.tree_util.keystr(path)} has dtype {dtype.name}; only real "
          "floating-point leaves (float16, bfloat16, float32, float64) are supported. Keep "
          "integer or complex leaves out with optax.masked or optax.partition."
      )


def check_tree_match(
    reference: Any, other: Any, *, owner: str, name: str, reference_name: str = "updates",
    dtypes: bool = False,
) -> None:
  """Raises ``ValueError`` unless ``other`` has ``reference``'s tree and leaf shapes
  (and dtypes, with ``dtypes=True``); the message names the first mismatching leaf."""
  expected, got = jax.tree.structure(reference), jax.tree.structure(other)
  if expected != got:
    raise ValueError(
        f"{owner}: {name} must have the same tree structure as the {reference_name}; "
        f"got {name} {got}, {reference_name} {expected}."
    )
  paths = jax.tree_util.tree_flatten_with_path(reference)[0]
  for (path, r), o in zip(paths, jax.tree.leaves(other), strict=True):
    if jnp.shape(r) != jnp.shape(o) or (dtypes and jnp.result_type(r) != jnp.result_type(o)):
      what = "tree, shapes and dtypes" if dtypes else "tree and shapes"
      raise ValueError(
          f"{owner}: {name}{jax.tree_util.keystr(path)} is {leaf_spec(o)} but the "
          f"{reference_name}' leaf is {leaf_spec(r)}; {name} must match the {reference_name} "
          f"in {what}."
      )


def reject_masked_nodes(tree: Any, *, owner: str, reason: str) -> None:
  """Raises ``ValueError`` if ``tree`` holds ``optax.MaskedNode`` leaves, i.e. the
  transformation runs inside ``optax.masked``/``optax.partition`` although it needs
  the whole tree (``reason`` says why)."""
  if any(map(is_masked_node, jax.tree.leaves(tree, is_leaf=is_masked_node))):
    raise ValueError(
        f"{owner} cannot run inside optax.masked or optax.partition: {reason} Apply the "
        "mask to the transformation chained after it instead."
    )
