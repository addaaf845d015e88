"""Emits a planned conv as one select -> process -> reassemble loop over its output pieces.

Output pieces all have one shape (see `plan._block_starts`); what differs between them is the
input window, its padding and its group count, which are static per *run* (`plan.Run`). The loop
runs over every output piece; a `lax.switch` on the piece's runs picks the branch that selects
its window (`dynamic_slice` at offsets affine in the piece index), processes it (an elemental
`conv_general_dilated` with the equation's own params, in the backend's fast form: `forms.py`),
and sums its input-channel and
kernel-tap partials in an accumulator; reassemble writes the piece (`dynamic_update_slice`). The
graph grows with the number of runs (interior pieces plus edges), never with the number of
pieces, and one piece is alive at a time.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtile._src import _compat
from jaxtile._src import forms
from jaxtile._src.plan import Axis, ConvPlan, DimKey, Policy, Run, decide
from jaxtile._src.spec import ConvSpec

Index = Union[int, jax.Array]  # a piece index: a Python int when static


def lower(plan: ConvPlan, name: str, policy: Optional[Policy] = None
          ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns `tiled(lhs, rhs)`, equal to the conv of `plan.spec`, computed piece by piece.

  The loop is bound as one `jaxtile_tiled_conv` (see `tiled_conv_p`): its derivatives and batched
  forms are the convs JAX derives, each planned under `policy` and tiled in turn (left whole
  when `policy` is None).
  """
  def tiled(lhs, rhs):
    return tiled_conv_p.bind(lhs, rhs, plan=plan, name=name, policy=policy, **plan.spec.param_dict)
  return tiled


def _emit(lhs, rhs, *, plan: ConvPlan, name: str, policy, **params):
  pieces = Pieces(plan)
  with jax.named_scope(name):
    return pieces.emit(lhs, pieces.loop_kernel(rhs))


# A tiled conv is bound as one primitive, `jaxtile_tiled_conv`, lowered to its loop (`_emit`).
# JAX never differentiates the loop itself. Differentiating a `fori_loop` of pieces gave a
# backward loop whose every iteration built, added and copied a full-size cotangent (the
# transpose of a window slice inside `lax.switch`), and whose carries started as zeros that XLA
# copied once per loop at program start: a tiled network's gradient held more than the untiled
# one. Instead the conv's own rules apply: the conv is bilinear (JVP: the same tiled conv of
# each tangent), and its transposes and its vmap are the convs JAX's rules emit, each planned
# under the same policy as the user's convs (one decision point: `plan.decide`) and tiled as
# loops of their own. `jax.grad(tile_convs(f))` thus runs what `tile_convs(jax.grad(f))` runs.
tiled_conv_p = _compat.Primitive("jaxtile_tiled_conv")


def derived_conv(lhs, rhs, *, policy: Optional[Policy], name: str, **params):
  """A conv a rule emitted: planned under `policy` like a user's conv, tiled or left whole."""
  if policy is not None:
    lhs_aval, rhs_aval = jax.typeof(lhs), jax.typeof(rhs)
    out, _ = _compat.conv_general_dilated_p.abstract_eval(lhs_aval, rhs_aval, **params)
    spec = ConvSpec.from_avals(lhs_aval, rhs_aval, out, params, source=name)
    decision = decide(spec, policy, warn=False)
    if decision.tiled and decision.plan.distributed_axis is None:
      return lower(decision.plan, name, policy)(lhs, rhs)
  return _compat.conv_general_dilated_p.bind(lhs, rhs, **params)


forms.define_conv_primitive(
    tiled_conv_p, ("plan", "name", "policy"), lowering=_emit,
    bind_emitted=lambda l, r, conv, extras, why: derived_conv(
        l, r, policy=extras["policy"], name=f"{extras['name']}/{why}", **conv))


class Pieces:
  """The output pieces of a plan: how to compute any one of them, and the loop that writes them.

  Output-indexed axes (batch, groups, output channels, spatial tiles) index pieces; reduction
  axes (input channels, kernel taps) are summed inside each piece.
  """

  def __init__(self, plan: ConvPlan):
    self.plan = plan
    self.spec = spec = plan.spec
    axes = plan.axes()
    self.out_axes: tuple[Axis, ...] = tuple(a for a in axes if not a.reduce)
    self.reduce_groups = list(itertools.product(*(a.runs for a in axes if a.reduce)))
    # Piece i of an axis belongs to its run r with run_starts[r] <= i < run_starts[r + 1].
    self.run_starts = [np.cumsum([0] + [r.count for r in a.runs])[:-1] for a in self.out_axes]
    self.combos = list(itertools.product(*(a.runs for a in self.out_axes)))
    sizes = _offsets(self.combos[0], [0] * len(self.out_axes))[1]
    # Every combo has this output piece shape (the last block of an axis is shifted back).
    self.piece_shape = tuple(sizes.get(("out", a), n) for a, n in enumerate(spec.out_shape))
    self.forms = forms.for_backend()

  def out_shape(self, fixed: Mapping[int, Index] = {}) -> tuple[int, ...]:
    """The output, or with the axes in `fixed` held at one block, that block's slab."""
    shape = list(self.spec.out_shape)
    for i in fixed:
      for span in self.out_axes[i].runs[0].spans:
        if span.dim[0] == "out":
          shape[span.dim[1]] = span.size
    return tuple(shape)

  def loop_kernel(self, rhs: jax.Array) -> jax.Array:
    """`rhs` as the loops over pieces take it: half precision widened to the accumulator dtype.

    Differentiated, a loop sums every piece's kernel cotangent into one accumulator of the
    dtype the loop reads the kernel in. In float32 that sum rounds once, as the monolithic kernel
    gradient does; in bfloat16 it would round once per piece, an error that grows with the piece
    count. Each piece casts its kernel slice back (`_conv`), so the forward values are unchanged.
    """
    acc = np.dtype(self.spec.acc_dtype)
    if jnp.issubdtype(rhs.dtype, jnp.floating) and rhs.dtype.itemsize < acc.itemsize:
      return rhs.astype(acc)
    return rhs

  def emit(self, lhs: jax.Array, rhs: jax.Array, fixed: Mapping[int, Index] = {}) -> jax.Array:
    """Computes every output piece (those of block `fixed[i]` along the axes i in `fixed`)."""
    free = [i for i in range(len(self.out_axes)) if i not in fixed]
    counts = [self.out_axes[i].count for i in free]
    out = jnp.zeros(self.out_shape(fixed), self.spec.out_dtype)

    # JAX differentiates this loop only on the distributed path (`distribute.py`; elsewhere the
    # loop is the lowering of `tiled_conv_p`, whose derivatives are convs of their own). There
    # each piece is rematerialised: the loop's residuals are `lhs`, `rhs` (loop-invariant) and
    # the piece index, not one saved input slice per piece.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def piece(lhs, rhs, k):
      index = dict(fixed)
      index.update(zip(free, _unravel(k, counts)))
      return self.piece(lhs, rhs, [index[i] for i in range(len(self.out_axes))],
                        relative=frozenset(fixed))

    def body(k, out):
      piece_out, starts = piece(lhs, rhs, k)
      with jax.named_scope("reassemble"):
        return _write(out, piece_out, starts)

    # Piece 0 runs before the loop ("peeled"), so the carry starts as this conv's own data. A
    # loop whose carry starts as plain zeros shares them with every other such loop after XLA's
    # CSE, copy insertion then gives each loop its own full-size copy, and XLA:CPU's scheduler
    # makes all the copies at program start: N chained tiled convs held N outputs at once
    # (read in the buffer assignment of an 8-layer chain: 1024 MiB; peeled: 130 MiB).
    out = body(0, out)
    n = math.prod(counts)
    return out if n == 1 else lax.fori_loop(1, n, body, out)

  def piece(self, lhs, rhs, index: Sequence[Index], relative=frozenset()):
    """Output piece `index` (one index per output axis) and where it goes in the output.

    Axes in `relative` are written at offset 0 (the output is one block of theirs).
    """
    located = [_locate(i, starts) for i, starts in zip(index, self.run_starts)]
    run_ids = [r for r, _ in located]
    local = [l for _, l in located]

    def branch(combo, lhs, rhs, local):
      return self._piece(combo, lhs, rhs, local, relative)

    if all(isinstance(r, int) for r in run_ids):
      combo = tuple(a.runs[r] for a, r in zip(self.out_axes, run_ids))
      return branch(combo, lhs, rhs, local)
    branch_index = _ravel(run_ids, [len(a.runs) for a in self.out_axes])
    branches = [functools.partial(branch, c) for c in self.combos]
    local = [jnp.asarray(l, jnp.int32) for l in local]
    return lax.switch(branch_index, branches, lhs, rhs, local)

  def _piece(self, combo: Sequence[Run], lhs, rhs, local, relative):
    starts, sizes = _offsets(combo, local)
    kept = [r for i, r in enumerate(combo) if i not in relative]
    write_at, _ = _offsets(kept, [l for i, l in enumerate(local) if i not in relative])
    write_at = [jnp.asarray(write_at.get(("out", d), 0), jnp.int32)
                for d in range(len(self.spec.out_shape))]
    if any(r.empty for r in combo):  # pieces reading only padding are zero
      return jnp.zeros(self.piece_shape, self.spec.out_dtype), write_at
    if not self.plan.splits_reduction:
      return self._conv(lhs, rhs, combo, starts, sizes), write_at
    acc = None
    for red in self.reduce_groups:
      if any(r.empty for r in red):  # partial sums over padding only add zero
        continue
      def partial_sum(j, acc, red=red):
        red_starts, red_sizes = _offsets(red, _unravel(j, [r.count for r in red]), starts, sizes)
        part = self._conv(lhs, rhs, tuple(combo) + red, red_starts, red_sizes)
        return part if acc is None else acc + part
      n_red = math.prod(r.count for r in red)
      if acc is None:  # the first partial sum starts the accumulator
        acc = partial_sum(0, None)
        acc = acc if n_red == 1 else lax.fori_loop(1, n_red, partial_sum, acc)
      else:
        acc = partial_sum(0, acc) if n_red == 1 else lax.fori_loop(0, n_red, partial_sum, acc)
    if acc is None:
      return jnp.zeros(self.piece_shape, self.spec.out_dtype), write_at
    return acc.astype(self.spec.out_dtype), write_at

  def _conv(self, lhs, rhs, runs: Sequence[Run], starts, sizes):
    spec = self.spec
    params = dict(spec.param_dict)
    padding = list(spec.padding)
    for run in runs:
      if run.padding is not None:
        d, pad = run.padding
        padding[d] = pad
      if run.groups is not None:
        key = "feature_group_count" if spec.feature_group_count > 1 else "batch_group_count"
        params[key] = run.groups
    want = tuple(sizes.get(("out", a), n) for a, n in enumerate(spec.out_shape))
    params["padding"] = tuple(padding)
    if self.plan.splits_reduction:
      params["preferred_element_type"] = spec.acc_dtype
    with jax.named_scope("select"):
      lhs_piece = _select(lhs, "lhs", starts, sizes)
      rhs_piece = _select(rhs, "rhs", starts, sizes).astype(spec.rhs_dtype)
    with jax.named_scope("process"):
      piece = forms.conv(lhs_piece, rhs_piece, params, self.forms)
    assert piece.shape == want, (piece.shape, want, spec)  # the halo arithmetic's invariant
    return piece


def _locate(i: Index, run_starts: np.ndarray) -> tuple[Index, Index]:
  """(run, index within the run) of piece `i` of an axis whose runs start at `run_starts`."""
  if len(run_starts) == 1:
    return 0, i
  if isinstance(i, int):
    r = int(np.searchsorted(run_starts, i, side="right")) - 1
    return r, i - int(run_starts[r])
  r = jnp.sum(jnp.asarray(run_starts[1:], jnp.int32) <= i).astype(jnp.int32)
  return r, i - jnp.asarray(run_starts, jnp.int32)[r]


def _ravel(indices: Sequence[Index], counts: Sequence[int]) -> Index:
  flat = 0
  for i, n in zip(indices, counts):
    flat = flat * n + i
  return flat


def _unravel(k: Index, counts: Sequence[int]) -> list[Index]:
  """Row-major multi-index of flat piece index `k`; static zeros for runs of one piece."""
  indices: list[Index] = []
  for count in reversed(counts):
    if count == 1:
      indices.append(0)
    elif isinstance(k, int):
      indices.append(k % count)
      k = k // count
    else:  # k >= 0: lax's truncating rem/div, not jnp's floor ones (a smaller jaxpr)
      count = np.asarray(count, k.dtype)
      indices.append(lax.rem(k, count))
      k = lax.div(k, count)
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


def _write(out: jax.Array, piece: jax.Array, starts: Sequence[Index]) -> jax.Array:
  if piece.shape == out.shape:
    return piece
  return lax.dynamic_update_slice(out, piece, starts)
