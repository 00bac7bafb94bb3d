"""LAPACK-backed decompositions on stacks of matrices, safe on multi-device CPU programs.

On the CPU backend, jaxlib's LAPACK kernels (SVD, eigh, QR, ...) split a *batch* of
matrices into chunks, schedule the chunks on XLA's intra-op thread pool and block the
calling thread until they are done. In a program over several CPU devices (one process,
``--xla_force_host_platform_device_count``) every device's program also runs on that
pool. When every device reaches the batched decomposition at the same time, which the
collectives before it make likely, each pool thread is one device's caller blocked on
chunks that no free thread can run: the step never finishes. This is what hung the first
step of Online Subspace Descent's SVD start in the scanned (stacked-layer) pretraining
script on a 4 x 2 mesh of 8 CPU devices (``gdb``: all 8 pool threads waiting inside the
SVD kernel's batch map). A single matrix is always computed inline on the calling
thread, so :func:`per_matrix` calls the decomposition one matrix at a time on CPU (a
``lax.map`` over the leading axes; the same LAPACK routine on the same matrix, hence the
same values) and keeps the batched call on other platforms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from optimizers._sharding import explicit_mesh, reshard, spec_of

__all__ = ["per_matrix"]


def per_matrix(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn(x)`` for a decomposition ``fn`` of ``(..., m, n)`` stacks, one matrix per call on CPU.

  Args:
    fn: maps a stack ``(..., m, n)`` to a pytree of arrays whose leading axes are the
      stack's (e.g. ``lambda a: jnp.linalg.svd(a, full_matrices=False)``).
    x: array of shape ``(..., m, n)``. Under Explicit mesh axes it is replicated first on
      CPU (the loop indexes its leading axes); under Auto axes XLA chooses.

  Returns:
    ``fn(x)``: on CPU from a ``lax.map`` over each leading axis (one LAPACK call per
    matrix, run inline); elsewhere from the batched call.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optimizers._lapack import per_matrix
    >>> x = jnp.arange(24.0).reshape(2, 3, 4)
    >>> s = per_matrix(lambda a: jnp.linalg.svd(a, compute_uv=False), x)
    >>> s.shape, bool(jnp.allclose(s, jnp.linalg.svd(x, compute_uv=False)))
    ((2, 3), True)
  """
  if x.ndim <= 2:
    return fn(x)

  def loop(b):
    return fn(b) if b.ndim == 2 else jax.lax.map(loop, b)

  def one_at_a_time(a):
    mesh = explicit_mesh(a)
    if mesh is None:
      return loop(a)
    out = loop(reshard(a, (None,) * a.ndim, mesh))
    # the batched call's output shardings, so that both platform branches type alike
    return jax.tree.map(lambda o, t: reshard(o, spec_of(t), mesh), out, jax.eval_shape(fn, a))

  return jax.lax.platform_dependent(x, cpu=one_at_a_time, default=fn)
