"""Gradient surgery: the cost of Bloop and its baselines, and of the one-forward gradient helper.

1. Surgery overhead on a GPT-small-like tree (the parameter tree of ``bench/lm.py``'s
   transformer with 12 layers, d_model 768, MLP 3072, 32k vocabulary, untied head,
   134M float32 parameters; ``--quick``: a small one). Timed, each jitted with its state
   donated: the surgery alone (``mixed``, ``bloop`` in its variants, ``pcgrad``,
   ``dynamic_barrier``, ``perp_grad``) on given main and auxiliary gradients, and an Adam
   update (``optax.adam`` update + ``apply_updates``) on the same tree; then
   ``chain(surgery, adam)`` vs Adam alone. A GPT-small forward/backward pass is too slow
   to time repeatedly on this 2-core machine, so the "training step" of the big tree is
   represented two ways: (a) the Adam update alone (a strict lower bound of any training
   step; the ratio is the overhead of a purely optimizer-bound step), and (b) an estimate
   of the forward/backward time, ``6 N`` FLOPs per token at the machine's measured matmul
   rate, from which the tokens per step above which the surgery costs <= 5% of a step
   follow.
2. A real training step on a small transformer (byte-level LM of ``bench/lm.py``, 4
   layers, d_model 256): forward/backward + Adam, main loss only; the mixed loss
   (``grad(main + lam aux)``); Bloop with :func:`main_and_aux_grads` (one forward, two
   backward passes) + ``chain(bloop, adam)``. The surgery's overhead is measured against
   this full step on the same model.
3. :func:`main_and_aux_grads` vs two separate gradient evaluations on the small model:
   two separately jitted ``jax.grad`` calls, both ``jax.grad`` calls in one jit (where
   XLA may share the forward by common-subexpression elimination), one ``jax.grad`` (the
   cost of a single gradient), and a variant vmapping the VJP over the two cotangents.
   The auxiliary loss shares all activations with the main loss (a z-loss on the
   logits plus an L2 penalty on the final features).

Variants are timed round-robin (the machine is shared and noisy); medians and ratios in
the same run. Target: surgery <= 5% of a training step.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import regularizers as reg
from bench import lm
from bench.common import (
  command_line,
  compiled_memory,
  interleaved,
  matmul_flops_per_second,
  print_table,
  tree_bytes,
  write_results,
)

LAM = 0.1
TARGET = 0.05


def random_like(tree: Any, seed: int) -> Any:
  """Normal(0, 0.02) arrays with the shapes of ``tree`` (ShapeDtypeStructs or arrays).

  Drawn with NumPy: a jitted JAX sampler over every leaf costs seconds of compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32)), tree)


# ---------------------------------------------------------------------------
# 1. The big tree: the surgery alone and chained before Adam, vs an Adam update.
# ---------------------------------------------------------------------------


def gpt_config(quick: bool) -> lm.LMConfig:
  if quick:
    return lm.LMConfig(vocab=2048, d_model=128, num_layers=2, num_heads=4, d_ff=512, seq_len=64)
  return lm.LMConfig(vocab=32000, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                     seq_len=128)


def gpt_tree(cfg: lm.LMConfig) -> Any:
  """The model's parameter tree (an ``nnx.State``) filled with random values."""
  abstract = nnx.eval_shape(lambda: lm.TransformerLM(cfg, nnx.Rngs(0)))
  _, shapes = nnx.split(abstract)
  return random_like(shapes, 0)


def adam_runner(params: Any, grads: Any) -> Callable[[], Any]:
  adam = optax.adam(1e-4)

  def step(s, g, p):
    u, s = adam.update(g, s, p)
    return optax.apply_updates(p, u), s

  # params are arguments, never closed over: a closed-over tree becomes compile-time
  # constants (XLA then constant-folds reductions over them: minutes at 134M parameters).
  jitted = jax.jit(step, donate_argnums=0)
  carry = [adam.init(params)]

  def run():
    new_params, carry[0] = jitted(carry[0], grads, params)
    return new_params

  return run


def surgery_runner(tx: optax.GradientTransformation, params: Any, grads: Any,
                   aux: Any) -> Callable[[], Any]:
  """The transform's update alone (its state donated); returns the direction."""
  jitted = jax.jit(lambda s, g, a, p: tx.update(g, s, p, aux_grads=a), donate_argnums=0)
  carry = [tx.init(params)]

  def run():
    d, carry[0] = jitted(carry[0], grads, aux, params)
    return d

  return run


def chained_runner(tx: optax.GradientTransformation, params: Any, grads: Any,
                   aux: Any) -> Callable[[], Any]:
  """``chain(tx, adam)`` update + apply_updates (state donated); returns new params."""
  full = optax.chain(tx, optax.adam(1e-4))

  def step(s, g, a, p):
    u, s = full.update(g, s, p, aux_grads=a)
    return optax.apply_updates(p, u), s

  jitted = jax.jit(step, donate_argnums=0)
  carry = [full.init(params)]

  def run():
    new_params, carry[0] = jitted(carry[0], grads, aux, params)
    return new_params

  return run


SURGERIES = {
    "mixed": lambda: reg.mixed(LAM),
    "bloop": lambda: reg.bloop(LAM),
    "bloop_per_leaf": lambda: reg.bloop(LAM, projection="per_leaf"),
    "bloop_ema_after": lambda: reg.bloop(LAM, ema_order="after"),
    "pcgrad": lambda: reg.pcgrad(LAM),
    "dynamic_barrier": lambda: reg.dynamic_barrier(LAM),
    "perp_grad": lambda: reg.perp_grad(),
}


def big_tree_section(quick: bool, rounds: int, repeats: int) -> dict[str, Any]:
  cfg = gpt_config(quick)
  params = gpt_tree(cfg)
  grads, aux = random_like(params, 1), random_like(params, 2)
  n = sum(x.size for x in jax.tree.leaves(params))
  out: dict[str, Any] = {
      "config": {k: getattr(cfg, k) for k in ("vocab", "d_model", "num_layers", "d_ff")},
      "num_params": int(n), "param_bytes": tree_bytes(params),
  }

  # --quick (the CI smoke test) keeps few variants: compiling dominates there.
  names = ("mixed", "bloop") if quick else tuple(SURGERIES)
  runners = {"adam_update": adam_runner(params, grads)}
  runners |= {k: surgery_runner(SURGERIES[k](), params, grads, aux) for k in names}
  alone = interleaved(runners, rounds, repeats).median
  del runners
  gc.collect()

  chained = {}
  if not quick:
    runners = {"adam_update": adam_runner(params, grads),
               "mixed+adam": chained_runner(reg.mixed(LAM), params, grads, aux),
               "bloop+adam": chained_runner(reg.bloop(LAM), params, grads, aux)}
    chained = interleaved(runners, rounds, repeats).median
    del runners
    gc.collect()

  # Estimated forward/backward time of the full model: 6 N FLOPs per token (the
  # attention's extra FLOPs ignored) at the measured matmul throughput.
  flops = matmul_flops_per_second(512 if quick else 1024)
  fwd_bwd_per_token = 6 * n / flops
  out["matmul_gflops"] = flops / 1e9
  out["est_fwd_bwd_s_per_token"] = fwd_bwd_per_token
  adam = alone["adam_update"]
  out["adam_update_ms"] = 1e3 * adam
  rows = []
  for name, t in alone.items():
    if name == "adam_update":
      continue
    extra = t - alone["mixed"] if name.startswith("bloop") else None
    row = {
        "variant": name, "ms": 1e3 * t, "x_adam_update": t / adam,
        "minus_mixed_x_adam": (t - alone["mixed"]) / adam,
        # Tokens per step at which this surgery costs TARGET of (fwd/bwd + adam).
        "tokens_for_5pct": max(t / TARGET - adam, 0.0) / fwd_bwd_per_token,
    }
    if extra is not None:
      row["bloop_minus_mixed_ms"] = 1e3 * extra
    rows.append(row)
  out["surgery_alone"] = {r["variant"]: {k: v for k, v in r.items() if k != "variant"}
                          for r in rows}
  out["chained_with_adam"] = {
      k: {"ms": 1e3 * v, "x_adam_update": v / chained["adam_update"]} for k, v in chained.items()
  }
  print_table(rows, f"surgery alone on a {n / 1e6:.0f}M-parameter GPT-like tree "
                    f"(Adam update: {1e3 * adam:.1f} ms)")
  print_table([{"variant": k, **v} for k, v in out["chained_with_adam"].items()],
              "chained before Adam (update + apply) vs Adam alone")
  return out


# ---------------------------------------------------------------------------
# 2 and 3. A small transformer: full training steps, and the one-forward helper.
# ---------------------------------------------------------------------------


def small_model(quick: bool) -> tuple[Any, Any, jax.Array, str]:
  if quick:
    cfg, batch = lm.LMConfig(d_model=32, num_layers=1, d_ff=128, seq_len=32), 4
  else:
    cfg, batch = lm.LMConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024,
                             seq_len=128), 8
  graphdef, params = lm.build(cfg)
  tokens = jax.random.randint(jax.random.key(3), (batch, cfg.seq_len + 1), 0, cfg.vocab)
  shape = (f"d_model {cfg.d_model}, {cfg.num_layers} layers, d_ff {cfg.d_ff}, "
           f"seq {cfg.seq_len}, batch {batch}")
  return graphdef, params, tokens, shape


def make_two_losses(graphdef: Any) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  def two_losses(p, tokens):
    model = nnx.merge(graphdef, p)
    h = model.features(tokens[:, :-1])  # shared by both losses
    logits = model.head(h)
    main = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    aux = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2) + jnp.mean(h**2)
    return main, aux

  return two_losses


def vmapped_cotangents(loss_fn: Callable, params: Any, *args: Any) -> tuple[Any, Any]:
  """Alternative to main_and_aux_grads: one VJP vmapped over the two cotangents."""
  losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, *args), params)
  (grads,) = jax.vmap(vjp_fn)((jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))
  return losses, (jax.tree.map(lambda x: x[0], grads), jax.tree.map(lambda x: x[1], grads))


def train_runner(step: Callable, params: Any, state: Any, tokens: jax.Array) -> Callable:
  jitted = jax.jit(step, donate_argnums=(0, 1))
  carry = [jax.tree.map(jnp.copy, (params, state))]

  def run():
    carry[0] = jitted(*carry[0], tokens)
    return carry[0]

  return run


def small_model_section(quick: bool, rounds: int, repeats: int) -> dict[str, Any]:
  graphdef, params, tokens, shape = small_model(quick)
  two_losses = make_two_losses(graphdef)
  main_loss = lambda p, t: two_losses(p, t)[0]
  aux_loss = lambda p, t: two_losses(p, t)[1]
  adam = optax.adam(1e-3)
  with_bloop = optax.chain(reg.bloop(LAM), adam)
  with_mixed_tx = optax.chain(reg.mixed(LAM), adam)

  def adam_step(p, s, t):  # main loss only
    u, s = adam.update(jax.grad(main_loss)(p, t), s, p)
    return optax.apply_updates(p, u), s

  def mixed_loss_step(p, s, t):  # one gradient of main + lam aux
    g = jax.grad(lambda q: main_loss(q, t) + LAM * aux_loss(q, t))(p)
    u, s = adam.update(g, s, p)
    return optax.apply_updates(p, u), s

  def surgery_step(tx):
    def step(p, s, t):
      _, (g, a) = reg.main_and_aux_grads(two_losses, p, t)
      u, s = tx.update(g, s, p, aux_grads=a)
      return optax.apply_updates(p, u), s
    return step

  runners = {
      "adam_step_main_only": train_runner(adam_step, params, adam.init(params), tokens),
      "helper+bloop+adam_step": train_runner(surgery_step(with_bloop), params,
                                             with_bloop.init(params), tokens),
  }
  if not quick:
    runners["mixed_loss_step"] = train_runner(mixed_loss_step, params, adam.init(params), tokens)
    runners["helper+mixed+adam_step"] = train_runner(
        surgery_step(with_mixed_tx), params, with_mixed_tx.init(params), tokens)
  grads = jax.grad(main_loss)(params, tokens)
  aux = jax.grad(aux_loss)(params, tokens)
  names = ("mixed", "bloop") if quick else ("mixed", "bloop", "pcgrad", "dynamic_barrier")
  runners |= {f"{k}_alone": surgery_runner(SURGERIES[k](), params, grads, aux) for k in names}
  if not quick:
    runners["adam_update_alone"] = adam_runner(params, grads)

  # Gradient evaluations.
  helper = jax.jit(lambda p: reg.main_and_aux_grads(two_losses, p, tokens))
  vmapped = jax.jit(lambda p: vmapped_cotangents(two_losses, p, tokens))
  grad_main, grad_aux = jax.jit(jax.grad(main_loss)), jax.jit(jax.grad(aux_loss))
  both_one_jit = jax.jit(lambda p: (jax.grad(main_loss)(p, tokens),
                                    jax.grad(aux_loss)(p, tokens)))
  runners |= {
      "grads_helper_one_forward": lambda: helper(params),
      "grads_two_separate_jits": lambda: (grad_main(params, tokens), grad_aux(params, tokens)),
      "grad_main_only": lambda: grad_main(params, tokens),
  }
  if not quick:
    runners["grads_vmapped_cotangents"] = lambda: vmapped(params)
    runners["grads_two_in_one_jit"] = lambda: both_one_jit(params)
  t = interleaved(runners, rounds, repeats).median

  step = t["adam_step_main_only"]
  out: dict[str, Any] = {"shape": shape, "num_params": int(sum(
      x.size for x in jax.tree.leaves(params))), "ms": {k: 1e3 * v for k, v in t.items()}}
  out["surgery_fraction_of_train_step"] = {
      k.removesuffix("_alone"): t[k] / step for k in t if k.endswith("_alone")}
  out["bloop_minus_mixed_fraction_of_train_step"] = (t["bloop_alone"] - t["mixed_alone"]) / step
  out["train_steps_x_main_only"] = {k: v / step for k, v in t.items() if k.endswith("_step")
                                    or k == "adam_step_main_only"}
  two = t["grads_two_separate_jits"]
  out["helper"] = {
      "helper_x_two_separate_jits": t["grads_helper_one_forward"] / two,
      "helper_x_one_grad": t["grads_helper_one_forward"] / t["grad_main_only"],
  }
  if not quick:
    out["helper"] |= {
        "helper_x_two_in_one_jit": t["grads_helper_one_forward"] / t["grads_two_in_one_jit"],
        "vmapped_x_two_separate_jits": t["grads_vmapped_cotangents"] / two,
        "two_in_one_jit_x_two_separate_jits": t["grads_two_in_one_jit"] / two,
        "memory_helper": compiled_memory(
            lambda p: reg.main_and_aux_grads(two_losses, p, tokens), params),
        "memory_two_in_one_jit": compiled_memory(
            lambda p: (jax.grad(main_loss)(p, tokens), jax.grad(aux_loss)(p, tokens)), params),
    }
  print_table([{"variant": k, "ms": 1e3 * v, "x_train_step": v / step} for k, v in t.items()],
              f"small transformer ({shape}); train step = fwd/bwd (main) + Adam")
  print("helper:", {k: v for k, v in out["helper"].items() if not k.startswith("memory")})
  return out


def main(quick: bool = False) -> dict:
  rounds, repeats = (1, 2) if quick else (4, 2)
  results: dict[str, Any] = {"quick": quick, "aux_weight": LAM, "target_fraction": TARGET}
  results["big_tree"] = big_tree_section(quick, rounds, repeats)
  results["small_model"] = small_model_section(quick, rounds, repeats)
  big, small = results["big_tree"], results["small_model"]
  results["targets"] = {
      "bloop_le_5pct_of_small_model_train_step":
          small["surgery_fraction_of_train_step"]["bloop"] <= TARGET,
      "bloop_le_5pct_of_big_tree_adam_update_only":
          big["surgery_alone"]["bloop"]["x_adam_update"] <= TARGET,
      "big_tree_tokens_per_step_for_bloop_le_5pct":
          big["surgery_alone"]["bloop"]["tokens_for_5pct"],
      "helper_faster_than_two_separate_grads": small["helper"]["helper_x_two_separate_jits"] < 1,
  }
  print("targets:", results["targets"])
  path = write_results("surgery", results)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  command_line(main, __doc__)
