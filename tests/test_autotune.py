"""`jaxtile.autotune`: candidates timed, the fastest remembered and used by later calls."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile
from jaxtile._src import tune as tune_lib
from jaxtile._src import plan as plan_lib


def assert_same(actual, desired):
  """Tiled equals monolithic to float32 rounding. Not always bit for bit: XLA:CPU's own conv
  kernel can round the outputs of a padded window differently from the same outputs inside a
  larger conv (seen on AMD EPYC with jax 0.10.2; plain XLA, no jaxtile, shows it too)."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-5)


DN = ("NHWC", "HWIO", "NHWC")
X = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 16)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 16, 16)), jnp.float32)
BUDGET = dict(max_bytes=2**17)


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


@pytest.fixture
def fastest(monkeypatch):
  """Makes the timing deterministic: the named rule's plan is the fastest."""
  def pick(rule):
    def fake_time(plan, operands, repeats):
      chosen = plan_lib.candidate_plans(plan.spec, jaxtile._src.api.make_policy(**BUDGET)())[rule]
      return 1.0 if plan == chosen else 2.0
    monkeypatch.setattr(tune_lib, "_time", fake_time)
  return pick


def test_candidates_are_distinct_and_fit():
  policy = jaxtile._src.api.make_policy(**BUDGET)()
  spec = jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan.spec
  plans = plan_lib.candidate_plans(spec, policy)
  assert len(plans) >= 2 and "default" in plans
  assert len(set(plans.values())) == len(plans)
  assert all(p.fits(policy.max_bytes) for p in plans.values())


def test_remembered_plan_is_used_by_later_calls(fastest):
  before = jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan
  fastest("inner-strips")
  result = jaxtile.autotune(conv, **BUDGET)(X, W)
  assert [c.chosen for c in result.convs] == ["inner-strips"]
  assert "inner-strips" in str(result)
  after = jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan
  assert after.tile_shape != before.tile_shape
  assert after.spatial_tiles[0] == 1  # strips along the inner dim
  assert_same(jaxtile.tile_convs(conv, **BUDGET)(X, W), jax.jit(conv)(X, W))
  # Another budget is another signature: the rule applies there.
  assert jaxtile.explain(conv, max_bytes=2**18)(X, W).convs[0].plan.spatial_tiles[0] > 1


def test_real_timing_picks_a_candidate():
  result = jaxtile.autotune(conv, repeats=1, **BUDGET)(X, W)
  (tuned,) = result.convs
  assert tuned.chosen in tuned.seconds and all(t > 0 for t in tuned.seconds.values())


def test_cache_file_round_trip(fastest, tmp_path):
  path = str(tmp_path / "tuning" / "plans.json")
  fastest("inner-strips")
  jaxtile.autotune(conv, cache=path, **BUDGET)(X, W)
  assert len(json.load(open(path))) == 1
  plan_lib.tuned_blocks().clear()  # a new process
  assert jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan.spatial_tiles[0] > 1
  assert jaxtile.load_tuning(path) == 1
  assert jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan.spatial_tiles[0] == 1
  again = jaxtile.autotune(conv, cache=path, **BUDGET)(X, W)  # nothing to time
  assert [c.chosen for c in again.convs] == ["cached"]


def test_overrides_are_not_tuned():
  assert jaxtile.autotune(conv, tile_shape=(16, 16), **BUDGET)(X, W).convs == []


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match=r"repeats must be a positive int.*repeats=0"):
    jaxtile.autotune(conv, repeats=0)
  bad = tmp_path / "bad.json"
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"does not hold a tuning cache"):
    jaxtile.load_tuning(str(bad))
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"cannot read the tuning cache"):
    jaxtile.load_tuning(str(bad))
  assert jaxtile.load_tuning(str(tmp_path / "missing.json")) == 0
