"""The command line: `python -m jaxtile explain|check MODULE:FUNCTION --arg SHAPE:DTYPE ...`.

    python -m jaxtile explain my_model:forward --arg 1x1024x1024x3:float32 \\
        --arg 3x3x3x64:float32 --max-bytes 256MiB --jaxpr
    python -m jaxtile check my_model.py:forward --arg 1x256x256x3:float32 --arg 3x3x3x64:float32

`explain` traces the function at abstract arguments (`jax.ShapeDtypeStruct`: nothing is
allocated, whatever the shapes), prints the `Report`, and with `--jaxpr` the rewritten jaxpr.
`check` runs `jaxtile.check` on random normal arguments. A bad argument gets one line on stderr,
`jaxtile: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import re
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtile import api
from jaxtile import verify as verify_lib
from jaxtile import plan as plan_lib

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30,
          "gib": 2**30, "t": 2**40, "tib": 2**40}


class UsageError(Exception):
  """A bad command-line argument; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse, but an error is one line (`jaxtile: error: ...`), without the usage block."""

  def error(self, message: str):
    self.exit(2, f"jaxtile: error: {_one_line(message)}\n")


def _one_line(message: Any) -> str:
  return " ".join(str(message).split())


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
        f"FUNCTION must be MODULE:FUNCTION (a dotted module or a path to a .py file, a colon, "
        f"then the function's name), but got {target!r}.")
  if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
    module = _load_file(pathlib.Path(module_name), target)
  else:
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise UsageError(f"cannot import module {module_name!r} (from {target!r}): {e}") from e
  fun: Any = module
  for part in attr.split("."):
    if not hasattr(fun, part):
      raise UsageError(f"module {module_name!r} has no attribute {attr!r} (from {target!r}).")
    fun = getattr(fun, part)
  if not callable(fun):
    raise UsageError(f"{target!r} is not callable: it is a {type(fun).__name__}.")
  return fun


def _load_file(path: pathlib.Path, target: str):
  if not path.is_file():
    raise UsageError(f"no such file {str(path)!r} (from {target!r}).")
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
    raise UsageError(f"cannot import {str(path)!r} (from {target!r}): {e}") from e
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
  fun, args, policy = load_function(ns.function), list(ns.arg), _policy(ns)
  found = []

  def trace(*arrays):
    found.append(api.explain(fun, **policy)(*arrays))
    return ()

  # explain traces the array leaves of its arguments; under eval_shape the ShapeDtypeStructs are
  # abstract arrays, so nothing is allocated whatever the shapes.
  jax.eval_shape(trace, *args)
  report = found[0]
  print(report)
  if ns.jaxpr:
    print()
    print(jax.make_jaxpr(api.tile_convs(fun, **policy))(*args))
  if ns.plot:
    print(f"plot: {report.plot(ns.plot)}")
  return 0


def _check(ns: argparse.Namespace) -> int:
  fun, policy = load_function(ns.function), _policy(ns)
  args = random_args(ns.arg, ns.seed)
  print(verify_lib.check(fun, *args, windows=ns.windows, seed=ns.seed, **policy))
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
  """Runs the command line; returns the exit status (0, or 2 for a bad argument)."""
  parser = _parser()
  try:
    ns = parser.parse_args(argv)
  except SystemExit as e:  # --help, or argparse's own one-line error
    return e.code if isinstance(e.code, int) else 2
  try:
    return ns.run(ns)
  except (UsageError, ValueError, TypeError, ImportError) as e:
    # Bad arguments, and what the pass rejects (BudgetError, a tile_shape that does not fit a
    # conv, arguments the function cannot take): the message says it all.
    print(f"jaxtile: error: {_one_line(e)}", file=sys.stderr)
    return 2
