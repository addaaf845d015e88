"""Emits a planned conv as select -> process -> reassemble loops.

Every combination of runs (one run per output-indexed axis) is one `lax.fori_loop` over its
uniform pieces: select slices the lhs window (with halo) and the rhs block at offsets affine in
the loop index, process is an elemental `conv_general_dilated` bound with the equation's own
params, reassemble writes the piece into the output (`dynamic_update_slice`), after summing the
input-channel partials in an accumulator. The graph grows with the number of runs (a handful:
interior pieces plus edges), never with the number of pieces.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from jaxtile import _compat
from jaxtile.plan import ConvPlan, DimKey, Run

Index = Union[int, jax.Array]  # a piece index: a Python int when static


def lower(plan: ConvPlan, name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns `tiled(lhs, rhs)`, equal to the conv of `plan.spec`, computed piece by piece."""
  spec = plan.spec
  axes = plan.axes()
  out_axes = [a for a in axes if not a.reduce]
  reduce_groups = list(itertools.product(*(a.runs for a in axes if a.reduce)))
  split_reduction = plan.splits_reduction
  base_params = spec.param_dict

  def conv(lhs, rhs, runs: Sequence[Run], starts, sizes):
    params = dict(base_params)
    padding = list(spec.padding)
    for run in runs:
      if run.padding is not None:
        d, pad = run.padding
        padding[d] = pad
      if run.groups is not None:
        key = "feature_group_count" if spec.feature_group_count > 1 else "batch_group_count"
        params[key] = run.groups
    params["padding"] = tuple(padding)
    if split_reduction:
      params["preferred_element_type"] = spec.acc_dtype
    with jax.named_scope("select"):
      lhs_piece = _select(lhs, "lhs", starts, sizes)
      rhs_piece = _select(rhs, "rhs", starts, sizes)
    with jax.named_scope("process"):
      piece = _compat.conv_general_dilated_p.bind(lhs_piece, rhs_piece, **params)
    want = tuple(sizes.get(("out", a), n) for a, n in enumerate(spec.out_shape))
    assert piece.shape == want, (piece.shape, want, spec)  # the halo arithmetic's invariant
    return piece

  def emit_group(out, lhs, rhs, runs: Sequence[Run]):
    def body(k, out):
      indices = _unravel(k, [r.count for r in runs])
      starts, sizes = _offsets(runs, indices)
      if not split_reduction:
        piece = conv(lhs, rhs, runs, starts, sizes)
      else:
        piece = None
        for red in reduce_groups:
          if any(r.empty for r in red):  # partial sums over padding only add zero
            continue
          def partial_sum(j, acc, red=red):
            red_starts, red_sizes = _offsets(red, _unravel(j, [r.count for r in red]), starts,
                                             sizes)
            part = conv(lhs, rhs, runs + red, red_starts, red_sizes)
            return part if acc is None else acc + part
          n_red = math.prod(r.count for r in red)
          if piece is None:  # the first partial sum starts the accumulator
            piece = partial_sum(0, None)
            piece = piece if n_red == 1 else lax.fori_loop(1, n_red, partial_sum, piece)
          else:
            piece = (partial_sum(0, piece) if n_red == 1
                     else lax.fori_loop(0, n_red, partial_sum, piece))
        if piece is None:
          return out
        piece = piece.astype(spec.out_dtype)
      with jax.named_scope("reassemble"):
        return _write(out, piece, starts)

    n = math.prod(r.count for r in runs)
    return body(0, out) if n == 1 else lax.fori_loop(0, n, body, out)

  def tiled(lhs, rhs):
    with jax.named_scope(name):
      out = jnp.zeros(spec.out_shape, spec.out_dtype)
      for runs in itertools.product(*(a.runs for a in out_axes)):
        if not any(r.empty for r in runs):  # pieces reading only padding stay zero
          out = emit_group(out, lhs, rhs, runs)
      return out

  return tiled


def _unravel(k: Index, counts: Sequence[int]) -> list[Index]:
  """Row-major multi-index of flat piece index `k`; static zeros for runs of one piece."""
  indices: list[Index] = []
  for count in reversed(counts):
    if count == 1:
      indices.append(0)
    else:
      indices.append(k % count)
      k = k // count
  return indices[::-1]


def _offsets(runs: Sequence[Run], indices: Sequence[Index], starts=None, sizes=None):
  """Start (affine in the piece indices, summed over axes) and size of every dim the runs touch."""
  starts = dict(starts or {})
  sizes = dict(sizes or {})
  for run, i in zip(runs, indices):
    for span in run.spans:
      offset = span.start if span.step == 0 or isinstance(i, int) and i == 0 else (
          span.start + i * span.step)
      starts[span.dim] = starts.get(span.dim, 0) + offset
      if span.size is not None:
        sizes[span.dim] = span.size
  return starts, sizes


def _select(x: jax.Array, operand: str, starts: dict[DimKey, Index], sizes: dict[DimKey, int]):
  """The piece of `x` (the lhs or rhs) at `starts`, of `sizes`; whole dims where unspecified."""
  begin = [starts.get((operand, a), 0) for a in range(x.ndim)]
  shape = [sizes.get((operand, a), n) for a, n in enumerate(x.shape)]
  if all(isinstance(b, int) for b in begin):
    if tuple(shape) == x.shape:
      return x
    return lax.slice(x, begin, [b + s for b, s in zip(begin, shape)])
  return lax.dynamic_slice(x, [jnp.asarray(b, jnp.int32) for b in begin], shape)


def _write(out: jax.Array, piece: jax.Array, starts: dict[DimKey, Index]) -> jax.Array:
  begin = [starts.get(("out", a), 0) for a in range(out.ndim)]
  if piece.shape == out.shape:
    return piece
  return lax.dynamic_update_slice(out, piece, [jnp.asarray(b, jnp.int32) for b in begin])
