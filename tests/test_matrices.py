"""optimizers.matrices: viewing leaves as batches of matrices, against NumPy index loops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers

from optimizers import MatrixDims
from optimizers.matrices import (
    as_matrix_dims,
    from_matrix,
    map_matrices,
    matrix_shape,
    resolve_matrix_dims,
    to_matrix,
)


def rand(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------
# to_matrix / from_matrix against explicit index loops.
# ---------------------------------------------------------------------------


def test_default_dims_are_last_two_axes():
  assert MatrixDims() == MatrixDims(reduction_axis=-2, output_axis=-1)
  x = rand(0, (2, 3, 4, 5))
  view = to_matrix(jnp.asarray(x), MatrixDims())
  np.testing.assert_array_equal(view, x)
  assert matrix_shape(x.shape, MatrixDims()) == ((2, 3), 4, 5)


def test_layer_axis_at_position_1():
  """MaxText stores scanned kernels as (embed, layers, mlp): dims (0, 2), batch axis 1."""
  x = rand(1, (6, 3, 10))
  dims = MatrixDims(reduction_axis=0, output_axis=2)
  view = np.asarray(to_matrix(jnp.asarray(x), dims))
  assert view.shape == (3, 6, 10)
  for layer in range(3):
    np.testing.assert_array_equal(view[layer], x[:, layer, :])
  np.testing.assert_array_equal(from_matrix(jnp.asarray(view), dims, x.shape), x)
  assert matrix_shape(x.shape, dims) == ((3,), 6, 10)


def test_grouped_and_negative_axes():
  """Tuple axes are flattened in the order given; the remaining axes are batch, in order."""
  x = rand(2, (2, 3, 4, 5, 6))  # (heads, in, layers, head_dim, out)
  dims = MatrixDims(reduction_axis=(1, 0), output_axis=(-2, -1))
  view = np.asarray(to_matrix(jnp.asarray(x), dims))
  assert view.shape == (4, 3 * 2, 5 * 6)
  for layer in range(4):
    for i in range(3):
      for h in range(2):
        expected_row = x[h, i, layer].reshape(-1)  # (head_dim, out) flattened row-major
        np.testing.assert_array_equal(view[layer, i * 2 + h], expected_row)
  np.testing.assert_array_equal(from_matrix(jnp.asarray(view), dims, x.shape), x)
  assert matrix_shape(x.shape, dims) == ((4,), 6, 30)


def test_torch_layout_is_a_transpose():
  x = rand(3, (7, 4))  # torch Linear weight (out, in)
  view = to_matrix(jnp.asarray(x), MatrixDims(reduction_axis=-1, output_axis=-2))
  np.testing.assert_array_equal(view, x.T)


@pytest.mark.parametrize("dims_type", [MuonDimensionNumbers, GaLoreDimensionNumbers])
def test_optax_dimension_numbers_accepted(dims_type):
  optax_dims = dims_type(reduction_axis=0, output_axis=2)
  assert as_matrix_dims(optax_dims) == MatrixDims(0, 2)
  x = rand(4, (6, 3, 10))
  np.testing.assert_array_equal(to_matrix(jnp.asarray(x), optax_dims),
                                to_matrix(jnp.asarray(x), MatrixDims(0, 2)))
  resolved = resolve_matrix_dims({"w": optax_dims, "b": None},
                                 {"w": jnp.zeros((6, 3, 10)), "b": jnp.zeros(10)})
  assert resolved == {"w": MatrixDims(0, 2), "b": None}
  assert isinstance(resolved["w"], MatrixDims)


# ---------------------------------------------------------------------------
# resolve_matrix_dims.
# ---------------------------------------------------------------------------

TREE = {"kernel": jnp.zeros((4, 5)), "stacked": jnp.zeros((3, 4, 5)), "bias": jnp.zeros(5),
        "scale": jnp.zeros(())}


def test_resolve_default_view():
  resolved = resolve_matrix_dims(None, TREE)
  assert resolved == {"kernel": MatrixDims(-2, -1), "stacked": MatrixDims(-2, -1), "bias": None,
                      "scale": None}


def test_resolve_single_dims_applies_to_matrix_leaves_only():
  dims = MatrixDims(reduction_axis=-1, output_axis=-2)
  resolved = resolve_matrix_dims(dims, TREE)
  assert resolved == {"kernel": dims, "stacked": dims, "bias": None, "scale": None}


def test_resolve_pytree_and_callable():
  spec = {"kernel": None, "stacked": MatrixDims(1, 2), "bias": None, "scale": None}
  assert resolve_matrix_dims(spec, TREE) == spec
  seen = []

  def dims_fn(tree):
    seen.append(tree)
    return jax.tree.map(lambda x: MatrixDims(0, -1) if x.ndim == 3 else None, tree)

  resolved = resolve_matrix_dims(dims_fn, TREE)
  assert seen and seen[0] is TREE
  assert resolved == {"kernel": None, "stacked": MatrixDims(0, -1), "bias": None, "scale": None}


def test_resolve_keeps_none_and_masked_leaves():
  tree = {"w": jnp.zeros((2, 3)), "gone": None, "masked": optax.MaskedNode()}
  resolved = resolve_matrix_dims(None, tree)
  assert resolved["w"] == MatrixDims(-2, -1)
  assert resolved["gone"] is None and resolved["masked"] == optax.MaskedNode()


# ---------------------------------------------------------------------------
# map_matrices.
# ---------------------------------------------------------------------------


def center_rows(v):
  """Not elementwise and not transpose-symmetric: subtracts the mean over the rows (m axis)."""
  return v - jnp.mean(v, axis=-2, keepdims=True)


def test_map_matrices_mixed_tree():
  x = {"layered": rand(5, (6, 3, 10)), "plain": rand(6, (4, 7)), "skipped": rand(7, (4, 7)),
       "bias": rand(8, (7,))}
  dims = {"layered": MatrixDims(0, 2), "plain": MuonDimensionNumbers(0, 1), "skipped": None,
          "bias": None}
  tree = jax.tree.map(jnp.asarray, x)
  tree["gone"] = None
  dims["gone"] = None
  out = map_matrices(center_rows, tree, resolve_matrix_dims(dims, tree))
  for layer in range(3):
    v = x["layered"][:, layer, :]
    np.testing.assert_allclose(out["layered"][:, layer, :], v - v.mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(out["plain"], x["plain"] - x["plain"].mean(axis=0), atol=1e-6)
  np.testing.assert_array_equal(out["skipped"], x["skipped"])
  np.testing.assert_array_equal(out["bias"], x["bias"])
  assert out["gone"] is None


# ---------------------------------------------------------------------------
# Bad dims.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims,match",
    [
        (MatrixDims(0, 3), "out of range"),
        (MatrixDims(-4, 1), "out of range"),
        (MatrixDims(1, 1), "distinct"),
        (MatrixDims((0, 1), 1), "distinct"),
        (MatrixDims((0, 0), 2), "distinct"),
        (MatrixDims((), 2), "empty"),
    ],
    ids=str,
)
def test_bad_dims(dims, match):
  x = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match=match):
    to_matrix(x, dims)
  with pytest.raises(ValueError, match=match):
    matrix_shape(x.shape, dims)


def test_not_a_dims_object():
  with pytest.raises(TypeError, match="MatrixDims"):
    as_matrix_dims((0, 1))
  with pytest.raises(TypeError, match="MatrixDims"):
    resolve_matrix_dims({"w": "rows"}, {"w": jnp.zeros((2, 3))})


def test_dims_on_a_vector_leaf():
  with pytest.raises(ValueError, match="out of range"):
    to_matrix(jnp.zeros(5), MatrixDims(0, 1))


def test_dims_tree_mismatch():
  with pytest.raises(ValueError):
    resolve_matrix_dims({"w": MatrixDims()}, {"w": jnp.zeros((2, 3)), "v": jnp.zeros((2, 3))})
