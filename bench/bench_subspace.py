"""Low-rank subspace optimizers against ``optax.contrib.galore``, in the same run.

* Refresh: a DCT selection (one orthonormal DCT-II of the gradient + top-r, the
  refresh of ``dct_projector``) vs GaLore's SVD of the gradient, at 1024x4096
  and 4096x4096, rank 128. Also the DCT applied by basis matmul vs by FFT over
  sizes (the crossover used by ``method="auto"``).
* Step: one jitted optimizer update on a transformer-layer-like tree (1024x1024,
  1024x4096, 4096x1024 matrices and a vector), rank 128: Adam, GaLore (between
  refreshes, at a refresh, and amortised over its period of 200), the
  same SVD projector inside ``subspace``, ``dct_adamw`` (a refresh every step)
  and ``online_subspace_descent``. Variants are timed round-robin (the machine
  is shared) and compared as ratios of medians.
* Memory: optimizer-state bytes on a GPT-small-like tree (12 layers, d=768, MLP
  3072, vocab 32k; abstract shapes only, via ``jax.eval_shape``) for AdamW,
  GaLore, ``dct_adamw`` (both sides) and ``online_subspace_descent``, rank 128;
  attention and MLP matrices projected, embeddings, head and vectors full rank
  (the same for every method).
* Quality: the byte-level transformer of ``bench/lm.py`` on the stdlib's source,
  equal steps, rank and learning rate, 3 seeds: final train/val loss of AdamW,
  GaLore, ``dct_adamw`` and ``online_subspace_descent``, plus the LM's
  full training-step time of each (forward, backward and update).

Targets: DCT refresh <= 0.1x GaLore's SVD; projector state <= 1% of GaLore's;
OSD step <= 1.3x Adam; dct_adamw and OSD final loss no worse than GaLore's
within the seed spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optimizers as opt
from bench import lm
from bench.common import (
    command_line,
    interleaved,
    print_table,
    run_sections,
    tree_bytes,
    write_results,
)


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each function: :func:`bench.common.interleaved` (kept for callers)."""
  return interleaved(fns, rounds=repeats).median


# ---------------------------------------------------------------------------
# Refresh: DCT selection vs SVD; DCT by matmul vs FFT.
# ---------------------------------------------------------------------------


def dct_selection_fn(rank: int, method: str) -> Callable[[jax.Array], Any]:
  """The refresh of ``dct_projector`` on ``g`` (projecting its smaller side)."""
  projector = opt.dct_projector(rank, method=method)

  def select(g):
    x = g.T if g.shape[0] < g.shape[1] else g  # (k, d): the projected side last
    state = projector.init((), x.shape[0], x.shape[1], rank)
    return projector.refresh(x, state, jnp.zeros([], jnp.int32))

  return jax.jit(select)


def refresh_bench(quick: bool) -> list[dict]:
  shapes = [(128, 512)] if quick else [(1024, 4096), (4096, 4096)]
  rank = 16 if quick else 128
  rows = []
  for m, n in shapes:
    g = jax.random.normal(jax.random.key(0), (m, n))
    svd = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False))  # GaLore's refresh
    dct = dct_selection_fn(rank, "auto")
    dct_mm = dct_selection_fn(rank, "matmul")
    big = m * n >= 4096 * 4096
    fns = {"dct_auto": lambda dct=dct, g=g: dct(g),
           "dct_matmul": lambda dct_mm=dct_mm, g=g: dct_mm(g),
           "svd": lambda svd=svd, g=g: svd(g)}
    t = interleaved(fns, rounds=1 if big or quick else 3).median
    rows.append({
        "shape": f"{m}x{n}", "rank": rank,
        "dct_select_s": t["dct_auto"], "dct_select_matmul_s": t["dct_matmul"],
        "galore_svd_s": t["svd"], "ratio_dct_vs_svd": t["dct_auto"] / t["svd"],
        "target_ratio_le": 0.1,
    })
  print_table(rows, "refresh: DCT selection vs GaLore's SVD")
  return rows


def dct_method_bench(quick: bool) -> dict:
  sizes = [64, 512] if quick else [64, 128, 256, 512, 1024, 2048, 4096]
  k = 256 if quick else 1024
  rows = []
  for d in sizes:
    x = jax.random.normal(jax.random.key(1), (k, d))
    mm = jax.jit(lambda x: opt.dct_transform(x, method="matmul"))
    fft = jax.jit(lambda x: opt.dct_transform(x, method="fft"))
    fns = {"matmul": lambda mm=mm, x=x: mm(x), "fft": lambda fft=fft, x=x: fft(x)}
    t = interleaved(fns, rounds=3 if d > 2048 else 5).median
    rows.append({"k": k, "d": d, "matmul_s": t["matmul"], "fft_s": t["fft"],
                 "fft_over_matmul": t["fft"] / t["matmul"]})
  print_table(rows, "DCT-II of a (k, d) matrix along d: explicit basis matmul vs FFT")
  faster = [r["d"] for r in rows if r["fft_s"] < r["matmul_s"]]
  return {"rows": rows, "first_size_fft_faster": min(faster) if faster else None}


# ---------------------------------------------------------------------------
# Step time.
# ---------------------------------------------------------------------------


def step_bench(quick: bool) -> dict:
  d, f, rank = (64, 256, 8) if quick else (1024, 4096, 128)
  shapes = {"attn": (d, d), "up": (d, f), "down": (f, d), "scale": (d,)}
  keys = jax.random.split(jax.random.key(2), len(shapes))
  params = {k: jax.random.normal(key, s) / np.sqrt(s[0])
            for key, (k, s) in zip(keys, shapes.items(), strict=True)}
  grads = jax.tree.map(lambda p: jnp.sin(3 * p), params)
  txs = {
      "adam": optax.adam(1e-3),
      "galore": optax.contrib.galore(1e-3, rank=rank, update_proj_gap=200),
      "subspace_svd": optax.chain(opt.subspace(optax.scale_by_adam(), opt.svd_projector(rank)),
                                  optax.scale_by_learning_rate(1e-3)),
      "dct_adamw": opt.dct_adamw(1e-3, rank, weight_decay=0.0),
      "online_subspace_descent": opt.online_subspace_descent(1e-3, rank),
  }
  if quick:
    del txs["subspace_svd"]
  fns = {}
  for name, tx in txs.items():
    update = jax.jit(tx.update)
    fresh = tx.init(params)
    _, later = update(grads, fresh, params)  # count = 1: between refreshes
    fns[name] = lambda update=update, s=later: update(grads, s, params)
    if name in ("galore", "subspace_svd"):
      fns[f"{name}@refresh"] = lambda update=update, s=fresh: update(grads, s, params)
  t = interleaved(fns, rounds=2 if quick else 7).median
  period = 200
  for name in ("galore", "subspace_svd")[: 1 if quick else 2]:
    t[f"{name}@amortised"] = ((period - 1) * t[name] + t[f"{name}@refresh"]) / period
  rows = [{"optimizer": k, "step_s": v, "vs_adam": v / t["adam"],
           "vs_galore_amortised": v / t["galore@amortised"]} for k, v in t.items()]
  print_table(rows, f"one jitted update, tree {shapes}, rank {rank}")
  return {"shapes": {k: list(v) for k, v in shapes.items()}, "rank": rank, "rows": rows,
          "osd_vs_adam": t["online_subspace_descent"] / t["adam"], "osd_target_le": 1.3,
          "dct_vs_galore_amortised": t["dct_adamw"] / t["galore@amortised"],
          "dct_vs_adam": t["dct_adamw"] / t["adam"]}


# ---------------------------------------------------------------------------
# Memory on a GPT-small-like tree.
# ---------------------------------------------------------------------------


def gpt_small_shapes(layers: int = 12, d: int = 768, ff: int = 3072, vocab: int = 32000,
                     ctx: int = 1024) -> dict:
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  block_params = lambda: {
      "q": sds(d, d), "k": sds(d, d), "v": sds(d, d), "o": sds(d, d),
      "up": sds(d, ff), "down": sds(ff, d),
      "ln1": {"scale": sds(d), "bias": sds(d)}, "ln2": {"scale": sds(d), "bias": sds(d)},
      "up_bias": sds(ff), "down_bias": sds(d),
  }
  return {"embed": sds(vocab, d), "pos": sds(ctx, d), "head": sds(d, vocab),
          "ln_f": {"scale": sds(d), "bias": sds(d)},
          "blocks": {f"{i}": block_params() for i in range(layers)}}


def block_matrix_dims(params: Any) -> Any:
  """The "transformer" preset's views (attention and MLP matrices; embeddings, positions,
  head, norms and biases left alone) as optax GaLore dims, which both libraries take."""
  return opt.matrix_rules(preset="transformer").galore(params)


def memory_bench(quick: bool) -> dict:
  params = gpt_small_shapes(layers=2 if quick else 12)
  rank = 128

  def make_txs(tree: Any) -> dict:
    dims = block_matrix_dims(tree)
    return {
        "adamw": optax.adamw(1e-3),
        "galore": optax.contrib.galore(1e-3, rank=rank, weight_dimension_numbers=dims),
        "dct_adamw": opt.dct_adamw(1e-3, rank, weight_dimension_numbers=dims),
        "dct_adamw_larger_side": opt.dct_adamw(1e-3, rank, side="larger",
                                               weight_dimension_numbers=dims),
        "online_subspace_descent": opt.online_subspace_descent(
            1e-3, rank, weight_dimension_numbers=dims),
    }

  blocks = {"blocks": params["blocks"]}  # the projected part of the tree
  txs, blocks_txs = make_txs(params), make_txs(blocks)
  param_bytes = tree_bytes(params)
  block_bytes = tree_bytes(params["blocks"])
  rows = []
  galore_projector = None
  for name, tx in txs.items():
    state = jax.eval_shape(tx.init, params)
    blocks_only = jax.eval_shape(blocks_txs[name].init, blocks)
    if name == "galore":
      projector = tree_bytes(state[0].projector)
      galore_projector = projector
    elif name == "adamw":
      projector = 0
    else:
      projector = tree_bytes(state[0].projector_state)
    rows.append({"optimizer": name, "state_bytes": tree_bytes(state),
                 "state_over_params": tree_bytes(state) / param_bytes,
                 "blocks_state_over_blocks": tree_bytes(blocks_only) / block_bytes,
                 "projector_bytes": projector})
  for r in rows:
    r["projector_vs_galore"] = r["projector_bytes"] / galore_projector
  print_table(rows, f"optimizer state, GPT-small-like tree ({param_bytes / 2**20:.0f} MiB params)"
              f", rank {rank}")
  by = {r["optimizer"]: r for r in rows}
  return {"param_bytes": param_bytes, "block_param_bytes": block_bytes, "rank": rank,
          "rows": rows,
          "dct_projector_vs_galore": by["dct_adamw"]["projector_vs_galore"],
          "projector_target_le": 0.01}


# ---------------------------------------------------------------------------
# Quality on the byte-level LM.
# ---------------------------------------------------------------------------


LM_LR, LM_WD, LM_GALORE_GAP = 3e-3, 0.01, 50


def _lm_methods(rank: int, dims: Any) -> dict[str, optax.GradientTransformation]:
  """The four optimizers of the LM comparison: same lr, weight decay, rank and scale."""
  return {
      "adamw": optax.adamw(LM_LR, weight_decay=LM_WD),
      "galore": optax.contrib.galore(LM_LR, rank=rank, update_proj_gap=LM_GALORE_GAP,
                                     weight_decay=LM_WD, weight_dimension_numbers=dims),
      "dct_adamw": opt.dct_adamw(LM_LR, rank, weight_decay=LM_WD, weight_dimension_numbers=dims),
      "online_subspace_descent": opt.online_subspace_descent(
          LM_LR, rank, weight_decay=LM_WD, scale=1.0, weight_dimension_numbers=dims),
  }


def lm_step_bench(quick: bool) -> dict:
  """Full training step (forward, backward, update) of the byte-level LM, round-robin."""
  cfg = lm.LMConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, seq_len=16) if quick \
      else lm.LMConfig()
  rank, batch = cfg.d_model // 4, 8
  graphdef, params = lm.build(cfg)
  dims = opt.matrix_rules(preset=lm.MATRIX_VIEW).galore(params)
  train, _ = lm.load_corpus(max_bytes=200_000)
  tokens = lm.sample_batch(train, batch, cfg.seq_len, np.random.default_rng(0))
  txs = _lm_methods(rank, dims)
  fns = {}
  for name, tx in txs.items():

    @jax.jit
    def step(params, state, tokens, tx=tx):
      grads = jax.grad(lambda p: lm.lm_loss(graphdef, p, tokens))(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    _, state = step(params, tx.init(params), tokens)  # past the first (init) step
    fns[name] = lambda step=step, state=state: step(params, state, tokens)
  t = interleaved(fns, rounds=2 if quick else 15).median
  rows = [{"optimizer": k, "train_step_s": v, "vs_adamw": v / t["adamw"]} for k, v in t.items()]
  print_table(rows, f"byte-level LM training step (batch {batch}, rank {rank})")
  return {"rows": rows, "osd_vs_adamw": t["online_subspace_descent"] / t["adamw"],
          "dct_vs_adamw": t["dct_adamw"] / t["adamw"], "galore_vs_adamw": t["galore"] / t["adamw"]}


def quality_bench(quick: bool) -> dict:
  cfg = lm.LMConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, seq_len=16) if quick \
      else lm.LMConfig()
  steps, batch, seeds = (2, 4, [0]) if quick else (300, 8, [0, 1, 2])
  rank = cfg.d_model // 4
  lr, wd, gap = LM_LR, LM_WD, LM_GALORE_GAP
  _, abstract = lm.build(cfg)
  dims = opt.matrix_rules(preset=lm.MATRIX_VIEW).galore(abstract)
  data = lm.load_corpus(max_bytes=200_000 if quick else 4_000_000)
  methods = _lm_methods(rank, dims)
  runs = []
  for seed in seeds:
    for name, tx in methods.items():
      r = lm.train(tx, cfg=cfg, steps=steps, batch_size=batch, seed=seed, data=data)
      runs.append({"optimizer": name, "seed": seed, "train_loss": r.final_train_loss,
                   "val_loss": r.val_loss, "step_s": r.step_time, "state_bytes": r.state_bytes})
      print(f"  {name:24s} seed {seed}: train {r.final_train_loss:.4f} val {r.val_loss:.4f}"
            f" step {r.step_time * 1e3:.1f} ms", flush=True)
  summary = []
  for name in methods:
    rs = [r for r in runs if r["optimizer"] == name]
    tr, va = [r["train_loss"] for r in rs], [r["val_loss"] for r in rs]
    summary.append({
        "optimizer": name, "train_mean": float(np.mean(tr)), "train_std": float(np.std(tr)),
        "val_mean": float(np.mean(va)), "val_std": float(np.std(va)),
        "step_s_median": statistics.median(r["step_s"] for r in rs),
        "state_bytes": rs[0]["state_bytes"],
    })
  adam_step = summary[0]["step_s_median"]
  for s in summary:
    s["step_vs_adamw"] = s["step_s_median"] / adam_step
  print_table(summary, f"byte-level LM, {steps} steps, batch {batch}, rank {rank}, "
              f"lr {lr}, seeds {seeds}")
  return {"config": {**cfg.__dict__, "steps": steps, "batch_size": batch, "rank": rank,
                     "lr": lr, "weight_decay": wd, "galore_update_proj_gap": gap,
                     "scale": 1.0, "seeds": seeds,
                     "projected": "attention q/k/v/out and MLP kernels"},
          "runs": runs, "summary": summary}


def main(quick: bool = False) -> dict:
  sections = {"dct_methods": dct_method_bench, "refresh": refresh_bench, "step": step_bench,
              "lm_step": lm_step_bench, "memory": memory_bench, "quality": quality_bench}
  results = run_sections(sections, quick, {})
  path = write_results("subspace", results)
  print(f"\nwrote {path} ({results['wall_s']:.0f} s)")
  return results


if __name__ == "__main__":
  command_line(main, __doc__)
