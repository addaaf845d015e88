"""Divides a plan's pieces among devices with `jax.shard_map`.

The blocks of the plan's `distributed_axis` (the output-indexed axis with most blocks: output
tiles, batch rows, output-channel blocks or groups) are dealt out in contiguous ranges, every
other axis's pieces inside each block, so device d computes blocks [d * m, (d + 1) * m) for
m = ceil(blocks / devices). Every device runs the same program (`lower.Pieces.emit` with the
distributed axis held at one block, picked by `lax.axis_index`): uneven counts are evened by the
last devices recomputing the final block, whose copy is then dropped. Each device returns its
blocks stacked; the stack comes back as one array, and the blocks are written into the output at
their offsets, as the single-device loop writes pieces.

Operands are replicated: each device reads its pieces' windows (halos included) from the whole
input. Partial sums (input-channel or kernel-tap blocks) stay on the device of their block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtile._src import _compat
from jaxtile._src import lower as lower_lib
from jaxtile._src.geometry import ConvPlan


def lower(plan: ConvPlan, name: str, mesh: Mesh, axis_name: str,
          shard_output: bool = False) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns `tiled(lhs, rhs)` whose pieces run on `mesh` along `axis_name` (see above)."""
  assert plan.n_devices == mesh.shape[axis_name], (plan.n_devices, mesh.shape)
  pieces = lower_lib.Pieces(plan)
  a = [axis.name for axis in pieces.out_axes].index(plan.distributed_axis)
  axis = pieces.out_axes[a]
  m, blocks = plan.blocks_per_device, axis.count
  # Where block i (in the axis's piece order) starts in the output, per output dim.
  out_starts = np.zeros((blocks, len(plan.spec.out_shape)), np.int32)
  for run, first in zip(axis.runs, pieces.run_starts[a]):
    for span in run.spans:
      if span.dim[0] == "out":
        out_starts[first:first + run.count, span.dim[1]] = (
            span.start + np.arange(run.count) * span.step)
  sharded_dim = next(s.dim[1] for s in axis.runs[0].spans if s.dim[0] == "out")

  def per_device(lhs, rhs):
    first = lax.axis_index(axis_name) * m
    stack = jnp.zeros((m, *pieces.out_shape({a: 0})), plan.spec.out_dtype)

    def block(j, stack):
      slab = pieces.emit(lhs, rhs, fixed={a: jnp.minimum(first + j, blocks - 1)})
      return lax.dynamic_update_index_in_dim(stack, slab, j, 0)
    stack = block(0, stack)  # peeled, like the emitter's loops (lower.Pieces.emit)
    return stack if m == 1 else lax.fori_loop(1, m, block, stack)

  spread = _compat.shard_map(per_device, mesh, in_specs=(P(), P()), out_specs=P(axis_name))

  def tiled(lhs, rhs):
    with jax.named_scope(name):
      stack = spread(lhs, pieces.loop_kernel(rhs))
      with jax.named_scope("reassemble"):
        starts = jnp.asarray(out_starts)
        write = lambda i, out: lax.dynamic_update_slice(out, stack[i], list(starts[i]))
        out = write(0, jnp.zeros(plan.spec.out_shape, plan.spec.out_dtype))
        out = lax.fori_loop(1, blocks, write, out)
      if shard_output:
        spec = [None] * out.ndim
        spec[sharded_dim] = axis_name
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(*spec)))
      return out
  return tiled
