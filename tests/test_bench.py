"""Smoke tests of the benchmarks (`--quick`) and the demo ablation (tiny budget).

Timings are never asserted here; the figures live in bench/results/ from full runs.
"""

import importlib
import json
import math

import pytest

from bench.__main__ import FAMILIES

# Correctness figures of each benchmark's quick run (errors, equalities, compiled memory);
# never timings. Tolerances: about 10x the error measured in quick and full runs.


def _check_clipping(r):
  ratios = r["ratios"]
  assert ratios["tau_bisect_equals_exact"] is True
  assert ratios["tau_bisect_16_rel_error"] <= ratios["tau_bisect_16_bound"]
  rows = {row["method"]: row for row in r["rows"]}
  fraction = r["config"]["fraction"]
  for method in ("exact", "bisect"):
    assert rows[method]["tau"] == rows["exact"]["tau"]
    assert fraction <= rows[method]["clip_fraction"] <= fraction + 1e-5, rows[method]
  # bisection needs no copy of the tree (compiled temporaries): measured 6 MB vs 0.6 kB
  assert ratios["bisect_search_temp_MB"] < 1e-2 * ratios["exact_search_temp_MB"]


def _check_spectral(r):
  for row in r["rows"]:  # vs the float64 SVD clip; measured ~1e-6
    assert row["soft_rel_err"] < 1e-5 and row["hard_rel_err"] < 1e-5, row
  assert r["checks"]["rel_err_target_met"] is True


def _check_subspace(r):
  rows = {row["optimizer"]: row for row in r["memory"]["rows"]}
  assert abs(rows["adamw"]["state_over_params"] - 2) < 1e-6  # two moments, exactly
  # DCT keeps int32 indices where GaLore keeps float bases: measured 6.6e-4 of GaLore's bytes
  assert rows["dct_adamw"]["projector_vs_galore"] <= r["memory"]["projector_target_le"]
  assert rows["dct_adamw"]["blocks_state_over_blocks"] < 0.5 * rows["adamw"][
      "blocks_state_over_blocks"]
  for run in r["quality"]["runs"]:
    assert math.isfinite(run["train_loss"]) and math.isfinite(run["val_loss"]), run


def _check_sharpness(r):
  assert r["targets"]["sam_no_param_sized_state"] is True
  for model in r["sam"].values():
    assert "sam" in model["variants"]
    for name in {"sam", "asam"} & set(model["variants"]):  # a counter and two norms
      assert model["variants"][name]["param_sized_arrays_beyond_base"] == 0
      assert model["variants"][name]["extra_state_bytes"] <= 16


CHECKS = {"clipping": _check_clipping, "spectral": _check_spectral,
          "subspace": _check_subspace, "sharpness": _check_sharpness}


@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_quick(family, monkeypatch, tmp_path):
  monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
  module = importlib.import_module(f"bench.bench_{family}")
  module.main(quick=True)
  files = list(tmp_path.glob("*.json"))
  assert files, f"bench_{family} wrote no JSON"
  for f in files:
    results = json.loads(f.read_text())
    assert "meta" in results
    if family in CHECKS:
      CHECKS[family](results)


def test_demo_ablation_tiny(monkeypatch, tmp_path):
  from bench import ablation

  monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
  results = ablation.main(["--steps", "4", "--d-model", "16", "--seq-len", "16",
                           "--methods", "adamw,sam,dct_adamw", "--rank", "4", "--no-sven"])
  assert [r["method"] for r in results["lm"]] == ["adamw", "sam", "dct_adamw"]
  assert (tmp_path / "ablation.png").exists() and (tmp_path / "ablation.json").exists()


def test_lm_matrix_view_is_block_kernels_only():
  """Attention q/k/v/out and MLP kernels are matrices (attention as d_model x d_model);
  embeddings, positions, the head, biases and norms are not."""
  import jax

  from bench import lm
  from optimizers.matrices import matrix_shape, resolve_matrix_dims

  cfg = lm.LMConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, seq_len=8)
  _, params = lm.build(cfg)
  dims = resolve_matrix_dims(lm.MATRIX_VIEW, params)
  views = {}
  for (path, leaf), d in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.structure(params).flatten_up_to(dims),
      strict=True,
  ):
    if d is not None:
      keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
      views[keys] = matrix_shape(leaf.shape, d)
  assert len(views) == 2 * 6  # per block: query, key, value, out, up, down
  for keys, (batch, m, n) in views.items():
    assert keys[0] == "blocks" and keys[-1] == "kernel" and batch == (), keys
    assert (m, n) == {"up": (16, 32), "down": (32, 16)}.get(keys[-2], (16, 16)), (keys, m, n)
