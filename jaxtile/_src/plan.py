"""From a `ConvSpec` and a budget to a plan: how many pieces along each axis, and where each reads.

A plan is a block size per axis: batch rows, whole groups, output channels and input channels
within a group, and an output tile extent per spatial dim. `ConvPlan.axes()` turns the blocks
into *runs*: maximal families of pieces that differ only by an affine offset, so the lowering can
emit each family as one loop whatever the number of pieces. Ragged edges and halo tiles that meet
the padding become their own (short) runs, decided here, statically.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Iterable, Iterator, Optional

from absl import logging

from jaxtile._src import spec as spec_lib
from jaxtile._src.spec import ConvSpec

# An array dimension of one operand: ("lhs" | "rhs" | "out", axis index in the user's layout).
DimKey = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Span:
  """Piece k of a run covers [start + k * step, start + k * step + size) of one array dim.

  `size=None` leaves the size to another axis (groups set an offset, channels inside them a size).
  """
  dim: DimKey
  start: int
  step: int
  size: Optional[int]


@dataclasses.dataclass(frozen=True)
class Run:
  """`count` uniform pieces along one axis."""
  count: int
  spans: tuple[Span, ...]
  padding: Optional[tuple[int, tuple[int, int]]] = None  # (spatial index, (lo, hi)) of each piece
  groups: Optional[int] = None  # feature/batch_group_count of each piece
  empty: bool = False  # pieces that read only padding: their output is zero and they are skipped


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  block: int
  extent: int
  runs: tuple[Run, ...]
  reduce: bool = False  # input channels: pieces sum into the same output

  @property
  def count(self) -> int:
    return sum(r.count for r in self.runs)


# ---------------------------------------------------------------------------------------------
# Halo arithmetic, along one spatial dim.
#
# Notation: n input elements x[0..n), lhs dilation dl, padding (lo, hi) (either may be negative),
# kernel k with rhs dilation dr, so the window spans K = (k - 1) * dr + 1 positions; stride s.
# The conv reads a virtual padded line p of length P = lo + (n - 1) * dl + 1 + hi with
#     p[q] = x[(q - lo) / dl]  if (q - lo) >= 0, (q - lo) % dl == 0 and (q - lo) / dl < n,
#     p[q] = 0                 otherwise,
# and out[o] = sum_j w[j] * p[o * s + j * dr] for o in [0, O), O = (P - K) // s + 1.
#
# Output tile [o0, o1) reads p on [q0, q1) with q0 = o0 * s and q1 = (o1 - 1) * s + K (q1 <= P as
# o1 <= O). A kernel block [j0, j1) (taps j0..j1-1, a partial sum) shifts the window by j0 * dr
# and narrows it to K' = (j1 - j0 - 1) * dr + 1: q0 = o0 * s + j0 * dr, q1 = (o1 - 1) * s + j0 * dr
# + K'. Everything below holds with that q0, q1 and K'. The inputs landing there are the i with q0 <= lo + i * dl < q1:
#     i0 = clamp(ceil((q0 - lo) / dl), 0, n),   i1 = clamp(ceil((q1 - lo) / dl), 0, n).
# The piece convolves x[i0:i1] (w = i1 - i0 elements) with the same kernel, strides and
# dilations and its own padding (lo', hi'), chosen so its padded line is exactly p[q0:q1]:
#     lo' = lo + i0 * dl - q0          (where x[i0] lands, relative to q0)
#     hi' = (q1 - q0) - lo' - (w - 1) * dl - 1.
# Both are >= 0: unclamped, x[i0] is the first input at or after q0 and x[i1 - 1] the last before
# q1; clamping only moves the ends inwards past positions that are padding anyway. The piece's
# padded length is q1 - q0 = (o1 - o0 - 1) * s + K, so it yields exactly o1 - o0 outputs. A tile
# with w == 0 reads only padding: its output is zero.
#
# Interior tiles of extent T start T * s positions apart, i.e. T * s / dl inputs apart; they share
# (w, lo', hi') when T * s is a multiple of dl, which is why tile extents are kept multiples of
# `tile_quantum` = dl / gcd(s, dl). Tiles that meet the padding or the ragged end differ, and
# form runs of their own.
#
# Zero-filled windows (how the loops read them: `ConvPlan.loop_axes`). Left unclamped,
#     i0 = ceil((q0 - lo) / dl),   i1 = ceil((q1 - lo) / dl),
# the window x[i0:i1] may reach past either end of x. Read with zeros there, it is still exactly
# p[q0:q1] with lo' and hi' as above: an i outside [0, n) lands at lo + i * dl in [q0, q1), inside
# p, where p is padding, zero. (Negative padding only moves i0 and i1 inwards: q0 >= 0 gives
# i0 >= 0 when lo <= 0, and q1 <= P gives i1 <= n when hi <= 0.) Unclamped, x[i0] is the first
# input at or after q0 and x[i1 - 1] the last before q1, so lo' and hi' lie in [0, dl): zero
# without lhs dilation. A window's (w, lo', hi') thus depends only on its extent and on the phase
# (q0 - lo) mod dl, the same for every tile T * s apart: the tiles that meet the padding read the
# interior tiles' window shape and join their run, and the loop computes them in one branch
# instead of three. Only windows holding an input (clamped w > 0) are read this way, so a window
# reaches less than w past the ends of x; tiles reading only padding stay an empty run.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileWindow:
  out_start: int
  out_size: int
  in_start: int
  in_size: int
  padding: tuple[int, int]


def tile_window(o0: int, o1: int, j0: int, j1: int, n: int, s: int, pad: tuple[int, int], dl: int,
                dr: int, zero_fill: bool = False) -> TileWindow:
  """Input window and padding of output tile [o0, o1) with kernel taps [j0, j1) (see above).

  With `zero_fill` the window is left unclamped ("Zero-filled windows" above): `in_start` may be
  negative and `in_start + in_size` above n, and positions outside x read as zeros.
  """
  lo, _ = pad
  window = spec_lib.dilated_extent(j1 - j0, dr)
  q0 = o0 * s + j0 * dr
  q1 = (o1 - 1) * s + j0 * dr + window
  i0, i1 = -((lo - q0) // dl), -((lo - q1) // dl)  # -((lo - q) // dl) == ceil((q - lo) / dl)
  if not zero_fill:
    i0, i1 = min(max(i0, 0), n), min(max(i1, 0), n)
  w = max(i1 - i0, 0)
  if w == 0:
    return TileWindow(o0, o1 - o0, 0, 0, (0, 0))
  lo_piece = lo + i0 * dl - q0
  hi_piece = (q1 - q0) - lo_piece - (w - 1) * dl - 1
  return TileWindow(o0, o1 - o0, i0, w, (lo_piece, hi_piece))


def tile_quantum(spec: ConvSpec, d: int) -> int:
  dl, s = spec.lhs_dilation[d], spec.window_strides[d]
  return dl // math.gcd(s, dl)


def _affine_runs(items: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
  """Splits a sorted list of integer tuples into maximal runs in which every field is affine."""
  runs: list[list[tuple[int, ...]]] = []
  for item in items:
    if runs:
      run = runs[-1]
      if len(run) == 1 or all(b - a == c - b for a, b, c in zip(run[-2], run[-1], item)):
        run.append(item)
        continue
    runs.append([item])
  return runs


def _spatial_axis(spec: ConvSpec, d: int, tile: int, kernel_block: int,
                  zero_fill: bool = False) -> Axis:
  """Output tiles along spatial dim d or, when the kernel is split there, kernel blocks.

  A dim is split one way or the other, never both: forward and input-gradient convs have small
  kernels and large outputs, weight-gradient convs a small output and the whole image as kernel.
  With `zero_fill`, pieces of a split dim whose windows differ read zero-filled windows instead
  (see "Zero-filled windows" above), so that fewer runs differ in shape or padding.
  """
  n, k, extent = spec.in_spatial[d], spec.kernel_spatial[d], spec.out_spatial[d]
  geometry = (n, spec.window_strides[d], spec.padding[d], spec.lhs_dilation[d],
              spec.rhs_dilation[d])
  reduce = kernel_block < k
  if reduce:
    pieces = [(0, extent, j0, min(j0 + kernel_block, k)) for j0 in range(0, k, kernel_block)]
  else:
    pieces = [(o0, o0 + tile, 0, k) for o0 in _block_starts(extent, tile)]
  windows = [tile_window(*piece, *geometry) for piece in pieces]
  shapes = {(win.in_size, win.padding, piece[3] - piece[2]) for win, piece in zip(windows, pieces)}
  if zero_fill and len(shapes) > 1:
    windows = [tile_window(*piece, *geometry, zero_fill=True) if win.in_size else win
               for win, piece in zip(windows, pieces)]
  # Pieces with the same shape and padding whose offsets are affine in the piece index form a run.
  by_shape: dict[tuple, list[tuple[int, int, int, int]]] = {}
  for t, ((o0, o1, j0, j1), win) in enumerate(zip(pieces, windows)):
    by_shape.setdefault((win.out_size, win.in_size, win.padding, j1 - j0), []).append(
        (t, o0, win.in_start, j0))
  out_dim, lhs_dim = ("out", spec.out_axes[2 + d]), ("lhs", spec.lhs_axes[2 + d])
  rhs_dim = ("rhs", spec.rhs_axes[2 + d])
  runs = []
  for (out_size, in_size, padding, taps), members in by_shape.items():
    for run in _affine_runs(members):
      first, step = run[0], [b - a for a, b in zip(run[0], run[1])] if len(run) > 1 else [0] * 4
      spans = [Span(lhs_dim, first[2], step[2], in_size)]
      spans.append(Span(rhs_dim, first[3], step[3], taps) if reduce
                   else Span(out_dim, first[1], step[1], out_size))
      runs.append(Run(len(run), tuple(spans), padding=(d, padding), empty=in_size == 0))
  if reduce:
    return Axis(f"kernel{d}", kernel_block, k, tuple(runs), reduce=True)
  return Axis(f"spatial{d}", tile, extent, tuple(runs))


def _block_starts(extent: int, block: int) -> list[int]:
  """Starts of the output pieces along an axis: every `block` entries, the last one shifted back.

  The last piece ends at `extent` and overlaps its neighbour instead of being ragged, so every
  output piece has the same shape: fewer runs, no sliver pieces (XLA:CPU runs a one-wide conv
  with another kernel, in another summation order). Overlapping outputs are computed twice,
  identically, and written twice.
  """
  starts = list(range(0, extent - block + 1, block))
  if extent % block:
    starts.append(extent - block)
  return starts


def _block_runs(extent: int, block: int, reduce: bool) -> list[tuple[int, int, int, int]]:
  """(count, start, step, size) of the full blocks and of the last one.

  Output-indexed axes shift the last block back (see `_block_starts`); a reduction cannot
  overlap (it would sum twice), so its last block is ragged.
  """
  full, rest = divmod(extent, block)
  runs = [(full, 0, block, block)] if full else []
  if rest:
    runs.append((1, full * block, 0, rest) if reduce else (1, extent - block, 0, block))
  return runs


def _channel_axis(name: str, extent: int, block: int,
                  dims: Iterable[tuple[DimKey, int]], reduce=False, groups=False) -> Axis:
  """An axis of plain blocks; `dims` are (dim, scale): a block of b touches b * scale entries."""
  runs = tuple(
      Run(count, tuple(Span(dim, start * scale, step * scale, size * scale) for dim, scale in dims),
          groups=size if groups else None)
      for count, start, step, size in _block_runs(extent, block, reduce))
  return Axis(name, block, extent, runs, reduce=reduce)


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """How one conv is split. Block sizes are per axis; counts derive from them.

  `group_block` counts whole feature (or batch) groups per piece; channels are split inside a
  group only when pieces hold a single group (`group_block == 1`, always true without groups).
  `tile_shape` is the output tile extent per spatial dim, in the conv's spatial order.
  """
  spec: ConvSpec
  batch_block: int
  group_block: int
  out_block: int
  in_block: int
  tile_shape: tuple[int, ...]
  kernel_block: tuple[int, ...]  # kernel taps per piece, per spatial dim (split only where the
                                 # output is not tiled)
  n_devices: int = 1  # devices the pieces are divided among (see `distributed_axis`)

  # -- counts -----------------------------------------------------------------------------------
  @property
  def batch_blocks(self) -> int:
    return -(-self.spec.batch // self.batch_block) if self.spec.batch else 1

  @property
  def group_blocks(self) -> int:
    return -(-self.spec.groups // self.group_block)

  @property
  def out_channel_blocks(self) -> int:
    """Output-feature blocks in all: group blocks times blocks inside each group."""
    return self.group_blocks * -(-self.spec.out_per_group // self.out_block)

  @property
  def in_channel_blocks(self) -> int:
    return -(-self.spec.in_per_group // self.in_block)

  @property
  def spatial_tiles(self) -> tuple[int, ...]:
    return tuple(-(-e // t) if e else 1 for e, t in zip(self.spec.out_spatial, self.tile_shape))

  @property
  def kernel_blocks(self) -> tuple[int, ...]:
    return tuple(-(-k // b) for k, b in zip(self.spec.kernel_spatial, self.kernel_block))

  @property
  def n_elemental(self) -> int:
    return (self.batch_blocks * self.out_channel_blocks * self.in_channel_blocks
            * math.prod(self.spatial_tiles) * math.prod(self.kernel_blocks))

  @property
  def splits_reduction(self) -> bool:
    """Whether pieces are partial sums (input-channel or kernel blocks) that need accumulating."""
    return self.in_channel_blocks * math.prod(self.kernel_blocks) > 1

  # -- devices ----------------------------------------------------------------------------------
  @property
  def distributed_axis(self) -> Optional[str]:
    """The output-indexed axis whose blocks are divided among devices: the one with most blocks.

    Devices take contiguous ranges of its blocks (so each computes one slab of the output), every
    other axis's pieces inside each block. None on one device, or when no output axis is split
    (a split reduction alone stays on one device: its partial sums would need an all-reduce).
    """
    if self.n_devices == 1:
      return None
    counts = [(a.count, -i, a.name) for i, a in enumerate(self.axes()) if not a.reduce]
    count, _, name = max(counts, default=(1, 0, None))
    return name if count > 1 else None

  @property
  def blocks_per_device(self) -> int:
    """Blocks of `distributed_axis` each device computes (the last devices may get fewer)."""
    axis = self.distributed_axis
    if axis is None:
      return 1
    count = next(a.count for a in self.axes() if a.name == axis)
    return -(-count // self.n_devices)

  @property
  def pieces_per_device(self) -> tuple[int, ...]:
    """Elemental convs per device, in device order; `(n_elemental,)` on one device."""
    axis = self.distributed_axis
    if axis is None:
      return (self.n_elemental,) + (0,) * (self.n_devices - 1)
    count = next(a.count for a in self.axes() if a.name == axis)
    per_block, m = self.n_elemental // count, self.blocks_per_device
    return tuple(min(max(count - d * m, 0), m) * per_block for d in range(self.n_devices))

  # -- runs -------------------------------------------------------------------------------------
  def axes(self) -> tuple[Axis, ...]:
    """Every axis with its runs, output-indexed axes first and the reductions last."""
    return self._axes

  @functools.cached_property
  def _axes(self) -> tuple[Axis, ...]:
    # Computed once per plan: the planner asks for piece sizes many times while refining.
    s = self.spec
    lhs_b, lhs_f = ("lhs", s.lhs_axes[0]), ("lhs", s.lhs_axes[1])
    rhs_o, rhs_i = ("rhs", s.rhs_axes[0]), ("rhs", s.rhs_axes[1])
    out_b, out_f = ("out", s.out_axes[0]), ("out", s.out_axes[1])
    axes = []
    if s.groups > 1:
      # A block of g groups: g * in_per_group lhs features (or g * batch lhs rows for batch
      # groups) and g * out_per_group output features.
      group_in = (lhs_f, s.in_per_group) if s.feature_group_count > 1 else (lhs_b, s.batch)
      axes.append(_channel_axis("group", s.groups, self.group_block,
                                [group_in, (rhs_o, s.out_per_group), (out_f, s.out_per_group)],
                                groups=True))
      if self.group_block > 1:
        # Pieces hold whole groups: batch only splits when groups are feature groups.
        if s.batch_group_count == 1:
          axes.append(_channel_axis("batch", s.batch, self.batch_block, [(lhs_b, 1), (out_b, 1)]))
        axes.extend(self._spatial_axes())
        return tuple(axes)
    axes.append(_channel_axis("batch", s.batch, self.batch_block, [(lhs_b, 1), (out_b, 1)]))
    axes.append(_channel_axis("out_channel", s.out_per_group, self.out_block,
                              [(rhs_o, 1), (out_f, 1)]))
    axes.extend(self._spatial_axes())
    axes.append(_channel_axis("in_channel", s.in_per_group, self.in_block,
                              [(lhs_f, 1), (rhs_i, 1)], reduce=True))
    return tuple(axes)

  def _spatial_axes(self, zero_fill: bool = False) -> list[Axis]:
    return [_spatial_axis(self.spec, d, t, b, zero_fill)
            for d, (t, b) in enumerate(zip(self.tile_shape, self.kernel_block))]

  def loop_axes(self) -> tuple[Axis, ...]:
    """`axes()` as the lowering's loops read them: the same pieces in the same order, but along
    a split spatial dim whose pieces' windows differ, the pieces read zero-filled windows (see
    "Zero-filled windows" above), which makes fewer runs of distinct shape or padding.

    `axes()` keeps the clamped windows: what the pieces read of the input, for the costs.
    """
    return self._loop_axes

  @functools.cached_property
  def _loop_axes(self) -> tuple[Axis, ...]:
    spatial = {a.name: a for a in self._spatial_axes(zero_fill=True)}
    return tuple(spatial.get(a.name, a) for a in self.axes())

  @functools.cached_property
  def _largest_piece(self) -> dict[str, tuple[int, ...]]:
    s = self.spec
    shapes = {"lhs": list(s.lhs_shape), "rhs": list(s.rhs_shape), "out": list(s.out_shape)}
    for axis in self.axes():
      biggest: dict[DimKey, int] = {}
      for run in axis.runs:
        for span in run.spans:
          if span.size is not None:
            biggest[span.dim] = max(biggest.get(span.dim, 0), span.size)
      for (operand, dim), size in biggest.items():
        shapes[operand][dim] = size
    return {k: tuple(v) for k, v in shapes.items()}

  def largest_piece(self) -> dict[str, tuple[int, ...]]:
    """The largest piece's operand shapes (the maximum over runs, per dim)."""
    return self._largest_piece

  def tile_bytes(self) -> int:
    """Working set of the largest elemental conv: its operands, output and accumulator."""
    s, shapes = self.spec, self.largest_piece()
    total = (spec_lib.array_bytes(shapes["lhs"], s.lhs_dtype)
             + spec_lib.array_bytes(shapes["rhs"], s.rhs_dtype)
             + spec_lib.array_bytes(shapes["out"], s.out_dtype))
    if self.splits_reduction:
      total += 2 * spec_lib.array_bytes(shapes["out"], s.acc_dtype)  # partial sum and running sum
    return total

  def max_piece_elements(self) -> int:
    return max(math.prod(shape) for shape in self.largest_piece().values())

  def fits(self, max_bytes: int) -> bool:
    return self.tile_bytes() <= max_bytes and self.max_piece_elements() <= spec_lib.INT32_MAX

  # -- what the pieces read ---------------------------------------------------------------------
  def piece_families(self) -> Iterator[tuple[int, dict[str, tuple[int, ...]],
                                             dict[int, tuple[int, int]]]]:
    """Each family of identical pieces that runs: (count, operand shapes, padding per dim).

    Every combination of runs (one per axis) is a family of `count` pieces with the same operand
    shapes (`{"lhs": ..., "rhs": ..., "out": ...}`, user layout) and, per spatial dim that some
    axis splits, the same padding. Families of pieces that read only padding are left out: the
    lowering skips them.
    """
    s = self.spec
    for runs in itertools.product(*(a.runs for a in self.axes())):
      if any(r.empty for r in runs):
        continue
      sizes: dict[DimKey, int] = {}
      pads: dict[int, tuple[int, int]] = {}
      for run in runs:
        sizes.update({span.dim: span.size for span in run.spans if span.size is not None})
        if run.padding is not None:
          pads[run.padding[0]] = run.padding[1]
      shapes = {operand: tuple(sizes.get((operand, a), n) for a, n in enumerate(shape))
                for operand, shape in (("lhs", s.lhs_shape), ("rhs", s.rhs_shape),
                                       ("out", s.out_shape))}
      yield math.prod(r.count for r in runs), shapes, pads

  def extra_input_percent(self) -> float:
    """Input elements all pieces read, relative to the input's size, minus 100%.

    Halos are read by two neighbouring tiles, and every output-channel block reads its input
    window again; negative where the conv itself skips input.
    """
    read = sum(count * math.prod(shapes["lhs"]) for count, shapes, _ in self.piece_families())
    size = math.prod(self.spec.lhs_shape)
    return 100.0 * (read / size - 1) if size else 0.0


def monolithic_plan(spec: ConvSpec) -> ConvPlan:
  return ConvPlan(spec, batch_block=max(spec.batch, 1), group_block=spec.groups,
                  out_block=max(spec.out_per_group, 1), in_block=max(spec.in_per_group, 1),
                  tile_shape=tuple(max(e, 1) for e in spec.out_spatial),
                  kernel_block=spec.kernel_spatial)


def is_splittable(spec: ConvSpec) -> bool:
  """Whether any piece can be cut at all (zero-size convs have nothing to split)."""
  return min(spec.lhs_shape + spec.rhs_shape + spec.out_shape, default=1) > 0


# ---------------------------------------------------------------------------------------------
# Choosing blocks.
#
# Rule (greedy, deterministic): start from the monolithic conv; while the largest piece is over
# budget (or any piece operand has more than 2**31 - 1 elements), halve one axis's block. Among
# the axes that can still be halved, take the one whose halving leaves the smallest piece; pieces
# within `_TIE` of that smallest count as ties, broken by the preference order
#     batch, groups, spatial dims (outermost first), output channels, input channels, kernel
#     taps per spatial dim (only where that dim's output is not tiled).
# Batch and groups split for free (no halo, no extra reads, same summation order). Preferring the
# outer spatial dim gives full-width strips, the shape XLA runs fastest, until their halo makes
# them clearly worse than squarer tiles. Input channels come last: they add an accumulator and
# change the summation order; kernel blocks, last, are for weight-gradient convs, whose "kernel"
# is the output gradient at full image size. Axes the user fixed (tile_shape entries that are not
# None, channel_block, batch_block) are never changed.
# ---------------------------------------------------------------------------------------------
_TIE = 1.10
_PREFERENCE = ("batch", "group", "spatial", "out_channel", "in_channel", "kernel")


def _halvings(plan: ConvPlan, fixed: frozenset[str]) -> list[tuple[str, ConvPlan]]:
  s = plan.spec
  one_group = plan.group_block == 1
  out = []

  def halve(block: int, quantum: int = 1) -> int:
    smaller = -(-(-(-block // 2)) // quantum) * quantum
    return smaller if smaller < block else block

  if "batch" not in fixed and (one_group or s.batch_group_count == 1):
    b = halve(plan.batch_block)
    if b < plan.batch_block:
      out.append(("batch", dataclasses.replace(plan, batch_block=b)))
  if "group" not in fixed and s.groups > 1:
    g = halve(plan.group_block)
    if g < plan.group_block:
      out.append(("group", dataclasses.replace(plan, group_block=g)))
  for d, (t, b) in enumerate(zip(plan.tile_shape, plan.kernel_block)):
    if f"spatial{d}" not in fixed and b == s.kernel_spatial[d]:
      smaller = halve(t, tile_quantum(s, d))
      if smaller < t:
        tiles = plan.tile_shape[:d] + (smaller,) + plan.tile_shape[d + 1:]
        out.append((f"spatial{d}", dataclasses.replace(plan, tile_shape=tiles)))
    if f"kernel{d}" not in fixed and t == s.out_spatial[d] and b > 1:
      blocks = plan.kernel_block[:d] + (halve(b),) + plan.kernel_block[d + 1:]
      out.append((f"kernel{d}", dataclasses.replace(plan, kernel_block=blocks)))
  if one_group:
    if "out_channel" not in fixed:
      o = halve(plan.out_block)
      if o < plan.out_block:
        out.append(("out_channel", dataclasses.replace(plan, out_block=o)))
    if "in_channel" not in fixed:
      i = halve(plan.in_block)
      if i < plan.in_block:
        out.append(("in_channel", dataclasses.replace(plan, in_block=i)))
  return out


def _preference(name: str, order: tuple[str, ...] = _PREFERENCE,
                inner_first: bool = False) -> tuple[int, int]:
  base = name.rstrip("0123456789")
  dim = int(name[len(base):] or 0)
  return order.index(base), -dim if inner_first else dim


def refine(plan: ConvPlan, max_bytes: int, fixed: frozenset[str] = frozenset(),
           order: tuple[str, ...] = _PREFERENCE, tie: float = _TIE,
           inner_first: bool = False) -> ConvPlan:
  """Halves blocks (see the rule above) until the plan fits `max_bytes` or nothing can be halved.

  `order`, `tie` and `inner_first` (spatial dims innermost first) vary the rule for autotuning.
  """
  while not plan.fits(max_bytes):
    candidates = [(c.tile_bytes(), name, c) for name, c in _halvings(plan, fixed)]
    candidates = [c for c in candidates if c[0] < plan.tile_bytes()
                  or c[2].max_piece_elements() < plan.max_piece_elements()]
    if not candidates:
      return plan
    best = min(b for b, _, _ in candidates)
    ties = [c for c in candidates if c[0] <= best * tie]
    plan = min(ties, key=lambda c: _preference(c[1], order, inner_first))[2]
  return plan


# ---------------------------------------------------------------------------------------------
# Per-piece cost: fewer, larger pieces within the budget.
#
# Halving stops as soon as the largest piece fits, but the axis it halved last may have been cut
# to half of what the budget allows, and the greedy order can reach a plan with many more pieces
# than another split of the same budget (a 3-D conv whose kernel alone is over budget: spatial
# tiles, output and input channel blocks multiply). Each piece is a loop step, dynamic slices
# and a conv call whose cost barely depends on its size, so the planner scores a plan as
#     seconds = pieces * per_piece_s + MACs / (macs_per_s * channel_efficiency)
# where MACs count every piece's multiply-adds (overlapping last tiles computed twice included)
# and channel_efficiency = min(1, in_channels * out_channels per piece / saturating_channels):
# pieces with few channels run XLA:CPU's conv kernels far below their throughput (4x4 channels:
# 14-22x slower than the whole conv). Channel blocks it grows are multiples of `channel_quantum`
# (8 on XLA:CPU: 22 or 26 channels ran 1.2-1.4x slower per piece than 16 or 24). `choose` starts from the rule's plan (`refine`) and moves,
# while a move lowers the modelled time and the plan still fits the budget, to the best of:
# one axis's block grown to the largest that fits, or doubled with the other axes re-halved
# (`refine` with that axis held) to fit again.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PieceCost:
  """What one backend charges per piece, and its conv throughput (per number of spatial dims)."""
  per_piece_s: dict[int, float]  # spatial dims -> seconds per piece (loop step, slices, call)
  macs_per_s: dict[int, float]  # spatial dims -> multiply-adds per second of a whole conv
  saturating_channels: int = 128  # in * out channels per piece below which throughput drops
  channel_quantum: int = 8  # channel blocks grown by `choose` are multiples of it (or whole)

  def piece_seconds(self, n_spatial: int) -> float:
    return self.per_piece_s.get(n_spatial, self.per_piece_s[max(self.per_piece_s)])

  def macs_rate(self, n_spatial: int) -> float:
    return self.macs_per_s.get(n_spatial, self.macs_per_s[max(self.macs_per_s)])


# XLA:CPU, jax 0.10.2, 2 shared cores, 2026-11-27 (docs/benchmarks.md, "Per-piece cost").
# 2-D: `python benchmarks/per_piece.py --measure` tiles 1x64x64x32 -> 32, 3x3 with tile_shape
# overrides into 1..128 pieces: 1.55 ms whole, 2.74 ms in 128 tiles, ~10 us a piece; 2.4e10
# MAC/s whole. 3-D: the same tiling of 1x8x16x16x32 -> 32, 3x3x3 costs ~60 us a spatial tile,
# but I3D's 3x3x3 128 -> 192 conv, whose kernel alone forces channel blocks at small budgets,
# costs 0.38-0.42 ms a piece (`python benchmarks/per_piece.py`: 1x4x14x14x128 in 512 pieces
# 215 ms vs 20 ms whole, 1x16x28x28x128 in 8192 pieces 3.8 s vs 0.33 s, 2.5e10 MAC/s whole); the
# planner takes 0.3 ms, the cost of the pieces it has to choose between. 4x4-channel pieces ran
# 14-22x slower than the whole conv, 8x8 1.2-2.7x. Only the ratio of the two terms steers the
# choice; absolute times vary with load.
_BACKEND_PIECE_COSTS = {
    "cpu": PieceCost(per_piece_s={1: 1e-5, 2: 1e-5, 3: 3e-4},
                     macs_per_s={1: 2.4e10, 2: 2.4e10, 3: 2.5e10}),
}
# Unmeasured backends (GPU, TPU): a kernel launch per piece against a fast conv, same shape.
_DEFAULT_PIECE_COST = PieceCost(per_piece_s={3: 1e-5}, macs_per_s={3: 1e12})


def piece_cost(backend: Optional[str] = None) -> PieceCost:
  """The per-piece cost model of `backend` (default: JAX's default backend)."""
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top  (plan is otherwise free of jax)
    backend = jax.default_backend()
  return _BACKEND_PIECE_COSTS.get(backend, _DEFAULT_PIECE_COST)


def modelled_seconds(plan: ConvPlan, cost: Optional[PieceCost] = None) -> float:
  """The plan's modelled run time (see above): per-piece cost plus channel-weighted work."""
  cost = cost or piece_cost()
  s = plan.spec
  o_axis, i_axis = s.rhs_axes[0], s.rhs_axes[1]
  pieces = weighted_macs = 0.0
  for count, shapes, _ in plan.piece_families():
    rhs = shapes["rhs"]
    macs = count * math.prod(shapes["out"]) * (math.prod(rhs) // max(rhs[o_axis], 1))
    efficiency = min(1.0, rhs[i_axis] * rhs[o_axis] / cost.saturating_channels)
    pieces += count
    weighted_macs += macs / max(efficiency, 1e-9)
  return (pieces * cost.piece_seconds(s.n_spatial)
          + weighted_macs / cost.macs_rate(s.n_spatial))


def _growths(plan: ConvPlan, start: ConvPlan, fixed: frozenset[str],
             channel_quantum: int) -> list[tuple]:
  """(axis, largest block, quantum, block, block -> plan) per axis that may grow towards `start`."""
  s = plan.spec
  out = []
  if "batch" not in fixed and plan.batch_block < start.batch_block:
    out.append(("batch", start.batch_block, 1, plan.batch_block,
                lambda b: dataclasses.replace(plan, batch_block=b)))
  whole_channels = (plan.out_block, plan.in_block) == (start.out_block, start.in_block)
  if "group" not in fixed and plan.group_block < start.group_block and whole_channels:
    # Channels split inside a group only with one group per piece: grow groups once they are whole.
    out.append(("group", start.group_block, 1, plan.group_block,
                lambda g: dataclasses.replace(plan, group_block=g)))
  for d, (t, b) in enumerate(zip(plan.tile_shape, plan.kernel_block)):
    if f"spatial{d}" not in fixed and t < start.tile_shape[d]:
      out.append((f"spatial{d}", start.tile_shape[d], tile_quantum(s, d), t,
                  lambda v, d=d: dataclasses.replace(
                      plan, tile_shape=plan.tile_shape[:d] + (v,) + plan.tile_shape[d + 1:])))
    if f"kernel{d}" not in fixed and b < start.kernel_block[d]:
      out.append((f"kernel{d}", start.kernel_block[d], 1, b,
                  lambda v, d=d: dataclasses.replace(
                      plan, kernel_block=plan.kernel_block[:d] + (v,) + plan.kernel_block[d + 1:])))
  if plan.group_block == 1:
    if "out_channel" not in fixed and plan.out_block < start.out_block:
      out.append(("out_channel", start.out_block, channel_quantum, plan.out_block,
                  lambda o: dataclasses.replace(plan, out_block=o)))
    if "in_channel" not in fixed and plan.in_block < start.in_block:
      out.append(("in_channel", start.in_block, channel_quantum, plan.in_block,
                  lambda i: dataclasses.replace(plan, in_block=i)))
  return out


def _largest_fitting(limit: int, quantum: int, block: int, make, max_bytes: int) -> ConvPlan:
  """The plan with the largest block above `block` that fits, `limit` or a multiple of `quantum`
  below it; `make(block)` when none does. Piece bytes grow with the block, so bisect."""
  if make(limit).fits(max_bytes):
    return make(limit)
  lo, hi = block // quantum + 1, (limit - 1) // quantum  # multiples lo * quantum .. hi * quantum
  best = block
  while lo <= hi:
    mid = (lo + hi) // 2
    if make(mid * quantum).fits(max_bytes):
      best, lo = mid * quantum, mid + 1
    else:
      hi = mid - 1
  return make(best)


def choose(start: ConvPlan, max_bytes: int, fixed: frozenset[str] = frozenset(),
           cost: Optional[PieceCost] = None, **rule) -> ConvPlan:
  """The rule's plan (`refine`), then moves that lower its modelled time within the budget.

  A plan the rule cannot fit (over budget or above the element limit) is returned as it is.
  """
  cost = cost or piece_cost()
  plan = refine(start, max_bytes, fixed, **rule)
  if not plan.fits(max_bytes) or plan.n_elemental == 1:
    return plan
  seconds = modelled_seconds(plan, cost)
  for _ in range(64):  # each move lowers the modelled time; a bound keeps planning cheap
    moves = []
    for name, limit, quantum, block, make in _growths(plan, start, fixed,
                                                           cost.channel_quantum):
      moves.append(_largest_fitting(limit, quantum, block, make, max_bytes))
      doubled = make(min(max(2 * block // quantum, 1) * quantum, limit))
      moves.append(refine(doubled, max_bytes, fixed | {name}, **rule))
    scored = [(modelled_seconds(m, cost), m.n_elemental, m) for m in moves
              if m != plan and m.fits(max_bytes)]
    if not scored:
      break
    best_seconds, _, best = min(scored, key=lambda x: x[:2])
    if best_seconds >= seconds * (1 - 1e-6):
      break
    plan, seconds = best, best_seconds
  return plan


# Variations of the rule that `jaxtile.autotune` times against each other: name -> refine kwargs.
RULES = {
    "default": {},
    "smallest-piece": dict(tie=1.0),
    "inner-strips": dict(inner_first=True),
    "channels-first": dict(order=("batch", "group", "out_channel", "spatial", "in_channel",
                                  "kernel")),
    "reduce-first": dict(order=("batch", "group", "in_channel", "spatial", "out_channel",
                                "kernel")),
}


def candidate_plans(spec: ConvSpec, policy: Policy) -> dict[str, ConvPlan]:
  """The plan of each rule in `RULES` that fits the budget (each improved by `choose`), without
  duplicates."""
  start, fixed = normalize_blocks(spec, policy.tile_shape, policy.channel_block,
                                  policy.batch_block)
  plans: dict[str, ConvPlan] = {}
  for name, kwargs in RULES.items():
    plan = choose(start, policy.max_bytes, fixed, **kwargs)
    if plan.fits(policy.max_bytes) and plan not in plans.values():
      plans[name] = plan
  return plans


# Plans chosen by `jaxtile.autotune`, by `tuning_key`: used by `decide` instead of the rule.
_TUNED: dict[str, dict[str, Any]] = {}

_BLOCK_FIELDS = ("batch_block", "group_block", "out_block", "in_block", "tile_shape",
                 "kernel_block")


def tuning_key(spec: ConvSpec, policy: Policy) -> str:
  """A conv's signature (shapes, dtypes, params), the budget and the device kind, as a string."""
  params = tuple((k, v) for k, v in spec.params if k != "out_sharding")
  return repr((spec.lhs_shape, spec.rhs_shape, str(spec.lhs_dtype), str(spec.rhs_dtype),
               str(spec.out_dtype), params, policy.max_bytes, policy.device_kind))


def remember(key: str, plan: ConvPlan) -> None:
  _TUNED[key] = {f: getattr(plan, f) for f in _BLOCK_FIELDS}


def tuned_blocks() -> dict[str, dict[str, Any]]:
  return _TUNED


def _tuned_plan(spec: ConvSpec, policy: Policy) -> Optional[ConvPlan]:
  blocks = _TUNED.get(tuning_key(spec, policy))
  if blocks is None or policy.has_overrides:
    return None
  plan = dataclasses.replace(monolithic_plan(spec), **{
      k: tuple(v) if isinstance(v, list) else v for k, v in blocks.items()})
  return plan if plan.fits(policy.max_bytes) else None


def for_devices(plan: ConvPlan, n_devices: int, fixed: frozenset[str] = frozenset()) -> ConvPlan:
  """`plan` on `n_devices`, its output axes halved (same preference order) until one has a block
  per device, so that no device idles. Reductions are not split for devices (see distribute)."""
  start = plan = dataclasses.replace(plan, n_devices=n_devices)
  while max(a.count for a in plan.axes() if not a.reduce) < n_devices:
    candidates = [(name, c) for name, c in _halvings(plan, fixed)
                  if not name.startswith(("in_channel", "kernel"))]
    if not candidates:
      return start  # no output axis reaches a block per device: extra pieces would buy nothing
    plan = min(candidates, key=lambda c: _preference(c[0]))[1]
  return plan


def normalize_blocks(spec: ConvSpec, tile_shape, channel_block, batch_block) -> tuple[ConvPlan,
                                                                                       frozenset]:
  """The monolithic plan with the user's overrides applied, and the axes they fix.

  Raises ValueError (naming the conv) for overrides that do not fit this conv.
  """
  plan = monolithic_plan(spec)
  fixed = set()
  if isinstance(tile_shape, int):
    tile_shape = (tile_shape,) * spec.n_spatial
  if tile_shape is not None:
    if len(tile_shape) != spec.n_spatial:
      raise ValueError(
          f"tile_convs: tile_shape must have one extent per spatial dim of the conv "
          f"({spec.n_spatial}), but got tile_shape={tuple(tile_shape)} for {spec.describe()}.")
    # Dims given an extent keep it (their kernel is not split either); None dims start whole
    # and are left to the planner like any other axis.
    tiles = []
    for d, (t, e) in enumerate(zip(tile_shape, spec.out_spatial)):
      if t is None:
        tiles.append(max(e, 1))
      else:
        tiles.append(min(int(t), max(e, 1)))
        fixed |= {f"spatial{d}", f"kernel{d}"}
    plan = dataclasses.replace(plan, tile_shape=tuple(tiles))
  if batch_block is not None:
    plan = dataclasses.replace(plan, batch_block=min(int(batch_block), max(spec.batch, 1)))
    fixed.add("batch")
    if spec.batch_group_count > 1 and plan.batch_block < spec.batch:
      # Rows of one output batch block come from every batch group: split one group at a time.
      plan = dataclasses.replace(plan, group_block=1)
      fixed.add("group")
  if channel_block is not None:
    in_b, out_b = channel_block
    plan, fixed_ch = _channel_overrides(spec, plan, in_b, out_b)
    fixed |= fixed_ch
  return plan, frozenset(fixed)


def _channel_overrides(spec: ConvSpec, plan: ConvPlan, in_b, out_b):
  """Channel blocks inside one group, or whole groups when a block spans a group or more."""
  fixed = set()
  cin, cout = spec.in_per_group, spec.out_per_group
  groups_in = groups_out = None
  if in_b is not None:
    if spec.groups > 1 and in_b >= cin and spec.feature_group_count > 1:
      if in_b % cin:
        raise ValueError(
            f"tile_convs: channel_block[0] (input channels per piece) spanning several feature "
            f"groups must be a multiple of the group size {cin}, but got channel_block[0]={in_b} "
            f"for {spec.describe()}.")
      groups_in = in_b // cin
    else:
      plan = dataclasses.replace(plan, in_block=min(in_b, cin))
      fixed.add("in_channel")
  if out_b is not None:
    if spec.groups > 1 and out_b >= cout:
      if out_b % cout:
        raise ValueError(
            f"tile_convs: channel_block[1] (output channels per piece) spanning several groups "
            f"must be a multiple of the group size {cout}, but got channel_block[1]={out_b} for "
            f"{spec.describe()}.")
      groups_out = out_b // cout
    else:
      plan = dataclasses.replace(plan, out_block=min(out_b, cout))
      fixed.add("out_channel")
  if groups_in is not None and groups_out is not None and groups_in != groups_out:
    raise ValueError(
        f"tile_convs: channel_block={(in_b, out_b)} asks for {groups_in} input groups but "
        f"{groups_out} output groups per piece; both must cover the same groups for "
        f"{spec.describe()}.")
  g = groups_in or groups_out
  if spec.groups > 1 and (fixed & {"in_channel", "out_channel"} or g is not None):
    plan = dataclasses.replace(plan, group_block=min(g or 1, spec.groups))
    fixed.add("group")
  return plan, fixed


# ---------------------------------------------------------------------------------------------
# Policy and the decision per conv.
# ---------------------------------------------------------------------------------------------
TIERS = ("auto", "tiled", "native", "reference")


class BudgetError(ValueError):
  """A conv cannot be split into pieces within `max_bytes` (raised with `strict=True`).

  Besides the message, it carries what a caller needs to word its own remedy (the command line
  words it for a shell): `conv` (the conv's description, with its source line), `max_bytes`,
  `smallest_bytes` (the finest split's largest piece) and `element_limit` (True when a piece
  operand is above 2**31 - 1 elements, which no budget changes).
  """

  def __init__(self, message: str, *, conv: str = "", max_bytes: int = 0,
               smallest_bytes: int = 0, element_limit: bool = False):
    super().__init__(message)
    self.conv, self.max_bytes = conv, max_bytes
    self.smallest_bytes, self.element_limit = smallest_bytes, element_limit


@dataclasses.dataclass(frozen=True)
class Policy:
  """What the user asked for, validated (see `jaxtile.tile_convs`)."""
  max_bytes: int
  tile_shape: Optional[tuple[Optional[int], ...]] = None
  channel_block: Optional[tuple[Optional[int], Optional[int]]] = None
  batch_block: Optional[int] = None
  tier: str = "auto"
  strict: bool = False
  mesh: Optional[Any] = None  # a jax.sharding.Mesh: tiled convs' pieces are divided along
  mesh_axis: Optional[str] = None  # this axis of it
  shard_output: bool = False  # leave each distributed conv's output sharded along its split dim
  device_kind: str = ""  # where plans are tuned for (`jaxtile.autotune`)
  fuse: Any = "auto"  # tile chains of local ops as regions (`jaxtile._src.region`): True/False/"auto"

  @property
  def n_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape[self.mesh_axis]

  @property
  def has_overrides(self) -> bool:
    return (self.tile_shape, self.channel_block, self.batch_block) != (None, None, None)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the pass does with one conv, and why."""
  plan: Optional[ConvPlan]  # None: left as it is
  reason: str
  over_budget: bool = False  # the finest reachable split is still above max_bytes

  @property
  def tiled(self) -> bool:
    return self.plan is not None and self.plan.n_elemental > 1


def decide(spec: ConvSpec, policy: Policy, warn: bool = True) -> Decision:
  """Plans one conv under `policy`: split it, leave it, or (strict) raise `BudgetError`.

  With `warn`, a split the budget makes wasteful (see `wasteful`) is logged once, as an absl
  warning naming the budget that avoids it.
  """
  if policy.tier == "native":
    return Decision(None, "tier='native'")
  if policy.tier == "reference":
    return Decision(None, "tier='reference': evaluated by the NumPy reference")
  mono = monolithic_plan(spec)
  if not is_splittable(spec):
    return Decision(None, "zero-size operand: nothing to split")
  if policy.tier == "auto" and not policy.has_overrides and mono.fits(policy.max_bytes):
    return Decision(None, f"fits: {mono.tile_bytes()} <= max_bytes={policy.max_bytes}")
  start, fixed = normalize_blocks(spec, policy.tile_shape, policy.channel_block,
                                  policy.batch_block)
  tuned = _tuned_plan(spec, policy)
  plan = tuned or choose(start, policy.max_bytes, fixed)
  if policy.n_devices > 1:
    plan = for_devices(plan, policy.n_devices, fixed)
  if plan.fits(policy.max_bytes):
    if warn and not tuned and not policy.has_overrides:
      _warn_if_wasteful(spec, plan, start, fixed, policy.max_bytes)
    return Decision(plan, "split to fit max_bytes" if not mono.fits(policy.max_bytes)
                    else "split as asked (tile_shape/channel_block/batch_block or tier='tiled')")
  over_bytes = plan.tile_bytes() > policy.max_bytes
  element_limit = plan.max_piece_elements() > spec_lib.INT32_MAX
  forced = []
  if over_bytes:
    forced.append(f"pieces of {plan.tile_bytes()} bytes ({format_bytes(plan.tile_bytes())}), "
                  f"above the budget max_bytes={policy.max_bytes} "
                  f"({format_bytes(policy.max_bytes)})")
  if element_limit:
    forced.append(f"a piece operand of {plan.max_piece_elements()} elements, above the 2**31-1 "
                  "element limit (XLA's and cuDNN's, whatever the budget)")
  by_user = (" with the axes tile_shape/channel_block/batch_block fix" if fixed else "")
  message = (
      f"jaxtile: even the finest split reachable{by_user} leaves {' and '.join(forced)}, for "
      f"{spec.describe()}. Smallest piece: {plan.largest_piece()}, plan {describe_plan(plan)}.")
  if policy.strict:
    remedy = []
    if over_bytes:
      remedy.append(f"raise max_bytes to {plan.tile_bytes()} or more")
    if element_limit or fixed:
      remedy.append("loosen tile_shape/channel_block/batch_block")
    raise BudgetError(f"{message} To fix: {', or '.join(remedy)}; or pass strict=False to run "
                      "it at that split anyway.", conv=spec.describe(),
                      max_bytes=policy.max_bytes, smallest_bytes=plan.tile_bytes(),
                      element_limit=element_limit)
  return Decision(plan, message, over_budget=True)


# ---------------------------------------------------------------------------------------------
# Splits nobody would choose.
#
# A tiny budget gives a plan that is correct but absurd: max_bytes=100 on a 256x256 conv makes
# tens of thousands of pieces whose halos read the input several times over. A split is
# wasteful when
#   - the input its pieces read beyond the input's size (halos read twice, the input re-read per
#     output-channel block) is more bytes than the whole monolithic conv holds (lhs + rhs + out):
#     a kernel-dominated conv split into output-channel blocks re-reads its small input cheaply
#     and is not wasteful; a spatial split into tiles barely wider than their halo is; or
#   - it runs more than `WASTEFUL_PIECES` pieces of under `SMALL_PIECE_BYTES` each: each piece
#     costs a loop step and a conv call whatever its size, and small pieces are all overhead.
# Such a plan is logged once with its numbers and the smallest budget (a power of two) whose plan
# is not wasteful. Plans forced by the 2**31-1 element limit, or asked for by tile_shape,
# channel_block or batch_block, are not the budget's doing and are not logged.
# ---------------------------------------------------------------------------------------------
WASTEFUL_PIECES = 4096
SMALL_PIECE_BYTES = 2**16


def wasteful(plan: ConvPlan) -> list[str]:
  """What makes a split wasteful (see above), in words; empty when nothing does."""
  s, problems = plan.spec, []
  extra = plan.extra_input_percent()
  extra_bytes = extra / 100 * spec_lib.array_bytes(s.lhs_shape, s.lhs_dtype)
  if extra_bytes > s.working_bytes():
    problems.append(f"its pieces read the input {1 + extra / 100:.1f} times over "
                    f"(+{extra:.0f}% input reads: halos re-read by neighbouring pieces), more "
                    f"bytes than the whole conv holds ({format_bytes(s.working_bytes())})")
  if plan.n_elemental > WASTEFUL_PIECES and plan.tile_bytes() < SMALL_PIECE_BYTES:
    problems.append(f"{plan.n_elemental} pieces of {format_bytes(plan.tile_bytes())} each, "
                    "where each piece's loop step and conv call cost more than its work")
  return problems


def budget_without_waste(start: ConvPlan, fixed: frozenset[str],
                         max_bytes: int) -> Optional[tuple[int, Optional[ConvPlan]]]:
  """The smallest power-of-two budget above `max_bytes` whose plan is not wasteful, and that plan.

  The plan is None where only leaving the conv whole (a budget of its working set) avoids waste;
  the result is None when no budget does (the 2**31-1 element limit forces the split).
  """
  spec = start.spec
  budget = 1 << max(max_bytes, 1).bit_length()
  while budget < spec.working_bytes():
    plan = choose(start, budget, fixed)
    if plan.fits(budget) and not wasteful(plan):
      return budget, plan
    budget *= 2
  whole = refine(start, spec.working_bytes(), fixed)
  if whole.n_elemental > 1 and wasteful(whole):
    return None
  return spec.working_bytes(), None


def _warn_if_wasteful(spec: ConvSpec, plan: ConvPlan, start: ConvPlan, fixed: frozenset[str],
                      max_bytes: int) -> None:
  problems = wasteful(plan)
  if not problems:
    return
  better = budget_without_waste(start, fixed, max_bytes)
  if better is None:
    return  # forced by the element limit: no budget avoids it
  budget, other = better
  if other is None:
    instead = f"max_bytes={budget} ({format_bytes(budget)}) or more leaves it whole"
  else:
    instead = (f"max_bytes={budget} ({format_bytes(budget)}) gives {other.n_elemental} pieces "
               f"and +{max(other.extra_input_percent(), 0):.0f}% input reads")
  logging.warning("jaxtile: max_bytes=%d (%s) splits %s into a wasteful plan: %s. %s.",
                  max_bytes, format_bytes(max_bytes), spec.describe(), "; ".join(problems),
                  instead)


def format_bytes(n: int) -> str:
  """`100 B`, `1.5 KiB`, `548 KiB`, `16 MiB`, `2 GiB`: three significant digits at most."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n} B"


def describe_plan(plan: ConvPlan) -> str:
  devices = (f" pieces_per_device={plan.pieces_per_device} along {plan.distributed_axis}"
             if plan.distributed_axis else "")
  return (f"batch_blocks={plan.batch_blocks} spatial_tiles={plan.spatial_tiles} "
          f"out_channel_blocks={plan.out_channel_blocks} in_channel_blocks="
          f"{plan.in_channel_blocks} kernel_blocks={plan.kernel_blocks} "
          f"n_elemental={plan.n_elemental}{devices}")
