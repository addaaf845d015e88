"""Tiled vs monolithic convs: run time, compiled memory, compile time, the paper's case, scaling.

    python benchmarks/bench.py --quick              # every table kind at small sizes (~1 min, CPU)
    python benchmarks/bench.py                      # the sizes of issue 3 (minutes on a CPU)
    python benchmarks/bench.py --paper              # adds 1x1024x1024x1024, 4096 pieces (~21 GiB)
    python benchmarks/bench.py --scaling --host-devices 8   # pieces spread over devices
    python benchmarks/bench.py --only time,memory   # some tables only
    python benchmarks/bench.py --only regions       # a chain of 8 convs tiled as one region (~3 min)

Prints Markdown tables (docs/benchmarks.md records them, with the command line printed first).
Times are medians over repeats that alternate the programs compared (monolithic, tiled,
monolithic, ...), after compiling and one warm-up call each, so that both see the same machine
load. Ratios are tiled / monolithic. Nothing here asserts on time. On a GPU a conv with more than
2**31 elements, which the monolithic path cannot run, is added.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxtile

MiB = 2**20
TABLES = ("time", "memory", "compile", "forms", "grad", "paper", "scaling", "large", "regions")


# ---------------------------------------------------------------------------------------------
# Convs as data.
# ---------------------------------------------------------------------------------------------
DIMENSION_NUMBERS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}


@dataclasses.dataclass(frozen=True)
class Conv:
  """A square `kernel`x`kernel` SAME conv, stride 1, float32, on a `size`x`size` image."""
  batch: int
  size: int
  cin: int
  cout: int
  kernel: int = 3
  layout: str = "NHWC"

  def with_layout(self, layout: str) -> Conv:
    return dataclasses.replace(self, layout=layout)

  @property
  def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n, s, k = self.batch, self.size, self.kernel
    if self.layout == "NHWC":
      return (n, s, s, self.cin), (k, k, self.cin, self.cout)
    return (n, self.cin, s, s), (self.cout, self.cin, k, k)

  @property
  def label(self) -> str:
    x_shape = "x".join(map(str, self.shapes[0]))
    return f"{x_shape} {self.layout}, {self.kernel}x{self.kernel}, {self.cin}->{self.cout}"

  @property
  def input_bytes(self) -> int:
    return math.prod(self.shapes[0]) * 4

  def fn(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
    dimension_numbers = DIMENSION_NUMBERS[self.layout]

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                          dimension_numbers=dimension_numbers)
    return conv

  def inputs(self, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random operands made on the device (no host copy); weights scaled to keep outputs O(1)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x_shape, w_shape = self.shapes
    w = jax.random.normal(kw, w_shape, jnp.float32) / math.sqrt(self.kernel**2 * self.cin)
    return jax.random.normal(kx, x_shape, jnp.float32), w


@dataclasses.dataclass(frozen=True)
class ConvChain:
  """`depth` x (3x3 SAME conv `channels` -> `channels` + relu), float32, NHWC/HWIO, batch 1: the
  whole-network case of region tiling (`jaxtile._src.region`)."""
  size: int
  depth: int = 8
  channels: int = 32

  @property
  def label(self) -> str:
    return (f"{self.depth} x (3x3 conv {self.channels}->{self.channels} + relu) on "
            f"1x{self.size}x{self.size}x{self.channels}")

  @property
  def input_bytes(self) -> int:
    return self.size**2 * self.channels * 4

  @staticmethod
  def fn(x: jax.Array, ws: Sequence[jax.Array]) -> jax.Array:
    for w in ws:
      x = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                               dimension_numbers=DIMENSION_NUMBERS["NHWC"]))
    return x

  def inputs(self, seed: int = 0) -> tuple[jax.Array, list[jax.Array]]:
    keys = jax.random.split(jax.random.key(seed), self.depth + 1)
    c = self.channels
    ws = [jax.random.normal(k, (3, 3, c, c), jnp.float32) / math.sqrt(9 * c) for k in keys[1:]]
    return jax.random.normal(keys[0], (1, self.size, self.size, c), jnp.float32), ws

  def host_inputs(self, seed: int = 0) -> tuple[jax.Array, list[jax.Array]]:
    """As `inputs`, the image drawn by NumPy and handed to the device without a copy on a CPU:
    `jax.random` holds several input-sized temporaries, which would set the process's peak RSS."""
    x = np.random.default_rng(seed).standard_normal((1, self.size, self.size, self.channels),
                                                    dtype=np.float32)
    return jax.device_put(x), ConvChain(size=1, depth=self.depth, channels=self.channels).inputs(
        seed)[1]


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The convs each table runs: `--quick` shrinks them, the table kinds stay."""
  time: Conv          # time, memory and scaling tables
  compile: Conv       # compile-time table
  compile_tiles: tuple[int, ...]  # square tile extents for the compile table (16, 256, 4096 pieces)
  repeats: int


FULL = Sizes(time=Conv(1, 512, 128, 128), compile=Conv(1, 256, 8, 8), compile_tiles=(64, 16, 4),
             repeats=7)
QUICK = Sizes(time=Conv(1, 256, 64, 64), compile=Conv(1, 256, 8, 8), compile_tiles=(64, 16, 4),
              repeats=3)
# Issue 3, target 4: 64 tiles of 128x128 and 8 x 8 channel blocks of 128 = 4096 elemental convs.
PAPER = Conv(1, 1024, 1024, 1024)
PAPER_POLICY = dict(tile_shape=(128, 128), channel_block=(128, 128))
# Above 2**31 elements (1x2048x2048x640 = 2.7e9): 10 GiB of input, for GPUs only.
LARGE = Conv(1, 2048, 640, 64)
# Region tiling (issue 9): the budget curve and gradient at 512, peak RSS and a memory cap at 1024.
REGION_CHAIN = ConvChain(size=512)
REGION_BUDGETS_MIB = (32, 8, 2, 1)
REGION_GRAD_BUDGETS_MIB = (8, 4, 1)
REGION_RSS_CHAIN = ConvChain(size=1024)
REGION_RSS_BUDGET_MIB = 4


@dataclasses.dataclass(frozen=True)
class TimeCase:
  """A row of the time table: `tiles` output tiles, as a square grid or as full-width strips,
  each input-channel block split `in_blocks` ways; `tiles=None` lets the planner choose under a
  budget of about 1/16 of the monolithic working set."""
  layout: str
  tiles: Optional[int]
  in_blocks: int = 1
  strips: bool = False

  def policy(self, conv: Conv) -> dict:
    if self.tiles is None:
      # 1/12, not 1/16: pieces carry a halo, so 16 pieces are each a little above 1/16.
      return dict(max_bytes=working_bytes(conv) // 12)
    if self.strips:
      policy = dict(tile_shape=(conv.size // self.tiles, conv.size))
    else:
      side = math.isqrt(self.tiles)
      policy = dict(tile_shape=(conv.size // side, conv.size // side))
    if self.in_blocks > 1:
      policy["channel_block"] = (conv.cin // self.in_blocks, None)
    return policy

  def name(self, conv: Conv) -> str:
    if self.tiles is None:
      return f"planner, max_bytes={self.policy(conv)['max_bytes'] / MiB:.1f} MiB"
    blocks = f" x {self.in_blocks} in-channel blocks" if self.in_blocks > 1 else ""
    return f"{self.tiles} {'strips' if self.strips else 'tiles'}{blocks}"


TIME_CASES = tuple(
    [TimeCase(layout, tiles, in_blocks, strips) for layout in ("NHWC", "NCHW")
     for strips in (False, True) for in_blocks in (1, 4) for tiles in (16, 64)]
    + [TimeCase("NHWC", None)])


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------
def timeit_alternating(fns: Sequence[Callable], args: Sequence, repeats: int,
                       warmup: int = 1) -> tuple[list[float], list]:
  """Median seconds per call of each of `fns` on `args`, and each one's last output.

  Every function is compiled first (its compile time is not counted) and called `warmup` times;
  then the timed calls alternate between the functions, `repeats` rounds, so that a change in the
  machine's load hits all of them alike.
  """
  compiled = [jax.jit(fn).lower(*args).compile() for fn in fns]
  outputs = [None] * len(fns)
  for _ in range(warmup):
    for i, fn in enumerate(compiled):
      outputs[i] = jax.block_until_ready(fn(*args))
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(compiled):
      outputs[i] = None  # let the previous output go before the next call allocates its own
      start = time.perf_counter()
      outputs[i] = jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times], outputs


def temp_bytes(fn: Callable, args: Sequence) -> Optional[dict]:
  """Temporary, argument and output bytes of `fn`'s compiled program, or None if not reported."""
  try:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  except NotImplementedError:
    return None
  if stats is None:
    return None
  return dict(temp=stats.temp_size_in_bytes, args=stats.argument_size_in_bytes,
              out=stats.output_size_in_bytes)


def working_bytes(conv: Conv) -> int:
  """The monolithic conv's working set (input, weights, output) as jaxtile counts it."""
  return jaxtile.explain(conv.fn())(*conv.inputs()).convs[0].working_bytes


def describe(report: jaxtile.Report) -> tuple[str, str]:
  """(pieces, plan) of every conv in `report`, the tiled ones described by their blocks."""
  pieces, plans = [], []
  for c in report.convs:
    pieces.append(str(c.n_elemental))
    if not c.tiled:
      plans.append("monolithic")
      continue
    parts = [f"{'x'.join(map(str, c.spatial_tiles))} tiles of "
             f"{'x'.join(map(str, c.plan.tile_shape))}"]
    if c.in_channel_blocks > 1 or c.out_channel_blocks > 1:
      parts.append(f"{c.in_channel_blocks}x{c.out_channel_blocks} in x out channel blocks")
    if c.batch_blocks > 1:
      parts.append(f"{c.batch_blocks} batch blocks")
    if math.prod(c.kernel_blocks) > 1:
      parts.append(f"{'x'.join(map(str, c.kernel_blocks))} kernel blocks")
    plans.append(", ".join(parts))
  return " + ".join(pieces), "; ".join(plans)


def first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


# ---------------------------------------------------------------------------------------------
# Printing.
# ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?\d[\d.]*(e[-+]?\d+)?|-")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence], notes=()) -> None:
  """A Markdown table with aligned columns; numeric columns are right-aligned."""
  cells = [[str(v) for v in row] for row in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
  numeric = [bool(cells) and all(_NUMBER.fullmatch(r[i]) for r in cells)
             for i in range(len(header))]
  pad = lambda v, i: v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i])
  print(f"\n### {title}\n")
  print("| " + " | ".join(pad(h, i) for i, h in enumerate(header)) + " |")
  print("|" + "|".join("-" * (w + 1) + (":" if n else "-") for w, n in zip(widths, numeric)) + "|")
  for row in cells:
    print("| " + " | ".join(pad(v, i) for i, v in enumerate(row)) + " |")
  for note in notes:
    print(f"\n{note}")
  sys.stdout.flush()


def ms(seconds: Optional[float]) -> str:
  if seconds is None:
    return "-"
  return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def mib(n: Optional[int]) -> str:
  if n is None:
    return "-"
  return f"{n / MiB:.1f}" if n >= MiB or n == 0 else f"{n / MiB:.3f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
  return "-" if a is None or not b else f"{a / b:.2f}"


# ---------------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------------
def time_table(sizes: Sizes, repeats: int) -> None:
  """Issue 3, target 1: tiled / monolithic time, per layout and split."""
  rows = []
  for case in TIME_CASES:
    conv = sizes.time.with_layout(case.layout)
    f, args, policy = conv.fn(), conv.inputs(), case.policy(sizes.time)
    pieces, plan = describe(jaxtile.explain(f, **policy)(*args))
    (t_mono, t_tiled), _ = timeit_alternating([f, jaxtile.tile_convs(f, **policy)], args, repeats)
    rows.append((case.layout, case.name(sizes.time), pieces, plan, ms(t_mono), ms(t_tiled),
                 ratio(t_tiled, t_mono)))
  print_table(f"Time: {sizes.time.label}, float32, median of {repeats} alternating runs",
              ("layout", "split", "pieces", "plan", "monolithic ms", "tiled ms", "tiled / mono"),
              rows, ["Targets (issue 3): tiled / mono <= 1.05 for tiles alone, <= 1.10 with "
                     "input-channel blocks, in both layouts."])


def forms_table(repeats: int) -> None:
  """The backend facts jaxtile's piece forms rely on (lower.py): one tile, expressed three ways."""
  key = jax.random.split(jax.random.key(0), 2)
  w_hwio = jax.random.normal(key[1], (3, 3, 128, 128), jnp.float32)
  x_nhwc = jax.random.normal(key[0], (1, 130, 130, 128), jnp.float32)
  nhwc = ("NHWC", "HWIO", "NHWC")
  unpadded = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=nhwc)
  padded = lambda x, w: lax.conv_general_dilated(  # one extra output column over padding, cropped
      x, w, (1, 1), ((0, 0), (0, 1)), dimension_numbers=nhwc)[:, :, :128]
  (t_unpadded, t_padded), outs = timeit_alternating([unpadded, padded], (x_nhwc, w_hwio), repeats)
  same = bool(jnp.array_equal(outs[0], outs[1]))
  flops = 2 * 128 * 128 * 9 * 128 * 128
  x_nchw, w_oihw = jnp.transpose(x_nhwc, (0, 3, 1, 2)), jnp.transpose(w_hwio, (3, 2, 0, 1))
  nchw = ("NCHW", "OIHW", "NCHW")

  def in_loop(transposed):
    def run(x, w):  # 4 pieces of the same tile inside a fori_loop, as the lowering runs them
      def body(i, acc):
        if transposed:
          y = lax.conv_general_dilated(jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0)),
                                       (1, 1), "VALID", dimension_numbers=nhwc)
          y = jnp.transpose(y, (0, 3, 1, 2))
        else:
          y = lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=nchw)
        return acc + y * i
      return lax.fori_loop(0, 4, body, jnp.zeros((1, 128, 128, 128), jnp.float32))
    return run
  (t_nchw, t_nhwc), _ = timeit_alternating([in_loop(False), in_loop(True)], (x_nchw, w_oihw),
                                           repeats)
  print_table(
      f"Piece forms on {jax.devices()[0].platform}: one 128x128x128 output tile, 3x3, 128 -> 128, "
      f"median of {repeats}",
      ("form", "ms", "GFLOP/s", "ratio"),
      [("no padding (VALID on the 130x130 window)", ms(t_unpadded), f"{flops / t_unpadded / 1e9:.0f}",
        "1.00"),
       ("one extra padded output column, cropped", ms(t_padded), f"{flops / t_padded / 1e9:.0f}",
        ratio(t_padded, t_unpadded)),
       ("NCHW conv in a loop, 4 pieces", ms(t_nchw), f"{4 * flops / t_nchw / 1e9:.0f}", "1.00"),
       ("same, transposed to NHWC per piece", ms(t_nhwc), f"{4 * flops / t_nhwc / 1e9:.0f}",
        ratio(t_nhwc, t_nchw))],
      [f"padded-and-cropped equals unpadded exactly: {same}"])


GRAD_CONV = Conv(batch=1, size=256, cin=64, cout=64)


def grad_table(sizes: Sizes, repeats: int) -> None:
  """Gradient time: differentiating the tiled program vs tiling the differentiated one."""
  conv = GRAD_CONV if sizes is FULL else sizes.time  # differentiating the tiled loop is slow
  f, args = conv.fn(), conv.inputs()
  tile = (conv.size // 4,) * 2
  loss = lambda g: (lambda x, w: jnp.sum(g(x, w) ** 2))
  mono = jax.grad(loss(f), argnums=(0, 1))
  grad_of_tiled = jax.grad(loss(jaxtile.tile_convs(f, tile_shape=tile)), argnums=(0, 1))
  tiled_grad = jaxtile.tile_convs(jax.grad(loss(f), argnums=(0, 1)), tile_shape=tile)
  (t_mono, t_a, t_b), outs = timeit_alternating([mono, grad_of_tiled, tiled_grad], args, repeats)
  def err(got):
    return max(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) for g, r in zip(got, outs[0]))
  print_table(
      f"Gradient time: {conv.label}, 4x4 tiles, median of {repeats} alternating runs",
      ("program", "ms", "/ monolithic", "rel L2 vs monolithic"),
      [("jax.grad(f), monolithic", ms(t_mono), "1.00", "-"),
       ("jax.grad(tile_convs(f))", ms(t_a), ratio(t_a, t_mono), f"{err(outs[1]):.1e}"),
       ("tile_convs(jax.grad(f))", ms(t_b), ratio(t_b, t_mono), f"{err(outs[2]):.1e}")])


def memory_table(sizes: Sizes) -> None:
  """Issue 3, target 2: compiled temporaries of the tiled forward conv and of its gradient.

  Two budgets, M and M / 16, so that temporaries growing with the number of pieces show.
  """
  conv = sizes.time
  f, args = conv.fn(), conv.inputs()
  # A power of two at most 1/16 of the working set: the conv really is split.
  budget = 2 ** int(math.log2(working_bytes(conv) // 16))
  grad = lambda f: jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1))
  # (name, program, max_bytes, the function explain plans (None: not tiled), is a gradient)
  programs = [("forward, monolithic", f, None, None, False),
              ("grad, monolithic", grad(f), None, None, True)]
  for m in (budget, budget // 16):
    tiled = jaxtile.tile_convs(f, max_bytes=m)
    programs += [
        ("forward, tiled", tiled, m, f, False),
        ("grad of tiled: jax.grad(tile_convs(f))", grad(tiled), m, f, True),
        ("tiled grad: tile_convs(jax.grad(loss))", jaxtile.tile_convs(grad(f), max_bytes=m), m,
         grad(f), True)]
  rows, reported = [], True
  for name, fn, m, explained, is_grad in programs:
    pieces = describe(jaxtile.explain(explained, max_bytes=m)(*args))[0] if explained else "1"
    stats = temp_bytes(fn, args)
    reported &= stats is not None
    temp = stats and stats["temp"]
    rows.append((name, pieces, mib(m), mib(temp), ratio(temp, m),
                 ratio(temp, m and is_grad and m + conv.input_bytes),
                 mib(stats and stats["args"]), mib(stats and stats["out"])))
  notes = [f"Input {conv.input_bytes / MiB:.1f} MiB. Targets (issue 3): forward temp <= 2 M; "
           "gradient temp a small multiple of M + input, not growing with the number of pieces."]
  if not reported:
    notes.append(f"memory_analysis() reports nothing on {jax.devices()[0].platform}: '-'.")
  print_table(f"Memory: compiled temporaries, {conv.label}, float32",
              ("program", "pieces", "M MiB", "temp MiB", "temp / M", "temp / (M + input)",
               "args MiB", "output MiB"), rows, notes)


def compile_table(sizes: Sizes, repeats: int, quick: bool) -> None:
  """Issue 3, target 3: compile time against the number of pieces.

  `lower` is `jax.jit(tiled).lower(...)`: tracing, jaxtile's rewrite and lowering to StableHLO;
  `compile` is XLA's. Each measurement uses a fresh `tile_convs` wrapper, so no cache is reused.
  """
  conv = sizes.compile
  f, args = conv.fn(), conv.inputs()
  rows, base, base_pieces, skip = [], None, None, None
  cases = [("monolithic", None)] + [(f"{t}x{t} tiles", dict(tile_shape=(t, t)))
                                    for t in sizes.compile_tiles]
  # One untimed round first: the process's first trace and compile pay one-time costs.
  jax.jit(jaxtile.tile_convs(f, **cases[1][1])).lower(*args).compile()
  for name, policy in cases:
    pieces = describe(jaxtile.explain(f, **policy)(*args))[0] if policy else "1"
    if skip:
      rows.append((name, pieces, "-", "-", "-", "-", "-", skip))
      continue
    lowers, compiles = [], []
    for _ in range(repeats):
      fn = jax.jit(jaxtile.tile_convs(f, **policy) if policy else conv.fn())
      start = time.perf_counter()
      lowered = fn.lower(*args)
      lowers.append(time.perf_counter() - start)
      start = time.perf_counter()
      lowered.compile()
      compiles.append(time.perf_counter() - start)
    t_lower, t_compile = statistics.median(lowers), statistics.median(compiles)
    if policy and base is None:
      base, base_pieces = (t_lower, t_compile), pieces
    rows.append((name, pieces, ms(t_lower), ms(t_compile), ms(t_lower + t_compile),
                 ratio(t_compile, base and base[1]) if policy else "-",
                 ratio(t_lower + t_compile, base and sum(base)) if policy else "-", ""))
    if quick and t_lower + t_compile > 5:
      skip = f"skipped in --quick: the previous row took {t_lower + t_compile:.1f} s"
  print_table(f"Compile time: {conv.label}, median of {repeats}",
              ("program", "pieces", "lower ms", "compile ms", "total ms",
               f"compile / {base_pieces} pieces", f"total / {base_pieces} pieces", "note"), rows,
              ["lower = trace + jaxtile's rewrite + lowering to StableHLO; compile = XLA. "
               "Target: 4096 pieces compile within 1.5x of 16."])


def paper_table(repeats: int, warmup: int) -> None:
  """Issue 3, target 4: the paper's 4096-piece conv, end to end, against the monolithic one."""
  print(f"\nPaper case: {PAPER.label} with {PAPER_POLICY}. Needs about 21 GiB of memory "
        "(4 GiB per activation, both results held to compare them; peak RSS 20.3 GiB on a CPU "
        "host); minutes on a CPU.")
  f, args = PAPER.fn(), PAPER.inputs()
  pieces, plan = describe(jaxtile.explain(f, **PAPER_POLICY)(*args))
  (t_mono, t_tiled), (mono, tiled) = timeit_alternating(
      [f, jaxtile.tile_convs(f, **PAPER_POLICY)], args, repeats, warmup)
  max_abs = float(jnp.max(jnp.abs(tiled - mono)))
  rel_l2 = float(jnp.linalg.norm(tiled - mono) / jnp.linalg.norm(mono))
  print_table(f"Paper case: {PAPER.label}, float32, median of {repeats} alternating runs",
              ("pieces", "plan", "monolithic s", "tiled s", "tiled / mono", "max abs error",
               "relative L2 error"),
              [(pieces, plan, f"{t_mono:.3g}", f"{t_tiled:.3g}", ratio(t_tiled, t_mono),
                f"{max_abs:.2e}", f"{rel_l2:.2e}")])


def scaling_table(sizes: Sizes, repeats: int) -> None:
  """Issue 4: one conv's 64 pieces divided among 1, 2, 4, 8 devices (as many as present)."""
  title = "Scaling: pieces divided among devices"
  if "devices" not in inspect.signature(jaxtile.tile_convs).parameters:
    print(f"\n### {title}\n\nskipped: devices= not available in jaxtile.tile_convs")
    return
  conv = sizes.time
  f, args = conv.fn(), conv.inputs()
  side = conv.size // 8
  policy = dict(tile_shape=(side, side))  # 8x8 = 64 tiles
  devices = jax.devices()
  counts = [n for n in (1, 2, 4, 8) if n <= len(devices)]
  fns, per_device = [], []
  for n in counts:
    fns.append(jaxtile.tile_convs(f, devices=devices[:n], **policy))
    try:
      report = jaxtile.explain(f, devices=devices[:n], **policy)(*args)
      per_device.append(", ".join(map(str, report.convs[0].plan.pieces_per_device)))
    except TypeError as e:  # explain does not take devices= (yet)
      per_device.append(f"n/a ({first_line(e)})")
  times, _ = timeit_alternating(fns, args, repeats)
  rows = [(n, ppd, ms(t), ratio(t, times[0])) for n, ppd, t in zip(counts, per_device, times)]
  notes = [f"{conv.label}, tile_shape={policy['tile_shape']} (64 pieces); {len(devices)} "
           f"{devices[0].platform} device(s) present."]
  if devices[0].platform == "cpu":
    notes.append("Host CPU devices share the same cores: these times say little about scaling.")
  print_table(f"{title}: {conv.label}, median of {repeats} alternating runs",
              ("devices", "pieces per device", "time ms", "time / 1 device"), rows, notes)


def large_table(conv: Conv, repeats: int) -> None:
  """A conv above 2**31 elements: the monolithic path fails (where it does), the tiled one runs.

  The tiled conv takes the default policy: whatever the budget, jaxtile splits a conv whose
  operands exceed 2**31 - 1 elements.
  """
  f = conv.fn()
  x_shape, _ = conv.shapes
  # Made in slabs along axis 1, so that no single random-number kernel spans 2**31 elements.
  slabs = 4
  slab_shape = x_shape[:1] + (x_shape[1] // slabs,) + x_shape[2:]
  x = jnp.concatenate([jax.random.normal(k, slab_shape, jnp.float32)
                       for k in jax.random.split(jax.random.key(0), slabs)], axis=1)
  _, w = conv.inputs()
  args = (x, w)
  tiled = jaxtile.tile_convs(f)
  pieces, plan = describe(jaxtile.explain(f)(*args))
  fns, names, notes = [tiled], ["tiled (default policy)"], {}
  try:
    jax.block_until_ready(jax.jit(f)(*args))
    fns.insert(0, f)
    names.insert(0, "monolithic")
  except Exception as e:  # the failure is the point: report it, whatever its type
    notes["monolithic"] = f"fails: {first_line(e)}"
  times, _ = timeit_alternating(fns, args, repeats)
  timed = dict(zip(names, times))
  rows = [("monolithic", "1", "-", ms(timed.get("monolithic")), notes.get("monolithic", "runs")),
          ("tiled (default policy)", pieces, plan, ms(timed["tiled (default policy)"]),
           "runs")]
  print_table(f"Above 2**31 elements: {conv.label} ({math.prod(x_shape):.2e} input elements), "
              f"float32, median of {repeats}",
              ("program", "pieces", "plan", "time ms", "note"), rows)


def regions_table(repeats: int) -> None:
  """Issue 9: a chain of convs and relus tiled as one region, against per-conv tiling and none.

  Four tables: temporaries and time against the budget; the gradient; peak process RSS of the
  untiled and tiled forward at 1024x1024, each in its own process; and both run again under a
  data-segment cap set halfway between those two peaks.
  """
  chain = REGION_CHAIN
  f, args = chain.fn, chain.inputs()
  rows = []
  for budget in REGION_BUDGETS_MIB:
    policy = dict(max_bytes=budget * MiB)
    fused, per_conv = jaxtile.tile_convs(f, **policy), jaxtile.tile_convs(f, fuse=False, **policy)
    report = jaxtile.explain(f, **policy)(*args)
    temps = [temp_bytes(fn, args) for fn in (f, fused, per_conv)]
    (t_none, t_fused, t_per_conv), outs = timeit_alternating([f, fused, per_conv], args, repeats)
    err = max(float(jnp.max(jnp.abs(o - outs[0]))) for o in outs[1:])
    regions = report.regions
    rows.append((mib(budget * MiB), *(mib(t and t["temp"]) for t in temps), ms(t_none),
                 ratio(t_fused, t_none), ratio(t_per_conv, t_none),
                 " + ".join(f"{r.extra_macs_percent:.1f}" for r in regions) or "-", len(regions),
                 "; ".join(f"{'x'.join(map(str, r.tiles))} tiles of "
                           f"{'x'.join(map(str, r.tile_shape))}, halo "
                           f"{'x'.join(map(str, r.halo))}" for r in regions) or "-",
                 f"{err:.1e}"))
  print_table(f"Regions: {chain.label}, float32, median of {repeats} alternating runs",
              ("max_bytes MiB", "untiled temp MiB", "fused temp MiB", "per-conv temp MiB",
               "untiled ms", "fused / untiled", "per-conv / untiled", "extra MACs %", "regions",
               "fused tiles", "max abs diff"), rows,
              [f"Input {mib(chain.input_bytes)} MiB. temp = compiled "
               "`memory_analysis().temp_size_in_bytes`; fused = `tile_convs(f, max_bytes=...)` "
               "(fuse='auto'), per-conv = `fuse=False`; extra MACs % per region (recomputed "
               "halos); max abs diff = largest of fused and per-conv against untiled."])

  # The gradient of sum(chain) with respect to the input and every kernel.
  grad = lambda fn: jax.grad(lambda x, ws: jnp.sum(fn(x, ws)), argnums=(0, 1))
  programs = [("-", "untiled: jax.grad(f)", grad(f))]
  for budget in REGION_GRAD_BUDGETS_MIB:
    programs += [
        (mib(budget * MiB), "jax.grad(tile_convs(f))",
         grad(jaxtile.tile_convs(f, max_bytes=budget * MiB))),
        (mib(budget * MiB), "tile_convs(jax.grad(f))",
         jaxtile.tile_convs(grad(f), max_bytes=budget * MiB))]
  temps = [temp_bytes(fn, args) for _, _, fn in programs]
  times, outs = timeit_alternating([fn for _, _, fn in programs], args, repeats)
  flat = [jax.tree.leaves(o) for o in outs]
  def err(got):
    return max(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) for g, r in zip(got, flat[0]))
  print_table(f"Regions, gradient: {chain.label}, median of {repeats} alternating runs",
              ("max_bytes MiB", "program", "temp MiB", "ms", "/ untiled", "rel L2 vs untiled"),
              [(budget, name, mib(t and t["temp"]), ms(s), ratio(s, times[0]),
                "-" if i == 0 else f"{err(flat[i]):.1e}")
               for i, ((budget, name, _), t, s) in enumerate(zip(programs, temps, times))],
              ["jax.grad(tile_convs(f)) differentiates the region (`region.emit_transpose`: per "
               "tile, the forward recomputed and pulled back); tile_convs(jax.grad(f)) tiles the "
               "program JAX has already differentiated: its forward and backward convs as one "
               "region whose loop adds up the weight gradients (`region.Reductions`), in tiles "
               "within max_bytes where the doubled halo's recomputation stays within "
               "MAX_EXTRA_MACS, else in tiles of up to 8x max_bytes (warned)."])

  # Peak RSS, each program alone in a fresh process; then both again under a cap between them.
  chain, budget_mib = REGION_RSS_CHAIN, REGION_RSS_BUDGET_MIB
  runs = {"untiled": [], "tiled": []}
  for _ in range(2):  # alternating, as for times
    for program in runs:
      runs[program].append(rss_child_run(program, chain.size, budget_mib))
  rows, peaks = [], {}
  for program, results in runs.items():
    ok = [r for r in results if r.get("ok")]
    if not ok:
      rows.append((program, "-", "-", "-", "-", results[-1].get("error", "?")))
      continue
    peaks[program] = statistics.median(r["peak"] - r["base"] for r in ok)
    rows.append((program, mib(int(statistics.median(r["base"] for r in ok))),
                 mib(int(statistics.median(r["compiled"] - r["base"] for r in ok))),
                 mib(int(peaks[program])),
                 ", ".join(mib(r["peak"] - r["base"]) for r in ok), "runs"))
  print_table(f"Regions, peak RSS: {chain.label}, max_bytes {budget_mib} MiB, each in its own "
              "process", ("program", "RSS after inputs MiB", "compiled: RSS - that MiB",
                          "peak RSS - that MiB", "each run MiB", "note"), rows,
              [f"Input and output {mib(chain.input_bytes)} MiB each. peak = VmHWM "
               "(/proc/self/status) after compiling and one call; 'RSS after inputs' is the "
               "process's resident set once the inputs exist; median of "
               f"{len(runs['tiled'])} processes each. ru_maxrss in the same children: "
               + ", ".join(f"{p} {mib(int(statistics.median(r['maxrss'] for r in rs)))} MiB"
                           for p, rs in runs.items() if rs and all(r.get("ok") for r in rs))
               + " (inherited from this parent process, which is larger)."])
  if len(peaks) < 2:
    print("\nmemory cap: skipped, a peak above was not measured")
    return
  cap = int((peaks["untiled"] + peaks["tiled"]) / 2)
  rows = []
  for program in ("untiled", "tiled"):
    r = rss_child_run(program, chain.size, budget_mib, cap=cap)
    if r.get("ok"):
      rows.append((program, "runs", f"{r['shape']}, finite: {r['finite']}",
                   f"{abs(r['sum'] - runs['untiled'][0].get('sum', math.nan)) / abs(r['sum']):.1e}"))
    else:
      rows.append((program, "fails", r.get("error", "?"), "-"))
  print_table(f"Regions under a memory cap: {chain.label}, max_bytes {budget_mib} MiB, "
              f"RLIMIT_DATA = data segment after compiling + {mib(cap)} MiB",
              ("program", "outcome", "output / error", "rel. diff of sum vs uncapped untiled"),
              rows, [f"Cap headroom {mib(cap)} MiB: halfway between the two peaks above "
                     "(untiled and tiled, each over its RSS after inputs)."])


def _proc_status_bytes(field: str) -> Optional[int]:
  """A `/proc/self/status` size (VmRSS, VmData, ...) in bytes; None off Linux."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def rss_child_run(program: str, size: int, budget_mib: int, cap: Optional[int] = None) -> dict:
  """Runs `rss_child` in a fresh Python process and returns what it reports."""
  command = [sys.executable, os.path.abspath(__file__), "--rss-child", program,
             "--rss-size", str(size), "--rss-max-bytes-mib", str(budget_mib)]
  if cap is not None:
    command += ["--rss-cap-bytes", str(cap)]
  done = subprocess.run(command, capture_output=True, text=True)
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  lines = [l.strip() for l in done.stderr.splitlines() if l.strip()]
  return dict(ok=False, error=f"exit {done.returncode}: {lines[-1] if lines else ''}"[:160])


def rss_child(program: str, size: int, budget_mib: int, cap: Optional[int]) -> None:
  """One forward call of the chain, untiled or tiled, in this process; prints a JSON line.

  With `cap`, RLIMIT_DATA is set, once compiled, to the data segment in use plus `cap` bytes.
  (RLIMIT_AS over the address space in use works alike here; as an absolute cap either would
  have to allow for the ~1.6 GiB of address space a CPU JAX process has reserved by then.)
  """
  chain = ConvChain(size=size)
  x, ws = jax.block_until_ready(chain.host_inputs())
  base = _proc_status_bytes("VmRSS")
  fn = chain.fn if program == "untiled" else jaxtile.tile_convs(chain.fn,
                                                                max_bytes=budget_mib * MiB)
  compiled = jax.jit(fn).lower(x, ws).compile()
  after_compile = _proc_status_bytes("VmRSS")
  if cap is not None:
    limit = _proc_status_bytes("VmData") + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
  try:
    out = jax.block_until_ready(compiled(x, ws))
  except Exception as e:  # the failure is the point: report it, whatever its type
    print(json.dumps(dict(ok=False, error=first_line(e))), flush=True)
    sys.exit(1)
  # Not ru_maxrss: Linux carries it over from the parent across fork and exec, so a child of this
  # benchmark reports the parent's (larger) peak. VmHWM belongs to this process's own memory.
  peak = _proc_status_bytes("VmHWM")
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  print(json.dumps(dict(ok=True, base=base, compiled=after_compile, peak=peak, maxrss=maxrss,
                        shape="x".join(map(str, out.shape)),
                        finite=bool(jnp.all(jnp.isfinite(out))), sum=float(jnp.sum(out)))),
        flush=True)


# ---------------------------------------------------------------------------------------------
def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"small shapes and few repeats (~1 minute on a CPU): time conv "
                           f"{QUICK.time.label}")
  parser.add_argument("--repeats", type=int, default=None,
                      help=f"timed rounds per table (default {FULL.repeats}, {QUICK.repeats} with "
                           "--quick)")
  parser.add_argument("--paper", action="store_true",
                      help="add the paper's 4096-piece case (~21 GiB; not with --quick)")
  parser.add_argument("--scaling", action="store_true",
                      help="add the device scaling table (needs tile_convs(devices=...))")
  parser.add_argument("--only", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                      default=None, help=f"comma-separated tables among {','.join(TABLES)}")
  parser.add_argument("--host-devices", type=int, default=None,
                      help="on a CPU, split the host into this many devices (for --scaling)")
  # The regions table runs itself in child processes to measure each one's peak RSS.
  parser.add_argument("--rss-child", choices=("untiled", "tiled"), help=argparse.SUPPRESS)
  parser.add_argument("--rss-size", type=int, default=REGION_RSS_CHAIN.size, help=argparse.SUPPRESS)
  parser.add_argument("--rss-max-bytes-mib", type=int, default=REGION_RSS_BUDGET_MIB,
                      help=argparse.SUPPRESS)
  parser.add_argument("--rss-cap-bytes", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for table in args.only or ():
    if table not in TABLES:
      parser.error(f"--only takes tables among {','.join(TABLES)}, but got {table!r}")
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.rss_child:
    rss_child(args.rss_child, args.rss_size, args.rss_max_bytes_mib, args.rss_cap_bytes)
    return
  if args.host_devices:
    jax.config.update("jax_num_cpu_devices", args.host_devices)  # before the backend starts
  sizes = QUICK if args.quick else FULL
  repeats = args.repeats or sizes.repeats
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"

  print("command: " + shlex.join(["python"] + sys.argv if argv is None else ["bench.py", *argv]))
  print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); "
        f"jax {jax.__version__}, jaxtile {jaxtile.__version__}, {os.cpu_count()} CPU cores")
  if os.environ.get("XLA_FLAGS"):
    print(f"XLA_FLAGS: {os.environ['XLA_FLAGS']}")

  # Not "regions": about 3 minutes on a 2-core CPU, so only with --only regions.
  tables = set(args.only or ("time", "memory", "compile", "forms", "grad")
               + (("large",) if on_gpu else ()))
  tables |= {"paper"} if args.paper else set()
  tables |= {"scaling"} if args.scaling else set()
  start = time.perf_counter()
  if "time" in tables:
    time_table(sizes, repeats)
  if "memory" in tables:
    memory_table(sizes)
  if "compile" in tables:
    compile_table(sizes, 1 if args.quick else 3, args.quick)
  if "forms" in tables:
    forms_table(repeats)
  if "grad" in tables:
    grad_table(sizes, repeats)
  if "regions" in tables:
    regions_table(repeats)
  if "scaling" in tables:
    scaling_table(sizes, repeats)
  if "large" in tables:
    if not on_gpu:
      print(f"\nnote: the above-2**31 case was asked for on {device.platform}; it needs ~12 GiB.")
    large_table(LARGE, repeats)
  if "paper" in tables:
    if args.quick:
      print("\n### Paper case\n\nskipped: not run with --quick (drop --quick to run it)")
    else:
      # On a CPU one run of each takes minutes: no warm-up call, one timed round.
      paper_table(repeats, warmup=1) if on_gpu else paper_table(1, warmup=0)
  print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
