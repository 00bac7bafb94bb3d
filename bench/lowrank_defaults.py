"""Which defaults for the low-rank optimizers: measured on the demo language model.

Each choice is trained with the demo's budget (``bench/lm.py``'s byte-level transformer,
the ablation's warm-up + cosine schedule, rank 16, the model's linear-map view) for
several seeds, and the final train and validation losses are compared seed by seed:

* ``dct_adamw`` column score: ``score="l2"`` (the optimal subset of the DCT basis) against
  ``score="l1"`` (the DCT authors' code);
* ``online_subspace_descent`` initial basis: ``init="dct"`` (SVD-free: the best DCT
  vectors for the first gradient) against ``init="svd"`` (the authors' code: the top
  singular vectors of the first gradient);
* Adam moments (Trion: its buffer and AdamW moments) stored in bfloat16 against float32
  (``--only dtype_dct,dtype_osd,dtype_trion``; the update is computed in float32 either way);
* ``dct_adamw`` with ``on_refresh="rotate"``: the size of the first Adam update of a
  newly selected frequency (zero moments, the step count running on) relative to the
  frequencies kept from the previous step, at the same step.

    python -m bench.lowrank_defaults                 # 3 seeds, the demo's 300 steps
    python -m bench.lowrank_defaults --steps 60 --seeds 1 --only score

Writes ``bench/results/lowrank_defaults.json``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optimizers as opt
from bench.common import print_table, write_results
from bench.lm import MATRIX_VIEW, LMConfig, build, lm_loss, load_corpus, sample_batch, train

PEAK_LR, WEIGHT_DECAY, RANK = 3e-3, 0.01, 16
TRION_LR = 2e-2
BF16 = {"mu_dtype": "bfloat16", "nu_dtype": "bfloat16"}

CHOICES = {
    "score": ("dct_adamw", {"l2": {"score": "l2"}, "l1": {"score": "l1"}}),
    "init": ("online_subspace_descent", {"dct": {"init": "dct"}, "svd": {"init": "svd"}}),
    # Adam moments stored in bfloat16 (the update still computed in float32)
    "dtype_dct": ("dct_adamw", {"f32": {}, "bf16": BF16}),
    "dtype_osd": ("online_subspace_descent", {"f32": {}, "bf16": BF16}),
    "dtype_trion": ("trion", {"f32": {}, "bf16": BF16}),
}


def _schedule(steps: int, peak: float = PEAK_LR):
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps)


def _optimizer(factory: str, steps: int, **options):
  make = getattr(opt, factory)
  if factory == "trion":  # the demo row's rates (bench/methods.py)
    options = {"adam_learning_rate": _schedule(steps), **options}
    return make(_schedule(steps, TRION_LR), RANK, weight_decay=WEIGHT_DECAY,
                weight_dimension_numbers=MATRIX_VIEW, **options)
  return make(_schedule(steps), RANK, weight_decay=WEIGHT_DECAY,
              weight_dimension_numbers=MATRIX_VIEW, **options)


def compare(which: str, steps: int, seeds: Sequence[int], batch_size: int, data) -> list[dict]:
  factory, variants = CHOICES[which]
  rows = []
  for seed in seeds:
    for label, options in variants.items():
      result = train(_optimizer(factory, steps, **options), steps=steps, batch_size=batch_size,
                     seed=seed, data=data)
      rows.append({"choice": which, "method": factory, "variant": label, "seed": seed,
                   "final_train_loss": result.final_train_loss, "val_loss": result.val_loss})
      print(rows[-1], flush=True)
  return rows


def summarise(rows: list[dict]) -> list[dict]:
  out = []
  for which in sorted({r["choice"] for r in rows}):
    sel = [r for r in rows if r["choice"] == which]
    labels = list(dict.fromkeys(r["variant"] for r in sel))
    a, b = labels
    seeds = sorted({r["seed"] for r in sel})
    get = lambda lab, key, s, sel=sel: next(
        r[key] for r in sel if r["variant"] == lab and r["seed"] == s)
    for key in ("final_train_loss", "val_loss"):
      diffs = [get(b, key, s) - get(a, key, s) for s in seeds]
      out.append({
          "choice": which, "metric": key,
          a: statistics.mean(get(a, key, s) for s in seeds),
          b: statistics.mean(get(b, key, s) for s in seeds),
          f"{b}-{a} mean": statistics.mean(diffs),
          f"{b}-{a} per seed": diffs,
      })
  return out


def rotate_first_update(steps: int, seed: int, batch_size: int, data) -> dict:
  """First update of newly selected frequencies vs kept ones under on_refresh="rotate".

  The Adam direction of every kept column is ``mu_hat / (sqrt(nu_hat) + eps)`` read off the
  state after each step (the state holds what the update used); a column whose frequency
  was not selected the step before has just started from zero moments.
  """
  cfg = LMConfig()
  train_data, _ = data
  graphdef, params = build(cfg, seed)
  tx = _optimizer("dct_adamw", steps, on_refresh="rotate")
  state = tx.init(params)

  @jax.jit
  def step(params, state, tokens):
    grads = jax.grad(lambda p: lm_loss(graphdef, p, tokens))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def directions(sub):
    adam = sub.inner_state
    count = adam.count.astype(jnp.float32)
    out = {}
    leaves = zip(jax.tree.leaves(sub.projector_state.indices), jax.tree.leaves(adam.mu),
                 jax.tree.leaves(adam.nu), strict=True)
    for i, (idx, mu, nu) in enumerate(leaves):
      if idx.ndim < 1:  # not projected
        continue
      u = (mu / (1 - B1**count)) / (jnp.sqrt(nu / (1 - B2**count)) + 1e-8)
      out[i] = (np.asarray(idx), np.asarray(jnp.abs(u), np.float64))
    return out

  rng = np.random.default_rng(seed)
  previous = None
  ratios, fresh_counts, late = [], [], []
  for t in range(steps):
    params, state = step(params, state, sample_batch(train_data, batch_size, cfg.seq_len, rng))
    current = directions(state[0])
    if previous is not None:
      new_sizes, kept_sizes = [], []
      for key, (idx, u) in current.items():
        old = previous[key][0]
        new = ~np.isin(idx, old)  # (..., r): columns that changed frequency
        cols = np.moveaxis(u, -1, 0).reshape(u.shape[-1], -1) if u.ndim == 2 else None
        if cols is None:  # stacked layers: (*batch, k, r)
          u2 = u.reshape(-1, *u.shape[-2:])
          n2 = new.reshape(-1, new.shape[-1])
          for ub, nb in zip(u2, n2, strict=True):
            new_sizes += list(np.sqrt((ub[:, nb] ** 2).mean(0)))
            kept_sizes += list(np.sqrt((ub[:, ~nb] ** 2).mean(0)))
        else:
          new_sizes += list(np.sqrt((cols[new] ** 2).mean(1)))
          kept_sizes += list(np.sqrt((cols[~new] ** 2).mean(1)))
      if new_sizes and kept_sizes:
        ratios.append(float(np.mean(new_sizes) / np.mean(kept_sizes)))
        fresh_counts.append(len(new_sizes))
        late.append(t >= steps // 2)
    previous = current
  ratios_a = np.asarray(ratios)
  late_a = np.asarray(late, bool)
  return {
      "steps_with_new_frequencies": len(ratios),
      "new_columns_per_step_mean": float(np.mean(fresh_counts)) if fresh_counts else 0.0,
      "rms_ratio_new_over_kept_median": float(np.median(ratios_a)) if ratios else None,
      "rms_ratio_new_over_kept_second_half_median":
          float(np.median(ratios_a[late_a])) if late_a.any() else None,
      "predicted_ratio_at_step_300_one_sample": _fresh_first_update(300),
  }


B1, B2 = 0.9, 0.999


def _fresh_first_update(step: int) -> float:
  """|first Adam update| of a coordinate whose moments start at zero at global ``step``:
  ``((1 - b1) / (1 - b1^t)) / sqrt((1 - b2) / (1 - b2^t))`` (one sample, eps ignored)."""
  return ((1 - B1) / (1 - B1**step)) / np.sqrt((1 - B2) / (1 - B2**step))


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--only", default="score,init,rotate,dtype_dct,dtype_osd,dtype_trion")
  p.add_argument("--name", default="lowrank_defaults")
  a = p.parse_args(argv)
  data = load_corpus()
  only = a.only.split(",")
  rows = []
  for which in CHOICES:
    if which in only:
      rows += compare(which, a.steps, range(a.seeds), a.batch_size, data)
  results = {"config": vars(a), "runs": rows, "summary": summarise(rows) if rows else []}
  if "rotate" in only:
    results["rotate_first_update"] = rotate_first_update(a.steps, 0, a.batch_size, data)
  if results["summary"]:
    print_table(results["summary"], title="low-rank defaults (demo LM)")
  print(results.get("rotate_first_update"))
  write_results(a.name, results)
  return results


if __name__ == "__main__":
  main()
