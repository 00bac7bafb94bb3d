"""Low-precision optimizer state: moments / EMAs stored in a chosen dtype, math in float32."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import optimizers
import regularizers


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(24), jnp.float32)}


def _bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_spectra_adamw_bf16_moments_halve_state_and_keep_float32_updates():
  params = _params()
  f32 = optimizers.spectra_adamw(1e-2, weight_decay=0.01)
  bf16 = optimizers.spectra_adamw(1e-2, weight_decay=0.01, mu_dtype="bfloat16",
                                  nu_dtype=jnp.bfloat16)
  s32, s16 = f32.init(params), bf16.init(params)
  adam16 = s16[1]
  assert {x.dtype for x in jax.tree.leaves((adam16.mu, adam16.nu))} == {jnp.dtype(jnp.bfloat16)}
  ratio = _bytes(s16) / _bytes(s32)
  assert ratio <= 0.52, ratio
  rng = np.random.default_rng(1)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    u32, s32 = f32.update(g, s32, params)
    u16, s16 = bf16.update(g, s16, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(u16))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-5), u16, u32)
  # the stored moments are the float32 moments rounded once per step (NumPy, float64)
  adam32, adam16 = s32[1], s16[1]
  np.testing.assert_allclose(np.asarray(adam16.nu["w"], np.float64),
                             np.asarray(adam32.nu["w"], np.float64), rtol=2e-2)


def _mesa_reference(teacher0, params_seq, decay, dtype):
  v = np.asarray(teacher0, np.float64)
  for w in params_seq:
    v = decay * v + (1 - decay) * np.asarray(w, np.float64)
    v = v.astype(dtype).astype(np.float64)  # stored in the teacher dtype after every step
  return v


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_mesa_teacher_dtype(dtype):
  params = _params(2)
  reg = regularizers.mesa(0.75, teacher_dtype=dtype)
  state = reg.init(params)
  store = np.float32 if dtype is None else ml_dtypes.bfloat16
  assert state.teacher["w"].dtype == jnp.dtype(store)
  seq = [_params(3 + i) for i in range(4)]
  for p in seq:
    state = reg.update_teacher(state, p)
  assert state.teacher["w"].dtype == jnp.dtype(store)
  want = _mesa_reference(np.asarray(params["w"]).astype(store), [p["w"] for p in seq], 0.75,
                         store)
  # float32 EMA arithmetic, then one rounding to the storage dtype per step
  np.testing.assert_allclose(np.asarray(state.teacher["w"], np.float64), want,
                             rtol=1e-5 if dtype is None else 8e-3)


@pytest.mark.parametrize("make,arg", [
    (lambda d: optimizers.spectra_adamw(1e-3, mu_dtype=d), "mu_dtype"),
    (lambda d: optimizers.spectra_adamw(1e-3, nu_dtype=d), "nu_dtype"),
    (lambda d: regularizers.mesa(0.9, teacher_dtype=d), "teacher_dtype"),
])
def test_non_floating_dtype_rejected(make, arg):
  for bad in ("int32", jnp.int8, "complex64"):
    with pytest.raises(ValueError, match=arg):
      make(bad)


def test_bloop_ema_dtype_stores_low_and_updates_in_float32():
  params = _params(3)
  f32 = regularizers.bloop(0.5, decay=0.9)
  bf16 = regularizers.bloop(0.5, decay=0.9, ema_dtype=jnp.bfloat16)
  s32, s16 = f32.init(params), bf16.init(params)
  assert {x.dtype for x in jax.tree.leaves(s16.ema)} == {jnp.dtype(jnp.bfloat16)}
  assert _bytes(s16.ema) / _bytes(s32.ema) == 0.5
  rng = np.random.default_rng(4)
  draw = lambda: jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  for _ in range(3):
    g, a = draw(), draw()
    # The bf16 step equals the float32 step taken from the stored EMA upcast to float32,
    # and the new EMA is that float32 EMA rounded once.
    from_stored = s16._replace(ema=jax.tree.map(lambda m: m.astype(jnp.float32), s16.ema))
    u_ref, s_ref = f32.update(g, from_stored, aux_grads=a)
    u16, s16 = bf16.update(g, s16, aux_grads=a)
    assert {x.dtype for x in jax.tree.leaves(s16.ema)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), u16, u_ref)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(
        np.asarray(x, np.float32), np.asarray(y.astype(jnp.bfloat16), np.float32)),
        s16.ema, s_ref.ema)
    u32, s32 = f32.update(g, s32, aux_grads=a)
    # and stays close to the all-float32 run
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-2, atol=2e-2), u16, u32)


def test_bloop_ema_dtype_rejects_non_floating():
  with pytest.raises(ValueError, match="ema_dtype"):
    regularizers.bloop(0.5, ema_dtype=jnp.int32)
