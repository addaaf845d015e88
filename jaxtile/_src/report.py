"""What the pass did, as data: one `ConvReport` per conv equation, and a printable `Report`."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import textwrap
from typing import Optional, Union

import numpy as np

from jaxtile._src import _compat
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile._src import spec as spec_lib


# ---------------------------------------------------------------------------------------------
# What a split costs, from the plan's runs.
#
# Every combination of runs (one run per axis) is a family of identical pieces, so a sum over
# pieces is a sum over run combinations of count * (one piece's value): lhs elements read, and
# MACs = out piece size * input channels per piece * kernel taps per piece. A MAC reads padding
# when its input position does along some spatial dim, so the MACs that read only real input
# factor per spatial dim: (out positions * taps inside the input) per dim, times the rest. Along
# one dim a piece has `tile` outputs and `taps` taps; output o and tap j read position
# q = o * s + j * dr of the piece's padded line, whose input part (lhs dilation holes included)
# is [lo', lo' + (w - 1) * dl + 1) (see the halo arithmetic in geometry.py). For a fixed j, the o
# inside are ceil((lo' - j * dr) / s) <= o < ceil((end - j * dr) / s), clipped to [0, tile):
# one vectorised count over taps (or over outputs, whichever is shorter) per run.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _pairs_inside(tile: int, taps: int, lo: int, width: int, stride: int, lhs_dil: int,
                  rhs_dil: int) -> int:
  """Pairs (output o, tap j) along one dim whose input position lies inside the input."""
  end = lo + (width - 1) * lhs_dil + 1
  if taps <= tile:
    offset, step, bound = np.arange(taps) * rhs_dil, stride, tile
  else:
    offset, step, bound = np.arange(tile) * stride, rhs_dil, taps
  first = np.clip(-((offset - lo) // step), 0, bound)  # -(a // b) == ceil(-a / b)
  last = np.clip(-((offset - end) // step), 0, bound)
  return int(np.maximum(last - first, 0).sum())


@dataclasses.dataclass(frozen=True)
class _Costs:
  """Sums over the pieces that run (see above), and the monolithic conv's counts."""
  lhs_read: int
  lhs_size: int
  macs: int
  monolithic_macs: int
  padding_macs: int

  @classmethod
  def of(cls, plan: geometry.ConvPlan) -> _Costs:
    s = plan.spec
    lhs_read = macs = padding_macs = 0
    for count, shapes, pads in plan.piece_families():
      lhs, rhs, out = shapes["lhs"], shapes["rhs"], shapes["out"]
      per_position = out[s.out_axes[0]] * out[s.out_axes[1]] * rhs[s.rhs_axes[1]]
      pairs = inside = 1
      for d in range(s.n_spatial):
        tile, taps = out[s.out_axes[2 + d]], rhs[s.rhs_axes[2 + d]]
        width = lhs[s.lhs_axes[2 + d]]
        # A dim no axis splits: the piece's window is the whole dim's.
        lo = pads[d][0] if d in pads else geometry.tile_window(
            0, tile, 0, taps, width, s.window_strides[d], s.padding[d], s.lhs_dilation[d],
            s.rhs_dilation[d]).padding[0]
        pairs *= tile * taps
        inside *= _pairs_inside(tile, taps, lo, width, s.window_strides[d],
                                s.lhs_dilation[d], s.rhs_dilation[d])
      lhs_read += count * math.prod(lhs)
      macs += count * per_position * pairs
      padding_macs += count * per_position * (pairs - inside)
    monolithic = math.prod(s.out_shape) * s.in_per_group * math.prod(s.kernel_spatial)
    return cls(lhs_read, math.prod(s.lhs_shape), macs, monolithic, padding_macs)

  @property
  def extra_input_percent(self) -> float:
    return 100.0 * (self.lhs_read / self.lhs_size - 1) if self.lhs_size else 0.0

  @property
  def extra_flops_percent(self) -> float:
    return 100.0 * (self.macs / self.monolithic_macs - 1) if self.monolithic_macs else 0.0

  @property
  def padding_waste_percent(self) -> float:
    return 100.0 * self.padding_macs / self.macs if self.macs else 0.0


@dataclasses.dataclass(frozen=True)
class ConvReport:
  """One conv equation of the user's program and what the pass decided for it.

  The cost of the split, summed over every elemental conv that runs (pieces that read only
  padding are skipped by the lowering and count for nothing):

  - `extra_input_percent`: lhs elements read by all pieces, relative to the lhs size, minus 100%.
    Halos read twice, and every output-channel block reads its input window again. Negative where
    the conv itself skips input (strides wider than the kernel, cropping padding).
  - `extra_flops_percent`: multiply-accumulates (MACs) of all pieces relative to the monolithic
    conv's, minus 100%. A MAC is one kernel tap of one input channel for one output element, zero
    operands included, so the monolithic conv does out.size * in_channels_per_group *
    prod(kernel) of them. Last pieces shifted back to end at the edge recompute their overlap;
    skipped all-padding pieces can make it negative.
  - `padding_waste_percent`: the share of the pieces' MACs whose input position lies in zero
    padding (outside the input's extent along some spatial dim). Zeros that lhs dilation inserts
    between input elements are not padding and do not count.

  For a conv left whole, extra input and extra MACs are 0 and the padding waste is the
  monolithic conv's own. `pieces_per_device` is `ConvPlan.pieces_per_device`.

  Which layer it is: `source` is the innermost user frame (`file:line (function)`, past flax and
  equinox frames), often a helper shared by many layers; `scope` the module path JAX's name stack
  gives it (flax, haiku and equinox modules and `jax.named_scope` set it; "" when none);
  `call_site` the innermost user frame that is not such a helper (see "Which layer" below); and
  the `layer` property the two together.
  """
  name: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  dtype: np.dtype
  working_bytes: int  # monolithic working set: lhs + rhs + out
  tiled: bool
  spatial_tiles: tuple[int, ...]
  in_channel_blocks: int
  out_channel_blocks: int
  batch_blocks: int
  kernel_blocks: tuple[int, ...]  # kernel-tap blocks per spatial dim (weight-gradient convs)
  n_elemental: int
  tile_bytes: int  # largest elemental working set (== working_bytes when not tiled)
  source: str
  reason: str
  over_budget: bool
  extra_input_percent: float
  extra_flops_percent: float
  padding_waste_percent: float
  pieces_per_device: tuple[int, ...]
  scope: str = ""  # module path from JAX's name stack ("UNet/ConvBlock_0/Conv_1"), "" if none
  call_site: str = ""  # the innermost user frame that is not a helper (see "Which layer")
  plan: Optional[geometry.ConvPlan] = dataclasses.field(repr=False, compare=False, default=None)
  region: Optional[str] = None  # the region whose fused loop computes this conv (see `regions`)

  @property
  def layer(self) -> str:
    """What identifies the conv in the user's program: its module path and its call site."""
    return " ".join(filter(None, (self.scope, self.call_site)))

  @classmethod
  def from_record(cls, record, layer: Optional[Layer] = None,
                  call_site: Optional[str] = None) -> ConvReport:
    spec, decision = record.spec, record.decision
    plan = decision.plan if decision.tiled else geometry.monolithic_plan(spec)
    costs = _Costs.of(plan)
    return cls(
        name=record.name, lhs_shape=spec.lhs_shape, rhs_shape=spec.rhs_shape,
        out_shape=spec.out_shape, dtype=spec.out_dtype, working_bytes=spec.working_bytes(),
        tiled=decision.tiled, spatial_tiles=plan.spatial_tiles,
        in_channel_blocks=plan.in_channel_blocks, out_channel_blocks=plan.out_channel_blocks,
        batch_blocks=plan.batch_blocks, kernel_blocks=plan.kernel_blocks,
        n_elemental=plan.n_elemental, tile_bytes=plan.tile_bytes(), source=spec.source,
        reason=decision.reason, over_budget=decision.over_budget,
        extra_input_percent=costs.extra_input_percent,
        extra_flops_percent=costs.extra_flops_percent,
        padding_waste_percent=costs.padding_waste_percent,
        pieces_per_device=tuple(plan.pieces_per_device),
        scope=layer.scope if layer else "", call_site=call_site or spec.source, plan=plan,
        region=record.region)


@dataclasses.dataclass(frozen=True)
class RegionReport:
  """A chain of local ops tiled as one loop (`jaxtile._src.region`): its convs and equations, its
  output tiles, and what the recomputed halos cost.

  `halo` is, per spatial dim, how much wider the region input's window is than the tile's own
  footprint on it (the receptive field of a tile, grown layer by layer; in input elements, so
  a transposed conv's input counts each of its elements once; for a region of several stages,
  the first stage's, against that stage's tile); `extra_macs_percent` the multiply-adds spent
  recomputing overlapping windows, and each statistics pass's recomputation of the value it
  reduces, relative to the untiled convs.
  """
  name: str
  convs: tuple[str, ...]
  n_eqns: int
  tiles: tuple[int, ...]  # output tiles per spatial dim
  tile_shape: tuple[int, ...]
  halo: tuple[int, ...]
  tile_bytes: int
  extra_macs_percent: float
  stages: int = 1  # a transposed conv inside a region starts a stage (`region.Chain`)
  devices: int = 1  # the forward's tiles dealt out over this many devices (`devices=`)
  statistics: int = 0  # passes computing a norm's statistics over tiles (`region.Statistics`)
  upsamplings: int = 0  # nearest-neighbour upsamplings (`jaxtile._src.upsample`), each a stage
  reductions: int = 0  # results the loop adds up itself: weight gradients, sums (`Reductions`)
  # Per conv of the chain (the first len(conv_halos) of `convs`), its input window's halo in its
  # stage: how the receptive field grows layer by layer (`Chain.conv_halos`).
  conv_halos: tuple[tuple[int, ...], ...] = ()

  @classmethod
  def of(cls, plan, conv_names) -> RegionReport:
    return cls(
        name=plan.name, convs=tuple(conv_names), n_eqns=len(plan.all_eqns),
        tiles=plan.tiles,
        tile_shape=plan.tile,
        halo=plan.halo,
        tile_bytes=plan.tile_bytes, extra_macs_percent=plan.extra_macs_percent,
        stages=len(plan.stages), devices=plan.policy.n_devices,
        statistics=len(plan.statistics), upsamplings=len(plan.upsamplings),
        reductions=0 if plan.reductions is None else len(plan.reductions.outputs),
        conv_halos=plan.conv_halos)

  def describe(self) -> str:
    upsamplings = f" and {_plural(self.upsamplings, 'upsampling')}" if self.upsamplings else ""
    passes = f" and {_plural(self.statistics, 'statistics pass', 'es')}" if self.statistics else ""
    reductions = (f"adding up {_plural(self.reductions, 'reduction')} (weight gradients, sums), "
                  if self.reductions else "")
    return (f"{short_name(self)}: {', '.join(c.removeprefix('jaxtile/') for c in self.convs)} "
            f"and {_plural(self.n_eqns - len(self.convs) - self.upsamplings, 'other op')}"
            f"{upsamplings} fused{f' in {self.stages} stages' if self.stages > 1 else ''}, "
            f"{reductions}"
            f"{'x'.join(map(str, self.tiles))} tiles of {'x'.join(map(str, self.tile_shape))}, "
            f"halo {'x'.join(map(str, self.halo))}, {spec_lib.format_bytes(self.tile_bytes)} "
            f"per tile, +{self.extra_macs_percent:.1f}% MACs (recomputed halos{passes})"
            f"{f', on {self.devices} devices' if self.devices > 1 else ''}"
            f"{self._halos_per_conv()}")

  def _halos_per_conv(self) -> str:
    if len(self.conv_halos) < 2:
      return ""
    per = ", ".join(f"{c.removeprefix('jaxtile/')} {'x'.join(map(str, h))}"
                    for c, h in zip(self.convs, self.conv_halos))
    return f"; each conv's input halo: {per}"


def _plural(n: int, noun: str, plural: str = "s") -> str:
  return f"{n} {noun}{plural if n != 1 else ''}"


# ---------------------------------------------------------------------------------------------
# Which layer a conv belongs to ("Which layer").
#
# A conv's innermost user frame is often a helper (`def conv(x, w): return lax.conv(...)`)
# shared by every layer. Two things tell layers apart: the module path JAX's name stack carries
# (flax, haiku and equinox modules and `jax.named_scope` set it; nested jaxprs carry it relative
# to their enclosing equation, so the walk joins the enclosing ones), and the call site: the
# innermost user frame that is not a helper. A frame is a helper when two convs of the same
# module path pass through it by different call stacks; convs with identical stacks (one helper
# called in a loop) cannot be told apart by frames, and keep their innermost frame.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
  """Where one conv equation comes from: its module path and its user frames, innermost first."""
  scope: str
  frames: tuple[str, ...]


def tiled_call(eqn) -> Optional[str]:
  """`tile_convs(f)` when the equation calls a function already decorated by `tile_convs`."""
  name = _compat.call_name(eqn)
  return name if isinstance(name, str) and name.startswith("tile_convs(") else None


def layer_of(eqn, enclosing: tuple[str, ...] = ()) -> Layer:
  """The `Layer` of a conv equation met under the name stacks `enclosing` (outermost first)."""
  return Layer("/".join(filter(None, (*enclosing, _compat.name_stack(eqn)))),
               _compat.user_frames(eqn.source_info))


def call_sites(layers: list[Optional[Layer]]) -> list[Optional[str]]:
  """Each conv's innermost user frame that is not a helper (see above); None without frames."""
  stacks: dict[tuple[str, str], set[tuple[str, ...]]] = collections.defaultdict(set)
  for layer in layers:
    for frame in layer.frames if layer else ():
      stacks[layer.scope, frame].add(layer.frames)
  sites = []
  for layer in layers:
    if not layer or not layer.frames:
      sites.append(None)
      continue
    own = [f for f in layer.frames if len(stacks[layer.scope, f]) == 1]
    sites.append(own[0] if own else layer.frames[0])
  return sites


@dataclasses.dataclass(frozen=True)
class Report:
  """Every conv found in a program (nested ones included), in the order the pass met them.

  `policy` says which policy keywords planned them and where they came from (given to
  `explain`, or the `@tile_convs` decorator of the function explained). `already_tiled` names
  the calls to functions already decorated with `tile_convs` found inside the program: their
  convs are jaxtile's own pieces and are not listed.
  """
  convs: list[ConvReport]
  max_bytes: int
  tier: str
  policy: str = ""
  already_tiled: tuple[str, ...] = ()
  regions: tuple[RegionReport, ...] = ()

  @classmethod
  def from_records(cls, records, policy: decide_lib.Policy,
                   layers: Optional[list[Optional[Layer]]] = None, described: str = "",
                   already_tiled: tuple[str, ...] = (), regions=()) -> Report:
    layers = layers or [None] * len(records)
    convs = [ConvReport.from_record(r, layer, site)
             for r, layer, site in zip(records, layers, call_sites(layers))]
    region_reports = tuple(
        RegionReport.of(plan, [r.name for r in records if r.region == plan.name])
        for plan in regions)
    return cls(convs, policy.max_bytes, policy.tier, described, tuple(already_tiled),
               region_reports)

  @property
  def tiled(self) -> list[ConvReport]:
    return [c for c in self.convs if c.tiled]

  def differentiated_alone(self) -> list[ConvReport]:
    """The forward convs of a program differentiated before the pass saw it, each tiled on its
    own: where a conv of the program is under JAX's `transpose(...)` (a backward pass), those
    under `jvp(...)` that no region computes. Their outputs, which the backward pass reads,
    stay whole between them (`differentiated_note`)."""
    if not any(c.scope.startswith("transpose(") for c in self.convs):
      return []
    return [c for c in self.tiled if c.scope.startswith("jvp(") and not c.region]

  def differentiated_note(self) -> Optional[str]:
    """Where `differentiated_alone` names convs, what that costs and what to do; else None."""
    alone = self.differentiated_alone()
    if not alone:
      return None
    names = ", ".join(short_name(c) for c in alone)
    return (f"differentiated before tiling: the forward conv(s) {names} are tiled one by one, "
            "and the activations the backward pass reads stay whole between them. Tile the "
            "function before differentiating it, jax.grad(tile_convs(f)): each region's "
            "backward pass is then a loop over its tiles that recomputes them, and only the "
            "regions' inputs are kept (guide, Gradients).")

  def max_bytes_to_tile(self) -> Optional[int]:
    """A budget (a power of two) that would split the largest conv left whole, or None.

    None when some conv is tiled already, or when nothing could be (no conv, or tier 'native' or
    'reference', or only zero-size convs).
    """
    if self.tiled or self.tier in ("native", "reference"):
      return None
    sizes = [c.working_bytes for c in self.convs if c.plan is not None
             and geometry.is_splittable(c.plan.spec) and c.working_bytes > 1]
    return 1 << (max(sizes) - 1).bit_length() - 1 if sizes else None

  def nothing_tiled(self) -> Optional[str]:
    """When no conv is tiled, why, in words, and the budget that would tile one; else None."""
    if self.tiled:
      return None
    if not self.convs:
      return "nothing is tiled: the function has no conv" + (
          f" outside {', '.join(self.already_tiled)}, already tiled" if self.already_tiled
          else "") + "."
    if self.tier in ("native", "reference"):
      return (f"nothing is tiled: tier={self.tier!r} rewrites no conv into pieces; "
              "tier='auto' tiles the convs above max_bytes.")
    budget = self.max_bytes_to_tile()
    if budget is None:
      return "nothing is tiled: every conv has a zero-size operand."
    biggest = max(self.convs, key=lambda c: c.working_bytes)
    return (f"nothing is tiled: every conv fits max_bytes={self.max_bytes} "
            f"({spec_lib.format_bytes(self.max_bytes)}). The largest, "
            f"{short_name(biggest)} ({spec_lib.format_bytes(biggest.working_bytes)}), would be "
            f"tiled with max_bytes={budget} ({spec_lib.format_bytes(budget)}) or less.")

  def plot(self, path: Union[str, os.PathLike]) -> Union[str, os.PathLike]:
    """Draws each tiled conv's pieces to a PNG or SVG file (by `path`'s suffix); returns `path`.

    One panel per tiled conv. On the input plane (input element coordinates; the two most split
    spatial dims, the first two on ties, others projected away and named in the title; 1-D convs
    as one bar per tile): the output tile grid, each tile drawn where its outputs' windows are
    centred, and every tile's input window (tile plus halo) shaded, so halos read by two tiles
    show darker. Dims split into kernel-tap blocks show each block's input window instead. A
    side bar shows the batch, input-channel and output-channel blocks. Needs matplotlib
    (`pip install jaxtile[plot]`).

    Example:
      >>> import jax, jax.numpy as jnp, jaxtile
      >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
      >>> report = jaxtile.explain(f, max_bytes=2**20)(jnp.ones((1, 8, 64, 64)),
      ...                                               jnp.ones((8, 8, 3, 3)))
      >>> report.plot("tiles.png")  # doctest: +SKIP
      'tiles.png'
    """
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in (".png", ".svg"):
      raise ValueError(f"Report.plot: path must end in .png or .svg, but got path={path!r}.")
    try:
      from matplotlib import collections as mcollections
      from matplotlib import patches as mpatches
      from matplotlib.figure import Figure
    except ImportError as e:
      raise ImportError("Report.plot needs matplotlib, which is not installed: "
                        "pip install jaxtile[plot]") from e
    mpl = _Mpl(mcollections, mpatches)
    convs = self.tiled
    columns = min(len(convs), 2) or 1
    rows = -(-len(convs) // columns) or 1
    fig = Figure(figsize=(7.5 * columns, 5.5 * rows), layout="constrained")
    if not convs:
      ax = fig.add_subplot()
      ax.axis("off")
      ax.text(0.5, 0.5, f"no conv tiled ({len(self.convs)} conv(s), tier={self.tier!r}, "
              f"max_bytes={self.max_bytes})", ha="center", va="center")
    else:
      subfigs = fig.subfigures(rows, columns, squeeze=False)
      for conv, subfig in zip(convs, subfigs.flat):
        _draw_conv(subfig, conv, mpl)
    fig.savefig(path, format=suffix[1:])
    return path

  def header(self, width: int = 100) -> list[str]:
    """The lines above the table: counts, tier, budget, policy, and what is not listed."""
    lines = [f"jaxtile report: {len(self.convs)} conv(s), {len(self.tiled)} tiled, "
             f"tier={self.tier!r}, max_bytes={self.max_bytes} "
             f"({spec_lib.format_bytes(self.max_bytes)})"]
    if self.policy:
      lines += textwrap.wrap(f"policy: {self.policy}", width, subsequent_indent="  ")
    if self.already_tiled:
      lines += textwrap.wrap(
          f"not listed: {', '.join(self.already_tiled)}, already tiled (its convs are jaxtile's "
          "pieces); explain the decorated function itself to see its plan", width,
          subsequent_indent="  ")
    return lines

  def table(self, wide: bool = False, width: int = 100) -> str:
    """The report as text: the header, one row per conv, a footer explaining the columns.

    The default form fits `width` columns (long layer names are cut from the left); `wide=True`
    adds every column (operand shapes, block counts, +MACs%, pad%) and full source paths.
    """
    lines = self.header(width)
    if not self.convs:
      return "\n".join(lines + [self.nothing_tiled()])
    distributed = any(len(c.pieces_per_device) > 1 for c in self.convs)
    if wide:
      header = ("name", "lhs", "rhs", "out", "size", "tiled", "tiles",
                "in/out/batch/kernel blocks", "pieces", "piece", "+read%", "+MACs%", "pad%",
                "pieces/device", "layer")
      rows = [(short_name(c), spec_lib.short_aval(c.lhs_shape, c.dtype),
               spec_lib.short_aval(c.rhs_shape, c.dtype),
               spec_lib.short_aval(c.out_shape, c.dtype), spec_lib.format_bytes(c.working_bytes),
               "yes" if c.tiled else "no", "x".join(map(str, c.spatial_tiles)) or "-",
               f"{c.in_channel_blocks}/{c.out_channel_blocks}/{c.batch_blocks}/"
               + "x".join(map(str, c.kernel_blocks)), str(c.n_elemental), _piece(c),
               *((f"{c.extra_input_percent:.1f}", f"{c.extra_flops_percent:.1f}",
                  f"{c.padding_waste_percent:.1f}", _per_device(c.pieces_per_device))
                 if c.tiled else ("-",) * 4), c.layer) for c in self.convs]
    else:
      columns = {
          "conv": [short_name(c) for c in self.convs],
          "out": [spec_lib.short_aval(c.out_shape, c.dtype) for c in self.convs],
          "size": [spec_lib.format_bytes(c.working_bytes) for c in self.convs],
          "pieces": [str(c.n_elemental) if not c.region else "-" for c in self.convs],
          "split": [_split(c) for c in self.convs],
          "piece": [_piece(c) if not c.region else "-" for c in self.convs],
          "+read%": [f"{c.extra_input_percent:.1f}" if c.tiled and not c.region else "-"
                     for c in self.convs]}
      if distributed:
        columns["devices"] = [_per_device(c.pieces_per_device) if c.tiled else "-"
                              for c in self.convs]
      columns["layer"] = [short_layer(c) for c in self.convs]
      lines += fit_columns(columns, width, optional=("size", "out"))
    if wide:
      lines += format_rows([header] + rows)
    nothing = self.nothing_tiled()
    if nothing:
      lines += textwrap.wrap(nothing, width)
    else:
      lines += textwrap.wrap(
          "+read%: input read by all pieces beyond the input's size (halos read by two "
          "neighbouring tiles, the input read again per output-channel block)"
          + ("; +MACs%: extra multiply-adds (overlapping last tiles); pad%: multiply-adds on "
             "zero padding" if wide else "") + ".", width)
    for region in self.regions:
      lines += textwrap.wrap(region.describe(), width, subsequent_indent="  ")
    note = self.differentiated_note()
    if note:
      lines += textwrap.wrap(note, width)
    if any(c.over_budget for c in self.convs):
      lines += textwrap.wrap("over: even the finest split reachable is above max_bytes (or the "
                             "2**31-1 element limit); the conv's reason says which.", width)
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


_LAYER_ROOM = 36  # columns the narrow table tries to keep for the layer


def short_name(c) -> str:
  return short_name_of(c.name)


def short_name_of(name: str) -> str:
  return name.removeprefix("jaxtile/")


def _piece(c: ConvReport) -> str:
  return spec_lib.format_bytes(c.tile_bytes) + (" over" if c.over_budget else "")


def _split(c: ConvReport) -> str:
  """`whole`, or the split in brief: `tiles 8x1 in/2 out/4 batch/2 kernel 2x1`."""
  if c.region:
    return short_name_of(c.region)
  if not c.tiled:
    return "whole"
  parts = []
  if math.prod(c.spatial_tiles) > 1:
    parts.append("tiles " + "x".join(map(str, c.spatial_tiles)))
  parts += [f"{label}/{n}" for label, n in (("in", c.in_channel_blocks),
                                            ("out", c.out_channel_blocks),
                                            ("batch", c.batch_blocks)) if n > 1]
  if math.prod(c.kernel_blocks) > 1:
    parts.append("kernel " + "x".join(map(str, c.kernel_blocks)))
  return " ".join(parts)


def short_layer(c) -> str:
  """The layer, briefly: the module path and `file:line` of the call site (its function too when
  there is no module path), the file by its base name."""
  site = c.call_site
  if site and not site.startswith("<"):
    site = os.path.basename(site).replace(".<locals>.", ".")
    if c.scope:
      site = site.split(" (", 1)[0]
  return " ".join(filter(None, (c.scope, site)))


def fit_columns(columns: dict[str, list[str]], width: int,
                optional: tuple[str, ...] = ()) -> list[str]:
  """Named columns (the last one the layer) as lines of at most `width` characters.

  Long shapes or splits leave the layer little room: while it does not fit in less than
  `_LAYER_ROOM` columns, the `optional` columns are dropped, in order; then `format_rows` cuts
  what still does not fit.
  """
  columns = dict(columns)
  longest = max(map(len, list(columns.values())[-1]), default=0)
  for name in optional:
    room = width - sum(max(len(k), *map(len, v)) + 2 for k, v in list(columns.items())[:-1])
    if room >= min(longest, _LAYER_ROOM):
      break
    columns.pop(name, None)
  return format_rows([tuple(columns)] + list(zip(*columns.values())), width)


def format_rows(rows: list[tuple[str, ...]], width: Optional[int] = None) -> list[str]:
  """Rows as left-aligned columns two spaces apart; with `width`, the last column (the layer) gets
  what is left of `width` columns and longer entries lose their start (`...ck_0/Conv_1 a.py:9`)."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  if width is not None:
    room = max(width - sum(widths[:-1]) - 2 * (len(widths) - 1), len(rows[0][-1]))
    rows = [r[:-1] + (r[-1] if len(r[-1]) <= room else "..." + r[-1][len(r[-1]) - room + 3:],)
            for r in rows]
    widths[-1] = min(widths[-1], room)
  return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _per_device(pieces: tuple[int, ...]) -> str:
  """`4096` on one device, `512 x8` for 8 devices with 512 each, `3,3,2` otherwise."""
  if len(pieces) == 1:
    return str(pieces[0])
  if len(set(pieces)) == 1:
    return f"{pieces[0]} x{len(pieces)}"
  return ",".join(map(str, pieces))


# ---------------------------------------------------------------------------------------------
# Drawing (Report.plot). matplotlib is imported by `plot` only and handed in.
# ---------------------------------------------------------------------------------------------
_MAX_DRAWN = 96  # pieces per dim with their own window drawn; more are sampled evenly


@dataclasses.dataclass(frozen=True)
class _Mpl:
  """The matplotlib modules the drawing uses, imported by `Report.plot`."""
  collections: object
  patches: object


@dataclasses.dataclass(frozen=True)
class _Piece1D:
  """One piece along a spatial dim, in input element coordinates: its window and its tile."""
  window: tuple[int, int]  # [start, stop) of the lhs elements it reads
  tile: Optional[tuple[float, float]]  # where its outputs sit (None for kernel-tap blocks)


def _spatial_pieces(plan: geometry.ConvPlan, d: int) -> list[_Piece1D]:
  """Pieces along spatial dim d; `tile` only where the dim's output is split into tiles."""
  s = plan.spec
  axis = next(a for a in plan.axes() if a.name in (f"spatial{d}", f"kernel{d}"))
  tiled = not axis.reduce and axis.count > 1
  n, stride = s.in_spatial[d], s.window_strides[d]
  lo, dl = s.padding[d][0], s.lhs_dilation[d]
  # Output o's window is centred at padded position o * s + (K - 1) / 2 and owns the s positions
  # around it; (q - lo) / dl turns a padded position q into input element coordinates.
  centre = (spec_lib.dilated_extent(s.kernel_spatial[d], s.rhs_dilation[d]) - 1) / 2
  def at(o):
    return min(max((o * stride + centre - (stride - 1) / 2 - lo) / dl, 0.0), float(n))
  pieces = []
  for run in axis.runs:
    lhs = next(sp for sp in run.spans if sp.dim == ("lhs", s.lhs_axes[2 + d]))
    out = next((sp for sp in run.spans if sp.dim == ("out", s.out_axes[2 + d])), None)
    for k in range(run.count):
      start = lhs.start + k * lhs.step
      tile = None
      if tiled and out is not None:
        o0 = out.start + k * out.step
        tile = (at(o0), at(o0 + out.size))
      pieces.append(_Piece1D((start, start + lhs.size), tile))
  return sorted(pieces, key=lambda p: (p.tile or p.window, p.window))


def _sample(items: list, limit: int = _MAX_DRAWN) -> list:
  if len(items) <= limit:
    return items
  return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _intervals(plan: geometry.ConvPlan, dim: geometry.DimKey, extent: int):
  """(start, size) of the pieces along one array dim: offsets add up across axes, sizes are the
  last axis's (groups give an offset, channel blocks inside a group the size)."""
  per_axis = []
  for axis in plan.axes():
    spans = [(run, sp) for run in axis.runs for sp in run.spans if sp.dim == dim]
    if spans:
      per_axis.append([(sp.start + k * sp.step, sp.size) for run, sp in spans
                       for k in range(run.count)])
  out = set()
  for combo in itertools.product(*per_axis):
    sizes = [size for _, size in combo if size is not None]
    out.add((sum(start for start, _ in combo), sizes[-1] if sizes else extent))
  return sorted(out) or [(0, extent)]


def _draw_conv(subfig, c: ConvReport, mpl: _Mpl) -> None:
  plan, s = c.plan, c.plan.spec
  plane, bar = subfig.subplots(1, 2, gridspec_kw={"width_ratios": [5, 1]})
  # The two most split spatial dims, in spatial order (the first ones on ties).
  dims = sorted(sorted(range(s.n_spatial), key=lambda d: -_count(plan, d))[:2])
  subfig.suptitle(
      f"{c.name.removeprefix('jaxtile/')}: {spec_lib.short_aval(c.lhs_shape, c.dtype)} * "
      f"{spec_lib.short_aval(c.rhs_shape, c.dtype)} -> {spec_lib.short_aval(c.out_shape, c.dtype)}"
      f"\n{c.n_elemental} pieces, +{c.extra_input_percent:.1f}% input read, "
      f"+{c.extra_flops_percent:.1f}% MACs, {c.padding_waste_percent:.1f}% on padding\n"
      f"{os.path.basename(c.source)}", fontsize=9)
  if len(dims) == 1:
    _draw_line(plane, plan, dims[0], mpl)
  elif dims:
    _draw_plane(plane, plan, dims, mpl)
  hidden = [d for d in range(s.n_spatial) if d not in dims]
  if hidden:
    plane.set_title("projected away: " + ", ".join(
        f"spatial dim {d} ({_count(plan, d)} pieces)" for d in hidden), fontsize=8)
  _draw_blocks(bar, plan, mpl)


def _count(plan: geometry.ConvPlan, d: int) -> int:
  return next(a.count for a in plan.axes() if a.name in (f"spatial{d}", f"kernel{d}"))


def _draw_plane(ax, plan: geometry.ConvPlan, dims, mpl: _Mpl) -> None:
  s = plan.spec
  dy, dx = dims
  ny, nx = s.in_spatial[dy], s.in_spatial[dx]
  ys, xs = _spatial_pieces(plan, dy), _spatial_pieces(plan, dx)
  windows = [((x.window[0], y.window[0]), (x.window[1], y.window[0]), (x.window[1], y.window[1]),
              (x.window[0], y.window[1])) for y in _sample(ys) for x in _sample(xs)]
  ax.add_collection(mpl.collections.PolyCollection(
      windows, facecolors="tab:blue", alpha=0.15, edgecolors="none"))
  lines = []
  for p in ys:
    if p.tile is not None:
      lines += [((0, v), (nx, v)) for v in p.tile]
  for p in xs:
    if p.tile is not None:
      lines += [((v, 0), (v, ny)) for v in p.tile]
  ax.add_collection(mpl.collections.LineCollection(lines, colors="tab:blue", linewidths=0.6))
  # One interior piece in full: its tile (its window along dims without tiles) and its window.
  y, x = ys[len(ys) // 2], xs[len(xs) // 2]
  ax.add_patch(mpl.patches.Rectangle(
      (x.window[0], y.window[0]), x.window[1] - x.window[0], y.window[1] - y.window[0],
      fill=False, edgecolor="tab:red", linestyle="--", linewidth=1.2))
  (x0, x1), (y0, y1) = x.tile or x.window, y.tile or y.window
  ax.add_patch(mpl.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="tab:red", alpha=0.35,
                                     edgecolor="tab:red"))
  ax.add_patch(mpl.patches.Rectangle((0, 0), nx, ny, fill=False, edgecolor="black"))
  margin = 0.03 * max(nx, ny, 1)
  ax.set_xlim(-margin, nx + margin)
  ax.set_ylim(ny + margin, -margin)
  if max(nx, ny) <= 8 * max(min(nx, ny), 1):
    ax.set_aspect("equal")
  ax.set_xlabel(f"spatial dim {dx}: {_count(plan, dx)} pieces (input elements)", fontsize=8)
  ax.set_ylabel(f"spatial dim {dy}: {_count(plan, dy)} pieces", fontsize=8)
  ax.legend(handles=[
      mpl.patches.Patch(facecolor="tab:blue", alpha=0.3, label="input windows (darker: halo)"),
      mpl.patches.Patch(facecolor="tab:red", alpha=0.35, edgecolor="tab:red", label="one tile"),
      mpl.patches.Patch(fill=False, edgecolor="tab:red", linestyle="--",
                        label="its window (tile + halo)")],
      fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)


def _draw_line(ax, plan: geometry.ConvPlan, d: int, mpl: _Mpl) -> None:
  n = plan.spec.in_spatial[d]
  pieces = _sample(_spatial_pieces(plan, d))
  for row, p in enumerate(pieces):
    ax.broken_barh([(p.window[0], p.window[1] - p.window[0])], (row - 0.4, 0.8),
                   facecolors="tab:blue", alpha=0.3)
    t0, t1 = p.tile or p.window
    ax.broken_barh([(t0, t1 - t0)], (row - 0.25, 0.5), facecolors="tab:red", alpha=0.6)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.axvline(n, color="black", linewidth=0.8)
  ax.set_ylim(len(pieces) - 0.5, -0.5)
  ax.set_xlabel(f"spatial dim {d} (input elements)", fontsize=8)
  ax.set_ylabel(f"piece ({_count(plan, d)} in all)", fontsize=8)
  ax.legend(handles=[
      mpl.patches.Patch(facecolor="tab:blue", alpha=0.3, label="input window (tile + halo)"),
      mpl.patches.Patch(facecolor="tab:red", alpha=0.6, label="tile")], fontsize=7,
      loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


def _draw_blocks(ax, plan: geometry.ConvPlan, mpl: _Mpl) -> None:
  s = plan.spec
  bars = (("batch", ("out", s.out_axes[0]), s.out_shape[s.out_axes[0]]),
          ("in ch", ("lhs", s.lhs_axes[1]), s.lhs_shape[s.lhs_axes[1]]),
          ("out ch", ("out", s.out_axes[1]), s.out_shape[s.out_axes[1]]))
  labels = []
  for x, (label, dim, extent) in enumerate(bars):
    blocks = _intervals(plan, dim, extent)
    for i, (start, size) in enumerate(blocks):
      ax.add_patch(mpl.patches.Rectangle(
          (x - 0.35, start / max(extent, 1)), 0.7, size / max(extent, 1),
          facecolor=("tab:green", "tab:olive")[i % 2], alpha=0.6, edgecolor="white",
          linewidth=0.5))
    labels.append(f"{label}\n{extent}\n{len(blocks)} blk")
  ax.set_xlim(-0.6, len(bars) - 0.4)
  ax.set_ylim(1, 0)
  ax.set_xticks(range(len(bars)), labels, fontsize=7)
  ax.set_yticks([0, 0.5, 1], ["0", "1/2", "all"], fontsize=7)
  ax.set_title("blocks", fontsize=8)
