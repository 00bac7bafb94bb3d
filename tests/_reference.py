"""Shared test helpers: float64 NumPy references, problem builders, a compile counter.

Every test file imports from here instead of keeping its own copy. Everything is
computed the slow, obvious way in float64 NumPy (or builds a tiny problem), so a
test compares the library against something it does not share code with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np


def rng_of(seed: int | np.random.Generator) -> np.random.Generator:
  """A NumPy generator from a seed (or the generator itself)."""
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Float64 references.
# ---------------------------------------------------------------------------


def f64(x: Any) -> Any:
  """``x`` (an array or a tree) as float64 NumPy arrays."""
  return jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.float32) if getattr(
      a, "dtype", None) == jnp.bfloat16 else a, np.float64), x)


def rel_err(a: Any, b: Any) -> float:
  """``||a - b|| / ||b||`` in float64 (Frobenius over all elements; 0/0 reads as 0)."""
  a, b = np.asarray(f64(a)), np.asarray(f64(b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def singular_values(x: Any) -> np.ndarray:
  """Singular values (descending) over the last two axes, in float64."""
  return np.linalg.svd(np.asarray(f64(x)), compute_uv=False)


def with_spectrum(rng: np.random.Generator, m: int, n: int, s: Any,
                  batch: tuple[int, ...] = ()) -> np.ndarray:
  """Random ``U diag(s) V^T`` of shape ``batch + (m, n)`` (float64), ``U``, ``V`` Haar-like."""
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal(batch + (m, k)))
  v, _ = np.linalg.qr(rng.standard_normal(batch + (n, k)))
  return (u * np.asarray(s)) @ np.swapaxes(v, -1, -2)


def tree_dot(x: Any, y: Any) -> float:
  """``<x, y>`` over two trees, in float64."""
  return float(sum(np.sum(a * b) for a, b in zip(
      jax.tree.leaves(f64(x)), jax.tree.leaves(f64(y)), strict=True)))


# ---------------------------------------------------------------------------
# Problem builders.
# ---------------------------------------------------------------------------


def random_tree(seed: int | np.random.Generator, shapes: dict[str, tuple[int, ...]],
                dtype: Any = jnp.float32, *, scale: float = 1.0,
                bounded_below: bool = False) -> dict[str, jax.Array]:
  """``{name: scale * N(0, 1)}`` leaves of the given shapes, drawn in order in float64,
  rounded to float32, then cast to ``dtype``. With ``bounded_below`` the magnitudes
  are in ``[0.5, ~5]`` (so that scaling by 1e-30 stays clear of float32 denormals)."""
  rng = rng_of(seed)
  out = {}
  for name, shape in shapes.items():
    x = rng.standard_normal(shape)
    if bounded_below:
      x = np.sign(x) * (0.5 + np.abs(x))
    out[name] = jnp.asarray(scale * x, jnp.float32).astype(dtype)
  return out


def mlp_problem(seed: int, sizes: Sequence[int] = (3, 6, 2), batch: int = 8,
                dtype: Any = jnp.float32, bias: bool = True
                ) -> tuple[dict[str, jax.Array], tuple[jax.Array, jax.Array],
                           Callable[..., jax.Array]]:
  """A tiny tanh MLP regression problem: ``(params, (x, y), loss)``.

  ``params`` has ``w{i}`` (``sizes[i-1] x sizes[i]``, scaled by ``1/sqrt(fan_in)``)
  and, with ``bias``, ``b{i}`` for every layer; ``loss(params, x, y)`` is the mean
  squared error of ``tanh`` hidden layers and a linear output.
  """
  rng = rng_of(seed)
  params = {}
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
    params[f"w{i}"] = jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), dtype)
    if bias:
      params[f"b{i}"] = jnp.asarray(0.1 * rng.standard_normal(n), dtype)
  x = jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype)
  y = jnp.asarray(rng.standard_normal((batch, sizes[-1])), dtype)
  layers = len(sizes) - 1

  def loss(p: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for i in range(1, layers + 1):
      h = h @ p[f"w{i}"] + (p[f"b{i}"] if bias else 0)
      if i < layers:
        h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)

  return params, (x, y), loss


# ---------------------------------------------------------------------------
# Training checks.
# ---------------------------------------------------------------------------


def assert_descends(losses: Sequence[float], min_drop: float = 0.0, what: str = "loss") -> None:
  """The loss goes down: the mean of the last quarter is below the first value by more
  than ``min_drop`` (relative), and every value is finite."""
  losses = np.asarray(losses, np.float64)
  assert np.all(np.isfinite(losses)), f"{what} not finite: {losses}"
  tail = losses[-max(1, len(losses) // 4):].mean()
  assert tail < losses[0] * (1 - min_drop), f"{what} did not go down: {losses}"


# ---------------------------------------------------------------------------
# Compilation counter (public jax.monitoring events; no private jit attributes).
# ---------------------------------------------------------------------------

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class Lowerings:
  """Names of the programs JAX lowered (one per jit cache miss) while active."""

  def __init__(self) -> None:
    self.names: list[str] = []

  def count(self, fun_name: str | None = None) -> int:
    """Programs lowered, all or only those of the function named ``fun_name``."""
    if fun_name is None:
      return len(self.names)
    return sum(1 for n in self.names if n in (fun_name, f"jit({fun_name})"))


@contextlib.contextmanager
def count_lowerings() -> Iterator[Lowerings]:
  """Records every program JAX lowers in the block (a persistent-cache hit is still
  lowered first, so this counts jit cache misses, i.e. (re)compilations)."""
  seen = Lowerings()

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    del duration
    if event == _LOWERING_EVENT:
      seen.names.append(str(kwargs.get("fun_name", "")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
