"""Every JAX internal jaxtile touches, in one place.

JAX renames internals between minor versions; this module is the one place to mend when it does.
Everything else in jaxtile imports JAX internals from here, and only public JAX API elsewhere.
Checked against jax 0.10.x and 0.11.x.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.extend as jex
from jax import lax

# Jaxpr data types. `jax.extend.core` is the public home of these since jax 0.4.3x.
Jaxpr = jex.core.Jaxpr
ClosedJaxpr = jex.core.ClosedJaxpr
JaxprEqn = jex.core.JaxprEqn
jaxpr_as_fun = jex.core.jaxpr_as_fun

conv_general_dilated_p = lax.conv_general_dilated_p


def is_conv(eqn: JaxprEqn) -> bool:
  return eqn.primitive is conv_general_dilated_p


def replace_eqn(eqn: JaxprEqn, **changes: Any) -> JaxprEqn:
  return eqn.replace(**changes)


def replace_jaxpr(jaxpr: Jaxpr, **changes: Any) -> Jaxpr:
  return jaxpr.replace(**changes)


def traced_call_eqn(fun: Callable, avals, invars, outvars, source_info) -> JaxprEqn:
  """Traces `jax.jit(fun)` at `avals` and returns its single call equation rebound to our vars.

  Tracing through the public `jax.jit` gives a `jit` equation whose params are right for the
  running JAX version, instead of a hand-written parameter list.
  """
  closed = jax.make_jaxpr(jax.jit(fun))(*avals)
  (eqn,) = closed.jaxpr.eqns
  assert not closed.consts and not closed.jaxpr.constvars, closed
  return eqn.replace(invars=list(invars), outvars=list(outvars), source_info=source_info)


def traced_eqns(fun: Callable, invars, outvars, source_info) -> list:
  """The equations of `fun` traced at `invars`' avals, reading `invars` and making `outvars`
  (its intermediates fresh), each at `source_info`: params right for the running JAX version.
  `fun` must compute its outputs with equations (no input or constant returned as it is)."""
  closed = jax.make_jaxpr(fun)(*[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                                 for v in invars])
  assert not closed.consts and not closed.jaxpr.constvars, closed
  jaxpr = closed.jaxpr
  env = {**dict(zip(jaxpr.invars, invars)), **dict(zip(jaxpr.outvars, outvars))}
  read = lambda v: v if isinstance(v, Literal) else env.get(v, v)
  assert all(v in {o for e in jaxpr.eqns for o in e.outvars} for v in jaxpr.outvars), jaxpr
  return [e.replace(invars=[read(v) for v in e.invars], outvars=[read(v) for v in e.outvars],
                    source_info=source_info) for e in jaxpr.eqns]


# Frames from these places are library code; the user's line is the innermost frame outside them.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (jax, lax, jex))
_JAXTILE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # jaxtile/
_LIBRARY_PACKAGES = frozenset(
    {"jax", "jaxlib", "flax", "equinox", "haiku", "optax", "numpy", "absl", "pytest", "_pytest"})


def _is_library_file(file_name: str) -> bool:
  if file_name.startswith((_JAXTILE_DIR, "<frozen") + _LIBRARY_DIRS):
    return True
  parts = file_name.replace("\\", "/").split("/")
  return any(a in ("site-packages", "dist-packages") and b in _LIBRARY_PACKAGES
             for a, b in zip(parts, parts[1:]))


def user_source_line(source_info) -> str:
  """`file:line (function)` of the user code that emitted an equation.

  JAX's own summary stops at the first frame outside JAX, which for a flax or equinox layer is the
  layer's library code; we go on to the user's model.
  """
  traceback = getattr(source_info, "traceback", None)
  frames = list(traceback.frames) if traceback is not None else []
  for frame in frames:
    if not _is_library_file(frame.file_name):
      return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
  return jex.source_info_util.summarize(source_info)


def user_frames(source_info) -> tuple[str, ...]:
  """`file:line (function)` of every user frame (outside JAX and libraries), innermost first."""
  traceback = getattr(source_info, "traceback", None)
  return tuple(f"{f.file_name}:{f.line_num} ({f.function_name})"
               for f in (traceback.frames if traceback is not None else ())
               if not _is_library_file(f.file_name))


def name_stack(eqn: JaxprEqn) -> str:
  """The equation's name stack as JAX prints it (`UNet/ConvBlock_0/Conv_1`, `jvp(f)`), or ""."""
  return str(getattr(eqn.source_info, "name_stack", "") or "")


def call_name(eqn: JaxprEqn):
  """The `name` param of a call equation (`jit`), or None."""
  return eqn.params.get("name")


# `jax.checkpoint` (flax's `nn.remat`, haiku's `hk.remat`): its primitive is `remat2` in jax
# 0.10 (`checkpoint` in other versions); its body is the `jaxpr` param.
_CHECKPOINT_PRIMITIVES = frozenset({"remat2", "checkpoint"})


def is_checkpoint(eqn: JaxprEqn) -> bool:
  """A `jax.checkpoint` equation JAX has not differentiated: evaluated, it is its body."""
  return (eqn.primitive.name in _CHECKPOINT_PRIMITIVES and "jaxpr" in eqn.params
          and not eqn.params.get("differentiated", False))


# Primitives inside which the program is already per-device (the user's own SPMD code).
_SPMD_PRIMITIVES = frozenset({"xla_pmap", "shard_map"})


def is_spmd(eqn: JaxprEqn) -> bool:
  return eqn.primitive.name in _SPMD_PRIMITIVES


def shard_map(fun: Callable, mesh, in_specs, out_specs) -> Callable:
  """`jax.shard_map` (jax >= 0.7), without replication checks: pieces vary by device index."""
  return jax.shard_map(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# The primitive jaxtile binds its pieces as (jaxtile._src.forms), and the rules it borrows from JAX's
# conv_general_dilated. `jax.interpreters.{ad,batching,mlir}` are JAX's long-standing homes of
# these registries; `dispatch.apply_primitive` is the impl every lax primitive uses.
from jax._src import dispatch as _dispatch  # noqa: E402
from jax._src import source_info_util as _source_info_util  # noqa: E402
from jax._src.interpreters import partial_eval as _pe  # noqa: E402
from jax._src.lax import convolution as _convolution  # noqa: E402
from jax.interpreters import ad as _ad, batching as _batching, mlir as _mlir  # noqa: E402

Primitive = jex.core.Primitive
conv_transpose_lhs = _convolution._conv_general_dilated_transpose_lhs
conv_transpose_rhs = _convolution._conv_general_dilated_transpose_rhs


def define_bilinear_primitive(prim, *, impl_lowering: Callable, abstract_eval: Callable,
                              transpose_lhs: Callable, transpose_rhs: Callable,
                              batch_rule: Callable) -> None:
  """Registers a primitive bilinear in its two operands, as lax does for conv_general_dilated:
  its impl and lowering are `impl_lowering` traced, its JVP follows from bilinearity."""
  prim.def_impl(functools.partial(_dispatch.apply_primitive, prim))
  prim.def_effectful_abstract_eval(abstract_eval)
  _mlir.register_lowering(prim, _mlir.lower_fun(impl_lowering, multiple_results=False))
  _ad.defbilinear(prim, transpose_lhs, transpose_rhs)
  _batching.primitive_batchers[prim] = batch_rule


def define_primitive(prim, *, impl_lowering: Callable, abstract_eval: Callable, jvp: Callable,
                     batch_rule: Callable, transpose: Callable | None = None,
                     multiple_results: bool = False) -> None:
  """Registers a primitive with its impl and lowering (`impl_lowering` traced), JVP and
  batching rules, and for a primitive linear in some operands its transpose rule
  (`transpose(ct, *operands, **params)`, operands to transpose as `UndefinedPrimal`s)."""
  prim.def_impl(functools.partial(_dispatch.apply_primitive, prim))
  prim.def_effectful_abstract_eval(abstract_eval)
  _mlir.register_lowering(prim, _mlir.lower_fun(impl_lowering, multiple_results=multiple_results))
  _ad.primitive_jvps[prim] = jvp
  _batching.primitive_batchers[prim] = batch_rule
  if transpose is not None:
    _ad.primitive_transposes[prim] = transpose


Literal = jex.core.Literal


def new_var(aval) -> Any:
  """A fresh jaxpr variable of `aval`."""
  return jex.core.Var(aval)


def with_shape(aval, shape) -> Any:
  """`aval` (dtype, weak type) at `shape`: what a reshape or broadcast of it makes."""
  return aval.update(shape=tuple(shape))


def dce(jaxpr: Jaxpr) -> Jaxpr:
  """`jaxpr` without the equations no output depends on (effects kept), its inputs all kept."""
  return _pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]


Zero = _ad.Zero
is_undefined_primal = _ad.is_undefined_primal


def input_vars(eqn: JaxprEqn) -> list:
  """`eqn`'s operands that are variables, not literals."""
  return [v for v in eqn.invars if not isinstance(v, jex.core.Literal)]


def eval_eqn(eqn: JaxprEqn, inputs) -> list:
  """The outputs of `eqn` on `inputs` (concrete or traced), as a list."""
  params = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before jax 0.10
  subfuns, params = params if isinstance(params, tuple) else ((), params)
  outs = eqn.primitive.bind(*subfuns, *inputs, **params)
  return list(outs) if eqn.primitive.multiple_results else [outs]


# Call primitives whose bodies `inline_calls` splices into the caller.
_INLINED_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
                  "core_call": "call_jaxpr", **{name: "jaxpr" for name in _CHECKPOINT_PRIMITIVES}}


def _eval_inlining(jaxpr: Jaxpr, consts, args) -> list:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    key = _INLINED_CALLS.get(eqn.primitive.name)
    if key is not None and key in eqn.params:
      body = eqn.params[key]
      outs = _eval_inlining(getattr(body, "jaxpr", body), getattr(body, "consts", ()), inputs)
    else:
      name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
      with _source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
        outs = eval_eqn(eqn, inputs)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def eval_eqns(eqns, env: dict) -> None:
  """Evaluates `eqns` in order, reading and writing `env` (var -> value), each bound with its
  equation's source line, as `jax.core.eval_jaxpr` does."""
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in eqns:
    name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
    with _source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
      env.update(zip(eqn.outvars, eval_eqn(eqn, [read(v) for v in eqn.invars])))


def inline_calls(closed: ClosedJaxpr) -> ClosedJaxpr:
  """`closed` retraced with the bodies of its `jit` calls and `jax.checkpoint`s spliced in, at
  every depth; each equation keeps the user's source line. For a program that is evaluated,
  not differentiated: a checkpoint only tells `jax.grad` what to recompute."""
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
  return jax.make_jaxpr(lambda *args: _eval_inlining(closed.jaxpr, closed.consts, args))(*avals)


def eval_jaxpr_rebinding(closed: ClosedJaxpr, rebind: dict, *args) -> list:
  """Evaluates `closed` on `args`, binding each equation of a primitive in `rebind` with
  `rebind[primitive](*inputs, **params)` instead."""
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive in rebind:
      outs = rebind[eqn.primitive](*inputs, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    else:
      outs = eval_eqn(eqn, inputs)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def custom_jvp_rule(eqn: JaxprEqn):
  """The JVP rule of a `custom_jvp_call` equation as `(jaxpr, consts)`, the jaxpr taking the
  non-const primals and then a tangent for each of them and returning the primal outputs and
  then their tangents; None where the rule is not available as such (a rule returning symbolic
  zeros, or a JAX that keeps it elsewhere).

  `jvp_jaxpr_fun` is the memoised thunk the tracer stores (`partial_eval._memoize`), traced on
  the equation's own avals."""
  thunk = eqn.params.get("jvp_jaxpr_fun")
  if thunk is None or "num_consts" not in eqn.params:
    return None
  n = len(eqn.invars) - eqn.params["num_consts"]
  try:
    jaxpr, consts, out_zeros = thunk.call_wrapped(*[False] * n)
  except Exception:  # noqa: BLE001 -- a rule that cannot be traced alone: no rule
    return None
  if any(out_zeros) or len(jaxpr.invars) != 2 * n:
    return None
  return jaxpr, consts
