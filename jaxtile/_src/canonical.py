"""Equation chains that compute simpler things than they spell: rewritten into what they compute,
so that a region (`region.find_regions`) sees the ops it can hold.

* Unit axes added and taken away again (`drop_round_trips`). Equinox's layers take one
  unbatched (C, H, W) image; its `Conv` adds a batch axis of 1 before `lax.conv_general_dilated`
  and squeezes it from the result. Under `jax.vmap` this becomes, around every conv, a
  `broadcast_in_dim` inserting a unit axis and a `reshape` merging it into the batch on the way
  in, and a `reshape` splitting one out and a `squeeze` on the way out: what comes out is what
  went in. A region grows through the equations reading its values and stopped at the first.
  Every reshape (`dimensions=None`), `squeeze`, `broadcast_in_dim` that only inserts unit axes
  and sum over axes of extent 1 (how JAX transposes such a broadcast, in a gradient) keeps the
  elements in row-major order, so a chain of them that ends at the shape and dtype it started
  from is the identity.
* A broadcast of a broadcast (`fold_broadcasts`) is one broadcast. A `vmap`ped custom JVP rule
  (`jax.nn.relu`'s) makes its zeros unbatched, a scalar broadcast to (C, H, W), and then
  broadcasts them to (N, C, H, W); a tile evaluates one broadcast of the scalar to its window.
* A call of several results whose body acts elementwise (`inline_calls`) is its body. JAX
  linearizes a jitted activation (`jax.nn.gelu`, `silu`, `elu`) into a call that returns its
  value and the residuals of its derivative, and a call that applies that derivative; inlined,
  each is a few elementwise equations a region can hold. So is a call computing statistics
  (`jnp.var`'s), whose sums a region computes in passes over tiles.
* An elementwise op on a value whose channels a reshape split into groups (`sink_splits`) runs
  on the unsplit value instead. Equinox's and haiku's GroupNorm split the channels, normalize
  in that shape and merge them back; with the ops before the split, split and merge are a
  round trip that `drop_round_trips` drops, and only the norm's sums read the split value.
* A conversion of a literal (`fold_literal_converts`) is a literal. `jnp.pad` is a call that
  converts its padding value (a literal at the call) to the image's dtype; inlined, its `pad`
  reads a literal zero, which a region reads as a shift of windows (`region._shift_window`).
* A reduction over one axis whose result comes back to its operand's rank with that axis of
  extent 1 (`keep_reduced_axes`) keeps the axis. flax's LayerNorm sums over the channels to
  (N, H, W), computes its mean and variance there and broadcasts them back to (N, H, W, 1);
  a region holds values of its activations' rank only. As a `reduce_window` over the whole
  axis, with the arithmetic at (N, H, W, 1), it is a pool that reads no neighbour
  (`region._pool_ok`).
* A broadcast that repeats a scalar or a small operand (`place_broadcasts`) is made again
  just before each equation that reads it. A differentiated program makes its zeros
  (`select_n(mask, zeros, g)` for a relu) and its cotangent seed as full-size broadcasts of a
  scalar, and equinox's GroupNorm and haiku's conv bias broadcast per-channel weights to the
  image; one read by a region's equation alone can join the region, where a tile broadcasts
  the operand to its window.
* A product of a value's last axis with a 2-D weight (`dense_as_conv`: flax's `nn.Dense` and
  haiku's `hk.Linear` on an image, `x @ w`) is a 1x1 conv, the last axis its features: a
  region holds it as it holds any conv (ConvNeXt's pointwise layers, a UNet's projections).
  Where no region takes it, the rewriter puts the product back (`kernels`, `originals`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtile._src import _compat


def _keeps_order(eqn) -> bool:
  """Whether `eqn` only reshapes its one operand: row-major order and elements kept."""
  if len(eqn.invars) != 1 or len(eqn.outvars) != 1 or eqn.params.get("sharding") is not None:
    return False
  name = eqn.primitive.name
  if name == "reshape":
    return eqn.params.get("dimensions") is None
  if name == "squeeze":
    return True
  if name == "reduce_sum":  # over axes of extent 1 (a transposed broadcast's): a squeeze
    shape = eqn.invars[0].aval.shape
    return eqn.params.get("out_sharding") is None and all(shape[a] == 1 for a in eqn.params["axes"])
  if name == "broadcast_in_dim":
    # Same size: nothing broadcast, so the dims not mapped have extent 1; increasing: in order.
    dims = tuple(eqn.params["broadcast_dimensions"])
    return (math.prod(eqn.invars[0].aval.shape) == math.prod(eqn.outvars[0].aval.shape)
            and all(a < b for a, b in zip(dims, dims[1:])))
  return False


def drop_round_trips(jaxpr: _compat.Jaxpr) -> _compat.Jaxpr:
  """`jaxpr` with each value that an order-keeping chain (`_keeps_order`) brings back to its
  start's aval replaced by that start, and the chain's equations left unread dropped."""
  start, same = {}, {}
  for e in jaxpr.eqns:
    x = e.invars[0] if e.invars else None
    if not _keeps_order(e) or isinstance(x, _compat.Literal):
      continue
    out = e.outvars[0]
    start[out] = start.get(x, x)
    if start[out].aval == out.aval:
      same[out] = start[out]
  if not same:
    return jaxpr
  read = lambda v: v if isinstance(v, _compat.Literal) else same.get(v, v)
  outvars = [read(v) for v in jaxpr.outvars]
  live = {v for v in outvars if not isinstance(v, _compat.Literal)}
  eqns = []
  for e in reversed(jaxpr.eqns):
    if _keeps_order(e) and e.outvars[0] not in live:
      continue  # a step of a chain whose end now reads its start, or of one nothing read
    e = _compat.replace_eqn(e, invars=[read(v) for v in e.invars])
    live.update(v for v in e.invars if not isinstance(v, _compat.Literal))
    eqns.append(e)
  return _compat.replace_jaxpr(jaxpr, eqns=eqns[::-1], outvars=outvars)


def dense_axis(eqn) -> Optional[int]:
  """For a `dot_general` contracting the last axis of a floating value of rank 3 to 5 (1 to 3
  spatial dims, as convs have) with one axis of a 2-D weight of its dtype (no batch axes; a
  precision, if any, of `lax.Precision`s, which a conv takes too), the weight's contracted
  axis; else None."""
  if eqn.primitive.name != "dot_general" or eqn.params.get("out_sharding") is not None:
    return None
  x, w = eqn.invars
  if isinstance(x, _compat.Literal) or isinstance(w, _compat.Literal):
    return None
  (lhs_axes, rhs_axes), batch = eqn.params["dimension_numbers"]
  rank = x.aval.ndim
  precision = eqn.params.get("precision")
  if (not 3 <= rank <= 5 or w.aval.ndim != 2 or any(map(len, batch))
      or tuple(lhs_axes) != (rank - 1,) or tuple(rhs_axes) not in ((0,), (1,))
      or x.aval.dtype != w.aval.dtype or not jnp.issubdtype(x.aval.dtype, jnp.floating)
      or not (precision is None or all(isinstance(p, lax.Precision) for p in precision))):
    return None
  return rhs_axes[0]


def dense_as_conv(jaxpr: _compat.Jaxpr) -> tuple[_compat.Jaxpr, dict, dict]:
  """`jaxpr` with each product `dense_axis` accepts written as a 1x1 conv: `x` of shape
  (N, *spatial, C) in the layout (0, rank - 1, 1, ..., rank - 2) (NHWC), the weight reshaped
  (and transposed, when it is contracted on its second axis) to (1, ..., 1, C, D) (HWIO):
  the same sums of products, `out[..., d] = sum_c x[..., c] * w[c, d]`. Also `originals`
  (id of each conv -> [the product it stands for]) and `kernels` (id of each equation making a
  conv's weight -> id of that conv)."""
  eqns, originals, kernels = [], {}, {}
  for e in jaxpr.eqns:
    axis = dense_axis(e)
    if axis is None:
      eqns.append(e)
      continue
    x, w = e.invars
    rank = x.aval.ndim
    spatial = tuple(range(1, rank - 1))
    dn = lax.ConvDimensionNumbers((0, rank - 1, *spatial), (rank - 1, rank - 2, *range(rank - 2)),
                                  (0, rank - 1, *spatial))
    params = dict(precision=e.params.get("precision"),
                  preferred_element_type=e.params.get("preferred_element_type"))

    def conv(x, w, axis=axis, dn=dn, params=params):
      w = (w if axis == 0 else w.T).reshape((1,) * (x.ndim - 2) + (x.shape[-1], -1))
      return lax.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "VALID",
                                      dimension_numbers=dn, **params)

    made = _compat.traced_eqns(conv, e.invars, e.outvars, e.source_info)
    (made_conv,) = [m for m in made if _compat.is_conv(m)]
    originals[id(made_conv)] = [e]
    kernels.update((id(m), id(made_conv)) for m in made if m is not made_conv)
    eqns += made
  if not originals:
    return jaxpr, {}, {}
  return _compat.replace_jaxpr(jaxpr, eqns=eqns), originals, kernels


def fold_literal_converts(jaxpr: _compat.Jaxpr) -> _compat.Jaxpr:
  """`jaxpr` with each `convert_element_type` of a literal replaced by the converted literal,
  where the conversion is exact (it converts back to the same value: no NaN, no value out of
  the new type's range, whose conversion NumPy and XLA may do differently)."""
  folded: dict = {}
  read = lambda v: v if isinstance(v, _compat.Literal) else folded.get(v, v)
  eqns = []
  for e in jaxpr.eqns:
    x = read(e.invars[0]) if e.invars else None
    if e.primitive.name == "convert_element_type" and isinstance(x, _compat.Literal):
      aval, value = e.outvars[0].aval, np.asarray(x.val)
      with np.errstate(all="ignore"):
        converted = value.astype(aval.dtype)
        exact = np.array_equal(converted.astype(value.dtype), value)
      if exact:
        folded[e.outvars[0]] = _compat.Literal(converted, aval)
        continue
    eqns.append(e if not folded else _compat.replace_eqn(e, invars=[read(v) for v in e.invars]))
  if not folded:
    return jaxpr
  return _compat.replace_jaxpr(jaxpr, eqns=eqns, outvars=[read(v) for v in jaxpr.outvars])


def fold_broadcasts(jaxpr: _compat.Jaxpr) -> _compat.Jaxpr:
  """`jaxpr` with each `broadcast_in_dim` of a `broadcast_in_dim`'s result made one broadcast of
  the first's operand, and the broadcasts nothing reads any more dropped.

  The first maps operand dim i to dim d1[i] of its result, the second that one's dim j to d2[j]:
  together operand dim i lands at d2[d1[i]]. Each dim of extent 1 along the way may broadcast;
  one that does not keeps its extent through both."""
  source = {}  # var -> (the operand of the broadcasts making it, composed dims)
  eqns, changed = [], False
  for e in jaxpr.eqns:
    if e.primitive.name == "broadcast_in_dim" and e.params.get("sharding") is None and len(
        e.invars) == 1:
      x, dims = e.invars[0], tuple(e.params["broadcast_dimensions"])
      if not isinstance(x, _compat.Literal) and x in source:
        x, inner = source[x]
        dims = tuple(dims[d] for d in inner)
        e = _compat.replace_eqn(e, invars=[x], params=dict(e.params, broadcast_dimensions=dims))
        changed = True
      source[e.outvars[0]] = (x, dims)
    eqns.append(e)
  if not changed:
    return jaxpr
  live = {v for v in jaxpr.outvars if not isinstance(v, _compat.Literal)}
  kept = []
  for e in reversed(eqns):
    if e.primitive.name == "broadcast_in_dim" and e.outvars[0] not in live:
      continue
    live.update(v for v in e.invars if not isinstance(v, _compat.Literal))
    kept.append(e)
  return _compat.replace_jaxpr(jaxpr, eqns=kept[::-1])


_KEPT = {"reduce_sum": lax.reduce_window_sum_p, "reduce_max": lax.reduce_window_max_p,
         "reduce_min": lax.reduce_window_min_p}


def keep_reduced_axes(jaxpr: _compat.Jaxpr, elementwise) -> _compat.Jaxpr:
  """`jaxpr` with each reduction over one axis a (`_KEPT`) whose values (its result, and what
  equations `elementwise(eqn)` accepts make of it and of scalars) are read by nothing but those
  equations and broadcasts that put a back with extent 1, rewritten to keep the axis: a
  `reduce_window` over all of a, the equations at that rank, the broadcasts dropped. Values
  joined by an equation are rewritten together or not at all."""
  key: dict = {}  # value -> (a, the reduction's operand shape)
  for e in jaxpr.eqns:
    ins = _compat.input_vars(e)
    if (e.primitive.name in _KEPT and len(e.params["axes"]) == 1 and ins[0].aval.ndim >= 2
        and ins[0] not in key):
      key[e.outvars[0]] = (int(e.params["axes"][0]), tuple(ins[0].aval.shape))
    elif elementwise(e) and len(e.outvars) == 1 and any(v in key for v in ins):
      keys = {key[v] for v in ins if v in key}
      if len(keys) == 1 and all(v in key or v.aval.ndim == 0 for v in ins):
        (k,) = keys
        if tuple(e.outvars[0].aval.shape) == _dropped(k):
          key[e.outvars[0]] = k
  if not key:
    return jaxpr
  # Groups of values joined by equations; a group read by anything else stays as it is.
  group = {v: v for v in key}

  def find(v):
    while group[v] is not v:
      group[v] = group[group[v]]
      v = group[v]
    return v

  for e in jaxpr.eqns:
    if e.outvars and e.outvars[0] in key:
      for v in _compat.input_vars(e):
        if v in key:
          group[find(v)] = find(e.outvars[0])
  bad = {find(v) for v in jaxpr.outvars if not isinstance(v, _compat.Literal) and v in key}
  for e in jaxpr.eqns:
    ok = (e.outvars and e.outvars[0] in key) or _puts_back(e, key)
    if not ok:
      bad.update(find(v) for v in _compat.input_vars(e) if v in key)
  kept = {v for v in key if find(v) not in bad}
  if not kept:
    return jaxpr
  new, alias, eqns = {}, {}, []
  for e in jaxpr.eqns:
    invars = [alias.get(v, new.get(v, v)) if not isinstance(v, _compat.Literal) else v
              for v in e.invars]
    out = e.outvars[0] if e.outvars else None
    if out in kept:
      a, shape = key[out]
      new[out] = _compat.new_var(_compat.with_shape(out.aval, _kept_shape(key[out])))
      if e.primitive.name in _KEPT:
        n = len(shape)
        e = _compat.replace_eqn(e, primitive=_KEPT[e.primitive.name], params=dict(
            window_dimensions=tuple(shape[i] if i == a else 1 for i in range(n)),
            window_strides=(1,) * n, padding=((0, 0),) * n, base_dilation=(1,) * n,
            window_dilation=(1,) * n))
      eqns.append(_compat.replace_eqn(e, invars=invars, outvars=[new[out]]))
    elif _puts_back(e, key) and e.invars[0] in kept:
      alias[out] = new[e.invars[0]]  # the same shape: the value at its kept rank
    else:
      eqns.append(_compat.replace_eqn(e, invars=invars) if invars != list(e.invars) else e)
  outvars = [alias.get(v, v) if not isinstance(v, _compat.Literal) else v
             for v in jaxpr.outvars]
  return _compat.replace_jaxpr(jaxpr, eqns=eqns, outvars=outvars)


def _dropped(key) -> tuple[int, ...]:
  a, shape = key
  return shape[:a] + shape[a + 1:]


def _kept_shape(key) -> tuple[int, ...]:
  a, shape = key
  return shape[:a] + (1,) + shape[a + 1:]


def _puts_back(eqn, key: dict) -> bool:
  """A broadcast of a value of `key` that puts its reduced axis back with extent 1."""
  if eqn.primitive.name != "broadcast_in_dim" or eqn.params.get("sharding") is not None:
    return False
  x = eqn.invars[0]
  if isinstance(x, _compat.Literal) or x not in key:
    return False
  a, shape = key[x]
  return (tuple(eqn.params["shape"]) == _kept_shape(key[x])
          and tuple(eqn.params["broadcast_dimensions"]) == tuple(
              i for i in range(len(shape)) if i != a))


def _placed_broadcast(eqn) -> bool:
  """A broadcast that repeats its operand: of a scalar, or to more elements than it has (a
  bias of shape (C,) to (N, H, W, C), a weight of shape (C, 1, 1) to (1, C, H, W)). Run after
  `upsample.group`, which takes `jnp.repeat`'s broadcasts into upsamplings first."""
  return (eqn.primitive.name == "broadcast_in_dim" and len(eqn.invars) == 1
          and eqn.params.get("sharding") is None and (
              eqn.invars[0].aval.ndim == 0
              or math.prod(eqn.invars[0].aval.shape) < math.prod(eqn.params["shape"])))


def place_broadcasts(jaxpr: _compat.Jaxpr, elementwise=lambda eqn: False) -> _compat.Jaxpr:
  """`jaxpr` with each broadcast that repeats its operand (`_placed_broadcast`) made again just
  before each equation that reads it, one copy per reader, and none where nothing reads it.

  A copy read by an equation `elementwise(eqn)` accepts is made at that equation's shape
  (a weight of shape (C, 1, 1) broadcast to (1, C, H, W) and multiplied into (N, C, H, W):
  the copy is (N, C, H, W)), else at the broadcast's. An operand of lower rank than the result
  (not a scalar) is first given the result's rank, with axes of extent 1 (a broadcast that adds
  no elements, made where the original was), so a copy reads a value of its own rank. A copy
  reads what the original read, made before the original, so it is made before its reader."""
  broadcasts = {e.outvars[0]: e for e in jaxpr.eqns if _placed_broadcast(e)}
  if not broadcasts:
    return jaxpr
  kept = {v for v in jaxpr.outvars if not isinstance(v, _compat.Literal) and v in broadcasts}
  eqns, ranked = [], {}
  for e in jaxpr.eqns:
    if _placed_broadcast(e):
      if e.outvars[0] in kept:
        eqns.append(e)  # a jaxpr output: it stays where it is
      x, shape = e.invars[0], tuple(e.params["shape"])
      if 0 < x.aval.ndim < len(shape):
        dims = tuple(e.params["broadcast_dimensions"])
        keep = tuple(x.aval.shape[dims.index(a)] if a in dims else 1 for a in range(len(shape)))
        ranked[e.outvars[0]] = _compat.new_var(_compat.with_shape(x.aval, keep))
        eqns.append(_compat.replace_eqn(e, outvars=[ranked[e.outvars[0]]],
                                        params=dict(e.params, shape=keep)))
      continue
    invars = list(e.invars)
    for n, v in enumerate(invars):
      if not isinstance(v, _compat.Literal) and v in broadcasts:
        made = broadcasts[v]
        shape = tuple(made.params["shape"])
        if elementwise(e) and len(e.outvars) == 1 and e.outvars[0].aval.ndim == len(shape):
          shape = tuple(e.outvars[0].aval.shape)
        params = dict(made.params, shape=shape)
        x = made.invars
        if v in ranked:
          x, params["broadcast_dimensions"] = [ranked[v]], tuple(range(len(shape)))
        invars[n] = _compat.new_var(_compat.with_shape(v.aval, shape))
        eqns.append(_compat.replace_eqn(made, invars=x, outvars=[invars[n]], params=params))
    eqns.append(_compat.replace_eqn(e, invars=invars) if invars != list(e.invars) else e)
  return _compat.replace_jaxpr(jaxpr, eqns=eqns)


def inline_calls(jaxpr: _compat.Jaxpr, inline, made: Optional[dict] = None) -> _compat.Jaxpr:
  """`jaxpr` with each call equation (`jit`) that `inline(eqn)` accepts replaced by its body's
  equations (calls in it too, where accepted), on fresh variables (one body may stand for
  several calls), its constants as literals; what read the call's results reads the body's
  outputs. `made`, if given, receives for each call of `jaxpr` inlined (by `id`) the equations
  that stand for it."""
  subst: dict = {}  # a call's result -> what stands for it
  read = lambda env, v: v if isinstance(v, _compat.Literal) else env.get(v, v)
  eqns = []

  def expand(e, invars, fresh: bool) -> list:
    """`e` on `invars`: appended as it is (on fresh outputs inside a body), or its body."""
    if not inline(e):
      outvars = [_compat.new_var(v.aval) for v in e.outvars] if fresh else list(e.outvars)
      eqns.append(e if not fresh and invars == list(e.invars) else _compat.replace_eqn(
          e, invars=invars, outvars=outvars))
      return outvars
    closed = e.params["jaxpr"]
    body = getattr(closed, "jaxpr", closed)
    env = dict(zip(body.invars, invars))
    env.update((v, _compat.Literal(c, v.aval)) for v, c in zip(
        body.constvars, getattr(closed, "consts", ())))
    for inner in body.eqns:
      env.update(zip(inner.outvars, expand(inner, [read(env, v) for v in inner.invars], True)))
    return [read(env, v) for v in body.outvars]

  for e in jaxpr.eqns:
    start = len(eqns)
    results = expand(e, [read(subst, v) for v in e.invars], False)
    if results != list(e.outvars):
      subst.update(zip(e.outvars, results))
    if made is not None and inline(e):
      made[id(e)] = eqns[start:]
  if not subst:
    return jaxpr
  return _compat.replace_jaxpr(jaxpr, eqns=eqns, outvars=[read(subst, v) for v in jaxpr.outvars])


def split_axes(eqn) -> tuple[int, ...]:
  """The axes a reshape may be read as splitting into two adjacent ones, keeping every other
  axis (GroupNorm: the channels into groups and channels per group); more than one only where
  axes of extent 1 make it ambiguous. Empty for any other equation."""
  if (eqn.primitive.name != "reshape" or eqn.params.get("dimensions") is not None
      or eqn.params.get("sharding") is not None or isinstance(eqn.invars[0], _compat.Literal)):
    return ()
  old, new = tuple(eqn.invars[0].aval.shape), tuple(eqn.params["new_sizes"])
  return tuple(a for a in range(len(old)) if len(new) == len(old) + 1 and old[:a] == new[:a]
               and old[a + 1:] == new[a + 2:] and new[a] * new[a + 1] == old[a])


# The reductions a statistics pass computes (`region._REDUCTIONS`; region imports this module).
_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min")


def sink_splits(jaxpr: _compat.Jaxpr, elementwise) -> _compat.Jaxpr:
  """`jaxpr` with each equation that `elementwise(eqn)` accepts and that reads the result of a
  reshape splitting an axis in two (`split_axes`) computed before the split instead: on the
  unsplit values, with the split made of its result. `drop_round_trips` then drops a split
  that a reshape merges back, and what is left split is read by what needs it split (the
  reductions of a norm's statistics). An equation whose result only reductions read stays
  where it is (flax's `x * x` of a mean square): they read it split either way.

  Row-major order makes merging axes a and a + 1 a bijection of indices, (i, j) -> i * q + j for
  a pair of extents (p, q), whatever the other axes are. An elementwise op reads each operand at
  the same index, broadcasting along axes of extent 1; so `op(split(x), s)` is
  `split(op(x, merge(s')))`, where `s'` is the operand broadcast along the pair to (p, q) where
  either of its extents there is not 1 (a per-group mean, `(n, g, 1, 1, 1)`, becomes
  `(n, g, q, 1, 1)`, then `(n, g * q, 1, 1)`) and left at (1, 1) otherwise."""
  split = {}  # a split's result -> (the value it splits, the axis, the reshape)
  reduced = {}  # value -> whether reductions alone read it
  for e in jaxpr.eqns:
    for v in e.invars:
      if not isinstance(v, _compat.Literal):
        reduced[v] = reduced.get(v, True) and e.primitive.name in _REDUCTIONS
  for v in jaxpr.outvars:
    if not isinstance(v, _compat.Literal):  # a constant output (a zero gradient)
      reduced[v] = False
  eqns, changed = [], False
  for e in jaxpr.eqns:
    axes = split_axes(e)
    if axes:
      split[e.outvars[0]] = (e.invars[0], axes[0], e)
      eqns.append(e)
      continue
    read = [split[v] for v in e.invars if not isinstance(v, _compat.Literal) and v in split]
    out = e.outvars[0] if len(e.outvars) == 1 else None
    if (not read or out is None or not elementwise(e) or e.params.get("sharding") is not None
        or reduced.get(out, False)  # summed split as it is (a norm's mean square)
        or len({r[1] for r in read}) != 1
        or any(v in split and v.aval.shape != out.aval.shape for v in e.invars
               if not isinstance(v, _compat.Literal))):
      eqns.append(e)
      continue
    a, template = read[0][1], read[0][2]
    full = tuple(out.aval.shape)
    merge = lambda shape: shape[:a] + (shape[a] * shape[a + 1],) + shape[a + 2:]
    invars = []
    for v in e.invars:
      if isinstance(v, _compat.Literal) or v.aval.ndim == 0:
        invars.append(v)
      elif v in split:
        invars.append(split[v][0])
      else:
        shape = tuple(v.aval.shape)
        if shape[a:a + 2] != (1, 1):
          shape = shape[:a] + full[a:a + 2] + shape[a + 2:]
        m = _compat.new_var(_compat.with_shape(v.aval, merge(shape)))
        eqns += _compat.traced_eqns(
            lambda s, shape=shape: lax.reshape(
                lax.broadcast_in_dim(s, shape, tuple(range(len(shape)))), merge(shape)),
            [v], [m], e.source_info)
        invars.append(m)
    merged = _compat.new_var(_compat.with_shape(out.aval, merge(full)))
    eqns.append(_compat.replace_eqn(e, invars=invars, outvars=[merged]))
    eqns.append(_compat.replace_eqn(template, invars=[merged], outvars=[out],
                                    params=dict(template.params, new_sizes=full),
                                    source_info=e.source_info))
    split[out] = (merged, a, template)
    changed = True
  return _compat.replace_jaxpr(jaxpr, eqns=eqns) if changed else jaxpr
