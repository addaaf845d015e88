"""The planner: halo arithmetic against the NumPy reference, budgets, runs, the split rule."""


import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax import lax

import jaxtile
from jaxtile._src import decide as decide_lib
from jaxtile._src import geometry
from jaxtile._src import search
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
  win = geometry.tile_window(o0, o1, j0, j1, n, s, (lo, hi), dl, dr)
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
  return jaxtile._src.spec.ConvSpec.from_eqn(closed.jaxpr.eqns[0])


def test_refine_fits_budget_and_prefers_full_width_strips():
  spec = _spec((1, 128, 512, 512), (128, 128, 3, 3), window_strides=(1, 1), padding="SAME")
  budget = spec.working_bytes() // 8
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget)).plan
  assert plan.tile_bytes() <= budget
  assert plan.spatial_tiles[0] > 1 and plan.spatial_tiles[1] == 1  # strips, full width
  assert plan.in_channel_blocks == plan.out_channel_blocks == 1


def test_refine_splits_batch_before_space():
  spec = _spec((8, 16, 64, 64), (16, 16, 3, 3), window_strides=(1, 1), padding="SAME")
  rhs_bytes = 16 * 16 * 3 * 3 * 4  # every piece holds the whole kernel
  budget = (spec.working_bytes() - rhs_bytes) // 4 + rhs_bytes
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget)).plan
  assert plan.batch_blocks == 4 and plan.spatial_tiles == (1, 1)


def test_refine_splits_channels_when_the_kernel_dominates():
  spec = _spec((1, 1024, 4, 4), (1024, 1024, 1, 1), window_strides=(1, 1), padding="VALID")
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=spec.working_bytes() // 4)).plan
  assert plan.out_channel_blocks * plan.in_channel_blocks > 1
  assert plan.tile_bytes() <= spec.working_bytes() // 4


def test_small_3d_conv_at_a_small_budget_gets_fewer_larger_pieces():
  """The planner weighs per-piece cost: fewer pieces than halving alone, still within budget."""
  dn = ("NDHWC", "DHWIO", "NDHWC")
  spec = _spec((1, 8, 14, 14, 64), (3, 3, 3, 64, 96), window_strides=(1, 1, 1), padding="SAME",
               dimension_numbers=dn)
  budget = 96 * 2**10
  halving_only = search.refine(geometry.monolithic_plan(spec), budget)
  decision = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget), warn=False)
  assert decision.tiled and not decision.over_budget
  assert decision.plan.tile_bytes() <= budget
  assert decision.plan.n_elemental < halving_only.n_elemental  # 192 pieces instead of 256
  assert (search.modelled_seconds(decision.plan)
          < search.modelled_seconds(halving_only))
  # Which convs are tiled does not change: the conv fits whole at its working set.
  assert not decide_lib.decide(spec, decide_lib.Policy(max_bytes=spec.working_bytes())).tiled


def test_fewer_larger_pieces_compute_the_same_conv():
  """Blocks that are not powers of two (ragged reductions, overlapping last tiles) stay exact."""
  dn = ("NDHWC", "DHWIO", "NDHWC")
  f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn)
  x = jax.random.normal(jax.random.key(0), (1, 4, 14, 14, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 32, 48))
  budget = 24 * 2**10
  spec = _spec(x.shape, w.shape, window_strides=(1, 1, 1), padding="SAME", dimension_numbers=dn)
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget), warn=False).plan
  assert plan.n_elemental < search.refine(geometry.monolithic_plan(spec), budget).n_elemental
  got = jax.jit(jaxtile.tile_convs(f, max_bytes=budget))(x, w)
  np.testing.assert_allclose(got, f(x, w), rtol=2e-5, atol=2e-4)


def test_plan_never_exceeds_int32_elements():
  spec = _spec((1, 4, 32768, 32768), (4, 4, 1, 1), window_strides=(1, 1), padding="VALID")
  decision = decide_lib.decide(spec, decide_lib.Policy(max_bytes=2**62))
  assert decision.tiled and decision.plan.max_piece_elements() <= 2**31 - 1


def test_budget_error_when_strict_and_unreachable():
  spec = _spec((1, 4, 16, 16), (4, 4, 3, 3), window_strides=(1, 1), padding="SAME")
  with pytest.raises(jaxtile.BudgetError, match="max_bytes=16"):
    decide_lib.decide(spec, decide_lib.Policy(max_bytes=16, strict=True))
  decision = decide_lib.decide(spec, decide_lib.Policy(max_bytes=16))
  assert decision.over_budget and decision.tiled


@pytest.mark.parametrize("lhs_dilation,stride", [(1, 1), (2, 1), (3, 2), (2, 2), (4, 6)])
def test_runs_stay_few_whatever_the_piece_count(lhs_dilation, stride):
  """Interior tiles share one run: the count of runs does not grow with the number of tiles."""
  spec = _spec((1, 2, 700), (2, 2, 5), window_strides=(stride,), padding=((3, -1),),
               lhs_dilation=(lhs_dilation,), rhs_dilation=(2,))
  quantum = geometry.tile_quantum(spec, 0)
  for tile in (quantum, 4 * quantum, 16 * quantum):
    plan = geometry.ConvPlan(spec, 1, 1, 2, 2, (tile,), spec.kernel_spatial)
    (axis,) = [a for a in plan.axes() if a.name == "spatial0"]
    assert axis.count == -(-spec.out_spatial[0] // tile)
    assert len(axis.runs) <= 6


def test_channel_block_must_cover_whole_groups():
  spec = _spec((1, 12, 8, 8), (12, 4, 3, 3), window_strides=(1, 1), padding="SAME",
               feature_group_count=3)
  with pytest.raises(ValueError, match=r"channel_block\[0\].*multiple of the group size 4"):
    decide_lib.decide(spec, decide_lib.Policy(max_bytes=2**30, channel_block=(6, None)))
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=2**30, channel_block=(4, 4))).plan
  assert plan.group_block == 1 and plan.out_channel_blocks == 3


NONE_DIM_CASES = {
    "2-D strips, width fixed": (dict(lhs=(1, 16, 256, 256), rhs=(16, 16, 3, 3)), (None, 32), 2**18),
    "2-D, height fixed": (dict(lhs=(2, 8, 128, 96), rhs=(8, 8, 5, 5)), (16, None), 2**16),
    "3-D, two dims free": (dict(lhs=(1, 4, 32, 64, 64), rhs=(4, 4, 3, 3, 3)), (None, 8, None),
                           2**16),
    "strided and dilated": (dict(lhs=(1, 8, 200, 120), rhs=(8, 8, 3, 3), window_strides=(2, 1),
                                 rhs_dilation=(1, 2)), (None, 40), 2**15),
    "1-D": (dict(lhs=(1, 32, 4096), rhs=(32, 32, 7)), (None,), 2**16),
}


@pytest.mark.parametrize("case", NONE_DIM_CASES.values(), ids=NONE_DIM_CASES.keys())
def test_none_tile_dims_are_chosen_within_the_budget(case):
  """`tile_shape=(None, 32)`: the given dims keep their extent, the planner splits the None
  dims (and channels, batch) until pieces fit max_bytes."""
  shapes, tile_shape, budget = case
  shapes = dict(shapes)
  n = len(shapes["lhs"]) - 2
  shapes.setdefault("window_strides", (1,) * n)
  spec = _spec(shapes.pop("lhs"), shapes.pop("rhs"), padding="SAME", **shapes)
  decision = decide_lib.decide(spec, decide_lib.Policy(max_bytes=budget, tile_shape=tile_shape))
  plan = decision.plan
  assert not decision.over_budget and plan.fits(budget), decision.reason
  assert plan.tile_bytes() <= budget
  for d, t in enumerate(tile_shape):
    if t is not None:
      assert plan.tile_shape[d] == min(t, spec.out_spatial[d])
  assert any(plan.tile_shape[d] < spec.out_spatial[d]
             for d, t in enumerate(tile_shape) if t is None), plan.tile_shape


def test_none_tile_dims_stay_whole_when_the_conv_fits():
  spec = _spec((1, 4, 64, 64), (4, 4, 3, 3), window_strides=(1, 1), padding="SAME")
  plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=2**30, tile_shape=(None, 16))).plan
  assert plan.tile_shape == (64, 16) and plan.spatial_tiles == (1, 4)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_wasteful_budget_warns_once_with_the_numbers_and_a_better_budget(caplog):
  """max_bytes=100 on a 64x64 conv with 8 channels: 262144 pieces of one output element each, whose
  windows read the input 70 times over. One warning gives the numbers and a budget whose plan is
  not wasteful."""
  spec = _spec((1, 8, 64, 64), (8, 8, 3, 3), window_strides=(1, 1), padding="SAME")
  with caplog.at_level(logging.WARNING):
    plan = decide_lib.decide(spec, decide_lib.Policy(max_bytes=100)).plan
  (message,) = _warnings(caplog)
  extra = plan.extra_input_percent()
  assert plan.n_elemental == 262144 and extra > 6000
  assert "max_bytes=100 (100 B)" in message and "f32[1,8,64,64]" in message
  assert f"+{extra:.0f}% input reads" in message and f"{plan.n_elemental} pieces" in message
  budget, better = re.search(r"max_bytes=(\d+) \([^)]*\) gives (\d+) pieces", message).groups()
  with caplog.at_level(logging.WARNING):
    other = decide_lib.decide(spec, decide_lib.Policy(max_bytes=int(budget))).plan
  assert len(_warnings(caplog)) == 1 and other.n_elemental == int(better)  # no new warning
  assert not decide_lib.wasteful(other)


def test_sensible_and_forced_splits_do_not_warn(caplog):
  kernel_heavy = _spec((1, 1024, 4, 4), (1024, 1024, 1, 1), window_strides=(1, 1),
                       padding="VALID")  # out-channel blocks re-read a tiny input: fine
  strips = _spec((1, 128, 512, 512), (128, 128, 3, 3), window_strides=(1, 1), padding="SAME")
  with caplog.at_level(logging.WARNING):
    assert decide_lib.decide(kernel_heavy,
                           decide_lib.Policy(max_bytes=kernel_heavy.working_bytes() // 4)).tiled
    assert decide_lib.decide(strips, decide_lib.Policy(max_bytes=strips.working_bytes() // 8)).tiled
    # Asked for by tile_shape: the user's choice, not the budget's.
    assert decide_lib.decide(strips, decide_lib.Policy(max_bytes=2**30, tile_shape=(2, 2))).tiled
  assert _warnings(caplog) == []


def test_over_budget_says_which_rule_forced_it():
  spec = _spec((1, 4, 16, 16), (4, 4, 3, 3), window_strides=(1, 1), padding="SAME")
  decision = decide_lib.decide(spec, decide_lib.Policy(max_bytes=16))
  assert decision.over_budget
  assert "leaves pieces of 84 bytes (84 B), above the budget max_bytes=16 (16 B)" in decision.reason
  assert "2**31-1 element limit" not in decision.reason
  with pytest.raises(jaxtile.BudgetError, match="raise max_bytes to 84 or more") as info:
    decide_lib.decide(spec, decide_lib.Policy(max_bytes=16, strict=True))
  assert (info.value.max_bytes, info.value.smallest_bytes, info.value.element_limit) == (16, 84,
                                                                                         False)
  # A tile_shape the user fixed keeps a piece operand above 2**31-1 elements, whatever the budget.
  huge = _spec((1, 1, 65536, 65536), (1, 1, 1, 1), window_strides=(1, 1), padding="VALID")
  decision = decide_lib.decide(huge, decide_lib.Policy(max_bytes=2**62, tile_shape=(65536, 65536)))
  assert decision.over_budget and "above the 2**31-1 element limit" in decision.reason
  assert "above the budget" not in decision.reason
