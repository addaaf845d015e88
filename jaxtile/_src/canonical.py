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
  each is a few elementwise equations a region can hold.
* A broadcast of a scalar (`place_broadcasts`) is made again just before each equation that
  reads it. A differentiated program makes its zeros (`select_n(mask, zeros, g)` for a relu) and
  its cotangent seed as full-size broadcasts of a scalar; one read by a region's equation alone
  can join the region, where a tile broadcasts the scalar to its window.
"""

from __future__ import annotations

import math

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


def _scalar_broadcast(eqn) -> bool:
  return (eqn.primitive.name == "broadcast_in_dim" and len(eqn.invars) == 1
          and eqn.invars[0].aval.ndim == 0 and eqn.params.get("sharding") is None)


def place_broadcasts(jaxpr: _compat.Jaxpr) -> _compat.Jaxpr:
  """`jaxpr` with each broadcast of a scalar (`_scalar_broadcast`) made just before each equation
  that reads it, one copy per reader, and none where nothing reads it. A copy reads the same
  scalar, made before the original, so it is made before its reader, in order."""
  broadcasts = {e.outvars[0]: e for e in jaxpr.eqns if _scalar_broadcast(e)}
  if not broadcasts:
    return jaxpr
  kept = {v for v in jaxpr.outvars if not isinstance(v, _compat.Literal) and v in broadcasts}
  eqns = []
  for e in jaxpr.eqns:
    if _scalar_broadcast(e):
      if e.outvars[0] in kept:
        eqns.append(e)  # a jaxpr output: it stays where it is
      continue
    invars = list(e.invars)
    for n, v in enumerate(invars):
      if not isinstance(v, _compat.Literal) and v in broadcasts:
        made = broadcasts[v]
        invars[n] = _compat.new_var(v.aval)
        eqns.append(_compat.replace_eqn(made, outvars=[invars[n]]))
    eqns.append(_compat.replace_eqn(e, invars=invars) if invars != list(e.invars) else e)
  return _compat.replace_jaxpr(jaxpr, eqns=eqns)


def inline_calls(jaxpr: _compat.Jaxpr, inline) -> _compat.Jaxpr:
  """`jaxpr` with each call equation (`jit`) that `inline(eqn)` accepts replaced by its body's
  equations (calls in it too, where accepted), on fresh variables (one body may stand for
  several calls), its constants as literals; what read the call's results reads the body's
  outputs."""
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
    results = expand(e, [read(subst, v) for v in e.invars], False)
    if results != list(e.outvars):
      subst.update(zip(e.outvars, results))
  if not subst:
    return jaxpr
  return _compat.replace_jaxpr(jaxpr, eqns=eqns, outvars=[read(subst, v) for v in jaxpr.outvars])
