"""`check`: the golden-master test users run on their own model.

It runs the function tiled and whole and compares the outputs; and it runs every tiled conv both
ways on the inputs it actually receives in the function, comparing the tiled result with the
monolithic conv and with the float64 NumPy reference (whole for small convs, on random output
windows for big ones).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import textwrap
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtile._src import _compat
from jaxtile._src import api
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile import reference
from jaxtile._src import report as report_lib
from jaxtile._src import spec as spec_lib
from jaxtile._src.spec import ConvSpec

#: Convs whose output has fewer elements than this, and at most `FULL_REFERENCE_MACS`
#: multiply-adds, are compared with the reference in full; bigger ones on output windows.
FULL_REFERENCE_ELEMENTS = 2**22
FULL_REFERENCE_MACS = 2**27
#: An output window: this many positions per spatial dim, one batch row, and up to
#: `WINDOW_CHANNELS` output channels of one group (every input channel of it contributes).
WINDOW_EXTENT = 8
WINDOW_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class ConvCheck:
  """One tiled conv: its tiled output against the monolithic conv and the NumPy reference.

  Errors are max |tiled - other| and ||tiled - other||_2 / ||other||_2, on the inputs the conv
  received when the function ran. `max_abs_error` and `rel_l2_error` compare with the monolithic
  conv (`conv_general_dilated` with the equation's own parameters) over every call of the conv;
  `ref_*` with `jaxtile.reference` in float64 on the first call's inputs, over the whole output
  (`ref_scope="full"`), over random output windows (`"windows"`), or not at all (`"skipped"`,
  see `note`). All errors are None for a conv that never ran.
  """
  name: str
  source: str
  max_abs_error: Optional[float]
  rel_l2_error: Optional[float]
  ref_max_abs_error: Optional[float]
  ref_rel_l2_error: Optional[float]
  ref_scope: str
  out_shape: tuple[int, ...] = ()
  dtype: Optional[np.dtype] = None
  n_elemental: int = 1
  calls: int = 0  # times the conv ran
  note: str = ""
  scope: str = ""  # as in `ConvReport`: the module path from JAX's name stack
  region: Optional[str] = None  # the region whose loop computes this conv (pieces: its tiles)
  call_site: str = ""  # as in `ConvReport`: the innermost user frame that is not a helper

  @property
  def layer(self) -> str:
    return " ".join(filter(None, (self.scope, self.call_site)))


@dataclasses.dataclass(frozen=True)
class CheckResult:
  """Every tiled conv's `ConvCheck`, and the whole function's outputs, tiled vs `jax.jit`."""
  convs: list[ConvCheck]
  output_max_abs_error: float
  output_rel_l2_error: float
  n_outputs: int
  report: report_lib.Report = dataclasses.field(repr=False, compare=False)

  @property
  def compared(self) -> bool:
    """Whether any conv was compared: False when nothing was tiled (see `report.nothing_tiled`)."""
    return bool(self.convs)

  def table(self, wide: bool = False, width: int = 100) -> str:
    """The result as text; fits `width` columns unless `wide` (full source paths)."""
    r = self.report
    lines = [f"jaxtile check: {len(self.convs)} tiled conv(s) of {len(r.convs)}, tier={r.tier!r}, "
             f"max_bytes={r.max_bytes} ({spec_lib.format_bytes(r.max_bytes)})"]
    lines += r.header(width)[1:]
    if not self.compared:
      return "\n".join(lines + textwrap.wrap(
          "NOTHING WAS COMPARED: " + (r.nothing_tiled() or "no conv was tiled."), width))
    lines.append(f"whole function, tiled vs jax.jit: max abs error "
                 f"{_num(self.output_max_abs_error)}, relative L2 error "
                 f"{_num(self.output_rel_l2_error)} over {self.n_outputs} output(s)")
    columns = {
        "conv": [report_lib.short_name(c) for c in self.convs],
        "out": [spec_lib.short_aval(c.out_shape, c.dtype) if c.dtype is not None else "-"
                for c in self.convs],
        "pieces": [str(c.n_elemental) if not c.region else "-" for c in self.convs],
        "max abs": [_num(c.max_abs_error) for c in self.convs],
        "rel L2": [_num(c.rel_l2_error) for c in self.convs],
        "ref abs": [_num(c.ref_max_abs_error) for c in self.convs],
        "ref L2": [_num(c.ref_rel_l2_error) for c in self.convs],
        "ref": [c.ref_scope for c in self.convs],
        "layer": [c.layer if wide else report_lib.short_layer(c) for c in self.convs]}
    lines += textwrap.wrap("per tiled conv, tiled vs the monolithic conv (max abs, rel L2) and vs "
                           "the float64 reference (ref abs, ref L2; ref: over the full output or "
                           "random windows):", width)
    if wide:
      lines += report_lib.format_rows([tuple(columns)] + list(zip(*columns.values())))
    else:
      lines += report_lib.fit_columns(columns, width, optional=("out",))
    lines += [f"{report_lib.short_name(c)}: {c.note}" for c in self.convs if c.note]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _num(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.2e}"


# Errors come as (max |a - b|, ||a - b||_2, ||b||_2) so that pieces combine: max of maxima,
# root of the sum of squared norms.
Errors = tuple[float, float, float]


@jax.jit
def _device_errors_jit(a, b):
  dtype = jnp.complex64 if jnp.iscomplexobj(a) or jnp.iscomplexobj(b) else jnp.float32
  diff = jnp.abs(a.astype(dtype) - b.astype(dtype)).ravel()
  ref = jnp.abs(b.astype(dtype)).ravel()
  def norm(x):  # scaled, so that squares of large values do not overflow float32
    top = jnp.max(x, initial=0.0)
    safe = jnp.where(top > 0, top, 1.0)
    return top * jnp.sqrt(jnp.sum(jnp.square(x / safe)))
  return jnp.max(diff, initial=0.0), norm(diff), norm(ref)


def _device_errors(a, b) -> Errors:
  """Errors of `a` against `b`, computed where the arrays are (no host copy of big outputs)."""
  assert jnp.shape(a) == jnp.shape(b), (jnp.shape(a), jnp.shape(b))
  return tuple(float(x) for x in _device_errors_jit(a, b))


def _host_errors(a: np.ndarray, b: np.ndarray) -> Errors:
  diff = np.abs(_wide(a) - b).ravel()
  return (float(diff.max(initial=0.0)), float(np.linalg.norm(diff)),
          float(np.linalg.norm(np.abs(b).ravel())))


def _combine(errors: list[Errors]) -> tuple[float, float]:
  """(max abs error, relative L2 error) over several arrays taken together."""
  if not errors:
    return 0.0, 0.0
  max_abs = max(e[0] for e in errors)
  diff = math.sqrt(sum(e[1] ** 2 for e in errors))
  ref = math.sqrt(sum(e[2] ** 2 for e in errors))
  if ref == 0:
    return max_abs, 0.0 if diff == 0 else math.inf
  return max_abs, diff / ref


def check(fun: Callable, /, *args, static_argnums=(), static_argnames=(), windows: int = 4,
          seed: int = 0, **policy) -> Callable[..., CheckResult]:
  """Transforms `fun` into `f(*args, **kwargs) -> CheckResult`: runs it tiled and whole, compares.

  Three programs run: `tile_convs(fun, **policy)` and `jax.jit(fun)`, whose outputs are
  compared; and the program `tile_convs` runs (`Rewriter.plan_conv`: the same decisions, the same
  loops, regions included) with each tiled conv outside a region also computed monolithic on the
  same inputs, the tiled result flowing on. There each call of a tiled conv is
  compared with the monolithic conv (every call, for a conv inside a loop), and the first call's
  operands and output come to the host for the float64 NumPy reference: whole when the output has
  fewer than `FULL_REFERENCE_ELEMENTS` elements and the conv at most `FULL_REFERENCE_MACS`
  multiply-adds; otherwise only `windows` random output windows (`WINDOW_EXTENT` positions per
  spatial dim, one batch row, up to `WINDOW_CHANNELS` output channels of one group) and the input
  windows they read, cut by the pass's halo arithmetic (`geometry.tile_window`). Convs inside a
  region (`fuse`) exist one tile at a time; they are compared through the outputs only.

  When no conv is tiled nothing is compared; the result says so (`CheckResult.compared` is
  False) and names the budget that would tile one.

  Args:
    fun: the function, as given to `tile_convs`, or a function decorated with `tile_convs`
      (checked undecorated under the decorator's policy, with `**policy` on top).
    static_argnums, static_argnames: as in `tile_convs`.
    windows: output windows compared with the reference for each conv too big to compare whole
      (0: none).
    seed: seeds the choice of windows.
    **policy: `tile_convs`'s policy keywords (`max_bytes`, `tile_shape`, ...).

  Returns:
    A function taking `fun`'s arguments (array leaves traced, other leaves static, as in
    `tile_convs`) and returning a `CheckResult`; `print` it for a table.

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> result = jaxtile.check(f, max_bytes=2**17)(jnp.ones((1, 8, 64, 64)),
    ...                                             jnp.ones((8, 8, 3, 3)))
    >>> result.convs[0].ref_scope, result.convs[0].rel_l2_error < 1e-6
    ('full', True)
  """
  tgt = api.target("check", fun, policy, static_argnums, static_argnames, args)
  for name, value in (("windows", windows), ("seed", seed)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise TypeError(f"check: {name} must be an int >= 0, but got {name}={value!r} of type "
                      f"{type(value).__name__}.")
    if value < 0:
      raise ValueError(f"check: {name} must be >= 0, but got {name}={value!r}.")

  def checked(*args, **kwargs) -> CheckResult:
    traced = api.trace_and_record(
        tgt, args, kwargs, lambda p: _Capture(p, windows, np.random.default_rng(seed)))
    capture, closed, dynamic = traced.recorder, traced.closed, traced.dynamic
    jax.block_until_ready(jax.jit(_compat.jaxpr_as_fun(traced.rewritten))(*dynamic))
    jax.effects_barrier()  # every host callback has run
    report = capture.report(tgt.described)
    tiled = jax.tree_util.tree_leaves(api.tile_convs(
        tgt.fun, static_argnums=tgt.static_argnums, static_argnames=tgt.static_argnames,
        **tgt.policy_kwargs)(*args, **kwargs))
    whole = jax.jit(_compat.jaxpr_as_fun(closed))(*dynamic)
    output_max, output_rel = _combine([_device_errors(a, b) for a, b in zip(tiled, whole)])
    convs = [capture.result(record, c)
             for record, c in zip(capture.records, report.convs) if record.decision.tiled]
    return CheckResult(convs, output_max, output_rel, len(whole), report)

  return api.Staged("check", tgt, checked, "CheckResult")


@dataclasses.dataclass(frozen=True)
class _Window:
  """One output window of a conv, the operand windows it reads, and their padding."""
  lhs: tuple[slice, ...]
  rhs: tuple[slice, ...]
  out: tuple[slice, ...]
  padding: tuple[tuple[int, int], ...]


class _Capture(api.Recorder):
  """The pass's walk (same order, same records, same program), each tiled conv also run whole.

  The tiled result flows on. A `jax.debug.callback` hands the comparison, and on the first call
  what the reference needs, to the host; it runs wherever the conv runs (inside jit, scan, while,
  cond, remat and custom_jvp/vjp bodies alike).
  """

  def __init__(self, policy: decide_lib.Policy, windows: int, rng: np.random.Generator):
    super().__init__(policy)
    self.windows, self.rng = windows, rng
    self.scope: dict[int, tuple[str, list[_Window]]] = {}
    self.errors: dict[int, list[Errors]] = collections.defaultdict(list)
    self.operands: dict[int, Any] = {}

  def conv(self, eqn: _compat.JaxprEqn) -> _compat.JaxprEqn:
    self.note_layer(eqn)
    # What `tile_convs` binds for this conv, decided the same way. No warnings here:
    # `tile_convs`, run next on the same function, logs them once.
    record, tiled_conv = self.plan_conv(eqn, warn=False)
    spec, index = record.spec, record.index
    if tiled_conv is None or not record.decision.tiled:  # left whole, or the reference tier
      return eqn if tiled_conv is None else self._bind(eqn, tiled_conv, record.name)
    macs = math.prod(spec.out_shape) * spec.in_per_group * math.prod(spec.kernel_spatial)
    if math.prod(spec.out_shape) < FULL_REFERENCE_ELEMENTS and macs <= FULL_REFERENCE_MACS:
      scope, chosen = "full", []
    elif self.windows:
      scope, chosen = "windows", [_choose_window(spec, self.rng) for _ in range(self.windows)]
    else:
      scope, chosen = "skipped", []
    self.scope[index] = scope, chosen
    params = dict(eqn.params)

    def keep(errors, operands):
      self.errors[index].append(tuple(float(e) for e in errors))
      if index not in self.operands:
        self.operands[index] = jax.tree_util.tree_map(np.asarray, operands)

    def conv(lhs, rhs):
      out = tiled_conv(lhs, rhs)
      errors = _device_errors_jit(out, _compat.conv_general_dilated_p.bind(lhs, rhs, **params))
      if scope == "full":
        operands = (lhs, rhs, out)
      else:
        operands = [(lhs[w.lhs], rhs[w.rhs], out[w.out]) for w in chosen]
      jax.debug.callback(keep, errors, operands)
      return out

    conv.__name__ = record.name.replace("/", "_") + "_check"
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    return _compat.traced_call_eqn(conv, avals, eqn.invars, eqn.outvars, eqn.source_info)

  def result(self, record, conv: report_lib.ConvReport) -> ConvCheck:
    spec, index = record.spec, record.index
    calls = len(self.errors[index])
    base = dict(name=record.name, source=spec.source, out_shape=spec.out_shape,
                dtype=spec.out_dtype, calls=calls, scope=conv.scope, call_site=conv.call_site)
    if record.region is not None:
      # Its values exist one tile at a time inside the region's loop: not compared on its own.
      # Its pieces are the region's tiles, not those of the plan `decide` would give it alone.
      return ConvCheck(max_abs_error=None, rel_l2_error=None, ref_max_abs_error=None,
                       ref_rel_l2_error=None, ref_scope="skipped", region=record.region,
                       note=f"computed in {record.region}'s loop: compared through the "
                            "function's outputs only", **base)
    base["n_elemental"] = record.decision.plan.n_elemental
    scope, chosen = self.scope[index]
    if not calls:
      return ConvCheck(max_abs_error=None, rel_l2_error=None, ref_max_abs_error=None,
                       ref_rel_l2_error=None, ref_scope="skipped",
                       note="never ran (in a branch not taken, or a loop that ran no iteration)",
                       **base)
    max_abs, rel = _combine(self.errors[index])
    notes = [f"reference on the first of {calls} calls"] if calls > 1 else []
    operands = self.operands[index]
    if scope == "full":
      lhs, rhs, out = operands
      ref = [_host_errors(out, _reference(spec, lhs, rhs, spec.padding, groups=True))]
    elif scope == "windows":
      ref = [_host_errors(out, _reference(spec, lhs, rhs, w.padding, groups=False) if lhs.size
                          else np.zeros(out.shape))  # a window reading only padding
             for w, (lhs, rhs, out) in zip(chosen, operands)]
      notes.append(f"reference on {len(chosen)} random output windows")
    else:
      ref = []
      notes.append("too big for the whole reference, and windows=0")
    ref_max, ref_rel = _combine(ref) if ref else (None, None)
    return ConvCheck(max_abs_error=max_abs, rel_l2_error=rel, ref_max_abs_error=ref_max,
                     ref_rel_l2_error=ref_rel, ref_scope=scope, note="; ".join(notes), **base)


def _wide(x: np.ndarray) -> np.ndarray:
  return np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _reference(spec: ConvSpec, lhs, rhs, padding, groups: bool) -> np.ndarray:
  """The conv in float64 with `padding`; without its groups when `groups` is False."""
  p = spec.param_dict
  return reference.conv_general_dilated(
      _wide(lhs), _wide(rhs), spec.window_strides, padding, spec.lhs_dilation, spec.rhs_dilation,
      p["dimension_numbers"], spec.feature_group_count if groups else 1,
      spec.batch_group_count if groups else 1,
      preferred_element_type=np.complex128 if np.iscomplexobj(lhs) else np.float64)


def _choose_window(spec: ConvSpec, rng: np.random.Generator) -> _Window:
  """A random output window, and what it reads.

  The window lies in one group, so it is a plain conv of that group's slice of lhs and rhs; its
  input window along each spatial dim, and that window's padding, are `geometry.tile_window`'s.
  """
  lhs_index, rhs_index = [slice(None)] * len(spec.lhs_shape), [slice(None)] * len(spec.rhs_shape)
  out_index = [slice(None)] * len(spec.out_shape)
  g = int(rng.integers(spec.groups))
  b = int(rng.integers(spec.batch))
  row = g * spec.batch + b if spec.batch_group_count > 1 else b
  lhs_index[spec.lhs_axes[0]] = slice(row, row + 1)
  out_index[spec.out_axes[0]] = slice(b, b + 1)
  if spec.feature_group_count > 1:
    cin = spec.in_per_group
    lhs_index[spec.lhs_axes[1]] = slice(g * cin, (g + 1) * cin)
  channels = min(WINDOW_CHANNELS, spec.out_per_group)
  f0 = g * spec.out_per_group + int(rng.integers(spec.out_per_group - channels + 1))
  rhs_index[spec.rhs_axes[0]] = out_index[spec.out_axes[1]] = slice(f0, f0 + channels)
  padding = []
  for d in range(spec.n_spatial):
    extent = spec.out_spatial[d]
    size = min(WINDOW_EXTENT, extent)
    o0 = int(rng.integers(extent - size + 1))
    win = geometry.tile_window(o0, o0 + size, 0, spec.kernel_spatial[d], spec.in_spatial[d],
                               spec.window_strides[d], spec.padding[d], spec.lhs_dilation[d],
                               spec.rhs_dilation[d])
    lhs_index[spec.lhs_axes[2 + d]] = slice(win.in_start, win.in_start + win.in_size)
    out_index[spec.out_axes[2 + d]] = slice(o0, o0 + size)
    padding.append(win.padding)
  return _Window(tuple(lhs_index), tuple(rhs_index), tuple(out_index), tuple(padding))
