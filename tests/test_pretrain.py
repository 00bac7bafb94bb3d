"""The sharded pretraining script on 8 simulated CPU devices (mesh 4 x 2)."""

import pytest

from _reference import assert_descends
from bench.methods import registry
from bench.pretrain import GPTConfig, RunConfig, run

SMALL = GPTConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, seq_len=16, scan_layers=True)


def _config(**kw) -> RunConfig:
  base = dict(steps=3, batch_size=8, model=SMALL, mesh=(4, 2), progress=False, rank=4, warmup=1)
  return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("name", sorted(registry()))
def test_each_optimizer_trains_sharded_with_stacked_layers(name):
  history = run(_config(optimizer=name))
  losses = [h["loss"] for h in history]
  assert len(losses) == 3
  assert_descends(losses, what=f"{name} training loss")  # finite, and it goes down


# The script's checkpoint path with per-layer weights, a projector state, and MESA's teacher
# (every transform's own mid-run resume is covered in test_robustness.py).
RESUME_CASES = [("adamw", False), ("dct_adamw", True), ("mesa", True)]


@pytest.mark.parametrize("name,scan", RESUME_CASES)
def test_resume_reproduces_uninterrupted_run(name, scan, tmp_path):
  model = GPTConfig(**{**SMALL.__dict__, "scan_layers": scan})
  full = run(_config(optimizer=name, steps=6, model=model))
  ckpt = str(tmp_path / "ckpt")
  first = run(_config(optimizer=name, steps=6, model=model, ckpt_dir=ckpt, ckpt_every=3,
                      stop_after=3))
  second = run(_config(optimizer=name, steps=6, model=model, ckpt_dir=ckpt, ckpt_every=3))
  assert [h["step"] for h in second] == [3, 4, 5]
  resumed = [h["loss"] for h in first + second]
  assert resumed == [h["loss"] for h in full]  # bit-identical trajectory


def test_metrics_jsonl(tmp_path):
  import json

  path = tmp_path / "m.jsonl"
  run(_config(metrics=str(path)))
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert {"loss", "grad_norm", "lr", "step_time"} <= set(rows[0])
