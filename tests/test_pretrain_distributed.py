"""`bench/pretrain.py --distributed`: 2 processes x 4 CPU devices, collectives over
gloo on loopback, reproduce the single-process 8-device loss trajectory, write one
orbax checkpoint collectively and resume from it in both processes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import pretrain

OPTIMIZERS = ("adamw", "spectra_adamw", "dct_adamw")
STEPS, STOP = 4, 2
MODEL = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32, seq_len=8)
ARGS = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--seq-len", "8",
        "--batch-size", "8", "--rank", "4", "--mesh", "4,2", "--steps", str(STEPS),
        "--warmup", "2"]
TIMEOUT_S = 240
RESUMED = "dct_adamw"  # its state holds projector indices and bases besides moments
# Each process runs every optimizer through the script's own entry point; RESUMED is
# stopped after STOP steps (one checkpoint written collectively) and resumed to STEPS.
DRIVER = """
import sys
from bench import pretrain
out, names, resumed, args = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[5:]
for name in names:
  run = [*args, "--distributed", "--optimizer", name, "--metrics", f"{out}/{name}.jsonl"]
  if name == resumed:
    run += ["--ckpt-dir", f"{out}/{name}", "--ckpt-every", sys.argv[4]]
    pretrain.main([*run, "--stop-after", sys.argv[4]])
  pretrain.main(run)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_reproduce_single_process(tmp_path):
  root = Path(__file__).resolve().parent.parent
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
         "JAX_NUM_PROCESSES": "2", "PYTHONPATH": str(root)}
  cmd = [sys.executable, "-c", DRIVER, str(tmp_path), ",".join(OPTIMIZERS), RESUMED, str(STOP),
         *ARGS]
  log_files = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(log_files):
      with open(log, "w") as out:
        procs.append(subprocess.Popen(cmd, cwd=root, env={**env, "JAX_PROCESS_ID": str(i)},
                                      stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:  # both killed on failure or timeout
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [log.read_text() for log in log_files]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
  # Process 0 reports what each run's compiled step costs.
  assert logs[0].count("compiled step:") == len(OPTIMIZERS) + 1

  for name in OPTIMIZERS:
    reference = pretrain.run(pretrain.RunConfig(
        optimizer=name, steps=STEPS, batch_size=8, warmup=2, rank=4, mesh=(4, 2),
        model=pretrain.GPTConfig(**MODEL), progress=False))
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))  # resumed at STOP, no repeat
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference],
                               rtol=1e-5, err_msg=name)
  saved = sorted(p.name for p in (tmp_path / RESUMED).iterdir() if p.name.isdigit())
  assert saved == [str(STOP), str(STEPS)]
