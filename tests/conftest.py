"""Test configuration: 8 simulated CPU devices for the sharding tests, and the order in which
`make test`'s two xdist workers take the tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("FAST", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Scheduling of `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make test). Each test
# file is one unit of work for one worker (its tests share that worker's module caches and
# compiled programs), except the files in SPLIT, whose tests are long and independent
# (notebooks, benchmarks): each of their tests is a unit of its own. Units start longest
# first, so that no long unit is left for the end while the other worker idles (xdist's own
# order, by number of tests per file, puts the few-but-long tests last). The estimates are
# rough seconds on the 2-core CI machine; only their order matters.
SPLIT = ("tests/test_notebooks.py", "tests/test_bench.py")
ESTIMATED_SECONDS = {  # nodeid prefix -> seconds per test (files not listed: by test count)
    "tests/test_notebooks.py::test_notebook_executes": 100.0,
    "tests/test_bench.py::test_benchmark_quick[sven]": 110.0,
    "tests/test_bench.py::test_benchmark_quick[sharding]": 80.0,
    "tests/test_bench.py::test_benchmark_quick[surgery]": 60.0,
    "tests/test_bench.py::test_benchmark_quick[subspace]": 50.0,
    "tests/test_bench.py::test_benchmark_quick": 15.0,
    "tests/test_bench.py::test_demo_ablation_tiny": 25.0,
    "tests/test_pretrain_distributed.py": 200.0,
    "tests/test_sven.py": 2.5,
    "tests/test_surgery_options.py": 5.0,
}
SECONDS_PER_OTHER_TEST = 0.4


def _estimate(nodeid: str) -> float:
  keys = [k for k in ESTIMATED_SECONDS if nodeid.startswith(k)]
  return ESTIMATED_SECONDS[max(keys, key=len)] if keys else SECONDS_PER_OTHER_TEST


def _unit(nodeid: str) -> str:
  path = nodeid.split("::", 1)[0]
  return nodeid if path in SPLIT else path


def pytest_collection_modifyitems(config, items):
  """On xdist workers (which must agree on the order): units by decreasing estimated time,
  the file order kept inside a unit. The controller schedules units in this order."""
  if not hasattr(config, "workerinput"):
    return
  cost = {}
  for item in items:
    cost[_unit(item.nodeid)] = cost.get(_unit(item.nodeid), 0.0) + _estimate(item.nodeid)
  items.sort(key=lambda item: -cost[_unit(item.nodeid)])


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile`, except that each test of a SPLIT file is a unit of its own."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class LoadFileSplitHeavy(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _unit(nodeid)

  return LoadFileSplitHeavy(config, log)
