"""What the pass did, as data: one `ConvReport` per conv equation, and a printable `Report`."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxtile import plan as plan_lib
from jaxtile import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class ConvReport:
  """One conv equation of the user's program and what the pass decided for it."""
  name: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  dtype: np.dtype
  working_bytes: int  # monolithic working set: lhs + rhs + out
  tiled: bool
  spatial_tiles: tuple[int, ...]
  in_channel_blocks: int
  out_channel_blocks: int
  batch_blocks: int
  kernel_blocks: tuple[int, ...]  # kernel-tap blocks per spatial dim (weight-gradient convs)
  n_elemental: int
  tile_bytes: int  # largest elemental working set (== working_bytes when not tiled)
  source: str
  reason: str
  over_budget: bool
  plan: Optional[plan_lib.ConvPlan] = dataclasses.field(repr=False, compare=False, default=None)

  @classmethod
  def from_record(cls, record) -> ConvReport:
    spec, decision = record.spec, record.decision
    plan = decision.plan if decision.tiled else plan_lib.monolithic_plan(spec)
    return cls(
        name=record.name, lhs_shape=spec.lhs_shape, rhs_shape=spec.rhs_shape,
        out_shape=spec.out_shape, dtype=spec.out_dtype, working_bytes=spec.working_bytes(),
        tiled=decision.tiled, spatial_tiles=plan.spatial_tiles,
        in_channel_blocks=plan.in_channel_blocks, out_channel_blocks=plan.out_channel_blocks,
        batch_blocks=plan.batch_blocks, kernel_blocks=plan.kernel_blocks, n_elemental=plan.n_elemental,
        tile_bytes=plan.tile_bytes(), source=spec.source, reason=decision.reason,
        over_budget=decision.over_budget, plan=plan)


@dataclasses.dataclass(frozen=True)
class Report:
  """Every conv found in a program (nested ones included), in the order the pass met them."""
  convs: list[ConvReport]
  max_bytes: int
  tier: str

  @classmethod
  def from_records(cls, records, policy: plan_lib.Policy) -> Report:
    return cls([ConvReport.from_record(r) for r in records], policy.max_bytes, policy.tier)

  @property
  def tiled(self) -> list[ConvReport]:
    return [c for c in self.convs if c.tiled]

  def __str__(self) -> str:
    header = ("name", "lhs", "rhs", "out", "MiB", "tiled", "tiles", "in/out/batch/kernel blocks",
              "pieces", "piece MiB", "source")
    rows = [header]
    for c in self.convs:
      rows.append((
          c.name.removeprefix("jaxtile/"), spec_lib.short_aval(c.lhs_shape, c.dtype),
          spec_lib.short_aval(c.rhs_shape, c.dtype), spec_lib.short_aval(c.out_shape, c.dtype),
          f"{c.working_bytes / 2**20:.1f}", "yes" if c.tiled else "no",
          "x".join(map(str, c.spatial_tiles)) or "-",
          f"{c.in_channel_blocks}/{c.out_channel_blocks}/{c.batch_blocks}/"
          + "x".join(map(str, c.kernel_blocks)), str(c.n_elemental),
          f"{c.tile_bytes / 2**20:.2f}" + (" (over budget)" if c.over_budget else ""),
          c.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"jaxtile report: {len(self.convs)} conv(s), {len(self.tiled)} tiled, "
             f"tier={self.tier!r}, max_bytes={self.max_bytes} ({self.max_bytes / 2**20:.1f} MiB)"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
