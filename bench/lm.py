"""A small byte-level transformer language model and its training loop.

Shared by the demo ablation, the benchmarks and the notebooks. The corpus is
the Python standard library's own source files, read from the running
interpreter: nothing is downloaded.

The model is a flax ``nnx`` module; training is functional: ``nnx.split`` gives
``(graphdef, params)`` and :func:`train` runs a jitted step on the params pytree,
so any optax transformation (and any gradsmith transform that needs extra
arguments: pass ``extra_args``) drops in.
"""

from __future__ import annotations

import dataclasses
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["LMConfig", "TransformerLM", "load_corpus", "build", "lm_loss", "sample_batch",
           "MATRIX_VIEW", "TrainResult", "train"]


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 256
  seq_len: int = 64


def load_corpus(
    max_bytes: int = 4_000_000, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
  """Bytes of the stdlib's ``*.py`` files (sorted, deterministic), split train/val.

  Returns:
    ``(train, val)`` uint8 arrays; val is the tail ``val_fraction`` of the text.
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for path in sorted(root.glob("*.py")):
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  text = np.frombuffer(b"\n".join(chunks)[:max_bytes], dtype=np.uint8)
  split = int(len(text) * (1 - val_fraction))
  return text[:split], text[split:]


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=cfg.num_heads, in_features=cfg.d_model, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.up = nnx.Linear(cfg.d_model, cfg.d_ff, rngs=rngs)
    self.down = nnx.Linear(cfg.d_ff, cfg.d_model, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Pre-LayerNorm decoder-only transformer over bytes."""

  def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

  def features(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    x = self.embed(tokens) + self.pos[:t]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.ln_f(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.head(self.features(tokens))


# The matrix methods' view of the model (``weight_dimension_numbers``): attention and
# MLP kernels only (attention q/k/v/out as d_model x d_model); the token embedding, the
# position table, the head, biases and LayerNorms stay full rank, as in GaLore.
MATRIX_VIEW = "transformer"


def build(cfg: LMConfig = LMConfig(), seed: int = 0) -> tuple[nnx.GraphDef, Any]:
  """Returns ``(graphdef, params)`` of a fresh model (params: an ``nnx.State``)."""
  return nnx.split(TransformerLM(cfg, nnx.Rngs(seed)))


def lm_loss(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy of ``tokens`` (batch, seq_len + 1)."""
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def sample_batch(
    data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> jax.Array:
  """Random windows of ``seq_len + 1`` bytes, int32 (batch, seq_len + 1)."""
  starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
  return jnp.asarray(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32))


@dataclasses.dataclass
class TrainResult:
  train_losses: list[float]
  val_loss: float
  step_time: float  # median seconds per step after compilation
  state_bytes: int  # optimizer state
  params: Any = None

  @property
  def final_train_loss(self) -> float:
    tail = self.train_losses[-max(1, len(self.train_losses) // 10) :]
    return float(np.mean(tail))


def train(
    tx: optax.GradientTransformation,
    *,
    cfg: LMConfig = LMConfig(),
    steps: int = 200,
    batch_size: int = 16,
    seed: int = 0,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    extra_args: Callable[[Any, Any, jax.Array], dict] | None = None,
    val_batches: int = 8,
    progress: bool = False,
    desc: str = "",
    teacher: Any | None = None,
) -> TrainResult:
  """Trains a fresh model with ``tx`` and returns its curve and costs.

  Args:
    tx: any optax transformation.
    cfg: model size.
    steps: optimizer steps.
    batch_size: sequences per step.
    seed: model init and data order.
    data: ``(train, val)`` byte arrays; :func:`load_corpus` by default.
    extra_args: ``(graphdef, params, tokens) -> dict`` of keyword arguments
      for ``tx.update`` (e.g. ``grad_fn`` for SAM, ``aux_grads`` for Bloop).
    val_batches: batches of the validation split averaged at the end.
    progress: show a tqdm bar.
    desc: its label.
    teacher: a :func:`regularizers.mesa` object: its KL to the EMA teacher's
      logits is added to the loss, and the teacher is updated after each step.
  """
  from bench.common import tree_bytes

  train_data, val_data = load_corpus() if data is None else data
  graphdef, params = build(cfg, seed)
  opt_state = tx.init(params)
  teacher_state = None if teacher is None else teacher.init(params)
  loss = lambda p, tokens: lm_loss(graphdef, p, tokens)

  def train_loss(p, tokens, teacher_state):
    if teacher is None:
      return loss(p, tokens)
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    teacher_model = nnx.merge(graphdef, teacher_state.teacher)
    teacher_logits = jax.lax.stop_gradient(teacher_model(tokens[:, :-1]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + teacher.loss(logits, teacher_logits)

  @jax.jit
  def step(params, opt_state, teacher_state, tokens):
    value, grads = jax.value_and_grad(train_loss)(params, tokens, teacher_state)
    extras = {} if extra_args is None else extra_args(graphdef, params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, **extras)
    params = optax.apply_updates(params, updates)
    if teacher is not None:
      teacher_state = teacher.update_teacher(teacher_state, params)
    return params, opt_state, teacher_state, value

  rng = np.random.default_rng(seed)
  losses, times = [], []
  iterator = range(steps)
  if progress:
    from bench.common import progress as progress_bar

    iterator = progress_bar(iterator, desc)  # one line per run when not on a terminal
  for _ in iterator:
    tokens = sample_batch(train_data, batch_size, cfg.seq_len, rng)
    t0 = time.perf_counter()
    params, opt_state, teacher_state, value = step(params, opt_state, teacher_state, tokens)
    value = float(value)
    times.append(time.perf_counter() - t0)
    losses.append(value)
  eval_loss = jax.jit(loss)
  val_rng = np.random.default_rng(10_000 + seed)
  val = float(np.mean([eval_loss(params, sample_batch(val_data, batch_size, cfg.seq_len, val_rng))
                       for _ in range(val_batches)]))
  return TrainResult(
      train_losses=losses,
      val_loss=val,
      step_time=statistics.median(times[1:]) if len(times) > 1 else times[0],
      state_bytes=tree_bytes((opt_state, teacher_state)),
      params=params,
  )
