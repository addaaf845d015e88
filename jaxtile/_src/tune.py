"""`autotune`: time the planner's candidate piece shapes per tiled conv, remember the fastest.

The planner's rule (`search.refine`) is a good default; which piece shape a backend runs fastest
is an empirical fact of that backend. For every conv `tile_convs` would tile, `autotune` builds the
plan of each variation of the rule (`search.RULES`) that fits the budget, times each lowered on
the current device (median of `repeats` runs after a warm-up, on random operands of the conv's
shapes), and keeps the fastest under the conv's signature, the budget and the device kind, in
the `Tuning` it returns (`TuneResult.tuning`). `tile_convs(..., tuning=)` runs those plans. With
`cache=path` the plans are also read from and written to a small JSON file, which
`load_tuning(path)` (or `tile_convs(..., tuning=path)`) reads in later processes.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Optional

import jax

from jaxtile._src import api
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile._src import lower as lower_lib
from jaxtile._src import report as report_lib
from jaxtile._src import tuning as tuning_lib


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
  used, the policy keywords planned with and where they came from, and the plans chosen.

  `tuning` holds every plan chosen here, with those given as `tuning=` and read from `cache`:
  pass it (or this result) to `tile_convs(..., tuning=)`.
  """
  convs: list[TunedConv]
  device_kind: str
  cache: Optional[str]
  policy: str = ""
  tuning: tuning_lib.Tuning = dataclasses.field(default_factory=tuning_lib.Tuning)

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


def load_tuning(path: str) -> tuning_lib.Tuning:
  """The plans a previous `autotune(..., cache=path)` (or `Tuning.save`) wrote to `path`.

  Returns a `Tuning` for `tile_convs(..., tuning=)`; an empty one for a missing file. Raises
  ValueError for a file that is not a tuning cache.
  """
  return tuning_lib.load(path)


def _time(plan: geometry.ConvPlan, operands, repeats: int) -> float:
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

  Takes the policy keywords of `tile_convs` (the budget above all: plans are kept per
  `max_bytes`). Convs with explicit `tile_shape`/`channel_block`/`batch_block` are not tuned. A
  function decorated with `tile_convs` is tuned undecorated, under the decorator's policy with the
  keywords given here on top (`TuneResult.policy` says which). Convs whose plan is already known
  (from `tuning=` or `cache`) are not timed again. The plans chosen are in `TuneResult.tuning`;
  nothing else remembers them: pass the result to `tile_convs(..., tuning=)`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxtile
    >>> f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")
    >>> x, w = jnp.ones((1, 8, 64, 64)), jnp.ones((8, 8, 3, 3))
    >>> result = jaxtile.autotune(f, max_bytes=2**17, repeats=1)(x, w)
    >>> jaxtile.tile_convs(f, max_bytes=2**17, tuning=result)(x, w).shape  # the tuned plan
    (1, 8, 64, 64)
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"jaxtile.autotune: repeats must be a positive int, but got "
                     f"repeats={repeats!r}.")
  cache = cache or os.environ.get("JAXTILE_AUTOTUNE_CACHE") or None
  tgt = api.target("autotune", fun, policy_kwargs, static_argnums, static_argnames, args)

  def tuned(*args, **kwargs) -> TuneResult:
    recorder = api.trace_and_record(tgt, args, kwargs).recorder
    resolved = recorder.policy
    known = tuning_lib.load(cache, "jaxtile.autotune") if cache else tuning_lib.Tuning()
    if resolved.tuning is not None:
      known = known.merge(resolved.tuning)
    tuning = known
    sites = report_lib.call_sites(recorder.layers)
    results, seen = [], set()
    for record, site in zip(recorder.records, sites):
      if not record.decision.tiled or resolved.has_overrides:
        continue
      key = tuning_lib.key(record.spec, resolved.max_bytes, resolved.device_kind)
      if key in seen:  # the same conv signature met twice: tuned once
        continue
      seen.add(key)
      spec = record.spec
      where = site or spec.source
      candidates = decide_lib.candidate_plans(spec, resolved)
      describe = {rule: geometry.describe_plan(p) for rule, p in candidates.items()}
      if key in known:
        results.append(TunedConv(record.name, where, {}, describe, "cached"))
        continue
      keys = jax.random.split(jax.random.key(0), 2)
      operands = [jax.random.normal(k, shape, dtype) for k, shape, dtype in
                  zip(keys, (spec.lhs_shape, spec.rhs_shape), (spec.lhs_dtype, spec.rhs_dtype))]
      seconds = {rule: _time(p, operands, repeats) for rule, p in candidates.items()}
      chosen = min(seconds, key=seconds.get)
      tuning = tuning.with_plan(key, candidates[chosen])
      results.append(TunedConv(record.name, where, seconds, describe, chosen))
    if cache:
      # Read again: plans another process saved meanwhile are kept (ours win on a clash).
      tuning_lib.load(cache, "jaxtile.autotune").merge(tuning).save(cache)
    return TuneResult(results, resolved.device_kind, cache, tgt.described, tuning)

  return api.Staged("autotune", tgt, tuned, "TuneResult")
