"""Every method on a sharded mesh, measured from the compiled SPMD program.

For every method of the registry (``bench/methods.py``, plus ``svd_subspace``:
:func:`optimizers.subspace` with the SVD projector; ``mixed`` and
``dynamic_barrier``, the other gradient-surgery rules; ``sam_own_work``: SAM with
a ``grad_fn`` elementwise in the perturbed parameters, so that its update holds
SAM's own collectives and not the model's second forward/backward pass) this
lowers and compiles, on
8 devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a CPU):

* one optimizer update (``tx.update`` + ``optax.apply_updates``), and
* the full train step (loss, gradients, update) of the pretraining GPT,

with the pretraining script's parameter and state specs (``bench/pretrain.py``:
rows over ``data``, columns over ``model``; state specs from
:func:`optimizers.subspace_partition_specs`), for meshes ``8,1`` (pure FSDP),
``4,2`` and ``1,8`` (pure tensor parallel), scanned and unscanned layers. From
each compiled program (per device): the collectives by kind (count, bytes;
loops counted with their trip counts, ``bench/hlo.py``), bytes divided by the
per-device bytes of the parameters and of the matrix leaves,
``cost_analysis()`` flops and bytes accessed, ``memory_analysis()`` temporary
and argument bytes, each also as a ratio to adamw in the same run. Wall time
on simulated CPU devices is not a figure of merit and is not reported.

Extra sections: ``ns_steps`` (the spectra_adamw update with 5 and 10
Newton–Schulz steps: the collectives must not grow), ``flops_scaling`` (flops
per device of the spectra_adamw update over single-device flops / devices,
with 8 scanned layers, where every group holds as many matrices as devices,
and with the 4-layer default).

Model (full run): the issue's configuration, d_model 256, 4 layers, d_ff 1024,
4 heads, sequence 64, batch 16. ``--quick``: a tiny model, mesh ``4,2``,
scanned, five methods, with the figures asserted (no all-gather of the tree, only
<= 64 scalar all-reduces for the elementwise and global-scalar transforms).
Output: tables, and ``bench/results/sharding.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optimizers as opt
import regularizers as reg
from bench import methods as methods_lib
from bench import pretrain
from bench.common import command_line, print_table, results_dir, write_results
from bench.hlo import compile_figures
from optimizers.linalg import SOFT_NS_STEPS

FULL_MODEL = pretrain.GPTConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024, seq_len=64)
QUICK_MODEL = pretrain.GPTConfig(d_model=16, num_layers=8, num_heads=2, d_ff=32, seq_len=8)
FULL_BATCH, QUICK_BATCH = 16, 8
MESHES = ((8, 1), (4, 2), (1, 8))
QUICK_METHODS = ("adamw", "adamw+clip", "spectra_adamw", "pcgrad", "sam_own_work")
QUICK_STEP_METHODS = ("adamw", "spectra_adamw")  # the train step is compiled for these only
RANK_FRACTION = 4  # rank = d_model / 4, as in the registry's defaults
# Targets of the compiled programs (one update unless said otherwise).
TARGET_MATRIX_BYTES_RATIO = 2.5  # collective bytes / per-device matrix-leaf bytes
TARGET_FLOPS_RATIO = 1.2  # flops per device / (single-device flops / devices)
TARGET_STEP_BYTES_RATIO = 1.5  # spectra_adamw train step / adamw train step at 4,2
TARGET_SCALAR_REDUCES = 64
MATRIX_METHODS = ("spectra_adamw", "dct_adamw", "online_subspace_descent", "svd_subspace")
# sam's full update includes a forward/backward pass (the model's collectives); its own
# work is measured by "sam_own_work".
ELEMENTWISE_METHODS = ("adamw+clip", "sgd+clip", "bloop", "pcgrad", "mixed", "dynamic_barrier",
                       "perp_grad", "sam_own_work")


def methods(rank: int, param_specs: Any = None) -> dict[str, methods_lib.Method]:
  """The registry with the GPT's matrix view, plus the SVD-projector subspace method."""
  dims = pretrain.gpt_matrix_dims
  out = dict(methods_lib.registry(rank, dims, param_specs))
  out["svd_subspace"] = methods_lib.Method("svd_subspace", lambda lr: optax.chain(
      opt.subspace(optax.scale_by_adam(), opt.svd_projector(rank, update_every=200),
                   weight_dimension_numbers=dims, param_specs=param_specs),
      optax.add_decayed_weights(0.01), optax.scale_by_learning_rate(lr)), 3e-3)
  # The other gradient-surgery rules (global inner products, as pcgrad): same aux input.
  aux = out["pcgrad"].extra_args
  for name, rule in (("mixed", reg.mixed), ("dynamic_barrier", reg.dynamic_barrier)):
    out[name] = methods_lib.Method(name, lambda lr, rule=rule: optax.chain(
        rule(1e-3), optax.adamw(lr, weight_decay=0.01)), 3e-3, aux)
  # SAM's own work (the ascent step, its norm, the second gradient's use) without the
  # model's second forward/backward pass, whose collectives are the model's: grad_fn is
  # elementwise in the perturbed parameters (w + e - w = e).
  own = lambda task, params, tokens: {"grad_fn": lambda p: jax.tree.map(jnp.subtract, p, params)}
  out["sam_own_work"] = dataclasses.replace(out["sam"], name="sam_own_work", extra_args=own)
  return out


@dataclasses.dataclass
class Setup:
  """The abstract, sharded inputs of the update and the train step of one configuration."""

  mesh: jax.sharding.Mesh
  params: Any  # ShapeDtypeStructs carrying their shardings
  p_specs: Any
  tokens: jax.ShapeDtypeStruct
  task: methods_lib.Task
  param_bytes: int  # per device
  matrix_bytes: int  # per device, leaves with a matrix view


def _local_bytes(x: Any, spec: P, mesh: jax.sharding.Mesh) -> int:
  shards = 1
  for axis in spec:
    for name in () if axis is None else (axis,) if isinstance(axis, str) else axis:
      shards *= mesh.shape[name]
  return int(math.prod(x.shape) * x.dtype.itemsize // shards)


def setup(model: pretrain.GPTConfig, mesh_shape: tuple[int, int], batch: int) -> Setup:
  mesh = pretrain.make_mesh(mesh_shape)
  graphdef, state = nnx.split(pretrain.GPT(model, nnx.Rngs(0)))
  concrete = nnx.to_pure_dict(state)
  p_specs = jax.tree.map(lambda x: pretrain.param_spec(x.shape, mesh), concrete)
  params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
      concrete, p_specs)

  def per_example_loss(p, tokens):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, p)
    logits = nnx.merge(graphdef, st)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)

  task = methods_lib.Task(loss=lambda p, b: per_example_loss(p, b).mean(),
                          per_example_loss=per_example_loss)
  tokens = jax.ShapeDtypeStruct((batch, model.seq_len + 1), jnp.int32,
                                sharding=NamedSharding(mesh, P("data", None)))
  dims = jax.tree.structure(params).flatten_up_to(pretrain.gpt_matrix_dims(concrete))
  leaves = jax.tree.leaves(params)
  specs = jax.tree.structure(params).flatten_up_to(p_specs)
  param_bytes = sum(_local_bytes(x, s, mesh) for x, s in zip(leaves, specs, strict=True))
  matrix_bytes = sum(_local_bytes(x, s, mesh)
                     for x, s, d in zip(leaves, specs, dims, strict=True) if d is not None)
  return Setup(mesh, params, p_specs, tokens, task, param_bytes, matrix_bytes)


def _shardings(s: Setup, tx: optax.GradientTransformation):
  s_specs = pretrain.state_specs(tx, s.params, s.p_specs, s.mesh)
  is_spec = lambda x: isinstance(x, P)
  p_shard = jax.tree.map(lambda x: x.sharding, s.params)
  s_shard = jax.tree.map(lambda sp: NamedSharding(s.mesh, sp), s_specs, is_leaf=is_spec)
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       jax.eval_shape(tx.init, s.params), s_shard)
  return p_shard, s_shard, state


def measure(s: Setup, method: methods_lib.Method, step: bool = True) -> dict[str, Any]:
  """Compiled figures of one update and (``step``) of one train step of ``method`` on ``s``."""
  tx = method.build(method.lr)
  p_shard, s_shard, state = _shardings(s, tx)
  t_shard = s.tokens.sharding

  def extras(params, tokens):
    return method.extra_args(s.task, params, tokens) if method.extra_args else {}

  def update(params, opt_state, grads, tokens):
    updates, opt_state = tx.update(grads, opt_state, params, **extras(params, tokens))
    return optax.apply_updates(params, updates), opt_state

  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(s.task.loss)(params, tokens)
    params, opt_state = update(params, opt_state, grads, tokens)
    return params, opt_state, loss

  out = {}
  out["update"] = compile_figures(
      update, s.params, state, s.params, s.tokens,
      in_shardings=(p_shard, s_shard, p_shard, t_shard), out_shardings=(p_shard, s_shard),
      donate_argnums=(0, 1))
  if step:
    out["step"] = compile_figures(
        train_step, s.params, state, s.tokens,
        in_shardings=(p_shard, s_shard, t_shard), out_shardings=(p_shard, s_shard, None),
        donate_argnums=(0, 1))
  for part in out:
    c = out[part]["collectives"]
    out[part]["bytes_over_param_bytes"] = c["bytes"] / s.param_bytes
    out[part]["bytes_over_matrix_bytes"] = c["bytes"] / s.matrix_bytes
    # Every branch of every lax.cond added (no single update moves this much).
    out[part]["all_branches_over_matrix_bytes"] = c["bytes_all_branches"] / s.matrix_bytes
  return out


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else (1.0 if a == b else None)


def _with_ratios(rows: dict[str, dict], anchor: str = "adamw") -> None:
  for part in ("update", "step"):
    ref = rows[anchor][part]
    for r in rows.values():
      if part not in r:
        continue
      f = r[part]
      f["vs_adamw"] = {
          "collective_bytes": _ratio(f["collectives"]["bytes"], ref["collectives"]["bytes"]),
          "flops": _ratio(f["flops"], ref["flops"]),
          "bytes_accessed": _ratio(f["bytes_accessed"], ref["bytes_accessed"]),
          "temp_bytes": _ratio(f["temp_bytes"], ref["temp_bytes"]),
          "argument_bytes": _ratio(f["argument_bytes"], ref["argument_bytes"]),
      }


def _kinds(c: dict) -> str:
  return " ".join(f"{k}:{v['count']}" for k, v in c["by_kind"].items()) or "none"


def section_methods(quick: bool, only: dict | None = None,
                    done: Any = None) -> list[dict[str, Any]]:
  """``only``: ``{(mesh, scan): names}`` restricts a full run (e.g. on a shared machine), in
  that order; ``done(configs)`` is called after each configuration (partial results)."""
  model = QUICK_MODEL if quick else FULL_MODEL
  batch = QUICK_BATCH if quick else FULL_BATCH
  rank = model.d_model // RANK_FRACTION
  configs = []
  meshes = ((4, 2),) if quick else MESHES
  order = [(m, sc) for m in meshes for sc in ((True,) if quick else (True, False))]
  for mesh_shape, scan in order if only is None else list(only):
    cfg = dataclasses.replace(model, scan_layers=scan)
    s = setup(cfg, mesh_shape, batch)
    all_methods = methods(rank, s.p_specs)
    names = QUICK_METHODS if quick else tuple(all_methods)
    if only is not None:
      names = tuple(n for n in names if n in only.get((mesh_shape, scan), names))
    rows = {}
    for name in names:
      t0 = time.perf_counter()
      rows[name] = measure(s, all_methods[name], step=not quick or name in QUICK_STEP_METHODS)
      kinds = _kinds(rows[name]["update"]["collectives"])
      print(f"  mesh {mesh_shape} scan={scan} {name}: {kinds}"
            f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    _with_ratios(rows)
    configs.append({"mesh": list(mesh_shape), "scan_layers": scan, "param_bytes": s.param_bytes,
                    "matrix_bytes": s.matrix_bytes, "methods": rows})
    print_table([{
        "method": n, "update collectives": _kinds(r["update"]["collectives"]),
        "bytes/param": r["update"]["bytes_over_param_bytes"],
        "bytes/matrix": r["update"]["bytes_over_matrix_bytes"],
        "flops vs adamw": r["update"]["vs_adamw"]["flops"],
        "step bytes vs adamw": r["step"]["vs_adamw"]["collective_bytes"] if "step" in r else "-",
    } for n, r in rows.items()], title=f"one update, mesh {mesh_shape}, scan={scan}")
    if done is not None:
      done(configs)
  return configs


@functools.cache
def _spectral_update_figures(model: pretrain.GPTConfig, mesh_shape: tuple[int, int] | None,
                             batch: int, **kwargs: Any) -> dict[str, Any]:
  """Compiled figures of one spectra_adamw update (``mesh_shape=None``: one device);
  cached, so the sections share a program they both need."""
  if mesh_shape is None:
    graphdef, state = nnx.split(pretrain.GPT(model, nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(state))
    tx = opt.spectra_adamw(1e-3, weight_dimension_numbers=pretrain.gpt_matrix_dims, **kwargs)
    st = jax.eval_shape(tx.init, params)

    def update(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return compile_figures(update, params, st, params)
  s = setup(model, mesh_shape, batch)
  method = methods_lib.Method("spectra_adamw", lambda lr: opt.spectra_adamw(
      lr, weight_decay=0.01, weight_dimension_numbers=pretrain.gpt_matrix_dims,
      param_specs=s.p_specs, **kwargs), 1e-3)
  return measure(s, method)["update"]


def section_ns_steps(quick: bool) -> dict[str, Any]:
  """Collectives of one spectra_adamw update with 5 and 10 Newton–Schulz steps."""
  model = dataclasses.replace(QUICK_MODEL if quick else FULL_MODEL, scan_layers=True)
  batch = QUICK_BATCH if quick else FULL_BATCH
  out = {}
  for steps in (5, 10):
    f = _spectral_update_figures(model, (4, 2), batch, ns_steps=steps)
    out[str(steps)] = {"collectives": f["collectives"], "flops": f["flops"]}
  out["collectives_invariant"] = (
      out["5"]["collectives"]["count"] == out["10"]["collectives"]["count"]
      and out["5"]["collectives"]["bytes"] == out["10"]["collectives"]["bytes"])
  print_table([{"ns_steps": k, "collectives": v["collectives"]["count"],
                "bytes": v["collectives"]["bytes"], "flops": v["flops"]}
               for k, v in out.items() if k in ("5", "10")], title="ns_steps, mesh (4, 2)")
  return out


def section_flops_scaling(quick: bool, meshes: tuple = MESHES) -> list[dict[str, Any]]:
  """Flops per device of the spectra_adamw update / (single-device flops / devices)."""
  base = QUICK_MODEL if quick else FULL_MODEL
  batch = QUICK_BATCH if quick else FULL_BATCH
  rows = []
  for layers in (8,) if quick else (8, base.num_layers):
    model = dataclasses.replace(base, num_layers=layers, scan_layers=True)
    single = _spectral_update_figures(model, None, batch)["flops"]
    for mesh_shape in ((4, 2),) if quick else meshes:
      f = _spectral_update_figures(model, mesh_shape, batch, ns_steps=SOFT_NS_STEPS)
      n = mesh_shape[0] * mesh_shape[1]
      rows.append({"layers": layers, "mesh": list(mesh_shape), "flops_per_device": f["flops"],
                   "single_device_flops": single,
                   "ratio_to_ideal": f["flops"] / (single / n)})
  print_table([{**r, "mesh": str(tuple(r["mesh"]))} for r in rows],
              title="spectra_adamw update flops per device vs single device / 8")
  return rows


def summary(results: dict[str, Any]) -> dict[str, Any]:
  """The issue's targets, read off the sections."""
  out: dict[str, Any] = {"matrix_bytes_ratio": {}, "elementwise_max_scalar_reduces": {},
                         "step_bytes_vs_adamw_at_4x2": {}}
  for cfg in results["methods"]:
    key = f"{cfg['mesh'][0]},{cfg['mesh'][1]}" + (" scan" if cfg["scan_layers"] else "")
    for name, r in cfg["methods"].items():
      if name in MATRIX_METHODS:
        out["matrix_bytes_ratio"].setdefault(name, {})[key] = (
            r["update"]["bytes_over_matrix_bytes"])
      if name in ELEMENTWISE_METHODS:
        c = r["update"]["collectives"]
        # Only scalar all-reduces allowed: any other kind, or bigger ones, break the target.
        other = c["count"] - c["by_kind"].get("all-reduce", {}).get("count", 0)
        out["elementwise_max_scalar_reduces"].setdefault(name, {})[key] = {
            "count": c["count"], "non_all_reduce": other, "bytes": c["bytes"]}
      if cfg["mesh"] == [4, 2] and "step" in r:
        out["step_bytes_vs_adamw_at_4x2"].setdefault(name, {})[key] = (
            r["step"]["vs_adamw"]["collective_bytes"])
  out["matrix_bytes_target_met"] = all(
      v <= TARGET_MATRIX_BYTES_RATIO for d in out["matrix_bytes_ratio"].values()
      for v in d.values())
  out["ns_steps_invariant"] = results["ns_steps"]["collectives_invariant"]
  out["flops_ratio"] = {f"{r['layers']} layers, mesh {r['mesh'][0]},{r['mesh'][1]}":
                        r["ratio_to_ideal"] for r in results["flops_scaling"]}
  return out


def readme_table(results: dict[str, Any]) -> str:
  """The README's table: one update per method and mesh, collective bytes over the
  per-device bytes of the matrix leaves (scanned / unscanned layers), and the train
  step's collective bytes and the update's flops as ratios to adamw's."""
  cells: dict[str, dict[str, str]] = {}
  meshes = []
  for cfg in results["methods"]:
    mesh = f"{cfg['mesh'][0]},{cfg['mesh'][1]}"
    if mesh not in meshes:
      meshes.append(mesh)
    for name, r in cfg["methods"].items():
      row = cells.setdefault(name, {})
      key = f"{mesh} {'scan' if cfg['scan_layers'] else 'list'}"
      row[key] = f"{r['update']['bytes_over_matrix_bytes']:.2f}"
      if cfg["scan_layers"] and mesh == "4,2" and "step" in r:
        row["step"] = f"{r['step']['vs_adamw']['collective_bytes']:.2f}"
        row["kinds"] = _kinds(r["update"]["collectives"])
  head = ["method", *(f"{m} scan / list" for m in meshes), "update collectives (4,2 scan)",
          "train step bytes vs adamw (4,2 scan)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in cells.items():
    per_mesh = [f"{row.get(m + ' scan', '-')} / {row.get(m + ' list', '-')}" for m in meshes]
    lines.append("| " + " | ".join([name, *per_mesh, row.get("kinds", "-"),
                                    row.get("step", "-")]) + " |")
  return "\n".join(lines)


def check_quick(results: dict[str, Any]) -> None:
  """Assertions on the quick run's compiled programs (not timings)."""
  rows = results["methods"][0]["methods"]
  assert rows["adamw"]["update"]["collectives"]["count"] == 0, rows["adamw"]["update"]
  for name in set(ELEMENTWISE_METHODS) & set(rows):  # only scalar all-reduces, <= 64
    c = rows[name]["update"]["collectives"]
    assert set(c["by_kind"]) <= {"all-reduce"}, (name, c)
    assert c["count"] <= TARGET_SCALAR_REDUCES, (name, c)
  spectral = rows["spectra_adamw"]["update"]
  assert "all-gather" not in spectral["collectives"]["by_kind"], spectral["collectives"]
  assert spectral["bytes_over_matrix_bytes"] <= TARGET_MATRIX_BYTES_RATIO, spectral
  assert results["ns_steps"]["collectives_invariant"], results["ns_steps"]
  for r in results["flops_scaling"]:
    assert r["ratio_to_ideal"] <= TARGET_FLOPS_RATIO, r
  for r in rows.values():
    for part in r.values():
      assert part["flops"] > 0 and part["argument_bytes"] > 0, part
  step = rows["spectra_adamw"]["step"]["vs_adamw"]["collective_bytes"]
  assert step <= TARGET_STEP_BYTES_RATIO, step


def _run_on_eight_devices(quick: bool) -> dict:
  """Runs this benchmark in a subprocess with 8 simulated CPU devices; its results."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "bench.bench_sharding"] + (["--quick"] if quick else [])
  subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
  return json.loads((results_dir() / "sharding.json").read_text())


def main(quick: bool = False, only: dict | None = None, flops_meshes: tuple = MESHES) -> dict:
  t0 = time.perf_counter()
  results: dict[str, Any] = {"config": {
      "quick": quick, "model": dataclasses.asdict(QUICK_MODEL if quick else FULL_MODEL),
      "batch": QUICK_BATCH if quick else FULL_BATCH, "devices": jax.device_count(),
      "bytes": "per device, summed over the compiled program (loops x trip count; a lax.cond"
               " as its costliest branch: one update; all_branches_*: every branch added)",
  }}
  if jax.device_count() != 8:  # e.g. `python -m bench` on one CPU device: run in 8
    return _run_on_eight_devices(quick)
  if only is not None:
    results["config"]["methods_run"] = {f"{m[0]},{m[1]} scan={s}": list(v)
                                        for (m, s), v in only.items()}
  results["ns_steps"] = section_ns_steps(quick)
  results["flops_scaling"] = section_flops_scaling(quick, flops_meshes)

  def partial(configs):  # a long run keeps what it has measured
    results["methods"] = configs
    if not quick:
      write_results("sharding", {**results, "partial": True})

  results["methods"] = section_methods(quick, only, partial)
  results["summary"] = summary(results)
  results["wall_s"] = time.perf_counter() - t0
  print_table([{"target": k, "value": str(v)} for k, v in results["summary"].items()],
              title="targets")
  write_results("sharding", results)
  if quick:
    check_quick(results)
  return results


if __name__ == "__main__":
  command_line(main, __doc__)
