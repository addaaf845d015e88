"""Streaming: a spatially local function over images on the host or on disk, a tile at a time.

`stream(fun)(image, ...)` analyses `fun` once on shapes, plans output tiles, and for each tile
reads the exact input window it needs (halo included, zeros beyond the image's border) from the
host-side source, runs one compiled tile program on a device, and writes the tile to the sink.
Only tiles ever reach a device.

The tile program is the region machinery (`region.py`) run on windows instead of inside a loop:
the image's equations form one `region.Chain`, cut into stages at every transposed conv, each
stage's output tile being the window the next stage reads, so no intermediate exists at full size
anywhere. Window positions outside an intermediate's extent are set to zero (the next conv's
padding) before it is read, as inside a region.

Equations that depend on no image (parameter casts, kernel flips, bias reshapes) run once on the
device before the first tile; their results are the tile program's small operands.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import queue
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtile._src import _compat
from jaxtile._src import forms
from jaxtile._src import decide as decide_lib
from jaxtile._src import region as region_lib
from jaxtile._src import upsample


class StreamError(ValueError):
  """`fun` or its arguments cannot be streamed; raised before any tile is computed."""


# ---------------------------------------------------------------------------------------------
# Analysis: stages and tiles
# ---------------------------------------------------------------------------------------------
def _where(eqn) -> str:
  line = _compat.user_source_line(eqn.source_info)
  return f"`{eqn.primitive.name}` at {line}" if line else f"`{eqn.primitive.name}`"


def _is_image(x: Any) -> bool:
  """A host-side array that slices like NumPy: anything with a shape, a dtype and indexing that is
  neither a jax.Array nor a scalar."""
  if isinstance(x, (jax.Array, int, float, complex, bool)):
    return False
  shape = getattr(x, "shape", None)
  return (shape is not None and len(shape) > 0 and hasattr(x, "dtype")
          and hasattr(x, "__getitem__"))


def _stage_kind(eqn, layout) -> Optional[str]:
  """What a stage can hold: 'conv', 'transposed' (an upsampling too), 'pool', 'local'; None if
  it mixes positions."""
  if _compat.is_conv(eqn):
    if eqn.params["batch_group_count"] != 1:
      return None
    lhs, out = region_lib._conv_layout(eqn)
    if lhs != out or (layout is not None and lhs != layout):
      return None
    return "transposed" if any(d != 1 for d in eqn.params["lhs_dilation"]) else "conv"
  if upsample.factors_of(eqn) is not None:
    return "transposed" if layout is not None and region_lib._region_upsample(
        eqn, None, layout) else None
  if layout is None:  # no conv at all
    return "local" if (eqn.primitive.name in region_lib.ELEMENTWISE
                       or region_lib._elementwise_body(eqn) is not None) else None
  if region_lib._is_pool(eqn):
    return "pool" if region_lib._pool_ok(eqn, layout) else None
  if region_lib._is_concat(eqn, layout) or region_lib._makes_input(eqn, layout):
    return "local"
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class StreamPlan:
  """What `stream` does with a function at given argument shapes: its stages, output tiles and
  the device memory a tile takes. `str()` prints it."""
  chain: region_lib.Chain  # the stages, planned for `tile`
  image_shapes: tuple[tuple[int, ...], ...]
  out_shape: tuple[int, ...]  # the tiled output's
  out_dtype: np.dtype
  tile: tuple[int, ...]  # output tile extent per spatial dim
  counts: tuple[int, ...]  # output tiles per spatial dim
  max_bytes: int
  device_bytes: Optional[int] = None  # compiled tile program: arguments + output + temporaries
  result_shape: tuple[int, ...] = ()  # fun's output: out_shape less the unit axes it squeezes

  @property
  def stages(self) -> tuple[region_lib.RegionPlan, ...]:
    return self.chain.stages

  @property
  def layout(self) -> region_lib.Layout:
    return self.stages[-1].layout

  @property
  def n_tiles(self) -> int:
    return math.prod(self.counts)

  def tile_index(self, flat: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, self.counts))

  def offsets(self, index: Sequence[int]) -> list[list[int]]:
    """Per stage, the output offset per spatial dim of the tile at `index`, last stage last: the
    last stage's tiles every `tile`, the last one shifted back to end at the edge; each earlier
    stage's is where the next stage's input window starts."""
    extent = self.stages[-1].extent[self.stages[-1].output]
    o = [min(i * t, n - t) for i, t, n in zip(index, self.tile, extent)]
    return [[int(x) for x in at] for at in self.chain.offsets(o)]

  def write_box(self, index: Sequence[int]) -> tuple[list[int], list[int]]:
    """(start, stop) per spatial dim of what the tile at `index` writes: `[i * tile, (i + 1) *
    tile)` cut at the edge, so every output position is written by one tile."""
    extent = self.stages[-1].extent[self.stages[-1].output]
    start = [i * t for i, t in zip(index, self.tile)]
    return start, [min(s + t, n) for s, t, n in zip(start, self.tile, extent)]

  @property
  def extra_macs_percent(self) -> float:
    """Multiply-adds of every tile's windows against the untiled function's, minus 100%."""
    return self.chain.extra_macs_percent

  def __str__(self) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    images = ", ".join("x".join(map(str, s)) for s in self.image_shapes)
    result = self.result_shape or self.out_shape
    lines = [f"stream: {images} -> {'x'.join(map(str, result))} {self.out_dtype}",
             f"  output tiles: {self.n_tiles} ({' x '.join(map(str, self.counts))}) of "
             f"{' x '.join(map(str, self.tile))}; recomputed halos {self.extra_macs_percent:.1f}% "
             f"extra multiply-adds",
             f"  max_bytes {mib(self.max_bytes)}" + (
                 f"; compiled tile program {mib(self.device_bytes)} on the device"
                 if self.device_bytes is not None else "")]
    for k, p in enumerate(self.stages):
      ops = collections.Counter(e.primitive.name for e in p.eqns)
      ops_text = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in ops.items())
      window = " x ".join("x".join(map(str, p.width[v])) for v in p.inputs)
      n_ops = f"{len(p.eqns)} op" + ("s" if len(p.eqns) > 1 else "")
      lines.append(f"  stage {k}: {n_ops} ({ops_text}); input window {window} per "
                   f"output tile {'x'.join(map(str, p.tile))}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True, eq=False)
class _Analysis:
  closed: Any  # the inlined ClosedJaxpr of fun on flat arguments
  image_leaves: tuple[int, ...]  # flat indices of the images
  stages: tuple[tuple[int, ...], ...]  # equation indices per stage
  static_eqns: tuple[int, ...]  # equations that read no image: run once
  out_aval: Any  # the tiled output's (before a `squeeze`)
  image_vars: tuple[Any, ...]  # per image, the var the stages read (after an `expand`)
  expand: dict  # image index (in image_leaves order) -> unit axes fun adds to it
  squeeze: tuple[int, ...]  # unit axes fun removes from the tiled output
  result_aval: Any  # fun's output


def _inserted_axes(small, big, eqn) -> Optional[tuple[int, ...]]:
  """The unit axes `eqn` (a reshape or broadcast_in_dim) inserts into `small` to make `big`, or
  None when it does anything else."""
  name = eqn.primitive.name
  if name == "broadcast_in_dim":
    dims = tuple(eqn.params["broadcast_dimensions"])
    if list(dims) != sorted(dims) or any(big[d] != n for d, n in zip(dims, small)):
      return None
    axes = tuple(d for d in range(len(big)) if d not in dims)
    return axes if axes and all(big[d] == 1 for d in axes) else None
  if name == "reshape" and eqn.params.get("dimensions") is None:
    axes, k = [], 0
    for d, n in enumerate(big):
      if k < len(small) and n == small[k]:
        k += 1
      elif n == 1:
        axes.append(d)
      else:
        return None
    return tuple(axes) if axes and k == len(small) else None
  return None


def _removed_axes(eqn) -> Optional[tuple[int, ...]]:
  """The unit axes a squeeze (or reshape) removes, else None."""
  small, big = eqn.outvars[0].aval.shape, eqn.invars[0].aval.shape
  if eqn.primitive.name == "squeeze":
    return tuple(eqn.params["dimensions"])
  return _inserted_axes(small, big, eqn) if eqn.primitive.name == "reshape" else None


class _Expanded:
  """A source seen with unit axes inserted (what `x[None]` in fun makes of it)."""

  def __init__(self, source, axes: tuple[int, ...]):
    self.source, self.axes = source, axes
    shape = list(source.shape)
    for a in axes:
      shape.insert(a, 1)
    self.shape, self.dtype = tuple(shape), source.dtype
    chunks = getattr(source, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(source.shape):
      chunks = list(chunks)
      for a in axes:
        chunks.insert(a, 1)
      self.chunks = tuple(chunks)

  def __getitem__(self, index):
    inner = tuple(ix for d, ix in enumerate(index) if d not in self.axes)
    return np.expand_dims(np.asarray(self.source[inner]), self.axes)


class _Squeezed:
  """A sink seen with unit axes inserted: fun's output before its final squeeze (`y[0]`)."""

  def __init__(self, out, axes: tuple[int, ...]):
    self.out, self.axes = out, axes
    expanded = _Expanded(out, axes)
    self.shape, self.dtype = expanded.shape, out.dtype
    if hasattr(expanded, "chunks"):
      self.chunks = expanded.chunks

  def __setitem__(self, index, block):
    inner = tuple(ix for d, ix in enumerate(index) if d not in self.axes)
    self.out[inner] = np.squeeze(block, self.axes)


class NotLocalError(StreamError):
  """`fun` holds an op that needs the whole image, or a value carried across an upsampling
  (`eqn`, and `reason` in words): it cannot be one chain of tiles."""

  def __init__(self, message: str, eqn, reason: str = "needs the whole image"):
    super().__init__(message)
    self.eqn, self.reason, self.traced = eqn, reason, None


@dataclasses.dataclass(frozen=True, eq=False)
class _Traced:
  """`fun` traced on its images' shapes: which equations read an image (`dep_eqns`, in order)."""
  closed: Any
  leaves: list
  images: tuple[int, ...]
  image_vars: tuple[Any, ...]
  expand: dict
  dep_eqns: tuple[int, ...]
  static_eqns: tuple[int, ...]


def _analyse(fun: Callable, args: Sequence[Any], argnums) -> tuple[_Analysis, list]:
  traced = _trace(fun, args, argnums)
  closed, jaxpr = traced.closed, traced.closed.jaxpr
  leaves, images = traced.leaves, traced.images
  image_vars, expand = list(traced.image_vars), traced.expand
  dep_eqns, static_eqns = list(traced.dep_eqns), list(traced.static_eqns)
  out = jaxpr.outvars[0]
  squeeze = ()
  last = jaxpr.eqns[dep_eqns[-1]]
  if last.outvars[0] is out and len(dep_eqns) > 1 and _removed_axes(last):
    squeeze = _removed_axes(last)
    dep_eqns.pop()
    out = last.invars[0]
  try:
    return _stages(closed, leaves, images, image_vars, expand, dep_eqns, static_eqns, out,
                   squeeze)
  except NotLocalError as e:
    e.traced = traced  # what `spill` segments, without tracing again
    raise


def _trace(fun: Callable, args: Sequence[Any], argnums) -> _Traced:
  leaves, treedef = jax.tree_util.tree_flatten(tuple(args))
  if argnums is None:
    images = [i for i, x in enumerate(leaves) if _is_image(x)]
  else:
    images = []
    counts = [len(jax.tree_util.tree_leaves(a)) for a in args]
    for n in argnums:
      if not -len(args) <= n < len(args):
        raise StreamError(f"stream: argnums={argnums!r} names argument {n}, but fun was called "
                          f"with {len(args)} positional arguments.")
      n %= len(args)
      first = sum(counts[:n])
      images += range(first, first + counts[n])
    for i in images:
      if not _is_image(leaves[i]) and not isinstance(leaves[i], jax.Array):
        raise StreamError(f"stream: argument leaf {i} ({type(leaves[i]).__name__}) is named by "
                          "argnums but does not slice like an array (it needs .shape, .dtype "
                          "and [] indexing).")
  if not images:
    raise StreamError(
        "stream: no image argument. Images are the arguments that slice like NumPy arrays "
        "(numpy arrays and memmaps, zarr, tensorstore, h5py or dask arrays) but are not "
        f"jax.Arrays; got {[type(x).__name__ for x in leaves]}. Pass the image as a host array, "
        "or name it with argnums=.")
  def operand(i, x):
    """What `fun` is traced on for leaf i: an image's shape, an array, or None for a leaf that
    is no array (a function inside an equinox module: static, as `tile_convs` keeps it)."""
    if i in images or isinstance(x, _Abstract):
      return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))
    if isinstance(x, jax.Array):
      return x
    try:
      return jnp.asarray(x)
    except TypeError:
      return None
  operands = [operand(i, x) for i, x in enumerate(leaves)]
  traced = [i for i, a in enumerate(operands) if a is not None]
  avals = [operands[i] for i in traced]
  static = list(leaves)
  returned = []  # the structure of fun's result

  def flat(*traced_leaves):
    every = list(static)
    for i, x in zip(traced, traced_leaves):
      every[i] = x
    result = fun(*jax.tree_util.tree_unflatten(treedef, every))
    returned.append(jax.tree_util.tree_structure(result))
    return result

  # From here on the leaves are the traced ones, in the order of the jaxpr's inputs.
  leaves = [leaves[i] for i in traced]
  images = [traced.index(i) for i in images]
  try:
    closed = jax.make_jaxpr(flat)(*avals)
  except Exception as e:
    shapes = ", ".join(f"{tuple(leaves[i].shape)}:{np.dtype(leaves[i].dtype)}" for i in images)
    raise StreamError(f"stream: tracing fun at its image shapes ({shapes}) failed: "
                      f"{type(e).__name__}: {e}") from e
  # The equations as `tile_convs`'s regions see them (`region.canonical_form`): an upsampling is
  # one equation, a stage of the tile program as a transposed conv is; a broadcast of a bias or
  # a norm's weight stands before each reader and runs on its window (`_stages`).
  closed = _compat.inline_calls(closed)
  closed = _compat.ClosedJaxpr(region_lib.canonical_form(closed.jaxpr).jaxpr, closed.consts)
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1 or isinstance(jaxpr.outvars[0], _compat.Literal):
    raise StreamError(f"stream: fun must return one array (the streamed image), but it returns "
                      f"{len(jaxpr.outvars)} values.")
  if not jax.tree_util.treedef_is_leaf(returned[0]):  # one array in a dict or a list
    raise StreamError(f"stream: fun must return one array (the streamed image), but it returns "
                      f"{returned[0]}; return the array itself.")

  # Unit axes added to an image (`x[None]`: a batch axis for the convs) are not tiled: the image
  # is read through a view with them (`_Expanded`), and likewise the output of a final squeeze
  # (`y[0]`) is written through one (`_Squeezed`).
  uses = region_lib._uses(jaxpr)
  image_vars, expand, skipped = [], {}, set()
  for k, i in enumerate(images):
    v = jaxpr.invars[i]
    readers = uses.get(v, [])
    axes = None
    if len(readers) == 1 and readers[0] < len(jaxpr.eqns):
      e = jaxpr.eqns[readers[0]]
      axes = _inserted_axes(v.aval.shape, e.outvars[0].aval.shape, e)
    if axes:
      image_vars.append(jaxpr.eqns[readers[0]].outvars[0])
      expand[k] = axes
      skipped.add(readers[0])
    else:
      image_vars.append(v)

  # Which equations read an image, directly or through another.
  dependent = set(image_vars)
  dep_eqns, static_eqns = [], []
  for i, e in enumerate(jaxpr.eqns):
    if i in skipped:
      continue
    if any(not isinstance(v, _compat.Literal) and v in dependent for v in e.invars):
      dependent.update(e.outvars)
      dep_eqns.append(i)
    else:
      static_eqns.append(i)
  if jaxpr.outvars[0] not in dependent:
    raise StreamError("stream: fun's output does not depend on the image arguments.")
  return _Traced(closed, leaves, tuple(images), tuple(image_vars), expand,
                 tuple(dep_eqns), tuple(static_eqns))


def window_broadcasts(jaxpr, dep_eqns, static_eqns, layout) -> dict[int, list[int]]:
  """Per image equation, the broadcasts that read no image and only it reads, of a small value
  to its shape (a bias or a norm's weight broadcast to the activation's shape, standing before
  its reader: `canonical.place_broadcasts`). The tile program makes them on each window, as a
  region does, instead of reading a full-size value computed once."""
  made = {jaxpr.eqns[j].outvars[0]: j for j in static_eqns if len(jaxpr.eqns[j].outvars) == 1}
  uses = region_lib._uses(jaxpr)
  found: dict[int, list[int]] = {}
  for i in dep_eqns:
    for v in jaxpr.eqns[i].invars:
      j = None if isinstance(v, _compat.Literal) else made.get(v)
      if (j is not None and uses.get(v) == [i]
          and region_lib._small_broadcast(jaxpr.eqns[j], layout)):
        found.setdefault(i, []).append(j)
  return found


def starts_stage(jaxpr, kind: Optional[str], current) -> bool:
  """Whether an equation of `kind` (`_stage_kind`) starts a new stage after the equations
  `current` of the stage so far: a transposed conv or upsampling after a conv, as
  `region.stages_of` cuts."""
  return kind == "transposed" and any(_compat.is_conv(jaxpr.eqns[j]) for j in current)


def carried(jaxpr, stages: Sequence[Sequence[int]]) -> list[int]:
  """The equations of `stages` whose value a later stage reads, other than the last value of a
  stage read by the next (a skip connection spanning an upsampling), in order. The tile program
  cannot carry such a value from one stage to a later one; `spill` cuts the function after each
  and reads the value back as an image of the part after it."""
  made_by = {jaxpr.eqns[j].outvars[0]: (k, j) for k, members in enumerate(stages)
             for j in members}
  found = set()
  for k, members in enumerate(stages):
    for j in members:
      for v in jaxpr.eqns[j].invars:
        source = None if isinstance(v, _compat.Literal) else made_by.get(v)
        if source is not None and source[0] < k and not (
            source[0] == k - 1 and source[1] == stages[k - 1][-1]):
          found.add(source[1])
  return sorted(found)


def _stages(closed, leaves, images, image_vars, expand, dep_eqns, static_eqns, out,
            squeeze) -> tuple[_Analysis, list]:
  """The image equations cut into stages of one chain, or `NotLocalError`."""
  jaxpr = closed.jaxpr
  # Stages: a new one at every transposed conv; every equation must be local, in the layout of
  # the first conv (the ops before it too).
  stages, current = [], []
  first_conv = next((jaxpr.eqns[i] for i in dep_eqns if _compat.is_conv(jaxpr.eqns[i])), None)
  layout = None if first_conv is None else region_lib._conv_layout(first_conv)[0]
  on_windows = ({} if layout is None else
                window_broadcasts(jaxpr, dep_eqns, static_eqns, layout))
  for i in dep_eqns:
    e = jaxpr.eqns[i]
    kind = _stage_kind(e, layout)
    if kind is None:
      raise NotLocalError(
          f"stream: fun is not spatially local: {_where(e)} mixes positions of the image "
          f"(output {e.outvars[0].aval.str_short()}). A tile program holds convs, pools, "
          "elementwise ops, channel concatenations, nearest upsampling, zero pads and crops; "
          "norms, reductions over space, reshapes and other gathers need the whole image. With "
          "spill=True (the default) stream runs such a function in segments, spilling "
          "full-size values to the host.", e)
    if starts_stage(jaxpr, kind, current):
      stages.append(current)
      current = []
    if _compat.is_conv(e):
      layout = region_lib._conv_layout(e)[1]
    current += [*on_windows.get(i, []), i]
  if not any(_compat.is_conv(jaxpr.eqns[j]) for j in current):
    if not stages:
      raise StreamError("stream: fun has no conv on the image; there is nothing to tile (run it "
                        "on the whole image instead).")
    stages[-1] += current  # trailing elementwise ops (a final activation) join the last stage
  else:
    stages.append(current)
  if stages[-1][-1] != dep_eqns[-1] or jaxpr.eqns[stages[-1][-1]].outvars[0] is not out:
    raise StreamError("stream: fun's output must be the value its last image equation makes.")

  # Each stage reads the last value of the stage before and images alone: a value a later
  # stage reads is carried across a transposed conv, which spill cuts the function after.
  moved = {j for js in on_windows.values() for j in js}
  static_eqns = [j for j in static_eqns if j not in moved]
  across = carried(jaxpr, stages)
  if across:
    e = jaxpr.eqns[across[0]]
    raise NotLocalError(
        f"stream: the value {_where(e)} makes is read after a transposed conv or upsampling "
        "that follows it (a skip connection spanning an upsampling); one tile program cannot "
        "carry it. With spill=True (the default) stream cuts fun after it: the part before "
        "writes it to the host, and the part after reads it as an image.", e,
        "is read across an upsampling (a skip connection)")
  spatial = set(region_lib._conv_layout(first_conv)[0].spatial)
  for k, axes in expand.items():
    if spatial & set(axes):
      raise StreamError(f"stream: fun adds a unit axis to image {k} along a spatial axis of its "
                        "convs; stream reads images with their own spatial axes.")
  analysis = _Analysis(closed, tuple(images), tuple(map(tuple, stages)),
                       tuple(static_eqns), out.aval, tuple(image_vars), expand, squeeze,
                       jaxpr.outvars[0].aval)
  return analysis, leaves


def _plan_chain(analysis: _Analysis, policy: decide_lib.Policy, tile) -> region_lib.Chain:
  """The stages planned for output tile `tile` (`region.plan_chain`)."""
  members = [i for stage in analysis.stages for i in stage]
  chain = region_lib.plan_chain(analysis.closed.jaxpr, members, policy, "jaxtile/stream",
                                tile=tile)
  if chain is None or len(chain.stages) != len(analysis.stages):
    raise StreamError("stream: the image equations cannot be tiled as a chain of regions (an "
                      "operand of full size that is neither the image nor the stage before's "
                      "output).")
  jaxpr = analysis.closed.jaxpr
  for v in chain.inputs:
    if v not in analysis.image_vars:  # read a window at a time: only an image can be
      reader = next(e for e in jaxpr.eqns if any(u is v for u in e.invars))
      raise StreamError(
          f"stream: {_where(reader)} reads {v.aval.str_short()}, a value of the image's size "
          "that is no image: made from fun's other arguments (parameters, device arrays), it "
          "would be read whole. Pass it as an image (a NumPy or on-disk array, or name its "
          "argument in argnums).")
  return chain


def make_plan(analysis: _Analysis, policy: decide_lib.Policy, chunks=None) -> StreamPlan:
  """The output tile: the largest within `policy.max_bytes` (every stage's `tile_bytes`), halving
  the largest dim; or `policy.tile_shape`. Rounded down to whole chunks of `chunks` (the
  output store's) where a tile spans at least one."""
  jaxpr = analysis.closed.jaxpr
  out = jaxpr.eqns[analysis.stages[-1][-1]].outvars[0]
  layout = region_lib._conv_layout(next(
      jaxpr.eqns[j] for j in analysis.stages[-1] if _compat.is_conv(jaxpr.eqns[j])))[1]
  extent = [out.aval.shape[a] for a in layout.spatial]
  if any(n == 0 for n in extent):
    raise StreamError(f"stream: fun's output {out.aval.str_short()} is empty: the image is "
                      "smaller than the network's receptive field.")
  if isinstance(policy.tile_shape, int):
    policy = dataclasses.replace(policy, tile_shape=(policy.tile_shape,) * len(extent))
  if policy.tile_shape is not None:
    if len(policy.tile_shape) != len(extent):
      raise StreamError(f"stream: tile_shape={policy.tile_shape!r} has {len(policy.tile_shape)} "
                        f"entries, but the output has {len(extent)} spatial dims {extent}.")
    tile = [n if t is None else min(t, n) for t, n in zip(policy.tile_shape, extent)]
    chain = _plan_chain(analysis, policy, tile)
  else:
    tile = list(extent)
    while True:
      chain = _plan_chain(analysis, policy, tile)
      if chain.tile_bytes <= policy.max_bytes:
        break
      d = max(range(len(tile)), key=lambda d: tile[d])
      if tile[d] == 1:
        need = chain.tile_bytes
        raise decide_lib.BudgetError(
            f"stream: one output position needs {need} bytes on the device (windows through "
            f"every stage), above max_bytes={policy.max_bytes}. Raise max_bytes.",
            max_bytes=policy.max_bytes, smallest_bytes=need)
      tile[d] = region_lib._ceil_div(tile[d], 2)
  if chunks is not None:
    aligned = list(tile)
    for d, a in enumerate(layout.spatial):
      c = chunks[a]
      if aligned[d] >= c:
        aligned[d] = aligned[d] // c * c
    if aligned != tile:
      tile = aligned
      chain = _plan_chain(analysis, policy, tile)
  counts = tuple(region_lib._ceil_div(n, t) for n, t in zip(extent, tile))
  return StreamPlan(chain=chain,
                    image_shapes=tuple(tuple(jaxpr.invars[i].aval.shape)
                                       for i in analysis.image_leaves),
                    result_shape=tuple(analysis.result_aval.shape),
                    out_shape=tuple(out.aval.shape), out_dtype=np.dtype(out.aval.dtype),
                    tile=tuple(tile), counts=counts, max_bytes=policy.max_bytes)


# ---------------------------------------------------------------------------------------------
# The tile program
# ---------------------------------------------------------------------------------------------
def static_values(closed, leaves, images, static_eqns) -> dict:
  """Every value that reads no image (parameters, constants and what is computed from them),
  computed once now, by var."""
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, closed.consts))
  for i, (v, x) in enumerate(zip(jaxpr.invars, leaves)):
    if i not in images:
      env[v] = x
  _compat.eval_eqns([jaxpr.eqns[i] for i in static_eqns], env)
  return env


def _smalls(analysis: _Analysis, leaves, chain: region_lib.Chain) -> tuple:
  """The tile program's small operands (`chain.smalls`)."""
  env = static_values(analysis.closed, leaves, analysis.image_leaves, analysis.static_eqns)
  return tuple(env[v] for v in chain.smalls)


def _program(plan: StreamPlan):
  """The tile program: per stage its image windows (`tile_windows`), the small operands, and
  per stage its offsets -> the output tile. Traced once per tile shape (all tiles share one)."""
  chain = plan.chain

  def run(windows, smalls, offsets):
    return chain.compute(offsets, windows, dict(zip(chain.smalls, smalls)), forms.for_backend())
  return jax.jit(run)


def tile_windows(plan: StreamPlan, offsets, read) -> list[list]:
  """Per stage, the windows of the images it reads (`Chain.read_by`) for the tile at per-stage
  `offsets`: `read(v, starts, widths, spatial)` for each."""
  return [[read(v, p.start(v, offsets[k]), p.width[v], p.layout.spatial)
           for v in plan.chain.read_by(k)] for k, p in enumerate(plan.stages)]


def read_window(source, starts, widths, spatial: Sequence[int]) -> np.ndarray:
  """`source[...]` over `[start, start + width)` along each spatial axis, zeros outside it."""
  index, pads = [slice(None)] * len(source.shape), [(0, 0)] * len(source.shape)
  for s, w, a in zip(starts, widths, spatial):
    n = source.shape[a]
    lo, hi = min(max(s, 0), n), max(min(s + w, n), 0)
    if hi <= lo:
      lo = hi = 0
    index[a] = slice(lo, hi)
    pads[a] = (lo - s if hi > lo else w, s + w - hi if hi > lo else 0)
  block = np.asarray(source[tuple(index)])
  if any(p != (0, 0) for p in pads):
    return np.pad(block, pads)
  return np.ascontiguousarray(block)


#: Host memory for decoded chunks of a chunked image (`_ChunkCache`).
CHUNK_CACHE_BYTES = 256 * 2**20


class _ChunkCache:
  """Windows of a chunked source (a zarr array: `.chunks`), cut from whole chunks kept decoded.

  A window with its halo spans parts of several chunks, and a store decodes every chunk it
  touches whole; neighbouring tiles share chunks, so without a cache each chunk is decoded 3 to
  6 times (`docs/benchmarks.md`, "Streaming"). Chunks are keyed by their index along the spatial
  axes (the others read whole) and dropped least recently used past `max_bytes`; tiles run row
  by row, so a row of chunks across the image is reused by the next row of tiles.
  """

  def __init__(self, source, spatial: Sequence[int], max_bytes: int = CHUNK_CACHE_BYTES):
    self.source, self.spatial, self.max_bytes = source, tuple(spatial), max_bytes
    self.chunks = tuple(int(source.chunks[a]) for a in spatial)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  @staticmethod
  def usable(source, spatial) -> bool:
    chunks = getattr(source, "chunks", None)
    return (isinstance(chunks, tuple) and len(chunks) == len(source.shape)
            and all(isinstance(c, (int, np.integer)) for c in chunks)
            and all(chunks[a] < source.shape[a] for a in spatial))

  def _chunk(self, key) -> np.ndarray:
    with self._lock:
      block = self._cache.get(key)
      if block is not None:
        self._cache.move_to_end(key)
        return block
    index = [slice(None)] * len(self.source.shape)
    for c, k, a in zip(self.chunks, key, self.spatial):
      index[a] = slice(k * c, min((k + 1) * c, self.source.shape[a]))
    block = np.asarray(self.source[tuple(index)])
    with self._lock:
      self._cache[key] = block
      self._bytes += block.nbytes
      while self._bytes > self.max_bytes and len(self._cache) > 1:
        _, old = self._cache.popitem(last=False)
        self._bytes -= old.nbytes
    return block

  def window(self, starts, widths) -> np.ndarray:
    shape = list(self.source.shape)
    for w, a in zip(widths, self.spatial):
      shape[a] = w
    out = np.zeros(shape, self.source.dtype)
    ranges = []
    for s, w, c, a in zip(starts, widths, self.chunks, self.spatial):
      lo, hi = max(s, 0), min(s + w, self.source.shape[a])
      if hi <= lo:
        return out  # all outside the image: zeros
      ranges.append(range(lo // c, (hi - 1) // c + 1))
    for key in itertools.product(*ranges):
      block = self._chunk(key)
      src, dst = [slice(None)] * len(shape), [slice(None)] * len(shape)
      for d, (s, w, c, a) in enumerate(zip(starts, widths, self.chunks, self.spatial)):
        lo = max(s, key[d] * c, 0)
        hi = min(s + w, key[d] * c + block.shape[a])
        src[a] = slice(lo - key[d] * c, hi - key[d] * c)
        dst[a] = slice(lo - s, hi - s)
      out[tuple(dst)] = block[tuple(src)]
    return out


# ---------------------------------------------------------------------------------------------
# Journal: which tiles are written, so an interrupted run resumes
# ---------------------------------------------------------------------------------------------
def _journal_dir(out, journal) -> Optional[pathlib.Path]:
  """Where a run into `out` records its finished tiles: `journal`, else beside a memmap's file or
  a zarr array on a local store; None for in-memory outputs."""
  if journal is not None:
    return pathlib.Path(journal)
  filename = getattr(out, "filename", None)
  if isinstance(out, np.memmap) and filename:
    return pathlib.Path(str(filename) + ".jaxtile")
  root = _store_root(out)
  if root is not None:
    journal = root.with_name(root.name + ".jaxtile")  # beside the store, not inside a group
    path = getattr(out, "path", "") or ""
    return journal / path if path else journal
  return None


def _store_root(out) -> Optional[pathlib.Path]:
  """The directory of a zarr array's local store (zarr 3: `.root`, zarr 2: `.path`), else None."""
  store = getattr(out, "store", None)
  root = getattr(store, "root", None) or getattr(store, "path", None)
  return pathlib.Path(root) if isinstance(root, (str, os.PathLike)) else None


_RUN_ATTR = "jaxtile_stream_run"


def _identity(out, fresh: bool) -> Optional[Any]:
  """What tells this output from one made again at the same path since the journal was written:
  a run id that a fresh run writes into a zarr array's attributes, or a memmap file's inode (the
  file system may reuse an inode, so a memmap's check is best effort)."""
  filename = getattr(out, "filename", None)
  if isinstance(out, np.memmap) and filename:
    try:
      st = os.stat(filename)
    except OSError:
      return None
    return [st.st_dev, st.st_ino]
  attrs = getattr(out, "attrs", None)
  if attrs is None:
    return None
  if fresh:
    attrs[_RUN_ATTR] = os.urandom(8).hex()
  return attrs.get(_RUN_ATTR)


class _Journal:
  """Finished tiles, one line each in a per-process log (`done-<process>.log`) beside
  `plan.json` (a fingerprint of the call). A line is appended only after its tile is written, so
  a tile in the log is whole; one cut short by a kill is computed again."""

  def __init__(self, path: pathlib.Path, fingerprint: str, resume: bool, process: int,
               n_processes: int, out):
    self.path = path
    path.mkdir(parents=True, exist_ok=True)
    meta = path / "plan.json"
    self.done: set[int] = set()
    if resume and meta.exists():
      recorded = json.loads(meta.read_text())
      if recorded.get("fingerprint") != fingerprint:
        raise StreamError(
            f"stream: resume=True, but the journal {path} was written by a different call "
            "(another function, parameters, input shapes, tiles or process count). Pass "
            "resume=False to start over.")
      known = recorded.get("output")  # None: the run that wrote it could not tell
      if known is not None and known != _identity(out, fresh=False):
        raise StreamError(
            f"stream: resume=True, but the journal {path} records tiles of an earlier output at "
            "that path (out was made again since), so they are not in out. Pass resume=False "
            "to start over.")
      for log in path.glob("done-*.log"):
        for line in log.read_text().splitlines():
          if line.strip().isdigit():
            self.done.add(int(line))
      self._log = open(path / f"done-{process}.log", "a")
      return
    # A fresh run: each process empties its own log (a process must not remove a log another
    # has open); process 0 removes those of processes this run does not have.
    self._log = open(path / f"done-{process}.log", "w")
    if process == 0:
      for log in path.glob("done-*.log"):
        index = log.stem.split("-")[-1]
        if index.isdigit() and int(index) >= n_processes:
          log.unlink()
      # The others read what process 0 writes here when they resume.
      tmp = path / f"plan.json.{os.getpid()}"
      tmp.write_text(json.dumps({"fingerprint": fingerprint,
                                 "output": _identity(out, fresh=True)}))
      os.replace(tmp, meta)

  def add(self, tile: int) -> None:
    self._log.write(f"{tile}\n")
    self._log.flush()

  def close(self) -> None:
    self._log.close()


def _fingerprint(analysis: _Analysis, plan: StreamPlan, leaves) -> str:
  h = hashlib.sha256()
  h.update(str(analysis.closed.jaxpr).encode())
  h.update(repr((plan.image_shapes, plan.tile, plan.counts, plan.out_shape,
                 str(plan.out_dtype), jax.process_count())).encode())
  for x in [*analysis.closed.consts,
            *(x for i, x in enumerate(leaves) if i not in analysis.image_leaves)]:
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class _Progress:
  """Tiles done / total, megapixels per second and ETA: tqdm where installed, else a line on
  stderr every few seconds."""

  def __init__(self, enabled: Optional[bool], total: int, done: int):
    if enabled is None:
      enabled = sys.stderr.isatty()
    self.enabled, self.total, self.initial = enabled, total, done
    self.count, self.start, self.last = done, time.perf_counter(), 0.0
    self.bar = None
    if enabled:
      try:
        import tqdm
        self.bar = tqdm.tqdm(total=total, initial=done, unit="tile", desc="jaxtile.stream",
                             dynamic_ncols=True)
      except ImportError:
        pass

  def update(self, pixels: int) -> None:
    """One more tile written; `pixels` written so far in this run."""
    self.count += 1
    if not self.enabled:
      return
    seconds = time.perf_counter() - self.start
    rate = pixels / 1e6 / max(seconds, 1e-9)
    new_tiles = self.count - self.initial
    if self.bar is not None:
      self.bar.set_postfix_str(f"{rate:.1f} Mpx/s", refresh=False)
      self.bar.update(1)
    elif seconds - self.last >= 2 or self.count == self.total:
      self.last = seconds
      left = (self.total - self.count) * seconds / max(new_tiles, 1)
      print(f"jaxtile.stream: {self.count}/{self.total} tiles, {rate:.1f} Mpx/s, "
            f"ETA {left:.0f} s", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamStats:
  """What the last run did: tiles computed (skipped: already in the journal), output positions
  written, seconds, the seconds the loop waited for reads and for the writer, and output
  megapixels per second."""
  tiles: int = 0
  skipped: int = 0
  pixels: int = 0  # output positions written (spatial, times the batch)
  seconds: float = 0.0
  read_wait: float = 0.0
  write_wait: float = 0.0  # seconds the loop waited for the writer (a slow `out`)
  megapixels_per_second: float = 0.0


class Streamed:
  """`stream(fun, ...)`: call it like `fun`, with `out=`, `resume=`, `progress=`."""

  def __init__(self, fun: Callable, policy: Callable[[], decide_lib.Policy], devices, argnums,
               prefetch: Optional[int], spill: bool = True):
    self.fun, self._policy, self._devices, self._argnums = fun, policy, devices, argnums
    self._prefetch, self._spill = prefetch, spill
    self._segments: dict = {}  # (jaxpr text, index[, "bands"]) -> a spilled segment's program
    self._programs: dict = {}
    self.last_stats: Optional[StreamStats] = None
    self.__wrapped__ = fun

  def _program(self, plan: StreamPlan, analysis: _Analysis):
    """The jitted tile program, one per function structure and tiling: a second call with the
    same shapes reuses its compiled executables (one per device)."""
    key = (str(analysis.closed.jaxpr), plan.image_shapes, plan.tile)
    if key not in self._programs:
      self._programs[key] = _program(plan)
    return self._programs[key]

  def __repr__(self) -> str:
    return f"jaxtile.stream({getattr(self.fun, '__name__', self.fun)!r})"

  def _analyse_and_plan(self, args, out):
    analysis, leaves = _analyse(self.fun, args, self._argnums)
    if out is not None and analysis.squeeze and getattr(out, "shape", None) is not None and len(
        out.shape) + len(analysis.squeeze) == len(analysis.out_aval.shape):
      out = _Squeezed(out, analysis.squeeze)
    chunks = getattr(out, "chunks", None)
    if chunks is not None and (not isinstance(chunks, tuple) or len(chunks) != len(
        analysis.out_aval.shape)):
      chunks = None
    return analysis, leaves, make_plan(analysis, self._policy(), chunks)

  def explain(self, *args, out=None):
    """The `StreamPlan` for these arguments (images as host arrays or `jax.ShapeDtypeStruct`),
    with the compiled tile program's device memory, or a `SpillPlan` for a function that
    spills; computes no tile."""
    args = tuple(_Abstract(a) if isinstance(a, jax.ShapeDtypeStruct) else a for a in args)
    try:
      analysis, leaves, plan = self._analyse_and_plan(args, out)
    except NotLocalError as e:
      if not self._spill:
        raise
      from jaxtile._src import spill as spill_lib  # it builds on this module
      return spill_lib.Spilled(self, e).plan()
    memory = _compiled_bytes(self._program(plan, analysis), plan)
    return dataclasses.replace(plan, device_bytes=memory)

  def __call__(self, *args, out=None, resume: bool = False, progress: Optional[bool] = None,
               journal=None):
    if not isinstance(resume, bool):
      raise TypeError(f"stream: resume must be a bool, but got resume={resume!r}.")
    if progress is not None and not isinstance(progress, bool):
      raise TypeError(f"stream: progress must be True, False or None, but got "
                      f"progress={progress!r}.")
    try:
      analysis, leaves, plan = self._analyse_and_plan(args, out)
    except NotLocalError as e:
      if not self._spill:
        raise
      from jaxtile._src import spill as spill_lib  # it builds on this module
      return spill_lib.Spilled(self, e).run(out, resume, progress, journal)
    for i in analysis.image_leaves:
      if isinstance(leaves[i], _Abstract):
        raise StreamError("stream: an image given as jax.ShapeDtypeStruct has no data to "
                          "stream; pass it to explain() instead.")
    n_proc, proc = jax.process_count(), jax.process_index()
    if out is None:
      if n_proc > 1:
        raise StreamError("stream: several processes need out= (a store they all write, such "
                          "as a zarr array on shared disk); each holds only its share of tiles.")
      if resume:
        raise StreamError("stream: resume=True needs out= on disk (a zarr array or a "
                          "numpy.memmap) to resume into.")
      out = np.zeros(analysis.result_aval.shape, plan.out_dtype)
      returned = out
    else:
      _check_out(out, tuple(analysis.result_aval.shape), plan.out_dtype)
      returned = None
    sink = _Squeezed(out, analysis.squeeze) if analysis.squeeze else out
    if n_proc > 1:
      _check_aligned(sink, plan)
    devices = self._devices or jax.local_devices()
    journal_dir = _journal_dir(out, journal)
    if resume and journal_dir is None:
      raise StreamError(f"stream: resume=True, but out (a {type(out).__name__}) is not on disk, so "
                        "there is no record of finished tiles. Pass journal=PATH, or write to a "
                        "zarr array or numpy.memmap.")
    smalls = _smalls(analysis, leaves, plan.chain)
    log = None
    if journal_dir is not None:
      log = _Journal(journal_dir, _fingerprint(analysis, plan, leaves), resume, proc, n_proc,
                     out)
    mine = [t for t in range(plan.n_tiles) if t % n_proc == proc]
    todo = [t for t in mine if log is None or t not in log.done]
    stats = StreamStats(skipped=len(mine) - len(todo))
    try:
      _run(plan, analysis, leaves, smalls, sink, todo, devices, log, stats,
           _Progress(progress, len(mine), len(mine) - len(todo)), self._program(plan, analysis),
           self._prefetch)
    finally:
      if log is not None:
        log.close()
    self.last_stats = stats
    flush = getattr(out, "flush", None)
    if isinstance(out, np.memmap) and flush is not None:
      flush()
    return returned


class _Abstract:
  """A `jax.ShapeDtypeStruct` standing for an image in `explain`."""

  def __init__(self, s):
    self.shape, self.dtype = tuple(s.shape), np.dtype(s.dtype)

  def __getitem__(self, index):
    raise TypeError("an abstract image has no data")


def _compiled_bytes(program, plan: StreamPlan) -> int:
  def read(v, starts, widths, spatial):
    shape = list(v.aval.shape)
    for a, w in zip(spatial, widths):
      shape[a] = w
    return jax.ShapeDtypeStruct(tuple(shape), v.aval.dtype)

  windows = tile_windows(plan, [(0,) * len(plan.tile)] * len(plan.stages), read)
  smalls = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in plan.chain.smalls)
  offsets = [jax.ShapeDtypeStruct((len(plan.tile),), jnp.int32) for _ in plan.stages]
  compiled = program.lower(windows, smalls, offsets).compile()
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _check_out(out, shape: tuple[int, ...], dtype) -> None:
  got = tuple(getattr(out, "shape", ()))
  if got != shape:
    raise StreamError(f"stream: out has shape {got}, but fun's output is {shape}.")
  got = getattr(out, "dtype", None)
  if got is None or np.dtype(got) != dtype:
    raise StreamError(f"stream: out has dtype {got}, but fun's output is {dtype}.")
  if not hasattr(out, "__setitem__"):
    raise StreamError(f"stream: out (a {type(out).__name__}) does not take out[index] = block.")
  if isinstance(out, np.ndarray) and not out.flags.writeable:
    raise StreamError(f"stream: out (a {type(out).__name__}) is read-only; open it for writing "
                      "(a memmap with mode='r+' or 'w+').")


def _write_grid(out) -> Optional[tuple[int, ...]]:
  """The blocks a chunked `out` (a zarr array) rewrites whole for a partial write: its shards
  where it has them, else its chunks; None for an array that writes in place."""
  grid = getattr(out, "shards", None) or getattr(out, "chunks", None)
  return tuple(grid) if isinstance(grid, tuple) and len(grid) == len(out.shape) else None


def _check_aligned(out, plan: StreamPlan) -> None:
  """Processes must not write parts of one chunk: their read-modify-writes would race."""
  chunks = _write_grid(out)
  if chunks is None:
    return
  for d, a in enumerate(plan.layout.spatial):
    if plan.counts[d] > 1 and plan.tile[d] % chunks[a]:
      raise StreamError(
          f"stream: with {jax.process_count()} processes, output tiles must be whole chunks of "
          f"out, but tiles are {plan.tile} and out's chunks {tuple(chunks)}. Make the chunks "
          "divide the tile (or pass tile_shape= as a multiple of them).")


class _ChunkLocks:
  """A lock per chunk of a chunked `out` along the spatial dims. A chunked store (a zarr
  array) writes part of a chunk by reading, updating and rewriting the whole chunk (a zarr
  shard, where it has them), so two writer threads with parts of one chunk would lose one's
  part: a tile's writer holds the locks of the chunks its box touches, taken in order."""

  def __init__(self, out, spatial: Sequence[int]):
    grid = _write_grid(out)
    self.grid = None if grid is None else tuple(grid[a] for a in spatial)
    self._locks: dict = collections.defaultdict(threading.Lock)
    self._lock = threading.Lock()

  def of(self, start, stop) -> list:
    """The locks of the chunks that the box [start, stop) (per spatial dim) touches."""
    if self.grid is None:
      return []
    keys = itertools.product(*(range(a // c, -(-b // c))
                               for a, b, c in zip(start, stop, self.grid)))
    with self._lock:
      return [self._locks[k] for k in sorted(keys)]


def _io_threads() -> int:
  """Readers (and writers): half the host's cores, at least 2 and at most 8."""
  return max(2, min(8, (os.cpu_count() or 2) // 2))


def _run(plan, analysis, leaves, smalls, out, todo, devices, log, stats, progress, program,
         prefetch):
  """Reads the next tiles and writes the last ones on threads while the devices compute.

  Reading and writing a store (decoding and encoding its chunks) is CPU work that the store
  libraries do outside the GIL, so `io_threads` readers and as many writers run at once; with a
  fast device they, not the device, set the pace (`docs/benchmarks.md`, "Streaming").
  """
  io_threads = _io_threads()
  prefetch = prefetch or 2 * io_threads
  first = plan.stages[0]
  sources = [_Expanded(leaves[i], analysis.expand[k]) if k in analysis.expand else leaves[i]
             for k, i in enumerate(analysis.image_leaves)]
  by_var = dict(zip(analysis.image_vars, sources))
  spatial = first.layout.spatial
  out_spatial = plan.layout.spatial
  batch = plan.out_shape[plan.layout.batch]
  placed = {d: jax.device_put(smalls, d) for d in devices}
  start_time = time.perf_counter()

  caches = {v: _ChunkCache(by_var[v], spatial) for v in plan.chain.inputs
            if _ChunkCache.usable(by_var[v], spatial)}

  def window(v, starts, widths, spatial):
    return (caches[v].window(starts, widths) if v in caches else
            read_window(by_var[v], starts, widths, spatial))

  def read(t):
    offsets = plan.offsets(plan.tile_index(t))
    return tile_windows(plan, offsets, window), offsets

  errors: list[BaseException] = []
  # Results waiting for a writer: each holds a tile on its device, so the queue bounds them.
  pending: queue.Queue = queue.Queue(maxsize=len(devices) + io_threads)
  done = threading.Lock()
  chunk_locks = _ChunkLocks(out, out_spatial)

  def write_loop():
    while True:
      item = pending.get()
      if item is None:
        return
      if errors:
        continue  # drain after a failure
      try:
        t, y, offsets = item
        index = plan.tile_index(t)
        start, stop = plan.write_box(index)
        tile = np.asarray(y)
        cut = [slice(None)] * tile.ndim
        target = [slice(None)] * tile.ndim
        for d, a in enumerate(out_spatial):
          begin = start[d] - offsets[-1][d]
          cut[a] = slice(begin, begin + stop[d] - start[d])
          target[a] = slice(start[d], stop[d])
        locks = chunk_locks.of(start, stop)  # tiles write disjoint boxes, chunks may be shared
        for lock in locks:
          lock.acquire()
        try:
          out[tuple(target)] = tile[tuple(cut)]
        finally:
          for lock in locks:
            lock.release()
        with done:
          if log is not None:
            log.add(t)
          stats.tiles += 1
          stats.pixels += math.prod(b - a for a, b in zip(start, stop)) * batch
          progress.update(stats.pixels)
      except BaseException as e:  # surfaced by the main thread
        errors.append(e)

  writers = [threading.Thread(target=write_loop, name=f"jaxtile-stream-writer{i}", daemon=True)
             for i in range(io_threads)]
  for w in writers:
    w.start()
  reader = concurrent.futures.ThreadPoolExecutor(max_workers=io_threads,
                                                 thread_name_prefix="jaxtile-stream-reader")
  ahead = collections.deque()
  try:
    it = iter(enumerate(todo))
    for _ in range(prefetch):
      nxt = next(it, None)
      if nxt is not None:
        ahead.append((nxt, reader.submit(read, nxt[1])))
    while ahead:
      (n, t), future = ahead.popleft()
      nxt = next(it, None)
      if nxt is not None:
        ahead.append((nxt, reader.submit(read, nxt[1])))
      waited = time.perf_counter()
      windows, offsets = future.result()
      stats.read_wait += time.perf_counter() - waited
      if errors:
        break
      device = devices[n % len(devices)]
      args = jax.device_put((windows, [np.asarray(o, np.int32) for o in offsets]), device)
      y = program(args[0], placed[device], args[1])  # dispatched; runs while we read on
      waited = time.perf_counter()
      pending.put((t, y, offsets))  # blocks while the writer is behind
      stats.write_wait += time.perf_counter() - waited
  finally:
    for _, future in ahead:
      future.cancel()
    reader.shutdown(wait=True)
    for _ in writers:
      pending.put(None)
    for w in writers:
      w.join()
    progress.close()
  stats.seconds = time.perf_counter() - start_time
  stats.megapixels_per_second = stats.pixels / 1e6 / max(stats.seconds, 1e-9)
  if errors:
    raise errors[0]


def stream(fun: Optional[Callable] = None, /, *, max_bytes: Optional[int] = None,
           tile_shape=None, devices: Optional[Sequence[jax.Device]] = None,
           argnums: Optional[Sequence[int]] = None, prefetch: Optional[int] = None,
           spill: bool = True):
  """Runs `fun` over images on the host or on disk, a tile at a time.

  `fun` is an ordinary JAX function of spatially local ops (convs of every form, pools,
  elementwise ops, channel concatenations). Its *images* are the arguments that slice like NumPy
  arrays but are not `jax.Array`s (`numpy.ndarray`, `numpy.memmap`, zarr, tensorstore, h5py,
  dask arrays), or those named by `argnums`; its other arguments (parameters) are device arrays,
  and leaves that are no arrays (an equinox module's functions) are static, as in `tile_convs`.
  Each output tile's input window, halo included and zeros beyond the image, is read from the
  images, computed by one compiled tile program, and written to `out`, so no device ever holds
  more than a few tiles. The result equals `fun` on the whole image.

  Args:
    fun: the function; its one output is the streamed image.
    max_bytes: the budget of one tile through the program (the largest input and output window
      of any one op, as `tile_convs` counts it). Default: `jaxtile.default_max_bytes()`.
    tile_shape: the output tile per spatial dim instead (None entries: the whole dim).
    devices: where tiles run, dealt out in turn. Default: every local device. In a
      `jax.distributed` job each process takes every `process_count()`-th tile.
    argnums: positional arguments that are images, when the default rule does not fit.
    prefetch: tiles read ahead of the one computing (default: twice the I/O threads, which are
      half the host's cores, 2 to 8).
    spill: a function with ops that need the whole image (a norm's statistics, a reduction
      over space) runs in segments: its local parts streamed, the rest whole on the host's CPU,
      full-size values between them in host memory or temporary files (`jaxtile._src.spill`;
      `explain` returns a `SpillPlan`). False: such a function raises `StreamError`.

  Returns:
    A callable `streamed(*args, out=None, resume=False, progress=None, journal=None)`. `out` is
    anything that takes `out[index] = block` with fun's output shape and dtype (a zarr array, a
    memmap, a NumPy array); without it the output is returned as a NumPy array. A run into an
    `out` on disk records finished tiles in a journal beside it (or at `journal`); with
    `resume=True` a rerun of the same call computes only the missing tiles. `progress` shows a
    bar (tqdm when installed): None shows it on a terminal. `streamed.explain(*args)` returns the
    `StreamPlan` (a `SpillPlan` for a function that spills) without computing, and
    `streamed.last_stats` the last run's `StreamStats`.
  """
  if fun is None:
    return lambda f: stream(f, max_bytes=max_bytes, tile_shape=tile_shape, devices=devices,
                            argnums=argnums, prefetch=prefetch, spill=spill)
  if not callable(fun):
    raise TypeError(f"stream: fun must be callable, but got {fun!r}.")
  from jaxtile._src import api  # the policy's validation, shared with tile_convs
  try:
    policy = api.make_policy(max_bytes=max_bytes, tile_shape=tile_shape)
  except (TypeError, ValueError) as e:
    raise type(e)(str(e).replace("tile_convs:", "stream:", 1)) from None
  if devices is not None:
    if isinstance(devices, jax.Device):
      devices = [devices]
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
      raise TypeError(f"stream: devices must be a non-empty sequence of jax.Device, but got "
                      f"devices={devices!r}.")
    devices = list(devices)
  if argnums is not None:
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not all(isinstance(n, int) for n in argnums):
      raise TypeError(f"stream: argnums must be ints, but got argnums={argnums!r}.")
  if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool)
                               or prefetch < 1):
    raise ValueError(f"stream: prefetch must be a positive int or None, but got "
                     f"prefetch={prefetch!r}.")
  if not isinstance(spill, bool):
    raise TypeError(f"stream: spill must be a bool, but got spill={spill!r}.")
  return Streamed(fun, policy, devices, argnums, prefetch, spill)
