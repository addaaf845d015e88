"""The command line: `python -m jaxtile explain|check MODULE:FUNCTION --arg SHAPE:DTYPE ...`.

    python -m jaxtile explain my_model:forward --arg 1x1024x1024x3:float32 \\
        --arg 3x3x3x64:float32 --max-bytes 256MiB --jaxpr
    python -m jaxtile check my_model.py:forward --arg 1x256x256x3:float32 \\
        --arg 3x3x3x64:float32 --max-bytes 4MiB

`explain` traces the function at abstract arguments (`jax.ShapeDtypeStruct`: nothing is
allocated, whatever the shapes), prints the `Report`, and with `--jaxpr` the rewritten jaxpr.
`check` runs `jaxtile.check` on random normal arguments; it exits 1 when no conv was tiled (so
nothing was compared). Tables fit 100 columns; `--wide` prints every column.

A bad argument, or a function the pass rejects, exits 2 with one short line on stderr,
`jaxtile: error: ...`, then indented lines with the detail and what to type instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtile._src import api
from jaxtile._src import verify as verify_lib
from jaxtile._src import plan as plan_lib

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30,
          "gib": 2**30, "t": 2**40, "tib": 2**40}


class UsageError(Exception):
  """A bad command-line argument: a short `summary` line, then `detail` and `remedy` lines."""

  def __init__(self, summary: str, detail: str = "", remedy: str = ""):
    super().__init__(summary)
    self.summary, self.detail, self.remedy = summary, detail, remedy


class _Parser(argparse.ArgumentParser):
  """argparse, but an error is `jaxtile: error: ...` without the usage block."""

  def error(self, message: str):
    self.exit(2, _error_text(*_split_message(message), remedy=f"see {self.prog} --help"))


def _one_line(message: Any) -> str:
  return " ".join(str(message).split())


# ---------------------------------------------------------------------------------------------
# Errors: one short line, then the detail and the remedy, each in words a shell user types.
# ---------------------------------------------------------------------------------------------
WIDTH = 100
_PREFIX = "jaxtile: error: "
# The library's messages name Python keywords; a shell user passes these flags.
_FLAGS = {"max_bytes": "--max-bytes", "tile_shape": "--tile-shape",
          "channel_block": "--channel-block", "batch_block": "--batch-block", "tier": "--tier",
          "windows": "--windows", "seed": "--seed"}
_FLAG_PATTERN = re.compile(r"\b(" + "|".join(_FLAGS) + r")\b")
_OP_PREFIX = re.compile(r"^(?:(?:jaxtile|tile_convs|explain|check|autotune): )+")


def _error_text(summary: str, detail: str = "", remedy: str = "") -> str:
  """`jaxtile: error: SUMMARY`, then the detail and the remedy as indented, wrapped lines."""
  lines = [_PREFIX + summary]
  for text in (detail, remedy and f"to fix: {remedy}"):
    if text:
      lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False)
  return "\n".join(lines) + "\n"


def _split_message(message: str) -> tuple[str, str]:
  """A library error message as (a short first line, the rest), in the shell's words."""
  message = _FLAG_PATTERN.sub(lambda m: _FLAGS[m.group(1)], _OP_PREFIX.sub("", _one_line(message)))
  # The conv's description (shapes, parameters, source line) is detail.
  message, sep, conv = message.partition(" for conv_general_dilated ")
  conv = f"the conv: conv_general_dilated {conv}" if sep else ""
  first = re.split(r"(?<=[.:;])\s+(?=[A-Z])", message, maxsplit=1)
  summary, rest = first[0], first[1] if len(first) > 1 else ""
  room = WIDTH - len(_PREFIX)
  rule, but, given = summary.partition(", but ")
  if len(summary) > room and but and len(rule) <= room:  # JAX's form: the rule, then the values
    summary, rest = rule, f"but {given} {rest}".strip()
  if len(summary) > room:  # still long: wrap it, the remainder leads the detail
    cut = summary.rfind(" ", 0, room)
    summary, rest = summary[:cut], f"{summary[cut + 1:]} {rest}".strip()
  detail = "; ".join(filter(None, (rest.rstrip("."), conv)))
  return summary.rstrip("."), detail


def _budget_error(e: plan_lib.BudgetError, ns: argparse.Namespace) -> str:
  """`--strict` and a conv that cannot be split within `--max-bytes`: the remedies are flags."""
  if e.element_limit:
    summary = "a conv cannot be split below the 2**31-1 element limit"
    why = "even its finest split reachable keeps a piece operand above 2**31-1 elements"
  else:
    summary = (f"a conv cannot be split within --max-bytes {e.max_bytes} "
               f"({plan_lib.format_bytes(e.max_bytes)})")
    why = (f"even its finest split reachable leaves pieces of {e.smallest_bytes} bytes "
           f"({plan_lib.format_bytes(e.smallest_bytes)})")
  remedies = ["drop --strict to run it at that split (with a warning)"]
  if not e.element_limit:
    remedies.append(f"pass --max-bytes {e.smallest_bytes} or more")
  if ns.tile_shape is not None or ns.channel_block is not None or ns.batch_block is not None:
    remedies.append("loosen --tile-shape/--channel-block/--batch-block")
  return _error_text(summary, f"{why}; the conv: {e.conv}.", ", or ".join(remedies))


def _check_arity(fun: Callable, args: Sequence[Any], target: str) -> None:
  """Each positional parameter of `fun` without a default needs one `--arg`, in order."""
  try:
    signature = inspect.signature(fun)
  except (TypeError, ValueError):  # builtins and some C functions have none: let the call say
    return
  try:
    signature.bind(*args)
  except TypeError:
    pass
  else:
    return
  positional = [p for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = [p.name for p in positional if p.default is p.empty]
  name = f"{target.rpartition(':')[2]}({', '.join(p.name for p in positional)})"
  remedy = "pass one --arg SHAPE:DTYPE per positional argument, in order"
  if len(args) < len(required):
    missing = required[len(args):]
    raise UsageError(f"{name} needs {len(required)} --arg, but got {len(args)}",
                     f"missing --arg for {', '.join(map(repr, missing))}", remedy)
  if len(args) > len(positional) and not any(
      p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
    raise UsageError(f"{name} takes {len(positional)} --arg, but got {len(args)}",
                     f"{len(args) - len(positional)} --arg too many", remedy)
  missing = [p.name for p in signature.parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
  if missing:
    raise UsageError(f"{name} has keyword-only arguments without defaults "
                     f"({', '.join(map(repr, missing))}), which --arg cannot pass",
                     remedy="wrap it in a function of positional arguments only")


# ---------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------


def arg_spec(text: str) -> jax.ShapeDtypeStruct:
  """`1x1024x1024x3:float32` -> `ShapeDtypeStruct((1, 1024, 1024, 3), float32)`; `:f32` or
  `scalar:float32` for a scalar."""
  shape, colon, dtype_name = text.rpartition(":")
  if not colon:
    raise argparse.ArgumentTypeError(
        f"expected SHAPE:DTYPE, such as 1x1024x1024x3:float32, but got {text!r} (no colon).")
  shape = shape.strip().lower()
  if shape in ("", "scalar"):
    dims: tuple[int, ...] = ()
  elif re.fullmatch(r"\d+(x\d+)*", shape):
    dims = tuple(int(d) for d in shape.split("x"))
  else:
    raise argparse.ArgumentTypeError(
        f"the shape must be sizes joined by 'x', such as 1x1024x1024x3 (or 'scalar'), but got "
        f"{shape!r} in {text!r}.")
  try:
    dtype = jnp.dtype(dtype_name.strip())
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.kind not in "biufc":
    raise argparse.ArgumentTypeError(
        f"the dtype must be a numeric dtype name, such as float32, bfloat16 or int32, but got "
        f"{dtype_name!r} in {text!r}.")
  return jax.ShapeDtypeStruct(dims, dtype)


def byte_count(text: str) -> int:
  """`268435456`, `2**28`, `256MiB` or `256M` (binary units K, M, G, T) -> bytes."""
  match = re.fullmatch(r"\s*(\d+)\s*(?:\*\*\s*(\d+))?\s*([A-Za-z]*)\s*", text)
  unit = match and _UNITS.get(match.group(3).lower())
  if not match or unit is None:
    raise argparse.ArgumentTypeError(
        f"expected a byte count such as 268435456, 2**28 or 256MiB, but got {text!r}.")
  value = int(match.group(1)) ** int(match.group(2) or 1) * unit
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be positive, but got {text!r}.")
  return value


def _extents(option: str, pair: bool = False) -> Callable[[str], Any]:
  """`64` (every dim) or `64,32` (one per dim; `none` leaves one to the planner)."""
  def parse(text: str):
    parts = [p.strip().lower() for p in text.split(",")]
    if (all(re.fullmatch(r"\d+|none", p) for p in parts)
        and (len(parts) == 1 or not pair or len(parts) == 2)):
      values = tuple(None if p == "none" else int(p) for p in parts)
      return values[0] if len(values) == 1 else values
    raise argparse.ArgumentTypeError(
        f"expected {'N or IN,OUT' if pair else 'N or N,N,...'} (ints; 'none' leaves one "
        f"to the planner), but got {text!r}.")
  parse.__name__ = option
  return parse


def plot_path(text: str) -> str:
  if pathlib.Path(text).suffix.lower() not in (".png", ".svg"):
    raise argparse.ArgumentTypeError(f"expected a path ending in .png or .svg, but got {text!r}.")
  return text


# ---------------------------------------------------------------------------------------------
# The function
# ---------------------------------------------------------------------------------------------


def load_function(target: str) -> Callable:
  """`MODULE:FUNCTION`: MODULE a dotted module name or a path to a .py file; FUNCTION may be
  dotted (`Model.apply`)."""
  module_name, colon, attr = target.rpartition(":")
  if not colon or not module_name or not attr:
    raise UsageError(
        "FUNCTION must be MODULE:FUNCTION", f"but got {target!r}",
        "pass a dotted module or a path to a .py file, a colon, then the function's name, as in "
        "my_model:forward or path/to/my_model.py:Model.apply")
  if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
    module = _load_file(pathlib.Path(module_name), target)
    module_name = pathlib.Path(module_name).name
  else:
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise UsageError(f"cannot import module {module_name!r}", f"{e} (from {target!r})") from e
  fun: Any = module
  for part in attr.split("."):
    if not hasattr(fun, part):
      raise UsageError(f"{module_name} has no attribute {attr!r}", f"from {target!r}")
    fun = getattr(fun, part)
  if not callable(fun):
    raise UsageError(f"{attr} is not callable: it is a {type(fun).__name__}",
                     f"from {target!r}")
  return fun


def _load_file(path: pathlib.Path, target: str):
  if not path.is_file():
    raise UsageError(f"no such file: {path.name}", f"{str(path)!r} (from {target!r})")
  name = "_jaxtile_cli_" + re.sub(r"\W", "_", path.stem)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses and pickling look the module up by name
  directory = str(path.resolve().parent)
  sys.path.insert(0, directory)  # its sibling modules import as they would from a script
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    del sys.modules[name]
    raise UsageError(f"cannot import {path.name}", f"{e} (from {target!r})") from e
  finally:
    sys.path.remove(directory)
  return module


def random_args(specs: Sequence[jax.ShapeDtypeStruct], seed: int) -> list[jax.Array]:
  """Standard normal arrays of the given shapes and dtypes (small integers, random bools)."""
  rng = np.random.default_rng(seed)
  out = []
  for s in specs:
    kind = np.dtype(s.dtype).kind
    if kind == "b":
      x = rng.random(s.shape) < 0.5
    elif kind in "iu":
      x = rng.integers(0 if kind == "u" else -3, 4, s.shape)
    elif kind == "c":
      x = rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape)
    else:
      x = rng.standard_normal(s.shape)
    out.append(jnp.asarray(x, dtype=s.dtype))
  return out


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _policy(ns: argparse.Namespace) -> dict[str, Any]:
  return dict(max_bytes=ns.max_bytes, tile_shape=ns.tile_shape, channel_block=ns.channel_block,
              batch_block=ns.batch_block, tier=ns.tier, strict=ns.strict)


def _explain(ns: argparse.Namespace) -> int:
  fun, args = load_function(ns.function), list(ns.arg)
  _check_arity(fun, args, ns.function)
  # The arguments stay ShapeDtypeStructs: traced, never allocated, whatever the shapes. The
  # report and the rewritten jaxpr come from one trace, so each warning is logged once.
  target = api.target("explain", fun, _policy(ns))
  traced = api.trace_and_record(target, args, {})
  report = traced.recorder.report(target.described)
  print(report.table(wide=ns.wide, width=WIDTH))
  if ns.jaxpr:
    print()
    print(traced.rewritten)
  if ns.plot:
    print(f"plot: {report.plot(ns.plot)}")
  return 0


def _check(ns: argparse.Namespace) -> int:
  fun = load_function(ns.function)
  _check_arity(fun, ns.arg, ns.function)
  args = random_args(ns.arg, ns.seed)
  result = verify_lib.check(fun, windows=ns.windows, seed=ns.seed, **_policy(ns))(*args)
  print(result.table(wide=ns.wide, width=WIDTH))
  if not result.compared:
    budget = result.report.max_bytes_to_tile()
    print("jaxtile check: nothing was compared (exit status 1)"
          + (f"; --max-bytes {budget} tiles the largest conv." if budget else "."),
          file=sys.stderr)
    return 1
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxtile", description="Inspect what jaxtile does to a function's convs.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  explain = commands.add_parser(
      "explain", help="print the report (and the rewritten jaxpr) at abstract arguments",
      description="Trace FUNCTION at abstract arguments (nothing is allocated) and print what "
                  "tile_convs does to each conv.")
  check = commands.add_parser(
      "check", help="run tiled and whole on random arguments and compare each tiled conv",
      description="Run FUNCTION tiled and whole on random normal arguments; compare every "
                  "tiled conv with the monolithic conv and the float64 NumPy reference.")
  for sub in (explain, check):
    sub.add_argument("function", metavar="MODULE:FUNCTION",
                     help="a dotted module or a path to a .py file, a colon, a function name")
    sub.add_argument("--arg", type=arg_spec, action="append", default=[], metavar="SHAPE:DTYPE",
                     help="one positional argument, e.g. 1x1024x1024x3:float32 (repeat, in order)")
    sub.add_argument("--max-bytes", type=byte_count, default=None, metavar="BYTES",
                     help="largest working set of one elemental conv: 268435456, 2**28 or 256MiB "
                          "(default: jaxtile.default_max_bytes())")
    sub.add_argument("--tile-shape", type=_extents("--tile-shape"), default=None,
                     metavar="N[,N...]", help="output tile extent per spatial dim")
    sub.add_argument("--channel-block", type=_extents("--channel-block", pair=True), default=None,
                     metavar="IN,OUT", help="input and output channels per piece")
    sub.add_argument("--batch-block", type=int, default=None, metavar="N",
                     help="batch rows per piece")
    sub.add_argument("--tier", choices=plan_lib.TIERS, default="auto")
    sub.add_argument("--strict", action="store_true",
                     help="fail when a conv cannot be split within max-bytes")
    sub.add_argument("--wide", action="store_true",
                     help="print every column of the table (wider than 100 columns)")
  explain.add_argument("--jaxpr", action="store_true", help="print the rewritten jaxpr too")
  explain.add_argument("--plot", type=plot_path, metavar="PATH.png|PATH.svg",
                       help="draw the tiled convs' pieces (needs matplotlib)")
  explain.set_defaults(run=_explain)
  check.add_argument("--windows", type=int, default=4,
                     help="output windows compared with the reference for big convs")
  check.add_argument("--seed", type=int, default=0, help="seeds the arguments and the windows")
  check.set_defaults(run=_check)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0; 1 when `check` compared nothing; 2 for a
  bad argument or a function the pass rejects)."""
  parser = _parser()
  try:
    ns = parser.parse_args(argv)
  except SystemExit as e:  # --help, or argparse's own error
    return e.code if isinstance(e.code, int) else 2
  try:
    return ns.run(ns)
  except UsageError as e:
    sys.stderr.write(_error_text(e.summary, e.detail, e.remedy))
  except plan_lib.BudgetError as e:
    sys.stderr.write(_budget_error(e, ns))
  except (ValueError, TypeError, ImportError) as e:
    # What the pass rejects (a tile_shape that does not fit a conv, shapes that do not
    # convolve): the library's message, in the shell's words.
    sys.stderr.write(_error_text(*_split_message(str(e))))
  return 2
