"""`python -m bench [--quick] [--only a,b]`: every speed/memory benchmark in one go.

Runs ``bench/bench_<family>.py`` for each method family (each measures gradsmith
and its anchor in the same run and writes ``bench/results/<family>.json``), then
prints and writes a summary (``bench/results/summary.json``). ``--quick`` runs
small shapes (the smoke test in ``make test``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
import traceback
from collections.abc import Sequence

from bench.common import print_table, write_results

FAMILIES = ("clipping", "spectral", "subspace", "sharpness", "sven", "surgery", "sharding")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true", help="small shapes, seconds per family")
  p.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families")
  a = p.parse_args(argv)
  if a.quick:  # never overwrite the committed full-run results
    os.environ.setdefault("BENCH_RESULTS_DIR", tempfile.mkdtemp(prefix="bench_quick_"))
  rows, failed = [], []
  for family in [f for f in a.only.split(",") if f]:
    t0 = time.perf_counter()
    try:
      module = importlib.import_module(f"bench.bench_{family}")
      module.main(quick=a.quick)
      status = "ok"
    except Exception:  # report every family, then fail at the end
      traceback.print_exc()
      status = "FAILED"
      failed.append(family)
    rows.append({"family": family, "status": status, "seconds": time.perf_counter() - t0})
  print_table(rows, title="benchmarks" + (" (quick)" if a.quick else ""))
  if not a.quick:
    write_results("summary", {"families": rows})
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
