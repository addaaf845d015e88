"""The planner: halo arithmetic against the NumPy reference, budgets, runs, the split rule."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax import lax

import jaxtile
from jaxtile import plan as plan_lib
from jaxtile import reference


def conv1d(x, w, s, pad, dl, dr):
  return reference.conv_general_dilated(x[None, None], w[None, None], (s,), [pad], (dl,), (dr,))[0, 0]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 4), s=st.integers(1, 3), lo=st.integers(-4, 5),
       hi=st.integers(-4, 5), dl=st.integers(1, 3), dr=st.integers(1, 3), data=st.data())
def test_tile_window_reproduces_every_output_tile_and_kernel_block(n, k, s, lo, hi, dl, dr, data):
  """x[i0:i0+w] with padding (lo', hi') and taps [j0, j1) gives exactly out[o0:o1]'s partial sum."""
  assume(lo + (n - 1) * dl + 1 + hi >= 0)  # XLA rejects cropping more than the input
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(n), rng.standard_normal(k)
  full_out = conv1d(x, w, s, (lo, hi), dl, dr)
  o = full_out.shape[0]
  if o == 0:
    return
  o0 = data.draw(st.integers(0, o - 1))
  o1 = data.draw(st.integers(o0 + 1, o))
  j0 = data.draw(st.integers(0, k - 1))
  j1 = data.draw(st.integers(j0 + 1, k))
  win = plan_lib.tile_window(o0, o1, j0, j1, n, s, (lo, hi), dl, dr)
  # The partial sum over taps [j0, j1) of the monolithic conv: zero the other taps.
  w_block = np.zeros_like(w)
  w_block[j0:j1] = w[j0:j1]
  want = conv1d(x, w_block, s, (lo, hi), dl, dr)[o0:o1]
  assert win.out_size == o1 - o0
  if win.in_size == 0:  # the tile reads only padding
    np.testing.assert_array_equal(want, 0)
    return
  assert win.padding[0] >= 0 and win.padding[1] >= 0
  assert 0 <= win.in_start and win.in_start + win.in_size <= n
  got = conv1d(x[win.in_start:win.in_start + win.in_size], w[j0:j1], s, win.padding, dl, dr)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _spec(lhs_shape, rhs_shape, **kw):
  f = lambda x, w: lax.conv_general_dilated(x, w, **kw)
  closed = jax.make_jaxpr(f)(jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                             jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  return jaxtile.spec.ConvSpec.from_eqn(closed.jaxpr.eqns[0])


def test_refine_fits_budget_and_prefers_full_width_strips():
  spec = _spec((1, 128, 512, 512), (128, 128, 3, 3), window_strides=(1, 1), padding="SAME")
  budget = spec.working_bytes() // 8
  plan = plan_lib.decide(spec, plan_lib.Policy(max_bytes=budget)).plan
  assert plan.tile_bytes() <= budget
  assert plan.spatial_tiles[0] > 1 and plan.spatial_tiles[1] == 1  # strips, full width
  assert plan.in_channel_blocks == plan.out_channel_blocks == 1


def test_refine_splits_batch_before_space():
  spec = _spec((8, 16, 64, 64), (16, 16, 3, 3), window_strides=(1, 1), padding="SAME")
  rhs_bytes = 16 * 16 * 3 * 3 * 4  # every piece holds the whole kernel
  budget = (spec.working_bytes() - rhs_bytes) // 4 + rhs_bytes
  plan = plan_lib.decide(spec, plan_lib.Policy(max_bytes=budget)).plan
  assert plan.batch_blocks == 4 and plan.spatial_tiles == (1, 1)


def test_refine_splits_channels_when_the_kernel_dominates():
  spec = _spec((1, 1024, 4, 4), (1024, 1024, 1, 1), window_strides=(1, 1), padding="VALID")
  plan = plan_lib.decide(spec, plan_lib.Policy(max_bytes=spec.working_bytes() // 4)).plan
  assert plan.out_channel_blocks * plan.in_channel_blocks > 1
  assert plan.tile_bytes() <= spec.working_bytes() // 4


def test_plan_never_exceeds_int32_elements():
  spec = _spec((1, 4, 32768, 32768), (4, 4, 1, 1), window_strides=(1, 1), padding="VALID")
  decision = plan_lib.decide(spec, plan_lib.Policy(max_bytes=2**62))
  assert decision.tiled and decision.plan.max_piece_elements() <= 2**31 - 1


def test_budget_error_when_strict_and_unreachable():
  spec = _spec((1, 4, 16, 16), (4, 4, 3, 3), window_strides=(1, 1), padding="SAME")
  with pytest.raises(jaxtile.BudgetError, match="max_bytes=16"):
    plan_lib.decide(spec, plan_lib.Policy(max_bytes=16, strict=True))
  decision = plan_lib.decide(spec, plan_lib.Policy(max_bytes=16))
  assert decision.over_budget and decision.tiled


@pytest.mark.parametrize("lhs_dilation,stride", [(1, 1), (2, 1), (3, 2), (2, 2), (4, 6)])
def test_runs_stay_few_whatever_the_piece_count(lhs_dilation, stride):
  """Interior tiles share one run: the count of runs does not grow with the number of tiles."""
  spec = _spec((1, 2, 700), (2, 2, 5), window_strides=(stride,), padding=((3, -1),),
               lhs_dilation=(lhs_dilation,), rhs_dilation=(2,))
  quantum = plan_lib.tile_quantum(spec, 0)
  for tile in (quantum, 4 * quantum, 16 * quantum):
    plan = plan_lib.ConvPlan(spec, 1, 1, 2, 2, (tile,), spec.kernel_spatial)
    (axis,) = [a for a in plan.axes() if a.name == "spatial0"]
    assert axis.count == -(-spec.out_spatial[0] // tile)
    assert len(axis.runs) <= 6


def test_channel_block_must_cover_whole_groups():
  spec = _spec((1, 12, 8, 8), (12, 4, 3, 3), window_strides=(1, 1), padding="SAME",
               feature_group_count=3)
  with pytest.raises(ValueError, match=r"channel_block\[0\].*multiple of the group size 4"):
    plan_lib.decide(spec, plan_lib.Policy(max_bytes=2**30, channel_block=(6, None)))
  plan = plan_lib.decide(spec, plan_lib.Policy(max_bytes=2**30, channel_block=(4, 4))).plan
  assert plan.group_block == 1 and plan.out_channel_blocks == 3
