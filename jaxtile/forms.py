"""How one elemental conv is bound: in the form the backend runs fast, derivatives included.

XLA runs the same arithmetic at very different speeds depending on how a conv is expressed. On
XLA:CPU (jax 0.10; `python benchmarks/bench.py --only forms` measures both):
 - a conv whose padding is all zero runs on a path about 3x slower than the same conv with any
   padding. Interior tiles are unpadded pieces, so each gets one extra output along its
   innermost spatial dim, computed over padding and cropped: exact, for 1 / (extent) more
   arithmetic;
 - a channels-first conv is converted to channels-last only outside loops; inside one (where
   every piece runs) it takes a generic kernel 15-50x slower. Pieces are transposed to (N,
   spatial..., C) and (spatial..., I, O) around the conv: two copies of piece size.
The convs JAX derives when it differentiates a piece (the transposes of a conv with respect to
its lhs and rhs) would take the slow paths again, so `conv` defines its derivatives itself: a
`custom_jvp` whose tangent is a `linear_call` of fast-form convs, whose transpose is JAX's own
transpose rule, re-expressed in fast form. Other backends (cuDNN on GPU) get the plain binding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxtile import _compat
from jaxtile import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class Forms:
  pad_unpadded: bool = False
  channels_last: bool = False

  @property
  def plain(self) -> bool:
    return not (self.pad_unpadded or self.channels_last)


_BACKEND_FORMS = {"cpu": Forms(pad_unpadded=True, channels_last=True)}


def for_backend(backend: Optional[str] = None) -> Forms:
  return _BACKEND_FORMS.get(backend or jax.default_backend(), Forms())


def conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any], forms: Forms) -> jax.Array:
  """`conv_general_dilated_p.bind(lhs, rhs, **params)`, bound in `forms`, and so are its
  derivatives of every order."""
  if forms.plain:
    return _compat.conv_general_dilated_p.bind(lhs, rhs, **params)
  return _differentiable(_Params(params), forms)(lhs, rhs)


class _Params:
  """Conv params as a hashable key (they are hashable values: tuples, dtypes, NamedTuples)."""

  def __init__(self, params):
    self.params = dict(params)
    self._key = tuple(sorted(self.params.items()))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Params) and self._key == other._key


@functools.lru_cache(maxsize=256)
def _differentiable(key: _Params, forms: Forms):
  params = key.params

  @jax.custom_jvp
  def f(lhs, rhs):
    return _bind(lhs, rhs, params, forms)

  def jvp(primals, tangents):
    out = f(*primals)
    parts = []
    for argnum, d in enumerate(tangents):  # the conv is linear in each operand
      if isinstance(d, _compat.SymbolicZero):
        continue
      other = primals[1 - argnum]
      aval = jax.ShapeDtypeStruct(primals[argnum].shape, primals[argnum].dtype)
      parts.append(_compat.linear_call(
          lambda other, d, argnum=argnum: conv(*_ordered(argnum, d, other), params, forms),
          functools.partial(_transpose, params, forms, argnum, aval), other, d))
    tangent = functools.reduce(jnp.add, parts) if parts else jnp.zeros(out.shape, out.dtype)
    return out, tangent

  f.defjvp(jvp, symbolic_zeros=True)
  return f


def _ordered(argnum: int, x, other):
  """(lhs, rhs) with `x` as operand `argnum`."""
  return (x, other) if argnum == 0 else (other, x)


def _transpose(params, forms: Forms, argnum: int, aval, other, ct):
  """Cotangent of operand `argnum` of the conv, given the other operand: JAX's transpose rule
  traced to a jaxpr, its convs re-bound in `forms`."""
  def linear(x):
    return _compat.conv_general_dilated_p.bind(*_ordered(argnum, x, other), **params)
  transposed = jax.linear_transpose(linear, aval)
  closed = jax.make_jaxpr(lambda ct: transposed(ct)[0])(ct)
  eqns = [
      _compat.traced_call_eqn(
          functools.partial(lambda l, r, p: conv(l, r, p, forms), p=dict(e.params)),
          [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in e.invars], e.invars,
          e.outvars, e.source_info) if _compat.is_conv(e) else e
      for e in closed.jaxpr.eqns]
  fast = _compat.ClosedJaxpr(_compat.replace_jaxpr(closed.jaxpr, eqns=eqns), closed.consts)
  (out,) = _compat.jaxpr_as_fun(fast)(ct)
  return out


def _bind(lhs, rhs, params, forms: Forms):
  """The conv in `forms` (see the module docstring); same shape and values as the plain bind."""
  dn = params["dimension_numbers"]
  k = len(dn.lhs_spec) - 2
  padding = list(params["padding"])
  extra = None
  if forms.pad_unpadded and k and all(tuple(p) == (0, 0) for p in padding):
    extents = [spec_lib.out_extent(lhs.shape[dn.lhs_spec[2 + d]], rhs.shape[dn.rhs_spec[2 + d]],
                                   params["window_strides"][d], (0, 0), params["lhs_dilation"][d],
                                   params["rhs_dilation"][d]) for d in range(k)]
    # The innermost spatial dim (contiguous rows in channels-last): XLA:CPU runs an extra column
    # at full speed, an extra row up to 1.7x slower (32 -> 128 channels, 130x130 window). Another
    # dim only when it is 4x longer, as the extra work is 1 / extent.
    extra = k - 1
    longest = max(range(k), key=lambda d: extents[d])
    if extents[longest] >= 4 * extents[extra]:
      extra = longest
    padding[extra] = (0, params["window_strides"][extra])
  params = dict(params, padding=tuple(padding))
  out_spec = tuple(dn.out_spec)
  if forms.channels_last:
    lhs, rhs, params = _channels_last(lhs, rhs, params)
  out = _compat.conv_general_dilated_p.bind(lhs, rhs, **params)
  roles = tuple(params["dimension_numbers"].out_spec)  # where N, C, spatial... now sit
  if extra is not None:
    axis = roles[2 + extra]
    out = lax.slice_in_dim(out, 0, out.shape[axis] - 1, axis=axis)
  if roles != out_spec:  # back to the caller's layout: dim u holds role out_spec.index(u)
    out = lax.transpose(out, tuple(roles[out_spec.index(u)] for u in range(out.ndim)))
  return out


def _channels_last(lhs, rhs, params):
  """Operands transposed to (N, spatial..., C) and (spatial..., I, O), and the params to match."""
  dn = params["dimension_numbers"]
  k = len(dn.lhs_spec) - 2
  roles = (0, k + 1, *range(1, k + 1))  # N, C, spatial... of an (N, spatial..., C) array
  lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  identity = tuple(range(k + 2))
  if lhs_perm == identity and rhs_perm == identity and tuple(dn.out_spec) == roles:
    return lhs, rhs, params
  new_dn = lax.ConvDimensionNumbers(lhs_spec=roles, rhs_spec=(k + 1, k, *range(k)),
                                    out_spec=roles)
  return (lax.transpose(lhs, lhs_perm), lax.transpose(rhs, rhs_perm),
          dict(params, dimension_numbers=new_dn))
