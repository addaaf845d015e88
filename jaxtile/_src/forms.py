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
The convs JAX derives when it differentiates or batches a piece (the transposes of a conv with
respect to its lhs and rhs, its vmap) would take the slow paths again, so a piece is bound as a
primitive of its own, `jaxtile_conv`, whose rules are JAX's rules for conv_general_dilated with
every conv they emit bound as a `jaxtile_conv` again (see `piece_conv_p`). Other backends (cuDNN
on GPU) get the plain binding.

Two XLA:CPU bugs are kept out of every conv bound here, derivatives included (JAX's transposes of
a piece produce both shapes; `docs/design.md` has the reduced cases and the upstream reports):
 - a conv with negative padding on the low side and positive on the high side reads out of
   bounds (values up to 1e32 that change from call to call). Negative padding is cropped from
   the operand instead (`_crop_negative_padding`): the same window, exactly;
 - the algebraic simplifier's operand swap (tried when the window is larger than the input, as
   in the kernel gradient of a transposed conv) leaves a spatial dim unswapped when it looks like
   a "group" dim (no padding, lhs dilation k = window size, stride k - 1) and then fails its own
   shape check: SIGABRT, the process dies. Such a dim gets one extra output over padding,
   cropped after the conv, so it no longer matches (`_swap_hazard_dims`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxtile._src import _compat
from jaxtile._src import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class Forms:
  pad_unpadded: bool = False
  channels_last: bool = False
  xla_cpu_workarounds: bool = False

  @property
  def plain(self) -> bool:
    return not (self.pad_unpadded or self.channels_last or self.xla_cpu_workarounds)


_BACKEND_FORMS = {"cpu": Forms(pad_unpadded=True, channels_last=True, xla_cpu_workarounds=True)}


def for_backend(backend: Optional[str] = None) -> Forms:
  return _BACKEND_FORMS.get(backend or jax.default_backend(), Forms())


def conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any], forms: Forms) -> jax.Array:
  """`conv_general_dilated_p.bind(lhs, rhs, **params)`, bound in `forms`, and so are its
  derivatives of every order and its batched forms."""
  if forms.plain:
    return _compat.conv_general_dilated_p.bind(lhs, rhs, **params)
  return piece_conv_p.bind(lhs, rhs, forms=forms, **params)


# A piece is bound as its own primitive, `jaxtile_conv`: a conv_general_dilated with the same
# params and values, lowered through `_bind`. JAX's rules for conv_general_dilated (shape, JVP,
# transposes, batching) are reused by tracing them and binding every conv they emit as a
# `jaxtile_conv` again: derivatives of any order, in forward or reverse mode, and their vmaps,
# stay in the fast form and clear of the XLA:CPU bugs above. (A custom_jvp with a linear_call
# tangent did this for first derivatives only: linear_call has no batching rule and cannot be
# differentiated with respect to its residual, so vmap of a gradient, or d/dx of a kernel
# gradient, failed.)
piece_conv_p = _compat.Primitive("jaxtile_conv")


def define_conv_primitive(prim, extra: tuple[str, ...], lowering: Callable, bind_emitted: Callable
                          ) -> None:
  """Registers `prim`, bound as `prim.bind(lhs, rhs, **extra_params, **conv_params)`, as a
  conv_general_dilated with the same values, lowered by `lowering(lhs, rhs, **all_params)`.

  Its JVP follows from bilinearity (the same primitive of each tangent). Its transposes and its
  batching rule are JAX's rules for conv_general_dilated, traced, with every conv they emit
  bound by `bind_emitted(lhs, rhs, conv_params, extra_params, why)` (`why`: "transpose" or
  "vmap") instead: so every derivative and batched form of `prim` is made of such convs again.
  """
  def split(params):
    params = dict(params)
    return params, {k: params.pop(k) for k in extra}

  def emitted(fn, extras, why, *args):
    rebind = {_compat.conv_general_dilated_p:
              lambda l, r, **conv: bind_emitted(l, r, conv, extras, why)}
    return _compat.eval_jaxpr_rebinding(jax.make_jaxpr(fn)(*args), rebind, *args)

  def transpose(jax_rule, argnum):
    def rule(ct, lhs, rhs, **params):
      conv, extras = split(params)
      undefined = (lhs, rhs)[argnum]
      operands = lambda other: _ordered(argnum, undefined, other)
      (out,) = emitted(lambda ct, other: [jax_rule(ct, *operands(other), **conv)], extras,
                       "transpose", ct, (rhs, lhs)[argnum])
      return out
    return rule

  def batch(args, dims, **params):
    conv, extras = split(params)
    bound = functools.partial(_compat.conv_general_dilated_p.bind, **conv)
    (out,) = emitted(lambda l, r: [jax.vmap(bound, in_axes=dims)(l, r)], extras, "vmap", *args)
    return out, 0

  _compat.define_bilinear_primitive(
      prim, impl_lowering=lowering,
      abstract_eval=lambda lhs, rhs, **params: _compat.conv_general_dilated_p.abstract_eval(
          lhs, rhs, **split(params)[0]),
      transpose_lhs=transpose(_compat.conv_transpose_lhs, 0),
      transpose_rhs=transpose(_compat.conv_transpose_rhs, 1),
      batch_rule=batch)


define_conv_primitive(
    piece_conv_p, ("forms",),
    lowering=lambda lhs, rhs, *, forms, **params: _bind(lhs, rhs, params, forms),
    bind_emitted=lambda l, r, conv, extras, why: piece_conv_p.bind(l, r, **extras, **conv))


def _ordered(argnum: int, x, other):
  """(lhs, rhs) with `x` as operand `argnum`."""
  return (x, other) if argnum == 0 else (other, x)


def _bind(lhs, rhs, params, forms: Forms):
  """The conv in `forms` (see the module docstring); same shape and values as the plain bind."""
  dn = params["dimension_numbers"]
  k = len(dn.lhs_spec) - 2
  if forms.xla_cpu_workarounds:
    cropped, cropped_params = _crop_negative_padding(lhs, params)
    if cropped is None:  # the window lies in padding only
      out = jax.eval_shape(functools.partial(_compat.conv_general_dilated_p.bind, **params),
                           lhs, rhs)
      return jnp.zeros(out.shape, out.dtype)
    lhs, params = cropped, cropped_params
  padding = list(params["padding"])
  extra = set()  # spatial dims computed with one extra output over padding, cropped below
  if forms.pad_unpadded and k and all(tuple(p) == (0, 0) for p in padding):
    extents = [spec_lib.out_extent(lhs.shape[dn.lhs_spec[2 + d]], rhs.shape[dn.rhs_spec[2 + d]],
                                   params["window_strides"][d], (0, 0), params["lhs_dilation"][d],
                                   params["rhs_dilation"][d]) for d in range(k)]
    # The innermost spatial dim (contiguous rows in channels-last): XLA:CPU runs an extra column
    # at full speed, an extra row up to 1.7x slower (32 -> 128 channels, 130x130 window). Another
    # dim only when it is 4x longer, as the extra work is 1 / extent.
    dim = k - 1
    longest = max(range(k), key=lambda d: extents[d])
    extra.add(longest if extents[longest] >= 4 * extents[dim] else dim)
  if forms.xla_cpu_workarounds:
    extra.update(_swap_hazard_dims(rhs.shape, params))
  for d in extra:  # padding[d] is (0, 0) here: one stride more of padding, one output more
    padding[d] = (0, params["window_strides"][d])
  params = dict(params, padding=tuple(padding))
  out_spec = tuple(dn.out_spec)
  if forms.channels_last:
    lhs, rhs, params = _channels_last(lhs, rhs, params)
  out = _compat.conv_general_dilated_p.bind(lhs, rhs, **params)
  roles = tuple(params["dimension_numbers"].out_spec)  # where N, C, spatial... now sit
  for d in extra:
    axis = roles[2 + d]
    out = lax.slice_in_dim(out, 0, out.shape[axis] - 1, axis=axis)
  if roles != out_spec:  # back to the caller's layout: dim u holds role out_spec.index(u)
    out = lax.transpose(out, tuple(roles[out_spec.index(u)] for u in range(out.ndim)))
  return out


# Negative padding crops the lhs-dilated input. Along one spatial dim, with n inputs and lhs
# dilation ld, the dilated input D has (n - 1) * ld + 1 positions, inputs at multiples of ld and
# zeros (holes) between them. Low padding lo < 0 drops the first c = -lo positions of D. Dropping
# q = ceil(c / ld) inputs instead drops q * ld >= c positions, of which the last q * ld - c < ld
# lie between two inputs: holes, zeros. So `lhs[q:]` with low padding q * ld - c >= 0 is the same
# padded sequence, position for position, and the conv's output is unchanged. High padding is the
# mirror image. If every input is dropped the window sees padding only and the output is zero.
def _crop_negative_padding(lhs, params):
  """`(lhs, params)` with every negative padding cropped from `lhs` instead: the same conv.

  Returns `(None, params)` when nothing of `lhs` is left (the output is all zeros).
  """
  dn = params["dimension_numbers"]
  padding = [tuple(p) for p in params["padding"]]
  if all(lo >= 0 and hi >= 0 for lo, hi in padding):
    return lhs, params
  begin, end = [0] * lhs.ndim, list(lhs.shape)
  for d, (lo, hi) in enumerate(padding):
    axis, ld = dn.lhs_spec[2 + d], params["lhs_dilation"][d]
    if lo < 0:
      q = -(lo // ld)  # ceil(-lo / ld)
      begin[axis], lo = q, q * ld + lo
    if hi < 0:
      q = -(hi // ld)
      end[axis], hi = end[axis] - q, q * ld + hi
    padding[d] = (lo, hi)
  params = dict(params, padding=tuple(padding))
  if any(b >= e for b, e in zip(begin, end)):
    return None, params
  return lax.slice(lhs, begin, end), params


# XLA's conv operand swap (algebraic simplifier on XLA:CPU, jax 0.10) keeps a spatial dim as it
# is, unswapped, when it has no padding, no window reversal or dilation, base (lhs) dilation equal
# to the window size k and stride k - 1. After the swap that dim's window must fit the old lhs,
# which fails XLA's shape check whenever the lhs extent is not k: a CHECK failure, SIGABRT.
def _swap_hazard_dims(rhs_shape, params) -> list[int]:
  """Spatial dims of the conv that XLA's operand swap would keep unswapped (see above)."""
  dn = params["dimension_numbers"]
  return [d for d, (lo, hi) in enumerate(params["padding"])
          if (lo, hi) == (0, 0) and params["rhs_dilation"][d] == 1
          and params["lhs_dilation"][d] == rhs_shape[dn.rhs_spec[2 + d]]
          == params["window_strides"][d] + 1]


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
