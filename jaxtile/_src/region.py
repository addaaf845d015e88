"""Regions: spatially local ops tiled as one loop, so intermediates live a tile at a time.

A region is a set of equations of one jaxpr that starts at a conv and grows through the convs,
pools and elementwise ops (bias, activations, casts, residual adds) that read its values, as long
as every value it makes is read inside it, except its one output. It holds two convs or more, or
one with a pool, pad or upsampling around it (`_reshapes_conv`); a conv with elementwise ops
alone is tiled on its own (`lower`). Their other operands are small:
kernels, and values of size 1 along every spatial dim (biases, scales, scalars). The region's loop
runs over tiles of its output; for each tile it reads the input window the tile needs (the
receptive field walked back through every op, the union where a value feeds several), computes
every equation on windows, and writes the tile. Only the region's input and output exist at full
size.

A transposed (lhs-dilated) conv inside a region starts a new stage of it (`Chain`): each stage
is planned for the window the next one reads. So does a nearest-neighbour upsampling by integer
factors (`jax.image.resize(..., "nearest")`, `jnp.repeat`; `upsample`), which reads its input as
a transposed conv with a kernel of ones would: a decoder's upsampled activation never exists
at full size. A norm's statistics over the image, of a value the region makes, are a pass of
their own over that value's tiles before the loop (`Statistics`). Concatenations other than of
a stage's inputs, other reshapes and reductions, and everything else end a region; those convs
are tiled one by one as before.

Derivatives run over the same tiles: a region's tangent is a primitive of its own
(`region_jvp_p`) whose transpose recomputes each tile's forward and pulls its cotangent back, so
`jax.grad` saves only the region's operands. vmap and second derivatives compute the region's
equations at full size with each conv tiled on its own (`unfused`): exact, without the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtile._src import _compat
from jaxtile._src import canonical
from jaxtile._src import forms
from jaxtile._src import lower as lower_lib
from jaxtile._src import upsample
from jaxtile._src import decide as decide_lib
from jaxtile._src.spec import ConvSpec

# Primitives that act on each element alone (with operands broadcast along size-1 dims).
ELEMENTWISE = frozenset({
    "abs", "add", "add_any", "atan2", "cbrt", "ceil", "clamp", "convert_element_type", "copy",
    "copy_p", "cos", "cosh", "div", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor",
    "integer_pow",
    "is_finite", "log", "log1p", "logistic", "max", "min", "mul", "ne", "neg", "nextafter", "not",
    "pow", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt",
    "square", "sub", "tan", "tanh", "eq", "ge", "gt", "le", "lt", "and", "or", "xor",
    "stop_gradient",
})


def is_elementwise(eqn) -> bool:
  """An equation of an `ELEMENTWISE` primitive (not a call: a call's body is traced at its
  operands' shapes)."""
  return eqn.primitive.name in ELEMENTWISE


# Call-like primitives whose body may be elementwise (jax.nn.relu is a custom_jvp, gelu a jit).
_CALLS = {"custom_jvp_call": "call_jaxpr", "pjit": "jaxpr", "jit": "jaxpr"}

# Recomputed halos may cost at most this fraction of extra multiply-adds (at most twice the work);
# a region that would cost more is cut before the conv that pushes it over. A cut costs a
# full-size activation, the memory a region exists to save, so only tight budgets (small tiles
# with deep halos) reach this; larger budgets give large tiles and small overheads
# (`python benchmarks/bench.py --only regions` prints the curve).
MAX_EXTRA_MACS = 1.0


@dataclasses.dataclass(frozen=True)
class Layout:
  """Axes of batch, feature and each spatial dim of the region's full-size values."""
  batch: int
  feature: int
  spatial: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class RegionPlan:
  """A chain of equations and its tiling: what the loop (`emit`) needs, all static.

  Along spatial dim d, the window of value v for the output tile at offset o is
  `[o * scale[v][d] + shift[v][d], ... + width[v][d])` (see `_windows`).
  """
  eqns: tuple[Any, ...]
  inputs: tuple[Any, ...]  # the region's full-size input vars (the first conv's lhs first)
  smalls: tuple[Any, ...]  # its other input vars, in order
  output: Any  # the chain's output var
  layout: Layout
  tile: tuple[int, ...]  # output tile extent per spatial dim
  scale: dict  # var -> per-dim multiplier of the tile offset
  shift: dict  # var -> per-dim constant
  width: dict  # var -> per-dim window extent
  extent: dict  # var -> per-dim full extent
  dilation: dict  # var -> per-dim lhs dilation of the transposed conv reading it (see _windows)
  policy: decide_lib.Policy
  name: str
  tile_bytes: int
  extra_macs_percent: float

  @property
  def convs(self) -> list:
    return [e for e in self.eqns if _compat.is_conv(e)]

  @property
  def tiles(self) -> tuple[int, ...]:
    """Output tiles per spatial dim."""
    return tuple(_ceil_div(n, t) for n, t in zip(self.extent[self.output], self.tile))

  @property
  def n_tiles(self) -> int:
    return math.prod(self.tiles)

  @property
  def halo(self) -> tuple[int, ...]:
    """Per spatial dim, how much wider the first input's window is than the tile needs."""
    return self.halo_of(self.inputs[0])

  def halo_of(self, v) -> tuple[int, ...]:
    """Per spatial dim, how much wider `v`'s window is than the tile's own footprint on it (in
    elements of `v`: a transposed conv's input counts each of its elements once)."""
    dil = self.dilation.get(v, (1,) * len(self.tile))
    return tuple(w - _ceil_div(t * sc, d)
                 for w, t, sc, d in zip(self.width[v], self.tile, self.scale[v], dil))

  def start(self, v, o, shift=None):
    """Per spatial dim, where `v`'s window for the tile at offsets `o` (ints, NumPy, `_PerTile`s
    or traced) starts: affine in `o`, or for a transposed conv's input ceil(dilated start /
    dilation)."""
    shift = self.shift[v] if shift is None else shift
    dil = self.dilation.get(v, (1,) * len(self.tile))
    return [_ceil_div(o[d] * self.scale[v][d] + shift[d], dil[d]) for d in range(len(self.tile))]


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
  """A region as stages, each after the first starting at a transposed conv that reads the last
  value of the stage before.

  A window cannot be walked back through a transposed conv affinely (the input its tile reads
  starts at a ceiling division: `_windows`), so each stage is planned on its own: the last for
  the region's output tile, each earlier one for exactly the window the next reads of its
  output (`plan_region(..., tile=)`). Per tile, the offsets go back stage by stage
  (`offsets`), and the stages run in turn, each one's output masked outside its extent before
  the next reads it (`compute`). Nothing between stages exists at full size.
  """
  stages: tuple[RegionPlan, ...]
  name: str
  policy: decide_lib.Policy
  # Reductions of values made inside, computed by passes of their own before the loop
  # (`emit_statistics`); the loop reads their results as small operands.
  statistics: tuple["Statistics", ...] = ()
  # Reductions whose results only the program after the region reads (a gradient's weight and
  # bias gradients), added up by the region's loop itself.
  reductions: Optional["Reductions"] = None

  @property
  def written(self) -> bool:
    """Whether the loop writes the output (read after the region; not where only reductions
    read it)."""
    return self.reductions is None or self.reductions.written

  @property
  def outvars(self) -> list:
    """What the region makes for the program after it: its output where written, then its
    reductions' results."""
    return ([self.output] if self.written else []) + list(
        () if self.reductions is None else self.reductions.outputs)

  @functools.cached_property
  def eqns(self) -> tuple[Any, ...]:
    return tuple(e for p in self.stages for e in p.eqns)

  @functools.cached_property
  def inputs(self) -> tuple[Any, ...]:
    """The full-size inputs of every stage but the ones a stage hands on, first seen first."""
    return tuple(dict.fromkeys(v for k, p in enumerate(self.stages) for v in self.read_by(k)))

  @functools.cached_property
  def smalls(self) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(v for p in self.stages for v in p.smalls))

  def read_by(self, k: int) -> tuple[Any, ...]:
    """Stage k's inputs read from full-size values (all but the stage before's output)."""
    return self.stages[k].inputs[1:] if k else self.stages[k].inputs

  @property
  def output(self):
    return self.stages[-1].output

  @property
  def layout(self) -> Layout:
    return self.stages[-1].layout

  @property
  def tile(self) -> tuple[int, ...]:
    return self.stages[-1].tile

  @property
  def tiles(self) -> tuple[int, ...]:
    return self.stages[-1].tiles

  @property
  def n_tiles(self) -> int:
    return self.stages[-1].n_tiles

  @property
  def convs(self) -> list:
    return [e for p in self.stages for e in p.convs]

  @property
  def all_convs(self) -> list:
    """Its convs, then its reductions' (weight gradients)."""
    return self.convs + ([] if self.reductions is None else self.reductions.convs)

  @property
  def all_eqns(self) -> tuple[Any, ...]:
    """Its equations, then its reductions'."""
    return self.eqns + (() if self.reductions is None else self.reductions.eqns)

  @property
  def upsamplings(self) -> list:
    return [e for e in self.eqns if upsample.factors_of(e) is not None]

  @property
  def tile_bytes(self) -> int:
    return max(p.tile_bytes for p in self.stages)

  @property
  def halo(self) -> tuple[int, ...]:
    """The first stage's (its input window against its tile)."""
    return self.stages[0].halo

  @property
  def conv_halos(self) -> tuple[tuple[int, ...], ...]:
    """Per conv (`convs`), the halo of its input's window (`RegionPlan.halo_of`) in its stage:
    the receptive field growing layer by layer, back from the output."""
    return tuple(p.halo_of(e.invars[0]) for p in self.stages for e in p.convs)

  @property
  def extra_macs_percent(self) -> float:
    """Multiply-adds beyond the untiled convs': recomputed halos, and each statistics pass's
    recomputation of its source."""
    mono = sum(_macs(e) for p in self.stages for e in p.convs)
    tiled = self.tiled_macs + sum(s.source.tiled_macs for s in self.statistics)
    if self.reductions is not None:
      mono += sum(_macs(e) for e in self.reductions.convs)
      tiled += self.n_tiles * self.reductions.tile_macs
    return 100 * (tiled / max(mono, 1) - 1)

  @property
  def tiled_macs(self) -> int:
    return sum(self.n_tiles * _macs(e, [p.width[e.outvars[0]][d] for d in range(len(p.tile))])
               for p in self.stages for e in p.convs)

  def offsets(self, o) -> list:
    """Per stage, its output tile's offset per spatial dim (ints, NumPy, `_PerTile`s or traced)
    for the last stage's tile at `o`: where the next stage's window of it starts."""
    chain = [list(o)]
    for p in reversed(self.stages[1:]):
      chain.insert(0, p.start(p.inputs[0], chain[0]))
    return chain

  def compute(self, offsets, windows, smalls: dict, fast: bool, outside=None, keep=None):
    """The output tile from each stage's windows of what it reads (`read_by`, zeros outside
    the values) and the small operands by var; `outside[k]` as `compute_tile`'s; `keep`, a
    dict, gets the last stage's windows of every value."""
    x = None
    for k, p in enumerate(self.stages):
      inputs = list(windows[k])
      if k:
        before = self.stages[k - 1]
        x = _mask_outside(x, offsets[k - 1], before.extent[before.output], before.layout)
        inputs.insert(0, x)
      x = compute_tile(p, offsets[k], inputs, [smalls[v] for v in p.smalls], fast,
                       outside=None if outside is None else outside[k],
                       keep=keep if k == len(self.stages) - 1 else None)
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class Statistics:
  """Reductions over every spatial axis of a value a region makes inside (a norm's statistics),
  computed before the region's loop by a pass over the tiles of that value: `source` is the
  chain making it, planned for its tiles; `eqns` the statistics group (`_statistics_group`);
  `outputs` the reductions' results, which the equations after them turn into the norm's small
  operands. The value itself never exists at full size."""
  source: Chain
  value: Any
  eqns: tuple[Any, ...]
  outputs: tuple[Any, ...]
  name: str
  # Centred sums of squares this pass computes too (`_centred`): `jnp.var`'s second pass, the
  # sum of (value - mean) ** 2 with the mean made from a sum among `outputs`. Per entry: the
  # equation making that sum, and the result. `two_pass` has what derivatives and vmap see
  # instead, the passes as the program wrote them: this pass without them, and per entry the
  # equations making the mean and the second pass's `Statistics`.
  centred: tuple[tuple[Any, Any], ...] = ()
  two_pass: Optional[tuple["Statistics", tuple[tuple[tuple[Any, ...], "Statistics"], ...]]] = None

  @property
  def all_outputs(self) -> tuple[Any, ...]:
    """The reductions' results, then the centred sums of squares'."""
    return self.outputs + tuple(out for _, out in self.centred)

  @property
  def all_eqns(self) -> tuple[Any, ...]:
    """Every equation of the program whose work this pass does: its group's and its source's,
    and a merged second pass's (`two_pass`)."""
    seconds = () if self.two_pass is None else self.two_pass[1]
    return (*self.eqns, *self.source.eqns, *(e for _, s in seconds for e in s.all_eqns))


@dataclasses.dataclass(frozen=True, eq=False)
class Reductions:
  """Reductions over the image of values a region makes that nothing in the region reads: a
  gradient's weight gradients (`_reduction_conv`), its bias gradients and its loss (groups of
  `_statistics_group`'s kind). The region's loop adds them up itself: each reduced value's
  positions are dealt out among the tiles (`_partition`), and each tile adds the reduction of
  the positions it owns, from the windows it computes anyway.

  `bounds[v]` per spatial dim: for every tile index along it, where the owned positions of
  reduced value `v` start and end within the tile's window of `v`."""
  eqns: tuple[Any, ...]  # in jaxpr order
  outputs: tuple[Any, ...]  # the results, read after the region
  bounds: dict
  written: bool  # whether the program after the region reads its output too
  tile_macs: int  # the convs' multiply-adds per tile, on their windows

  @property
  def convs(self) -> list:
    return [e for e in self.eqns if _compat.is_conv(e)]


def _ceil_div(a, b):
  """ceil(a / b) for ints, NumPy or JAX integer arrays and a positive int b."""
  if b == 1:
    return a
  return -((-a) // b)


def _tile_count(n: int, t: int) -> int:
  return _ceil_div(n, t)


def _aval_bytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Finding chains
# ---------------------------------------------------------------------------------------------
def _is_small(aval, layout: Layout, rank: int) -> bool:
  """A scalar, or a value of size 1 along every spatial dim (a bias, a per-sample norm's
  statistics): read whole by every tile, which spans the batch and the features. Of `rank`, the
  rank of the value reading it, which must be the layout's (a squeezed value is not in it)."""
  shape = getattr(aval, "shape", ())
  if len(shape) == 0:
    return True
  return (len(shape) == rank == len(layout.spatial) + 2
          and all(shape[a] == 1 for a in layout.spatial))


def _elementwise_body(eqn, rule: bool = True) -> Optional[Any]:
  """The jaxpr of a call equation whose body is elementwise throughout, else None.

  A `custom_jvp` call (`jax.nn.relu`) qualifies only with its own JVP rule elementwise too
  (`_rule_is_elementwise`; not checked for the calls inside a rule, which windows only
  evaluate): a window's derivative runs that rule, never the derivative of the body (relu's is 0
  at 0, its body `max(x, 0)`'s would be 1/2).
  """
  key = _CALLS.get(eqn.primitive.name)
  if key is None or key not in eqn.params or len(eqn.outvars) != 1:
    return None
  closed = eqn.params[key]
  jaxpr = canonical.fold_broadcasts(getattr(closed, "jaxpr", closed))
  closed = _compat.ClosedJaxpr(jaxpr, getattr(closed, "consts", ()))
  full = tuple(eqn.outvars[0].aval.shape)
  for e in jaxpr.eqns:
    if not (e.primitive.name in ELEMENTWISE or _broadcast_to(e, full)
            or _elementwise_body(e, rule) is not None):
      return None
  if rule and eqn.primitive.name == "custom_jvp_call" and not _rule_is_elementwise(eqn):
    return None
  return closed


def inlined(eqn) -> bool:
  """A call whose body acts elementwise but that is no one equation to a region (it has several
  results, or holds a call that does), or that computes statistics (`jnp.var`'s call: sums
  over axes, and elementwise ops and broadcasts around them), or pads or slices (`jnp.pad`'s):
  inlined (`canonical.inline_calls`), so a region sees its equations. Each equation of its body
  is elementwise, a broadcast of a scalar, a pad, a slice, or a call `_elementwise_body` or
  this accepts; with statistics also a reduction (`_REDUCTIONS`), a broadcast or a reshape."""
  if eqn.primitive.name not in _CALLS or "jaxpr" not in eqn.params:
    return False
  closed = eqn.params["jaxpr"]
  if any(np.ndim(c) for c in getattr(closed, "consts", ())):
    return False
  body = getattr(closed, "jaxpr", closed).eqns
  nested = [e for e in body if inlined(e)]
  reduces = any(e.primitive.name in _REDUCTIONS for e in body)
  shifts = any(e.primitive.name in _SHIFTS for e in body)
  return (len(eqn.outvars) > 1 or bool(nested) or reduces or shifts) and all(
      e.primitive.name in ELEMENTWISE or _elementwise_body(e) is not None or e in nested
      or e.primitive.name == "broadcast_in_dim" and (e.invars[0].aval.ndim == 0 or reduces)
      or e.primitive.name in _REDUCTIONS or e.primitive.name == "reshape" and reduces
      or e.primitive.name in _SHIFTS for e in body)


# Pads and slices, which may shift windows (`_shift_window`): `jnp.pad` is a call of one pad.
_SHIFTS = ("pad", "slice")


def _broadcast_to(eqn, full) -> bool:
  """A broadcast of a scalar or small operand to a call's full shape (`jnp.where(m, x, 0.0)`'s
  zeros, a masked tangent): on a window, a broadcast to the window's shape (`_eval_eqns`)."""
  return (eqn.primitive.name == "broadcast_in_dim" and tuple(eqn.params["shape"]) == full
          and eqn.invars[0].aval.ndim in (0, len(full)))


def _rule_is_elementwise(eqn) -> bool:
  """Whether a custom_jvp call's JVP rule (`_compat.custom_jvp_rule`) can run on windows: every
  equation elementwise, or a broadcast to the call's full shape (`_broadcast_to`)."""
  if eqn.params.get("num_consts", 0) or len(eqn.outvars) != 1:
    return False
  rule = _jvp_rule(eqn)
  if rule is None:
    return False
  jaxpr, consts = rule
  full = tuple(eqn.outvars[0].aval.shape)
  if any(np.ndim(c) for c in consts):
    return False
  return all(e.primitive.name in ELEMENTWISE or _broadcast_to(e, full)
             or _elementwise_body(e, rule=False) is not None for e in jaxpr.eqns)


def _jvp_rule(eqn):
  """A custom_jvp call's JVP rule (`_compat.custom_jvp_rule`), its broadcasts folded
  (`canonical.fold_broadcasts`: a `vmap`ped rule's zeros), else None."""
  rule = _compat.custom_jvp_rule(eqn)
  return None if rule is None else (canonical.fold_broadcasts(rule[0]), rule[1])


def _is_concat(eqn, layout: Layout) -> bool:
  """A concatenation along the feature axis (a skip connection joining two branches)."""
  return (eqn.primitive.name == "concatenate"
          and eqn.params["dimension"] == layout.feature)


def _makes_input(eqn, layout: Layout) -> bool:
  """A feature concatenation, or an elementwise equation whose full-size operands all have its
  output's shape, an upsampling, a pad or a crop: one that may stand before a region's first
  conv."""
  if _region_upsample(eqn, None, layout) or _shift_window(eqn, layout) is not None:
    return True
  if _is_concat(eqn, layout):
    return _is_local(eqn, set(eqn.invars), layout)
  if eqn.primitive.name not in ELEMENTWISE and _elementwise_body(eqn) is None:
    return False
  out = eqn.outvars[0]
  return len(eqn.outvars) == 1 and all(
      isinstance(v, _compat.Literal) or _windowed_like(v.aval.shape, out.aval.shape, layout)
      or _is_small(v.aval, layout, len(out.aval.shape)) for v in eqn.invars)


def _windowed_like(shape, out_shape, layout: Layout) -> bool:
  """A full-size operand an elementwise op reads a window of at its output's: of the output's
  shape, or of one feature (a LayerNorm's statistics, `canonical.keep_reduced_axes`)."""
  return len(shape) == len(out_shape) and all(
      n == m or (a == layout.feature and n == 1) for a, (n, m) in enumerate(zip(shape, out_shape)))


def _is_local(eqn, values, layout: Layout) -> bool:
  """An elementwise equation reading at least one of `values`, its other operands small or
  values it reads a window of (`_windowed_like`; a loss's target: they become inputs, read a
  window at a time); or a feature concatenation reading at least one of `values` (its others
  become inputs)."""
  if _is_concat(eqn, layout):
    spatial = lambda v: tuple(v.aval.shape[a] for a in layout.spatial)
    out = eqn.outvars[0]
    return (any(v in values for v in eqn.invars)
            and all(not isinstance(v, _compat.Literal) and spatial(v) == spatial(out)
                    and v.aval.shape[layout.batch] == out.aval.shape[layout.batch]
                    for v in eqn.invars))
  if eqn.primitive.name not in ELEMENTWISE and _elementwise_body(eqn) is None:
    return False
  if len(eqn.outvars) != 1:
    return False
  shape = eqn.outvars[0].aval.shape
  rank = len(shape)
  full = [v for v in eqn.invars if not isinstance(v, _compat.Literal)
          and not _is_small(v.aval, layout, rank)]
  return any(v in values for v in full) and all(
      _windowed_like(v.aval.shape, shape, layout) for v in full)


# Pooling, with the value its padding stands for (the reduction's identity).
_POOLS = {"reduce_window_max": -np.inf, "reduce_window_min": np.inf, "reduce_window_sum": 0}


def _is_pool(eqn) -> bool:
  return eqn.primitive.name in _POOLS


def _shift_window(eqn, layout: Layout):
  """A `pad` with zeros or a `slice` with unit strides, along spatial dims alone (`jnp.pad` of
  an image, a crop, and each one's transpose, the other): the window op of a one-wide conv
  with stride 1 and low padding `lo` (negative: a crop), as `_window_op` gives it, else None.

  Output position i of such an op is operand position i - lo, zero where that lies outside
  the operand (a pad's zeros): its output window is its operand's window, shifted by lo, and
  zeros outside the operand's extent, which is how `compute_tile` reads any conv's operand.
  Interior padding, another padding value and strided slices are not this (they end a
  region)."""
  rank = len(layout.spatial) + 2
  if eqn.primitive.name == "pad":
    value, config = eqn.invars[1], eqn.params["padding_config"]
    if (not isinstance(value, _compat.Literal) or np.asarray(value.val) != 0
        or np.signbit(np.asarray(value.val)) or len(config) != rank
        or any(interior != 0 for _, _, interior in config)):
      return None
    low, whole = [int(lo) for lo, _, _ in config], [(lo, hi) == (0, 0) for lo, hi, _ in config]
  elif eqn.primitive.name == "slice":
    p, shape = eqn.params, eqn.invars[0].aval.shape
    if len(shape) != rank or any(s != 1 for s in (p["strides"] or ())):
      return None
    low = [-int(b) for b in p["start_indices"]]
    whole = [b == 0 and e == n for b, e, n in zip(p["start_indices"], p["limit_indices"], shape)]
  else:
    return None
  if not (whole[layout.batch] and whole[layout.feature]):
    return None
  k = len(layout.spatial)
  return (1,) * k, tuple(low[a] for a in layout.spatial), (1,) * k, (1,) * k


def _window_op(eqn, layout: Layout):
  """(strides, low paddings, window extents, window dilations) per spatial dim of the window a
  conv, pool or upsampling reads, else None. An upsampling by f reads as a transposed conv with
  a kernel of f ones and padding f - 1 (`upsample`'s docstring), lhs dilation f
  (`_lhs_dilation`)."""
  p = eqn.params
  if _compat.is_conv(eqn):
    rhs = eqn.invars[1].aval.shape
    spatial = p["dimension_numbers"].rhs_spec[2:]
    return (tuple(p["window_strides"]), tuple(lo for lo, _ in p["padding"]),
            tuple(rhs[a] for a in spatial), tuple(p["rhs_dilation"]))
  if _is_pool(eqn):
    a = layout.spatial
    return (tuple(p["window_strides"][i] for i in a), tuple(p["padding"][i][0] for i in a),
            tuple(p["window_dimensions"][i] for i in a), tuple(p["window_dilation"][i] for i in a))
  factors = upsample.factors_of(eqn)
  if factors is not None:
    f = tuple(factors[a] for a in layout.spatial)
    return (1,) * len(f), tuple(n - 1 for n in f), f, (1,) * len(f)
  return _shift_window(eqn, layout)


def _lhs_dilation(eqn, layout: Layout) -> Optional[tuple[int, ...]]:
  """Per spatial dim, the lhs dilation of a transposed conv or the factor of an upsampling (a
  transposed conv to `_windows`), else None."""
  if _compat.is_conv(eqn):
    d = tuple(eqn.params["lhs_dilation"])
  else:
    factors = upsample.factors_of(eqn)
    if factors is None:
      return None
    d = tuple(factors[a] for a in layout.spatial)
  return d if any(n != 1 for n in d) else None


def _region_upsample(eqn, values, layout: Layout) -> bool:
  """An upsampling of a value in `values` (or any, for None) along spatial dims alone."""
  factors = upsample.factors_of(eqn)
  return (factors is not None and len(factors) == len(layout.spatial) + 2
          and factors[layout.batch] == factors[layout.feature] == 1
          and (values is None or eqn.invars[0] in values))


def _reads_neighbours(eqn, layout: Layout) -> bool:
  """A pool whose output at a position reads other positions (or padding): its input needs
  the reduction's identity outside the image. One that reads no neighbour (a LayerNorm's sums
  over the features, `canonical.keep_reduced_axes`) needs nothing there: filled with -inf for
  a max, its outside positions would be NaN after `x - max(x)`, and so would gradients."""
  p = eqn.params
  return any(p["window_dimensions"][a] != 1 or tuple(p["padding"][a]) != (0, 0)
             for a in layout.spatial)


def _pool_ok(eqn, layout: Layout) -> bool:
  """A pool that acts on spatial dims alone, or reduces every feature at one position (a
  LayerNorm's sums, `canonical.keep_reduced_axes`), without base dilation."""
  p = eqn.params
  features = eqn.invars[0].aval.shape[layout.feature]
  return (all(d == 1 for d in p["base_dilation"])
          and all(p["window_dimensions"][i] in ((1, features) if i == layout.feature else (1,))
                  and p["window_strides"][i] == 1
                  and tuple(p["padding"][i]) == (0, 0) and p["window_dilation"][i] == 1
                  for i in (layout.batch, layout.feature)))


def _conv_layout(eqn) -> tuple[Layout, Layout]:
  dn = eqn.params["dimension_numbers"]
  return (Layout(dn.lhs_spec[0], dn.lhs_spec[1], tuple(dn.lhs_spec[2:])),
          Layout(dn.out_spec[0], dn.out_spec[1], tuple(dn.out_spec[2:])))


def _is_transposed(eqn) -> bool:
  """A transposed conv, or an upsampling (which `_windows` walks as one)."""
  if _compat.is_conv(eqn):
    return any(d != 1 for d in eqn.params["lhs_dilation"])
  return upsample.factors_of(eqn) is not None


def _region_conv(eqn, values, layout: Optional[Layout]) -> Optional[Layout]:
  """The output layout if conv `eqn` can join a region making `values` (or start one, when
  `values` is None), else None. A transposed conv inside a region starts a new stage (`Chain`)."""
  if not _compat.is_conv(eqn) or eqn.params["batch_group_count"] != 1:
    return None
  if any(v.aval.size == 0 for v in (*eqn.invars, *eqn.outvars)):
    return None  # an empty array: nothing to tile
  lhs_layout, out_layout = _conv_layout(eqn)
  if values is not None and (eqn.invars[0] not in values or eqn.invars[1] in values
                             or lhs_layout != layout):
    return None
  if lhs_layout != out_layout:
    return None
  return out_layout


def _small_broadcast(eqn, layout: Layout) -> bool:
  """A broadcast of a scalar or a small value (`_is_small`: a weight of extent 1 along every
  spatial dim) to a value of the layout's rank (`canonical.place_broadcasts` puts one before
  each equation reading it): on a window, a broadcast to the window's shape."""
  rank = len(layout.spatial) + 2
  return (eqn.primitive.name == "broadcast_in_dim" and len(eqn.params["shape"]) == rank
          and eqn.params.get("sharding") is None
          and (eqn.invars[0].aval.ndim == 0 or _is_small(eqn.invars[0].aval, layout, rank)))


def _reduction_conv(eqn, values, layout: Layout) -> bool:
  """A conv that sums over every position of a value in `values`: a weight gradient. Its rhs
  (the output's cotangent) and lhs (the layer's input) are both in `values` with the layout's
  spatial axes as the conv's spatial dims, and it has no lhs dilation. Then

      out[k] = sum_j lhs[k * window_stride + j * rhs_dilation - low_padding] * rhs[j],

  per spatial dim, over every position j of the rhs: each tile adds the part of the positions
  it owns (`_partition`), reading the lhs window those need (`_windows`)."""
  if not _compat.is_conv(eqn):
    return False
  dn = eqn.params["dimension_numbers"]
  lhs, rhs = eqn.invars
  return (lhs in values and rhs in values and lhs is not rhs
          and tuple(dn.lhs_spec[2:]) == layout.spatial == tuple(dn.rhs_spec[2:])
          and lhs.aval.ndim == rhs.aval.ndim == len(layout.spatial) + 2
          and all(d == 1 for d in eqn.params["lhs_dilation"]))


def _uses(jaxpr) -> dict:
  """Var -> indices of the equations reading it (len(eqns) stands for the jaxpr's outputs)."""
  uses: dict = {}
  for i, e in enumerate(jaxpr.eqns):
    for v in e.invars:
      if not isinstance(v, _compat.Literal):
        uses.setdefault(v, []).append(i)
  for v in jaxpr.outvars:
    if not isinstance(v, _compat.Literal):
      uses.setdefault(v, []).append(len(jaxpr.eqns))
  return uses


# Reductions a tile can compute part of, with their identity (what a position it does not own
# contributes), how partial results combine, and how they combine across devices.
_REDUCTIONS = {"reduce_sum": (0, lax.add, lax.psum), "reduce_max": (-np.inf, lax.max, lax.pmax),
               "reduce_min": (np.inf, lax.min, lax.pmin)}


def _split_features(eqn, layout: Layout, spatial: tuple) -> Optional[tuple]:
  """For a reshape that only splits the feature axis in two (GroupNorm's channels into groups),
  where the spatial axes `spatial` of its operand land; else None."""
  f = layout.feature
  if (len(spatial) != len(layout.spatial) or isinstance(eqn.invars[0], _compat.Literal)
      or eqn.invars[0].aval.ndim != len(layout.spatial) + 2
      or f not in canonical.split_axes(eqn)):
    return None
  return tuple(a + (a > f) for a in spatial)


def _statistics_group(jaxpr, i: int, values, layout: Layout, uses) -> Optional[list[int]]:
  """The equations from `jaxpr.eqns[i]` on that reduce region values over every spatial axis (a
  norm's statistics: GroupNorm's sums of x and x^2 per group), if `i` starts such a group: each
  a reshape splitting the feature axis, an elementwise op or a reduction (`_REDUCTIONS`) over
  axes that include every spatial one, each reading only region values, the group's own
  values and scalars, and every value it makes read only in the group except the reductions'
  small results. A tile computes its part of each reduction (`emit_statistics`)."""
  rank = len(layout.spatial) + 2
  spatial = {}  # value -> its spatial axes (moved by a reshape that splits the features)
  group, made = [], set()
  frontier = [i]
  while frontier:
    j = frontier.pop(0)
    if j in group:
      continue
    e = jaxpr.eqns[j]
    if len(e.outvars) != 1:
      return None
    full = [v for v in e.invars if not isinstance(v, _compat.Literal)]
    if not full or any(v not in values and v not in made or v.aval.ndim == 0 for v in full):
      return None
    axes = {spatial.get(v, layout.spatial if v.aval.ndim == rank else None) for v in full}
    if len(axes) != 1 or None in axes:
      return None
    (axes,) = axes
    out = e.outvars[0]
    name = e.primitive.name
    if name == "reshape":
      axes = _split_features(e, layout, axes)
      if axes is None:
        return None
    elif name in _REDUCTIONS:
      if not set(axes) <= set(e.params["axes"]) or len(full) != 1:
        return None
      group.append(j)
      continue  # a small result: read by whatever reads statistics
    elif name not in ELEMENTWISE and _elementwise_body(e) is None or any(
        v.aval.shape != out.aval.shape for v in full):
      return None
    group.append(j)
    made.add(out)
    spatial[out] = axes
    readers = uses.get(out, [])
    if len(jaxpr.eqns) in readers:
      return None  # a jaxpr output
    frontier += readers
  if not any(jaxpr.eqns[j].primitive.name in _REDUCTIONS for j in group):
    return None
  return sorted(group)


def canonical_form(jaxpr) -> upsample.Grouped:
  """`jaxpr` as regions and streamed stages see it (`canonical`), for `tile_convs` and `stream`
  alike: unit axes added and taken away again (equinox's convs under vmap) are none; calls of
  several elementwise results, or computing statistics, are their bodies; elementwise ops on
  channels split into groups run on the unsplit ones; each upsampling is one equation
  (`upsample.group`, whose `originals` are the equations it stands for); a product of an
  image's features with a weight is a 1x1 conv (`canonical.dense_as_conv`); and broadcasts
  that repeat a small operand stand before each reader, at its shape."""
  jaxpr = canonical.fold_literal_converts(canonical.inline_calls(_compat.dce(jaxpr), inlined))
  grouped = upsample.group(canonical.drop_round_trips(canonical.sink_splits(jaxpr,
                                                                            is_elementwise)))
  jaxpr = canonical.keep_reduced_axes(canonical.fold_broadcasts(grouped.jaxpr), is_elementwise)
  # Last, so that each product a conv stands for is an equation of the canonical jaxpr as it is
  # (`Rewriter` puts it back where no region takes the conv).
  jaxpr, dense, kernels = canonical.dense_as_conv(canonical.place_broadcasts(jaxpr,
                                                                             is_elementwise))
  return upsample.Grouped(jaxpr, {**grouped.originals, **dense}, kernels)


def find_regions(jaxpr) -> list[tuple[list[int], list[list[int]]]]:
  """Every region of `jaxpr` (see the module docstring: two convs or more, or one that
  `_reshapes_conv`) with one output:
  the indices of its equations, and the statistics groups (`_statistics_group`) that read
  values it makes."""
  uses = _uses(jaxpr)
  regions, taken = [], set()
  for start, eqn in enumerate(jaxpr.eqns):
    if start in taken:
      continue
    layout = _region_conv(eqn, None, None)
    if layout is None:
      continue
    # The input is a value of the region too: a residual add of it is local (its window is
    # then the union of the conv's and the add's).
    members, values = [start], {eqn.outvars[0], eqn.invars[0]}
    # The feature concatenations and elementwise ops making the first conv's input, read by the
    # region alone, join it too; their full-size operands become the region's inputs (a decoder
    # level: the upsampled path with its bias, and the skip).
    making = {e.outvars[0]: j for j, e in enumerate(jaxpr.eqns[:start])}
    frontier = [eqn.invars[0]]
    while frontier:
      v = frontier.pop()
      j = making.get(v)
      if j is None or j in taken or j in members or len(uses.get(v, [])) != 1:
        continue
      e = jaxpr.eqns[j]
      if not _makes_input(e, layout):
        continue
      members.insert(0, j)
      full = [u for u in e.invars if not isinstance(u, _compat.Literal)
              and not _is_small(u.aval, layout, len(u.aval.shape))]
      values.update(full)
      frontier += full
    members.sort()
    inputs = values - {eqn.outvars[0]}
    groups, grouped = [], set()
    for i in range(start + 1, len(jaxpr.eqns)):
      e = jaxpr.eqns[i]
      if i in taken or i in grouped:
        continue
      if _small_broadcast(e, layout):
        # Zeros or a seed, made just before the equation reading it (`place_broadcasts`):
        # a member where that takes it with a region value.
        reader = uses.get(e.outvars[0], [len(jaxpr.eqns)])[0]
        if reader < len(jaxpr.eqns) and all(_small_broadcast(jaxpr.eqns[j], layout)
                                      for j in range(i + 1, reader)) and any(
            v in values for v in jaxpr.eqns[reader].invars if not isinstance(v, _compat.Literal)):
          members.append(i)
          values.add(e.outvars[0])
        continue
      if not any(v in values for v in e.invars if not isinstance(v, _compat.Literal)):
        continue
      pool = _is_pool(e) and e.invars[0] in values and _pool_ok(e, layout)
      shifted = _shift_window(e, layout) is not None and e.invars[0] in values
      if (pool or shifted or _region_conv(e, values, layout) is not None
          or _is_local(e, values, layout) or _region_upsample(e, values, layout)):
        members.append(i)
        values.add(e.outvars[0])
        continue
      group = ([i] if _reduction_conv(e, values, layout)
               else _statistics_group(jaxpr, i, values, layout, uses))
      if group is None or any(j in taken for j in group):
        while _small_broadcast(jaxpr.eqns[members[-1]], layout) and uses.get(
            jaxpr.eqns[members[-1]].outvars[0]) == [i]:
          members.pop()  # read by this equation alone
        break  # a value of the region is read by what the region cannot hold
      groups.append(group)
      grouped.update(group)
    # Elementwise members read by statistics alone (x * x of a variance) move into their
    # group, the last first: one moved may leave the member making its operand read by the
    # group alone too. Only while the group still reads one value (its source, `_group_reads`):
    # a classifier's global pooling reads the last block's activation, and would otherwise take
    # in its residual add, and through it everything before.
    for m in reversed(members[1:]):
      e = jaxpr.eqns[m]
      if e.primitive.name not in ELEMENTWISE and _elementwise_body(e) is None:
        continue
      readers = uses.get(e.outvars[0], [])
      group = next((g for g in groups if readers and set(readers) <= set(g)), None)
      if group is not None and len(_group_reads(jaxpr, [*group, m])) == 1:
        members.remove(m)
        group.append(m)
        group.sort()
        grouped.add(m)
    # The longest prefix whose values are read outside it by one value alone, the last, or by
    # none (a gradient's last value, read by weight gradients alone), and whose stages
    # (`stages_of`) hand on one value each. Groups that can join count as inside (`_joins`).
    everything = set().union(*groups)
    read_inside = lambda v: all(u in everything or u in members for u in uses.get(v, []))
    while members:
      made = [jaxpr.eqns[i].outvars[0] for i in members]
      inside = set(members).union(*(g for g in groups
                                    if _joins(jaxpr, g, made, inputs, read_inside)))
      outside = [v for v in made if any(u not in inside for u in uses.get(v, []))]
      cut = _bad_stage(jaxpr, members, uses)
      if cut is not None:
        del members[cut:]
      elif outside in ([made[-1]], []):
        break
      else:
        members.pop()
    n_convs = sum(_compat.is_conv(jaxpr.eqns[i]) for i in members)
    if n_convs >= 2 or n_convs == 1 and _reshapes_conv(jaxpr, members):
      made = [jaxpr.eqns[i].outvars[0] for i in members]
      groups = [g for g in groups if _joins(jaxpr, g, made, inputs, read_inside)]
      regions.append((members, groups))
      taken.update(members)
      taken.update(j for g in groups for j in g)
  return regions


def _reshapes_conv(jaxpr, members: Sequence[int]) -> bool:
  """Whether the equations `members`, around one conv, pool or pad its output (or concatenate
  or upsample its input): a region of that conv alone then keeps the value of the other shape
  one tile at a time. A conv with elementwise ops only is tiled on its own (`lower`): they read
  its full-size output, which the untiled program makes too (a conv, batch norm, relu and max pool
  stem: 32 MiB of temporaries at 1x512x512x32 tiled on its own, 0.6 as a region, 0 untiled,
  where XLA:CPU computes the whole stem in one kernel)."""
  conv = next(jaxpr.eqns[i] for i in members if _compat.is_conv(jaxpr.eqns[i]))
  shape = conv.outvars[0].aval.shape
  return any(_is_pool(e) or e.outvars[0].aval.shape != shape
             for e in (jaxpr.eqns[i] for i in members)
             if not _compat.is_conv(e) and len(e.outvars[0].aval.shape) == len(shape))


def _joins(jaxpr, group: Sequence[int], made: Sequence[Any], inputs, readers) -> bool:
  """Whether a group can join the region making `made` (in order) from `inputs`: a reduction
  conv reading what the region holds, or a group reading one value made inside; the last only
  where nothing but `readers` (equations of the region and its groups) reads it, else it exists
  at full size anyway and XLA reduces it there."""
  read = _group_reads(jaxpr, group)
  if len(group) == 1 and _compat.is_conv(jaxpr.eqns[group[0]]):
    return read <= set(made) | set(inputs)
  return len(read) == 1 and read <= set(made) and (read != {made[-1]} or readers(made[-1]))


def _group_reads(jaxpr, group: Sequence[int]) -> set:
  """The values other than scalars that a statistics group reads from outside itself."""
  inner = {jaxpr.eqns[j].outvars[0] for j in group}
  return {v for j in group for v in jaxpr.eqns[j].invars
          if not isinstance(v, _compat.Literal) and v not in inner and v.aval.ndim > 0}


def _group_source(jaxpr, group: Sequence[int], made) -> Optional[Any]:
  """The one value of `made` a statistics group reads, else None (a group over a region's
  input or output reads a value that exists at full size anyway: XLA reduces it there)."""
  read = _group_reads(jaxpr, group)
  return read.pop() if len(read) == 1 and all(v in made for v in read) else None


def stages_of(jaxpr, members: Sequence[int]) -> list[list[int]]:
  """`members` cut before every transposed conv that follows a conv."""
  stages = [[]]
  for i in members:
    if _is_transposed(jaxpr.eqns[i]) and any(_compat.is_conv(jaxpr.eqns[j]) for j in stages[-1]):
      stages.append([])
    stages[-1].append(i)
  return stages


def _bad_stage(jaxpr, members: Sequence[int], uses) -> Optional[int]:
  """The position in `members` of the first transposed conv that cannot start a stage, else
  None. Stage k + 1 may read of stage k's values only the one its transposed conv reads, and
  only there: per tile the stage before computes just that conv's input window."""
  position = {i: n for n, i in enumerate(members)}
  for stage in stages_of(jaxpr, members)[1:]:
    conv = jaxpr.eqns[stage[0]]
    lhs = conv.invars[0]
    before = [i for i in members if i < stage[0]]
    made_before = {jaxpr.eqns[i].outvars[0] for i in before}
    if lhs not in made_before or uses.get(lhs, []) != [stage[0]] or jaxpr.eqns[
        before[-1]].outvars[0] is not lhs:
      return position[stage[0]]
    for v in made_before - {lhs}:
      if any(u >= stage[0] for u in uses.get(v, [])):
        return position[stage[0]]
  return None


# ---------------------------------------------------------------------------------------------
# Windows and the plan
# ---------------------------------------------------------------------------------------------
# The receptive field, walked back from the output tile. Along one spatial dim, let output
# positions [a, a + w) of a conv with stride s, low padding p, kernel k and rhs dilation r be
# needed. Output j reads input positions j * s - p + t * r for taps t = 0..k-1 (no lhs dilation in
# a region), so the window is [a * s - p, (a + w - 1) * s - p + (k - 1) * r + 1): with
# a = o * scale + shift it starts at o * (scale * s) + (shift * s - p) and is
# (w - 1) * s + (k - 1) * r + 1 wide. Elementwise ops keep the window. Positions of a window
# outside [0, extent) are the conv's zero padding: the loop reads the region input as zeros there
# and sets an intermediate to zeros there before a conv reads it, never computing them from
# values beyond the image.
def _windows(eqns, output, tile: Sequence[int], layout: Layout, reductions=()):
  """Per full-size value: (scale, shift, width) per spatial dim, the union of what its readers
  need (a value read by a conv and, past it, by a residual add needs both windows). A
  reduction conv among `reductions` (`_reduction_conv`) reads its lhs where its rhs's window
  reaches (`_reduction_op`), once every reader of the rhs has set that window."""
  k = len(tile)
  scale, shift, width = {output: (1,) * k}, {output: (0,) * k}, {output: tuple(tile)}

  def need(v, sc, sh, w, dil=None):
    """`v`'s window for a reader; `dil`: the reader's is a transposed conv's input window (or
    an elementwise op's making one), in its units (below)."""
    if v not in scale:
      scale[v], shift[v], width[v] = sc, sh, w
      if dil is not None:
        dilation[v] = dil
      return
    if dilation.get(v) != dil or (dil is not None and (scale[v], shift[v], width[v]) != (
        sc, sh, w)):
      raise _NotARegion  # a transposed conv's input read otherwise too
    assert scale[v] == sc, (scale[v], sc)  # one grid per value
    lo = tuple(min(a, b) for a, b in zip(shift[v], sh))
    hi = tuple(max(a + x, b + y) for a, x, b, y in zip(shift[v], width[v], sh, w))
    shift[v], width[v] = lo, tuple(h - l for h, l in zip(hi, lo))

  dilation = {}
  by_rhs: dict = {}
  for r in reductions:
    if _compat.is_conv(r):
      by_rhs.setdefault(r.invars[1], []).append(r)
  summed = set(_summed(reductions))
  offsets = [_offsets(n, t) for n, t in zip(
      (output.aval.shape[a] for a in layout.spatial), tile)]

  def reduced(g):
    """Once `g`'s readers have set its window: where reductions sum over it, the window
    widened so that the tiles' windows reach from 0 to its extent (the first tile's starting at
    or before 0, the last's ending at or after it: `_partition`; a position the output does not
    depend on, a weight gradient still sums over); then the lhs window of each reduction conv
    reading it."""
    if g in summed:
      if g not in scale or g in dilation:
        raise _NotARegion  # a reduction of a value no tile computes
      extent = [g.aval.shape[a] for a in layout.spatial]
      lo = [min(sh, int(o[0]) * sc) for sh, sc, o in zip(shift[g], scale[g], offsets)]
      hi = [max(sh + w, n - int(o[-1]) * sc) for sh, w, sc, n, o
            in zip(shift[g], width[g], scale[g], extent, offsets)]
      need(g, scale[g], tuple(lo), tuple(h - l for h, l in zip(hi, lo)))
    for r in by_rhs.pop(g, []):
      need(r.invars[0], *_window_through(_reduction_op(r), scale[g], shift[g], width[g]))

  for e in reversed(eqns):
    out = e.outvars[0]
    if out not in scale:
      raise _NotARegion  # read by reductions alone, off the way to the output: no tile's window
    reduced(out)  # every reader of `out` is after it: its window is whole
    op = _window_op(e, layout)
    d = _lhs_dilation(e, layout)
    if op is not None and d is not None:
      # A transposed conv (lhs dilation d) reads dilated positions [p0, p0 + wd) with p0 affine
      # in the tile offset, the window above. Input i sits at dilated position i * d, so the
      # inputs read are i0 = ceil(p0 / d) on, at most ceil((wd + d - 1) / d) of them: not affine
      # in the tile offset. The window of the lhs is kept in dilated positions (scale, shift)
      # with its width in inputs; the loop computes i0 per tile (`emit`).
      sc, sh, wd = _window_through(op, scale[out], shift[out], width[out])
      if out in dilation:
        raise _NotARegion
      need(e.invars[0], sc, sh, tuple(_ceil_div(w + di - 1, di) for w, di in zip(wd, d)), d)
    elif op is not None:
      if out in dilation:
        raise _NotARegion  # a conv or pool making a transposed conv's input: a stage ends first
      need(e.invars[0], *_window_through(op, scale[out], shift[out], width[out]))
    else:  # elementwise or a feature concatenation: every full-size operand, the same window
      # (for ops making a transposed conv's input, in its units: they run on that window)
      spatial = lambda v: tuple(v.aval.shape[a] for a in layout.spatial)
      for v in e.invars:
        if (not isinstance(v, _compat.Literal)
            and not _is_small(v.aval, layout, len(out.aval.shape))
            and spatial(v) == spatial(out)):
          need(v, scale[out], shift[out], width[out], dilation.get(out))
  for g in summed - {e.outvars[0] for e in eqns}:  # the region's inputs
    reduced(g)
  return scale, shift, width, dilation


def _summed(reductions) -> list:
  """The values reduction equations sum over, first read first: each conv's rhs, and what a
  group reads from outside itself (its source)."""
  made = {r.outvars[0] for r in reductions}
  return list(dict.fromkeys(
      v for r in reductions
      for v in ([r.invars[1]] if _compat.is_conv(r) else r.invars)
      if not isinstance(v, _compat.Literal) and v not in made))


def _reduction_op(eqn):
  """A reduction conv's lhs window as `_window_op` gives a conv's: output k of the rhs window's
  position j reads lhs position j * rhs_dilation - low + k * window_stride (`_reduction_conv`),
  so the rhs's position steps by the rhs dilation, the kernel is the output's extent and the
  kernel dilation the window stride."""
  p = eqn.params
  out = eqn.outvars[0].aval.shape
  return (tuple(p["rhs_dilation"]), tuple(lo for lo, _ in p["padding"]),
          tuple(out[a] for a in p["dimension_numbers"].out_spec[2:]), tuple(p["window_strides"]))


def _window_through(op, scale, shift, width):
  """The (scale, shift, width) of the operand window a conv or pool reads for an output window
  (the block comment above `_windows`)."""
  s, lo, size, dil = op
  k = len(s)
  return (tuple(scale[d] * s[d] for d in range(k)),
          tuple(shift[d] * s[d] - lo[d] for d in range(k)),
          tuple((width[d] - 1) * s[d] + (size[d] - 1) * dil[d] + 1 for d in range(k)))


class _NotARegion(Exception):
  """Raised while planning equations that cannot be tiled as one region."""


def _required(e, v, scale, shift, width, layout: Layout):
  """The window equation `e` reads of its operand `v`: (shift, width) per dim."""
  out = e.outvars[0]
  op = _window_op(e, layout)
  if op is not None:
    _, sh, w = _window_through(op, scale[out], shift[out], width[out])
    return sh, w
  return shift[out], width[out]


def _offsets(n: int, t: int) -> np.ndarray:
  """Output tile offsets along one dim: every t, the last shifted back to end at n."""
  return np.minimum(np.arange(_tile_count(n, t)) * t, n - t)


def _tile_bytes(eqns, scale, width, layout: Layout, smalls_bytes: int) -> int:
  """Bytes live at once in one tile: the largest input window + output window of one equation,
  plus the small operands (kernels). A proxy: a value read again later (a residual, or in a
  differentiated program the forward activations its backward reads) stays live longer, so
  such a tile holds more (the 8-layer chain's gradient at 8 MiB: 31 MiB of temporaries)."""
  def window_bytes(v):
    shape = list(v.aval.shape)
    for d, a in enumerate(layout.spatial):
      shape[a] = width[v][d]
    return _aval_bytes(shape, v.aval.dtype)
  largest = 0
  for e in eqns:
    full = [v for v in e.invars if not isinstance(v, _compat.Literal) and v in width]
    largest = max(largest, sum(map(window_bytes, full)) + window_bytes(e.outvars[0]))
  return largest + smalls_bytes


def _macs(eqn, widths=None) -> int:
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval
  spec = ConvSpec.from_avals(eqn.invars[0].aval, rhs, out, eqn.params)
  out_elems = math.prod(out.shape)
  if widths is not None:
    out_elems = out_elems // math.prod(spec.out_spatial) * math.prod(widths)
  return out_elems * spec.in_per_group * math.prod(spec.kernel_spatial)


def plan_region(jaxpr, members: Sequence[int], policy: decide_lib.Policy, name: str,
                tile: Optional[Sequence[int]] = None, inside=frozenset(), uses=None,
                reductions: Sequence[int] = ()) -> Optional[RegionPlan]:
  """Tiles for the chain `members` of `jaxpr` within `policy.max_bytes`, or None when a tile of
  one output row (per dim) does not fit or the halos cost more than `MAX_EXTRA_MACS`.

  With `tile`, the output tile is that, whatever it costs (it may exceed the output: `stream`
  plans a region for the window a later one reads); None only when the chain is no region.
  Equations in `inside` may read the chain's values too (statistics groups; for a statistics
  source, the region's other equations). `uses`: `_uses(jaxpr)`, when the caller has it. The
  equations `reductions` (`Reductions`) widen the windows they read.
  """
  eqns = tuple(jaxpr.eqns[i] for i in members)
  reduction_eqns = tuple(jaxpr.eqns[i] for i in reductions)
  first = next(e for e in eqns if _compat.is_conv(e))
  layout = _conv_layout(first)[0]
  x, output = first.invars[0], eqns[-1].outvars[0]
  if not _compat.is_conv(eqns[0]):  # concatenations or elementwise ops make the conv's input
    x = None
  internal = {e.outvars[0] for e in eqns}
  # One output, and no full-size input but x: a part of a region cut where a residual crosses
  # the cut is not a region.
  inside = set(members) | set(inside)
  uses = _uses(jaxpr) if uses is None else uses
  if any(v is not output and any(u not in inside for u in uses.get(v, [])) for v in internal):
    return None
  rank = len(first.invars[0].aval.shape)
  inputs = [x] if x is not None else []
  smalls, seen = [], set(inputs)
  for e in eqns:
    for n, v in enumerate(e.invars):
      if isinstance(v, _compat.Literal) or v in internal or v in seen:
        continue
      seen.add(v)
      if (_compat.is_conv(e) and n == 1) or _is_small(v.aval, layout, rank):
        smalls.append(v)
      else:
        inputs.append(v)  # read, like x, a window at a time (zeros outside: `compute_tile`)
  smalls_bytes = sum(_aval_bytes(v.aval.shape, v.aval.dtype) for v in smalls)
  out_extent = tuple(output.aval.shape[a] for a in layout.spatial)
  mono_macs = sum(_macs(e) for e in eqns if _compat.is_conv(e))

  forced = tile is not None
  tile = list(out_extent if tile is None else tile)
  while True:
    try:
      scale, shift, width, dilation = _windows(eqns, output, tile, layout, reduction_eqns)
    except _NotARegion:
      return None
    fits = _tile_bytes(eqns, scale, width, layout, smalls_bytes) <= policy.max_bytes
    if fits or forced:
      break
    # No windowed input (every operand small enough to read whole): no halo.
    halo = max((width[x_][i] - tile[i] * scale[x_][i] for x_ in inputs for i in range(len(tile))),
               default=0)
    d = _next_halved(tile, halo)
    if d is None:
      return None
    tile[d] = _ceil_div(tile[d], 2)
  n_tiles = math.prod(_tile_count(n, t) for n, t in zip(out_extent, tile))
  if n_tiles == 1 and not forced:
    return None  # it fits whole: nothing to tile
  tiled_macs = n_tiles * sum(
      _macs(e, [width[e.outvars[0]][d] for d in range(len(tile))])
      for e in eqns if _compat.is_conv(e))
  extra = tiled_macs / max(mono_macs, 1) - 1
  if extra > MAX_EXTRA_MACS and not forced:
    return None
  extent = {}
  for e in eqns:
    for v in [*e.invars, *e.outvars]:
      if not isinstance(v, _compat.Literal) and v in width:
        extent[v] = tuple(v.aval.shape[a] for a in layout.spatial)
  return RegionPlan(
      eqns=eqns, inputs=tuple(inputs), smalls=tuple(smalls), output=output, layout=layout,
      tile=tuple(tile),
      scale=scale, shift=shift, width=width, extent=extent, dilation=dilation, policy=policy,
      name=name,
      tile_bytes=_tile_bytes(eqns, scale, width, layout, smalls_bytes),
      extra_macs_percent=100 * extra)


def plan_chain(jaxpr, members: Sequence[int], policy: decide_lib.Policy, name: str,
               tile: Optional[Sequence[int]] = None, inside=frozenset(), uses=None,
               reductions: Sequence[int] = ()) -> Optional[Chain]:
  """`plan_region` for a region of stages (`Chain`): the last stage's output tile halved until
  every stage's tile fits `policy.max_bytes` (or `tile`, whatever it costs). `reductions`: the
  equations of its `Reductions` (a region of one stage only)."""
  stages = stages_of(jaxpr, members)
  if len(stages) == 1:
    uses = _uses(jaxpr) if uses is None else uses
    p = plan_region(jaxpr, members, policy, name, tile, inside, uses, reductions)
    if p is None:
      return None
    chain = Chain((p,), name, policy)
    return _with_reductions(jaxpr, chain, members, reductions, uses) if reductions else chain
  if reductions:
    return None
  if not all(any(_compat.is_conv(jaxpr.eqns[i]) for i in st) for st in stages):
    return None
  forced = tile is not None
  if tile is None:
    out = jaxpr.eqns[stages[-1][-1]].outvars[0]
    layout = _conv_layout(next(jaxpr.eqns[i] for i in stages[-1]
                               if _compat.is_conv(jaxpr.eqns[i])))[1]
    tile = [out.aval.shape[a] for a in layout.spatial]
  tile = list(tile)
  while True:
    plans, t = [None] * len(stages), tile
    for k in reversed(range(len(stages))):
      plans[k] = plan_region(jaxpr, stages[k], policy, name, tile=t, inside=inside, uses=uses)
      if plans[k] is None:
        return None
      t = plans[k].width[plans[k].inputs[0]]
    chain = Chain(tuple(plans), name, policy)
    if forced or chain.tile_bytes <= policy.max_bytes:
      break
    # Squares, not strips (`_next_halved`): each stage adds its halo to the windows of the
    # stages before it, and thin strips pay for that on every tile (the UNet decoder of
    # examples/flax_unet.py at 2048x2048: +60% multiply-adds as 16-row strips, +16% as squares).
    d = max(range(len(tile)), key=lambda d: tile[d])
    if tile[d] == 1:
      return None
    tile[d] = _ceil_div(tile[d], 2)
  if not forced and (chain.n_tiles == 1 or chain.extra_macs_percent > 100 * MAX_EXTRA_MACS):
    return None
  return chain


def _partition(starts: np.ndarray, width: int, extent: int) -> Optional[tuple]:
  """The positions [0, extent) of a value dealt out among the tiles along one dim, whose windows
  are [starts[i], starts[i] + width): tile i owns [b[i], b[i + 1]) with b[0] = 0, b[n] = extent
  and b[i] = starts[i] clipped into [0, extent) between. Each is inside its tile's window where
  the first window starts at or before 0, the last ends at or after the extent, and each
  starts at or before the one before ends (windows that touch or overlap, starts in order).
  Returned per tile as the owned range's ends within its window; None where windows leave a
  gap."""
  if (starts[0] > 0 or starts[-1] + width < extent or np.any(np.diff(starts) < 0)
      or np.any(starts[1:] > starts[:-1] + width)):
    return None
  b = np.concatenate([[0], np.clip(starts[1:], 0, extent), [extent]])
  return b[:-1] - starts, b[1:] - starts


def _with_reductions(jaxpr, chain: Chain, members: Sequence[int], indices: Sequence[int], uses
                     ) -> Optional[Chain]:
  """`chain` (one stage) with the equations `indices` as its `Reductions`; None where a reduced
  value's windows leave a gap (`_partition`) or the recomputation costs more than
  `MAX_EXTRA_MACS`."""
  (p,) = chain.stages
  eqns = tuple(jaxpr.eqns[i] for i in sorted(indices))
  offsets = [_offsets(n, t) for n, t in zip(p.extent[p.output], p.tile)]
  bounds = {}
  for v in _summed(eqns):  # each with a window (`_windows` planned them)
    bounds[v] = [_partition(o * sc + sh, w, n) for o, sc, sh, w, n
                 in zip(offsets, p.scale[v], p.shift[v], p.width[v], p.extent[v])]
    if None in bounds[v]:
      return None
  inside = set(members) | set(indices)
  outputs = tuple(e.outvars[0] for e in eqns
                  if _compat.is_conv(e) or e.primitive.name in _REDUCTIONS)
  tile_macs = sum(
      _macs(e) * math.prod(p.width[e.invars[1]]) // math.prod(p.extent[e.invars[1]])
      for e in eqns if _compat.is_conv(e))
  chain = dataclasses.replace(chain, reductions=Reductions(
      eqns, outputs, bounds, written=any(u not in inside for u in uses.get(p.output, [])),
      tile_macs=tile_macs))
  return None if chain.extra_macs_percent > 100 * MAX_EXTRA_MACS else chain


def _terminal(jaxpr, run: Sequence[int], groups, uses) -> list:
  """The groups (`find_regions`) that are reductions of the run `run` (`Reductions`): each
  reads values the run makes or reads (a reduction conv) or one value it makes (a group of
  reductions), and nothing in the run depends on its results."""
  made = [jaxpr.eqns[i].outvars[0] for i in run]
  read = {v for i in run for v in jaxpr.eqns[i].invars if not isinstance(v, _compat.Literal)}
  inside = set(run).union(*groups)
  read_inside = lambda v: all(u in inside for u in uses.get(v, []))
  return [g for g in groups if _group_reads(jaxpr, g) & set(made)
          and _joins(jaxpr, g, made, read, read_inside) and not _feeds(jaxpr, g, run)]


def _feeds(jaxpr, group: Sequence[int], run: Sequence[int]) -> bool:
  """Whether an equation of `run` depends on a result of `group` (a norm's statistics)."""
  reached = {v for j in group for v in jaxpr.eqns[j].outvars}
  members = set(run)
  for i in range(min(group) + 1, max(run) + 1):
    e = jaxpr.eqns[i]
    if any(not isinstance(v, _compat.Literal) and v in reached for v in e.invars):
      if i in members:
        return True
      reached.update(e.outvars)
  return False


def _with_statistics(jaxpr, chain: Chain, members: Sequence[int], groups, policy, uses
                     ) -> Optional[Chain]:
  """`chain` with the statistics groups whose source it makes inside, each planned as a
  `Statistics` over the tiles of its source; None where a source does not plan or the
  recomputation (halos and statistics passes) costs more than `MAX_EXTRA_MACS`, plus one
  evaluation of the conv per pass in a region of one conv."""
  made = {jaxpr.eqns[i].outvars[0]: i for i in members}
  del made[chain.output]
  by_source: dict = {}
  for g in groups:
    source = _group_source(jaxpr, g, made)
    if source is not None:
      by_source.setdefault(source, []).extend(g)
  if not by_source:
    return chain
  everything = frozenset(members) | frozenset(j for g in groups for j in g)
  statistics = []
  for n, (source, group) in enumerate(by_source.items()):
    # The equations the source depends on, walked back through the region.
    need, ancestors = {source}, []
    for i in reversed([i for i in members if i <= made[source]]):
      e = jaxpr.eqns[i]
      if e.outvars[0] in need:
        ancestors.insert(0, i)
        need.update(v for v in e.invars if not isinstance(v, _compat.Literal))
    if not any(_compat.is_conv(jaxpr.eqns[i]) for i in ancestors):
      return None
    name = f"{chain.name}/statistics{n}"
    plan = plan_chain(jaxpr, ancestors, policy, name, inside=everything, uses=uses)
    if plan is None:  # it may fit whole: one tile
      extent = [source.aval.shape[a] for a in chain.layout.spatial]
      plan = plan_chain(jaxpr, ancestors, policy, name, tile=extent, inside=everything,
                        uses=uses)
      if plan is None or plan.tile_bytes > policy.max_bytes:
        return None
    eqns = tuple(jaxpr.eqns[j] for j in sorted(group))
    outputs = tuple(e.outvars[0] for e in eqns if e.primitive.name in _REDUCTIONS)
    statistics.append(Statistics(plan, source, eqns, outputs, name))
  chain = dataclasses.replace(chain, statistics=_merge_centred(jaxpr, statistics))
  # A region of one conv may also compute it once more per pass: its pass's recomputation is
  # that conv again, and the alternative, its own loop, leaves its output whole beside the
  # normalized values (XLA does not normalize a loop's output in place: its heap simulator
  # shares no buffer that holds aliased values, as a loop's carry does, with a user). A ResNet
  # stem in training mode held twice the untiled program's temporaries that way.
  limit = MAX_EXTRA_MACS + (len(chain.statistics) if len(chain.all_convs) == 1 else 0)
  return None if chain.extra_macs_percent > 100 * limit else chain


def _merge_centred(jaxpr, statistics: list) -> tuple:
  """`statistics` with each centred second pass (`_centred`) taken into the pass its mean
  comes from: one pass over the source's tiles instead of two."""
  merged = {id(s): s for s in statistics}
  for second in statistics:
    for first in statistics:
      found = None if first is second or id(first) not in merged else _centred(
          jaxpr, merged[id(first)], second)
      if found is not None:
        total, mean_eqns = found
        into = merged[id(first)]
        base, seconds = into.two_pass or (into, ())
        merged[id(first)] = dataclasses.replace(
            into, centred=(*into.centred, (total, second.outputs[0])),
            two_pass=(base, (*seconds, (mean_eqns, second))))
        del merged[id(second)]
        break
  return tuple(merged[id(s)] for s in statistics if id(s) in merged)


_SQUARES = ("square", "integer_pow", "mul")


def _centred(jaxpr, first: Statistics, second: Statistics) -> Optional[tuple]:
  """Whether `second` sums the squares of its source `first.value - mean` (or `mean - ...`),
  where `mean` is a sum of `first` over the same axes (and the same split of the features)
  divided by the number of elements it sums, broadcast back: `jnp.var`'s centred pass. Then
  the equation making that sum and the equations making `mean` from its result.

  `first`'s pass computes it too, by Chan, Golub and LeVeque's pairwise update: each tile's
  count n_t, mean m_t and centred sum of squares M_t, combined into the running (n, m, M) as
  M += M_t + (m_t - m)^2 n n_t / (n + n_t), m += (m_t - m) n_t / (n + n_t). That is exact in
  real arithmetic and as stable as two passes in floating point (it never subtracts two large
  sums), so the result differs from the program's two passes by rounding, as any order of a
  sum does."""
  layout = first.source.layout
  sub, x = second.source.eqns[-1], first.value
  if sub.primitive.name != "sub" or sub.outvars[0] is not second.value or x not in sub.invars:
    return None
  mean = sub.invars[1] if sub.invars[0] is x else sub.invars[0]
  if isinstance(mean, _compat.Literal) or not _is_small(mean.aval, layout, x.aval.ndim):
    return None
  # The square of `second.value`, split into groups before or after it, then summed.
  eqns = list(second.eqns)
  split = next((e for e in eqns if e.primitive.name == "reshape"), None)
  if split is not None:
    eqns.remove(split)
  if len(eqns) != 2 or eqns[1].primitive.name != "reduce_sum":
    return None
  square, total = eqns
  if split is None:
    f, chain = second.value, [square, total]
  elif split.invars[0] is second.value:
    f, chain = split.outvars[0], [split, square, total]
  else:
    f, chain = second.value, [square, split, total]
  if square.invars[0] is not f or not (
      square.primitive.name == "square"
      or square.primitive.name == "integer_pow" and square.params.get("y") == 2
      or square.primitive.name == "mul" and square.invars[1] is f) or any(
      b.invars[0] is not a.outvars[0] for a, b in zip(chain, chain[1:])):
    return None
  axes = tuple(total.params["axes"])
  making = {e.outvars[0]: e for e in first.eqns}
  for out in first.outputs:
    r = making[out]
    if r.primitive.name != "reduce_sum" or tuple(r.params["axes"]) != axes:
      continue
    operand = r.invars[0]
    if split is None:
      if operand is not x:
        continue
    elif operand not in making or making[operand].primitive.name != "reshape" or (
        making[operand].invars[0] is not x
        or tuple(making[operand].params["new_sizes"]) != tuple(split.params["new_sizes"])):
      continue
    chain = _mean_chain(jaxpr, mean, out, x.aval.shape, operand.aval.shape, axes, layout,
                        split is not None)
    if chain is not None:
      return r, chain
  return None


def _mean_chain(jaxpr, mean, total, x_shape, shape, axes, layout: Layout, split: bool
                ) -> Optional[tuple]:
  """The equations making `mean` from `total`, a sum over `axes` of a value of `shape` (the
  value of `x_shape`, its features split in two where `split`), if they divide it by the
  number of elements summed and only broadcast and reshape it back, each position of `mean`
  holding the sum of its own group; else None. Checked on indices in NumPy: the chain run on
  the sum's flat indices (the division left out) must give, at every position of the unsplit
  value with extent 1 along the spatial dims, the index of the sum that position belongs to."""
  making = {e.outvars[0]: e for e in jaxpr.eqns}
  chain, v = [], mean
  while v is not total:
    e = making.get(v)
    if e is None or len([u for u in e.invars if not isinstance(u, _compat.Literal)]) != 1:
      return None
    chain.insert(0, e)
    v = e.invars[0]
  count = math.prod(shape[a] for a in axes)
  divides = [e for e in chain if e.primitive.name == "div"]
  if len(divides) != 1 or not isinstance(divides[0].invars[1], _compat.Literal) or float(
      np.asarray(divides[0].invars[1].val)) != count:
    return None
  index = np.arange(math.prod(total.aval.shape), dtype=np.int64).reshape(total.aval.shape)
  got = index
  for e in chain:
    if e.primitive.name == "broadcast_in_dim":
      dims = tuple(e.params["broadcast_dimensions"])
      if list(dims) != sorted(dims):
        return None
      out = tuple(e.params["shape"])
      got = np.broadcast_to(got.reshape([got.shape[dims.index(a)] if a in dims else 1
                                         for a in range(len(out))]), out)
    elif e.primitive.name == "reshape" and e.params.get("dimensions") is None:
      got = got.reshape(e.params["new_sizes"])
    elif e.primitive.name not in ("div", "convert_element_type"):
      return None
  # Where each position of the summed value lands: the sum's index, at spatial extent 1.
  spatial = {a + (split and a > layout.feature) for a in layout.spatial}
  small = [1 if a in spatial else n for a, n in enumerate(shape)]
  want = np.broadcast_to(np.expand_dims(index, axes), small).reshape(
      [1 if a in layout.spatial else n for a, n in enumerate(x_shape)])
  try:
    return tuple(chain) if np.array_equal(np.broadcast_to(got, want.shape), want) else None
  except ValueError:  # `mean` does not broadcast to the value
    return None


def _next_halved(tile: Sequence[int], halo: int) -> Optional[int]:
  """The dim to halve next. Strips first: XLA:CPU runs a conv on rows of the full width faster
  than on a square of the same area (`docs/benchmarks.md`, "Regions"), so the outer dims are
  halved while their tiles stay at least twice the halo; then the largest dim. None: all 1."""
  outer = [i for i in range(len(tile) - 1) if tile[i] >= 2 * max(halo, 1) and tile[i] > 1]
  d = outer[0] if outer else max(range(len(tile)), key=lambda d: tile[d])
  return None if tile[d] == 1 else d


def split_region(jaxpr, members: Sequence[int], policy: decide_lib.Policy, first_index: int,
                 groups: Sequence[Sequence[int]] = ()) -> list[Chain]:
  """Regions covering as much of the chain as can be tiled within the halo cost, greedily: from
  each conv, the longest run of its equations that plans. They are named `jaxtile/region<i>`
  from `first_index` on. A statistics group (`find_regions`) whose source a region makes inside
  joins it (`_with_statistics`); the others are left to run on their full-size source.

  A run may end after any equation from its last conv on (a residual block ends at its add,
  before the next block's norm), and one that does not plan does not stop the search: a
  residual crossing a cut plans again once the run takes in its add. `_MISSES` runs in a
  row that do not plan end it.
  """
  conv_at = [i for i, m in enumerate(members) if _compat.is_conv(jaxpr.eqns[m])]
  grouped = frozenset(j for g in groups for j in g)
  uses = _uses(jaxpr)
  reduced = {v for g in groups for j in g for v in jaxpr.eqns[j].invars
             if not isinstance(v, _compat.Literal)}
  regions, start, last_stop = [], 0, 0
  while start < len(conv_at):
    # A leading concatenation or norm stays in: from the end of the region before, or of the
    # conv before; but a value a norm reduces is made before it (a bias add after that conv),
    # since a statistics pass needs a conv to tile.
    begin = max(last_stop, conv_at[start - 1] + 1 if start else 0)
    while begin < conv_at[start] and jaxpr.eqns[members[begin]].outvars[0] in reduced:
      begin += 1
    name = f"jaxtile/region{first_index + len(regions)}"
    best, misses = None, 0
    ends = list(range(start, len(conv_at)))
    if _terminal(jaxpr, members[begin:], groups, uses):
      # A gradient's region: its prefixes miss until its backward convs are all in (a
      # weight gradient reads a forward value and a cotangent), so the whole run goes first.
      ends.insert(0, ends[-1])
    for end in ends:
      if best is not None and end <= best[0]:
        break  # the whole run planned
      last = conv_at[end + 1] if end + 1 < len(conv_at) else len(members)
      plan = None
      for stop in range(last, conv_at[end], -1):
        run = members[begin:stop]
        if end == start and not _reshapes_conv(jaxpr, run):
          continue  # a conv alone, or with elementwise ops: its own loop (`lower`)
        terminal = _terminal(jaxpr, run, groups, uses)
        internal = {jaxpr.eqns[i].outvars[0] for i in run[:-1]}
        if any(_compat.is_conv(jaxpr.eqns[g[0]]) and _group_reads(jaxpr, g) & internal
               for g in groups if g not in terminal):
          continue  # a weight gradient would read a value this run keeps inside
        statistics = [g for g in groups if g not in terminal]
        only = _for_statistics(jaxpr, run, statistics, uses)
        plan = plan_chain(jaxpr, [i for i in run if i not in only], policy, name,
                          inside=grouped | only, uses=uses,
                          reductions=sorted(j for g in terminal for j in g))
        if plan is not None:
          plan = _with_statistics(jaxpr, plan, run, statistics, policy, uses)
        if plan is not None:
          break
      if plan is None:
        misses += end > start  # a conv's own run missing counts for none
        if misses == _MISSES:
          break
        continue
      best, misses = (end, stop, plan), 0
    if best is None:
      plan = _with_larger_tiles(jaxpr, members[begin:], groups, policy, name, uses, grouped)
      best = None if plan is None else (len(conv_at) - 1, len(members), plan)
    if best is None:
      start += 1
      continue
    regions.append(best[2])
    start, last_stop = best[0] + 1, best[1]
  return regions


# How far past `max_bytes` the tiles of a region that cannot be cut may go (`_with_larger_tiles`).
MAX_BUDGET_FACTOR = 8


def _with_larger_tiles(jaxpr, run, groups, policy, name, uses, grouped) -> Optional[Chain]:
  """A differentiated program's region (`run`, adding up its weight gradients) planned with
  tiles above `policy.max_bytes`, the budget doubled up to `MAX_BUDGET_FACTOR` times, where it
  plans at none within the budget; None for any other run, with `policy.strict`, or where none
  plans.

  Such a region has no cut: its backward convs read every forward value, so a cut would keep
  them all at full size. Within the budget its tiles recompute the doubled halo of the forward
  and backward passes past `MAX_EXTRA_MACS`. Without it, each conv is tiled on its own and
  every activation is whole (the 8-layer chain's gradient at 1 MiB: 483 MiB of temporaries,
  against 17 in tiles of 3.3 MiB, and 544 untiled). A warning names the tiles' bytes."""
  if policy.strict:
    return None
  terminal = _terminal(jaxpr, run, groups, uses)
  if not any(_compat.is_conv(jaxpr.eqns[g[0]]) for g in terminal) or len(terminal) != len(
      [g for g in groups if min(g) > run[0]]):
    return None  # no weight gradient, or statistics the region would have to compute
  budget = policy.max_bytes
  while budget < MAX_BUDGET_FACTOR * policy.max_bytes:
    budget *= 2
    larger = dataclasses.replace(policy, max_bytes=budget)
    plan = plan_chain(jaxpr, run, larger, name, inside=grouped, uses=uses,
                      reductions=sorted(j for g in terminal for j in g))
    if plan is not None:
      logging.warning(
          "jaxtile: %s, a differentiated program's forward and backward convs, takes tiles of "
          "%d bytes, above max_bytes=%d: smaller tiles would recompute more than %d%% extra "
          "multiply-adds, and tiling each conv on its own keeps every activation whole. Raise "
          "max_bytes to %d, or tile the function before differentiating it "
          "(jax.grad(tile_convs(f))), whose tiles stay within the budget.", name,
          plan.tile_bytes, policy.max_bytes, round(100 * MAX_EXTRA_MACS), budget)
      return plan
  return None


def _for_statistics(jaxpr, run: Sequence[int], groups, uses) -> frozenset:
  """The equations of `run` that only statistics `groups` read, directly or through others of
  them (a two-pass variance's `(x - mean) ** 2`, whose mean is small and read whole): their
  statistics passes compute them (`_with_statistics`), and the region's loop does not."""
  # Only groups a pass can compute: those reading one value (`_group_source`).
  grouped = {j for g in groups if len(_group_reads(jaxpr, g)) == 1 for j in g}
  only: set = set()
  for i in reversed(run[:-1]):
    readers = uses.get(jaxpr.eqns[i].outvars[0], [])
    if readers and all(r in grouped or r in only for r in readers):
      only.add(i)
  return frozenset(only)


# Longer runs that do not plan before `split_region` stops extending one: a residual block's
# inner convs, before its add.
_MISSES = 3


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class _PerTile(np.lib.mixins.NDArrayOperatorsMixin):
  """An integer that varies with the loop's tile along one spatial dim: its value at every tile
  index along that dim (NumPy) and the traced index of the tile the loop is at (`at`).

  A tile's offsets, window starts and clamps are affine maps, ceiling divisions and clips of its
  index. On `_PerTile`s, arithmetic is NumPy's, done at trace time for all the tiles along the dim
  at once; where a lax op reads the value, the loop body looks up the current tile's in a
  constant table (`_traced`). Computed by traced ops instead, each was a chain of scalar integer
  ops that XLA repeats inside every fused kernel reading it (1000 of the 1600 ops in the UNet
  forward's kernels), compiled into each one.
  """
  __slots__ = ("values", "at")

  def __init__(self, values, at):
    self.values, self.at = np.asarray(values), at

  def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
    if method != "__call__" or kwargs:
      return NotImplemented
    args = []
    for x in inputs:
      if isinstance(x, _PerTile):
        assert x.at is self.at, "values of different dims"
        args.append(x.values)
      elif isinstance(x, (int, np.integer)):
        args.append(x)
      else:
        return NotImplemented
    return _PerTile(ufunc(*args), self.at)


def _traced(x):
  """`x` where a lax op reads it: a `_PerTile`'s value at the loop's tile (a static int where
  every tile has the same), anything else as it is."""
  if not isinstance(x, _PerTile):
    return x
  values = x.values
  if (values == values[0]).all():
    return int(values[0])
  # In JAX's default integer type (int64 under `jax_enable_x64`), the type Python ints become
  # in index arithmetic: one type for every index of a `dynamic_slice`.
  table = values.astype(jax.dtypes.canonicalize_dtype(np.int64))
  return lax.reshape(lax.dynamic_slice(table, [x.at], [1], allow_negative_indices=False), ())


def _clip(x, low, high):
  """`x` clipped into [low, high]: ints, `_PerTile`s or traced."""
  if isinstance(x, (int, np.integer)):
    return int(min(max(x, low), high))
  if isinstance(x, _PerTile):
    return np.minimum(np.maximum(x, low), high)
  return jnp.clip(x, low, high)


def _slice(x, begin, size):
  """`lax.dynamic_slice` at a `begin` that may hold `_PerTile`s. A region's windows and tiles
  lie inside what they are cut from, so no index is negative: none is wrapped."""
  return lax.dynamic_slice(x, [_traced(b) for b in begin], size, allow_negative_indices=False)


def _update(x, update, begin):
  """`lax.dynamic_update_slice` at a `begin` that may hold `_PerTile`s, none negative."""
  return lax.dynamic_update_slice(x, update, [_traced(b) for b in begin],
                                  allow_negative_indices=False)


def _piece_box(x_shape, starts, widths, layout: Layout):
  """Where the in-bounds part of a window lies: per axis the start of the slice of `x` that
  covers `[start, start + width)` (clamped into `x`; `_PerTile`s in a loop) and its size
  (static)."""
  begin, size = [0] * len(x_shape), list(x_shape)
  for d, a in enumerate(layout.spatial):
    size[a] = min(widths[d], x_shape[a])
    begin[a] = _clip(starts[d], 0, x_shape[a] - size[a])
  return begin, size


def _window_of(piece, begin, starts, widths, layout: Layout, low_pad, high_pad):
  """The window `[start, start + width)` per spatial dim from the `piece` of `x` at `begin`
  (`_piece_box`), zeros outside `x`; `low_pad`/`high_pad` bound how far any window reaches
  outside `x` (static). Linear in `piece`: its transpose gives a window's cotangent back as the
  piece's, added into `x`'s at `begin` (`emit_transpose`)."""
  config = [(0, 0, 0)] * piece.ndim
  for d, a in enumerate(layout.spatial):
    config[a] = (low_pad[d], high_pad[d] + widths[d] - piece.shape[a], 0)
  padded = lax.pad(piece, jnp.zeros((), piece.dtype), config)
  at, out_size = [0] * piece.ndim, list(piece.shape)
  for d, a in enumerate(layout.spatial):
    at[a] = starts[d] - begin[a] + low_pad[d]
    out_size[a] = widths[d]
  return _slice(padded, at, out_size)


def _zeros_after(shape, dtype, *after):
  """Zeros, a loop's initial carry, that XLA makes only once every array of `after` exists
  (`lower.zero_after`); None where none of them is floating.

  A broadcast constant has no operands, and XLA:CPU's scheduler makes it at program start: a
  region's backward accumulators were then alive across the whole forward (266 MiB more in the
  UNet gradient at 2048). Peeling the first tile out of the loop (`_Loop.run`) avoids that, at
  the cost of compiling the loop body twice. Instead the carry is made only when the last
  operand exists, just before the loop. A forward loop's carry must wait for all of them: one
  made after its input alone was alive across the statistics passes that run between (the VAE
  decoder's forward held 896 MiB with such a carry, 768 peeled). A backward loop's waits for
  the cotangent.
  """
  zero = lower_lib.zero_after(*after, dtype=dtype)
  return None if zero is None else jnp.broadcast_to(zero, shape)


def _fill(value, dtype):
  """`value` (0, or +-inf for a max or min) as a scalar of `dtype`: integer extremes for ints."""
  if np.isinf(value) and not jnp.issubdtype(dtype, jnp.floating):
    info = jnp.iinfo(dtype)
    value = info.min if value < 0 else info.max
  return jnp.asarray(value, dtype)


def _keep(x, bounds: dict, fill=0):
  """`x` where its position along each axis of `bounds` (axis -> (low, high): ints, `_PerTile`s
  or traced; high None for none) lies in [low, high), else `fill` (`_fill`). In lax ops: `jnp`'s
  comparisons and `where` are `jit` calls, which every derivative of a tile traces and partially
  evaluates once more (a third of the UNet gradient's trace went there)."""
  valid = None
  for a, (low, high) in bounds.items():
    low, high = _traced(low), _traced(high)
    if all(b is None or isinstance(b, (int, np.integer)) for b in (low, high)):
      # The same for every tile: a constant, not an `iota` compare that XLA hoists out of the
      # loop into a kernel of its own (one LLVM module each on CPU).
      pos = np.arange(x.shape[a])
      keep = (pos >= (pos[0] if low is None else low)) & (pos < (pos[-1] + 1 if high is None
                                                                 else high))
      if keep.all():
        continue
      ok = lax.broadcast_in_dim(keep, x.shape, (a,))
      valid = ok if valid is None else lax.bitwise_and(valid, ok)
      continue
    pos = lax.broadcasted_iota(np.int32, x.shape, a)
    for bound, compare in ((low, lax.ge), (high, lax.lt)):
      if bound is not None:
        bound = lax.broadcast(lax.convert_element_type(bound, np.int32), x.shape)
        ok = compare(pos, bound)
        valid = ok if valid is None else lax.bitwise_and(valid, ok)
  return x if valid is None else lax.select(valid, x, lax.full_like(x, _fill(fill, x.dtype)))


def _mask_outside(v, starts, extent, layout: Layout, fill=0):
  """`v` (a window at `starts`) with positions outside `[0, extent)` set to `fill` (the padding
  value of the op reading it: zero for a conv, the identity of a pool's reduction)."""
  return _keep(v, {a: (-starts[d], extent[d] - starts[d]) for d, a in enumerate(layout.spatial)},
               fill)


def _eval_elementwise(eqn, args):
  """An elementwise equation (`ELEMENTWISE`, or a call `_elementwise_body` accepts) on windows:
  its primitives bound again on the windows' shapes, a call's broadcasts to its full shape
  made broadcasts to the window's."""
  if eqn.primitive.name == "custom_jvp_call":
    return _custom_elementwise(eqn, args)
  body = _elementwise_body(eqn)
  if body is None:
    return eqn.primitive.bind(*args, **eqn.params)
  reshape = (tuple(eqn.outvars[0].aval.shape), np.broadcast_shapes(*map(np.shape, args)))
  (out,) = _eval_eqns(getattr(body, "jaxpr", body), getattr(body, "consts", ()), args, reshape)
  return out


def _custom_elementwise(eqn, args):
  """A custom_jvp call on windows, again a custom_jvp: its body for the value, its own JVP rule
  for derivatives, both evaluated on the windows' shapes."""
  body = _elementwise_body(eqn, rule=False)
  rule, rule_consts = _jvp_rule(eqn)
  full = tuple(eqn.outvars[0].aval.shape)

  @jax.custom_jvp
  def call(*xs):
    window = np.broadcast_shapes(*map(np.shape, xs))
    return _eval_eqns(body.jaxpr, body.consts, xs, (full, window))[0]

  @call.defjvp
  def _(primals, tangents):
    window = np.broadcast_shapes(*map(np.shape, primals))
    out, tangent = _eval_eqns(rule, rule_consts, [*primals, *tangents], (full, window))
    return out, tangent

  return call(*args)


def _eval_eqns(jaxpr, consts, args, reshape=None):
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
  for e in jaxpr.eqns:
    ins = [read(v) for v in e.invars]
    if reshape is not None and e.primitive.name == "broadcast_in_dim":
      assert tuple(e.params["shape"]) == reshape[0], e  # `_broadcast_to`
      out = lax.broadcast_in_dim(ins[0], reshape[1], e.params["broadcast_dimensions"])
    else:
      out = _eval_elementwise(e, ins)
    env[e.outvars[0]] = out
  return [read(v) for v in jaxpr.outvars]


def _transposed(e, window, rhs, o, plan: RegionPlan, fast):
  """A transposed conv or an upsampling on its input window (inputs i0 on, `_windows`).

  Along a dim of dilation d, the tile needs dilated positions p0 on. A transposed conv dilates
  the window explicitly, input i0 landing at index d - 1, so p0 lands at p0 + d - 1 - i0 * d; it
  slices from there and runs an ordinary conv. An upsampling repeats each input d times, input i0
  at indices 0 to d - 1, so the tile's first output position, p0 + d - 1 (the kernel of d ones
  ends there), lands at the same index; it slices the tile from there."""
  layout, k = plan.layout, len(plan.tile)
  lhs, out = e.invars[0], e.outvars[0]
  d = plan.dilation[lhs]
  conv = _compat.is_conv(e)
  if conv:
    config = [(0, 0, 0)] * window.ndim
    for i, a in enumerate(layout.spatial):
      config[a] = (d[i] - 1, 0, d[i] - 1)
    dilated = lax.pad(window, jnp.zeros((), window.dtype), config)
    _, _, size = _window_through(_window_op(e, layout), plan.scale[out], plan.shift[out],
                                 plan.width[out])
  else:
    dilated = upsample.repeat(window, upsample.factors_of(e))
    size = plan.width[out]
  begin, sizes = [0] * window.ndim, list(dilated.shape)
  for i, a in enumerate(layout.spatial):
    p0 = o[i] * plan.scale[lhs][i] + plan.shift[lhs][i]  # first dilated position needed
    begin[a] = p0 + d[i] - 1 - _ceil_div(p0, d[i]) * d[i]
    sizes[a] = size[i]
  piece = _slice(dilated, begin, sizes)
  if not conv:
    return piece
  params = dict(e.params, padding=((0, 0),) * k, lhs_dilation=(1,) * k)
  return forms.conv(piece, rhs, params, fast)


def compute_tile(plan: RegionPlan, o, windows, smalls, fast: bool, outside=None, keep=None):
  """The output tile at offsets `o` (per spatial dim: ints, `_PerTile`s or traced) from the
  windows of the region's inputs (`plan.start(v, o)` on, `plan.width[v]` wide, zeros outside the
  inputs) and its small operands: the "process" step of a region's loop, and of `stream`'s tile
  program.

  `outside(v, shift, width)` says whether a window of `v` may reach outside `v`'s extent for any
  tile (static); windows that never do are not masked. None: any may. `keep`, a dict, gets
  every value's window.
  """
  layout, k = plan.layout, len(plan.tile)
  full = set(plan.width)
  env = dict(zip(plan.inputs, windows))
  env.update(zip(plan.smalls, smalls))

  def operand(e, v):
    """`v` as `e` reads it: its window cut to what `e` needs, zeros outside the image for a
    conv (its padding)."""
    val = env[v]
    shift, width = _required(e, v, plan.scale, plan.shift, plan.width, layout)
    if (shift, width) != (plan.shift[v], plan.width[v]):
      begin = [0] * val.ndim
      end = list(val.shape)
      for d, a in enumerate(layout.spatial):
        begin[a] = shift[d] - plan.shift[v][d]
        end[a] = begin[a] + width[d]
      val = lax.slice(val, begin, end)
    padded_by = (0 if _compat.is_conv(e) or _shift_window(e, layout) is not None
                 else _POOLS[e.primitive.name] if _is_pool(e) and _reads_neighbours(e, layout)
                 else None)
    if (padded_by is not None and (v not in plan.inputs or padded_by != 0)
        and (outside is None or outside(v, shift, width))):
      starts = [o[d] * plan.scale[v][d] + shift[d] for d in range(k)]
      val = _mask_outside(val, starts, plan.extent[v], layout, padded_by)
    return val

  for e in plan.eqns:
    if _is_transposed(e) and e.invars[0] in plan.dilation:
      lhs = e.invars[0]
      window = env[lhs]
      if lhs not in plan.inputs:  # made by elementwise ops from the inputs: zeros outside
        window = _mask_outside(window, plan.start(lhs, o), plan.extent[lhs], layout)
      rhs = env[e.invars[1]] if _compat.is_conv(e) else None
      env[e.outvars[0]] = _transposed(e, window, rhs, o, plan, fast)
      continue
    args = [v.val if isinstance(v, _compat.Literal) else
            operand(e, v) if v in full else env[v] for v in e.invars]
    if _compat.is_conv(e):
      params = dict(e.params, padding=((0, 0),) * k)
      env[e.outvars[0]] = forms.conv(args[0], args[1], params, fast)
    elif _is_pool(e):
      params = dict(e.params, padding=((0, 0),) * len(e.params["padding"]))
      env[e.outvars[0]] = e.primitive.bind(*args, **params)
    elif _shift_window(e, layout) is not None:
      env[e.outvars[0]] = args[0]  # its operand's window, read for its output's (`_required`)
    elif _small_broadcast(e, layout):
      shape = list(e.params["shape"])
      for d, a in enumerate(layout.spatial):
        shape[a] = plan.width[e.outvars[0]][d]
      env[e.outvars[0]] = lax.broadcast_in_dim(args[0], shape, e.params["broadcast_dimensions"])
    else:
      env[e.outvars[0]] = _eval_elementwise(e, args)
  if keep is not None:
    keep.update(env)
  return env[plan.output]


class _Loop:
  """A chain's loop over output tiles, static throughout: per tile (a flat index, traced) the
  offsets of every stage, the pieces of the full-size inputs its windows cover, and the output
  tile computed from them. The forward loop (`emit`), its tangent (`emit_jvp`) and its transpose
  (`emit_transpose`) all run these same tiles."""

  def __init__(self, chain: Chain):
    self.chain = chain
    last, k = chain.stages[-1], len(chain.tile)
    self.extent = last.extent[last.output]
    # Every tile's offsets, per stage and dim (offsets along one dim do not depend on the others').
    offsets = chain.offsets([_offsets(n, t) for n, t in zip(self.extent, last.tile)])
    self.counts = [len(o) for o in offsets[-1]]
    self.n = math.prod(self.counts)
    self.fast = forms.for_backend()

    def reach(p, at, v, shift, width):
      """How far, over all tiles, a window of v reaches below 0 and beyond v's extent."""
      lo, hi = [], []
      starts = p.start(v, at, shift)
      for d in range(k):
        lo.append(max(0, -int(np.min(starts[d]))))
        hi.append(max(0, int(np.max(starts[d])) + width[d] - p.extent[v][d]))
      return lo, hi

    self.reaches = [[reach(p, offsets[n], v, p.shift[v], p.width[v]) for v in chain.read_by(n)]
                    for n, p in enumerate(chain.stages)]
    self.outside = [functools.partial(lambda p, at, v, shift, width: any(sum(
        reach(p, at, v, shift, width), [])), p, offsets[n]) for n, p in enumerate(chain.stages)]

  def index(self, flat):
    """The tile's index per spatial dim: ints for an int `flat`, else `_PerTile`s."""
    if isinstance(flat, int):
      return [int(i) for i in np.unravel_index(flat, self.counts)]
    index, rest = [], lax.convert_element_type(flat, np.uint32)  # unsigned: no sign handling
    for n in reversed(self.counts):
      n_ = np.uint32(n)
      at = lax.convert_element_type(lax.rem(rest, n_), jax.dtypes.canonicalize_dtype(np.int64))
      index.append(_PerTile(np.arange(n), at))
      rest = lax.div(rest, n_)
    return index[::-1]

  def offsets(self, index) -> list:
    """Per stage, the tile's offsets per spatial dim: the last stage's as `_offsets` makes
    them, the others derived from it (`Chain.offsets`)."""
    return self.chain.offsets([np.minimum(i * t, n - t) if isinstance(i, _PerTile)
                               else min(i * t, n - t)
                               for i, n, t in zip(index, self.extent, self.chain.tile)])

  def per_device(self) -> int:
    """Tiles per device of the policy's mesh axis: ceil(tiles / devices)."""
    policy = self.chain.policy
    return _ceil_div(self.n, policy.mesh.shape[policy.mesh_axis])

  def boxes(self, o) -> list:
    """Per stage and value it reads, the box of the value its window covers (`_piece_box`)."""
    chain = self.chain
    return [[_piece_box(v.aval.shape, p.start(v, o[n]), p.width[v], chain.layout)
             for v in chain.read_by(n)] for n, p in enumerate(chain.stages)]

  def pieces(self, xs: dict, boxes) -> list:
    chain = self.chain
    return [[_slice(xs[v], *box) for v, box in zip(chain.read_by(n), boxes[n])]
            for n in range(len(chain.stages))]

  def tile(self, o, boxes, pieces, smalls: dict, keep=None):
    """The output tile at offsets `o` from the pieces of the inputs and the small operands
    (`keep`: as `Chain.compute`'s)."""
    chain = self.chain
    with jax.named_scope("select"):
      windows = [[_window_of(piece, begin, p.start(v, o[n]), p.width[v], chain.layout, lo, hi)
                  for v, piece, (begin, _), (lo, hi)
                  in zip(chain.read_by(n), pieces[n], boxes[n], self.reaches[n])]
                 for n, p in enumerate(chain.stages)]
    with jax.named_scope("process"):
      return chain.compute(o, windows, smalls, self.fast, self.outside, keep)

  def tile_and_parts(self, index, o, boxes, pieces, smalls: dict):
    """`tile`, and the tile's parts of the chain's reductions (`_reduction_parts`; none
    without)."""
    if self.chain.reductions is None:
      return self.tile(o, boxes, pieces, smalls), []
    windows = {}
    tile = self.tile(o, boxes, pieces, smalls, keep=windows)
    with jax.named_scope("reduce"):
      return tile, _reduction_parts(self.chain, self, index, o, windows)

  def out_box(self, o) -> tuple[list, list]:
    """Where the output tile at offsets `o` lies in the output: begin and size per axis."""
    out = self.chain.output
    begin, size = [0] * out.aval.ndim, list(out.aval.shape)
    for d, a in enumerate(self.chain.layout.spatial):
      begin[a] = o[-1][d]
      size[a] = self.chain.tile[d]
    return begin, size

  def owned(self, index, o, x, axes=None, fill=0):
    """`x` (an output tile, or its cotangent; its spatial axes `axes`, the layout's by default)
    set to `fill` where an earlier tile also wrote: the last tile along a dim is shifted back to
    end at the extent (`_offsets`), and each output position must count once (in a cotangent
    pulled back, in a sum over tiles)."""
    tile = self.chain.tile
    return _keep(x, {a: (index[d] * tile[d] - o[-1][d], None)  # from the tile's offset
                     for d, a in enumerate(self.chain.layout.spatial if axes is None else axes)
                     if self.extent[d] % tile[d]}, fill)

  def run(self, body, init, peel: bool = True):
    """`init` through `body(flat, carry)` for every tile: tile 0 peeled (as in `lower`), its
    write into the initial zeros fused, so that XLA makes them when the loop starts, not at
    program start; or, with `peel=False`, in one `fori_loop` whose `init` is small or made
    late some other way (`_zeros_after`)."""
    if not peel:
      return lax.fori_loop(0, self.n, body, init)
    carry = body(0, init)
    return carry if self.n == 1 else lax.fori_loop(1, self.n, body, carry)

  def run_into(self, body, out, operands, sums=()):
    """`run` from zeros of aval `out` made once every operand exists (`_zeros_after`), peeled
    only where no operand can order them; with `sums`, the carry is (output, sums). `out`
    None: the carry's output is None (`Chain.written`)."""
    if out is None:
      return self.run(body, (None, sums), peel=False)
    init = _zeros_after(out.shape, out.dtype, *operands)
    if init is None:
      return self.run(body, (jnp.zeros(out.shape, out.dtype), sums))
    return self.run(body, (init, sums), peel=False)


def emit(chain: Chain, *operands):
  """The region's output, and its reductions' results where it has some (`Chain.outvars`),
  computed tile by tile (`_emit_tiles`)."""
  loop = _Loop(chain)

  def tile_at(operands, index, o, boxes):
    xs, smalls = _split(chain, operands)
    return loop.tile_and_parts(index, o, boxes, loop.pieces(xs, boxes), smalls)

  return _results(chain, *_emit_tiles(loop, tile_at, operands, chain.name,
                                      _reductions_of(chain)))


def _results(chain: Chain, out, sums: list):
  """The output alone, or with reductions, what the chain makes (`Chain.outvars`)."""
  return out if chain.reductions is None else [out] * chain.written + sums


def _reductions_of(chain: Chain) -> list:
  """Each reduction result's `_REDUCTIONS` entry (a weight gradient's: a sum), with the dtype
  its parts add up in (float32 at least for sums)."""
  if chain.reductions is None:
    return []
  by_var = {e.outvars[0]: e.primitive.name for e in chain.reductions.eqns}
  out = []
  for v in chain.reductions.outputs:
    name = "reduce_sum" if by_var[v] not in _REDUCTIONS else by_var[v]
    out.append((*_REDUCTIONS[name],
                _accumulator_dtype(v.aval.dtype) if name == "reduce_sum" else v.aval.dtype))
  return out


def _emit_tiles(loop: _Loop, tile_at, operands, name: str, sums=()):
  """The output of `loop.chain` (or its tangent) and the results of its reductions, each tile
  `tile_at(operands, index, o, boxes)` (the tile and its parts of the reductions) at tile index
  `index` and offsets `o`: in one loop writing the tiles into the output and combining the parts
  as their `sums` entries (`_reductions_of`) say, or where the policy has a mesh, dealt out over
  the devices of its `mesh_axis`, as `distribute.lower` deals a conv's blocks: device d computes
  tiles [d * m, (d + 1) * m) for m = ceil(tiles / devices) from the replicated operands (the
  last devices recompute the final tile where the count is uneven; the copy is dropped) and
  returns them stacked, with its parts combined; the stack's first `tiles` entries are then
  written at their offsets, and the devices' parts combined across them."""
  chain, policy = loop.chain, loop.chain.policy
  out_aval = chain.output.aval
  written = chain.written
  init = [jnp.full(v.aval.shape, _fill(r[0], r[3]))
          for v, r in zip(() if chain.reductions is None else chain.reductions.outputs, sums)]

  def add(acc, parts, valid=None):
    new = [r[1](a, p.astype(a.dtype)) for r, a, p in zip(sums, acc, parts)]
    return new if valid is None else [lax.select(valid, n, a) for n, a in zip(new, acc)]

  def finish(out, acc):
    return out, [a.astype(v.aval.dtype) for v, a in zip(chain.reductions.outputs, acc)] if (
        sums) else []

  if policy.mesh is None:
    def body(i, carry):
      out, acc = carry
      index = loop.index(i)
      o = loop.offsets(index)
      tile, parts = tile_at(operands, index, o, loop.boxes(o))
      with jax.named_scope("reassemble"):
        if written:
          out = _update(out, tile, loop.out_box(o)[0])
        return out, add(acc, parts)

    with jax.named_scope(name):
      return finish(*loop.run_into(body, out_aval if written else None, operands, init))

  mesh, axis_name = policy.mesh, policy.mesh_axis
  m = loop.per_device()
  tile_shape = loop.out_box([[0] * len(chain.tile)])[1]

  def per_device(*ops):
    first = lax.axis_index(axis_name) * m

    def body(j, carry):
      stack, acc = carry
      index = loop.index(jnp.minimum(first + j, loop.n - 1))
      o = loop.offsets(index)
      tile, parts = tile_at(ops, index, o, loop.boxes(o))
      if written:
        stack = lax.dynamic_update_index_in_dim(stack, tile, j, 0)
      return stack, add(acc, parts, valid=first + j < loop.n)  # a copy adds nothing
    stack = jnp.zeros((m, *tile_shape), out_aval.dtype) if written else None
    carry = body(0, (stack, init))  # peeled, as `_Loop.run`
    stack, acc = carry if m == 1 else lax.fori_loop(1, m, body, carry)
    return [stack] * written + [r[2](a, axis_name) for r, a in zip(sums, acc)]

  spread = _compat.shard_map(per_device, mesh, in_specs=(P(),) * len(operands),
                             out_specs=[P(axis_name)] * written + [P()] * len(sums))
  with jax.named_scope(name):
    results = spread(*operands)
    if not written:
      return finish(None, results)
    stack = results[0]
    with jax.named_scope("reassemble"):
      def write(i, out):
        begin = loop.out_box(loop.offsets(loop.index(i)))[0]
        return _update(out, stack[i], begin)
      out = loop.run(write, jnp.zeros(out_aval.shape, out_aval.dtype))
    if policy.shard_output:
      spec = [None] * out.ndim
      spec[chain.layout.spatial[0]] = axis_name
      out = lax.with_sharding_constraint(out, NamedSharding(mesh, P(*spec)))
  return finish(out, results[1:])


def _reduction_parts(chain: Chain, loop: _Loop, index, o, windows: dict) -> list:
  """A tile's part of each of the chain's `Reductions`, from its windows of the chain's values
  (`compute_tile`'s `keep`): of each reduced value, only the positions the tile owns
  (`Reductions.bounds`) count. A group's equations run on the window of the value it reduces
  (a reshape splitting the features keeps the spatial axes); a reduction conv reads the part
  of its lhs window that the rhs window reaches (`_reduction_op`), zeros outside the image, and
  runs unpadded on it: output k then reads lhs position j * rhs_dilation - low + k *
  window_stride for each position j of the rhs window, as the conv at full size does."""
  reductions, (p,) = chain.reductions, chain.stages
  layout = p.layout
  env = dict(windows)
  source, spatial = {}, {}  # a group's value -> the reduced value it is computed from, axes
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]

  def owned(x, v, axes, fill):
    return _keep(x, {a: (_at(lo, index[d]), _at(hi, index[d]))
                     for d, (a, (lo, hi)) in enumerate(zip(axes, reductions.bounds[v]))}, fill)

  for e in reductions.eqns:
    out = e.outvars[0]
    if _compat.is_conv(e):
      lhs, rhs = e.invars
      shift, width = _window_through(_reduction_op(e), p.scale[rhs], p.shift[rhs],
                                     p.width[rhs])[1:]
      begin, end = [0] * lhs.aval.ndim, list(env[lhs].shape)
      for d, a in enumerate(layout.spatial):
        begin[a] = shift[d] - p.shift[lhs][d]
        end[a] = begin[a] + width[d]
      x = _mask_outside(lax.slice(env[lhs], begin, end),
                        [o[-1][d] * p.scale[lhs][d] + shift[d] for d in range(len(shift))],
                        p.extent[lhs], layout)
      g = owned(env[rhs], rhs, layout.spatial, 0)
      env[out] = forms.conv(x, g, dict(e.params, padding=((0, 0),) * len(shift)), loop.fast)
      continue
    full = next(v for v in e.invars if not isinstance(v, _compat.Literal))
    src, axes = source.get(full, full), spatial.get(full, layout.spatial)
    args = [read(v) for v in e.invars]
    if e.primitive.name == "reshape":
      env[out], axes = _split_features_of(e, args[0], axes, layout)
    elif e.primitive.name in _REDUCTIONS:
      env[out] = e.primitive.bind(owned(args[0], src, axes, _REDUCTIONS[e.primitive.name][0]),
                                  **e.params)
      continue
    else:
      env[out] = _eval_elementwise(e, args)
    source[out], spatial[out] = src, axes
  return [env[v] for v in reductions.outputs]


def _split_features_of(eqn, x, axes, layout: Layout):
  """A reshape splitting the feature axis (`_split_features`) on a window `x` whose spatial
  axes are `axes`: the window reshaped, and where its spatial axes land."""
  f = layout.feature
  shape = x.shape
  return (lax.reshape(x, (*shape[:f], *eqn.params["new_sizes"][f:f + 2], *shape[f + 1:])),
          tuple(a + (a > f) for a in axes))


def _at(table: np.ndarray, index):
  """`table`'s entry at a tile index along one dim (an int or a `_PerTile` of the indices)."""
  if isinstance(index, _PerTile):
    return _PerTile(table[index.values], index.at)
  return int(table[index])


def _reduce_tile(stats: Statistics, loop: _Loop, index, o, tile, centred=None) -> list:
  """Each reduction of the statistics group on the source's tile at offsets `o`: the group's
  equations on the tile (a reshape splitting the features keeps the tile's spatial extent),
  each reduction's operand set to its identity where the tile does not own a position. With
  `centred` (a list), it gets the tile's (count, mean, centred sum of squares) of each of
  `stats.centred` (`_centred_parts`)."""
  layout = stats.source.layout
  env, spatial = {stats.value: tile}, {stats.value: layout.spatial}
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
  for e in stats.eqns:
    args = [read(v) for v in e.invars]
    full = next(v for v in e.invars if not isinstance(v, _compat.Literal))
    out = e.outvars[0]
    if e.primitive.name == "reshape":
      env[out], spatial[out] = _split_features_of(e, args[0], spatial[full], layout)
    elif e.primitive.name in _REDUCTIONS:
      x = loop.owned(index, o, args[0], spatial[full], _REDUCTIONS[e.primitive.name][0])
      env[out] = e.primitive.bind(x, **e.params)
    else:
      env[out] = _eval_elementwise(e, args)
      spatial[out] = spatial[full]
  for total, _ in (stats.centred if centred is not None else ()):
    x = env[total.invars[0]]
    centred.append(_centred_parts(loop, index, o, x, spatial[total.invars[0]],
                                  tuple(total.params["axes"])))
  return [env[v] for v in stats.outputs]


def _centred_parts(loop: _Loop, index, o, x, spatial, axes) -> tuple:
  """A tile's count of owned positions, their mean and their centred sum of squares, per
  result of a sum of `x` over `axes` (in float32 at least)."""
  x = x.astype(_accumulator_dtype(x.dtype))
  ones = loop.owned(index, o, jnp.ones_like(x), spatial)
  count = jnp.sum(ones, axes)
  mean = jnp.sum(loop.owned(index, o, x, spatial), axes) / jnp.maximum(count, 1)
  deviation = loop.owned(index, o, x - jnp.expand_dims(mean, axes), spatial)
  return count, mean, jnp.sum(deviation * deviation, axes)


def _chan(a, b):
  """Two (count, mean, centred sum of squares) combined (`_centred`)."""
  (n, m, s), (n_b, m_b, s_b) = a, b
  total = n + n_b
  weight = n_b / jnp.maximum(total, 1)
  delta = m_b - m
  return total, m + delta * weight, s + s_b + delta * delta * n * weight


def _chan_across(acc, axis):
  """(count, mean, centred sum of squares) of each device combined over mesh `axis`: the
  count and the sum add, and each device's sum of squares is taken about the total mean."""
  n, m, s = acc
  total = lax.psum(n, axis)
  mean = lax.psum(n * m, axis) / jnp.maximum(total, 1)
  return total, mean, lax.psum(s + n * (m - mean) ** 2, axis)


def _dealt_out(loop: _Loop, accumulate, operands, combine):
  """`accumulate(operands, first, count)` (a result of tiles first .. first + count - 1, ints or
  traced) over all the tiles of `loop`: in one loop, or where the policy has a mesh, dealt out
  over its `mesh_axis` as a forward's tiles are (`_emit_tiles`): device d takes tiles
  [d * m, (d + 1) * m), as many as are left (no tile twice), and `combine(result, axis_name)`
  (`lax.psum` for sums) joins the devices' results."""
  policy = loop.chain.policy
  if policy.mesh is None:
    return accumulate(operands, 0, loop.n)
  axis, m = policy.mesh_axis, loop.per_device()

  def per_device(operands):
    first = lax.axis_index(axis) * m
    return combine(accumulate(operands, first, jnp.clip(loop.n - first, 0, m)), axis)

  return _compat.shard_map(per_device, policy.mesh, in_specs=(P(),), out_specs=P())(operands)


def emit_statistics(stats: Statistics, *operands) -> list:
  """The statistics' reductions, one pass over the tiles of their source: each tile computes
  the source's tile (`_Loop.tile`, as a region's loop does) and its part of every reduction,
  and the parts combine (sum, max or min) in the loop's carry (sums of bfloat16 or float16
  parts in float32)."""
  loop = _Loop(stats.source)
  names = [e.primitive.name for v in stats.outputs for e in stats.eqns if v in e.outvars]
  reduction = [_REDUCTIONS[name] for name in names]

  def accumulate(operands, first, count):
    xs, smalls = _split(stats.source, operands)

    def body(j, carry):
      acc, moments = carry
      index = loop.index(first + j)
      o = loop.offsets(index)
      boxes = loop.boxes(o)
      tile = loop.tile(o, boxes, loop.pieces(xs, boxes), smalls)
      with jax.named_scope("reduce"):
        centred = []
        parts = _reduce_tile(stats, loop, index, o, tile, centred)
        return ([r[1](a, p.astype(a.dtype)) for r, a, p in zip(reduction, acc, parts)],
                [_chan(m, c) for m, c in zip(moments, centred)])

    init = [jnp.full(v.aval.shape, _fill(r[0], dtype))
            for v, r, name in zip(stats.outputs, reduction, names)
            for dtype in [_accumulator_dtype(v.aval.dtype) if name == "reduce_sum"
                          else v.aval.dtype]]
    moments = [tuple(jnp.zeros(out.aval.shape, _accumulator_dtype(out.aval.dtype))
                     for _ in range(3)) for _, out in stats.centred]
    # A small carry: made early, it costs nothing.
    return lax.fori_loop(0, count, body, (init, moments))

  def combine(carry, axis):
    acc, moments = carry
    return ([r[2](a, axis) for r, a in zip(reduction, acc)],
            [_chan_across(m, axis) for m in moments])

  with jax.named_scope(stats.name):
    acc, moments = _dealt_out(loop, accumulate, list(operands), combine)
  return [a.astype(v.aval.dtype) for v, a in
          zip(stats.all_outputs, [*acc, *(s for _, _, s in moments)])]


def _two_passes(stats: Statistics, bind_pass, *operands) -> list:
  """A pass that merged centred second passes (`Statistics.two_pass`) as the program wrote
  it: the first pass by `bind_pass`, the equations making each mean, then each second pass by
  `bind_pass`: what derivatives and vmap see."""
  first, seconds = stats.two_pass
  source = first.source
  env = dict(zip((*source.inputs, *source.smalls), operands))
  outs = bind_pass(first, *operands)
  env.update(zip(first.outputs, outs))
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
  for mean_eqns, second in seconds:
    for e in mean_eqns:
      env.update(zip(e.outvars, _compat.eval_eqn(e, [read(v) for v in e.invars])))
    outs = [*outs, *bind_pass(second, *map(read, (*second.source.inputs,
                                                   *second.source.smalls)))]
  return outs


def _statistics_unfused(stats: Statistics, *operands) -> list:
  """The statistics at full size: the source by `unfused`, the group's equations as they are
  (what derivatives and vmap see)."""
  if stats.two_pass is not None:
    return _two_passes(stats, _statistics_unfused, *operands)
  env = {stats.value: unfused(stats.source, *operands)}
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
  for e in stats.eqns:
    env.update(zip(e.outvars, _compat.eval_eqn(e, [read(v) for v in e.invars])))
  return [env[v] for v in stats.outputs]


# ---------------------------------------------------------------------------------------------
# Derivatives: a region's tangent and its transpose are loops over the same tiles
# ---------------------------------------------------------------------------------------------
# The tangent of a region is linear in the tangents of its operands. It is bound as its own
# primitive, `jaxtile_region_jvp`, over the primals and the nonzero tangents: forward mode runs it
# as a loop whose tiles push the tangent windows through the tile's computation (`jax.jvp` of
# `_Loop.tile`); reverse mode transposes it into a loop that, per tile, recomputes the tile's
# forward from the primal pieces and pulls the tile's cotangent back (`jax.vjp`), adding each
# piece's cotangent into its input's at the piece's box and summing the small operands'
# (kernels, biases). Every intermediate of the region lives a tile at a time in both directions,
# and the residuals the backward pass keeps are the region's operands, nothing inside it: exact
# tiled backpropagation, with the forward recomputed once per tile. Under a mesh, the tangent
# loop's tiles are dealt out over the devices as the forward's are (`_emit_tiles`), and the
# backward loop's too (`_dealt_out`).
def _split(chain: Chain, operands) -> tuple[dict, dict]:
  n = len(chain.inputs)
  return dict(zip(chain.inputs, operands[:n])), dict(zip(chain.smalls, operands[n:]))


region_p = _compat.Primitive("jaxtile_region")
region_jvp_p = _compat.Primitive("jaxtile_region_jvp")
# A region with `Reductions`: its written output, if any, and their results; and its tangent.
region_reductions_p = _compat.Primitive("jaxtile_region_reductions")
region_reductions_p.multiple_results = True
region_reductions_jvp_p = _compat.Primitive("jaxtile_region_reductions_jvp")
region_reductions_jvp_p.multiple_results = True


def bind(plan: Chain, *operands):
  """The region's output from its inputs and then its small operands, in plan order.

  Under a mesh the output is constrained to its sharding on that mesh, outside the primitive:
  `jit` picks the devices a program runs on from the shardings its jaxpr shows, and the
  `shard_map` dealing the tiles out (`_emit_tiles`) is hidden in the primitive's lowering.
  Without the constraint some programs were compiled for one device, and XLA:CPU rejected the
  `shard_map` left in them ("No registered implementation for ...
  xla.sdy.GlobalToLocalShape")."""
  if plan.reductions is not None:  # the output where written, then the reductions' results
    outs = region_reductions_p.bind(*operands, plan=plan)
    if plan.written:
      outs[0] = _constrained(plan, outs[0])
    return outs
  return _constrained(plan, region_p.bind(*operands, plan=plan))


def _constrained(plan: Chain, out):
  """A region's output constrained to its sharding on the policy's mesh (`bind`)."""
  policy = plan.policy
  if policy.mesh is None:
    return out
  spec = [None] * out.ndim
  if policy.shard_output:
    spec[plan.layout.spatial[0]] = policy.mesh_axis
  return lax.with_sharding_constraint(out, NamedSharding(policy.mesh, P(*spec)))


def _nonzero(tangents) -> tuple[bool, ...]:
  """Which tangents are neither symbolic zeros nor of integer operands (float0)."""
  return tuple(type(t) is not _compat.Zero and t.dtype != jax.dtypes.float0 for t in tangents)


def _region_jvp(primals, tangents, *, plan):
  out = region_p.bind(*primals, plan=plan)
  nonzero = _nonzero(tangents)
  if not any(nonzero):
    return out, _compat.Zero(plan.output.aval.to_tangent_aval())
  tangents = [t for t, nz in zip(tangents, nonzero) if nz]
  return out, region_jvp_p.bind(*primals, *tangents, plan=plan, nonzero=nonzero)


def _tile_fun(loop: _Loop, index, o, boxes, pieces, smalls: dict, wrt, finish=None):
  """The output tile (or `finish` of it: a statistics pass's parts; or with reductions, the
  tile where written, else None, and its parts of them) as a function of the pieces and small
  operands of the values in `wrt` (the others fixed), with those pieces' (stage, position)
  slots and those smalls."""
  chain = loop.chain
  slots = [(n, j) for n in range(len(pieces)) for j, v in enumerate(chain.read_by(n)) if v in wrt]
  small_vars = [v for v in chain.smalls if v in wrt]

  def fun(piece_args, small_args):
    ps = [list(row) for row in pieces]
    for (n, j), piece in zip(slots, piece_args):
      ps[n][j] = piece
    smalls_ = {**smalls, **dict(zip(small_vars, small_args))}
    if finish is not None:
      return finish(loop.tile(o, boxes, ps, smalls_))
    tile, parts = loop.tile_and_parts(index, o, boxes, ps, smalls_)
    return tile if chain.reductions is None else (tile if chain.written else None, parts)

  args = ([pieces[n][j] for n, j in slots], [smalls[v] for v in small_vars])
  return fun, args, slots, small_vars


def _tangent_args(chain: Chain, tangents: dict, boxes, slots, small_vars):
  """The tangents of `_tile_fun`'s arguments: each tangent's piece at its value's box."""
  return ([_slice(tangents[chain.read_by(n)[j]], *boxes[n][j]) for n, j in slots],
          [tangents[v] for v in small_vars])


def emit_jvp(*operands, plan: Chain, nonzero):
  """The region's tangent (with reductions, of what it makes: sums only), tile by tile
  (`_emit_tiles`): each tile's forward pushed forward (`jax.jvp`) on the tangents' pieces."""
  chain, loop = plan, _Loop(plan)
  keys = [v for v, nz in zip((*chain.inputs, *chain.smalls), nonzero) if nz]

  def tile_at(operands, index, o, boxes):
    xs, smalls = _split(chain, operands[:len(nonzero)])
    tangents = dict(zip(keys, operands[len(nonzero):]))
    fun, args, slots, small_vars = _tile_fun(loop, index, o, boxes, loop.pieces(xs, boxes),
                                             smalls, tangents)
    _, tile = jax.jvp(fun, args, _tangent_args(chain, tangents, boxes, slots, small_vars))
    return (tile, []) if chain.reductions is None else tile

  return _results(chain, *_emit_tiles(loop, tile_at, operands, f"{chain.name}/jvp",
                                      _reductions_of(chain)))


def _accumulator_dtype(dtype):
  """Small operands' cotangents sum over every tile: in float32 at least."""
  return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def emit_transpose(chain: Chain, primals, ct, wrt, stats: Optional[Statistics] = None) -> dict:
  """The cotangents of the operands in `wrt` (vars) given the output's `ct`, tile by tile: each
  tile's forward recomputed from the primal pieces and pulled back (`jax.vjp`) from the tile's
  cotangent; a piece's cotangent is added into its input's at the piece's box, the small
  operands' summed over tiles. With `stats`, `chain` is its source and `ct` the cotangents of
  its sums, which are every tile part's; with reductions (sums), `ct` is a list of the
  cotangents of what the chain makes (`Chain.outvars`).

  Where the policy has a mesh, the tiles are dealt out over its devices (`_dealt_out`), each
  adding into zeros of its own, and the devices' sums summed."""
  loop = _Loop(chain)
  inputs = [v for v in chain.inputs if v in wrt]
  small_vars = [v for v in chain.smalls if v in wrt]

  def accumulate(operands, first, count):
    """The cotangents from tiles first .. first + count - 1 (ints or traced)."""
    primals, ct = operands
    xs, smalls = _split(chain, primals)

    def body(j, carry):
      acc_in, acc_small = carry
      index = loop.index(first + j)
      o = loop.offsets(index)
      boxes = loop.boxes(o)
      finish = None if stats is None else functools.partial(_reduce_tile, stats, loop, index, o)
      fun, args, slots, _ = _tile_fun(loop, index, o, boxes, loop.pieces(xs, boxes), smalls,
                                      wrt, finish)
      if stats is None:
        # With reductions: the output's where written, and the sums', every tile part's.
        out_ct = ct if chain.reductions is None else ct[0] if chain.written else None
        with jax.named_scope("select"):
          tile_ct = None if out_ct is None else loop.owned(
              index, o, _slice(out_ct, *loop.out_box(o)))
        ct_tile = tile_ct if chain.reductions is None else (tile_ct, ct[chain.written:])
      else:
        ct_tile = ct
      _, pull = jax.vjp(fun, *args)
      ct_pieces, ct_smalls = pull(ct_tile)
      with jax.named_scope("reassemble"):
        acc_in = list(acc_in)
        for (n, j), g in zip(slots, ct_pieces):
          k = inputs.index(chain.read_by(n)[j])
          at, shape = boxes[n][j]
          acc_in[k] = _update(acc_in[k], _slice(acc_in[k], at, shape) + g, at)
        acc_small = [a + g.astype(a.dtype) for a, g in zip(acc_small, ct_smalls)]
      return acc_in, acc_small

    # One zero for every accumulator, made once the cotangent exists (`_zeros_after`).
    zero = lower_lib.zero_after(*jax.tree.leaves(ct), dtype=np.float32)
    zeros = lambda v, dtype: (jnp.zeros(v.aval.shape, dtype) if zero is None else
                              jnp.broadcast_to(zero.astype(dtype), v.aval.shape))
    init = ([zeros(v, v.aval.dtype) for v in inputs],
            [zeros(v, _accumulator_dtype(v.aval.dtype)) for v in small_vars])
    return lax.fori_loop(0, count, body, init)

  with jax.named_scope(f"{chain.name}/transpose"):
    acc_in, acc_small = _dealt_out(loop, accumulate, (list(primals), ct), lax.psum)
  return {**dict(zip(inputs, acc_in)),
          **{v: a.astype(v.aval.dtype) for v, a in zip(small_vars, acc_small)}}


def _transpose(chain: Chain, ct, operands, nonzero, stats: Optional[Statistics] = None):
  """A tangent primitive's transpose rule: cotangents (`emit_transpose`) for the tangent
  operands being transposed, None for the primals; `ct` None: a zero cotangent."""
  primals, tangents = operands[:len(nonzero)], operands[len(nonzero):]
  assert not any(_compat.is_undefined_primal(p) for p in primals), "nonlinear in the primals"
  keys = [v for v, nz in zip((*chain.inputs, *chain.smalls), nonzero) if nz]
  linear = {v for v, t in zip(keys, tangents) if _compat.is_undefined_primal(t)}
  grads = emit_transpose(chain, primals, ct, linear, stats) if ct is not None and linear else {}
  return [None] * len(primals) + [
      (grads[v] if v in grads else _compat.Zero(t.aval.to_tangent_aval()))
      if _compat.is_undefined_primal(t) else None for v, t in zip(keys, tangents)]


def _region_transpose(ct, *operands, plan, nonzero):
  return _transpose(plan, None if type(ct) is _compat.Zero else ct, operands, nonzero)


# ---------------------------------------------------------------------------------------------
# Batched and higher-order: the region's equations at full size, each conv tiled on its own
# ---------------------------------------------------------------------------------------------
def unfused(plan: Chain, *operands, outvars=None):
  """The region's equations at full size, each conv tiled on its own: what vmap and second
  derivatives see (see `lower.tiled_conv_p`). Its output, or the values `outvars`, with its
  reductions' equations evaluated too."""
  env = dict(zip((*plan.inputs, *plan.smalls), operands))
  read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
  eqns = plan.eqns if outvars is None else (*plan.eqns, *plan.reductions.eqns)
  for e in eqns:
    args = [read(v) for v in e.invars]
    if _compat.is_conv(e):
      env[e.outvars[0]] = lower_lib.derived_conv(*args, policy=plan.policy, name=plan.name,
                                                 **e.params)
    else:
      (env[e.outvars[0]],) = _compat.eval_eqn(e, args)
  return env[plan.output] if outvars is None else [env[v] for v in outvars]


def _unfused_tangent(fun, nonzero, *operands):
  """The tangent of `fun` (at full size: `unfused`, `_statistics_unfused`) from the primals and
  the nonzero tangents, as a tangent primitive takes them."""
  primals, tangents = operands[:len(nonzero)], iter(operands[len(nonzero):])
  tangents = [next(tangents) if nz else _zero_tangent(p) for p, nz in zip(primals, nonzero)]
  return jax.jvp(fun, tuple(primals), tuple(tangents))[1]


def _zero_tangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros(x.shape, x.dtype)
  return np.zeros(x.shape, jax.dtypes.float0)


def _instantiate(primals, tangents):
  return tuple(_zero_tangent(p) if type(t) is _compat.Zero else t
               for p, t in zip(primals, tangents))


_compat.define_primitive(
    region_p, impl_lowering=lambda *operands, plan: emit(plan, *operands),
    abstract_eval=lambda *args, plan: (plan.output.aval, set()), jvp=_region_jvp,
    batch_rule=lambda args, dims, *, plan: (
        jax.vmap(functools.partial(unfused, plan), in_axes=dims)(*args), 0))
statistics_p = _compat.Primitive("jaxtile_region_statistics")
statistics_p.multiple_results = True
statistics_jvp_p = _compat.Primitive("jaxtile_region_statistics_jvp")
statistics_jvp_p.multiple_results = True


def _sums_only(eqns) -> bool:
  """Whether every reduction among `eqns` is a sum (a conv's is): then each tile's part is
  linear in the total, and the derivative runs over tiles too (`emit_statistics_jvp`,
  `emit_jvp`); a max or min runs at full size."""
  return all(e.primitive.name == "reduce_sum" for e in eqns if e.primitive.name in _REDUCTIONS)


def _statistics_jvp(primals, tangents, *, stats):
  if stats.two_pass is not None:  # differentiated as the program's two passes, tile by tile
    return jax.jvp(functools.partial(_two_passes, stats, bind_statistics), tuple(primals),
                   _instantiate(primals, tangents))
  outs = statistics_p.bind(*primals, stats=stats)
  nonzero = _nonzero(tangents)
  if not any(nonzero):
    return outs, [_compat.Zero(v.aval.to_tangent_aval()) for v in stats.outputs]
  if not _sums_only(stats.eqns):
    return jax.jvp(functools.partial(_statistics_unfused, stats), tuple(primals),
                   _instantiate(primals, tangents))
  tangents = [t for t, nz in zip(tangents, nonzero) if nz]
  return outs, statistics_jvp_p.bind(*primals, *tangents, stats=stats, nonzero=nonzero)


def emit_statistics_jvp(*operands, stats: Statistics, nonzero) -> list:
  """The sums' tangents, tile by tile: each tile's parts pushed forward (`jax.jvp`) on the
  tangents' pieces, and summed (in float32 at least)."""
  source, loop = stats.source, _Loop(stats.source)
  keys = [v for v, nz in zip((*source.inputs, *source.smalls), nonzero) if nz]

  def accumulate(operands, first, count):
    xs, smalls = _split(source, operands[:len(nonzero)])
    tangents = dict(zip(keys, operands[len(nonzero):]))

    def body(j, acc):
      index = loop.index(first + j)
      o = loop.offsets(index)
      boxes = loop.boxes(o)
      finish = functools.partial(_reduce_tile, stats, loop, index, o)
      fun, args, slots, small_vars = _tile_fun(loop, index, o, boxes, loop.pieces(xs, boxes),
                                               smalls, tangents, finish)
      _, parts = jax.jvp(fun, args, _tangent_args(source, tangents, boxes, slots, small_vars))
      return [a + p.astype(a.dtype) for a, p in zip(acc, parts)]

    init = [jnp.zeros(v.aval.shape, _accumulator_dtype(v.aval.dtype)) for v in stats.outputs]
    return lax.fori_loop(0, count, body, init)

  with jax.named_scope(f"{stats.name}/jvp"):
    acc = _dealt_out(loop, accumulate, list(operands), lax.psum)
  return [a.astype(v.aval.dtype) for v, a in zip(stats.outputs, acc)]


def _cotangents(cts, outvars) -> Optional[list]:
  """A transpose rule's cotangents of several results: None where all are zero, else each
  symbolic zero made zeros of its result's aval."""
  if all(type(c) is _compat.Zero for c in cts):
    return None
  return [jnp.zeros(v.aval.shape, v.aval.dtype) if type(c) is _compat.Zero else c
          for v, c in zip(outvars, cts)]


def _statistics_transpose(cts, *operands, stats, nonzero):
  return _transpose(stats.source, _cotangents(cts, stats.outputs), operands, nonzero, stats)


def bind_statistics(stats: Statistics, *operands) -> list:
  """The statistics' reductions from their source's inputs and then its small operands."""
  return statistics_p.bind(*operands, stats=stats)


_compat.define_primitive(
    statistics_p, impl_lowering=lambda *operands, stats: emit_statistics(stats, *operands),
    abstract_eval=lambda *args, stats: ([v.aval for v in stats.all_outputs], set()),
    jvp=_statistics_jvp,
    batch_rule=lambda args, dims, *, stats: (
        jax.vmap(functools.partial(_statistics_unfused, stats), in_axes=dims)(*args),
        [0] * len(stats.all_outputs)),
    multiple_results=True)


def _full_size_jvp(fun, nonzero, primals, tangents):
  """A tangent primitive's JVP (second derivatives): `fun`'s tangent at full size."""
  return jax.jvp(functools.partial(_unfused_tangent, fun, nonzero), tuple(primals),
                 _instantiate(primals, tangents))


def _full_size_batch(fun, nonzero, args, dims):
  """A tangent primitive's batching rule: `fun`'s tangent at full size, vmapped."""
  return jax.vmap(functools.partial(_unfused_tangent, fun, nonzero), in_axes=dims)(*args)


_compat.define_primitive(
    statistics_jvp_p, impl_lowering=emit_statistics_jvp,
    abstract_eval=lambda *args, stats, nonzero: ([v.aval for v in stats.outputs], set()),
    jvp=lambda primals, tangents, *, stats, nonzero: _full_size_jvp(
        functools.partial(_statistics_unfused, stats), nonzero, primals, tangents),
    batch_rule=lambda args, dims, *, stats, nonzero: (_full_size_batch(
        functools.partial(_statistics_unfused, stats), nonzero, args, dims),
        [0] * len(stats.outputs)),
    transpose=_statistics_transpose, multiple_results=True)
def _all_unfused(plan: Chain):
  """A region with reductions at full size (`unfused`): its outputs, as a function."""
  return functools.partial(unfused, plan, outvars=plan.outvars)


def _region_reductions_jvp(primals, tangents, *, plan):
  """A region with reductions: where they are all sums, its tangent is linear in the tangents
  and runs over the tiles (`region_reductions_jvp_p`, transposed by the backward loop); with
  a max or min, at full size."""
  outs = region_reductions_p.bind(*primals, plan=plan)
  nonzero = _nonzero(tangents)
  if not any(nonzero):
    return outs, [_compat.Zero(v.aval.to_tangent_aval()) for v in plan.outvars]
  if not _sums_only(plan.reductions.eqns):
    return jax.jvp(_all_unfused(plan), tuple(primals), _instantiate(primals, tangents))
  tangents = [t for t, nz in zip(tangents, nonzero) if nz]
  return outs, region_reductions_jvp_p.bind(*primals, *tangents, plan=plan, nonzero=nonzero)


def _region_reductions_transpose(cts, *operands, plan, nonzero):
  return _transpose(plan, _cotangents(cts, plan.outvars), operands, nonzero)


# vmap, and derivatives of the tangent (second order), run at full size.
_compat.define_primitive(
    region_reductions_p, impl_lowering=lambda *operands, plan: emit(plan, *operands),
    abstract_eval=lambda *args, plan: ([v.aval for v in plan.outvars], set()),
    jvp=_region_reductions_jvp,
    batch_rule=lambda args, dims, *, plan: (
        jax.vmap(_all_unfused(plan), in_axes=dims)(*args), [0] * len(plan.outvars)),
    multiple_results=True)
_compat.define_primitive(
    region_reductions_jvp_p, impl_lowering=emit_jvp,
    abstract_eval=lambda *args, plan, nonzero: ([v.aval for v in plan.outvars], set()),
    jvp=lambda primals, tangents, *, plan, nonzero: _full_size_jvp(
        _all_unfused(plan), nonzero, primals, tangents),
    batch_rule=lambda args, dims, *, plan, nonzero: (_full_size_batch(
        _all_unfused(plan), nonzero, args, dims), [0] * len(plan.outvars)),
    transpose=_region_reductions_transpose, multiple_results=True)
_compat.define_primitive(
    region_jvp_p, impl_lowering=emit_jvp,
    abstract_eval=lambda *args, plan, nonzero: (plan.output.aval, set()),
    jvp=lambda primals, tangents, *, plan, nonzero: _full_size_jvp(
        functools.partial(unfused, plan), nonzero, primals, tangents),
    batch_rule=lambda args, dims, *, plan, nonzero: (_full_size_batch(
        functools.partial(unfused, plan), nonzero, args, dims), 0),
    transpose=_region_transpose)
