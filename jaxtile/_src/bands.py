"""Bands: a spilled segment that needs the whole image, computed a band of rows at a time.

A norm's statistics are sums over the image: they need every position, but not all at once. A
segment of `spill` whose equations are elementwise (with small operands broadcast), reshapes
that leave the rows alone, and reductions over the rows (`reduce_sum`, `reduce_max`,
`reduce_min`) is computed in *passes* over bands of rows of its full-size inputs, read from the
host (a temporary file of the segment before, or the image on disk), on the device:

- each reduction over the rows sums (or takes the max or min of) its band's partial results,
  combined on the host in float64 for floats, cast to its dtype at the end;
- a reduction that reads the result of another (a centred variance reads the mean) is in a
  later pass: a pass computes every reduction whose inputs need only the results of earlier
  passes (its *level*), so a `jnp.var` after a `jnp.mean` takes two passes and a mean with a
  mean of squares one;
- the values of no row (the statistics, and what is computed from them alone) are computed
  once, between passes;
- the segment's full-size outputs are computed in the pass of their level and written a band at
  a time into the temporary file (or `out`) that holds them.

Only a band of each full-size value exists at a time; the host never holds the whole image, as
running the segment whole did. Sums over bands are not added in the order XLA adds the whole
image's, so statistics agree with the untiled program to rounding, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtile._src import _compat
from jaxtile._src import region as region_lib
from jaxtile._src import stream as stream_lib

_COMBINE = {"reduce_sum": np.add, "reduce_max": np.maximum, "reduce_min": np.minimum}


@dataclasses.dataclass(frozen=True, eq=False)
class BandPlan:
  """How a segment runs in bands: per pass, the reductions it computes and the full-size outputs
  it writes (equation indices, variables); `rows` per band of `extent`. `str()` says it."""
  eqns: tuple[int, ...]  # the segment's, in order
  band_pos: dict  # variable -> its row axis, for the values that have rows (full-size)
  passes: tuple[tuple[tuple[int, ...], tuple[Any, ...]], ...]  # (reductions, band outputs)
  rows: int
  extent: int
  names: tuple[str, ...]  # the reductions' primitives, in order

  @property
  def n_bands(self) -> int:
    return -(-self.extent // self.rows)

  def __str__(self) -> str:
    ops = ", ".join(f"{n} x{self.names.count(n)}" if self.names.count(n) > 1 else n
                    for n in dict.fromkeys(self.names))
    plural = lambda n, word, many: f"{n} {word if n == 1 else many}"
    text = (f"on the device in {plural(self.n_bands, 'band', 'bands')} of "
            f"{plural(self.rows, 'row', 'rows')} of {self.extent}: ")
    statistics = sum(1 for r, _ in self.passes if r)
    reductions, outputs = self.passes[-1]
    if not statistics:
      return text + "one pass over them writing its full-size results"
    text += f"{plural(statistics, 'pass', 'passes')} over them for its statistics ({ops})"
    if outputs:
      text += (", its full-size results written in the last" if reductions else
               ", then one writing its full-size results")
    return text


def plan(jaxpr, eqns: Sequence[int], inputs: Sequence[Any], outputs: Sequence[Any],
         layout: region_lib.Layout, max_bytes: int) -> Optional[BandPlan]:
  """`BandPlan` for the equations `eqns` of `jaxpr` reading full-size `inputs`, or None where one
  of them is not elementwise, a reshape or broadcast that leaves the rows alone, or a reduction
  over them (see the module)."""
  axis = layout.spatial[0]
  rank = len(layout.spatial) + 2  # an input of another rank is an image of its own: not here
  if not inputs or any(len(v.aval.shape) != rank for v in inputs):
    return None
  full = tuple(inputs[0].aval.shape)
  extent = full[axis]
  if extent < 2 or any(v.aval.shape[axis] != extent for v in inputs):
    return None
  pos = {v: axis for v in inputs}  # band values: their row axis
  level = {}  # variable -> the pass after which it is known (bands: the pass that can make it)
  reductions: dict[int, list[int]] = {}
  for i in eqns:
    e = jaxpr.eqns[i]
    rows = [pos[v] for v in _compat.input_vars(e) if v in pos]
    at = max((level.get(v, 0) for v in _compat.input_vars(e)), default=0)
    if not rows:  # of the statistics and parameters alone, or a broadcast of them
      out = e.outvars[0].aval
      if len(e.outvars) == 1 and _is_full(out, full, axis):
        p = _broadcast_rows(e, axis)
        if p is None:
          return None
        pos[e.outvars[0]] = p
      elif any(_is_full(v.aval, full, axis) for v in e.outvars):
        return None
      level.update((v, at) for v in e.outvars)
      continue
    if len(e.outvars) != 1:
      return None
    (out,) = e.outvars
    p = _rows_after(e, rows[0], pos)
    if p is None:
      return None
    if p == "reduced":
      if e.primitive.name not in _COMBINE:
        return None
      reductions.setdefault(at, []).append(i)
      level[out] = at + 1
    else:
      pos[out], level[out] = p, at
  if not reductions and not any(v in pos for v in outputs):
    return None
  band_outs = [v for v in outputs if v in pos]
  n = max([*reductions, *(level[v] for v in band_outs)]) + 1
  passes = tuple((tuple(reductions.get(k, ())), tuple(v for v in band_outs if level[v] == k))
                 for k in range(n))
  # A band holds every full-size value of the segment at once, at most: its rows fit max_bytes.
  row_bytes = sum(region_lib._aval_bytes(v.aval.shape, v.aval.dtype) // extent for v in pos)
  rows = int(max(1, min(extent, max_bytes // max(row_bytes, 1))))
  rows = -(-extent // -(-extent // rows))  # as many bands, of even height
  names = tuple(jaxpr.eqns[i].primitive.name for r, _ in passes for i in r)
  return BandPlan(tuple(eqns), pos, passes, rows, extent, names)



def _is_full(aval, full, axis) -> bool:
  shape = getattr(aval, "shape", ())
  return len(shape) == len(full) and shape[axis] == full[axis]


def _broadcast_rows(e, axis: int) -> Optional[int]:
  """The row axis of a broadcast of a value with no rows to the full shape, else None."""
  if e.primitive.name != "broadcast_in_dim":
    return None
  dims = e.params["broadcast_dimensions"]
  if axis in dims and e.invars[0].aval.shape[dims.index(axis)] != 1:
    return None
  return axis


def _rows_after(e, p: int, pos: dict):
  """The row axis of `e`'s result, reading band values whose row axis is `p`: "reduced" for a
  reduction over the rows, None for an equation bands cannot run."""
  name = e.primitive.name
  out = e.outvars[0].aval.shape
  if region_lib.is_elementwise(e) or region_lib._elementwise_body(e) is not None:
    # Operands are broadcast along their axes of extent 1 (`canonical.fold_broadcasts`): one
    # with rows has them where the result has, one without has one row.
    for v in _compat.input_vars(e):
      shape = v.aval.shape
      if shape == ():
        continue
      if len(shape) != len(out) or any(d not in (o, 1) for d, o in zip(shape, out)):
        return None
      if (pos[v] != p or shape[p] != out[p]) if v in pos else shape[p] != 1:
        return None
    return p
  if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_and", "reduce_or",
              "argmax", "argmin", "reduce_prod"):
    axes = e.params["axes"]
    return "reduced" if p in axes else p - sum(a < p for a in axes)
  if name == "reshape" and e.params.get("dimensions") is None:
    # The rows stay an axis of their own where the axes before them hold as many elements
    # (equinox's GroupNorm splits (C, H, W) into (G, C // G, H, W)).
    shape = e.invars[0].aval.shape
    before = math.prod(shape[:p])
    return next((q for q in range(len(out))
                 if out[q] == shape[p] and math.prod(out[:q]) == before), None)
  if name == "broadcast_in_dim":
    dims = e.params["broadcast_dimensions"]
    return dims[p] if out[dims[p]] == e.invars[0].aval.shape[p] else None
  if name == "squeeze":
    dims = e.params["dimensions"]
    return None if p in dims else p - sum(d < p for d in dims)
  if name == "transpose":
    return tuple(e.params["permutation"]).index(p)
  return None


def _band_eval(e, args, rows: Optional[int], p_out):
  """`e` bound on band values: shapes that name the rows (`broadcast_in_dim`, `reshape`) take
  the band's."""
  name = e.primitive.name
  params = dict(e.params)
  if name in ("broadcast_in_dim", "reshape") and p_out is not None:
    key = "shape" if name == "broadcast_in_dim" else "new_sizes"
    shape = list(params[key])
    shape[p_out] = rows
    params[key] = tuple(shape)
    return e.primitive.bind(*args, **params)
  if region_lib.is_elementwise(e) or region_lib._elementwise_body(e) is not None:
    return region_lib._eval_elementwise(e, args)
  return e.primitive.bind(*args, **params)


def _pass(jaxpr, bands: BandPlan, reductions, outputs) -> tuple[list, list, list]:
  """A pass's equations on bands (those its reductions and `outputs` need, in order, then the
  reductions), the segment inputs they read, and the values of no row they read."""
  maker = {v: i for i in bands.eqns for v in jaxpr.eqns[i].outvars}
  red_eqns = [jaxpr.eqns[i] for i in reductions]
  need, stack = set(), [*(v for e in red_eqns for v in _compat.input_vars(e)), *outputs]
  while stack:
    v = stack.pop()
    i = maker.get(v)
    if i is None or i in need or v not in bands.band_pos:
      continue
    need.add(i)
    stack.extend(_compat.input_vars(jaxpr.eqns[i]))
  eqns = [*(jaxpr.eqns[i] for i in bands.eqns if i in need), *red_eqns]
  made = {v for e in eqns for v in e.outvars}
  reads = [v for e in eqns for v in _compat.input_vars(e) if v not in made]
  inputs = [v for v in dict.fromkeys(reads) if v in bands.band_pos]
  smalls = [v for v in dict.fromkeys(reads) if v not in bands.band_pos]
  return eqns, inputs, smalls


def _pass_fun(bands: BandPlan, eqns, inputs, smalls, outputs, rows: int) -> Callable:
  """One pass on a band of `rows`: its inputs' bands and the known values it reads -> the
  reductions' partial results over the band, then the band's outputs."""
  def fun(windows, known):
    env = dict(zip(inputs, windows))
    env.update(zip(smalls, known))
    read = lambda v: v.val if isinstance(v, _compat.Literal) else env[v]
    partial = []
    for e in eqns:
      p_out = bands.band_pos.get(e.outvars[0])
      env[e.outvars[0]] = _band_eval(e, [read(v) for v in e.invars], rows, p_out)
      if p_out is None:
        partial.append(env[e.outvars[0]])
    return partial, [env[v] for v in outputs]

  return fun


def run(jaxpr, bands: BandPlan, sources: dict, known: dict, sinks: dict, device,
        programs: dict) -> dict:
  """Runs `bands`: `sources` (variable -> host array of a full-size input, read a band at a
  time), `known` (variable -> value: the parameters and statistics the segment reads), `sinks`
  (variable -> the array-like that full-size output is written into); `programs` keeps the
  jitted passes for the next call. Returns `known` with the segment's values of no row added."""
  known = dict(known)
  small_eqns = [jaxpr.eqns[i] for i in bands.eqns
                if not any(v in bands.band_pos for v in jaxpr.eqns[i].outvars)
                and not any(v in bands.band_pos for v in _compat.input_vars(jaxpr.eqns[i]))]

  def settle():  # the values of no row whose inputs are known
    for e in small_eqns:
      if e.outvars[0] not in known and all(
          isinstance(v, _compat.Literal) or v in known for v in e.invars):
        _compat.eval_eqns([e], known)

  settle()
  for n, (reductions, outputs) in enumerate(bands.passes):
    eqns, inputs, smalls = _pass(jaxpr, bands, reductions, outputs)
    red_eqns = [jaxpr.eqns[i] for i in reductions]
    values = jax.device_put([np.asarray(known[v]) for v in smalls], device)
    totals: list = [None] * len(red_eqns)
    targets = [sinks[v] for v in outputs]
    for start in range(0, bands.extent, bands.rows):
      rows = min(bands.rows, bands.extent - start)
      if (n, rows) not in programs:  # the last band may be shorter
        programs[n, rows] = jax.jit(_pass_fun(bands, eqns, inputs, smalls, outputs, rows))
      windows = [stream_lib.read_window(sources[v], (start,), (rows,), (bands.band_pos[v],))
                 for v in inputs]
      partial, outs = programs[n, rows](jax.device_put(windows, device), values)
      for j, (e, part) in enumerate(zip(red_eqns, partial)):
        part = np.asarray(part)
        if jnp.issubdtype(part.dtype, jnp.floating):  # bfloat16 too, which NumPy's is not
          part = part.astype(np.float64)
        totals[j] = part if totals[j] is None else _COMBINE[e.primitive.name](totals[j], part)
      for v, target, value in zip(outputs, targets, outs):
        index = (slice(None),) * bands.band_pos[v] + (slice(start, start + rows),)
        target[index] = np.asarray(value)
    for e, total in zip(red_eqns, totals):
      known[e.outvars[0]] = np.asarray(total).astype(e.outvars[0].aval.dtype)
    settle()
  return known

