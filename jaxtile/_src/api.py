"""Public wrappers: `tile_convs` and `explain`, what `explain`, `check` and `autotune` share (the
function and policy they analyse, the walk that records layers, the uncalled result), and
validation of the policy."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtile._src import _compat
from jaxtile._src import decide as decide_lib
from jaxtile._src import report as report_lib
from jaxtile._src import rewrite as rewrite_lib
from jaxtile._src import tuning as tuning_lib

#: Fraction of a device's memory one elemental conv may use by default (see `default_max_bytes`).
DEVICE_MEMORY_FRACTION = 8
#: Default budget where the device reports no memory limit (CPU hosts).
HOST_MAX_BYTES = 2**31


def default_max_bytes(device: Optional[jax.Device] = None) -> int:
  """The default `max_bytes`: an eighth of the device's memory, or 2 GiB where none is reported.

  The device's limit is `device.memory_stats()["bytes_limit"]` (GPUs and TPUs report it; CPU
  hosts do not). An eighth leaves room for the rest of the program around the conv (its input and
  output at full size, other layers, XLA's scratch). Convs with an operand above 2**31 - 1
  elements are split whatever the budget.
  """
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # some backends raise instead of returning None
    stats = {}
  limit = stats.get("bytes_limit")
  return int(limit) // DEVICE_MEMORY_FRACTION if limit else HOST_MAX_BYTES


def _positive_int(name: str, value: Any, allow_none=True) -> Optional[int]:
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"tile_convs: {name} must be a positive int"
                    f"{' or None' if allow_none else ''}, but got {name}={value!r} "
                    f"of type {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"tile_convs: {name} must be positive, but got {name}={value!r}.")
  return int(value)


def _int_tuple(name: str, value: Any, length: Optional[int] = None):
  if value is None:
    return None
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return _positive_int(name, value)  # one extent for every dim, expanded per conv
  if not isinstance(value, Sequence) or isinstance(value, str):
    raise TypeError(f"tile_convs: {name} must be a tuple of positive ints (None entries let the "
                    f"planner choose), but got {name}={value!r}.")
  if length is not None and len(value) != length:
    raise ValueError(f"tile_convs: {name} must have {length} entries, but got {name}={value!r}.")
  if len(value) == 0:
    raise ValueError(f"tile_convs: {name} must not be empty, but got {name}={value!r}.")
  for v in value:
    if v is not None:
      try:
        _positive_int(name, v)
      except (TypeError, ValueError) as e:
        raise type(e)(f"tile_convs: every entry of {name} must be a positive int or None, but "
                      f"got {name}={tuple(value)!r}.") from None
  return tuple(None if v is None else int(v) for v in value)



def _mesh(devices, mesh_axis) -> tuple[Optional[Mesh], Optional[str]]:
  """`devices` (a sequence of devices, or a Mesh) as a mesh and the axis to divide pieces along."""
  if devices is None:
    if mesh_axis is not None:
      raise ValueError(f"tile_convs: mesh_axis={mesh_axis!r} needs devices= (a Mesh), but got "
                       "devices=None.")
    return None, None
  if isinstance(devices, Mesh):
    names = tuple(devices.axis_names)
    if mesh_axis is None:
      if len(names) != 1:
        raise ValueError(f"tile_convs: devices is a Mesh with axes {names}; pass mesh_axis= to "
                         "name the one to divide pieces along, but got mesh_axis=None.")
      mesh_axis = names[0]
    if mesh_axis not in names:
      raise ValueError(f"tile_convs: mesh_axis must be one of the mesh's axes {names}, but got "
                       f"mesh_axis={mesh_axis!r}.")
    # The pieces are placed by shard_map; the mesh's own axis types (explicit sharding from
    # `jax.make_mesh`) would make the reassembly outside it a sharded-dim indexing error.
    return Mesh(devices.devices, names), mesh_axis
  if mesh_axis is not None:
    raise ValueError(f"tile_convs: mesh_axis={mesh_axis!r} applies to a Mesh, but got devices as "
                     f"a {type(devices).__name__}.")
  if isinstance(devices, jax.Device):
    devices = [devices]
  if not isinstance(devices, Sequence) or not devices or not all(
      isinstance(d, jax.Device) for d in devices):
    raise TypeError("tile_convs: devices must be a non-empty sequence of jax.Device (for example "
                    f"jax.devices()) or a jax.sharding.Mesh, but got devices={devices!r}.")
  if len(set(devices)) != len(devices):
    raise ValueError(f"tile_convs: devices must be distinct, but got devices={list(devices)!r}.")
  return Mesh(np.array(devices), (MESH_AXIS,)), MESH_AXIS


def _tuning(value: Any) -> Optional[tuning_lib.Tuning]:
  """`tuning=` as a `Tuning`: given as one, as a `TuneResult`, or as the path of a file that
  `autotune(..., cache=path)` or `Tuning.save` wrote."""
  if value is None or isinstance(value, tuning_lib.Tuning):
    return value
  if isinstance(value, (str, os.PathLike)):
    if not os.path.exists(value):
      raise FileNotFoundError(
          f"tile_convs: tuning={value!r} names no file; pass the path a previous "
          "jaxtile.autotune(..., cache=path) wrote, or its TuneResult.")
    return tuning_lib.load(value, "tile_convs")
  inner = getattr(value, "tuning", None)  # a TuneResult
  if isinstance(inner, tuning_lib.Tuning):
    return inner
  raise TypeError(f"tile_convs: tuning must be a jaxtile.Tuning, a jaxtile.TuneResult or the path "
                  f"of a tuning file, but got tuning={value!r} of type {type(value).__name__}.")


#: Name of the mesh axis made from a list of devices.
MESH_AXIS = "jaxtile"


def make_policy(max_bytes=None, tile_shape=None, channel_block=None, batch_block=None,
                tier="auto", strict=False, devices=None, mesh_axis=None,
                shard_output=False, fuse="auto",
                tuning=None) -> Callable[[], decide_lib.Policy]:
  """Validates the policy arguments now; returns a thunk giving the `Policy` at trace time.

  `max_bytes=None` resolves on the device at trace time, so the default follows the device.
  `tuning` is resolved now (a path is read now): nothing the process tunes later changes it.
  """
  max_bytes = _positive_int("max_bytes", max_bytes)
  tile_shape = _int_tuple("tile_shape", tile_shape)
  if isinstance(channel_block, numbers.Integral) and not isinstance(channel_block, bool):
    channel_block = (channel_block, channel_block)
  channel_block = _int_tuple("channel_block", channel_block, length=2)
  batch_block = _positive_int("batch_block", batch_block)
  if tier not in decide_lib.TIERS:
    raise ValueError(f"tile_convs: tier must be one of {decide_lib.TIERS}, but got tier={tier!r}.")
  if not isinstance(strict, bool):
    raise TypeError(f"tile_convs: strict must be a bool, but got strict={strict!r}.")
  if not isinstance(shard_output, bool):
    raise TypeError(f"tile_convs: shard_output must be a bool, but got "
                    f"shard_output={shard_output!r}.")
  if not (isinstance(fuse, bool) or fuse == "auto"):
    raise ValueError(f"tile_convs: fuse must be True, False or 'auto', but got fuse={fuse!r}.")
  mesh, mesh_axis = _mesh(devices, mesh_axis)
  tuning = _tuning(tuning)
  if shard_output and mesh is None:
    raise ValueError("tile_convs: shard_output=True needs devices=, but got devices=None.")

  def resolve() -> decide_lib.Policy:
    return decide_lib.Policy(max_bytes or default_max_bytes(), tile_shape, channel_block,
                           batch_block, tier, strict, mesh, mesh_axis, shard_output,
                           jax.devices()[0].device_kind, fuse, tuning)
  return resolve


def _is_array(x: Any) -> bool:
  # ShapeDtypeStructs trace like arrays, so `explain` can plan a model without allocating it.
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


class _Static:
  """The hashable, non-array part of a call: pytree structure and static leaves."""

  def __init__(self, treedef, leaves):
    self.treedef, self.leaves = treedef, leaves
    try:
      self._hash = hash((treedef, leaves))
    except TypeError as e:
      raise TypeError(
          "tile_convs: non-array arguments are static and must be hashable, as in jax.jit's "
          f"static arguments, but got {[l for l in leaves if not _hashable(l)]!r}. Pass arrays "
          "for values that change, or make the value hashable.") from e

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (isinstance(other, _Static) and self.treedef == other.treedef
            and self.leaves == other.leaves)


def _hashable(x) -> bool:
  try:
    hash(x)
    return True
  except TypeError:
    return False


_STATIC = object()  # marks an array leaf's slot among the static leaves


def _split_call(args, kwargs, static_argnums, static_argnames):
  """Array leaves (traced) and everything else (static), as `equinox.filter_jit` splits them."""
  n = len(args)
  argnums = {i % n if n else i for i in static_argnums}
  marked = tuple(_Whole(a) if i in argnums else a for i, a in enumerate(args))
  marked_kw = {k: _Whole(v) if k in static_argnames else v for k, v in kwargs.items()}
  leaves, treedef = jax.tree_util.tree_flatten((marked, marked_kw))
  dynamic = [l for l in leaves if _is_array(l)]
  static = tuple(_STATIC if _is_array(l) else l for l in leaves)
  return dynamic, _Static(treedef, static)


def _join_call(static: _Static, dynamic):
  it = iter(dynamic)
  leaves = [next(it) if l is _STATIC else l for l in static.leaves]
  args, kwargs = jax.tree_util.tree_unflatten(static.treedef, leaves)
  args = tuple(a.value if isinstance(a, _Whole) else a for a in args)
  kwargs = {k: v.value if isinstance(v, _Whole) else v for k, v in kwargs.items()}
  return args, kwargs


class _Whole:
  """A static argument kept whole (a leaf), compared by value like jax.jit's static args."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return hash(self.value)

  def __eq__(self, other):
    return isinstance(other, _Whole) and self.value == other.value


def _static_args(static_argnums, static_argnames) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """`static_argnums`/`static_argnames` as tuples, accepting a single int or str as jax.jit does."""
  if isinstance(static_argnums, int):
    static_argnums = (static_argnums,)
  if isinstance(static_argnames, str):
    static_argnames = (static_argnames,)
  return tuple(static_argnums), tuple(static_argnames)


def _trace(fun, static: _Static, dynamic):
  """The user function as a closed jaxpr over the array leaves, and its output structure."""
  def flat(*dynamic):
    args, kwargs = _join_call(static, dynamic)
    return fun(*args, **kwargs)
  return jax.make_jaxpr(flat, return_shape=True)(*dynamic)


class Recorder(rewrite_lib.Rewriter):
  """The pass's walk, also noting each conv's `report.Layer` and calls to already tiled functions.

  A call to a function already decorated with `tile_convs` (its `tile_convs(f)` jit equation) is
  not entered: its convs are jaxtile's own pieces, not the user's layers.
  """

  def __init__(self, policy: decide_lib.Policy):
    super().__init__(policy)
    self.layers: list[report_lib.Layer] = []
    self.already_tiled: list[str] = []
    self._scopes: list[str] = []  # name stacks of the enclosing equations, outermost first

  def nested(self, eqn: _compat.JaxprEqn) -> _compat.JaxprEqn:
    tiled = report_lib.tiled_call(eqn)
    if tiled is not None:
      self.already_tiled.append(tiled)
      return eqn
    self._scopes.append(_compat.name_stack(eqn))
    try:
      return super().nested(eqn)
    finally:
      self._scopes.pop()

  def note_layer(self, eqn: _compat.JaxprEqn) -> None:
    self.layers.append(report_lib.layer_of(eqn, tuple(self._scopes)))

  def conv(self, eqn: _compat.JaxprEqn) -> _compat.JaxprEqn:
    self.note_layer(eqn)
    return super().conv(eqn)

  def region(self, plan) -> _compat.JaxprEqn:
    for e in plan.all_convs:
      self.note_layer(e)
    return super().region(plan)

  def report(self, described: str) -> report_lib.Report:
    return report_lib.Report.from_records(self.records, self.policy, self.layers, described,
                                          tuple(self.already_tiled), self.regions)


# ---------------------------------------------------------------------------------------------
# explain, check and autotune: what they analyse, and what they return before they are called.
# ---------------------------------------------------------------------------------------------
POLICY_KEYWORDS = tuple(inspect.signature(make_policy).parameters)
_POLICY_DEFAULTS = {k: v.default for k, v in inspect.signature(make_policy).parameters.items()}


@dataclasses.dataclass(frozen=True)
class _Tiled:
  """What `tile_convs` was given, kept on the function it returns as `__jaxtile_tiled__`.

  `wrapper` is that function itself: `jax.jit`, `jax.grad` and `functools.wraps` copy the
  attribute onto their own wrappers, which must not pass for it.
  """
  wrapper: Callable
  fun: Callable
  policy: dict[str, Any]
  static_argnums: tuple[int, ...]
  static_argnames: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
  """What `explain`, `check` or `autotune` analyse: the function, its policy, and in words which."""
  fun: Callable
  policy_kwargs: dict[str, Any]
  policy: Callable[[], decide_lib.Policy]
  static_argnums: tuple[int, ...]
  static_argnames: tuple[str, ...]
  described: str


def target(op: str, fun: Callable, policy_kwargs: dict[str, Any], static_argnums=(),
           static_argnames=(), args: tuple = ()) -> Target:
  """`fun` and the policy keywords given to `op`; for a function decorated with `tile_convs`, the
  undecorated function, planned with the decorator's keywords and those given to `op` on top.

  Raises TypeError for a non-callable `fun`, for `args` (the function's arguments, passed to
  `op` itself instead of to what it returns) or a keyword that is not a policy keyword, and what
  `make_policy` raises for a bad policy value.
  """
  if not callable(fun):
    raise TypeError(f"{op}: fun must be callable, but got fun={fun!r}.")
  if args:
    raise TypeError(f"{op}: takes the function and policy keywords, then is called with the "
                    f"function's arguments, as jaxtile.{op}(fun, **policy)(*args), but got "
                    f"{len(args)} positional argument(s) after fun.")
  unknown = sorted(set(policy_kwargs) - set(POLICY_KEYWORDS))
  if unknown:
    raise TypeError(f"{op}: unknown keyword argument(s) {', '.join(map(repr, unknown))}; {op} "
                    f"takes tile_convs's policy keywords {POLICY_KEYWORDS}.")
  static_argnums, static_argnames = _static_args(static_argnums, static_argnames)
  given = _policy_text(policy_kwargs)
  tiled = getattr(fun, "__jaxtile_tiled__", None)
  if isinstance(tiled, _Tiled) and tiled.wrapper is fun:
    name = getattr(tiled.fun, "__name__", "fun")
    described = f"@tile_convs({_policy_text(tiled.policy)}) of {name}"
    if given:
      described += f", with {given} given to {op}"
    policy_kwargs = {**tiled.policy, **policy_kwargs}
    static_argnums = static_argnums or tiled.static_argnums
    static_argnames = static_argnames or tiled.static_argnames
    fun = tiled.fun
  else:
    described = f"{given} given to {op}" if given else "the defaults (no keywords given)"
  return Target(fun, dict(policy_kwargs), make_policy(**policy_kwargs), static_argnums,
                static_argnames, described)


def _policy_text(policy_kwargs: dict[str, Any]) -> str:
  """`max_bytes=1048576, tile_shape=(16, None)`: the keywords that differ from the defaults."""
  parts = []
  for k, v in policy_kwargs.items():
    if v is None or (isinstance(v, (bool, str)) and v == _POLICY_DEFAULTS.get(k)):
      continue
    if k == "devices" and not isinstance(v, Mesh):
      n = len(v) if isinstance(v, Sequence) else 1
      parts.append(f"devices=<{n} device{'s' if n != 1 else ''}>")
    elif k == "tuning" and isinstance(getattr(v, "tuning", None), tuning_lib.Tuning):
      parts.append(f"tuning={v.tuning!r}")  # a TuneResult: its plans, not its whole repr
    else:
      parts.append(f"{k}={v!r}")
  return ", ".join(parts)


class Traced(NamedTuple):
  """A call of `Target.fun`, traced and walked by a `Recorder`."""
  recorder: Recorder  # its records, layers and policy
  closed: _compat.ClosedJaxpr  # the traced program
  rewritten: _compat.ClosedJaxpr  # as the recorder rewrote it
  dynamic: list  # the array leaves of the arguments, the programs' inputs


def trace_and_record(tgt: Target, args, kwargs,
                     recorder: Callable[[decide_lib.Policy], Recorder] = Recorder) -> Traced:
  """Traces `tgt.fun(*args, **kwargs)` and walks it with a `recorder` of `tgt.policy`."""
  dynamic, static = _split_call(args, kwargs, tgt.static_argnums, tgt.static_argnames)
  closed, _ = _trace(tgt.fun, static, dynamic)
  walker = recorder(tgt.policy())
  return Traced(walker, closed, walker.closed_jaxpr(closed), dynamic)


class Staged:
  """`explain(fun, **policy)` (or `check`, `autotune`) before it is called with `fun`'s arguments.

  Calling it runs the analysis, as a JAX transformation's result is called; its repr says so, so
  that a forgotten call (`print(jaxtile.explain(f, max_bytes=...))`) says what to do.
  """

  def __init__(self, op: str, tgt: Target, call: Callable, returns: str):
    functools.update_wrapper(self, tgt.fun)
    self._op, self._target, self._call, self._returns = op, tgt, call, returns

  def __call__(self, *args, **kwargs):
    return self._call(*args, **kwargs)

  def __repr__(self) -> str:
    name = getattr(self._target.fun, "__name__", "fun")
    return (f"<jaxtile.{self._op}({name}) with policy {self._target.described}: not run yet. "
            f"Call it with {name}'s arguments to get the {self._returns}: "
            f"jaxtile.{self._op}({name}, ...)(*args).>")


def tile_convs(fun: Optional[Callable] = None, /, *, max_bytes: Optional[int] = None,
               tile_shape: Union[int, Sequence[Optional[int]], None] = None,
               channel_block: Union[int, tuple[Optional[int], Optional[int]], None] = None,
               batch_block: Optional[int] = None, tier: str = "auto", strict: bool = False,
               devices: Union[Sequence[jax.Device], Mesh, None] = None,
               mesh_axis: Optional[str] = None, shard_output: bool = False,
               fuse: Union[bool, str] = "auto",
               tuning: Union[tuning_lib.Tuning, str, os.PathLike, Any, None] = None,
               static_argnums: Union[int, Sequence[int]] = (),
               static_argnames: Union[str, Sequence[str]] = ()) -> Callable:
  """Rewrites every oversized convolution in `fun` into tiles that fit `max_bytes`.

  `fun` is traced to a jaxpr (once per argument shapes, dtypes and static values), every
  `conv_general_dilated` in it, nested ones included, is planned, the oversized ones are replaced
  by a select -> process -> reassemble loop over pieces, and the rewritten program is evaluated
  compiled. The result equals `fun`'s; it composes with `jax.jit`, `grad`, `vjp`, `jvp`, `vmap`
  and `pmap`, and `tile_convs(jax.grad(loss))` tiles the backward convs too.

  Array leaves of the arguments are traced; every other leaf (Python numbers, bools, strings) is
  static, as with `equinox.filter_jit`.

  Args:
    fun: the function to rewrite. Omit it to get a decorator: `@tile_convs(max_bytes=2**26)`.
    max_bytes: largest working set of one elemental conv (its lhs, rhs and output pieces plus any
      accumulator), in bytes. Default: `default_max_bytes()` of the device, at trace time.
    tile_shape: output tile extent per spatial dim (an int for all dims; None entries let the
      planner choose), in the conv's spatial order (H, W for 'NHWC').
    channel_block: (input-channel block, output-channel block) per piece, inside a group for
      grouped convs; a block spanning whole groups splits by groups. An int sets both.
    batch_block: batch rows per piece.
    tier: "auto" rewrites convs above `max_bytes` (and any conv that an explicit
      tile_shape/channel_block/batch_block applies to); "tiled" plans every conv against
      `max_bytes` (one that fits stays a single, unchanged piece); "native" rewrites nothing; "reference"
      evaluates every conv with the NumPy reference on the host (for debugging).
    strict: raise `BudgetError` when a conv cannot be split within `max_bytes`, instead of
      running it at the finest split reachable with a warning.
    devices: divide each tiled conv's pieces among these devices (a sequence of `jax.Device`,
      or a `jax.sharding.Mesh`, possibly spanning several processes) with `jax.shard_map`:
      contiguous blocks of the output per device, gathered back into one array. Inside the
      user's own `pmap`/`shard_map`, convs are tiled per device and not distributed again.
    mesh_axis: the axis of a multi-axis Mesh `devices` to divide pieces along.
    shard_output: leave each distributed conv's output sharded over the devices along the
      dimension its pieces were divided on (for the next layer), instead of unconstrained.
    fuse: tile chains of spatially local ops (a conv, then convs and elementwise ops such as
      bias and activations) as one loop over output tiles, so their intermediates live one tile
      at a time (`jaxtile._src.region`). "auto" (default) fuses regions that hold an oversized conv,
      True every region of two or more convs (or of one conv with a pool, pad or upsampling
      around it), cutting where recomputed halos would more than
      double a region's multiply-adds; False tiles every conv on its own.
    tuning: plans `jaxtile.autotune` measured, used instead of the planner's rule for the convs
      they were measured for (same signature, `max_bytes` and device kind): a `Tuning`, a
      `TuneResult`, or the path of a file `autotune(..., cache=path)` wrote (read now, when
      `tile_convs` is called). Default: none, every conv planned by the rule.
    static_argnums, static_argnames: arguments treated as static whole, as in `jax.jit`.

  Returns:
    A function with `fun`'s signature and outputs.

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> @jaxtile.tile_convs(max_bytes=2**20)
    ... def f(x, w):
    ...   return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> x, w = jnp.ones((1, 8, 64, 64)), jnp.ones((8, 8, 3, 3))
    >>> f(x, w).shape
    (1, 8, 64, 64)
  """
  tuning = _tuning(tuning)  # read once, now: `explain` of the result sees the same plans
  policy = make_policy(max_bytes, tile_shape, channel_block, batch_block, tier, strict, devices,
                       mesh_axis, shard_output, fuse, tuning)
  static_argnums, static_argnames = _static_args(static_argnums, static_argnames)
  if fun is None:
    return functools.partial(
        tile_convs, max_bytes=max_bytes, tile_shape=tile_shape, channel_block=channel_block,
        batch_block=batch_block, tier=tier, strict=strict, devices=devices,
        mesh_axis=mesh_axis, shard_output=shard_output, fuse=fuse, tuning=tuning,
        static_argnums=static_argnums, static_argnames=static_argnames)
  if not callable(fun):
    raise TypeError(f"tile_convs: fun must be callable, but got {fun!r}.")

  def run(static: _Static, *dynamic):
    closed, out_shape = _trace(fun, static, dynamic)
    rewritten, _ = rewrite_lib.rewrite(closed, policy())
    out = _compat.jaxpr_as_fun(rewritten)(*dynamic)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

  run.__name__ = f"tile_convs({getattr(fun, '__name__', 'fun')})"
  jitted = jax.jit(run, static_argnums=0)

  @functools.wraps(fun)
  def wrapper(*args, **kwargs):
    dynamic, static = _split_call(args, kwargs, static_argnums, static_argnames)
    return jitted(static, *dynamic)

  # `explain`, `check` and `autotune` given `wrapper` analyse `fun` under this policy.
  wrapper.__jaxtile_tiled__ = _Tiled(
      wrapper, fun, dict(max_bytes=max_bytes, tile_shape=tile_shape, channel_block=channel_block,
                         batch_block=batch_block, tier=tier, strict=strict, devices=devices,
                         mesh_axis=mesh_axis, shard_output=shard_output, fuse=fuse,
                         tuning=tuning),
      static_argnums, static_argnames)
  return wrapper


def explain(fun: Callable, /, *args, static_argnums=(), static_argnames=(),
            **policy_kwargs) -> Callable[..., report_lib.Report]:
  """Transforms `fun` into `f(*args, **kwargs) -> Report`: what `tile_convs` does to its convs.

  Nothing is run: `fun` is traced at the arguments and planned. Takes the same policy keywords as
  `tile_convs`. A function decorated with `tile_convs` is explained undecorated, under the
  decorator's policy with the keywords given here on top; the report's `policy` says which.

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> report = jaxtile.explain(f, max_bytes=2**20)(jnp.ones((1, 8, 64, 64)),
    ...                                               jnp.ones((8, 8, 3, 3)))
    >>> report.convs[0].tiled, report.convs[0].n_elemental > 1
    (True, True)
  """
  tgt = target("explain", fun, policy_kwargs, static_argnums, static_argnames, args)

  def explained(*args, **kwargs) -> report_lib.Report:
    return trace_and_record(tgt, args, kwargs).recorder.report(tgt.described)

  return Staged("explain", tgt, explained, "Report")
