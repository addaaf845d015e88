"""The command line: `python -m jaxtile explain|check|stream MODULE:FUNCTION ...`.

    python -m jaxtile explain my_model:forward --arg 1x1024x1024x3:float32 \\
        --arg 3x3x3x64:float32 --max-bytes 256MiB --jaxpr
    python -m jaxtile check my_model.py:forward --arg 1x256x256x3:float32 \\
        --arg 3x3x3x64:float32 --max-bytes 4MiB

`explain` traces the function at abstract arguments (`jax.ShapeDtypeStruct`: nothing is
allocated, whatever the shapes), prints the `Report`, and with `--jaxpr` the rewritten jaxpr.
`check` runs `jaxtile.check` on random normal arguments; it exits 1 when no conv was tiled (so
nothing was compared). Tables fit 100 columns; `--wide` prints every column.

`stream` runs a function of the image alone (its parameters bound inside it, as in
`def forward(x): return model.apply(params, x)`) over an image on disk a tile at a time with
`jaxtile.stream`, e.g. `python -m jaxtile stream my_model:forward --input in.zarr --output
out.zarr --max-bytes 64MiB`. The input is a zarr array or a .npy file; the output is created
(zarr, chunked like the output tiles; or .npy by its suffix) unless it exists with the output's
shape and dtype. `--resume` computes only the tiles an interrupted run did not finish;
`--explain` prints the `StreamPlan` and computes nothing. It prints one line at the end: tiles
computed and skipped, seconds, megapixels per second.

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
from jaxtile._src import decide as decide_lib
from jaxtile._src import spec as spec_lib
from jaxtile._src import stream as stream_lib

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
_OP_PREFIX = re.compile(r"^(?:(?:jaxtile|tile_convs|explain|check|autotune|stream): )+")


def _error_text(summary: str, detail: str = "", remedy: str = "") -> str:
  """`jaxtile: error: SUMMARY`, then the detail and the remedy as indented, wrapped lines."""
  lines = [_PREFIX + summary]
  for text in (detail, remedy and f"to fix: {remedy}"):
    if text:
      # A word longer than a line (a source file's path) is left whole: cut, it names no file.
      lines += textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ",
                             break_long_words=False, break_on_hyphens=False)
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


def _budget_error(e: decide_lib.BudgetError, ns: argparse.Namespace) -> str:
  """`--strict` and a conv that cannot be split within `--max-bytes`: the remedies are flags."""
  if e.element_limit:
    summary = "a conv cannot be split below the 2**31-1 element limit"
    why = "even its finest split reachable keeps a piece operand above 2**31-1 elements"
  else:
    summary = (f"a conv cannot be split within --max-bytes {e.max_bytes} "
               f"({spec_lib.format_bytes(e.max_bytes)})")
    why = (f"even its finest split reachable leaves pieces of {e.smallest_bytes} bytes "
           f"({spec_lib.format_bytes(e.smallest_bytes)})")
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


# ---------------------------------------------------------------------------------------------
# stream: an image on disk through a function, a tile at a time
# ---------------------------------------------------------------------------------------------
_INSTALL_STREAM = 'pip install "jaxtile[stream]"'
# Python's words in `stream`'s messages, as a shell user types them.
_STREAM_WORDS = ((re.compile(r"\s*(?:Pass resume=False|Raise max_bytes)\b[^.]*\.?"), ""),
                 (re.compile(r"\bresume=True\b"), "--resume"),
                 (re.compile(r"\bmax_bytes=(?=\d)"), "--max-bytes "))


def tile_extents(text: str):
  """`512x512` or `512,512` (one per spatial dim; `none`: the whole dim), or `512` (every dim)."""
  parts = [p.strip().lower() for p in re.split(r"[x,]", text)]
  if not all(re.fullmatch(r"\d+|none", p) for p in parts):
    raise argparse.ArgumentTypeError(
        f"expected N or NxN... such as 512x512 (ints; 'none' takes the whole dim), but got "
        f"{text!r}.")
  values = tuple(None if p == "none" else int(p) for p in parts)
  if 0 in values:
    raise argparse.ArgumentTypeError(f"every extent must be positive, but got {text!r}.")
  return values[0] if len(values) == 1 else values


def _describe(shape: Sequence[int], dtype: Any) -> str:
  return f"{'x'.join(map(str, shape)) or 'scalar'} {np.dtype(dtype).name}"


def _zarr(flag: str, path: str):
  try:
    import zarr
  except ImportError as e:
    raise UsageError(f"{flag} is a zarr array, which needs zarr: it is not installed",
                     f"{flag} {path}: {_one_line(e)}", f"{_INSTALL_STREAM}, or use a .npy file"
                     ) from e
  return zarr


def open_input(text: str):
  """`--input`: a zarr array (a directory), read-only; or a .npy file, memory-mapped."""
  path = pathlib.Path(text)
  if not path.exists():
    raise UsageError("no such --input", f"{text} does not exist",
                     "pass --input the path of a zarr array or a .npy file")
  if path.is_file():
    try:
      image = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
      image = None
      why = _one_line(e) if path.suffix.lower() == ".npy" else "not in NumPy's .npy format"
    else:
      why = f"it holds a {type(image).__name__}, not one array"
    if not isinstance(image, np.ndarray):
      raise UsageError("--input is not a .npy file", f"{text}: {why}",
                       "pass a .npy file written by numpy.save, or a zarr array")
    return image
  zarr = _zarr("--input", text)  # a directory: a zarr array
  try:
    return zarr.open_array(str(path), mode="r")
  except Exception as e:  # zarr's errors differ between versions: not found, a group, bad metadata
    raise UsageError("--input is not a zarr array",
                     f"{text}: {type(e).__name__}: {_one_line(e)}",
                     "pass the path of a zarr array (in a group, name the array: data.zarr/image) "
                     "or a .npy file") from e


def _check_image_alone(fun: Callable, target: str) -> None:
  """`stream` calls FUNCTION with the image alone: its other parameters are bound inside it."""
  try:
    signature = inspect.signature(fun)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(object())
  except TypeError:
    name = f"{target.rpartition(':')[2]}{signature}"
    raise UsageError(f"FUNCTION must take the image alone, but {name} does not",
                     f"from {target!r}; stream calls it with one argument, the image",
                     "bind its other arguments inside a function of the image, as in "
                     "def forward(x): return model.apply(params, x)") from None


def _output_of(fun: Callable, image: jax.ShapeDtypeStruct, target: str) -> jax.ShapeDtypeStruct:
  """FUNCTION's output at the input's shape and dtype, traced (nothing is computed)."""
  name = target.rpartition(":")[2]
  try:
    out = jax.eval_shape(fun, image)
  except Exception as e:  # the user's function: anything it raises is its own message
    detail = _one_line(f"{type(e).__name__}: {e}")
    raise UsageError(f"{name} fails on the input ({_describe(image.shape, image.dtype)})",
                     detail[:400] + (" ..." if len(detail) > 400 else "")) from e
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise UsageError(f"{name} must return one array (the output image)",
                     f"but it returns {jax.tree_util.tree_structure(out)}")
  return out


def open_output(text: str, needed: jax.ShapeDtypeStruct, source: pathlib.Path,
                writable: bool = True):
  """`--output` if it exists (its shape and dtype must be `needed`'s), else None."""
  path = pathlib.Path(text)
  if path.resolve() == source.resolve():
    raise UsageError("--output is the input", f"both are {text}",
                     "write the output to another path: tiles read the input around them")
  if not path.exists():
    return None
  if path.suffix.lower() == ".npy":
    try:
      out = np.load(path, mmap_mode="r+" if writable else "r")
    except (OSError, ValueError, EOFError) as e:
      raise UsageError("--output exists and is not a .npy file", f"{text}: {_one_line(e)}",
                       f"delete {text} or choose another --output") from e
  else:
    zarr = _zarr("--output", text)
    try:
      out = zarr.open_array(str(path), mode="r+" if writable else "r")
    except Exception as e:  # as in open_input
      raise UsageError("--output exists and is not a zarr array",
                       f"{text}: {type(e).__name__}: {_one_line(e)}",
                       f"delete {text} or choose another --output") from e
  have = _describe(out.shape, out.dtype)
  need = _describe(needed.shape, needed.dtype)
  if have != need:
    raise UsageError("--output exists with another shape or dtype than FUNCTION's output",
                     f"{text} is {have}, but FUNCTION makes {need} from the input",
                     f"delete {text} or choose another --output")
  return out


def _output_aval(plan) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype of what `plan` (a `StreamPlan` or a `SpillPlan`) writes."""
  if isinstance(plan, stream_lib.StreamPlan):
    return tuple(plan.out_shape), np.dtype(plan.out_dtype)
  return tuple(plan.result.shape), np.dtype(plan.result.dtype)


def _chunks(plan) -> Optional[tuple[int, ...]]:
  """One output tile along each spatial dim, the whole batch and channel dims; None (zarr's
  choice) where the output is not written a tile at a time (a `SpillPlan` whose last segment
  does not stream)."""
  if not isinstance(plan, stream_lib.StreamPlan):
    plan = plan.plans[-1]
    if not isinstance(plan, stream_lib.StreamPlan):
      return None
  chunks = list(plan.out_shape)
  for d, a in enumerate(plan.layout.spatial):
    chunks[a] = plan.tile[d]
  return tuple(chunks)


def create_output(text: str, plan):
  """A new zarr array (a .npy file by its suffix) of the plan's output, chunked like its tiles."""
  shape, dtype = _output_aval(plan)
  try:
    if pathlib.Path(text).suffix.lower() == ".npy":
      return np.lib.format.open_memmap(text, mode="w+", dtype=dtype, shape=shape)
    zarr = _zarr("--output", text)
    chunks = _chunks(plan)
    return zarr.open_array(text, mode="w", shape=shape, dtype=dtype,
                           chunks=True if chunks is None else chunks)
  except UsageError:
    raise
  except Exception as e:  # a directory that cannot be made, a dtype zarr cannot store
    raise UsageError("cannot create --output",
                     f"{text} ({_describe(shape, dtype)}): "
                     f"{type(e).__name__}: {_one_line(e)}") from e


def _stream_words(message: Any, target: str) -> str:
  """`stream`'s message in the shell's words: FUNCTION's name for `fun`, flags for keywords, and
  no Python remedy (the command gives its own)."""
  message = re.sub(r"^fun\b", target.rpartition(":")[2], _OP_PREFIX.sub("", _one_line(message)))
  for python, shell in _STREAM_WORDS:
    message = python.sub(shell, message)
  return message.strip()


def _stream_error(e: stream_lib.StreamError, target: str) -> UsageError:
  message = _stream_words(e, target)
  if message.startswith("--resume, but "):  # the journal beside --output is another command's
    return UsageError("--resume, but the tiles recorded beside --output are another run's",
                      message.partition(", but ")[2].rstrip("."),
                      "drop --resume to start over, or repeat the interrupted command exactly "
                      "(the same FUNCTION, --input, --max-bytes and --tile-shape)")
  # A long first sentence `what: where and why` is cut at its colon: the what is the summary.
  first, stop, rest = message.partition(". ")
  what, colon, why = first.partition(": ")
  if colon and len(first) > WIDTH - len(_PREFIX) and len(what) <= WIDTH - len(_PREFIX):
    return UsageError(what, f"{why}{stop}{rest}".rstrip("."))
  return UsageError(*_split_message(message))


def _stream(ns: argparse.Namespace) -> int:
  source = open_input(ns.input)
  fun = load_function(ns.function)
  _check_image_alone(fun, ns.function)
  image = jax.ShapeDtypeStruct(tuple(source.shape), np.dtype(source.dtype))
  needed = _output_of(fun, image, ns.function)
  if ns.output is None and not ns.explain:
    raise UsageError("stream needs --output", "the output image is written there",
                     "pass --output PATH.zarr (or PATH.npy), or --explain to print the plan only")
  try:
    streamed = stream_lib.stream(fun, max_bytes=ns.max_bytes, tile_shape=ns.tile_shape)
    out = None if ns.output is None else open_output(ns.output, needed, pathlib.Path(ns.input),
                                                     writable=not ns.explain)
    if ns.explain:
      plan = streamed.explain(source, out=out)
      print(plan)
      if out is not None:
        chunks = getattr(out, "chunks", None)
        print(f"  output {ns.output}: exists" + (
            f", chunks {'x'.join(map(str, chunks))}" if chunks else ""))
      elif ns.output is not None:
        chunks = _chunks(plan)
        print(f"  output {ns.output}: to be created" + (
            "" if pathlib.Path(ns.output).suffix.lower() == ".npy" or chunks is None else
            f", chunks {'x'.join(map(str, chunks))}"))
      return 0
    resume = ns.resume
    if out is None:
      out = create_output(ns.output, streamed.explain(image))
      resume = False  # a journal left beside a deleted output must not skip the new one's tiles
    try:
      streamed(source, out=out, resume=resume, progress=False if ns.no_progress else None)
    except KeyboardInterrupt:
      print(f"jaxtile stream: interrupted; the tiles written to {ns.output} are recorded: "
            "rerun the command with --resume to finish", file=sys.stderr)
      return 130
  except decide_lib.BudgetError as e:  # even a tile of one output position is above the budget
    budget = ns.max_bytes or api.default_max_bytes()
    match = re.search(r"needs (\d+) bytes", str(e))
    need = e.smallest_bytes or (int(match.group(1)) if match else 0)
    raise UsageError(f"no output tile fits within --max-bytes {budget} "
                     f"({spec_lib.format_bytes(budget)})",
                     _stream_words(e, ns.function).rstrip("."),
                     f"pass --max-bytes {need} or more" if need else
                     "pass a larger --max-bytes") from e
  except stream_lib.StreamError as e:
    raise _stream_error(e, ns.function) from e
  stats = streamed.last_stats
  print(f"jaxtile stream: {stats.tiles} tiles computed, {stats.skipped} skipped (resumed) in "
        f"{stats.seconds:.2f} s, {stats.megapixels_per_second:.3g} Mpx/s -> {ns.output}")
  return 0


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxtile", description="Inspect what jaxtile does to a function's convs, "
                   "or stream a function over an image on disk a tile at a time.")
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
    sub.add_argument("--tier", choices=decide_lib.TIERS, default="auto")
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
  stream = commands.add_parser(
      "stream", help="run a function of the image over a zarr array or .npy file, tile by tile",
      description="Stream an image on disk through FUNCTION (a function of the image alone) a "
                  "tile at a time with jaxtile.stream, and write its output to --output. Only "
                  "tiles reach the device. Interrupted? Rerun the command with --resume.")
  stream.add_argument("function", metavar="MODULE:FUNCTION",
                      help="a dotted module or a path to a .py file, a colon, a function of the "
                           "image alone (bind parameters inside it)")
  stream.add_argument("--input", required=True, metavar="PATH",
                      help="the image: a zarr array, or a .npy file")
  stream.add_argument("--output", metavar="PATH",
                      help="where the output goes: used if it exists with the output's shape and "
                           "dtype, else created (a zarr array chunked like the tiles; .npy by "
                           "its suffix)")
  stream.add_argument("--max-bytes", type=byte_count, default=None, metavar="BYTES",
                      help="device memory of one tile through the function: 268435456, 2**28 or "
                           "256MiB (default: jaxtile.default_max_bytes())")
  stream.add_argument("--tile-shape", type=tile_extents, default=None, metavar="NxN...",
                      help="output tile per spatial dim, e.g. 512x512, instead of --max-bytes")
  stream.add_argument("--resume", action="store_true",
                      help="compute only the tiles a previous run into --output did not finish")
  stream.add_argument("--no-progress", action="store_true",
                      help="no progress bar (shown on a terminal)")
  stream.add_argument("--explain", action="store_true",
                      help="print the plan (stages, tiles, device memory) and compute nothing")
  stream.set_defaults(run=_stream)
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
  except decide_lib.BudgetError as e:
    sys.stderr.write(_budget_error(e, ns))
  except (ValueError, TypeError, ImportError) as e:
    # What the pass rejects (a tile_shape that does not fit a conv, shapes that do not
    # convolve): the library's message, in the shell's words.
    sys.stderr.write(_error_text(*_split_message(str(e))))
  return 2
