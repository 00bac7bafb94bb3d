"""Spectral clipping: Newton–Schulz soft/hard clip vs an SVD-based clip, and kernel FLOP/s.

For each shape (full: 1024x1024, 1024x4096, 4096x4096; ``--quick``: 64x64, 64x256)
measures in one run, round-robin (the machine is shared and noisy; medians):

* the time of :func:`optimizers.soft_spectral_clip` and
  :func:`optimizers.hard_spectral_clip` (float32, default iteration counts)
  against the anchor, an SVD-based clip ``U h(S) V^T`` with
  ``jnp.linalg.svd`` (jitted, ``full_matrices=False``; the timed anchor
  computes the soft map, the hard one differs by an elementwise ``min``);
* the relative Frobenius error of each clip against the SVD clip;
* the achieved FLOP/s of the Newton–Schulz kernels, counting only their matrix
  products (:func:`optimizers.linalg.spectral_clip_matmuls`), against a float32
  ``k x k x k`` matmul timed in the same rounds, ``k = min(m, n)`` being the
  size of the Gram-side products that carry almost all of the work
  (``bench.common.matmul_flops_per_second()``, ``k = 1024``, is recorded too).

Inputs: ``X = G / sqrt(max(m, n))`` with ``G`` standard normal, threshold ``c = 1``.
By the Marchenko–Pastur law the singular values fill ``[1 - sqrt(r), 1 + sqrt(r)]``
with ``r = min(m, n) / max(m, n)``, so ``s_max / c <= 2`` (a well-conditioned
clip: ``c^2 I + X X^T`` has condition number <= 5) and a part of the spectrum is
above ``c`` (recorded). Programs are compiled ahead of time; shapes with a side
>= 4096 get no extra warm-up call (their SVD takes minutes on a CPU).

Targets (issue 2): at 1024x4096 the clips take <= 0.5x the SVD clip's time,
the kernels reach >= 70% of the matmul FLOP/s, relative error <= 1e-3.
Output: a table, and ``bench/results/spectral.json``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    command_line,
    interleaved,
    matmul_flops_per_second,
    print_table,
    write_results,
)
from optimizers import hard_spectral_clip, soft_spectral_clip
from optimizers.linalg import SIGN_STEPS, SOFT_NS_STEPS, spectral_clip_matmuls

C = 1.0
FULL_SHAPES = ((1024, 1024), (1024, 4096), (4096, 4096))
QUICK_SHAPES = ((64, 64), (64, 256))
TARGET_TIME_RATIO = 0.5
TARGET_FLOPS_FRACTION = 0.7
TARGET_REL_ERR = 1e-3


def svd_soft_clip(x: jax.Array, c: float) -> tuple[jax.Array, ...]:
  """The anchor: ``U h(S) V^T`` by ``jnp.linalg.svd``; also returns ``(U, S, V^T)``."""
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  return (u * (s / jnp.sqrt(1.0 + (s / c) ** 2))) @ vt, u, s, vt


def svd_hard_from_factors(u: jax.Array, s: jax.Array, vt: jax.Array, c: float) -> jax.Array:
  return (u * jnp.minimum(s, c)) @ vt


def rel_err(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench_shape(m: int, n: int, rounds: int) -> dict[str, Any]:
  k = min(m, n)
  rng = np.random.default_rng(m * 7919 + n)
  x = jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(max(m, n)), jnp.float32)
  square = jnp.asarray(rng.standard_normal((k, k)), jnp.float32)
  compile_ = lambda f, *a: jax.jit(f).lower(*a).compile()
  calls = {
      "svd": (compile_(lambda x: svd_soft_clip(x, C), x), (x,)),
      "soft": (compile_(lambda x: soft_spectral_clip(x, C), x), (x,)),
      "hard": (compile_(lambda x: hard_spectral_clip(x, C), x), (x,)),
      "matmul": (compile_(lambda a: a @ a, square), (square,)),
  }
  timed = interleaved({k: functools.partial(fn, *args) for k, (fn, args) in calls.items()},
                      rounds, warmup=max(m, n) < 4096)
  seconds, outputs = timed.median, timed.last
  svd_soft, u, s, vt = outputs["svd"]
  svd_hard = jax.jit(svd_hard_from_factors, static_argnums=3)(u, s, vt, C)
  matmul_rate = 2 * k**3 / seconds["matmul"]
  row: dict[str, Any] = {
      "shape": f"{m}x{n}",
      "svd_clip_s": seconds["svd"],
      "soft_s": seconds["soft"],
      "hard_s": seconds["hard"],
      "soft_over_svd": seconds["soft"] / seconds["svd"],
      "hard_over_svd": seconds["hard"] / seconds["svd"],
      "soft_rel_err": rel_err(outputs["soft"], svd_soft),
      "hard_rel_err": rel_err(outputs["hard"], svd_hard),
      "matmul_GFLOPs": matmul_rate / 1e9,
  }
  for mode in ("soft", "hard"):
    rate = spectral_clip_matmuls(m, n, mode) / seconds[mode]
    row[f"{mode}_GFLOPs"] = rate / 1e9
    row[f"{mode}_flops_fraction"] = rate / matmul_rate
  s = np.asarray(s)
  row["s_max_over_c"] = float(s.max() / C)
  row["frac_sv_above_c"] = float(np.mean(s > C))
  return row


def main(quick: bool = False) -> dict:
  shapes = QUICK_SHAPES if quick else FULL_SHAPES
  rounds = 3
  load_start = os.getloadavg()
  reference_rate = matmul_flops_per_second()
  rows = []
  for m, n in shapes:
    t0 = time.perf_counter()
    rows.append(bench_shape(m, n, rounds=1 if max(m, n) >= 4096 else rounds))
    print(f"  {m}x{n}: {time.perf_counter() - t0:.1f} s", flush=True)
  target_shape = "1024x4096" if not quick else f"{shapes[-1][0]}x{shapes[-1][1]}"
  at = {r["shape"]: r for r in rows}[target_shape]
  checks = {
      "target_shape": target_shape,
      "soft_over_svd": at["soft_over_svd"],
      "hard_over_svd": at["hard_over_svd"],
      "soft_time_target_met": at["soft_over_svd"] <= TARGET_TIME_RATIO,
      "hard_time_target_met": at["hard_over_svd"] <= TARGET_TIME_RATIO,
      "min_flops_fraction": min(r[f"{mo}_flops_fraction"] for r in rows for mo in ("soft", "hard")),
      "max_rel_err": max(r[f"{mo}_rel_err"] for r in rows for mo in ("soft", "hard")),
  }
  checks["flops_target_met"] = checks["min_flops_fraction"] >= TARGET_FLOPS_FRACTION
  checks["rel_err_target_met"] = checks["max_rel_err"] <= TARGET_REL_ERR
  print_table(rows, title=f"spectral clip (c = {C}) vs SVD clip, float32, "
                          f"{jax.devices()[0].device_kind}")
  print_table([checks], title="targets")
  results = {
      "config": {
          "quick": quick, "c": C, "shapes": [list(s) for s in shapes], "rounds": rounds,
          "rounds_at_4096": 1, "ns_steps": SOFT_NS_STEPS, "sign_steps": list(SIGN_STEPS),
          "input": "X = N(0,1) / sqrt(max(m, n)), float32",
          "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
          "cpu_count": os.cpu_count(),
      },
      "matmul_flops_per_second_1024": reference_rate,
      "rows": rows,
      "targets": {"time_ratio_at_1024x4096": TARGET_TIME_RATIO,
                  "flops_fraction": TARGET_FLOPS_FRACTION, "rel_err": TARGET_REL_ERR},
      "checks": checks,
  }
  path = write_results("spectral", results)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  command_line(main, __doc__)
