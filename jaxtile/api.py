"""Public wrappers: `tile_convs` and `explain`, and validation of the policy they take."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtile import _compat
from jaxtile import plan as plan_lib
from jaxtile import report as report_lib
from jaxtile import rewrite as rewrite_lib

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


#: Name of the mesh axis made from a list of devices.
MESH_AXIS = "jaxtile"


def make_policy(max_bytes=None, tile_shape=None, channel_block=None, batch_block=None,
                tier="auto", strict=False, devices=None, mesh_axis=None,
                shard_output=False) -> Callable[[], plan_lib.Policy]:
  """Validates the policy arguments now; returns a thunk giving the `Policy` at trace time.

  `max_bytes=None` resolves on the device at trace time, so the default follows the device.
  """
  max_bytes = _positive_int("max_bytes", max_bytes)
  tile_shape = _int_tuple("tile_shape", tile_shape)
  if isinstance(channel_block, numbers.Integral) and not isinstance(channel_block, bool):
    channel_block = (channel_block, channel_block)
  channel_block = _int_tuple("channel_block", channel_block, length=2)
  batch_block = _positive_int("batch_block", batch_block)
  if tier not in plan_lib.TIERS:
    raise ValueError(f"tile_convs: tier must be one of {plan_lib.TIERS}, but got tier={tier!r}.")
  if not isinstance(strict, bool):
    raise TypeError(f"tile_convs: strict must be a bool, but got strict={strict!r}.")
  if not isinstance(shard_output, bool):
    raise TypeError(f"tile_convs: shard_output must be a bool, but got "
                    f"shard_output={shard_output!r}.")
  mesh, mesh_axis = _mesh(devices, mesh_axis)
  if shard_output and mesh is None:
    raise ValueError("tile_convs: shard_output=True needs devices=, but got devices=None.")

  def resolve() -> plan_lib.Policy:
    return plan_lib.Policy(max_bytes or default_max_bytes(), tile_shape, channel_block,
                           batch_block, tier, strict, mesh, mesh_axis, shard_output,
                           jax.devices()[0].device_kind)
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


def _records(fun, policy: Callable[[], plan_lib.Policy], static_argnums, static_argnames, args,
             kwargs):
  """Every conv of `fun(*args, **kwargs)` with what `policy` decides for it, and the policy."""
  dynamic, static = _split_call(args, kwargs, static_argnums, static_argnames)
  closed, _ = _trace(fun, static, dynamic)
  resolved = policy()
  _, records = rewrite_lib.rewrite(closed, resolved)
  return records, resolved


def tile_convs(fun: Optional[Callable] = None, /, *, max_bytes: Optional[int] = None,
               tile_shape: Union[int, Sequence[Optional[int]], None] = None,
               channel_block: Union[int, tuple[Optional[int], Optional[int]], None] = None,
               batch_block: Optional[int] = None, tier: str = "auto", strict: bool = False,
               devices: Union[Sequence[jax.Device], Mesh, None] = None,
               mesh_axis: Optional[str] = None, shard_output: bool = False,
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
  policy = make_policy(max_bytes, tile_shape, channel_block, batch_block, tier, strict, devices,
                       mesh_axis, shard_output)
  static_argnums, static_argnames = _static_args(static_argnums, static_argnames)
  if fun is None:
    return functools.partial(
        tile_convs, max_bytes=max_bytes, tile_shape=tile_shape, channel_block=channel_block,
        batch_block=batch_block, tier=tier, strict=strict, devices=devices,
        mesh_axis=mesh_axis, shard_output=shard_output, static_argnums=static_argnums,
        static_argnames=static_argnames)
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

  return wrapper


def explain(fun: Callable, /, *, static_argnums=(), static_argnames=(), **policy_kwargs):
  """Returns `f(*args, **kwargs) -> Report`: what `tile_convs` would do to each conv of `fun`.

  Nothing is run: `fun` is traced and planned. Takes the same policy keywords as `tile_convs`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> report = jaxtile.explain(f, max_bytes=2**20)(jnp.ones((1, 8, 64, 64)),
    ...                                               jnp.ones((8, 8, 3, 3)))
    >>> report.convs[0].tiled, report.convs[0].n_elemental > 1
    (True, True)
  """
  policy = make_policy(**policy_kwargs)
  static_argnums, static_argnames = _static_args(static_argnums, static_argnames)

  @functools.wraps(fun)
  def explained(*args, **kwargs):
    records, resolved = _records(fun, policy, static_argnums, static_argnames, args, kwargs)
    return report_lib.Report.from_records(records, resolved)

  return explained
