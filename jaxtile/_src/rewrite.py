"""The jaxpr -> jaxpr pass: every conv equation, wherever it sits, replaced by its tiled program.

Like equinox's `finalise_jaxpr`, the walk does not decode higher-order primitives one by one: it
recurses into any jaxpr found in any equation's params (jit, scan, while, cond, remat,
custom_jvp/vjp, shard_map alike). A rewritten conv keeps its inputs and outputs, so the enclosing
equations stay valid as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import jax
import numpy as np
from absl import logging

from jaxtile._src import _compat
from jaxtile._src import canonical
from jaxtile._src import distribute
from jaxtile._src import lower as lower_lib
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile import reference
from jaxtile._src import region as region_lib
from jaxtile._src import upsample
from jaxtile._src.spec import ConvSpec


@dataclasses.dataclass(frozen=True)
class ConvRecord:
  """One conv equation the pass met: its spec and what was decided.

  For a conv inside a region, `decided` is a thunk: what `decide` says of the conv alone is
  only read by reports (`explain`, `check`), and a plan search costs about 17 ms a conv that
  `tile_convs` would otherwise spend at every trace."""
  index: int
  spec: ConvSpec
  decided: Union[decide_lib.Decision, Callable[[], decide_lib.Decision]]
  region: Optional[str] = None  # the region whose loop computes this conv, if any

  @property
  def name(self) -> str:
    return f"jaxtile/conv{self.index}"

  @functools.cached_property
  def decision(self) -> decide_lib.Decision:
    return self.decided if isinstance(self.decided, decide_lib.Decision) else self.decided()


class Rewriter:
  """Rewrites jaxprs under one policy, recording every conv it meets in walk order."""

  def __init__(self, policy: decide_lib.Policy):
    self.policy = policy
    self.records: list[ConvRecord] = []
    self.regions: list[region_lib.Chain] = []
    # Regions are named when planned: a jaxpr's before those of the jaxprs nested in it (a
    # `jax.checkpoint`'s body), which are planned as the outer ones are placed.
    self._n_named = 0
    self._spmd_depth = 0  # > 0 inside the user's own pmap/shard_map: convs are per-device there
    self._decisions: dict = {}  # (spec, id(policy)) -> (policy, Decision), for this rewrite

  def _decide(self, spec: ConvSpec, policy: decide_lib.Policy) -> decide_lib.Decision:
    """`decide` without its warnings, once per conv and policy object: the "auto" check of a
    region and the record of each of its convs ask about the same convs (a plan search each)."""
    key = (spec, id(policy))
    if key not in self._decisions:
      self._decisions[key] = (policy, decide_lib.decide(spec, policy, warn=False))
    return self._decisions[key][1]

  def closed_jaxpr(self, closed: _compat.ClosedJaxpr) -> _compat.ClosedJaxpr:
    jaxpr = self.jaxpr(closed.jaxpr)
    return closed if jaxpr is closed.jaxpr else _compat.ClosedJaxpr(jaxpr, closed.consts)

  def jaxpr(self, jaxpr: _compat.Jaxpr) -> _compat.Jaxpr:
    original = jaxpr
    grouped, chains = upsample.Grouped(jaxpr, {}), []
    if self._fuses():  # the equations a region sees
      grouped, chains = self._plan(jaxpr)
      jaxpr = grouped.jaxpr
      self._n_named += len(chains)
    simplified = jaxpr
    regions = {id(r.eqns[-1]): r for r in chains}
    # A statistics pass stands where its group's first equation stood: before anything reads
    # one of its reductions, after the inputs of its source.
    statistics = {id(s.eqns[0]): s for r in chains for s in r.statistics}
    fused = {id(e) for r in chains
             for e in (*r.all_eqns, *(e for s in r.statistics for e in s.all_eqns))}
    # A region's reductions may stand before its last equation, and what reads their results
    # between them (an optimizer's update of a weight) waits for the region's loop: the
    # equations are kept in order but for those, each placed once what it reads exists
    # (nothing the region reads depends on them: `region._terminal`).
    eqns, waiting = [], []
    made = {v for v in (*jaxpr.invars, *jaxpr.constvars)}
    ready = lambda e: all(isinstance(v, _compat.Literal) or v in made for v in e.invars)

    def place(e):
      if not ready(e):
        waiting.append(e)
        return
      eqns.append(e)
      made.update(e.outvars)
      for w in list(waiting):
        if w in waiting and ready(w):
          waiting.remove(w)
          place(w)

    for e in jaxpr.eqns:
      if id(e) in regions:  # a region's loop stands where its last equation stood
        place(self.region(regions[id(e)]))
      elif id(e) in statistics:
        place(self.statistics(statistics[id(e)]))
      elif id(e) in fused:
        continue
      elif id(e) in grouped.originals:
        for member in grouped.originals[id(e)]:
          place(self.nested(member))
      else:
        place(self.conv(e) if _compat.is_conv(e) else self.nested(e))
    assert not waiting, waiting
    # The weights of the 1x1 convs no region took (their products are back): not needed.
    eqns = [e for e in eqns if id(e) not in grouped.kernels or grouped.kernels[id(e)] in fused]
    if len(eqns) == len(original.eqns) and all(a is b for a, b in zip(eqns, original.eqns)):
      return original
    return _compat.replace_jaxpr(simplified, eqns=eqns)

  def _plan(self, jaxpr: _compat.Jaxpr) -> tuple[upsample.Grouped, list[region_lib.Chain]]:
    """`jaxpr` as regions see it (`region.canonical_form`) and its regions, with the body of
    each `jax.checkpoint` in it inlined where every conv of that body joins a region.

    Evaluated, a checkpoint is its body; it only tells `jax.grad` to recompute the body's
    values instead of saving them. A region's own derivative does that for the values inside
    it, tile by tile, and saves its operands only, so a checkpoint whose convs all join regions
    loses nothing to inlining, and its body no longer cuts the regions around it (flax's
    `nn.remat` around each conv block of a UNet would stop a region at every block). A
    checkpoint some conv of which would be left outside the regions, or that holds no conv,
    stays as it is (its body rewritten on its own, `nested`), as does one JAX has already
    differentiated (`tile_convs(jax.grad(f))`: its body recomputes the forward, which XLA
    could merge with the forward's own values if it were inlined).
    """
    body = lambda e: getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"])
    conv = lambda e: _compat.is_conv(e) or canonical.dense_axis(e) is not None  # a 1x1 one too
    inline = {id(e) for e in jaxpr.eqns
              if _compat.is_checkpoint(e) and any(map(conv, body(e).eqns))}
    while True:
      made: dict = {}
      flat = canonical.inline_calls(jaxpr, lambda e: id(e) in inline, made) if inline else jaxpr
      grouped = region_lib.canonical_form(flat)
      chains = self._regions(grouped.jaxpr)
      fused = {v for r in chains for s in (r, *r.statistics) for e in s.all_eqns
               for v in e.outvars}
      left = {k for k, eqns in made.items()
              if any(conv(e) and e.outvars[0] not in fused for e in eqns)}
      if not left:
        return grouped, chains
      inline -= left

  def _regions(self, jaxpr: _compat.Jaxpr) -> list[region_lib.Chain]:
    """The regions this policy tiles in `jaxpr` (canonical): chains with an oversized conv
    ("auto"), named from `_n_named` on."""
    policy = self._local_policy()
    regions = []
    for members, groups in region_lib.find_regions(jaxpr):
      convs = [jaxpr.eqns[i] for i in members if _compat.is_conv(jaxpr.eqns[i])]
      if policy.tier == "auto" and policy.fuse == "auto" and not any(
          decide_lib.splits(ConvSpec.from_eqn(e), policy) for e in convs):
        continue
      regions += region_lib.split_region(jaxpr, members, policy,
                                        self._n_named + len(regions), groups)
    return regions

  def _fuses(self) -> bool:
    return self.policy.fuse is not False and self.policy.tier not in ("native", "reference")

  def _local_policy(self) -> decide_lib.Policy:
    """The policy, without its mesh inside the user's own pmap/shard_map: that code is already
    per device, so its convs and regions are tiled there and the distribution left to it."""
    if self._spmd_depth and self.policy.mesh is not None:
      return dataclasses.replace(self.policy, mesh=None, mesh_axis=None)
    return self.policy

  def region(self, plan: region_lib.Chain) -> _compat.JaxprEqn:
    """One loop over the region's output tiles, bound in place of its equations."""
    self.regions.append(plan)
    for e in plan.all_convs:
      spec = ConvSpec.from_eqn(e)
      self.records.append(ConvRecord(len(self.records), spec,
                                     functools.partial(self._decide, spec, plan.policy),
                                     region=plan.name))
    logging.info("jaxtile: %s: %d equations (%d convs) in %d tiles of %s, %.1f%% extra MACs",
                 plan.name, len(plan.eqns), len(plan.convs), plan.n_tiles, plan.tile,
                 plan.extra_macs_percent)
    return _call(lambda *operands: region_lib.bind(plan, *operands), plan.name,
                 [*plan.inputs, *plan.smalls], plan.outvars, plan.eqns[-1].source_info)

  def statistics(self, stats: region_lib.Statistics) -> _compat.JaxprEqn:
    """One pass over the tiles of a region's value, computing its norm's reductions."""
    return _call(lambda *operands: region_lib.bind_statistics(stats, *operands), stats.name,
                 [*stats.source.inputs, *stats.source.smalls], list(stats.all_outputs),
                 stats.eqns[0].source_info)

  def nested(self, eqn: _compat.JaxprEqn) -> _compat.JaxprEqn:
    spmd = _compat.is_spmd(eqn)
    self._spmd_depth += spmd
    try:
      params = {k: self._param(v) for k, v in eqn.params.items()}
    finally:
      self._spmd_depth -= spmd
    if all(params[k] is v for k, v in eqn.params.items()):
      return eqn
    return _compat.replace_eqn(eqn, params=params)

  def _param(self, value: Any) -> Any:
    if isinstance(value, _compat.ClosedJaxpr):
      return self.closed_jaxpr(value)
    if isinstance(value, _compat.Jaxpr):
      return self.jaxpr(value)
    if type(value) is tuple:  # not NamedTuples such as ConvDimensionNumbers
      new = tuple(self._param(v) for v in value)
      return value if all(a is b for a, b in zip(new, value)) else new
    return value

  def conv(self, eqn: _compat.JaxprEqn) -> _compat.JaxprEqn:
    record, fun = self.plan_conv(eqn)
    return eqn if fun is None else self._bind(eqn, fun, record.name)

  @staticmethod
  def _bind(eqn, fun, name: str) -> _compat.JaxprEqn:
    """`fun` bound in place of conv `eqn` (`check`'s rewriter binds its own too)."""
    return _call(fun, name, eqn.invars, eqn.outvars, eqn.source_info)

  def plan_conv(self, eqn: _compat.JaxprEqn, warn: bool = True
                ) -> tuple[ConvRecord, Optional[Callable]]:
    """Decides one conv equation under the policy, records it, and returns the function bound in
    its place (None: the equation stays as it is).

    The one place that turns a conv equation into what runs: `tile_convs` binds the function,
    `check` binds it too and compares its output with the conv's. `warn` logs the warnings
    (wasteful or over-budget splits, explicit out_sharding).
    """
    spec = ConvSpec.from_eqn(eqn)
    policy = self._local_policy()
    decision = decide_lib.decide(spec, policy, warn=warn)
    if eqn.params.get("out_sharding") is not None and decision.tiled:
      if warn:
        logging.warning("jaxtile: %s has an explicit out_sharding; it runs monolithic.",
                        spec.describe())
      decision = decide_lib.Decision(None, "explicit out_sharding: runs monolithic")
    record = ConvRecord(len(self.records), spec, decision)
    self.records.append(record)
    if self.policy.tier == "reference":
      return record, _reference_conv(spec, eqn.params, policy)
    if decision.over_budget and warn:
      logging.warning("%s Running at that split.", decision.reason)
    if not decision.tiled:
      return record, None
    logging.info("jaxtile: %s %s -> %s, pieces of <= %d bytes (%s)", record.name,
                 spec.describe(), geometry.describe_plan(decision.plan),
                 decision.plan.tile_bytes(), decision.reason)
    plan = decision.plan
    if plan.distributed_axis is not None:
      return record, distribute.lower(plan, record.name, self.policy.mesh,
                                      self.policy.mesh_axis, self.policy.shard_output)
    return record, lower_lib.lower(plan, record.name,
                                   None if policy.mesh is not None else policy)



def _call(fun, name: str, invars, outvars, source_info) -> _compat.JaxprEqn:
  """`fun` traced as one call equation named after `name` (`jaxtile/conv3` ->
  `jaxtile_conv3`), reading `invars` and making `outvars` in place of what it replaces."""
  fun.__name__ = name.replace("/", "_")
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in invars]
  return _compat.traced_call_eqn(fun, avals, invars, outvars, source_info)


def _reference_conv(spec: ConvSpec, params, policy: decide_lib.Policy):
  """The conv evaluated on the host by `jaxtile.reference`, through `jax.pure_callback`.

  A callback has no derivative; this conv's is JAX's own (the convs its transpose rules emit,
  traced on the conv with `params`), rewritten under `policy` in turn, so every conv of
  `jax.grad(tile_convs(f, tier="reference"))` runs on the host too. Reverse mode only, as for
  any `jax.custom_vjp`.
  """
  p = spec.param_dict
  out = jax.ShapeDtypeStruct(spec.out_shape, spec.out_dtype)

  def host(lhs, rhs):
    return reference.conv_general_dilated(
        np.asarray(lhs), np.asarray(rhs), p["window_strides"], p["padding"], p["lhs_dilation"],
        p["rhs_dilation"], p["dimension_numbers"], p["feature_group_count"],
        p["batch_group_count"], preferred_element_type=spec.out_dtype).astype(spec.out_dtype)

  @jax.custom_vjp
  def conv(lhs, rhs):
    return jax.pure_callback(host, out, lhs, rhs, vmap_method="sequential")

  def backward(operands, cotangent):
    native = lambda lhs, rhs: _compat.conv_general_dilated_p.bind(lhs, rhs, **params)
    pullback = lambda lhs, rhs, ct: jax.vjp(native, lhs, rhs)[1](ct)
    closed = jax.make_jaxpr(pullback)(*operands, cotangent)
    rewritten, _ = rewrite(closed, policy)
    return tuple(_compat.jaxpr_as_fun(rewritten)(*operands, cotangent))

  conv.defvjp(lambda lhs, rhs: (conv(lhs, rhs), (lhs, rhs)), backward)
  return conv


def rewrite(closed: _compat.ClosedJaxpr, policy: decide_lib.Policy):
  """Returns the rewritten closed jaxpr and the record of every conv found."""
  rewriter = Rewriter(policy)
  return rewriter.closed_jaxpr(closed), rewriter.records
