"""The policy and the decision per conv: the one place that says what happens to a conv.

`decide(spec, policy)` leaves a conv whole, splits it (the user's overrides applied, then the
search of `search.py`, or a plan `jaxtile.autotune` measured, carried by `policy.tuning`), or,
with `strict`, raises `BudgetError`. `tile_convs`, `explain`, `check`, `autotune` and the convs the
tiled loops' derivatives emit all plan through it, under one `Policy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from absl import logging

from jaxtile._src import spec as spec_lib
from jaxtile._src.geometry import ConvPlan, describe_plan, is_splittable, monolithic_plan
from jaxtile._src.search import RULES, choose, for_devices, refine
from jaxtile._src.spec import ConvSpec, format_bytes
from jaxtile._src.tuning import Tuning

TIERS = ("auto", "tiled", "native", "reference")


class BudgetError(ValueError):
  """A conv cannot be split into pieces within `max_bytes` (raised with `strict=True`).

  Besides the message, it carries what a caller needs to word its own remedy (the command line
  words it for a shell): `conv` (the conv's description, with its source line), `max_bytes`,
  `smallest_bytes` (the finest split's largest piece) and `element_limit` (True when a piece
  operand is above 2**31 - 1 elements, which no budget changes).
  """

  def __init__(self, message: str, *, conv: str = "", max_bytes: int = 0,
               smallest_bytes: int = 0, element_limit: bool = False):
    super().__init__(message)
    self.conv, self.max_bytes = conv, max_bytes
    self.smallest_bytes, self.element_limit = smallest_bytes, element_limit


@dataclasses.dataclass(frozen=True)
class Policy:
  """What the user asked for, validated (see `jaxtile.tile_convs`)."""
  max_bytes: int
  tile_shape: Optional[tuple[Optional[int], ...]] = None
  channel_block: Optional[tuple[Optional[int], Optional[int]]] = None
  batch_block: Optional[int] = None
  tier: str = "auto"
  strict: bool = False
  mesh: Optional[Any] = None  # a jax.sharding.Mesh: tiled convs' pieces are divided along
  mesh_axis: Optional[str] = None  # this axis of it
  shard_output: bool = False  # leave each distributed conv's output sharded along its split dim
  device_kind: str = ""  # where plans are tuned for (`jaxtile.autotune`)
  fuse: Any = "auto"  # tile chains of local ops as regions (`jaxtile._src.region`): True/False/"auto"
  tuning: Optional[Tuning] = None  # plans `jaxtile.autotune` measured, used instead of the search

  @property
  def n_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.shape[self.mesh_axis]

  @property
  def has_overrides(self) -> bool:
    return (self.tile_shape, self.channel_block, self.batch_block) != (None, None, None)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the pass does with one conv, and why."""
  plan: Optional[ConvPlan]  # None: left as it is
  reason: str
  over_budget: bool = False  # the finest reachable split is still above max_bytes

  @property
  def tiled(self) -> bool:
    return self.plan is not None and self.plan.n_elemental > 1


def tuned_plan(spec: ConvSpec, policy: Policy) -> Optional[ConvPlan]:
  """The plan `policy.tuning` holds for this conv, budget and device kind, where it still fits.

  None without one, or where the policy fixes blocks (tile_shape, channel_block, batch_block).
  """
  if policy.tuning is None or policy.has_overrides:
    return None
  plan = policy.tuning.plan(spec, policy.max_bytes, policy.device_kind)
  return plan if plan is not None and plan.fits(policy.max_bytes) else None


def _kept(spec: ConvSpec, policy: Policy) -> Optional[str]:
  """Why `decide` leaves the conv whole, or None where it splits it."""
  if policy.tier == "native":
    return "tier='native'"
  if policy.tier == "reference":
    return "tier='reference': evaluated by the NumPy reference"
  if not is_splittable(spec):
    return "zero-size operand: nothing to split"
  mono = monolithic_plan(spec)
  if policy.tier == "auto" and not policy.has_overrides and mono.fits(policy.max_bytes):
    return f"fits: {mono.tile_bytes()} <= max_bytes={policy.max_bytes}"
  return None


def splits(spec: ConvSpec, policy: Policy) -> bool:
  """Whether `decide` looks for a split of the conv, without the search: its `Decision.tiled`
  but where no split exists at all (a conv of one position, one channel and a batch of one)."""
  return _kept(spec, policy) is None


def decide(spec: ConvSpec, policy: Policy, warn: bool = True) -> Decision:
  """Plans one conv under `policy`: split it, leave it, or (strict) raise `BudgetError`.

  With `warn`, a split the budget makes wasteful (see `wasteful`) is logged once, as an absl
  warning naming the budget that avoids it.
  """
  kept = _kept(spec, policy)
  if kept is not None:
    return Decision(None, kept)
  mono = monolithic_plan(spec)
  start, fixed = normalize_blocks(spec, policy.tile_shape, policy.channel_block,
                                  policy.batch_block)
  tuned = tuned_plan(spec, policy)
  plan = tuned or choose(start, policy.max_bytes, fixed)
  if policy.n_devices > 1:
    plan = for_devices(plan, policy.n_devices, fixed)
  if plan.fits(policy.max_bytes):
    if warn and not tuned and not policy.has_overrides:
      _warn_if_wasteful(spec, plan, start, fixed, policy.max_bytes)
    return Decision(plan, "split to fit max_bytes" if not mono.fits(policy.max_bytes)
                    else "split as asked (tile_shape/channel_block/batch_block or tier='tiled')")
  over_bytes = plan.tile_bytes() > policy.max_bytes
  element_limit = plan.max_piece_elements() > spec_lib.INT32_MAX
  forced = []
  if over_bytes:
    forced.append(f"pieces of {plan.tile_bytes()} bytes ({format_bytes(plan.tile_bytes())}), "
                  f"above the budget max_bytes={policy.max_bytes} "
                  f"({format_bytes(policy.max_bytes)})")
  if element_limit:
    forced.append(f"a piece operand of {plan.max_piece_elements()} elements, above the 2**31-1 "
                  "element limit (XLA's and cuDNN's, whatever the budget)")
  by_user = (" with the axes tile_shape/channel_block/batch_block fix" if fixed else "")
  message = (
      f"jaxtile: even the finest split reachable{by_user} leaves {' and '.join(forced)}, for "
      f"{spec.describe()}. Smallest piece: {plan.largest_piece()}, plan {describe_plan(plan)}.")
  if policy.strict:
    remedy = []
    if over_bytes:
      remedy.append(f"raise max_bytes to {plan.tile_bytes()} or more")
    if element_limit or fixed:
      remedy.append("loosen tile_shape/channel_block/batch_block")
    raise BudgetError(f"{message} To fix: {', or '.join(remedy)}; or pass strict=False to run "
                      "it at that split anyway.", conv=spec.describe(),
                      max_bytes=policy.max_bytes, smallest_bytes=plan.tile_bytes(),
                      element_limit=element_limit)
  return Decision(plan, message, over_budget=True)


def normalize_blocks(spec: ConvSpec, tile_shape, channel_block, batch_block) -> tuple[ConvPlan,
                                                                                       frozenset]:
  """The monolithic plan with the user's overrides applied, and the axes they fix.

  Raises ValueError (naming the conv) for overrides that do not fit this conv.
  """
  plan = monolithic_plan(spec)
  fixed = set()
  if isinstance(tile_shape, int):
    tile_shape = (tile_shape,) * spec.n_spatial
  if tile_shape is not None:
    if len(tile_shape) != spec.n_spatial:
      raise ValueError(
          f"tile_convs: tile_shape must have one extent per spatial dim of the conv "
          f"({spec.n_spatial}), but got tile_shape={tuple(tile_shape)} for {spec.describe()}.")
    # Dims given an extent keep it (their kernel is not split either); None dims start whole
    # and are left to the planner like any other axis.
    tiles = []
    for d, (t, e) in enumerate(zip(tile_shape, spec.out_spatial)):
      if t is None:
        tiles.append(max(e, 1))
      else:
        tiles.append(min(int(t), max(e, 1)))
        fixed |= {f"spatial{d}", f"kernel{d}"}
    plan = dataclasses.replace(plan, tile_shape=tuple(tiles))
  if batch_block is not None:
    plan = dataclasses.replace(plan, batch_block=min(int(batch_block), max(spec.batch, 1)))
    fixed.add("batch")
    if spec.batch_group_count > 1 and plan.batch_block < spec.batch:
      # Rows of one output batch block come from every batch group: split one group at a time.
      plan = dataclasses.replace(plan, group_block=1)
      fixed.add("group")
  if channel_block is not None:
    in_b, out_b = channel_block
    plan, fixed_ch = _channel_overrides(spec, plan, in_b, out_b)
    fixed |= fixed_ch
  return plan, frozenset(fixed)


def _channel_overrides(spec: ConvSpec, plan: ConvPlan, in_b, out_b):
  """Channel blocks inside one group, or whole groups when a block spans a group or more."""
  fixed = set()
  cin, cout = spec.in_per_group, spec.out_per_group
  groups_in = groups_out = None
  if in_b is not None:
    if spec.groups > 1 and in_b >= cin and spec.feature_group_count > 1:
      if in_b % cin:
        raise ValueError(
            f"tile_convs: channel_block[0] (input channels per piece) spanning several feature "
            f"groups must be a multiple of the group size {cin}, but got channel_block[0]={in_b} "
            f"for {spec.describe()}.")
      groups_in = in_b // cin
    else:
      plan = dataclasses.replace(plan, in_block=min(in_b, cin))
      fixed.add("in_channel")
  if out_b is not None:
    if spec.groups > 1 and out_b >= cout:
      if out_b % cout:
        raise ValueError(
            f"tile_convs: channel_block[1] (output channels per piece) spanning several groups "
            f"must be a multiple of the group size {cout}, but got channel_block[1]={out_b} for "
            f"{spec.describe()}.")
      groups_out = out_b // cout
    else:
      plan = dataclasses.replace(plan, out_block=min(out_b, cout))
      fixed.add("out_channel")
  if groups_in is not None and groups_out is not None and groups_in != groups_out:
    raise ValueError(
        f"tile_convs: channel_block={(in_b, out_b)} asks for {groups_in} input groups but "
        f"{groups_out} output groups per piece; both must cover the same groups for "
        f"{spec.describe()}.")
  g = groups_in or groups_out
  if spec.groups > 1 and (fixed & {"in_channel", "out_channel"} or g is not None):
    plan = dataclasses.replace(plan, group_block=min(g or 1, spec.groups))
    fixed.add("group")
  return plan, fixed


def candidate_plans(spec: ConvSpec, policy: Policy) -> dict[str, ConvPlan]:
  """The plan of each rule in `RULES` that fits the budget (each improved by `choose`), without
  duplicates."""
  start, fixed = normalize_blocks(spec, policy.tile_shape, policy.channel_block,
                                  policy.batch_block)
  plans: dict[str, ConvPlan] = {}
  for name, kwargs in RULES.items():
    plan = choose(start, policy.max_bytes, fixed, **kwargs)
    if plan.fits(policy.max_bytes) and plan not in plans.values():
      plans[name] = plan
  return plans


# ---------------------------------------------------------------------------------------------
# Splits nobody would choose.
#
# A tiny budget gives a plan that is correct but absurd: max_bytes=100 on a 256x256 conv makes
# tens of thousands of pieces whose halos read the input several times over. A split is
# wasteful when
#   - the input its pieces read beyond the input's size (halos read twice, the input re-read per
#     output-channel block) is more bytes than the whole monolithic conv holds (lhs + rhs + out):
#     a kernel-dominated conv split into output-channel blocks re-reads its small input cheaply
#     and is not wasteful; a spatial split into tiles barely wider than their halo is; or
#   - it runs more than `WASTEFUL_PIECES` pieces of under `SMALL_PIECE_BYTES` each: each piece
#     costs a loop step and a conv call whatever its size, and small pieces are all overhead.
# Such a plan is logged once with its numbers and the smallest budget (a power of two) whose plan
# is not wasteful. Plans forced by the 2**31-1 element limit, or asked for by tile_shape,
# channel_block or batch_block, are not the budget's doing and are not logged.
# ---------------------------------------------------------------------------------------------
WASTEFUL_PIECES = 4096
SMALL_PIECE_BYTES = 2**16


def wasteful(plan: ConvPlan) -> list[str]:
  """What makes a split wasteful (see above), in words; empty when nothing does."""
  s, problems = plan.spec, []
  extra = plan.extra_input_percent()
  extra_bytes = extra / 100 * spec_lib.array_bytes(s.lhs_shape, s.lhs_dtype)
  if extra_bytes > s.working_bytes():
    problems.append(f"its pieces read the input {1 + extra / 100:.1f} times over "
                    f"(+{extra:.0f}% input reads: halos re-read by neighbouring pieces), more "
                    f"bytes than the whole conv holds ({format_bytes(s.working_bytes())})")
  if plan.n_elemental > WASTEFUL_PIECES and plan.tile_bytes() < SMALL_PIECE_BYTES:
    problems.append(f"{plan.n_elemental} pieces of {format_bytes(plan.tile_bytes())} each, "
                    "where each piece's loop step and conv call cost more than its work")
  return problems


def budget_without_waste(start: ConvPlan, fixed: frozenset[str],
                         max_bytes: int) -> Optional[tuple[int, Optional[ConvPlan]]]:
  """The smallest power-of-two budget above `max_bytes` whose plan is not wasteful, and that plan.

  The plan is None where only leaving the conv whole (a budget of its working set) avoids waste;
  the result is None when no budget does (the 2**31-1 element limit forces the split).
  """
  spec = start.spec
  budget = 1 << max(max_bytes, 1).bit_length()
  while budget < spec.working_bytes():
    plan = choose(start, budget, fixed)
    if plan.fits(budget) and not wasteful(plan):
      return budget, plan
    budget *= 2
  whole = refine(start, spec.working_bytes(), fixed)
  if whole.n_elemental > 1 and wasteful(whole):
    return None
  return spec.working_bytes(), None


def _warn_if_wasteful(spec: ConvSpec, plan: ConvPlan, start: ConvPlan, fixed: frozenset[str],
                      max_bytes: int) -> None:
  problems = wasteful(plan)
  if not problems:
    return
  better = budget_without_waste(start, fixed, max_bytes)
  if better is None:
    return  # forced by the element limit: no budget avoids it
  budget, other = better
  if other is None:
    instead = f"max_bytes={budget} ({format_bytes(budget)}) or more leaves it whole"
  else:
    instead = (f"max_bytes={budget} ({format_bytes(budget)}) gives {other.n_elemental} pieces "
               f"and +{max(other.extra_input_percent(), 0):.0f}% input reads")
  logging.warning("jaxtile: max_bytes=%d (%s) splits %s into a wasteful plan: %s. %s.",
                  max_bytes, format_bytes(max_bytes), spec.describe(), "; ".join(problems),
                  instead)
