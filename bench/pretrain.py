"""Sharded GPT pretraining with any gradsmith optimizer, checkpointed with orbax.

Runs on whatever devices exist (TPU, GPU, or CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    python -m bench.pretrain --optimizer dct_adamw --steps 200 --mesh 4,2 \\
        --scan-layers --ckpt-dir /tmp/run1 --ckpt-every 50 --metrics /tmp/run1/metrics.jsonl

* Model: GPT-style decoder (flax ``nnx``) over bytes of the Python standard
  library's sources. With ``--scan-layers`` the per-layer weights are stacked
  with a leading layer axis (``(L, d, 3d)`` ...) and the forward pass is a
  ``lax.scan``: every matrix method sees them as batches of matrices.
* Mesh: ``(data, model)`` from all devices (``--mesh D,M``), Auto axes (the
  compiler propagates shardings; the optimizers themselves also run under
  Explicit axes, see tests/conformance.py). Weight matrices
  are sharded FSDP-style, rows over ``data`` and columns over ``model`` (where
  divisible); the batch over ``data``. Optimizer-state specs come from
  ``optimizers.subspace_partition_specs`` (parameter-shaped state takes its
  parameter's spec; projectors, indices and rank-space moments get the specs
  documented there; scalars are replicated).
* ``--zero1``: ZeRO-1. Parameters replicated over ``data`` (sharded over
  ``model`` only), optimizer state sharded over ``data`` too
  (``optimizers.zero1_partition_specs``: each state leaf's largest divisible
  axis); MESA's EMA teacher (a copy of the parameters) is sharded the same way.
  The metrics record ``state_bytes`` and ``state_bytes_per_device`` (and
  ``teacher_state_bytes``, ``teacher_state_bytes_per_device`` for MESA).
* The jitted step donates params and state. Every batch is a function of
  ``(seed, step)`` alone, so a run resumed from a checkpoint sees the same data
  and reproduces the uninterrupted loss trajectory bit for bit.
* Multi-host: ``--distributed`` calls ``jax.distributed.initialize()`` before
  anything else on every process (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; see :func:`initialize_distributed`);
  the mesh then spans all processes' devices, every process builds the same
  batches and fills its own shards, and orbax writes one checkpoint
  collectively (see README).
* At start it prints the compiled step's collective bytes per device and flops
  (from the compiled program), what the configuration will cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optimizers as opt
from bench import methods as methods_lib
from bench.lm import load_corpus


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 256
  seq_len: int = 64
  scan_layers: bool = False


def _layer_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
  d = cfg.d_model
  return {"ln1": (d,), "qkv": (d, 3 * d), "proj": (d, d), "ln2": (d,), "up": (d, cfg.d_ff),
          "down": (cfg.d_ff, d)}


def _init_layer(key: jax.Array, cfg: GPTConfig, lead: tuple[int, ...] = ()) -> dict[str, nnx.Param]:
  out = {}
  for (name, shape), k in zip(_layer_shapes(cfg).items(), jax.random.split(key, 6), strict=True):
    if len(shape) == 1:
      out[name] = nnx.Param(jnp.ones(lead + shape))
    else:
      out[name] = nnx.Param(jax.random.normal(k, lead + shape) / math.sqrt(shape[0]))
  return out


# The matrix methods' view (``weight_dimension_numbers``): the "transformer" preset
# projects/clips the layers' weight matrices (stacked layers as a batch axis) and
# leaves the embedding, the position table, the head and the LayerNorm scales (also
# when stacked to (layers, d)) alone.
MATRIX_VIEW = "transformer"
# The same as a callable ``params -> tree of MatrixDims/None`` (for code that wants the tree).
gpt_matrix_dims = opt.matrix_rules(preset=MATRIX_VIEW)


def _layer_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  x = x - x.mean(-1, keepdims=True)
  return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)


def _block(w: dict[str, jax.Array], x: jax.Array, num_heads: int) -> jax.Array:
  b, t, d = x.shape
  q, k, v = jnp.split(_layer_norm(x, w["ln1"]) @ w["qkv"], 3, axis=-1)
  heads = lambda z: z.reshape(b, t, num_heads, d // num_heads)
  att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
  x = x + att.reshape(b, t, d) @ w["proj"]
  return x + jax.nn.gelu(_layer_norm(x, w["ln2"]) @ w["up"]) @ w["down"]


class GPT(nnx.Module):
  """Byte-level GPT; per-layer weights stacked (``scan_layers``) or in a list."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab, cfg.d_model)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
    if cfg.scan_layers:
      self.layers = nnx.Dict(_init_layer(rngs.params(), cfg, (cfg.num_layers,)))
    else:
      self.layers = nnx.List(
          [nnx.Dict(_init_layer(rngs.params(), cfg)) for _ in range(cfg.num_layers)]
      )
    self.ln_f = nnx.Param(jnp.ones((cfg.d_model,)))
    self.head = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab))
                          / math.sqrt(cfg.d_model))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed[...][tokens] + self.pos[...][: tokens.shape[-1]]
    if self.cfg.scan_layers:
      stacked = {k: v[...] for k, v in self.layers.items()}
      x, _ = jax.lax.scan(lambda x, w: (_block(w, x, self.cfg.num_heads), None), x, stacked)
    else:
      for layer in self.layers:
        x = _block({k: v[...] for k, v in layer.items()}, x, self.cfg.num_heads)
    return _layer_norm(x, self.ln_f[...]) @ self.head[...]


def param_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh, zero1: bool = False) -> P:
  """FSDP-style spec: rows over ``data``, columns over ``model`` where divisible
  (``zero1``: columns over ``model`` only, the parameters replicated over ``data``)."""
  if len(shape) < 2:
    return P()
  axes: list[str | None] = [None] * len(shape)
  if shape[-1] % mesh.shape["model"] == 0:
    axes[-1] = "model"
  if not zero1 and shape[-2] % mesh.shape["data"] == 0:
    axes[-2] = "data"
  return P(*axes)


def state_specs(
    tx: optax.GradientTransformation, params: Any, params_specs: Any, mesh: jax.sharding.Mesh
) -> Any:
  """PartitionSpecs of the optimizer state from the params' specs.

  ``optimizers.subspace_partition_specs`` traces ``tx.init`` on params carrying
  their specs, so parameter-shaped state inherits the parameter's spec and the
  subspace state (projectors, indices, rank-space moments) gets the specs that
  module documents. A spec that does not divide a leaf on this mesh falls back
  to replication.
  """
  from optimizers import subspace_partition_specs

  specs = subspace_partition_specs(tx, params, params_specs)
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree.map(
      lambda x, s: s if _fits(x.shape, s, mesh) else P(), abstract, specs,
      is_leaf=lambda x: isinstance(x, P),
  )


def state_memory(state: Any) -> dict[str, int]:
  """``state_bytes`` (the whole state, as if replicated on one device) and
  ``state_bytes_per_device`` (the most any device holds), from the arrays' shards."""
  per_device: dict[Any, int] = {}
  for x in jax.tree.leaves(state):
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return {"state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
          "state_bytes_per_device": max(per_device.values(), default=0)}


def _fits(shape: tuple[int, ...], spec: P, mesh: jax.sharding.Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  for dim, axis in zip(shape, spec, strict=False):
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    if dim % math.prod(mesh.shape[n] for n in names):
      return False
  return True


def make_mesh(shape: Sequence[int] | None) -> jax.sharding.Mesh:
  n = jax.device_count()
  if shape is None:
    model = 2 if n % 2 == 0 and n > 1 else 1
    shape = (n // model, model)
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(tuple(shape), ("data", "model"), axis_types=(auto, auto))


def batch_for_step(
    data: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int
) -> np.ndarray:
  """The batch of ``step``: a pure function of ``(seed, step)`` (resumable data order)."""
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


@dataclasses.dataclass
class RunConfig:
  optimizer: str = "adamw"
  steps: int = 100
  batch_size: int = 16
  lr: float | None = None
  warmup: int = 10
  seed: int = 0
  model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
  mesh: tuple[int, int] | None = None
  ckpt_dir: str | None = None
  ckpt_every: int = 0
  resume: bool = True
  stop_after: int | None = None  # stop early (to test resumption)
  metrics: str | None = None
  progress: bool = True
  rank: int = 16
  # ZeRO-1: params replicated over ``data`` (sharded over ``model`` only), optimizer state
  # sharded over ``data`` too (``optimizers.zero1_partition_specs``); state leaves with
  # fewer elements than ``zero1_replicate_below`` stay replicated.
  zero1: bool = False
  zero1_replicate_below: int = 0


def run(cfg: RunConfig) -> list[dict[str, float]]:
  """Trains; returns the per-step metrics (also appended to ``cfg.metrics``)."""
  method = methods_lib.registry(cfg.rank, MATRIX_VIEW)[cfg.optimizer]
  peak = cfg.lr if cfg.lr is not None else method.lr
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(cfg.warmup, 1), max(cfg.steps, 2))
  mesh = make_mesh(cfg.mesh)
  train_data, _ = load_corpus(max_bytes=1_000_000)

  graphdef, state = nnx.split(GPT(cfg.model, nnx.Rngs(cfg.seed)))
  params = nnx.to_pure_dict(state)
  p_specs = jax.tree.map(lambda x: param_spec(x.shape, mesh, cfg.zero1), params)
  p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), p_specs)
  params = put_global(params, p_shard)
  # With the params' specs, the matrix methods compute whole matrices on owner devices.
  method = methods_lib.registry(cfg.rank, MATRIX_VIEW, p_specs)[cfg.optimizer]
  tx = method.build(schedule)

  def placed_init(init, specs):
    """``init(params)`` placed by ``specs`` (with --zero1: sharded over ``data`` too)."""
    if cfg.zero1:
      specs = opt.zero1_partition_specs(jax.eval_shape(init, params), specs, mesh,
                                        replicate_below=cfg.zero1_replicate_below)
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda x: isinstance(x, P))
    return shard, jax.jit(init, out_shardings=shard)(params)

  s_shard, opt_state = placed_init(tx.init, state_specs(tx, params, p_specs, mesh))
  state_mem = state_memory(opt_state)
  batch_shard = NamedSharding(mesh, P("data", None))
  # Loss-side EMA teacher (MESA), sharded like the parameters (with --zero1: over ``data``
  # too, like the rest of the optimizer state); an empty tuple otherwise.
  teacher = method.teacher() if method.teacher else None
  t_shard, teacher_state = (), ()
  if teacher is not None:
    t_shard, teacher_state = placed_init(teacher.init, teacher.partition_specs(p_specs))
    state_mem.update({f"teacher_{k}": v for k, v in state_memory(teacher_state).items()})

  def model_logits(p, tokens):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)(tokens)

  def per_example_loss(p, tokens):
    logits = model_logits(p, tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce.mean(-1)

  task = methods_lib.Task(loss=lambda p, b: per_example_loss(p, b).mean(),
                          per_example_loss=per_example_loss)

  def train_loss(p, tokens, teacher_state):
    if teacher is None:
      return task.loss(p, tokens)
    logits = model_logits(p, tokens[:, :-1])
    teacher_logits = jax.lax.stop_gradient(model_logits(teacher_state.teacher, tokens[:, :-1]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + teacher.loss(logits, teacher_logits)

  def train_step(params, opt_state, teacher_state, tokens):
    loss, grads = jax.value_and_grad(train_loss)(params, tokens, teacher_state)
    extras = method.extra_args(task, params, tokens) if method.extra_args else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extras)
    params = optax.apply_updates(params, updates)
    if teacher is not None:
      teacher_state = teacher.update_teacher(teacher_state, params)
    return params, opt_state, teacher_state, loss, optax.tree.norm(grads)

  step_fn = jax.jit(
      train_step,
      in_shardings=(p_shard, s_shard, t_shard, batch_shard),
      out_shardings=(p_shard, s_shard, t_shard, None, None),
      donate_argnums=(0, 1, 2),
  )

  manager, start = None, 0
  if cfg.ckpt_dir:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        Path(cfg.ckpt_dir).resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    latest = manager.latest_step() if cfg.resume else None
    if latest is not None:
      target = {
          "params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 params, p_shard),
          "opt_state": jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, s_shard),
          "teacher": jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), teacher_state,
              t_shard),
      }
      restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
      params, opt_state = restored["params"], restored["opt_state"]
      teacher_state, start = restored["teacher"], latest

  lead = jax.process_index() == 0  # one process writes metrics and progress
  metrics_file = open(cfg.metrics, "a") if cfg.metrics and lead else None  # noqa: SIM115
  history = []
  steps = range(start, cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after))
  batch = lambda step: put_global(
      batch_for_step(train_data, cfg.seed, step, cfg.batch_size, cfg.model.seq_len), batch_shard)
  if len(steps):  # what the configuration costs, from the compiled program, before it runs
    step_fn = step_fn.lower(params, opt_state, teacher_state, batch(steps[0])).compile()
    if lead:
      print(compiled_step_summary(step_fn), flush=True)
  if cfg.progress and lead:
    from bench.common import progress

    steps = progress(steps, f"pretrain {cfg.optimizer}", total=cfg.steps, initial=start)
  try:
    for step in steps:
      tokens = batch(step)
      t0 = time.perf_counter()
      params, opt_state, teacher_state, loss, gnorm = step_fn(params, opt_state, teacher_state,
                                                              tokens)
      loss = float(loss)
      record = {"step": step, "loss": loss, "grad_norm": float(gnorm),
                "lr": float(schedule(step)), "step_time": time.perf_counter() - t0}
      record.update(state_mem)
      history.append(record)
      if metrics_file:
        metrics_file.write(json.dumps(record) + "\n")
      if manager is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
        import orbax.checkpoint as ocp

        manager.save(step + 1, args=ocp.args.StandardSave(
            {"params": params, "opt_state": opt_state, "teacher": teacher_state}))
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    if metrics_file:
      metrics_file.close()
  return history


def put_global(tree: Any, shardings: Any) -> Any:
  """Host values (the same on every process) as global arrays with ``shardings``; each
  process fills only its own devices' shards (works with one process or several)."""

  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def compiled_step_summary(compiled: Any) -> str:
  """One line: the compiled step's collectives (bytes per device, by kind) and flops."""
  from bench.hlo import compiled_figures

  f = compiled_figures(compiled)
  c = f["collectives"]
  kinds = ", ".join(f"{k} {v['count']}" for k, v in c["by_kind"].items()) or "none"
  return (f"compiled step: {c['bytes'] / 2**20:.2f} MiB of collectives per device ({kinds}), "
          f"{f['flops'] / 1e9:.3g} GFLOP per device, {f['temp_bytes'] / 2**20:.1f} MiB temporaries")


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` for ``--distributed``.

  Environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0, read by JAX),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here; on managed clusters, leave
  all three unset and JAX detects them). CPU collectives across processes use gloo.
  """
  import os

  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(
      num_processes=None if count is None else int(count),
      process_id=None if index is None else int(index),
  )


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--optimizer", default="adamw", choices=sorted(methods_lib.registry()))
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=None, help="peak learning rate (method default)")
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--d-ff", type=int, default=256)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--rank", type=int, default=16, help="rank of the low-rank methods")
  p.add_argument("--scan-layers", action="store_true", help="stack layers on a leading axis")
  p.add_argument("--mesh", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                 help="data,model mesh shape (default: all devices, model axis 2)")
  p.add_argument("--ckpt-dir", default=None)
  p.add_argument("--ckpt-every", type=int, default=0)
  p.add_argument("--no-resume", action="store_true")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop after this step (the schedule still spans --steps)")
  p.add_argument("--metrics", default=None, help="JSONL metrics file (appended)")
  p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() first")
  p.add_argument("--zero1", action="store_true",
                 help="ZeRO-1: params replicated over data, optimizer state sharded over data")
  p.add_argument("--zero1-replicate-below", type=int, default=0,
                 help="with --zero1, state leaves with fewer elements stay replicated")
  a = p.parse_args(argv)
  if a.distributed:
    initialize_distributed()
  model = GPTConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads, d_ff=a.d_ff,
                    seq_len=a.seq_len, scan_layers=a.scan_layers)
  history = run(RunConfig(
      optimizer=a.optimizer, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
      seed=a.seed, model=model, mesh=a.mesh, ckpt_dir=a.ckpt_dir, ckpt_every=a.ckpt_every,
      resume=not a.no_resume, metrics=a.metrics, rank=a.rank, stop_after=a.stop_after,
      zero1=a.zero1, zero1_replicate_below=a.zero1_replicate_below,
  ))
  if history:
    print(f"final loss {history[-1]['loss']:.4f} after step {history[-1]['step']}")


if __name__ == "__main__":
  main()
