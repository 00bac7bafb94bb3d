"""`make demo`: one small language model trained with every method of the toolkit.

A byte-level transformer (``bench/lm.py``) on the Python standard library's own
sources, the same budget, seed and data order for each method. Prints a table
(final train/val loss, step time relative to AdamW, optimizer-state MB), writes
the loss curves to ``bench/results/ablation.png`` and everything to
``bench/results/ablation.json``. Sven, which needs per-example residuals and is
built for small regression problems, runs beside it on the paper's 1-D fit.

    python -m bench.ablation                   # default budget (< 10 min on 2 cores)
    python -m bench.ablation --steps 50 --methods adamw,sam --d-model 32
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np
import optax

from bench import methods as methods_lib
from bench.common import method_style, print_table, results_dir, write_results
from bench.lm import MATRIX_VIEW, LMConfig, lm_loss, load_corpus, train

DEFAULT_METHODS = (
    "adamw", "adamw+clip", "sgd", "sgd+clip", "spectra_adamw", "galore", "dct_adamw",
    "online_subspace_descent", "trion", "sam", "mesa", "bloop", "perp_grad",
)


def _lm_task(graphdef) -> methods_lib.Task:
  def per_example(params, tokens):
    from flax import nnx

    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)

  return methods_lib.Task(loss=lambda p, t: lm_loss(graphdef, p, t), per_example_loss=per_example)


def run_lm_method(method: methods_lib.Method, cfg: LMConfig, steps: int, batch_size: int,
                  seed: int, data) -> dict:
  schedule = optax.warmup_cosine_decay_schedule(0.0, method.lr, max(steps // 10, 1), steps)
  extra = None
  if method.extra_args is not None:
    extra = lambda graphdef, params, tokens: method.extra_args(_lm_task(graphdef), params, tokens)
  result = train(method.build(schedule), cfg=cfg, steps=steps, batch_size=batch_size, seed=seed,
                 data=data, extra_args=extra, progress=True, desc=method.name,
                 teacher=method.teacher() if method.teacher else None)
  return {
      "method": method.name,
      "final_train_loss": result.final_train_loss,
      "val_loss": result.val_loss,
      "step_time_s": result.step_time,
      "state_mb": result.state_bytes / 2**20,
      "curve": result.train_losses,
      "note": method.note,
  }


def plot_curves(rows: list[dict], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for i, r in enumerate(rows):
    curve = np.asarray(r["curve"])
    k = max(1, len(curve) // 50)
    smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=r["method"], **method_style(i),
            markevery=max(1, len(smooth) // 10), markersize=4, linewidth=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats/byte, smoothed)")
  ax.set_title("byte-level LM on stdlib sources: every method, same budget")
  ax.legend(fontsize=8, ncol=2)
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                 help=f"comma-separated subset of {sorted(methods_lib.registry())}")
  p.add_argument("--no-sven", action="store_true", help="skip the Sven regression run")
  p.add_argument("--name", default="ablation", help="results file stem")
  a = p.parse_args(argv)

  registry = methods_lib.registry(a.rank, MATRIX_VIEW)
  names = [n for n in a.methods.split(",") if n]
  unknown = sorted(set(names) - set(registry))
  if unknown:
    p.error(f"unknown methods {unknown}; choose from {sorted(registry)}")
  cfg = LMConfig(d_model=a.d_model, num_layers=a.layers, d_ff=4 * a.d_model, seq_len=a.seq_len)
  data = load_corpus(max_bytes=2_000_000)
  print(f"byte-level LM d_model={cfg.d_model} layers={cfg.num_layers} seq={cfg.seq_len}, "
        f"{a.steps} steps x batch {a.batch_size}, {jax.devices()[0].platform}")
  rows = [run_lm_method(registry[n], cfg, a.steps, a.batch_size, a.seed, data) for n in names]
  base = next((r["step_time_s"] for r in rows if r["method"] == "adamw"), rows[0]["step_time_s"])
  for r in rows:
    r["time_vs_adamw"] = r["step_time_s"] / base
  print_table([{k: r[k] for k in ("method", "final_train_loss", "val_loss", "time_vs_adamw",
                                  "state_mb", "note")} for r in rows],
              title="LM ablation (final train loss = mean of the last 10% of steps)")
  results = {"config": vars(a), "lm": rows}
  if not a.no_sven:
    from bench.bench_sven import regression_comparison

    sven_rows = regression_comparison(quick=a.steps < 100)
    print_table(sven_rows, title="Sven beside it: 1-D regression (MLP 1-16-16-16-1)")
    results["sven_regression"] = sven_rows
  out = results_dir()
  out.mkdir(parents=True, exist_ok=True)
  plot_curves(rows, out / f"{a.name}.png")
  path = write_results(a.name, results)
  print(f"\nwrote {path} and {out / (a.name + '.png')}")
  return results


if __name__ == "__main__":
  main()
