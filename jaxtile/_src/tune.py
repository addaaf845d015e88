"""`autotune`: time the planner's candidate piece shapes per tiled conv, remember the fastest.

The planner's rule (`plan.refine`) is a good default; which piece shape a backend runs fastest is
an empirical fact of that backend. For every conv `tile_convs` would tile, `autotune` builds the
plan of each variation of the rule (`plan.RULES`) that fits the budget, times each lowered on
the current device (median of `repeats` runs after a warm-up, on random operands of the conv's
shapes), and remembers the fastest under the conv's signature, the budget and the device kind.
Later `tile_convs` calls with the same signature use it. Remembered plans live in memory and,
with `cache=path`, in a small JSON file that later processes load with `cache=` or `load_tuning`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional

import jax

from jaxtile._src import api
from jaxtile._src import lower as lower_lib
from jaxtile._src import plan as plan_lib
from jaxtile._src import report as report_lib


@dataclasses.dataclass(frozen=True)
class TunedConv:
  """One tiled conv: each candidate rule's plan and median time, and the one chosen."""
  name: str
  source: str  # its call site (the first user frame outside helpers), as in `ConvReport`
  seconds: dict[str, float]  # rule -> median seconds (absent: not timed, read from the cache)
  plans: dict[str, str]  # rule -> plan description
  chosen: str  # a rule name, or "cached"


@dataclasses.dataclass(frozen=True)
class TuneResult:
  """Every tuned conv signature, the device kind the times were measured on, the cache file
  used, and the policy keywords planned with and where they came from."""
  convs: list[TunedConv]
  device_kind: str
  cache: Optional[str]
  policy: str = ""

  def __str__(self) -> str:
    lines = [f"jaxtile autotune on {self.device_kind!r}: {len(self.convs)} tiled conv(s)"
             + (f", cache {self.cache}" if self.cache else "")]
    if self.policy:
      lines.append(f"policy: {self.policy}")
    for c in self.convs:
      lines.append(f"  {c.name} ({c.source}): chose {c.chosen}")
      for rule, plan in c.plans.items():
        t = c.seconds.get(rule)
        lines.append(f"    {'*' if rule == c.chosen else ' '} {rule:15s} "
                     f"{'-' if t is None else f'{t * 1e3:9.2f} ms'}  {plan}")
    return "\n".join(lines)


def load_tuning(path: str) -> int:
  """Loads remembered plans from a JSON file written by `autotune(..., cache=path)`.

  Returns the number of entries loaded; a missing file loads nothing.
  """
  if not os.path.exists(path):
    return 0
  try:
    with open(path) as f:
      entries = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"jaxtile.load_tuning: cannot read the tuning cache path={path!r}: {e}") from e
  if not isinstance(entries, dict):
    raise ValueError(f"jaxtile.load_tuning: path={path!r} does not hold a tuning cache (a JSON "
                     f"object), but a {type(entries).__name__}.")
  plan_lib.tuned_blocks().update(entries)
  return len(entries)


def _save(path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(plan_lib.tuned_blocks(), f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # atomic: concurrent processes never read half a file


def _time(plan: plan_lib.ConvPlan, operands, repeats: int) -> float:
  fn = jax.jit(lower_lib.lower(plan, "autotune"))
  jax.block_until_ready(fn(*operands))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*operands))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def autotune(fun: Callable, /, *args, repeats: int = 3, cache: Optional[str] = None,
             static_argnums=(), static_argnames=(), **policy_kwargs) -> Callable[..., TuneResult]:
  """Transforms `fun` into `f(*args, **kwargs) -> TuneResult`, tuning its tiled convs at those args.

  Takes the policy keywords of `tile_convs` (the budget above all: plans are remembered per
  `max_bytes`). Convs with explicit `tile_shape`/`channel_block`/`batch_block` are not tuned. A
  function decorated with `tile_convs` is tuned undecorated, under the decorator's policy with the
  keywords given here on top (`TuneResult.policy` says which).

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> x, w = jnp.ones((1, 8, 64, 64)), jnp.ones((8, 8, 3, 3))
    >>> result = jaxtile.autotune(f, max_bytes=2**17, repeats=1)(x, w)
    >>> jaxtile.tile_convs(f, max_bytes=2**17)(x, w).shape  # uses the remembered plan
    (1, 8, 64, 64)
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"jaxtile.autotune: repeats must be a positive int, but got "
                     f"repeats={repeats!r}.")
  cache = cache or os.environ.get("JAXTILE_AUTOTUNE_CACHE") or None
  tgt = api.target("autotune", fun, policy_kwargs, static_argnums, static_argnames, args)

  def tuned(*args, **kwargs) -> TuneResult:
    if cache:
      load_tuning(cache)
    recorder = api.trace_and_record(tgt, args, kwargs).recorder
    resolved = recorder.policy
    sites = report_lib.call_sites(recorder.layers)
    results, seen = [], set()
    for record, site in zip(recorder.records, sites):
      if not record.decision.tiled or resolved.has_overrides:
        continue
      key = plan_lib.tuning_key(record.spec, resolved)
      if key in seen:  # the same conv signature met twice: tuned once
        continue
      seen.add(key)
      spec = record.spec
      where = site or spec.source
      candidates = plan_lib.candidate_plans(spec, resolved)
      describe = {rule: plan_lib.describe_plan(p) for rule, p in candidates.items()}
      if key in plan_lib.tuned_blocks():
        results.append(TunedConv(record.name, where, {}, describe, "cached"))
        continue
      keys = jax.random.split(jax.random.key(0), 2)
      operands = [jax.random.normal(k, shape, dtype) for k, shape, dtype in
                  zip(keys, (spec.lhs_shape, spec.rhs_shape), (spec.lhs_dtype, spec.rhs_dtype))]
      seconds = {rule: _time(p, operands, repeats) for rule, p in candidates.items()}
      chosen = min(seconds, key=seconds.get)
      plan_lib.remember(key, candidates[chosen])
      results.append(TunedConv(record.name, where, seconds, describe, chosen))
    if cache:
      _save(cache)
    return TuneResult(results, resolved.device_kind, cache, tgt.described)

  return api.Staged("autotune", tgt, tuned, "TuneResult")
