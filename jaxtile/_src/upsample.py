"""Nearest-neighbour upsampling by integer factors, as a region op.

JAX has no upsampling primitive; user code emits one of two forms:

* `jnp.repeat(x, f, axis=a)`: a `broadcast_in_dim` inserting an axis of size f after axis a,
  then a `reshape` merging the two (element (i, k) lands at i * f + k, and holds x[i]);
* `jax.image.resize(x, shape, "nearest")` with an integer factor f: a `jit` call whose body
  `gather`s along each resized axis with indices computed from an `iota`, which equal
  `arange(n * f) // f` exactly when the factor is an integer.

Both repeat each element f times along the axis: output j holds x[j // f]. A chain of such
steps (one per spatial axis) is one upsampling with a factor per axis. `group` replaces every
chain of a jaxpr by one call of `repeat` (`factors_of` reads its factors back), so that a
region sees one equation reading one value, as it sees a transposed conv (`region._windows`
walks the receptive field through it as a transposed conv with lhs dilation f, a kernel of f
ones and padding f - 1: output j reads the one input at a multiple of f in [j - f + 1, j]).
Where no region takes it, the rewriter puts the original equations back (`Grouped.originals`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional

import jax
import numpy as np
from jax import lax

from jaxtile._src import _compat

def _iota(*, dtype, shape, dimension, **_):
  along = np.arange(shape[dimension]).reshape([-1 if d == dimension else 1
                                               for d in range(len(shape))])
  return np.broadcast_to(along, shape).astype(dtype)


def _broadcast_in_dim(x, *, shape, broadcast_dimensions, **_):
  expanded = np.reshape(x, [x.shape[broadcast_dimensions.index(d)] if d in broadcast_dimensions
                            else 1 for d in range(len(shape))])
  return np.broadcast_to(expanded, shape)


def _div(a, b):
  if np.issubdtype(a.dtype, np.integer):  # lax.div rounds toward zero
    return np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))
  return np.true_divide(a, b)


# The primitives a constant index computation (`jax.image.resize`'s) uses, in NumPy: folded at
# trace time, without compiling anything, when every operand is known and the result small.
# Each result is cast to its equation's dtype.
_NUMPY = {
    "iota": _iota, "broadcast_in_dim": _broadcast_in_dim,
    "reshape": lambda x, *, new_sizes, dimensions, **_: (
        np.reshape(x, new_sizes) if dimensions is None else None),
    "convert_element_type": lambda x, **_: x,  # the cast below (toward zero, as XLA's)
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": _div, "neg": np.negative,
    "max": np.maximum, "min": np.minimum, "floor": np.floor, "ceil": np.ceil,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "eq": np.equal, "ne": np.not_equal,
    "select_n": lambda which, *cases: np.choose(which.astype(np.int32), cases),
    "clamp": lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi),
}
_FOLD_LIMIT = 1 << 20  # elements


def repeat(x, factors):
  """`x` with each element repeated `factors[a]` times along each axis a, by broadcasts and
  reshapes (pure data movement: exact in every dtype)."""
  for a, f in enumerate(factors):
    if f != 1:
      shape = x.shape
      x = lax.broadcast_in_dim(x, (*shape[:a + 1], f, *shape[a + 1:]),
                               (*range(a + 1), *range(a + 2, x.ndim + 1)))
      x = x.reshape(*shape[:a], shape[a] * f, *shape[a + 1:])
  return x


def _insert_after(e) -> Optional[tuple[int, int]]:
  """(a, f) for a `broadcast_in_dim` inserting an axis of size f right after axis a."""
  if e.primitive.name != "broadcast_in_dim" or len(e.invars) != 1:
    return None
  x, shape = e.invars[0].aval.shape, tuple(e.params["shape"])
  dims = e.params["broadcast_dimensions"]
  if len(shape) != len(x) + 1:
    return None
  for a in range(len(x)):
    if (tuple(dims) == (*range(a + 1), *range(a + 2, len(shape)))
        and shape[:a + 1] == tuple(x[:a + 1]) and shape[a + 2:] == tuple(x[a + 1:])):
      return a, shape[a + 1]
  return None


def _merges(e, a: int) -> bool:
  """Whether `e` is a row-major `reshape` merging axes a and a + 1 of its operand."""
  if e.primitive.name != "reshape" or e.params.get("dimensions") is not None:
    return False
  old, new = e.invars[0].aval.shape, tuple(e.params["new_sizes"])
  return new == (*old[:a], old[a] * old[a + 1], *old[a + 2:])


def _gather_axis(e, known: dict) -> Optional[tuple[int, int]]:
  """(a, f) for a `gather` that takes, along axis a of its operand alone, the elements at the
  constant indices `arange(n * f) // f` (`known` maps vars to folded constants)."""
  if e.primitive.name != "gather" or e.invars[1] not in known:
    return None
  x = e.invars[0].aval.shape
  idx = np.asarray(known[e.invars[1]])
  dn = e.params["dimension_numbers"]
  if (idx.ndim != 2 or idx.shape[1] != 1 or len(dn.start_index_map) != 1
      or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)
      or getattr(dn, "operand_batching_dims", ())
      or getattr(dn, "start_indices_batching_dims", ())):
    return None
  (a,) = dn.start_index_map
  m = idx.shape[0]
  if (tuple(dn.offset_dims) != tuple(d for d in range(len(x)) if d != a)
      or tuple(e.params["slice_sizes"]) != tuple(1 if d == a else n for d, n in enumerate(x))
      or m % x[a]):
    return None
  f = m // x[a]
  return (a, f) if np.array_equal(idx[:, 0], np.arange(m) // f) else None


def _fold(e, known: dict) -> bool:
  """Evaluates `e` into `known` when it is a small constant computation; whether it did."""
  fun = _NUMPY.get(e.primitive.name)
  if fun is None or len(e.outvars) != 1:
    return False
  if not all(isinstance(v, _compat.Literal) or v in known for v in e.invars):
    return False
  out = e.outvars[0].aval
  if math.prod(out.shape) > _FOLD_LIMIT:
    return False
  args = [np.asarray(v.val, v.aval.dtype) if isinstance(v, _compat.Literal) else known[v]
          for v in e.invars]
  value = fun(*args, **e.params) if e.primitive.name in _PARAMS else fun(*args)
  if value is None:
    return False
  known[e.outvars[0]] = np.asarray(value).astype(out.dtype)
  return True


_PARAMS = frozenset({"iota", "broadcast_in_dim", "reshape", "convert_element_type"})


def _steps(eqns, known: dict) -> list:
  """The repeating steps among `eqns`, in order, as (positions, operand, result, factors per
  axis, intermediates): a broadcast-and-reshape pair, a gather (`_gather_axis`), or a call that
  is an upsampling in any form. Constant computations are folded into `known` on the way."""
  steps, pending = [], {}
  for i, e in enumerate(eqns):
    if _fold(e, known):
      continue
    x = e.invars[0] if e.invars else None
    pair = _insert_after(e)
    if pair is not None:
      pending[e.outvars[0]] = (i, x, *pair)
    elif e.primitive.name == "reshape" and x in pending and _merges(e, pending[x][2]):
      j, v, a, f = pending[x]
      steps.append(((j, i), v, e.outvars[0], _along(a, f, v.aval.ndim), (x,)))
    elif (gathered := _gather_axis(e, known)) is not None:
      steps.append(((i,), x, e.outvars[0], _along(*gathered, x.aval.ndim), ()))
    elif (factors := factors_of(e) or _call_factors(e)) is not None:
      steps.append(((i,), x, e.outvars[0], factors, ()))
  return steps


def _along(a: int, f: int, ndim: int) -> tuple[int, ...]:
  """Factors per axis of a repeat by f along axis a alone."""
  return tuple(f if d == a else 1 for d in range(ndim))


def factors_of(eqn) -> Optional[tuple[int, ...]]:
  """The factor per axis if `eqn` is a call whose body repeats its one operand along axes
  (`jnp.repeat`'s broadcasts and reshapes, as `group` makes them), else None. Structural: no
  constant is evaluated."""
  body = _body(eqn)
  if body is None:
    return None
  jaxpr = getattr(body, "jaxpr", body)
  (x,) = jaxpr.invars
  factors, made = {x: (1,) * x.aval.ndim}, {}
  for e in jaxpr.eqns:
    step = _insert_after(e)
    if step is not None and e.invars[0] in factors:
      made[e.outvars[0]] = (e.invars[0], *step)
    elif e.primitive.name == "reshape" and e.invars[0] in made and _merges(
        e, made[e.invars[0]][1]):
      v, a, f = made.pop(e.invars[0])
      factors[e.outvars[0]] = tuple(map(operator.mul, factors[v], _along(a, f, len(factors[v]))))
    else:
      return None
  out = jaxpr.outvars[0]
  if made or out not in factors or all(f == 1 for f in factors[out]):
    return None
  return factors[out]


def _body(eqn):
  key = _CALLS.get(eqn.primitive.name)
  if key is None or key not in eqn.params or len(eqn.invars) != 1 or len(eqn.outvars) != 1:
    return None
  body = eqn.params[key]
  if getattr(body, "consts", ()) or getattr(body, "jaxpr", body).constvars:
    return None
  return body


_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}


def _call_factors(eqn) -> Optional[tuple[int, ...]]:
  """The factors of a call whose body is one upsampling of its operand in any form
  (`jax.image.resize`'s gathers), found by folding the body's constants."""
  body = _body(eqn)
  if body is None:
    return None
  x, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if (len(x) != len(out) or any(n == 0 or m % n for n, m in zip(x, out))
      or tuple(x) == tuple(out)):
    return None
  jaxpr = getattr(body, "jaxpr", body)
  chains = _chains(jaxpr.eqns, jaxpr.outvars, {})
  if len(chains) != 1 or chains[0][1] is not jaxpr.invars[0] or chains[0][2] is not (
      jaxpr.outvars[0]):
    return None
  return chains[0][3]


def _chains(eqns, outvars, known: dict) -> list:
  """Maximal chains of repeating steps (`_steps`), each step reading the one before's result,
  which nothing else reads (no other equation, not `outvars`): (positions, operand, result,
  factors per axis)."""
  steps = _steps(eqns, known)
  uses: dict = {}
  for v in [*(v for e in eqns for v in e.invars), *outvars]:
    if not isinstance(v, _compat.Literal):
      uses[v] = uses.get(v, 0) + 1
  steps = [s for s in steps if all(uses.get(v) == 1 for v in s[4])]
  by_operand = {s[1]: s for s in steps}
  continues = {s[2] for s in steps if uses.get(s[2]) == 1 and s[2] in by_operand}
  chains = []
  for s in steps:
    if s[1] in continues:
      continue  # a later step of a chain started earlier
    positions, x, factors = list(s[0]), s[1], s[3]
    while s[2] in continues:
      s = by_operand[s[2]]
      positions += s[0]
      factors = tuple(map(operator.mul, factors, s[3]))
    chains.append((tuple(positions), x, s[2], factors))
  return chains


@dataclasses.dataclass(frozen=True)
class Grouped:
  """A jaxpr with its upsamplings as single calls (`group`); `originals` maps each such call
  equation (by id) to the equations it stands for. `region.canonical_form` adds its 1x1 convs
  standing for products (`canonical.dense_as_conv`) to `originals`, and `kernels` maps each
  equation making such a conv's weight to that conv (by ids): the rewriter drops it where it
  puts the product back."""
  jaxpr: Any
  originals: dict
  kernels: dict = dataclasses.field(default_factory=dict)


def group(jaxpr) -> Grouped:
  """`jaxpr` with every chain of repeating steps (`_chains`) replaced by one call of `repeat`,
  standing where the chain's last step stood; a call already in that form stays."""
  chains = [c for c in _chains(jaxpr.eqns, jaxpr.outvars, {})
            if not (len(c[0]) == 1 and factors_of(jaxpr.eqns[c[0][0]]) is not None)]
  if not chains:
    return Grouped(jaxpr, {})
  at, originals = {}, {}
  for positions, x, out, factors in chains:
    fun = lambda v, factors=factors: repeat(v, factors)
    fun.__name__ = "upsample"
    aval = jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype)
    last = max(positions)
    eqn = _compat.traced_call_eqn(fun, [aval], [x], [out], jaxpr.eqns[last].source_info)
    at.update(dict.fromkeys(positions))
    at[last] = eqn
    originals[id(eqn)] = [jaxpr.eqns[i] for i in sorted(positions)]
  eqns = [at[i] if i in at else e for i, e in enumerate(jaxpr.eqns) if at.get(i, e) is not None]
  return Grouped(_compat.replace_jaxpr(jaxpr, eqns=eqns), originals)
