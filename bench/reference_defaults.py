"""Defaults chosen by measurement: each option against its alternative on the demo LM.

The byte-level LM of ``bench/lm.py`` (the demo's data, warm-up + cosine schedule
and AdamW at 3e-3, as in ``bench/ablation.py``), a few seeds per variant, mean
and spread of the final train loss (mean of the last 10% of steps) and of the
validation loss. Groups:

* ``asam_rho``: ``sam(adaptive=True)`` with rho 0.05 (SAM's radius) vs 0.5
  (ASAM's recommended radius, the default when rho is not given).
* ``bloop_ema_init``: ``bloop`` with its main-gradient EMA started at zeros vs
  at the first gradient (the reference code's default), and ``"random"``.
* ``adamw_clip``: ``clipped_adamw`` (first moment sees the clipped gradient,
  second moment the raw one) vs ``chain(clip_coordinatewise, adamw)`` (both
  moments see the clipped gradient) vs plain AdamW.

    python -m bench.reference_defaults --groups asam_rho --seeds 3 --steps 150
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import optax

import optimizers as opt
import regularizers as reg
from bench import methods as methods_lib
from bench.ablation import run_lm_method
from bench.common import print_table, write_results
from bench.lm import LMConfig, load_corpus

WD = 0.01


def _adamw(lr: Any) -> optax.GradientTransformation:
  return optax.adamw(lr, weight_decay=WD)


def _variants() -> dict[str, dict[str, methods_lib.Method]]:
  grad_fn, aux = methods_lib._grad_fn, methods_lib._aux_grads  # noqa: SLF001
  method = methods_lib.Method
  groups: dict[str, dict[str, methods_lib.Method]] = {
      "asam_rho": {
          f"asam rho={rho}": method(
              f"asam rho={rho}",
              lambda lr, rho=rho: optax.chain(reg.sam(rho, adaptive=True), _adamw(lr)), 3e-3,
              grad_fn)
          for rho in (0.05, 0.5)
      },
  }
  bloop_params = _bloop_init_options()
  if bloop_params:
    groups["bloop_ema_init"] = {
        f"bloop ema_init={init}": method(
            f"bloop ema_init={init}",
            lambda lr, init=init: optax.chain(reg.bloop(1e-3, ema_init=init), _adamw(lr)), 3e-3,
            aux)
        for init in bloop_params
    }
  if hasattr(opt, "clipped_adamw"):
    groups["adamw_clip"] = {
        "adamw": method("adamw", _adamw, 3e-3),
        "chain(clip, adamw)": method("chain(clip, adamw)", lambda lr: optax.chain(
            opt.clip_coordinatewise(0.05), _adamw(lr)), 3e-3),
        "clipped_adamw": method("clipped_adamw", lambda lr: opt.clipped_adamw(
            lr, 0.05, weight_decay=WD), 3e-3),
    }
  return groups


def _bloop_init_options() -> tuple[str, ...]:
  import inspect

  if "ema_init" not in inspect.signature(reg.bloop).parameters:
    return ()
  return ("zeros", "grad", "random")


def summarise(rows: list[dict]) -> dict[str, float]:
  def stats(key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

  train_mean, train_sd = stats("final_train_loss")
  val_mean, val_sd = stats("val_loss")
  return {"train_mean": train_mean, "train_sd": train_sd, "val_mean": val_mean,
          "val_sd": val_sd, "seeds": len(rows),
          "train_per_seed": [r["final_train_loss"] for r in rows],
          "val_per_seed": [r["val_loss"] for r in rows]}


def main(argv: Sequence[str] | None = None) -> dict:
  groups = _variants()
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--groups", default=",".join(groups), help=f"subset of {sorted(groups)}")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--d-model", type=int, default=32)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--name", default="reference_defaults", help="results file stem")
  a = p.parse_args(argv)
  cfg = LMConfig(d_model=a.d_model, num_layers=a.layers, d_ff=4 * a.d_model, seq_len=a.seq_len)
  data = load_corpus(max_bytes=2_000_000)
  results: dict[str, Any] = {"config": vars(a), "groups": {}}
  table = []
  run: Callable[..., dict] = run_lm_method
  for group in [g for g in a.groups.split(",") if g]:
    if group not in groups:
      p.error(f"unknown group {group!r}; choose from {sorted(groups)}")
    results["groups"][group] = {}
    for name, method in groups[group].items():
      rows = [run(method, cfg, a.steps, a.batch_size, seed, data) for seed in range(a.seeds)]
      summary = summarise(rows)
      results["groups"][group][name] = summary
      table.append({"group": group, "variant": name,
                    **{k: v for k, v in summary.items() if not k.endswith("per_seed")}})
      print(table[-1], flush=True)
  print_table(table, title=f"demo LM, {a.seeds} seeds, {a.steps} steps")
  path = write_results(a.name, results)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
