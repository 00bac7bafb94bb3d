"""Executes every ablation notebook with FAST=1 (small budgets, same code paths)."""

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = {p.stem for p in NOTEBOOKS}
  expected = {"sharpness", "spectral_clipping", "low_rank", "sven", "gradient_surgery"}
  assert expected <= names, f"missing notebooks: {sorted(expected - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_ends_with_its_checks(path):
  """The last code cell asserts what the notebook's conclusions rest on (executed below)."""
  import nbformat

  code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
  assert code and "assert " in code[-1].source, f"{path.name}: no closing assertion cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch, tmp_path):
  import nbformat
  from nbclient import NotebookClient

  monkeypatch.setenv("FAST", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
  # One CPU device per notebook kernel (the 8-device flag is for the sharding tests), and
  # LLVM's optimisation level 0: FAST runs are compile-bound (tiny models), and level 0 cuts
  # the kernels' CPU time by about a quarter (153 -> 111 s for the five notebooks); results
  # differ from the default level only in the last bits.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("NOTEBOOK_XLA_FLAGS",
                                                 "--xla_backend_optimization_level=0"))
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
