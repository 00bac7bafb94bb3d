"""Optimizer-state sharding: ZeRO-1 specs (pretrain --zero1) and logical-axis specs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from optimizers import zero1_partition_specs

MESH = {"data": 4, "model": 2}


def _reference(shape, spec, sizes, data="data"):
  """The rule spelled out: the largest axis that |existing| * |data| divides gets data."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  names = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
  if not shape or any(data in n for n in names):
    return P(*entries)
  fits = [i for i in range(len(shape))
          if shape[i] % (math.prod(sizes[n] for n in names[i]) * sizes[data]) == 0]
  best = max(fits, key=lambda i: (shape[i], -i))
  entries[best] = names[best] + (data,) if names[best] else data
  return P(*entries)


@pytest.mark.parametrize("shape,spec", [
    ((6, 16), P(None, "model")),     # 16 % (2*4): the model-sharded axis takes data too
    ((16, 6), P()),                  # rows
    ((8, 12), P()),                  # 12 % 4 == 0 and 12 > 8: columns
    ((3, 8, 8), P(None, "model")),   # tie 8 vs 8(model: 8 % 8): first divisible largest
    ((4, 12, 2), P()),               # rank-space moment (layers, m, r)
    ((24,), P("model")),
    ((), P()),                       # counters stay replicated
    ((8, 16), P("data", "model")),   # already over data: unchanged
])
def test_largest_divisible_axis(shape, spec):
  state = {"x": jax.ShapeDtypeStruct(shape, jnp.float32)}
  got = zero1_partition_specs(state, {"x": spec}, MESH)["x"]
  assert got == _reference(shape, spec, MESH), (shape, spec, got)


def test_fails_loudly_on_unplaceable_leaf():
  state = {"proj": {"indices": jax.ShapeDtypeStruct((2, 3), jnp.int32)}}
  with pytest.raises(ValueError, match=r"\['proj'\]\['indices'\] of shape \[2, 3\]"):
    zero1_partition_specs(state, {"proj": {"indices": P()}}, MESH)
  # opting small leaves out of the sharding is explicit
  assert zero1_partition_specs(state, {"proj": {"indices": P()}}, MESH,
                               replicate_below=16) == {"proj": {"indices": P()}}


def test_bad_mesh_axes():
  state = {"x": jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match="data_axis='batch' is not an axis"):
    zero1_partition_specs(state, {"x": P()}, MESH, data_axis="batch")
  with pytest.raises(ValueError, match=r"state_specs\['x'\]: axis name 'tensor' is not an axis"):
    zero1_partition_specs(state, {"x": P("tensor")}, MESH)


@pytest.mark.parametrize("optimizer,replicate_below",
                         [("adamw", 0), ("dct_adamw", 64), ("mesa", 0)])
def test_pretrain_zero1_same_trajectory_and_state_bytes(optimizer, replicate_below):
  """On an 8 x 1 mesh: the ZeRO-1 run follows the plain (FSDP) run's losses, and each device
  holds at most 1/8 of the state (+5%); dct_adamw's rank-sized index sets (8 int32) are the
  leaves replicated on purpose. MESA's EMA teacher (a float32 copy of the parameters) is
  sharded over the data axis like the optimizer state."""
  from bench.pretrain import GPTConfig, RunConfig, run

  model = GPTConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, seq_len=16, scan_layers=True)
  base = dict(optimizer=optimizer, steps=4, batch_size=8, model=model, mesh=(8, 1),
              progress=False, warmup=1, rank=4)
  plain = run(RunConfig(**base))
  zero1 = run(RunConfig(**base, zero1=True, zero1_replicate_below=replicate_below))
  np.testing.assert_allclose([h["loss"] for h in zero1], [h["loss"] for h in plain], rtol=1e-5)
  ratio = zero1[0]["state_bytes_per_device"] / zero1[0]["state_bytes"]
  assert ratio <= 1.05 / 8, ratio
  assert plain[0]["state_bytes_per_device"] > zero1[0]["state_bytes_per_device"]
  if optimizer == "mesa":
    teacher = zero1[0]["teacher_state_bytes_per_device"] / zero1[0]["teacher_state_bytes"]
    assert teacher <= 1.05 / 8, teacher
    assert zero1[0]["teacher_state_bytes"] == plain[0]["teacher_state_bytes"]
    assert plain[0]["teacher_state_bytes_per_device"] > zero1[0]["teacher_state_bytes_per_device"]


def test_logical_specs_feed_flax_rules_and_reject_bad_names():
  """logical_partition_specs' output goes through flax's logical-axis rules to mesh specs;
  names that do not fit a parameter raise naming the leaf."""
  import flax.linen as nn

  import optimizers

  params = {"w": jax.ShapeDtypeStruct((16, 64), jnp.float32)}
  tx = optimizers.dct_adamw(1e-3, 4)
  specs = optimizers.logical_partition_specs(tx, params, {"w": ("embed", "mlp")})
  mesh_specs = nn.logical_to_mesh(specs, (("embed", "data"), ("mlp", "model")))
  assert mesh_specs[0].inner_state.mu["w"] == P("model", None)  # (mlp side, rank) of (16, 64)
  with pytest.raises(ValueError, match=r"param_axes\['w'\]: 3 names"):
    optimizers.logical_partition_specs(tx, params, {"w": ("a", "b", "c")})
  with pytest.raises(ValueError, match="param_axes must be a tree like the params"):
    optimizers.logical_partition_specs(tx, params, {"v": ("a", "b")})


def test_logical_specs_of_a_chain_with_optax_transforms():
  """Chains with optax pieces: clip, the low-rank optimizer, a schedule; moments of the
  projected leaf keep the unprojected side's name, the bias' moments their parameter's."""
  import optax

  import optimizers

  params = {"w": jax.ShapeDtypeStruct((2, 16, 64), jnp.float32),
            "b": jax.ShapeDtypeStruct((64,), jnp.float32)}
  axes = {"w": ("layers", "embed", "mlp"), "b": ("mlp",)}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optimizers.online_subspace_descent(1e-3, 4), optax.scale(0.5))
  specs = optimizers.logical_partition_specs(tx, params, axes)
  osd = specs[1][0]
  assert osd.inner_state.mu["w"] == P("layers", "mlp", None)  # (layers, k = 64, rank)
  assert osd.inner_state.mu["b"] == P("mlp")
  assert specs[0] == optax.EmptyState() or jax.tree.leaves(specs[0]) == []
