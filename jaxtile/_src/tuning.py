"""Tuned plans: what `jaxtile.autotune` measured, as a value the policy carries.

A `Tuning` maps a conv's signature (shapes, dtypes, parameters), the budget and the device kind
(`key`) to the blocks `autotune` timed fastest. It is immutable and hashable like the rest of the
policy, and there is no process-wide one: `autotune` returns one (`TuneResult.tuning`),
`load_tuning` reads one from a JSON file, and `tile_convs(..., tuning=)` (or `explain`, `check`,
`autotune` given `tuning=`) puts it in the `Policy` that `decide` plans with. So what a traced
program runs is fixed when `tile_convs` is called, not by whatever a process tuned since.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional

from jaxtile._src.geometry import ConvPlan, monolithic_plan
from jaxtile._src.spec import ConvSpec

#: The `ConvPlan` fields a tuned plan sets; the rest follow from the conv.
BLOCK_FIELDS = ("batch_block", "group_block", "out_block", "in_block", "tile_shape",
                "kernel_block")

Blocks = tuple[tuple[str, Any], ...]  # (field, value) pairs, in `BLOCK_FIELDS` order


def key(spec: ConvSpec, max_bytes: int, device_kind: str) -> str:
  """A conv's signature (shapes, dtypes, params), the budget and the device kind, as a string."""
  params = tuple((k, v) for k, v in spec.params if k != "out_sharding")
  return repr((spec.lhs_shape, spec.rhs_shape, str(spec.lhs_dtype), str(spec.rhs_dtype),
               str(spec.out_dtype), params, max_bytes, device_kind))


def _blocks(blocks: Any) -> Blocks:
  """One entry's blocks, validated, with JSON lists as tuples."""
  if not isinstance(blocks, Mapping) or not set(blocks) <= set(BLOCK_FIELDS):
    raise ValueError(f"Tuning: every entry must map block fields {BLOCK_FIELDS} to sizes, but "
                     f"got {blocks!r}.")
  out = []
  for field in BLOCK_FIELDS:
    if field not in blocks:
      continue
    value = blocks[field]
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    ints = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
      raise ValueError(f"Tuning: {field} must be a positive int or a list of them, but got "
                       f"{field}={blocks[field]!r}.")
    out.append((field, value))
  return tuple(out)


class Tuning:
  """Plans measured by `jaxtile.autotune`, per conv signature, budget and device kind.

  Immutable and hashable. Get one from `autotune(...)(...)` (`TuneResult.tuning`) or
  `jaxtile.load_tuning(path)`, and give it to `tile_convs(..., tuning=)`; `merge` combines two,
  `save` writes one for `load_tuning`. A plan applies where the conv, `max_bytes` and device kind
  match, it still fits the budget, and the policy fixes no blocks itself.
  """
  __slots__ = ("_plans", "_hash")

  def __init__(self, plans: Optional[Mapping[str, Mapping[str, Any]]] = None):
    plans = {} if plans is None else plans
    if not isinstance(plans, Mapping):
      raise TypeError(f"Tuning: plans must be a mapping from conv signatures to blocks (as "
                      f"`Tuning.to_json` gives), but got a {type(plans).__name__}.")
    self._plans: dict[str, Blocks] = {str(k): _blocks(v) for k, v in plans.items()}
    self._hash = hash(frozenset(self._plans.items()))

  @classmethod
  def _of(cls, plans: dict[str, Blocks]) -> Tuning:
    tuning = cls.__new__(cls)
    tuning._plans, tuning._hash = plans, hash(frozenset(plans.items()))
    return tuning

  def __len__(self) -> int:
    return len(self._plans)

  def __contains__(self, k: object) -> bool:
    return k in self._plans

  def __iter__(self) -> Iterator[str]:
    return iter(self._plans)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Tuning) and self._plans == other._plans

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    return f"Tuning({len(self)} plan{'' if len(self) == 1 else 's'})"

  def plan(self, spec: ConvSpec, max_bytes: int, device_kind: str) -> Optional[ConvPlan]:
    """The tuned plan of this conv at this budget on this device kind, or None."""
    blocks = self._plans.get(key(spec, max_bytes, device_kind))
    if blocks is None:
      return None
    return dataclasses.replace(monolithic_plan(spec), **dict(blocks))

  def with_plan(self, k: str, plan: ConvPlan) -> Tuning:
    """This tuning with `plan`'s blocks under key `k` (see `key`)."""
    return self._of({**self._plans, k: tuple((f, getattr(plan, f)) for f in BLOCK_FIELDS)})

  def merge(self, other: Tuning) -> Tuning:
    """Both tunings' plans; `other`'s where both hold a key."""
    return self._of({**self._plans, **other._plans})

  def to_json(self) -> dict[str, dict[str, Any]]:
    """The plans as a JSON object: key -> {block field: size or list of sizes}."""
    return {k: {f: list(v) if isinstance(v, tuple) else v for f, v in blocks}
            for k, blocks in self._plans.items()}

  def save(self, path: str) -> None:
    """Writes the plans to `path` (directories made), atomically: a concurrent reader never
    sees half a file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load(path, op: str = "jaxtile.load_tuning") -> Tuning:
  """The plans in a JSON file `Tuning.save` (or `autotune(..., cache=path)`) wrote; an empty
  `Tuning` for a missing file. Raises ValueError, naming `op`, for a file that is not one."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return Tuning()
  try:
    with open(path) as f:
      entries = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{op}: cannot read the tuning cache path={path!r}: {e}") from e
  if not isinstance(entries, dict):
    raise ValueError(f"{op}: path={path!r} does not hold a tuning cache (a JSON object), but a "
                     f"{type(entries).__name__}.")
  try:
    return Tuning(entries)
  except ValueError as e:
    raise ValueError(f"{op}: path={path!r} does not hold a tuning cache: {e}") from None
