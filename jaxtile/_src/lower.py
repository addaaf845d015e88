"""Emits a planned conv as one select -> process -> reassemble loop over its output pieces.

Output pieces all have one shape (see `geometry._block_starts`); what differs between them is the
input window, its padding and its group count, which are static per *run* (`geometry.Run`). The loop
runs over every output piece and reads the plan's `loop_axes`: pieces that meet the padding read
a zero-filled window of the interior pieces' shape (clamped `dynamic_slice`, zero `pad`,
`dynamic_slice`: `_select`) and share their padding, so runs along an axis mostly differ in
their offsets only. Offsets are looked up per run (affine in the piece index within it), and a
`lax.switch` remains only over the runs' static *kinds* (`_Kinds`: window sizes, padding, group
count) where these still differ: tiles reading only padding, or a last tile (shifted back) whose
window starts at another phase of the lhs dilation. Reduction runs (a ragged last block of input
channels or kernel taps) are inner loops of their own, not branches. Each
piece selects its window, processes it (an elemental `conv_general_dilated` with the equation's
own params, in the backend's fast form: `forms.py`), sums its input-channel and kernel-tap
partials in an accumulator, and reassemble writes it (`dynamic_update_slice`). The graph grows
with the number of kinds, never with the number of pieces, and one piece is alive at a time.
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
from jaxtile._src.decide import Policy, decide
from jaxtile._src.geometry import Axis, ConvPlan, DimKey, Run
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
# under the same policy as the user's convs (one decision point: `decide.decide`) and tiled as
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
  axes (input channels, kernel taps) are summed inside each piece. The axes are the plan's
  `loop_axes`: pieces that meet the padding read zero-filled windows of the interior pieces'
  shape, so that along each axis the runs differ in their offsets only, with few exceptions
  (ragged reduction blocks, all-padding tiles, a last tile of another lhs-dilation phase).
  """

  def __init__(self, plan: ConvPlan):
    self.plan = plan
    self.spec = spec = plan.spec
    axes = plan.loop_axes()
    self.out_axes: tuple[Axis, ...] = tuple(a for a in axes if not a.reduce)
    # The combination of reduction runs with the fewest pieces starts each piece's accumulator:
    # with one piece it is a single conv, and every other combination is one loop.
    self.reduce_groups = sorted(itertools.product(*(a.runs for a in axes if a.reduce)),
                                key=lambda red: math.prod(r.count for r in red))
    # Piece i of an axis belongs to its run r with run_starts[r] <= i < run_starts[r + 1].
    self.run_starts = [np.cumsum([0] + [r.count for r in a.runs])[:-1] for a in self.out_axes]
    # Runs of an axis that differ only in their offsets are one *kind*, computed by one branch.
    self.kinds = [_Kinds(a, spec.lhs_shape) for a in self.out_axes]
    first = [a.runs[0] for a in self.out_axes]
    sizes = _offsets(first, [0] * len(first))[1]
    # Every piece has this output shape (the last block of an axis is shifted back).
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
    def piece(lhs, rhs, k, after):
      index = dict(fixed)
      index.update(zip(free, _unravel(k, counts)))
      return self.piece(lhs, rhs, [index[i] for i in range(len(self.out_axes))],
                        relative=frozenset(fixed), after=after)

    def body(k, out, after=None):
      # What a block of the kernel waits for (`_conv`): the piece before written, or the input.
      piece_out, starts = piece(lhs, rhs, k, out[(0,) * out.ndim] if after is None else after)
      with jax.named_scope("reassemble"):
        return _write(out, piece_out, starts)

    # Piece 0 runs before the loop ("peeled"), so the carry starts as this conv's own data. A
    # loop whose carry starts as plain zeros shares them with every other such loop after XLA's
    # CSE, copy insertion then gives each loop its own full-size copy, and XLA:CPU's scheduler
    # makes all the copies at program start: N chained tiled convs held N outputs at once
    # (read in the buffer assignment of an 8-layer chain: 1024 MiB; peeled: 130 MiB). Zeros
    # made from an element of lhs and rhs, as a region's loop starts (`region._zeros_after`),
    # held two activations of a per-conv 8-layer chain at 512x512x32: 64 MiB, 33.5 peeled.
    out = body(0, out, lhs[(0,) * lhs.ndim])
    n = math.prod(counts)
    return out if n == 1 else lax.fori_loop(1, n, body, out)

  def piece(self, lhs, rhs, index: Sequence[Index], relative=frozenset(), after=None):
    """Output piece `index` (one index per output axis) and where it goes in the output.

    Axes in `relative` are written at offset 0 (the output is one block of theirs).
    """
    kinds, starts, write_at = [], {}, {}
    for a, (axis, kind, i) in enumerate(zip(self.out_axes, self.kinds, index)):
      run, local = _locate(i, self.run_starts[a])
      kinds.append(kind.of(run))
      for span, offset in zip(axis.runs[0].spans, _span_offsets(axis, run, local)):
        starts[span.dim] = starts.get(span.dim, 0) + offset
        if span.dim[0] == "out" and a not in relative:
          write_at[span.dim[1]] = write_at.get(span.dim[1], 0) + offset
    write_at = [jnp.asarray(write_at.get(d, 0), jnp.int32) for d in range(len(self.piece_shape))]

    static = {dim: o for dim, o in starts.items() if isinstance(o, int)}
    traced = {dim: o for dim, o in starts.items() if not isinstance(o, int)}

    def branch(combo, lhs, rhs, traced, after=None):
      runs = [kind.runs[c] for kind, c in zip(self.kinds, combo)]
      reach = _merge_reach(kind.reach[c] for kind, c in zip(self.kinds, combo))
      return self._piece(runs, reach, lhs, rhs, {**static, **traced}, after)

    if all(isinstance(c, int) for c in kinds):
      return branch(kinds, lhs, rhs, traced, after), write_at
    combos = list(itertools.product(*(range(len(kind.runs)) for kind in self.kinds)))
    branch_index = _ravel(kinds, [len(kind.runs) for kind in self.kinds])
    branches = [functools.partial(branch, c) for c in combos]
    return lax.switch(branch_index, branches, lhs, rhs, traced, after), write_at

  def _piece(self, combo: Sequence[Run], reach, lhs, rhs, starts, after=None):
    """One output piece of the runs `combo` (one per output axis) at `starts`."""
    sizes = _offsets(combo, [0] * len(combo))[1]
    if any(r.empty for r in combo):  # pieces reading only padding are zero
      return jnp.zeros(self.piece_shape, self.spec.out_dtype)
    if not self.plan.splits_reduction:
      return self._conv(lhs, rhs, combo, starts, sizes, reach, after)
    acc = None
    for red in self.reduce_groups:
      if any(r.empty for r in red):  # partial sums over padding only add zero
        continue
      red_reach = _merge_reach([reach] + [_run_reach(r, self.spec.lhs_shape) for r in red])
      def partial_sum(j, acc, red=red, red_reach=red_reach):
        red_starts, red_sizes = _offsets(red, _unravel(j, [r.count for r in red]), starts, sizes)
        part = self._conv(lhs, rhs, tuple(combo) + red, red_starts, red_sizes, red_reach,
                          after)
        return part if acc is None else acc + part
      n_red = math.prod(r.count for r in red)
      if acc is None:  # the first partial sum starts the accumulator
        acc = partial_sum(0, None)
        acc = acc if n_red == 1 else lax.fori_loop(1, n_red, partial_sum, acc)
      else:
        acc = partial_sum(0, acc) if n_red == 1 else lax.fori_loop(0, n_red, partial_sum, acc)
    if acc is None:
      return jnp.zeros(self.piece_shape, self.spec.out_dtype)
    return acc.astype(self.spec.out_dtype)

  def _conv(self, lhs, rhs, runs: Sequence[Run], starts, sizes, reach, after=None):
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
      lhs_piece = _select(lhs, "lhs", starts, sizes, reach)
      # A block of the kernel (a loop over output or input channels) is made once `after`
      # exists (`zero_after`): an element of the conv's input for the first piece, of the
      # output the piece before wrote for the others (`emit`). Sliced from the kernel alone, a
      # block at a constant offset is a computation of the parameters only, which XLA:CPU's
      # scheduler runs at program start, alive until its loop: the peeled first block of every
      # such loop (haiku's ResNet18 at 1x256x256x3, max_bytes 1 MiB: 7 blocks of 576 KiB,
      # 7.9 MiB of temporaries against 5.5 untiled), and the second of a loop of two, whose one
      # iteration XLA unrolls (the same model in training mode at 1x512x512x3, 4 MiB: 26.1 MiB
      # against 20.5). Not an element of the lhs piece: it may be padding, a zero XLA folds.
      # Tied to the conv's input alone, both blocks of a loop of two were made before it.
      # Only a block of channels: a spatial window of the rhs (a weight gradient's, a
      # cotangent) comes from activations anyway, and tied too, the small UNet's gradient in
      # tests/test_memory.py held 6% more than untiled.
      block = all(sizes.get(("rhs", a), rhs.shape[a]) == rhs.shape[a]
                  for a in spec.rhs_axes[2:])
      rhs_piece = _select(rhs, "rhs", starts, sizes, after=after if block else None)
      rhs_piece = rhs_piece.astype(spec.rhs_dtype)
    with jax.named_scope("process"):
      piece = forms.conv(lhs_piece, rhs_piece, params, self.forms)
    assert piece.shape == want, (piece.shape, want, spec)  # the halo arithmetic's invariant
    return piece


class _Kinds:
  """The runs of one axis grouped by what a branch needs statically: their pieces' sizes,
  padding, group count and emptiness. Runs of a kind differ only in their offsets, which are
  computed outside the branches (`_span_offsets`)."""

  def __init__(self, axis: Axis, lhs_shape: Sequence[int]):
    signatures: dict[tuple, int] = {}
    self.runs: list[Run] = []  # the first run of each kind: its static shape and padding
    self.reach: list[dict[int, tuple[int, int]]] = []  # how far a kind's windows reach past lhs
    self.run_kind: list[int] = []
    for run in axis.runs:
      signature = (tuple((span.dim, span.size) for span in run.spans), run.padding, run.groups,
                   run.empty)
      kind = signatures.setdefault(signature, len(signatures))
      if kind == len(self.runs):
        self.runs.append(run)
        self.reach.append({})
      self.reach[kind] = _merge_reach([self.reach[kind], _run_reach(run, lhs_shape)])
      self.run_kind.append(kind)

  def of(self, run: Index) -> Index:
    if isinstance(run, int):
      return self.run_kind[run]
    if len(self.runs) == 1:
      return 0
    return jnp.asarray(self.run_kind, jnp.int32)[run]


def _span_offsets(axis: Axis, run: Index, local: Index) -> list[Index]:
  """Offset of piece `local` of run `run` along each span of the axis (in the runs' span order:
  every run of an axis spans the same dims). Static where `run` and `local` are."""
  if isinstance(run, int):
    return [span.start if span.step == 0 or isinstance(local, int) and local == 0 else
            span.start + local * span.step for span in axis.runs[run].spans]
  offsets = []
  for m in range(len(axis.runs[0].spans)):
    starts = np.asarray([r.spans[m].start for r in axis.runs], np.int32)
    steps = np.asarray([r.spans[m].step for r in axis.runs], np.int32)
    offset = jnp.asarray(starts)[run]
    if steps.any():
      offset = offset + local * jnp.asarray(steps)[run]
    offsets.append(offset)
  return offsets


def _run_reach(run: Run, lhs_shape: Sequence[int]) -> dict[int, tuple[int, int]]:
  """How far the run's lhs windows reach below 0 and past the end, per lhs dim where they do
  (zero-filled windows: `geometry.ConvPlan.loop_axes`)."""
  reach = {}
  for span in run.spans:
    if span.dim[0] != "lhs" or span.size is None:
      continue
    last = span.start + (run.count - 1) * span.step
    low = max(0, -min(span.start, last))
    high = max(0, max(span.start, last) + span.size - lhs_shape[span.dim[1]])
    if low or high:
      reach[span.dim[1]] = (low, high)
  return reach


def _merge_reach(reaches) -> dict[int, tuple[int, int]]:
  merged: dict[int, tuple[int, int]] = {}
  for reach in reaches:
    for a, (low, high) in reach.items():
      old_low, old_high = merged.get(a, (0, 0))
      merged[a] = (max(low, old_low), max(high, old_high))
  return merged


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


def zero_after(*arrays, dtype=np.int32) -> Optional[jax.Array]:
  """A scalar zero of `dtype` that XLA makes only once every floating array of `arrays` exists;
  None where none is floating (or all are empty).

  A value computed from parameters alone is, for XLA:CPU's scheduler, ready at program start:
  it is made there and stays alive until its last use. Computed from this zero (a block of a
  kernel, a loop's initial carry: `region._zeros_after`), it is made once `arrays` exist.

  The zero is `0 * (a != a | b != b | ...)` over one element of each array: exactly zero
  (`a != a` is 0 or 1, NaN included), not folded by XLA, and computed from all of them. The
  `or`s form a balanced tree, not a chain: XLA's simplifier moves the reshape of each element
  past one `or` per run of its fixed-point pipeline, so a chain of n kept the pipeline running
  about n times, a tree log2(n) times (haiku's ResNet18 gradient: 43 runs of the
  simplification passes with a chain, 11 with a tree, 5 untiled). Not gathered into one vector
  and reduced: that reduction is a kernel of its own, one per loop to compile (216 LLVM
  modules became 242). Not an optimization barrier: XLA:CPU then made the kernel blocks of
  chained loops at program start again.
  """
  flags = [a[(0,) * a.ndim] for a in arrays
           if jnp.issubdtype(a.dtype, jnp.inexact) and a.size > 0]
  if not flags:
    return None
  flags = [f != f for f in flags]
  while len(flags) > 1:
    flags = [lax.bitwise_or(*flags[i:i + 2]) if i + 1 < len(flags) else flags[i]
             for i in range(0, len(flags), 2)]
  return lax.convert_element_type(flags[0].astype(np.float32) * np.float32(0), dtype)


def _select(x: jax.Array, operand: str, starts: dict[DimKey, Index], sizes: dict[DimKey, int],
            reach: Mapping[int, tuple[int, int]] = {}, after: Optional[jax.Array] = None):
  """The piece of `x` (the lhs or rhs) at `starts`, of `sizes`; whole dims where unspecified.

  Along the axes in `reach` the window may reach outside `x`, by at most (below 0, past the end):
  positions outside read as zeros (the padding of a zero-filled window). A piece at a static
  offset inside `x` is made once `after` exists (`zero_after`).
  """
  begin = [starts.get((operand, a), 0) for a in range(x.ndim)]
  shape = [sizes.get((operand, a), n) for a, n in enumerate(x.shape)]
  if all(isinstance(b, int) for b in begin):
    inside = [min(max(b, 0), n) for b, n in zip(begin, x.shape)]
    ends = [min(max(b + s, 0), n) for b, s, n in zip(begin, shape, x.shape)]
    if tuple(shape) == x.shape and inside == begin:
      return x
    within = inside == begin and [e - b for b, e in zip(begin, ends)] == shape
    zero = zero_after(after) if within and after is not None else None
    if zero is not None:
      return lax.dynamic_slice(x, [zero + b for b in begin], shape)
    piece = lax.slice(x, inside, ends)
    if within:
      return piece
    config = [(i - b, b + s - e, 0) for b, s, i, e in zip(begin, shape, inside, ends)]
    return lax.pad(piece, jnp.zeros((), x.dtype), config)
  begin = [jnp.asarray(b, jnp.int32) for b in begin]
  zero = None if after is None else zero_after(after)
  if zero is not None:  # offsets XLA finds constant (a peeled piece, a loop it unrolls)
    begin = [b + zero for b in begin]
  if not reach:
    return lax.dynamic_slice(x, begin, shape)
  # Zero-filled: slice the part inside x (clamped), pad it by the most any window reaches
  # outside, and slice the window out of that.
  inner, clamped, config, window_begin = list(shape), list(begin), [(0, 0, 0)] * x.ndim, [0] * x.ndim
  for a, (low, high) in reach.items():
    n = x.shape[a]
    inner[a] = min(shape[a], n)
    clamped[a] = jnp.clip(begin[a], 0, n - inner[a])
    config[a] = (low, high + shape[a] - inner[a], 0)
    window_begin[a] = begin[a] - clamped[a] + low
  padded = lax.pad(lax.dynamic_slice(x, clamped, inner), jnp.zeros((), x.dtype), config)
  return lax.dynamic_slice(padded, [jnp.asarray(b, jnp.int32) for b in window_begin], shape)


def _write(out: jax.Array, piece: jax.Array, starts: Sequence[Index]) -> jax.Array:
  if piece.shape == out.shape:
    return piece
  return lax.dynamic_update_slice(out, piece, starts)
