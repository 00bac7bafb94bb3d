"""Every method of the toolkit as a ready-to-train configuration.

Shared by the demo ablation (``bench/ablation.py``) and the pretraining script
(``bench/pretrain.py``). A :class:`Method` turns a learning rate into an optax
transformation and, for transforms that need extra keyword arguments, builds
them from a :class:`Task` (the loss functions of one batch):

* ``sam`` needs ``grad_fn`` (the gradient at the perturbed point),
* ``sven`` needs ``residual_fn`` (per-example losses as residuals, the Sven
  reference's default ``R = per-sample loss``),
* ``mesa`` is loss-side: its ``teacher`` (a :func:`regularizers.mesa`) adds a
  KL term to the teacher's logits to the loss and tracks the EMA teacher after
  each step; the training loops (``bench/lm.py``, ``bench/pretrain.py``) do both,
* ``bloop`` and its baselines need ``aux_grads``. The auxiliary loss used here
  is an L2 penalty ``0.5 * sum ||W||^2`` over the weight matrices (Bloop's
  ImageNet + L2 setting): cheap, always defined, and in conflict with the main
  loss as weights grow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optimizers as opt
import regularizers as reg

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """Loss functions of one batch, as the extra arguments need them."""

  loss: Callable[[Params, Batch], jax.Array]
  per_example_loss: Callable[[Params, Batch], jax.Array]

  def aux_loss(self, params: Params, batch: Batch) -> jax.Array:
    del batch
    return 0.5 * sum(jnp.sum(jnp.square(w.astype(jnp.float32)))
                     for w in jax.tree.leaves(params) if w.ndim >= 2)


ExtraArgsFn = Callable[[Task, Params, Batch], dict]


def _grad_fn(task: Task, params: Params, batch: Batch) -> dict:
  return {"grad_fn": lambda p: jax.grad(task.loss)(p, batch)}


def _aux_grads(task: Task, params: Params, batch: Batch) -> dict:
  return {"aux_grads": jax.grad(task.aux_loss)(params, batch)}


def _residuals(task: Task, params: Params, batch: Batch) -> dict:
  return {"residual_fn": lambda p: task.per_example_loss(p, batch)}


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build: Callable[[Any], optax.GradientTransformation]  # learning rate (or schedule) -> tx
  lr: float  # a good peak learning rate for the small byte-level LM
  extra_args: ExtraArgsFn | None = None
  note: str = ""
  teacher: Callable[[], reg.MESA] | None = None  # loss-side EMA teacher (MESA)


def _scaled(learning_rate: Any, factor: float) -> Any:
  """``factor`` times a learning rate or schedule."""
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def _two_dim_only(dims: Any) -> Any:
  """``dims`` restricted to 2-D leaves: ``optax.contrib.galore`` takes no batch axes, so
  stacked (scanned) layers stay full-rank AdamW there (our methods project them per slice)."""
  if dims is None:
    return None
  if isinstance(dims, str):
    dims = opt.matrix_rules(preset=dims)
  if isinstance(dims, opt.MatrixRules):
    return dims.galore  # optax's own dims type, views without batch axes only

  def restricted(params):
    full = dims(params) if callable(dims) else dims
    return jax.tree.map(lambda x, d: d if jnp.ndim(x) == 2 else None, params, full)

  return restricted


# Ranks are chosen for the small demo model (d_model 64 .. 256): a quarter of d_model.
def registry(
    rank: int = 16, weight_dimension_numbers: Any = None, param_specs: Any = None
) -> dict[str, Method]:
  """All methods by name (``rank`` for the low-rank ones).

  ``weight_dimension_numbers`` (a tree or a callable on params, as the matrix
  methods take it) tells the spectral and low-rank methods which leaves are
  matrices and how; the demo and the pretraining script pass the ``"transformer"``
  preset (:func:`optimizers.matrix_rules`), which keeps embeddings, positions, the
  head, biases and norms out and views attention kernels as ``d_model x d_model``.
  ``None``: every leaf with ``ndim >= 2`` over its last two axes.
  ``param_specs`` (the params' ``PartitionSpec`` tree) lets the matrix methods
  compute whole matrices on owner devices under ``Auto`` mesh axes
  (:mod:`optimizers.distributed`).
  """
  wd = 0.01
  dims = weight_dimension_numbers
  methods = [
      Method("adamw", lambda lr: optax.adamw(lr, weight_decay=wd), 3e-3),
      Method("adamw+clip", lambda lr: opt.clipped_adamw(lr, 0.05, weight_decay=wd), 3e-3,
             note="clipped_adamw: top 5% of coordinates clipped in the first moment only"),
      Method("sgd", lambda lr: optax.sgd(lr, momentum=0.9), 0.3),
      Method("sgd+clip", lambda lr: optax.chain(
          opt.clip_coordinatewise(0.05), optax.sgd(lr, momentum=0.9)), 0.3,
             note="top 5% of coordinates clipped"),
      Method("spectra_adamw", lambda lr: opt.spectra_adamw(
          lr, max_singular_value=5.0, weight_decay=wd, weight_dimension_numbers=dims,
          param_specs=param_specs), 3e-3),
      Method("galore", lambda lr: optax.contrib.galore(
          lr, rank=rank, update_proj_gap=50, weight_decay=wd,
          weight_dimension_numbers=_two_dim_only(dims)), 3e-3,
             note=f"optax.contrib.galore rank {rank}, SVD every 50 steps"),
      Method("dct_adamw", lambda lr: opt.dct_adamw(
          lr, rank, weight_decay=wd, weight_dimension_numbers=dims, param_specs=param_specs),
             3e-3, note=f"rank {rank}"),
      Method("online_subspace_descent", lambda lr: opt.online_subspace_descent(
          lr, rank, weight_decay=wd, weight_dimension_numbers=dims, param_specs=param_specs),
             3e-3,
             note=f"rank {rank}, SVD first basis, projector lr follows lr_t / lr_peak"),
      # Orthogonalised updates want Muon-like rates; the other leaves take AdamW at the
      # AdamW rows' 3e-3 (0.15 x the matrices' peak), as the reference trains them apart.
      Method("trion", lambda lr: opt.trion(
          lr, rank, weight_decay=wd, adam_learning_rate=_scaled(lr, 0.15),
          weight_dimension_numbers=dims, param_specs=param_specs), 2e-2,
             note=f"rank {rank}, DCT l1 + Newton-Schulz, error feedback"),
      Method("sam", lambda lr: optax.chain(reg.sam(0.05), optax.adamw(lr, weight_decay=wd)), 3e-3,
             _grad_fn, "SAM rho 0.05 + AdamW"),
      Method("mesa", lambda lr: optax.adamw(lr, weight_decay=wd), 3e-3,
             note="MESA decay 0.99, weight 0.8, tau 5 + AdamW",
             teacher=lambda: reg.mesa(0.99, temperature=5.0, weight=0.8)),
      Method("bloop", lambda lr: optax.chain(reg.bloop(1e-3), optax.adamw(lr, weight_decay=wd)),
             3e-3, _aux_grads, "aux: L2 on weight matrices, weight 1e-3"),
      Method("pcgrad", lambda lr: optax.chain(reg.pcgrad(1e-3), optax.adamw(lr, weight_decay=wd)),
             3e-3, _aux_grads, "aux: L2 on weight matrices, weight 1e-3"),
      Method("perp_grad", lambda lr: optax.chain(reg.perp_grad(), optax.adam(lr)), 3e-3,
             note="Adam on the gradient perpendicular to the weights"),
      Method("sven", lambda lr: opt.sven(lr, rank=8), 0.05, _residuals,
             note="rank 8, residuals = per-sequence loss"),
  ]
  return {m.name: m for m in methods}
