"""The search: from a starting plan and a budget to block sizes.

`refine` halves blocks by a greedy rule until the largest piece fits; `choose` then moves to fewer,
larger pieces while a per-piece cost model says they run faster; `for_devices` splits further so
that every device gets a block. `RULES` are the variations of the rule `jaxtile.autotune` times.
Nothing here reads the policy: `decide.py` says where the search starts and what it may change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from jaxtile._src.geometry import ConvPlan, tile_quantum

# ---------------------------------------------------------------------------------------------
# Choosing blocks.
#
# Rule (greedy, deterministic): start from the monolithic conv; while the largest piece is over
# budget (or any piece operand has more than 2**31 - 1 elements), halve one axis's block. Among
# the axes that can still be halved, take the one whose halving leaves the smallest piece; pieces
# within `_TIE` of that smallest count as ties, broken by the preference order
#     batch, groups, spatial dims (outermost first), output channels, input channels, kernel
#     taps per spatial dim (only where that dim's output is not tiled).
# Batch and groups split for free (no halo, no extra reads, same summation order). Preferring the
# outer spatial dim gives full-width strips, the shape XLA runs fastest, until their halo makes
# them clearly worse than squarer tiles. Input channels come last: they add an accumulator and
# change the summation order; kernel blocks, last, are for weight-gradient convs, whose "kernel"
# is the output gradient at full image size. Axes the user fixed (tile_shape entries that are not
# None, channel_block, batch_block) are never changed.
# ---------------------------------------------------------------------------------------------
_TIE = 1.10
_PREFERENCE = ("batch", "group", "spatial", "out_channel", "in_channel", "kernel")


def _halvings(plan: ConvPlan, fixed: frozenset[str]) -> list[tuple[str, ConvPlan]]:
  s = plan.spec
  one_group = plan.group_block == 1
  out = []

  def halve(block: int, quantum: int = 1) -> int:
    smaller = -(-(-(-block // 2)) // quantum) * quantum
    return smaller if smaller < block else block

  if "batch" not in fixed and (one_group or s.batch_group_count == 1):
    b = halve(plan.batch_block)
    if b < plan.batch_block:
      out.append(("batch", dataclasses.replace(plan, batch_block=b)))
  if "group" not in fixed and s.groups > 1:
    g = halve(plan.group_block)
    if g < plan.group_block:
      out.append(("group", dataclasses.replace(plan, group_block=g)))
  for d, (t, b) in enumerate(zip(plan.tile_shape, plan.kernel_block)):
    if f"spatial{d}" not in fixed and b == s.kernel_spatial[d]:
      smaller = halve(t, tile_quantum(s, d))
      if smaller < t:
        tiles = plan.tile_shape[:d] + (smaller,) + plan.tile_shape[d + 1:]
        out.append((f"spatial{d}", dataclasses.replace(plan, tile_shape=tiles)))
    if f"kernel{d}" not in fixed and t == s.out_spatial[d] and b > 1:
      blocks = plan.kernel_block[:d] + (halve(b),) + plan.kernel_block[d + 1:]
      out.append((f"kernel{d}", dataclasses.replace(plan, kernel_block=blocks)))
  if one_group:
    if "out_channel" not in fixed:
      o = halve(plan.out_block)
      if o < plan.out_block:
        out.append(("out_channel", dataclasses.replace(plan, out_block=o)))
    if "in_channel" not in fixed:
      i = halve(plan.in_block)
      if i < plan.in_block:
        out.append(("in_channel", dataclasses.replace(plan, in_block=i)))
  return out


def _preference(name: str, order: tuple[str, ...] = _PREFERENCE,
                inner_first: bool = False) -> tuple[int, int]:
  base = name.rstrip("0123456789")
  dim = int(name[len(base):] or 0)
  return order.index(base), -dim if inner_first else dim


def refine(plan: ConvPlan, max_bytes: int, fixed: frozenset[str] = frozenset(),
           order: tuple[str, ...] = _PREFERENCE, tie: float = _TIE,
           inner_first: bool = False) -> ConvPlan:
  """Halves blocks (see the rule above) until the plan fits `max_bytes` or nothing can be halved.

  `order`, `tie` and `inner_first` (spatial dims innermost first) vary the rule for autotuning.
  """
  while not plan.fits(max_bytes):
    candidates = [(c.tile_bytes(), name, c) for name, c in _halvings(plan, fixed)]
    candidates = [c for c in candidates if c[0] < plan.tile_bytes()
                  or c[2].max_piece_elements() < plan.max_piece_elements()]
    if not candidates:
      return plan
    best = min(b for b, _, _ in candidates)
    ties = [c for c in candidates if c[0] <= best * tie]
    plan = min(ties, key=lambda c: _preference(c[1], order, inner_first))[2]
  return plan


# ---------------------------------------------------------------------------------------------
# Per-piece cost: fewer, larger pieces within the budget.
#
# Halving stops as soon as the largest piece fits, but the axis it halved last may have been cut
# to half of what the budget allows, and the greedy order can reach a plan with many more pieces
# than another split of the same budget (a 3-D conv whose kernel alone is over budget: spatial
# tiles, output and input channel blocks multiply). Each piece is a loop step, dynamic slices
# and a conv call whose cost barely depends on its size, so the planner scores a plan as
#     seconds = pieces * per_piece_s + MACs / (macs_per_s * channel_efficiency)
# where MACs count every piece's multiply-adds (overlapping last tiles computed twice included)
# and channel_efficiency = min(1, in_channels * out_channels per piece / saturating_channels):
# pieces with few channels run XLA:CPU's conv kernels far below their throughput (4x4 channels:
# 14-22x slower than the whole conv). Channel blocks it grows are multiples of `channel_quantum`
# (8 on XLA:CPU: 22 or 26 channels ran 1.2-1.4x slower per piece than 16 or 24). `choose` starts from the rule's plan (`refine`) and moves,
# while a move lowers the modelled time and the plan still fits the budget, to the best of:
# one axis's block grown to the largest that fits, or doubled with the other axes re-halved
# (`refine` with that axis held) to fit again.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PieceCost:
  """What one backend charges per piece, and its conv throughput (per number of spatial dims)."""
  per_piece_s: dict[int, float]  # spatial dims -> seconds per piece (loop step, slices, call)
  macs_per_s: dict[int, float]  # spatial dims -> multiply-adds per second of a whole conv
  saturating_channels: int = 128  # in * out channels per piece below which throughput drops
  channel_quantum: int = 8  # channel blocks grown by `choose` are multiples of it (or whole)

  def piece_seconds(self, n_spatial: int) -> float:
    return self.per_piece_s.get(n_spatial, self.per_piece_s[max(self.per_piece_s)])

  def macs_rate(self, n_spatial: int) -> float:
    return self.macs_per_s.get(n_spatial, self.macs_per_s[max(self.macs_per_s)])


# XLA:CPU, jax 0.10.2, 2 shared cores, 2026-11-27 (docs/benchmarks.md, "Per-piece cost").
# 2-D: `python benchmarks/per_piece.py --measure` tiles 1x64x64x32 -> 32, 3x3 with tile_shape
# overrides into 1..128 pieces: 1.55 ms whole, 2.74 ms in 128 tiles, ~10 us a piece; 2.4e10
# MAC/s whole. 3-D: the same tiling of 1x8x16x16x32 -> 32, 3x3x3 costs ~60 us a spatial tile,
# but I3D's 3x3x3 128 -> 192 conv, whose kernel alone forces channel blocks at small budgets,
# costs 0.38-0.42 ms a piece (`python benchmarks/per_piece.py`: 1x4x14x14x128 in 512 pieces
# 215 ms vs 20 ms whole, 1x16x28x28x128 in 8192 pieces 3.8 s vs 0.33 s, 2.5e10 MAC/s whole); the
# planner takes 0.3 ms, the cost of the pieces it has to choose between. 4x4-channel pieces ran
# 14-22x slower than the whole conv, 8x8 1.2-2.7x. Only the ratio of the two terms steers the
# choice; absolute times vary with load.
_BACKEND_PIECE_COSTS = {
    "cpu": PieceCost(per_piece_s={1: 1e-5, 2: 1e-5, 3: 3e-4},
                     macs_per_s={1: 2.4e10, 2: 2.4e10, 3: 2.5e10}),
}
# Unmeasured backends (GPU, TPU): a kernel launch per piece against a fast conv, same shape.
_DEFAULT_PIECE_COST = PieceCost(per_piece_s={3: 1e-5}, macs_per_s={3: 1e12})


def piece_cost(backend: Optional[str] = None) -> PieceCost:
  """The per-piece cost model of `backend` (default: JAX's default backend)."""
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top  (plan is otherwise free of jax)
    backend = jax.default_backend()
  return _BACKEND_PIECE_COSTS.get(backend, _DEFAULT_PIECE_COST)


def modelled_seconds(plan: ConvPlan, cost: Optional[PieceCost] = None) -> float:
  """The plan's modelled run time (see above): per-piece cost plus channel-weighted work."""
  cost = cost or piece_cost()
  s = plan.spec
  o_axis, i_axis = s.rhs_axes[0], s.rhs_axes[1]
  pieces = weighted_macs = 0.0
  for count, shapes, _ in plan.piece_families():
    rhs = shapes["rhs"]
    macs = count * math.prod(shapes["out"]) * (math.prod(rhs) // max(rhs[o_axis], 1))
    efficiency = min(1.0, rhs[i_axis] * rhs[o_axis] / cost.saturating_channels)
    pieces += count
    weighted_macs += macs / max(efficiency, 1e-9)
  return (pieces * cost.piece_seconds(s.n_spatial)
          + weighted_macs / cost.macs_rate(s.n_spatial))


def _growths(plan: ConvPlan, start: ConvPlan, fixed: frozenset[str],
             channel_quantum: int) -> list[tuple]:
  """(axis, largest block, quantum, block, block -> plan) per axis that may grow towards `start`."""
  s = plan.spec
  out = []
  if "batch" not in fixed and plan.batch_block < start.batch_block:
    out.append(("batch", start.batch_block, 1, plan.batch_block,
                lambda b: dataclasses.replace(plan, batch_block=b)))
  whole_channels = (plan.out_block, plan.in_block) == (start.out_block, start.in_block)
  if "group" not in fixed and plan.group_block < start.group_block and whole_channels:
    # Channels split inside a group only with one group per piece: grow groups once they are whole.
    out.append(("group", start.group_block, 1, plan.group_block,
                lambda g: dataclasses.replace(plan, group_block=g)))
  for d, (t, b) in enumerate(zip(plan.tile_shape, plan.kernel_block)):
    if f"spatial{d}" not in fixed and t < start.tile_shape[d]:
      out.append((f"spatial{d}", start.tile_shape[d], tile_quantum(s, d), t,
                  lambda v, d=d: dataclasses.replace(
                      plan, tile_shape=plan.tile_shape[:d] + (v,) + plan.tile_shape[d + 1:])))
    if f"kernel{d}" not in fixed and b < start.kernel_block[d]:
      out.append((f"kernel{d}", start.kernel_block[d], 1, b,
                  lambda v, d=d: dataclasses.replace(
                      plan, kernel_block=plan.kernel_block[:d] + (v,) + plan.kernel_block[d + 1:])))
  if plan.group_block == 1:
    if "out_channel" not in fixed and plan.out_block < start.out_block:
      out.append(("out_channel", start.out_block, channel_quantum, plan.out_block,
                  lambda o: dataclasses.replace(plan, out_block=o)))
    if "in_channel" not in fixed and plan.in_block < start.in_block:
      out.append(("in_channel", start.in_block, channel_quantum, plan.in_block,
                  lambda i: dataclasses.replace(plan, in_block=i)))
  return out


def _largest_fitting(limit: int, quantum: int, block: int, make, max_bytes: int) -> ConvPlan:
  """The plan with the largest block above `block` that fits, `limit` or a multiple of `quantum`
  below it; `make(block)` when none does. Piece bytes grow with the block, so bisect."""
  if make(limit).fits(max_bytes):
    return make(limit)
  lo, hi = block // quantum + 1, (limit - 1) // quantum  # multiples lo * quantum .. hi * quantum
  best = block
  while lo <= hi:
    mid = (lo + hi) // 2
    if make(mid * quantum).fits(max_bytes):
      best, lo = mid * quantum, mid + 1
    else:
      hi = mid - 1
  return make(best)


def choose(start: ConvPlan, max_bytes: int, fixed: frozenset[str] = frozenset(),
           cost: Optional[PieceCost] = None, **rule) -> ConvPlan:
  """The rule's plan (`refine`), then moves that lower its modelled time within the budget.

  A plan the rule cannot fit (over budget or above the element limit) is returned as it is.
  """
  cost = cost or piece_cost()
  plan = refine(start, max_bytes, fixed, **rule)
  if not plan.fits(max_bytes) or plan.n_elemental == 1:
    return plan
  seconds = modelled_seconds(plan, cost)
  for _ in range(64):  # each move lowers the modelled time; a bound keeps planning cheap
    moves = []
    for name, limit, quantum, block, make in _growths(plan, start, fixed,
                                                           cost.channel_quantum):
      moves.append(_largest_fitting(limit, quantum, block, make, max_bytes))
      doubled = make(min(max(2 * block // quantum, 1) * quantum, limit))
      moves.append(refine(doubled, max_bytes, fixed | {name}, **rule))
    scored = [(modelled_seconds(m, cost), m.n_elemental, m) for m in moves
              if m != plan and m.fits(max_bytes)]
    if not scored:
      break
    best_seconds, _, best = min(scored, key=lambda x: x[:2])
    if best_seconds >= seconds * (1 - 1e-6):
      break
    plan, seconds = best, best_seconds
  return plan


# Variations of the rule that `jaxtile.autotune` times against each other: name -> refine kwargs.
RULES = {
    "default": {},
    "smallest-piece": dict(tie=1.0),
    "inner-strips": dict(inner_first=True),
    "channels-first": dict(order=("batch", "group", "out_channel", "spatial", "in_channel",
                                  "kernel")),
    "reduce-first": dict(order=("batch", "group", "in_channel", "spatial", "out_channel",
                                "kernel")),
}


def for_devices(plan: ConvPlan, n_devices: int, fixed: frozenset[str] = frozenset()) -> ConvPlan:
  """`plan` on `n_devices`, its output axes halved (same preference order) until one has a block
  per device, so that no device idles. Reductions are not split for devices (see distribute)."""
  start = plan = dataclasses.replace(plan, n_devices=n_devices)
  while max(a.count for a in plan.axes() if not a.reduce) < n_devices:
    candidates = [(name, c) for name, c in _halvings(plan, fixed)
                  if not name.startswith(("in_channel", "kernel"))]
    if not candidates:
      return start  # no output axis reaches a block per device: extra pieces would buy nothing
    plan = min(candidates, key=lambda c: _preference(c[0]))[1]
  return plan
