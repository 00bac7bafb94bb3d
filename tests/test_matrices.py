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


# ---------------------------------------------------------------------------
# Matrix views by parameter path: rules and presets.
# ---------------------------------------------------------------------------


def _views(spec, tree):
  from optimizers.matrices import describe_matrix_dims

  return {r.path: r.dims for r in describe_matrix_dims(spec, tree)}


def test_flax_nnx_preset_views_are_the_modules_linear_maps():
  """Under the "flax_nnx" preset, ``x @ view`` reproduces each module's linear map (Linear,
  MultiHeadAttention's query and out projections, Embed as one_hot(ids) @ table)."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 8, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
      self.fc = nnx.Linear(8, 5, rngs=rngs)

  net = Net(nnx.Rngs(0))
  params = nnx.state(net, nnx.Param)
  views = _views("flax_nnx", params)
  assert views["attn/query/bias"] is None and views["fc/bias"] is None
  x = jnp.asarray(rand(9, (3, 8)))
  w = lambda d, v: np.asarray(to_matrix(v[...], d), np.float64)
  xf = np.asarray(x, np.float64)
  np.testing.assert_allclose(xf @ w(views["fc/kernel"], params["fc"]["kernel"]),
                             net.fc(x) - net.fc.bias[...], rtol=1e-5, atol=1e-5)
  q = net.attn.query(x) - net.attn.query.bias[...]  # (3, heads, head_dim)
  np.testing.assert_allclose(xf @ w(views["attn/query/kernel"],
                                    params["attn"]["query"]["kernel"]),
                             np.asarray(q).reshape(3, -1), rtol=1e-5, atol=1e-5)
  y = jnp.asarray(rand(10, (3, 2, 4)))
  o = net.attn.out(y) - net.attn.out.bias[...]
  np.testing.assert_allclose(np.asarray(y, np.float64).reshape(3, -1)
                             @ w(views["attn/out/kernel"], params["attn"]["out"]["kernel"]),
                             o, rtol=1e-5, atol=1e-5)
  ids = jnp.array([0, 3, 10])
  np.testing.assert_allclose(np.eye(11)[np.asarray(ids)]
                             @ w(views["embed/embedding"], params["embed"]["embedding"]),
                             net.embed(ids), rtol=1e-6)


def test_flax_linen_preset_on_logically_partitioned_boxes():
  """Boxed linen params (nn.LogicallyPartitioned) get the same views as the unboxed tree,
  with the same paths (the boxes' ``value`` field is not a path component)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      x = nn.Dense(6, kernel_init=init)(x)
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)

  boxed = Net().init(jax.random.key(0), jnp.ones((1, 3, 5)))
  plain = nn.unbox(boxed)
  views = _views("flax_linen", boxed)
  assert views == _views("flax_linen", plain)
  assert views["params/Dense_0/kernel"] == MatrixDims(-2, -1)
  assert views["params/MultiHeadDotProductAttention_0/query/kernel"] == MatrixDims(-3, (-2, -1))
  assert views["params/MultiHeadDotProductAttention_0/out/kernel"] == MatrixDims((-3, -2), -1)
  assert views["params/Dense_0/bias"] is None
  resolved = resolve_matrix_dims("flax_linen", boxed)  # boxes kept: same structure as params
  assert jax.tree.structure(boxed).flatten_up_to(resolved)[1] == MatrixDims(-2, -1)


def test_maxtext_scanned_preset_slices_each_layer():
  """(embed, layers, mlp)-style kernels: view[l] is the layer-l matrix, against NumPy."""
  e, layers, h, hd, mlp, vocab = 6, 3, 2, 4, 10, 12
  x = {"token_embedder": {"embedding": rand(0, (vocab, e))},
       "decoder": {"layers": {
           "self_attention": {"query": {"kernel": rand(1, (e, layers, h, hd))},
                              "out": {"kernel": rand(2, (h, layers, hd, e))}},
           "mlp": {"wi_0": {"kernel": rand(3, (e, layers, mlp))},
                   "wo": {"kernel": rand(4, (mlp, layers, e))}},
           "pre_self_attention_layer_norm": {"scale": rand(5, (e, layers))}},
           "decoder_norm": {"scale": rand(6, (e,))},
           "logits_dense": {"kernel": rand(7, (e, vocab))}}}
  tree = jax.tree.map(jnp.asarray, x)
  dims = resolve_matrix_dims("maxtext_scanned", tree)
  lay = x["decoder"]["layers"]
  ldims = dims["decoder"]["layers"]
  refs = {
      ("self_attention", "query"): [lay["self_attention"]["query"]["kernel"][:, i].reshape(e, -1)
                                    for i in range(layers)],
      ("self_attention", "out"): [lay["self_attention"]["out"]["kernel"][:, i].reshape(-1, e)
                                  for i in range(layers)],
      ("mlp", "wi_0"): [lay["mlp"]["wi_0"]["kernel"][:, i] for i in range(layers)],
      ("mlp", "wo"): [lay["mlp"]["wo"]["kernel"][:, i] for i in range(layers)],
  }
  for (a, b), ref in refs.items():
    leaf = tree["decoder"]["layers"][a][b]["kernel"]
    view = np.asarray(to_matrix(leaf, ldims[a][b]["kernel"]))
    np.testing.assert_array_equal(view, np.stack(ref))
  assert ldims["pre_self_attention_layer_norm"]["scale"] is None  # (embed, layers): vectors
  assert dims["decoder"]["decoder_norm"]["scale"] is None
  assert dims["decoder"]["logits_dense"]["kernel"] == MatrixDims(0, 1)


def test_transformer_preset_keeps_embeddings_head_biases_norms_out():
  """Only attention and MLP linears are matrices; stacked (layers, d) norm scales too are
  left alone (2-D but vectors)."""
  L, d = 3, 8
  tree = jax.tree.map(jnp.zeros, {
      "wte": (50, d), "wpe": (16, d), "embed": (50, d), "pos": (16, d),
      "layers": {"qkv": (L, d, 3 * d), "proj": (L, d, d), "ln1": (L, d), "ln2": (L, d),
                 "mlp": {"kernel": (L, d, 4 * d), "bias": (L, 4 * d)},
                 "attn": {"query": {"kernel": (L, d, 2, 4)}, "out": {"kernel": (L, 2, 4, d)}}},
      "final_norm": {"scale": (d,)}, "LayerNorm_0": {"scale": (d,)}, "lm_head": (d, 50),
      "head": {"kernel": (d, 50)}}, is_leaf=lambda s: isinstance(s, tuple))
  from optimizers.matrices import describe_matrix_dims

  rows = {r.path: r.matrix for r in describe_matrix_dims("transformer", tree)}
  projected = {p: m for p, m in rows.items() if m is not None}
  assert projected == {
      "layers/qkv": ((L,), d, 3 * d), "layers/proj": ((L,), d, d),
      "layers/mlp/kernel": ((L,), d, 4 * d),
      "layers/attn/query/kernel": ((L,), d, d), "layers/attn/out/kernel": ((L,), d, d)}


def test_rules_first_match_default_and_override():
  from optimizers import matrix_rules

  tree = {"a": jnp.zeros((4, 5)), "b": jnp.zeros((2, 4, 5)), "c": jnp.zeros((4, 5)),
          "v": jnp.zeros(5)}
  rules = matrix_rules([("^a$", MatrixDims(-1, -2)), ("^[ab]$", None)])
  assert rules(tree) == {"a": MatrixDims(-1, -2), "b": None, "c": MatrixDims(-2, -1), "v": None}
  assert matrix_rules([("^a$", MatrixDims(-1, -2))], default=None)(tree) == {
      "a": MatrixDims(-1, -2), "b": None, "c": None, "v": None}
  assert matrix_rules(default=MatrixDims(0, -1))(tree)["b"] == MatrixDims(0, -1)
  # user rules come before the preset's: the head becomes a matrix again
  head = {"head": {"kernel": jnp.zeros((4, 9))}}
  assert matrix_rules(preset="transformer")(head)["head"]["kernel"] is None
  assert matrix_rules([("^head/kernel$", MatrixDims(0, 1))], preset="transformer")(head) == {
      "head": {"kernel": MatrixDims(0, 1)}}
  # min_ndim: a rule for >= 3-D leaves skips 2-D ones
  from optimizers.matrices import MatrixRule

  r = matrix_rules([MatrixRule("^[bc]$", MatrixDims(0, 2), 3)], default=None)
  assert r(tree)["b"] == MatrixDims(0, 2) and r(tree)["c"] is None


def test_describe_prints_table():
  from optimizers.matrices import describe_matrix_dims

  lines = []
  rows = describe_matrix_dims("transformer", {"blocks": {"up": {"kernel": jnp.zeros((3, 4, 6))}},
                                              "head": jnp.zeros((4, 9))}, print_fn=lines.append)
  assert [(r.path, r.matrix) for r in rows] == [("blocks/up/kernel", ((3,), 4, 6)), ("head", None)]
  text = lines[0]
  assert "blocks/up/kernel" in text and "3 x 4 x 6" in text and "head" in text
  # plain specs are described too (rule "given")
  assert describe_matrix_dims(None, {"w": jnp.zeros((2, 3))})[0].rule == "given"


def test_transforms_accept_presets_by_name():
  """A preset name gives the same updates as the equivalent explicit dims tree."""
  import optimizers

  tree = {"blocks": {"up": {"kernel": jnp.asarray(rand(11, (2, 6, 8)))},
                     "attn": {"query": {"kernel": jnp.asarray(rand(12, (6, 2, 4)))}}},
          "embed": jnp.asarray(rand(13, (9, 6)))}
  explicit = {"blocks": {"up": {"kernel": MatrixDims(-2, -1)},
                         "attn": {"query": {"kernel": MatrixDims(-3, (-2, -1))}}},
              "embed": None}
  for make in (lambda d: optimizers.spectral_clip(0.5, weight_dimension_numbers=d),
               lambda d: optimizers.dct_adamw(0.1, 2, weight_dimension_numbers=d)):
    a, b = make("transformer"), make(explicit)
    ua, _ = a.update(tree, a.init(tree), tree)
    ub, _ = b.update(tree, b.init(tree), tree)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    # and the embedding was left out: it differs from the default-view transform's update
    c = make(None)
    uc, _ = c.update(tree, c.init(tree), tree)
    assert not np.allclose(ua["embed"], uc["embed"])


def test_bad_rules_and_presets():
  import optimizers
  from optimizers import matrix_rules

  tree = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
  with pytest.raises(ValueError, match="weight_dimension_numbers.*unknown matrix preset 'nope'"):
    resolve_matrix_dims("nope", tree)
  tx = optimizers.spectral_clip(1.0, weight_dimension_numbers="nope")
  with pytest.raises(ValueError, match="weight_dimension_numbers.*unknown matrix preset"):
    tx.update(tree, tx.init(tree))
  with pytest.raises(ValueError, match="preset.*unknown matrix preset"):
    matrix_rules(preset="Transformer")
  with pytest.raises(ValueError, match=r"rule '\.\*' matches the 1-D leaf 'b'"):
    matrix_rules([(".*", MatrixDims())])(tree)
  with pytest.raises(ValueError, match="does not fit the leaf 'w'.*out of range"):
    matrix_rules([("^w$", MatrixDims(0, 2))])(tree)
  with pytest.raises(ValueError, match="not a valid regex"):
    matrix_rules([("(", None)])
  with pytest.raises(ValueError, match="must map to a MatrixDims or None"):
    matrix_rules([("w", (0, 1))])
  with pytest.raises(ValueError, match="each rule must be"):
    matrix_rules(["w"])
  with pytest.raises(ValueError, match="default must be"):
    matrix_rules(default="all")
