"""Sven's separable mode: per-example rows and the ghost Gram of dense leaves.

Private to :mod:`optimizers.sven`. The per-example residual is traced to a jaxpr;
a parameter leaf that enters it exactly once, as an operand of a ``dot_general``
with no batch dimensions, is "dense": its block of ``M M^T`` is formed from the
layer's inputs and output cotangents (the ghost Gram) without per-example
gradients. Every other leaf gets its Jacobian rows from one vmapped per-example
backward pass.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from optimizers._sven_rows import _HIGHEST, _replicated

# Primitives that carry their own sub-programs: a parameter used inside one of them is
# not looked into (its rows come from the per-example pass) and this is said once.
_INLINED = ("pjit", "jit", "closed_call", "core_call")
# Unary layout ops through which a parameter still counts as "the same leaf".
_ALIASING = ("convert_element_type", "transpose", "reshape", "copy", "copy_p")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, stacklevel=3)


class _DenseUse(NamedTuple):
  """A parameter leaf entering the residual through one ``dot_general``."""

  leaf: int  # index in the flattened params
  eqn: Any  # the dot_general equation
  side: int  # operand position of the parameter (0: lhs, 1: rhs)
  chain: tuple  # the aliasing equations from the leaf to the dot operand, in order


class _Analysis(NamedTuple):
  jaxpr: Any  # ClosedJaxpr of f(flat_params, example)
  dense: dict  # leaf -> _DenseUse, the leaves that take the ghost path
  reasons: dict  # leaf -> why it takes the per-example path
  ghost_eqns: dict  # id(eqn) -> position in `dense` order
  inline: set  # id(eqn) of call equations that contain a ghost equation


def _is_literal(v) -> bool:
  return isinstance(v, jax.extend.core.Literal)


def _subjaxprs(eqn) -> list:
  return list(jax.extend.core.jaxprs_in_params(eqn.params))


def _analyse(closed, num_leaves: int, ghost: bool, declared: Sequence[bool | None],
             names: Sequence[str]) -> _Analysis:
  """Which leaves enter only through one ``dot_general`` with an activation."""
  uses: dict[int, list] = {i: [] for i in range(num_leaves)}
  contains: dict[int, set] = {}  # id(call eqn) -> ids of dot eqns inside

  def walk(jaxpr, alias: dict, calls: tuple) -> None:
    for eqn in jaxpr.eqns:
      hit = [k for k, v in enumerate(eqn.invars) if not _is_literal(v) and v in alias]
      if not hit:
        continue
      name = eqn.primitive.name
      if name in _ALIASING and len(eqn.invars) == 1:
        leaf, chain = alias[eqn.invars[0]]
        alias[eqn.outvars[0]] = (leaf, chain + (eqn,))
        continue
      if name in _INLINED:
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        inner = getattr(inner, "jaxpr", inner)
        sub = {inner.invars[k]: alias[eqn.invars[k]] for k in hit}
        walk(inner, sub, calls + (id(eqn),))
        continue
      if name == "dot_general" and len(hit) == 1:
        side = hit[0]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        leaf, chain = alias[eqn.invars[side]]
        if not (lb or rb):
          uses[leaf].append(("dot", eqn, side, chain, calls))
          continue
        uses[leaf].append(("batched dot_general", None, None, None, calls))
        continue
      for k in hit:
        uses[alias[eqn.invars[k]][0]].append((name, None, None, None, calls))
    for v in jaxpr.outvars:
      if not _is_literal(v) and v in alias:
        uses[alias[v][0]].append(("output", None, None, None, ()))

  top = closed.jaxpr
  walk(top, {v: (i, ()) for i, v in enumerate(top.invars[:num_leaves])}, ())

  dense, reasons = {}, {}
  for leaf in range(num_leaves):
    found = uses[leaf]
    ok = len(found) == 1 and found[0][0] == "dot"
    if declared[leaf] is True and not ok:
      kinds = sorted({u[0] for u in found}) or ["nothing"]
      raise ValueError(
          f"dense_leaves declares {names[leaf]} dense, but the per-example residual uses it "
          f"through {', '.join(kinds)} (a dense leaf must enter exactly once, as an operand "
          "of a matmul / dot_general with no batch dimensions)")
    if not ghost:
      reasons[leaf] = "ghost=False"
    elif declared[leaf] is False:
      reasons[leaf] = "declared not dense"
    elif ok:
      _, eqn, side, chain, calls = found[0]
      dense[leaf] = _DenseUse(leaf, eqn, side, chain)
      for call in calls:
        contains.setdefault(call, set()).add(id(eqn))
    else:
      kinds = sorted({u[0] for u in found})
      if len(found) > 1 and all(u[0] == "dot" for u in found):
        reasons[leaf] = f"used by {len(found)} matmuls"
      else:
        reasons[leaf] = "used by " + (", ".join(kinds) or "nothing")
      opaque = [u[0] for u in found if u[0] not in ("dot", "output")
                and (u[0] in ("conv_general_dilated", "batched dot_general")
                     or u[0] in _OPAQUE_NAMES)]
      if opaque:
        _warn_once(f"Sven ghost Gram: {names[leaf]} is used inside '{opaque[0]}', which the "
                   "ghost Gram does not look into; its Jacobian rows come from the "
                   "per-example pass")
  # A jitted helper applied to several leaves shares one inner equation: not per leaf.
  shared = {k for k, v in collections.Counter(id(u.eqn) for u in dense.values()).items() if v > 1}
  for leaf in [leaf for leaf, use in dense.items() if id(use.eqn) in shared]:
    del dense[leaf]
    reasons[leaf] = "matmul in a sub-function shared with other leaves"
  contains = {call: ids - shared for call, ids in contains.items() if ids - shared}
  ghost_eqns = {id(use.eqn): pos for pos, use in enumerate(dense.values())}
  return _Analysis(closed, dense, reasons, ghost_eqns, set(contains))


# Primitives with sub-programs (control flow, custom derivatives, remat) or convolutions:
# a parameter used there falls back to per-example rows, with a warning.
_OPAQUE_NAMES = ("scan", "while", "cond", "custom_jvp_call", "custom_vjp_call",
                 "custom_vjp_call_jaxpr", "checkpoint", "remat", "shard_map", "custom_lin")


def _leaf_names(params) -> list[str]:
  return [jax.tree_util.keystr(path) or "<root>"
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _declared_flags(dense_leaves, params, num_leaves: int) -> list[bool | None]:
  if dense_leaves is None:
    return [None] * num_leaves
  tree = dense_leaves(params) if callable(dense_leaves) else dense_leaves
  try:
    flags = jax.tree.structure(params).flatten_up_to(
        jax.tree.map(lambda f: f, tree, is_leaf=lambda x: x is None))
  except (ValueError, TypeError) as err:
    raise ValueError("dense_leaves must be a pytree with the structure of params (bool per "
                     f"leaf, None for automatic detection): {err}") from None
  out = []
  for f in flags:
    if f is not None and not isinstance(f, bool):
      raise ValueError(f"dense_leaves entries must be True, False or None, got {f!r}")
    out.append(f)
  return out


def _example_avals(batch) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must be a pytree of arrays with a leading example axis, got no "
                     "arrays")
  sizes = {x.shape[0] if getattr(x, "ndim", 0) >= 1 else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = [getattr(x, "shape", ()) for x in leaves]
    raise ValueError("batch leaves must share a leading example axis (the examples of the "
                     f"batch), got shapes {shapes}")
  return sizes.pop()


def _example_out_size(example_residual_fn, params, batch) -> int:
  out = jax.eval_shape(example_residual_fn, params, _example_avals(batch))
  if not hasattr(out, "shape") or len(out.shape) > 1:
    raise ValueError("example_residual_fn must return a scalar or a 1-D array of residuals "
                     f"for one example, got {out}")
  if len(out.shape) == 1 and out.shape[0] < 1:
    raise ValueError("example_residual_fn returned an empty residual vector for an example")
  return 1 if not out.shape else out.shape[0]


def _trace(example_residual_fn, params, batch):
  flat, treedef = jax.tree.flatten(params)

  def f(flat_params, example):
    return example_residual_fn(jax.tree.unflatten(treedef, flat_params), example)

  return jax.make_jaxpr(f)(flat, _example_avals(batch))


def _eval_tapped(jaxpr, consts, args, analysis: _Analysis, zs: Sequence, taps: dict):
  """Evaluates ``jaxpr``; each ghost ``dot_general`` gets ``+ z`` and records its activation."""
  env: dict = {}

  def read(v):
    return v.val if _is_literal(v) else env[v]

  for v, val in zip(jaxpr.constvars, consts, strict=True):
    env[v] = val
  for v, val in zip(jaxpr.invars, args, strict=True):
    env[v] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    key = id(eqn)
    if key in analysis.inline:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      consts_in = getattr(inner, "consts", [])
      inner = getattr(inner, "jaxpr", inner)
      outs = _eval_tapped(inner, consts_in, invals, analysis, zs, taps)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
      if key in analysis.ghost_eqns:
        pos = analysis.ghost_eqns[key]
        use = list(analysis.dense.values())[pos]
        taps[pos] = invals[1 - use.side]
        outs = [outs[0] + zs[pos].astype(outs[0].dtype)]
    for v, val in zip(eqn.outvars, outs, strict=True):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _dense_layout(use: _DenseUse):
  """For the ghost dot: activation contracting/free axes and the output's axis order."""
  (lc, rc), _ = use.eqn.params["dimension_numbers"]
  act_contract = lc if use.side == 1 else rc
  act = use.eqn.invars[1 - use.side].aval
  w = use.eqn.invars[use.side].aval
  w_contract = rc if use.side == 1 else lc
  act_free = [a for a in range(act.ndim) if a not in act_contract]
  w_free = [a for a in range(w.ndim) if a not in w_contract]
  return act_contract, act_free, w_contract, w_free


def _ghost_factors(use: _DenseUse, act: jax.Array, cot: jax.Array):
  """Rows of the dense leaf's per-example gradient ``sum_t a_t g_t^T`` as ``(A, G)``.

  ``act``: ``(B, *activation)``; ``cot``: ``(n, *dot_output)`` with ``n = B * T_out``.
  Returns ``A`` of shape ``(n, T, K)`` and ``G`` of shape ``(n, T, N)``, ``T`` the
  product of the activation's free ("token") axes, ``K`` of its contracting axes, ``N``
  of the leaf's free axes.
  """
  act_contract, act_free, _, w_free = _dense_layout(use)
  b = act.shape[0]
  n = cot.shape[0]
  t = math.prod(act.shape[1 + a] for a in act_free)
  k = math.prod(act.shape[1 + a] for a in act_contract)
  a = jnp.transpose(act, [0] + [1 + x for x in act_free] + [1 + x for x in act_contract])
  a = a.reshape(b, 1, t, k)
  a = jnp.broadcast_to(a, (b, n // b, t, k)).reshape(n, t, k)
  nf = len(act_free)
  nw = len(w_free)
  if use.side == 0:  # output axes: (w_free..., act_free...) -> (act_free..., w_free...)
    perm = [0] + [1 + nw + x for x in range(nf)] + [1 + x for x in range(nw)]
    cot = jnp.transpose(cot, perm)
  g = cot.reshape(n, t, -1)
  return a, g


def _ghost_gram(a: jax.Array, g: jax.Array) -> jax.Array:
  """``sum_{t,s} (a_it . a_js)(g_it . g_js)`` (``n x n``), the cheaper of two ways."""
  n, t, k = a.shape
  nn = g.shape[2]
  rep = _replicated()
  if t == 1:
    aa = jnp.einsum("ik,jk->ij", a[:, 0], a[:, 0], precision=_HIGHEST, out_sharding=rep)
    gg = jnp.einsum("ik,jk->ij", g[:, 0], g[:, 0], precision=_HIGHEST, out_sharding=rep)
    return aa * gg
  if (n * t) ** 2 * (k + nn) <= n * t * k * nn + n * n * k * nn:
    aa = jnp.einsum("itk,jsk->itjs", a, a, precision=_HIGHEST, out_sharding=rep)
    gg = jnp.einsum("itk,jsk->itjs", g, g, precision=_HIGHEST, out_sharding=rep)
    return jnp.sum(aa * gg, axis=(1, 3))
  rows = jnp.einsum("itk,itn->ikn", a, g, precision=_HIGHEST)  # per-example gradients
  return jnp.einsum("ikn,jkn->ij", rows, rows, precision=_HIGHEST, out_sharding=rep)


def _ghost_rotated_gram(a: jax.Array, g: jax.Array, t: jax.Array) -> jax.Array:
  """``X X^T`` for the rotated rows ``X_c = sum_i t_ic (per-example gradient i)`` of a
  dense leaf, formed a block of the leaf's input axis at a time (the refinement pass:
  rounding relative to the whitened rows, never the ``n x P_l`` rows at once)."""
  n, tt, k = a.shape
  nn = g.shape[2]
  c = t.shape[1]
  length = n * tt
  budget = 1 << 18  # floats per intermediate (1 MiB): temporaries stay small
  kc = int(max(1, min(k, budget // max(1, c * nn), budget // max(1, c * length))))
  steps = -(-k // kc)
  a = jnp.pad(a.reshape(length, k), ((0, 0), (0, steps * kc - k)))
  a = a.reshape(length, steps, kc).transpose(1, 0, 2)
  weights = jnp.repeat(t, tt, axis=0)  # (n * T, c): row i's weight on each token
  gl = g.reshape(length, nn)

  def body(acc, a_chunk):
    x = jnp.einsum("lc,lk,ln->ckn", weights, a_chunk, gl, precision=_HIGHEST)
    x = x.reshape(c, -1)
    return acc + jnp.matmul(x, x.T, precision=_HIGHEST), None

  return jax.lax.scan(body, jnp.zeros((c, c), g.dtype), a)[0]


def _ghost_transpose_times(use: _DenseUse, leaf: jax.Array, a: jax.Array, g: jax.Array,
                           w: jax.Array) -> jax.Array:
  """``M_l^T w`` for a dense leaf: ``sum_i w_i sum_t a_it g_it^T`` back in the leaf's layout."""
  _, _, w_contract, w_free = _dense_layout(use)
  d = jnp.einsum("itk,itn->kn", a, g * w[:, None, None].astype(g.dtype), precision=_HIGHEST,
                 out_sharding=_replicated())
  operand = use.eqn.invars[use.side].aval
  order = list(w_contract) + list(w_free)
  d = d.reshape([operand.shape[x] for x in order])
  d = jnp.transpose(d, np.argsort(order))

  def chain(p):  # the aliasing ops from the leaf to the dot operand
    for eqn in use.chain:
      with eqn.ctx.manager:
        p = eqn.primitive.bind(p, **eqn.primitive.get_bind_params(eqn.params))
    return p

  _, pullback = jax.vjp(chain, leaf)
  out = pullback(d.astype(operand.dtype))[0]
  if _replicated() is not None:  # back to the leaf's own sharding
    out = jax.sharding.reshard(out, jax.typeof(leaf).sharding.spec)
  return out


def _to_replicated(x: jax.Array) -> jax.Array:
  """``x`` replicated over the current mesh (``reshard`` on explicit axes, a sharding
  constraint on automatic ones)."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = jax.sharding.PartitionSpec()
  if mesh.axis_types and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def _pin(x: jax.Array) -> jax.Array:
  """``x`` held replicated on a mesh (so that the partitioner does not split the small
  replicated work of the spectrum again); unchanged without a mesh."""
  return x if jax.sharding.get_abstract_mesh().empty else _to_replicated(x)


def _gather_examples(arrays: Sequence[jax.Array], num_examples: int) -> list[jax.Array]:
  """The per-example ``arrays`` (leading axis: the examples, possibly sharded over a
  mesh axis) replicated by ONE all-gather of their concatenation; unchanged without a
  mesh.

  Cross-example entries of ``M M^T`` pair examples held by different devices, so with
  the batch sharded some gather is intrinsic; gathering the layer inputs and output
  cotangents (``B (T K + T_out T N)`` floats per dense layer, never ``B x P``), the
  per-example rows of the other leaves and the residuals as one block makes it a
  single collective, and the Gram, its spectrum, the refinement and the residuals'
  weights are then computed replicated without further communication.
  """
  if jax.sharding.get_abstract_mesh().empty or not arrays:
    return list(arrays)
  flat = [jnp.reshape(x, (num_examples, -1)) for x in arrays]
  dtype = jnp.result_type(*flat)
  packed = _to_replicated(jnp.concatenate([f.astype(dtype) for f in flat], axis=1))
  out, start = [], 0
  for x, f in zip(arrays, flat, strict=True):
    width = f.shape[1]
    out.append(_to_replicated(packed[:, start:start + width].reshape(x.shape).astype(x.dtype)))
    start += width
  return out


def _per_example_pass(analysis: _Analysis | None, flat_params: list, batch, t_out: int):
  """One vmapped forward + backward over the examples.

  Returns ``(r, rows, acts, cots)``: residuals ``(n,)``, per-example Jacobian rows of the
  non-dense leaves (``{leaf: (n, *shape)}``), and for each dense leaf its activations
  ``(B, ...)`` and output cotangents ``(n, ...)``; ``n = B * T_out``, example-major.
  """
  jaxpr = analysis.jaxpr
  dense = analysis.dense
  free = [i for i in range(len(flat_params)) if i not in dense]
  uses = list(dense.values())

  def one(example):
    zs0 = [jnp.zeros(u.eqn.outvars[0].aval.shape, u.eqn.outvars[0].aval.dtype) for u in uses]

    def f(free_params, zs):
      full = list(flat_params)
      for i, p in zip(free, free_params, strict=True):
        full[i] = p
      taps: dict = {}
      (out,) = _eval_tapped(jaxpr.jaxpr, jaxpr.consts, full + jax.tree.leaves(example),
                            analysis, zs, taps)
      return jnp.reshape(out, (-1,)), [taps[k] for k in range(len(uses))]

    r, pullback, acts = jax.vjp(f, [flat_params[i] for i in free], zs0, has_aux=True)
    rows, cots = jax.vmap(pullback)(jnp.eye(t_out, dtype=r.dtype))
    return r, rows, acts, cots

  r, rows, acts, cots = jax.vmap(one)(batch)
  n = r.shape[0] * t_out
  flatten = lambda x: x.reshape((n,) + x.shape[2:])
  rows = {i: flatten(x) for i, x in zip(free, rows, strict=True)}
  return r.reshape(n), rows, acts, [flatten(c) for c in cots]
