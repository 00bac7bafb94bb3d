r"""Sven against Adam, SGD and ``optax.lbfgs`` on the paper's regression tasks; step cost; memory.

Sven steps along ``-lr * pinv_k(M) R`` for the per-sample residuals ``R = f(x) - y``
of a minibatch and their Jacobian ``M = dR/dtheta`` (``optimizers.sven``).

* Regression (the paper's tasks, Bright-Thonney et al. 2026, arXiv 2604.01279):
  a 1-D fit ``y = sin(2 pi x) + 0.3 cos(5 pi x)`` on ``x ~ U[-1, 1]`` and a random
  degree-4 polynomial in 6 variables (all 210 monomials of degree <= 4, standard
  normal coefficients, target standardised, ``x ~ U[-1, 1]^6``), 10k points
  each, an MLP ``d-16-16-16-1`` with GELU (PyTorch's default initialisation),
  batch 32. Sven, Adam and SGD (momentum 0.9) run minibatch epochs (one jitted
  ``lax.scan`` per epoch, reshuffled); ``optax.lbfgs`` (zoom line search) runs
  full batch. Every run gets the same wall-clock budget and all runs of a
  comparison are advanced interleaved (the one with the least time so far goes
  next), so that the load of a shared machine falls on all of them alike. The
  learning rate of each method (and Sven's rank) is the best of a small grid on
  seed 0 by "tail loss" (the median full-data MSE over the last 10% of the
  training time, robust to the swings of constant-learning-rate minibatch
  methods); the winners then run on more seeds. Reported: the full-data MSE
  against epochs and against training seconds (compilation and loss evaluation
  excluded), final and tail, at equal wall time and at equal epochs.
* Targets of the exact step (section ``targets_mlp``) on an MLP of ~1M parameters
  (256-1024-768-1): the exact Sven step (``k = 32``) from per-example residuals,
  whose kernels take the ghost Gram (``M M^T`` from layer inputs and output
  cotangents of one forward + backward pass, no per-example gradients), against an
  SGD step at ``B = 32`` and ``B = 256``; at ``B = 32`` also the same step with
  every leaf's rows from the per-example pass (``ghost=False``) against forming
  those rows alone (``vmap(grad)``), and the step from ``residual_fn`` of the whole
  batch (rows by reverse mode over the batch). XLA temporaries of each compiled
  step (``memory_analysis``) beside the times.
* Transformer (section ``targets_lm``): the demo's byte-level LM (``bench.lm``,
  default config), per-sequence residuals (each sequence's mean next-byte loss),
  ``B = 16``: the Sven step against an AdamW step.
* Step cost: one Sven update plus the model's Jacobian work against one SGD
  step (gradient of the mean squared error plus the update), for the exact
  Gram method (``method="gram"``; its cost does not depend on ``k``; per-example
  residuals and, ``_batchfn``, the whole batch's ``residual_fn``) and the
  matrix-free method at several ``k``, over batch sizes, on the paper's MLP
  (steps scanned in one call, so dispatch does not dominate).
* Memory: XLA's compiled peak (arguments + outputs + temporaries) of one
  training step of the ~1M-parameter MLP at ``B in {32, 256, 1024}``: SGD,
  exact with the ghost Gram, exact with per-example rows, exact from the batch's
  ``residual_fn`` (Jacobian materialised; also microbatched: ``G`` from 32
  VJP/JVP pairs at a time) and matrix-free.

LAPACK (the ``eigh``, ``svd`` and ``qr`` of Sven's small matrices, which XLA on CPU
calls through SciPy's OpenBLAS) runs single-threaded here: on a loaded 2-core machine
OpenBLAS's own threads made a 64x64 SVD ~25x slower. Only Sven calls LAPACK; the matmuls
of every method are XLA's.

Targets: exact (ghost) step <= 2x an SGD step at ``B = 32`` and <= 3x at
``B = 256``, with temporaries <= 3x SGD's at ``B = 256``; the per-example-rows
step <= 1.3x forming the rows alone; the LM step <= 4x AdamW's; matrix-free peak
memory <= 3x an SGD step's at ``B = 1024``. Paper's claim: Sven beats Adam
(faster, lower final loss) and is competitive with L-BFGS at a fraction of its
wall time.

    python -m bench.bench_sven [--quick] [--only SECTION ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from threadpoolctl import threadpool_limits

import optimizers as opt
from bench.common import (
    compiled_memory,
    interleaved,
    print_table,
    results_dir,
    run_sections,
    tree_bytes,
    write_results,
)

BATCH_SIZE = 32
HIDDEN = (16, 16, 16)
BIG_MLP = (256, 1024, 768, 1)  # 1,051,137 parameters
LBFGS_CHUNK = 10  # L-BFGS iterations between loss evaluations

Params = Any


# ---------------------------------------------------------------------------
# Tasks and model.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RegressionTask:
  """Inputs ``x`` (N, d), targets ``y`` (N,), float32, and the MLP's layer sizes."""

  name: str
  x: np.ndarray
  y: np.ndarray
  sizes: tuple[int, ...]


def fit1d_target(x: np.ndarray) -> np.ndarray:
  r"""The 1-D target :math:`\sin(2\pi x) + 0.3 \cos(5\pi x)`."""
  return np.sin(2 * np.pi * x) + 0.3 * np.cos(5 * np.pi * x)


def fit1d_task(num_points: int = 10_000, seed: int = 0) -> RegressionTask:
  """The paper's 1-D fit: ``x ~ U[-1, 1]``, ``y = fit1d_target(x)``, MLP 1-16-16-16-1."""
  x = np.random.default_rng(seed).uniform(-1.0, 1.0, (num_points, 1))
  return RegressionTask("fit1d", x.astype(np.float32), fit1d_target(x[:, 0]).astype(np.float32),
                        (1, *HIDDEN, 1))


def polynomial_features(x: np.ndarray, degree: int) -> np.ndarray:
  r"""All monomials :math:`\prod_j x_j^{a_j}` with :math:`\sum_j a_j \le` ``degree``.

  ``x`` is (N, d); returns (N, C(d + degree, degree)), the constant first.
  """
  ones = np.ones((x.shape[0], 1), x.dtype)
  padded = np.concatenate([ones, x], axis=1)  # index 0 stands for "no variable"
  combos = itertools.combinations_with_replacement(range(x.shape[1] + 1), degree)
  return np.stack([np.prod(padded[:, list(c)], axis=1) for c in combos], axis=1)


def polynomial_task(num_points: int = 10_000, dim: int = 6, degree: int = 4,
                    seed: int = 0) -> RegressionTask:
  """A random degree-``degree`` polynomial in ``dim`` variables (standard normal
  coefficients on every monomial, target standardised), ``x ~ U[-1, 1]^dim``."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, (num_points, dim))
  features = polynomial_features(x, degree)
  y = features @ rng.standard_normal(features.shape[1])
  y = (y - y.mean()) / y.std()
  return RegressionTask(f"poly{dim}d_deg{degree}", x.astype(np.float32), y.astype(np.float32),
                        (dim, *HIDDEN, 1))


def init_mlp(sizes: Sequence[int], seed: int) -> list[dict[str, jax.Array]]:
  """PyTorch's default ``nn.Linear`` initialisation: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  rng = np.random.default_rng(seed)
  layers = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
    bound = 1.0 / math.sqrt(fan_in)
    layers.append({"w": jnp.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)), jnp.float32),
                   "b": jnp.asarray(rng.uniform(-bound, bound, (fan_out,)), jnp.float32)})
  return layers


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
  """MLP with exact GELU between layers, scalar output: (N, d) -> (N,)."""
  h = x
  for layer in params[:-1]:
    h = jax.nn.gelu(h @ layer["w"] + layer["b"], approximate=False)
  return (h @ params[-1]["w"] + params[-1]["b"])[:, 0]


def mse(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of the MLP on ``(x, y)``."""
  return jnp.mean(jnp.square(mlp_apply(params, x) - y))


def num_params(sizes: Sequence[int]) -> int:
  return sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:], strict=True))


# ---------------------------------------------------------------------------
# Methods and training runs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A method of the comparison: ``kind`` in {"sven", "adam", "sgd", "lbfgs"}."""

  kind: str
  lr: float | None = None
  rank: int | None = None
  sven_method: str = "auto"
  separable: bool = True  # Sven: per-example residuals (ghost Gram) or residual_fn of the batch

  @property
  def name(self) -> str:
    if self.kind == "sven":
      return (f"sven_k{self.rank}" + ("" if self.sven_method == "auto" else f"_{self.sven_method}")
              + ("" if self.separable else "_batchfn"))
    return self.kind

  def transform(self) -> optax.GradientTransformation:
    if self.kind == "sven":
      return opt.sven(self.lr, rank=self.rank, method=self.sven_method)
    if self.kind == "adam":
      return optax.adam(self.lr)
    if self.kind == "sgd":
      return optax.sgd(self.lr, momentum=0.9)
    if self.kind == "lbfgs":
      return optax.lbfgs()
    raise ValueError(f"unknown method kind {self.kind!r}")


# Learning rates (and Sven's rank) picked by the grid of `main` on seed 0 (bench/results/sven.json),
# used by `regression_comparison` (the demo ablation) without re-tuning.
DEFAULT_METHODS = (
    MethodSpec("sven", lr=0.1, rank=32),
    MethodSpec("adam", lr=1e-3),
    MethodSpec("sgd", lr=0.1),
    MethodSpec("lbfgs"),
)
LR_GRID = {"sven": (0.01, 0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2), "sgd": (0.03, 0.1, 0.3)}
SVEN_RANKS = (8, 32)


def example_residual(params: Params, example: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The residual ``f(x) - y`` of one example ``(x (d,), y ())``: Sven's separable form."""
  x, y = example
  return mlp_apply(params, x[None])[0] - y


def sven_update(tx: optax.GradientTransformation, params: Params, state: Any, x: jax.Array,
                y: jax.Array, separable: bool = True) -> tuple[Any, Any]:
  """Sven's update on the batch ``(x, y)``: per-example residuals (rows from one vmapped
  backward pass, the ghost Gram for the kernels) or the whole batch's ``residual_fn``
  (rows by reverse mode over the batch); ``updates`` only fixes the output dtypes."""
  if separable:
    return tx.update(params, state, params, example_residual_fn=example_residual, batch=(x, y))
  return tx.update(params, state, params, residual_fn=lambda p: mlp_apply(p, x) - y)


def minibatch_epoch_fn(tx: optax.GradientTransformation, kind: str,
                       separable: bool = True) -> Callable[..., Any]:
  """``epoch(params, state, xs, ys) -> (params, state, mean effective rank)``: one
  ``lax.scan`` over the batches ``xs`` (steps, B, d), ``ys`` (steps, B)."""

  def step(carry, batch):
    params, state = carry
    xb, yb = batch
    if kind == "sven":
      updates, state = sven_update(tx, params, state, xb, yb, separable)
      rank = optax.tree_utils.tree_get(state, "effective_rank").astype(jnp.float32)
    else:
      grads = jax.grad(mse)(params, xb, yb)
      updates, state = tx.update(grads, state, params)
      rank = jnp.zeros((), jnp.float32)
    return (optax.apply_updates(params, updates), state), rank

  def epoch(params, state, xs, ys):
    (params, state), ranks = jax.lax.scan(step, (params, state), (xs, ys))
    return params, state, jnp.mean(ranks)

  return epoch


def lbfgs_chunk_fn(tx: optax.GradientTransformation, iterations: int) -> Callable[..., Any]:
  """``chunk(params, state, x, y) -> (params, state, 0.0)``: ``iterations`` full-batch
  L-BFGS steps on the MSE of ``(x, y)``."""

  def chunk(params, state, x, y):
    loss = lambda p: mse(p, x, y)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), None, length=iterations)
    return params, state, jnp.zeros((), jnp.float32)

  return chunk


# Compiled training units by (method, data shapes): the seeds of a method share one program.
_COMPILED: dict[tuple, Any] = {}


class TrainingRun:
  """One method on one task from one seed, advanced a unit at a time (an epoch of
  minibatches, or ``LBFGS_CHUNK`` full-batch L-BFGS iterations), timing only the
  jitted work. ``curve`` holds (epochs, seconds, full-data MSE) after every unit."""

  def __init__(self, spec: MethodSpec, task: RegressionTask, seed: int,
               batch_size: int = BATCH_SIZE):
    self.spec, self.task, self.seed = spec, task, seed
    self.params = init_mlp(task.sizes, seed)
    tx = spec.transform()
    self.state = tx.init(self.params)
    self._x, self._y = jnp.asarray(task.x), jnp.asarray(task.y)
    self._loss = jax.jit(mse)
    self._shuffle = np.random.default_rng(1000 + seed)
    self._batch_size = batch_size
    self._steps_per_unit = LBFGS_CHUNK if spec.kind == "lbfgs" else len(task.x) // batch_size
    if spec.kind == "lbfgs":
      self._args = lambda: (self._x, self._y)
    else:
      self._args = self._batches
    key = (spec, task.sizes, task.x.shape, batch_size)
    t0 = time.perf_counter()
    if key not in _COMPILED:
      fn = lbfgs_chunk_fn(tx, LBFGS_CHUNK) if spec.kind == "lbfgs" else \
          minibatch_epoch_fn(tx, spec.kind, spec.separable)
      _COMPILED[key] = jax.jit(fn).lower(self.params, self.state, *self._args()).compile()
    self._unit = _COMPILED[key]
    self.compile_s = time.perf_counter() - t0
    self.seconds, self.epochs, self.steps = 0.0, 0, 0
    self.curve: dict[str, list[float]] = {
        "epochs": [0], "seconds": [0.0], "loss": [float(self._loss(self.params, self._x, self._y))]}
    self.effective_rank: list[float] = []

  def _batches(self) -> tuple[jax.Array, jax.Array]:
    n, b = len(self.task.x), self._batch_size
    perm = self._shuffle.permutation(n)[: (n // b) * b].reshape(n // b, b)
    return jnp.asarray(self.task.x[perm]), jnp.asarray(self.task.y[perm])

  def advance(self) -> None:
    args = jax.block_until_ready(self._args())
    t0 = time.perf_counter()
    params, state, rank = self._unit(self.params, self.state, *args)
    jax.block_until_ready(params)
    self.seconds += time.perf_counter() - t0
    self.params, self.state = params, state
    self.epochs += LBFGS_CHUNK if self.spec.kind == "lbfgs" else 1
    self.steps += self._steps_per_unit
    self.curve["epochs"].append(self.epochs)
    self.curve["seconds"].append(self.seconds)
    self.curve["loss"].append(float(self._loss(self.params, self._x, self._y)))
    if self.spec.kind == "sven":
      self.effective_rank.append(float(rank))

  def loss_at_epoch(self, epoch: int) -> float:
    """Full-data MSE after ``epoch`` epochs (the last evaluation at or before it)."""
    idx = int(np.searchsorted(np.asarray(self.curve["epochs"]), epoch, side="right")) - 1
    return self.curve["loss"][max(idx, 0)]

  def seconds_to_loss(self, target: float) -> float | None:
    """Training seconds until the full-data MSE first reached ``target`` (None: never)."""
    hit = [s for s, l in zip(self.curve["seconds"], self.curve["loss"], strict=True) if l <= target]
    return hit[0] if hit else None

  def tail_loss(self, fraction: float = 0.1) -> float:
    """Median full-data MSE over the evaluations of the last ``fraction`` of the training
    time: the level the run settled at, robust to the epoch-to-epoch swings of a
    constant-learning-rate minibatch method."""
    seconds = np.asarray(self.curve["seconds"])
    tail = np.asarray(self.curve["loss"])[seconds >= (1.0 - fraction) * seconds[-1]]
    return float(np.median(tail))

  def summary(self) -> dict[str, Any]:
    loss = self.curve["loss"]
    row = {"task": self.task.name, "method": self.spec.name, "lr": self.spec.lr,
           "seed": self.seed, "final_loss": loss[-1], "tail_loss": self.tail_loss(),
           "min_loss": float(np.nanmin(loss)),
           "seconds": self.seconds, "epochs": self.epochs, "steps": self.steps,
           "compile_s": self.compile_s}
    if self.effective_rank:
      row["mean_effective_rank"] = float(np.mean(self.effective_rank))
    return row


def race(runs: Sequence[TrainingRun], budget_s: float, max_epochs: int | None = None) -> None:
  """Advances every run until it has trained ``budget_s`` seconds (or ``max_epochs``),
  always the run with the least training time next, so that they share the machine's load."""
  while True:
    live = [r for r in runs
            if r.seconds < budget_s and (max_epochs is None or r.epochs < max_epochs)]
    if not live:
      return
    min(live, key=lambda r: r.seconds).advance()


# ---------------------------------------------------------------------------
# The regression comparison.
# ---------------------------------------------------------------------------


def regression_comparison(quick: bool) -> list[dict]:
  """Sven vs Adam vs SGD vs full-batch L-BFGS on the paper's 1-D fit, equal wall time.

  The MLP 1-16-16-16-1 (GELU), 10k points (``quick``: 512), batch 32, seed 0,
  the learning rates of :data:`DEFAULT_METHODS`, 10 s of training per method
  (``quick``: 1 s). One flat row per method: final, tail (median over the last
  10% of the time) and best full-data MSE, training seconds, epochs (L-BFGS:
  iterations) and steps.
  """
  task = fit1d_task(512 if quick else 10_000)
  with single_threaded_lapack():
    runs = [TrainingRun(spec, task, seed=0) for spec in DEFAULT_METHODS]
    race(runs, budget_s=1.0 if quick else 10.0)
  keys = ("method", "lr", "final_loss", "tail_loss", "min_loss", "seconds", "epochs", "steps")
  return [{k: r.summary()[k] for k in keys} for r in runs]


def _grid(kinds: Sequence[str]) -> list[MethodSpec]:
  specs = []
  for kind in kinds:
    if kind == "lbfgs":
      specs.append(MethodSpec("lbfgs"))
    elif kind == "sven":
      specs += [MethodSpec("sven", lr=lr, rank=k) for k in SVEN_RANKS for lr in LR_GRID["sven"]]
    else:
      specs += [MethodSpec(kind, lr=lr) for lr in LR_GRID[kind]]
  return specs


def _curve(run: TrainingRun, max_points: int = 200) -> dict[str, Any]:
  """The run's curve for the JSON, thinned to at most ``max_points`` evenly spaced
  evaluations (the first and the last kept)."""
  n = len(run.curve["loss"])
  keep = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
  return {"method": run.spec.name, "lr": run.spec.lr, "seed": run.seed,
          **{k: [v[i] for i in keep] for k, v in run.curve.items()}}


def _median(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None]
  return statistics.median(vals) if len(vals) == len(values) and vals else None


def task_study(task: RegressionTask, budget_s: float, seeds: Sequence[int],
               sweep: bool) -> dict[str, Any]:
  """Grid on seed ``seeds[0]`` (when ``sweep``), the winners on the other seeds, summaries."""
  kinds = ("sven", "adam", "sgd", "lbfgs")
  if sweep:
    grid_runs = [TrainingRun(spec, task, seeds[0]) for spec in _grid(kinds)]
    race(grid_runs, budget_s)
    best = {}
    for kind in kinds:
      cands = [r for r in grid_runs if r.spec.kind == kind]
      best[kind] = min(cands, key=lambda r: np.nan_to_num(r.tail_loss(), nan=np.inf))
    sweep_rows = [r.summary() for r in grid_runs]
    print_table([{k: s[k] for k in ("method", "lr", "final_loss", "tail_loss", "min_loss",
                                    "epochs")}
                 for s in sweep_rows], f"{task.name}: grid on seed {seeds[0]}, {budget_s:g} s each")
    runs = [best[k] for k in kinds]
  else:
    runs = [TrainingRun(spec, task, seeds[0]) for spec in DEFAULT_METHODS]
    race(runs, budget_s)
    sweep_rows = []
  chosen = [r.spec for r in runs]
  more = [TrainingRun(spec, task, seed) for seed in seeds[1:] for spec in chosen]
  race(more, budget_s)
  runs = runs + more

  # Equal epochs: compare every method after as many epochs as Sven completed on each seed.
  summary = []
  for spec in chosen:
    rs = [r for r in runs if r.spec == spec]
    svens = {r.seed: r for r in runs if r.spec.kind == "sven"}
    final = [r.curve["loss"][-1] for r in rs]
    at_sven_epochs = [r.loss_at_epoch(svens[r.seed].epochs) for r in rs]
    summary.append({
        "method": spec.name, "lr": spec.lr,
        "final_loss_median": float(np.median(final)), "final_loss_min": float(np.min(final)),
        "final_loss_max": float(np.max(final)),
        "tail_loss_median": float(np.median([r.tail_loss() for r in rs])),
        "loss_at_sven_epochs_median": float(np.median(at_sven_epochs)),
        "epochs_median": float(np.median([r.epochs for r in rs])),
        "step_ms_median": 1e3 * float(np.median([r.seconds / r.steps for r in rs])),
        "s_to_1e-3": _median([r.seconds_to_loss(1e-3) for r in rs]),
        "s_to_1e-4": _median([r.seconds_to_loss(1e-4) for r in rs]),
    })
  print_table(summary, f"{task.name}: {len(seeds)} seeds, {budget_s:g} s of training each "
              "(tail: median MSE over the last 10% of the time; s_to_X: median seconds to "
              "full-data MSE <= X, None if a seed never got there)")
  by = {s["method"]: s for s in summary}
  sven_name = next(s.name for s in chosen if s.kind == "sven")
  sven, adam, lbfgs = by[sven_name], by["adam"], by["lbfgs"]
  verdict = {
      "sven_beats_adam_equal_time": sven["final_loss_median"] < adam["final_loss_median"],
      "sven_beats_adam_equal_time_tail": sven["tail_loss_median"] < adam["tail_loss_median"],
      "sven_beats_adam_equal_epochs":
          sven["loss_at_sven_epochs_median"] < adam["loss_at_sven_epochs_median"],
      "sven_over_adam_final_loss": sven["final_loss_median"] / adam["final_loss_median"],
      "sven_over_adam_tail_loss": sven["tail_loss_median"] / adam["tail_loss_median"],
      "sven_over_lbfgs_final_loss": sven["final_loss_median"] / lbfgs["final_loss_median"],
      "sven_over_lbfgs_tail_loss": sven["tail_loss_median"] / lbfgs["tail_loss_median"],
  }
  print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in verdict.items()))
  return {"task": task.name, "num_points": len(task.x), "sizes": list(task.sizes),
          "params": num_params(task.sizes), "batch_size": BATCH_SIZE, "budget_s": budget_s,
          "seeds": list(seeds), "lr_grid": LR_GRID if sweep else None,
          "sven_ranks": SVEN_RANKS if sweep else None, "sweep": sweep_rows,
          "runs": [r.summary() for r in runs], "summary": summary, "verdict": verdict,
          "curves": [_curve(r) for r in runs]}


def regression_bench(quick: bool) -> dict[str, Any]:
  if quick:  # a smoke test: one task, the default learning rates, no grid
    return {"fit1d": task_study(fit1d_task(256), 0.3, [0], sweep=False)}
  budget, seeds = 10.0, [0, 1, 2]
  tasks = [fit1d_task(), polynomial_task()]
  return {t.name: task_study(t, budget, seeds, sweep=not quick) for t in tasks}


# ---------------------------------------------------------------------------
# Step cost and memory.
# ---------------------------------------------------------------------------


def _batch(sizes: Sequence[int], batch: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(-1.0, 1.0, (batch, sizes[0])), jnp.float32),
          jnp.asarray(rng.standard_normal(batch), jnp.float32))


def train_step_fn(tx: optax.GradientTransformation, sven: bool,
                  separable: bool = True) -> Callable[..., Any]:
  """``step(params, state, x, y) -> (params, state)``: one training step (SGD: the
  gradient of the MSE; Sven: :func:`sven_update`)."""

  def step(params, state, x, y):
    if sven:
      updates, state = sven_update(tx, params, state, x, y, separable)
    else:
      updates, state = tx.update(jax.grad(mse)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  return step


def _variants(ranks: Sequence[int], batch: int) -> dict[str, tuple[optax.GradientTransformation,
                                                                  bool, bool]]:
  """name -> (transform, is Sven, separable residuals)."""
  out = {"sgd": (optax.sgd(0.01), False, False),
         "exact_gram": (opt.sven(0.1, rank=max(ranks), method="gram"), True, True),
         "exact_gram_batchfn": (opt.sven(0.1, rank=max(ranks), method="gram"), True, False)}
  for k in ranks:
    if k <= batch:
      out[f"matrix_free_k{k}"] = (opt.sven(0.1, rank=k, method="matrix_free"), True, True)
  return out


def step_cost_rows(sizes: Sequence[int], batch: int, ranks: Sequence[int], scan_steps: int,
                   repeats: int) -> list[dict]:
  """Seconds per step of each variant (``scan_steps`` steps per call), interleaved timing.

  ``exact_gram``: per-example residuals (the ghost Gram for the kernels, the default);
  ``exact_gram_batchfn``: the same step from ``residual_fn`` of the whole batch.
  """
  params = init_mlp(sizes, 0)
  x, y = _batch(sizes, batch)
  fns = {}
  for name, (tx, sven, separable) in _variants(ranks, batch).items():
    step = train_step_fn(tx, sven, separable)

    def many(params, state, x, y, step=step):
      return jax.lax.scan(lambda c, _: (step(*c, x, y), None), (params, state), None,
                          length=scan_steps)[0]

    state = tx.init(params)
    compiled = jax.jit(many).lower(params, state, x, y).compile()
    fns[name] = lambda compiled=compiled, state=state: compiled(params, state, x, y)
  t = interleaved(fns, rounds=repeats).median
  rows = []
  for name, seconds in t.items():
    rank = int(name.rsplit("_k", 1)[1]) if name.startswith("matrix_free") else None
    rows.append({"params": num_params(sizes), "batch": batch, "variant": name, "rank": rank,
                 "step_ms": 1e3 * seconds / scan_steps,
                 "vs_sgd": seconds / t["sgd"]})
  return rows


def step_cost_bench(quick: bool) -> dict[str, Any]:
  small = (1, *HIDDEN, 1)
  if quick:
    batches, ranks = (8,), (1,)
  else:
    batches, ranks = (32, 128, 512), (1, 4, 16, 32)
  rows = []
  for batch in batches:  # ~1600 examples per timed call
    rows += step_cost_rows(small, batch, ranks, scan_steps=2 if quick else 1600 // batch,
                           repeats=2 if quick else 5)
  print_table(rows, f"step cost vs an SGD step, MLP {'-'.join(map(str, small))} "
              f"({num_params(small)} params); exact_gram keeps k = {max(ranks)} (its cost is "
              "independent of k)")
  return {"paper_mlp": rows}


def _compiled(fn: Callable[..., Any], *args: Any) -> Any:
  return jax.jit(fn).lower(*args).compile()


def _temp_mib(compiled: Any) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _per_example_grads(params: Params, x: jax.Array, y: jax.Array) -> Params:
  """The Jacobian rows alone: ``vmap(grad)`` of the per-example residual."""
  return jax.vmap(jax.grad(example_residual), in_axes=(None, 0))(params, (x, y))


def mlp_targets(quick: bool) -> dict[str, Any]:
  """The 1M-parameter MLP: the exact (ghost) step and the per-example-rows step vs SGD."""
  sizes = (16, 64, 32, 1) if quick else BIG_MLP
  batches = (8,) if quick else (32, 256)
  rounds = 2 if quick else 7
  params = init_mlp(sizes, 0)
  rows, out = [], {"sizes": list(sizes), "params": num_params(sizes)}
  for batch in batches:
    x, y = _batch(sizes, batch)
    variants = {"sgd": (optax.sgd(0.01), False, {}),
                "sven_ghost": (opt.sven(0.1, rank=32, method="gram"), True, {})}
    if batch == batches[0]:
      variants["sven_per_example_rows"] = (opt.sven(0.1, rank=32, method="gram", ghost=False),
                                           True, {})
      variants["sven_batchfn"] = (opt.sven(0.1, rank=32, method="gram"), True,
                                  {"separable": False})
    fns, temps = {}, {}
    for name, (tx, sven, kw) in variants.items():
      state = tx.init(params)
      compiled = _compiled(train_step_fn(tx, sven, **kw), params, state, x, y)
      temps[name] = _temp_mib(compiled)
      fns[name] = lambda c=compiled, s=state, x=x, y=y: c(params, s, x, y)
    if "sven_per_example_rows" in variants:
      compiled = _compiled(_per_example_grads, params, x, y)
      temps["rows_alone"] = _temp_mib(compiled)
      fns["rows_alone"] = lambda c=compiled, x=x, y=y: c(params, x, y)
    t = interleaved(fns, rounds=rounds).median
    for name, seconds in t.items():
      rows.append({"batch": batch, "variant": name, "step_ms": 1e3 * seconds,
                   "vs_sgd": seconds / t["sgd"], "temp_mib": temps[name],
                   "temp_vs_sgd": temps[name] / max(temps["sgd"], 1e-9)})
    out[f"ghost_vs_sgd_b{batch}"] = t["sven_ghost"] / t["sgd"]
    out[f"ghost_temp_vs_sgd_b{batch}"] = temps["sven_ghost"] / max(temps["sgd"], 1e-9)
    if "rows_alone" in t:
      out[f"per_example_step_vs_rows_alone_b{batch}"] = t["sven_per_example_rows"] / t["rows_alone"]
      out[f"batchfn_vs_sgd_b{batch}"] = t["sven_batchfn"] / t["sgd"]
  print_table(rows, f"exact Sven step (k = 32) vs SGD, MLP {'-'.join(map(str, sizes))} "
              f"({num_params(sizes)} params); temp: XLA temporaries of the compiled step")
  out["rows"] = rows
  out["targets"] = {"ghost_vs_sgd_b32_le": 2.0, "ghost_vs_sgd_b256_le": 3.0,
                    "per_example_step_vs_rows_alone_le": 1.3, "ghost_temp_vs_sgd_b256_le": 3.0}
  return out


def lm_target(quick: bool) -> dict[str, Any]:
  """The demo's byte-level transformer LM, per-sequence residuals: Sven (ghost) vs AdamW."""
  from bench import lm

  cfg = lm.LMConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, seq_len=16) if quick \
      else lm.LMConfig()
  batch = 4 if quick else 16
  graphdef, params = lm.build(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (batch, cfg.seq_len + 1)),
                       jnp.int32)
  example = lambda p, t: lm.lm_loss(graphdef, p, t[None])  # one sequence's mean loss
  adamw = optax.adamw(1e-3)
  sv = opt.sven(0.1, rank=batch)

  def adamw_step(params, state, tokens):
    grads = jax.grad(lambda p: lm.lm_loss(graphdef, p, tokens))(params)
    updates, state = adamw.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def sven_step(params, state, tokens):
    updates, state = sv.update(params, state, params, example_residual_fn=example, batch=tokens)
    return optax.apply_updates(params, updates), state

  fns, temps = {}, {}
  for name, tx, step in (("adamw", adamw, adamw_step), ("sven_ghost", sv, sven_step)):
    state = tx.init(params)
    compiled = _compiled(step, params, state, tokens)
    temps[name] = _temp_mib(compiled)
    fns[name] = lambda c=compiled, s=state: c(params, s, tokens)
  t = interleaved(fns, rounds=2 if quick else 7).median
  paths = opt.sven_leaf_paths(example, params, tokens)
  rows = [{"variant": k, "step_ms": 1e3 * v, "vs_adamw": v / t["adamw"], "temp_mib": temps[k]}
          for k, v in t.items()]
  print_table(rows, f"transformer LM step (d_model {cfg.d_model}, {cfg.num_layers} layers, "
              f"seq {cfg.seq_len}, B = {batch}), Sven per-sequence residuals vs AdamW")
  return {"config": dataclasses.asdict(cfg), "batch": batch, "rows": rows,
          "sven_vs_adamw": t["sven_ghost"] / t["adamw"], "target_sven_vs_adamw_le": 4.0,
          "ghost_leaves": sum(v == "ghost" for v in paths.values()),
          "per_example_leaves": sum(v != "ghost" for v in paths.values())}


def memory_bench(quick: bool) -> dict[str, Any]:
  sizes, batches = ((16, 64, 32, 1), (8,)) if quick else (BIG_MLP, (32, 256, 1024))
  params = init_mlp(sizes, 0)
  variants = {
      "sgd": (optax.sgd(0.01), False, True),
      "exact_ghost": (opt.sven(0.1, rank=32, method="gram"), True, True),
      "exact_per_example_rows": (opt.sven(0.1, rank=32, method="gram", ghost=False), True, True),
      "exact_batchfn": (opt.sven(0.1, rank=32, method="gram"), True, False),
      "exact_batchfn_microbatch32": (opt.sven(0.1, rank=32, method="gram", microbatch_size=32),
                                     True, False),
      "matrix_free_k8": (opt.sven(0.1, rank=8, method="matrix_free"), True, True),
  }
  if quick:
    for name in ("exact_batchfn_microbatch32", "exact_per_example_rows"):
      del variants[name]
  rows = []
  for batch in batches:
    x, y = _batch(sizes, batch)
    peaks = {}
    for name, (tx, sven, separable) in variants.items():
      if batch > 256 and name in ("exact_per_example_rows", "exact_batchfn"):
        continue  # B x P rows: gigabytes, known to scale linearly
      peaks[name] = compiled_memory(train_step_fn(tx, sven, separable), params,
                                    tx.init(params), x, y)
    for name, mem in peaks.items():
      rows.append({"batch": batch, "variant": name, "peak_mib": mem["peak_bytes"] / 2**20,
                   "temp_mib": mem["temp_bytes"] / 2**20,
                   "vs_sgd": mem["peak_bytes"] / peaks["sgd"]["peak_bytes"],
                   "temp_vs_sgd": mem["temp_bytes"] / peaks["sgd"]["temp_bytes"]})
  print_table(rows, f"compiled peak memory of one training step, MLP {'-'.join(map(str, sizes))}"
              f" ({num_params(sizes)} params, {tree_bytes(params) / 2**20:.1f} MiB)")
  last = max(batches)
  mf = [r["vs_sgd"] for r in rows if r["batch"] == last and r["variant"].startswith("matrix_free")]
  ghost = {r["batch"]: r["temp_vs_sgd"] for r in rows if r["variant"] == "exact_ghost"}
  return {"sizes": list(sizes), "params": num_params(sizes), "rows": rows,
          "target_matrix_free_vs_sgd_at_b1024_le": 3.0,
          f"matrix_free_vs_sgd_at_b{last}": max(mf),
          "ghost_temp_vs_sgd": ghost}


def single_threaded_lapack() -> threadpool_limits:
  """Context: OpenBLAS (SciPy's, which XLA's CPU LAPACK calls use) limited to one thread."""
  jnp.linalg.eigh(jnp.eye(2))  # loads the LAPACK library, so that the limit reaches it
  return threadpool_limits(limits=1, user_api="blas")


def main(quick: bool = False, only: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the sections (``only``: just these; the others are kept from the results file
  already written, and ``kept_sections`` records when that run was made)."""
  sections = {"targets_mlp": mlp_targets, "targets_lm": lm_target,
              "regression": regression_bench, "step_cost": step_cost_bench,
              "memory": memory_bench}
  results: dict[str, Any] = {"quick": quick, "lapack_threads": 1}
  if only:
    unknown = sorted(set(only) - set(sections))
    if unknown:
      raise ValueError(f"only: unknown sections {unknown}; choose from {sorted(sections)}")
    previous = json.loads((results_dir() / "sven.json").read_text())
    if previous.get("quick") != quick:
      raise ValueError("only: the results file holds a run of the other mode (--quick)")
    kept = [name for name in sections if name not in only]
    results["section_wall_s"] = {k: v for k, v in previous["section_wall_s"].items()
                                 if k in kept}
    results["kept_sections"] = {name: previous.get("kept_sections", {}).get(
        name, previous["meta"]["time"]) for name in kept}
    results.update({name: previous[name] for name in kept})
    sections = {name: fn for name, fn in sections.items() if name in only}
  results = run_sections(sections, quick, results, context=single_threaded_lapack)
  path = write_results("sven", results)
  print(f"\nwrote {path} ({results['wall_s']:.0f} s)")
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
  parser.add_argument("--only", nargs="+", metavar="SECTION",
                      help="run just these sections; keep the others from the results file")
  args = parser.parse_args()
  main(quick=args.quick, only=args.only)
