"""Shared benchmark utilities: timing with warm-up and medians, compiled-memory
figures, and JSON output with device metadata under bench/results/."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

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


class Timings(NamedTuple):
  """Seconds per call of each timed function (median and minimum) and its last output."""

  median: dict[str, float]
  min: dict[str, float]
  last: dict[str, Any]


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1,
                warmup: bool = True) -> Timings:
  """Times zero-argument functions interleaved, the one timer of every benchmark.

  Each function is called once first (compile, warm caches; ``warmup=False`` skips
  this for precompiled programs too slow to run twice), then ``rounds`` rounds in
  which every function runs ``repeats`` times in turn, each call timed to
  ``block_until_ready``. Interleaving spreads a shared machine's load over all the
  variants alike: the median is the typical figure, the minimum the least
  disturbed one; compare ratios from the same call, not absolute times.
  """
  if rounds < 1 or repeats < 1:
    raise ValueError(f"rounds and repeats must be >= 1, got {rounds} and {repeats}.")
  last: dict[str, Any] = {}
  if warmup:
    for name, fn in fns.items():
      last[name] = block(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(repeats):
        t0 = time.perf_counter()
        last[name] = block(fn())
        samples[name].append(time.perf_counter() - t0)
  return Timings({k: statistics.median(v) for k, v in samples.items()},
                 {k: min(v) for k, v in samples.items()}, last)


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


def progress(iterable: Iterable[Any], desc: str, total: int | None = None,
             initial: int = 0) -> Iterable[Any]:
  """A tqdm progress bar on a terminal (or in a Jupyter kernel); elsewhere (a log
  file, CI) no frames at all but one line, ``desc: N steps in S s``, when the loop ends."""
  if sys.stderr.isatty() or "ipykernel" in sys.modules:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False)
  return _one_line(iterable, desc)


def _one_line(iterable: Iterable[Any], desc: str) -> Iterator[Any]:
  t0, n = time.perf_counter(), 0
  try:
    for item in iterable:
      yield item
      n += 1
  finally:
    print(f"{desc}: {n} steps in {time.perf_counter() - t0:.1f} s", flush=True)


# 10 colours x 13 markers x 4 line styles: the first 10 methods differ in colour and
# marker, the first 13 in marker, and any 40 in (colour, line style).
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "8"]
_LINESTYLES = ["-", "--", ":", "-."]


def method_style(i: int) -> dict[str, Any]:
  """Matplotlib ``plot`` keyword arguments for the ``i``-th method of a figure: a
  colour, marker and line style cycle that tells 12+ methods apart (also in grey)."""
  return {"color": _COLOURS[i % len(_COLOURS)], "marker": _MARKERS[i % len(_MARKERS)],
          "linestyle": _LINESTYLES[(i // len(_COLOURS)) % len(_LINESTYLES)]}
