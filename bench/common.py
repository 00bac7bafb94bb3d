"""Shared benchmark utilities: timing with warm-up and medians, compiled-memory
figures, and JSON output with device metadata under bench/results/."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
  """``bench/results``, or ``$BENCH_RESULTS_DIR`` (quick/smoke runs write there, so they
  never overwrite the committed full-run figures)."""
  return Path(os.environ.get("BENCH_RESULTS_DIR", RESULTS_DIR))


def block(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def time_fn(
    fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1, **kwargs: Any
) -> float:
  """Median wall time in seconds of ``fn(*args)`` after ``warmup`` calls (compile)."""
  for _ in range(warmup):
    block(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compiled_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
  """XLA's static memory analysis of ``jax.jit(fn)(*args)``: bytes of arguments,
  outputs, temporaries, and their sum (the program's peak working set)."""
  compiled = jax.jit(fn).lower(*args, **kwargs).compile()
  m = compiled.memory_analysis()
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
  }
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree``."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves))


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
  """Measured float32 matmul throughput of the default device (n x n x n)."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / time_fn(f, a, repeats=repeats)


def metadata() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "device": dev.device_kind,
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "machine": platform.machine(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def write_results(name: str, results: dict[str, Any]) -> Path:
  """Writes ``<results_dir()>/<name>.json`` (``<name>_<platform>`` off CPU)."""
  out_dir = results_dir()
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = metadata()
  suffix = "" if meta["platform"] == "cpu" else f"_{meta['platform']}"
  path = out_dir / f"{name}{suffix}.json"
  path.write_text(json.dumps({"meta": meta, **results}, indent=2, default=float) + "\n")
  return path


def run_sections(
    sections: dict[str, Callable[[bool], Any]],
    quick: bool,
    results: dict[str, Any],
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
  """Runs each ``section(quick)`` into ``results[name]``, inside ``context()``, recording
  per-section and total wall times (``section_wall_s``, ``wall_s``)."""
  t0 = time.perf_counter()
  walls = results.setdefault("section_wall_s", {})
  for name, section in sections.items():
    t1 = time.perf_counter()
    with context():
      results[name] = section(quick)
    walls[name] = time.perf_counter() - t1
  results["wall_s"] = time.perf_counter() - t0
  return results


def command_line(main: Callable[..., Any], doc: str | None) -> None:
  """``python -m bench.bench_<family> [--quick]``: parses the flag and runs ``main``."""
  parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
  main(quick=parser.parse_args().quick)


def print_table(rows: list[dict[str, Any]], title: str = "") -> None:
  """Prints a list of dicts as an aligned text table."""
  if title:
    print(f"\n== {title}")
  if not rows:
    return
  cols = list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  width = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
  print("  ".join(c.ljust(width[c]) for c in cols))
  for r in rows:
    print("  ".join(fmt(r.get(c, "")).ljust(width[c]) for c in cols))
