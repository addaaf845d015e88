"""Piece geometry: how a conv's pieces are laid out, and what each reads.

A `ConvPlan` is a block size per axis: batch rows, whole groups, output channels and input
channels within a group, and an output tile extent per spatial dim. `ConvPlan.axes()` turns the
blocks into *runs*: maximal families of pieces that differ only by an affine offset, so the
lowering can emit each family as one loop whatever the number of pieces. Ragged edges and halo
tiles that meet the padding become their own (short) runs, decided here, statically. The halo
arithmetic (`tile_window`) is derived once, below. Which blocks a conv gets is `search.py`'s and
`decide.py`'s business; this module only says what a given plan's pieces are.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Iterable, Iterator, Optional

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


def describe_plan(plan: ConvPlan) -> str:
  devices = (f" pieces_per_device={plan.pieces_per_device} along {plan.distributed_axis}"
             if plan.distributed_axis else "")
  return (f"batch_blocks={plan.batch_blocks} spatial_tiles={plan.spatial_tiles} "
          f"out_channel_blocks={plan.out_channel_blocks} in_channel_blocks="
          f"{plan.in_channel_blocks} kernel_blocks={plan.kernel_blocks} "
          f"n_elemental={plan.n_elemental}{devices}")
