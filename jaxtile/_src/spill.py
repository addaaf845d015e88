"""Spilling: `stream` for a function that is not one chain of tiles.

When the image's equations hold an op that needs the whole image (a norm's statistics, a
reduction over space, a reshape), `stream` cuts them into *segments* at such ops, in order: runs
of local equations and runs of the others. A local segment with one output streams tile by tile
on the device (`Streamed`, its own tile program), into a temporary `.npy` file on the host's
disk, or into `out` when it is the last. A segment of a norm's statistics (elementwise ops and
reductions over the image) runs in passes over bands of rows on the device (`bands`), its
full-size results into temporary files too; any other segment runs whole on the host's CPU
(`jax.devices("cpu")`), its results in host memory. A full-size value between segments thus
lives on the host, in memory or a temporary file, never on the device; `explain` says which.
Only the last segment writes `out` and keeps a journal, so a resumed run computes the segments
before it again.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import tempfile
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxtile._src import _compat
from jaxtile._src import bands as bands_lib
from jaxtile._src import region as region_lib
from jaxtile._src import stream as stream_lib


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
  """Consecutive image equations of one kind: `local` ones stream, the others run whole."""
  eqns: tuple[int, ...]
  local: bool
  inputs: tuple[Any, ...]  # full-size values it reads: images or earlier segments' outputs
  smalls: tuple[Any, ...]  # values of no image: parameters and what is computed from them
  outputs: tuple[Any, ...]  # its values read by later segments, or fun's output


@dataclasses.dataclass(frozen=True, eq=False)
class SpillPlan:
  """What `stream` does with a function that needs the whole image somewhere: its segments, how
  each runs (a `StreamPlan`, a `BandPlan`, or None: whole, on the host's CPU), and the full-size
  values kept on the host between them. `str()` prints it."""
  segments: tuple[Segment, ...]
  plans: tuple[Any, ...]  # per segment
  first_global: str  # the first op that cannot be tiled, its source line and why
  result: Any  # fun's output aval
  _names: tuple = ()  # per segment, its equations' primitives

  def __str__(self) -> str:
    mib = lambda aval: math.prod(aval.shape) * np.dtype(aval.dtype).itemsize / 2**20
    lines = [f"stream: -> {'x'.join(map(str, self.result.shape))} {self.result.dtype} in "
             f"{len(self.segments)} segments: {self.first_global}, so "
             "full-size values between segments are spilled to the host, never to the device"]
    for k, (segment, plan) in enumerate(zip(self.segments, self.plans)):
      if isinstance(plan, bands_lib.BandPlan):
        lines.append(f"  segment {k}: {plan}")
      elif plan is not None:
        body = str(plan).replace("\n", "\n    ")
        lines.append(f"  segment {k}: streamed on the device, tile by tile\n    {body}")
      else:
        ops = ", ".join(dict.fromkeys(self._names[k]))
        lines.append(f"  segment {k}: whole, on the host's CPU ({ops})")
      last = k == len(self.segments) - 1
      for v in segment.outputs:
        spilled = plan is not None and (not isinstance(plan, bands_lib.BandPlan)
                                        or v in plan.band_pos)
        where = "out" if last else ("a temporary file" if spilled else "host memory")
        lines.append(f"    -> {v.aval.str_short()} ({mib(v.aval):.1f} MiB) to {where}")
    return "\n".join(lines)


def segments(traced: stream_lib._Traced) -> list[Segment]:
  """The image equations cut into runs of local and other equations (see the module)."""
  jaxpr = traced.closed.jaxpr
  layout = _layout(traced)
  full = _full_size(traced, layout)
  runs: list[list[int]] = []
  kinds: list[bool] = []
  # Broadcasts of small values to an activation's shape run with their reader, on its windows.
  on_windows = ({} if layout is None else stream_lib.window_broadcasts(
      jaxpr, traced.dep_eqns, traced.static_eqns, layout))
  # Arithmetic on statistics alone (a mean's division, a broadcast of a pooled vector) runs
  # with the reductions that make them, not among the local equations the jaxpr interleaves
  # them with: a local run then has one output, and streams.
  statistic = lambda e: not any(full(v) for v in [*e.outvars, *_compat.input_vars(e)])
  order: list[int] = []
  for i in traced.dep_eqns:
    e = jaxpr.eqns[i]
    at = len(order)
    if statistic(e):
      made = {v for j in order for v in jaxpr.eqns[j].outvars}
      reads = set(_compat.input_vars(e)) & made
      at = max((n + 1 for n, j in enumerate(order)
                if reads & set(jaxpr.eqns[j].outvars)), default=0)
    order.insert(at, i)
  for i in order:
    local = (stream_lib._stage_kind(jaxpr.eqns[i], layout) is not None
             and not statistic(jaxpr.eqns[i]))
    if not runs or kinds[-1] != local:
      runs.append([])
      kinds.append(local)
    runs[-1] += [*on_windows.get(i, []), i]
  # A value a later stage reads across a transposed conv or upsampling (a UNet's skip) is
  # the output of its own segment: the part after reads it back as an image.
  if layout is not None:
    parts = [(part, local) for run, local in zip(runs, kinds)
             for part in (_cut_carried(jaxpr, run, layout) if local else [run])]
    runs, kinds = [p for p, _ in parts], [k for _, k in parts]
  # A local run without a conv has nothing to tile (a norm's elementwise ops on its
  # statistics): it runs whole, in one segment with the whole runs beside it.
  merged_runs, merged_kinds = [], []
  for run, local in zip(runs, kinds):
    local = local and any(_compat.is_conv(jaxpr.eqns[i]) for i in run)
    if merged_runs and not local and not merged_kinds[-1]:
      merged_runs[-1] += run
    else:
      merged_runs.append(list(run))
      merged_kinds.append(local)
  runs, kinds = merged_runs, merged_kinds
  uses = region_lib._uses(jaxpr)
  for n in range(len(runs) - 1):
    if kinds[n] and not kinds[n + 1]:
      _one_output(jaxpr, runs[n], runs[n + 1], uses)
  dependent = {v for i in traced.dep_eqns for v in jaxpr.eqns[i].outvars if full(v)}
  dependent.update(traced.image_vars)
  out = []
  for run, local in zip(runs, kinds):
    made = {v for i in run for v in jaxpr.eqns[i].outvars}
    reads = dict.fromkeys(v for i in run for v in jaxpr.eqns[i].invars
                          if not isinstance(v, _compat.Literal) and v not in made)
    outputs = _outputs(jaxpr, run, uses)
    out.append(Segment(tuple(run), local, tuple(v for v in reads if v in dependent),
                       tuple(v for v in reads if v not in dependent), outputs))
  return out


def _outputs(jaxpr, run: Sequence[int], uses) -> tuple:
  """The values `run` makes that other runs read (later ones: runs are in dependency order)."""
  inside = set(run)
  return tuple(v for v in dict.fromkeys(v for i in run for v in jaxpr.eqns[i].outvars)
               if any(u not in inside for u in uses.get(v, [])))


def _one_output(jaxpr, run: list[int], after: list[int], uses) -> None:
  """Moves equations of `run` (local) to the start of `after` (the whole run after it) until
  `run` has one output, so that it streams: a conv's output and its square, both read by a
  norm after it (flax's LayerNorm), leave the square to the norm's segment. Only equations
  that are no conv and that nothing in `run` reads move, those read by `after` alone first."""
  while len(_outputs(jaxpr, run, uses)) > 1:
    inside = set(run)
    read = {v for i in run for v in _compat.input_vars(jaxpr.eqns[i])}
    movable = [i for i in run if not _compat.is_conv(jaxpr.eqns[i])
               and not any(v in read for v in jaxpr.eqns[i].outvars)]
    if not movable:
      return
    by_after = set(after)
    alone = [i for i in movable if all(u in by_after or u in inside
                                       for v in jaxpr.eqns[i].outvars for u in uses.get(v, []))]
    i = (alone or movable)[-1]
    run.remove(i)
    after.insert(0, i)


def _full_size(traced: stream_lib._Traced, layout) -> Callable[[Any], bool]:
  """Whether a value is full-size: an image, or what image equations make at the activations'
  rank unless it is small (a norm's statistics: size 1 along every spatial dim). Segments take
  the others like parameters: statistics of another rank ((N,) or (N, C) after a global pool),
  or what only whole segments read (a reshape to (N, H * W, C) for attention)."""
  images = set(traced.image_vars)
  rank = None if layout is None else len(layout.spatial) + 2
  return lambda v: v in images or not isinstance(v, _compat.Literal) and (
      rank is None or len(v.aval.shape) == rank
      and not region_lib._is_small(v.aval, layout, rank))


def _layout(traced: stream_lib._Traced) -> Optional[region_lib.Layout]:
  """The layout of the first conv's input, None without a conv."""
  eqns = [traced.closed.jaxpr.eqns[i] for i in traced.dep_eqns]
  first_conv = next((e for e in eqns if _compat.is_conv(e)), None)
  return None if first_conv is None else region_lib._conv_layout(first_conv)[0]


def _cut_carried(jaxpr, run: list[int], layout) -> list[list[int]]:
  """`run`, local equations, cut after each value that a later stage of its part reads
  (`stream.carried`), first made first."""
  pieces = []
  while True:
    stages, current, now = [], [], layout
    for i in run:
      e = jaxpr.eqns[i]
      if stream_lib.starts_stage(jaxpr, stream_lib._stage_kind(e, now), current):
        stages.append(current)
        current = []
      if _compat.is_conv(e):
        now = region_lib._conv_layout(e)[1]
      current.append(i)
    across = stream_lib.carried(jaxpr, [*stages, current])
    if not across:
      return [*pieces, run]
    cut = run.index(across[0]) + 1
    pieces.append(run[:cut])
    run = run[cut:]


def _segment_fun(jaxpr, segment: Segment):
  """`segment` as a function of its inputs, then its small operands."""
  def fun(*values):
    env = dict(zip((*segment.inputs, *segment.smalls), values))
    _compat.eval_eqns([jaxpr.eqns[i] for i in segment.eqns], env)
    outs = tuple(env[v] for v in segment.outputs)
    return outs[0] if len(outs) == 1 else outs
  return fun


class Spilled:
  """The segments of one call, with a sub-`Streamed` per local segment."""

  def __init__(self, streamed: stream_lib.Streamed, error: stream_lib.NotLocalError):
    self.streamed = streamed
    self.traced = error.traced
    self.segments = segments(self.traced)
    in_segments = {i for s in self.segments for i in s.eqns}
    self.statics = stream_lib.static_values(
        self.traced.closed, self.traced.leaves, self.traced.images,
        [i for i in self.traced.static_eqns if i not in in_segments])
    self.first_global = f"{stream_lib._where(error.eqn)} {error.reason}"
    jaxpr = self.traced.closed.jaxpr
    # One sub-`Streamed` per segment, kept by `streamed` for calls of the same function at the
    # same shapes, so that their compiled tile programs are reused too.
    self.text = text = str(jaxpr)
    self.subs = []
    for k, s in enumerate(self.segments):
      sub = None
      if s.local and len(s.outputs) == 1:
        sub = streamed._segments.get((text, k))
        if sub is None:
          sub = streamed._segments[text, k] = stream_lib.Streamed(
              _segment_fun(jaxpr, s), streamed._policy, streamed._devices,
              tuple(range(len(s.inputs))), streamed._prefetch, spill=False)
      self.subs.append(sub)
    # A segment that cannot stream tile by tile runs in bands of rows where it can (`bands`).
    layout, max_bytes = _layout(self.traced), streamed._policy().max_bytes
    self.bands = [
        None if sub is not None or layout is None else bands_lib.plan(
            jaxpr, s.eqns, s.inputs, s.outputs, layout, max_bytes)
        for s, sub in zip(self.segments, self.subs)]

  def _smalls(self, segment: Segment, host: Optional[dict] = None) -> list:
    """Its small operands: parameters and their casts (computed once), and small values of the
    image (a norm's statistics) that earlier segments computed (`host`)."""
    if host is None:  # planning: a value of the image only as its shape
      return [self.statics[v] if v in self.statics else
              jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in segment.smalls]
    return [host[v] if v in host else self.statics[v] for v in segment.smalls]

  def plan(self) -> SpillPlan:
    """Each local segment's `StreamPlan` (None where it cannot stream) and each other
    segment's `BandPlan` (None where it runs whole), at abstract shapes."""
    plans = []
    for segment, sub, bands in zip(self.segments, self.subs, self.bands):
      plan = bands
      if sub is not None:
        inputs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in segment.inputs]
        try:
          plan = sub.explain(*inputs, *self._smalls(segment))
        except stream_lib.StreamError:
          plan = None
      plans.append(plan)
    jaxpr = self.traced.closed.jaxpr
    names = tuple(tuple(jaxpr.eqns[i].primitive.name for i in s.eqns) for s in self.segments)
    return SpillPlan(tuple(self.segments), tuple(plans), self.first_global,
                     jaxpr.outvars[0].aval, names)

  def run(self, out, resume: bool, progress, journal):
    jaxpr = self.traced.closed.jaxpr
    if jax.process_count() > 1:
      raise stream_lib.StreamError(
          f"stream: {self.first_global}, and spilling to the host runs in "
          "one process; run it in one process, or stream its local part.")
    result_aval = jaxpr.outvars[0].aval
    if out is None:
      if resume:
        raise stream_lib.StreamError("stream: resume=True needs out= on disk (a zarr array or "
                                     "a numpy.memmap) to resume into.")
      out = returned = np.zeros(result_aval.shape, result_aval.dtype)
    else:
      stream_lib._check_out(out, tuple(result_aval.shape), np.dtype(result_aval.dtype))
      returned = None
    host = {}
    for k, i in enumerate(self.traced.images):
      source = self.traced.leaves[i]
      host[self.traced.image_vars[k]] = (
          stream_lib._Expanded(source, self.traced.expand[k]) if k in self.traced.expand
          else source)
    cpu = jax.devices("cpu")[0]
    device = (self.streamed._devices or jax.local_devices())[0]
    stats = stream_lib.StreamStats()
    with tempfile.TemporaryDirectory(prefix="jaxtile-spill-") as tmp:
      files = itertools.count()
      temporary = lambda v: np.lib.format.open_memmap(
          pathlib.Path(tmp) / f"value{next(files)}.npy", mode="w+", dtype=v.aval.dtype,
          shape=v.aval.shape)
      for k, (segment, sub, bands) in enumerate(zip(self.segments, self.subs, self.bands)):
        last = k == len(self.segments) - 1
        inputs = [host[v] for v in segment.inputs]
        if bands is not None:
          # Its full-size results go to temporary files, or to `out` for the function's.
          sinks = {v: out if last and v is jaxpr.outvars[0] else temporary(v)
                   for v in segment.outputs if v in bands.band_pos}
          smalls = dict(zip(segment.smalls, self._smalls(segment, host)))
          programs = self.streamed._segments.setdefault((self.text, k, "bands"), {})
          known = bands_lib.run(jaxpr, bands, dict(zip(segment.inputs, inputs)), smalls,
                                sinks, device, programs)
          for v in segment.outputs:
            host[v] = sinks[v] if v in sinks else known[v]
          if last and jaxpr.outvars[0] not in sinks:
            out[(slice(None),) * len(out.shape)] = host[jaxpr.outvars[0]]
          continue
        if sub is not None:
          (v,) = segment.outputs
          target = out if last else temporary(v)
          try:
            sub(*inputs, *self._smalls(segment, host), out=target, progress=progress,
                resume=resume and last, journal=journal if last else None)
          except stream_lib.StreamError:
            pass  # not a chain of tiles after all: whole, on the host
          else:
            host[v] = target
            for field in ("tiles", "skipped", "pixels", "seconds", "read_wait", "write_wait"):
              setattr(stats, field, getattr(stats, field) + getattr(sub.last_stats, field))
            continue
        whole = [np.asarray(x[(slice(None),) * len(x.shape)]) for x in inputs]
        values = jax.device_put([*whole, *self._smalls(segment, host)], cpu)
        outs = jax.jit(_segment_fun(jaxpr, segment))(*values)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for v, value in zip(segment.outputs, outs):
          host[v] = np.asarray(value)
        if last:
          out[(slice(None),) * len(out.shape)] = host[jaxpr.outvars[0]]
    stats.megapixels_per_second = stats.pixels / 1e6 / max(stats.seconds, 1e-9)
    self.streamed.last_stats = stats
    return returned
