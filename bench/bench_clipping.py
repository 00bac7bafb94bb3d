"""Coordinate-wise clipping: exact (concatenate + sort) vs bisection (per-leaf counts).

On a tree of ~10^8 float32 coordinates (``--quick``: ~10^6) in four leaves of
different shapes, with heavy-tailed (Student-t, 3 d.o.f.) values, measures in one
run:

* the median time of one jitted ``clip_coordinatewise(0.1)`` update for
  ``method="exact"``, ``method="bisect"`` (default steps: the exact tau) and
  ``method="bisect", bisect_steps=16`` (approximate), and of the fixed-threshold
  update (one elementwise pass, the floor any method pays);
* XLA's compiled memory (temporaries and peak) of the update and of the
  threshold search alone (:func:`optimizers.coordinatewise_threshold`), whose
  temporaries are what the method costs beyond the inputs and outputs;
* agreement of tau between the methods (bit-for-bit and relative difference).

Output: a table, and ``bench/results/clipping.json``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
  command_line,
  compiled_memory,
  print_table,
  time_fn,
  tree_bytes,
  write_results,
)
from optimizers import clip_coordinatewise, coordinatewise_threshold

FRACTION = 0.1


def make_tree(quick: bool) -> dict:
  d = 512 if quick else 4096
  shapes = {
      "embed": (2 * d, d),
      "layers": (8, d // 4, d),  # stacked (scanned) layers
      "head": (d, 2 * d),
      "norms": (8, d),
  }
  keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
  return {name: jax.random.t(k, 3.0, s, jnp.float32)
          for k, (name, s) in zip(keys, shapes.items(), strict=True)}


def main(quick: bool = False) -> dict:
  tree = make_tree(quick)
  n = sum(x.size for x in jax.tree.leaves(tree))
  configs = {
      "exact": {"fraction": FRACTION, "method": "exact"},
      "bisect": {"fraction": FRACTION, "method": "bisect"},
      "bisect_16_steps": {"fraction": FRACTION, "method": "bisect", "bisect_steps": 16},
      "fixed_threshold": {"threshold": 2.0},
  }
  repeats = 2 if quick else 3
  rows, taus = [], {}
  for name, kwargs in configs.items():
    tx = clip_coordinatewise(**kwargs)
    state = tx.init(tree)
    update = jax.jit(tx.update)
    seconds = time_fn(update, tree, state, repeats=2 if name == "exact" else repeats)
    _, new_state = update(tree, state)
    taus[name] = float(new_state.threshold)
    mem = compiled_memory(tx.update, tree, state)
    row = {
        "method": name,
        "update_s": seconds,
        "update_temp_MB": mem["temp_bytes"] / 2**20,
        "update_peak_MB": mem["peak_bytes"] / 2**20,
        "tau": taus[name],
        "clip_fraction": float(new_state.clip_fraction),
    }
    if "fraction" in kwargs:
      search = lambda t, kw=kwargs: coordinatewise_threshold(
          t, kw["fraction"], method=kw["method"], bisect_steps=kw.get("bisect_steps"))
      search_mem = compiled_memory(search, tree)
      row["search_temp_MB"] = search_mem["temp_bytes"] / 2**20
    rows.append(row)
    print(f"  {name}: {seconds:.3f} s", flush=True)

  by = {r["method"]: r for r in rows}
  exact, bisect = by["exact"], by["bisect"]
  ratios = {
      "bisect_over_exact_update_time": bisect["update_s"] / exact["update_s"],
      "bisect_over_fixed_threshold_time": bisect["update_s"] / by["fixed_threshold"]["update_s"],
      "exact_over_fixed_threshold_time": exact["update_s"] / by["fixed_threshold"]["update_s"],
      "bisect_search_temp_MB": bisect["search_temp_MB"],
      "exact_search_temp_MB": exact["search_temp_MB"],
      "tau_bisect_equals_exact": taus["bisect"] == taus["exact"],
      "tau_bisect_16_rel_error": abs(taus["bisect_16_steps"] - taus["exact"]) / taus["exact"],
      "tau_bisect_16_bound": float(np.exp(2.0 ** (8 - 16)) - 1),
  }
  print_table(rows, title=f"clip_coordinatewise(fraction={FRACTION}), N = {n:,} coordinates, "
                          f"{tree_bytes(tree) / 2**20:.0f} MB")
  print_table([ratios], title="ratios")
  results = {
      "config": {"quick": quick, "num_coordinates": n, "tree_bytes": tree_bytes(tree),
                 "shapes": {k: list(v.shape) for k, v in tree.items()}, "fraction": FRACTION},
      "rows": rows,
      "ratios": ratios,
  }
  path = write_results("clipping", results)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  command_line(main, __doc__)
