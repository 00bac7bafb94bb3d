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
