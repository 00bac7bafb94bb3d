"""Smoke tests of the benchmarks (`--quick`) and the demo ablation (tiny budget).

Timings are never asserted here; the figures live in bench/results/ from full runs.
"""

import importlib
import json

import pytest

from bench.__main__ import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_quick(family, monkeypatch, tmp_path):
  monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
  module = importlib.import_module(f"bench.bench_{family}")
  module.main(quick=True)
  files = list(tmp_path.glob("*.json"))
  assert files, f"bench_{family} wrote no JSON"
  for f in files:
    assert "meta" in json.loads(f.read_text())


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
