"""Per-piece cost: the planner's plan before and after it weighed pieces, against the whole conv.

    python benchmarks/per_piece.py               # before/after table (~1 min on 2 CPU cores)
    python benchmarks/per_piece.py --measure     # per-piece seconds and MAC/s of this backend

The table times, in one process and alternating (`bench.timeit_alternating`), the monolithic
conv, the plan of the halving rule alone (`search.refine`, what `decide` chose before the per-piece
model) and the plan `decide` chooses now (`search.choose`), each at the same budget. `--measure`
tiles two small convs with `tile_shape`/`channel_block` overrides into 1..128 pieces and fits
seconds = pieces * per_piece_s + MACs / macs_per_s (the constants of `search._BACKEND_PIECE_COSTS`).
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # pylint: disable=g-import-not-at-top

import jaxtile
from jaxtile._src import lower as lower_lib
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile._src import search

KiB = 2**10
DIMENSION_NUMBERS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}

# (label, lhs shape, rhs shape, budget): I3D's 3x3x3 128 -> 192 conv (Mixed_3b-like), a smaller
# clip of it, and a 2-D control.
CASES = (
    ("3-D I3D-like", (1, 16, 28, 28, 128), (3, 3, 3, 128, 192), 96 * KiB),
    ("3-D small clip", (1, 4, 14, 14, 128), (3, 3, 3, 128, 192), 96 * KiB),
    ("2-D control", (1, 112, 112, 64), (3, 3, 64, 64), 96 * KiB),
)


def _conv(n_spatial: int):
  dn = DIMENSION_NUMBERS[n_spatial]
  return lambda x, w: lax.conv_general_dilated(x, w, (1,) * n_spatial, "SAME",
                                               dimension_numbers=dn)


def _inputs(lhs_shape, rhs_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  return jax.random.normal(kx, lhs_shape), jax.random.normal(kw, rhs_shape)


def _spec(fn, args) -> jaxtile._src.spec.ConvSpec:
  return jaxtile._src.spec.ConvSpec.from_eqn(jax.make_jaxpr(fn)(*args).jaxpr.eqns[0])


def before_after(repeats: int) -> None:
  rows = []
  for label, lhs_shape, rhs_shape, budget in CASES:
    fn = _conv(len(lhs_shape) - 2)
    args = _inputs(lhs_shape, rhs_shape)
    spec = _spec(fn, args)
    old = search.refine(geometry.monolithic_plan(spec), budget)
    new = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget), warn=False).plan
    fns = [fn, lower_lib.lower(old, "before"), lower_lib.lower(new, "after")]
    (mono, t_old, t_new), _ = bench.timeit_alternating(fns, args, repeats)
    for name, plan, t in (("before (refine)", old, t_old), ("after (choose)", new, t_new)):
      rows.append([f"{label} {spec.lhs_shape} -> {spec.out_shape[-1]}", f"{budget // KiB} KiB", name, plan.n_elemental,
                   f"{plan.tile_bytes() / KiB:.1f} KiB",
                   f"{search.modelled_seconds(plan) * 1e3:.0f}",
                   bench.ms(mono), bench.ms(t), bench.ratio(t, mono)])
  bench.print_table(
      "Per-piece cost: pieces and time, whole vs before/after (`per_piece.py`)",
      ["conv", "budget", "plan", "pieces", "largest piece", "modelled ms", "whole ms",
       "tiled ms", "tiled / whole"], rows)


def measure() -> None:
  """Fits per-piece seconds and MAC/s, per number of spatial dims (see the module docstring)."""
  cases = {
      3: ((1, 8, 16, 16, 32), (3, 3, 3, 32, 32),
          [dict(tile_shape=t) for t in ((8, 16, 16), (4, 16, 16), (2, 8, 16), (1, 8, 8),
                                        (1, 4, 8), (1, 4, 4))]),
      2: ((1, 64, 64, 32), (3, 3, 32, 32),
          [dict(tile_shape=t) for t in ((64, 64), (16, 64), (8, 32), (4, 16), (4, 8))]),
  }
  for n_spatial, (lhs_shape, rhs_shape, overrides) in cases.items():
    fn, args = _conv(n_spatial), _inputs(lhs_shape, rhs_shape)
    spec = _spec(fn, args)
    fns, pieces = [], []
    for kw in overrides:
      policy = decide_lib.Policy(max_bytes=2**40, tier="tiled", **kw)
      plan = decide_lib.decide(spec, policy, warn=False).plan
      fns.append(lower_lib.lower(plan, "measure"))
      pieces.append(plan.n_elemental)
    times, _ = bench.timeit_alternating(fns, args, repeats=5)
    macs = np.prod(spec.out_shape) * np.prod(spec.rhs_shape) / spec.rhs_shape[-1]
    slope, whole = np.polyfit(pieces, times, 1)
    for n, t in zip(pieces, times):
      print(f"{n_spatial}-D {spec.lhs_shape}: {n:4d} pieces {t * 1e3:8.2f} ms")
    print(f"{n_spatial}-D: per_piece_s={slope:.2e} macs_per_s={macs / whole:.2e}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--measure", action="store_true")
  args = parser.parse_args(argv)
  print(f"$ python benchmarks/per_piece.py {shlex.join(argv or sys.argv[1:])}".rstrip())
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, {os.cpu_count()} CPUs\n")
  if args.measure:
    measure()
  else:
    before_after(args.repeats)


if __name__ == "__main__":
  main()
