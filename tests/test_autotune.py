"""`jaxtile.autotune`: candidates timed, the fastest kept in a `Tuning` that `tile_convs` runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile
from jaxtile._src import tune as tune_lib
from jaxtile._src import decide as decide_lib


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
      chosen = decide_lib.candidate_plans(plan.spec, jaxtile._src.api.make_policy(**BUDGET)())[rule]
      return 1.0 if plan == chosen else 2.0
    monkeypatch.setattr(tune_lib, "_time", fake_time)
  return pick


def test_candidates_are_distinct_and_fit():
  policy = jaxtile._src.api.make_policy(**BUDGET)()
  spec = jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan.spec
  plans = decide_lib.candidate_plans(spec, policy)
  assert len(plans) >= 2 and "default" in plans
  assert len(set(plans.values())) == len(plans)
  assert all(p.fits(policy.max_bytes) for p in plans.values())


def test_tuned_plan_is_used_where_it_is_given(fastest):
  before = jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan
  fastest("inner-strips")
  result = jaxtile.autotune(conv, **BUDGET)(X, W)
  assert [c.chosen for c in result.convs] == ["inner-strips"]
  assert "inner-strips" in str(result)
  assert isinstance(result.tuning, jaxtile.Tuning) and len(result.tuning) == 1
  # Nothing is remembered behind the user's back: without tuning= the rule plans.
  assert jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan == before
  for tuning in (result, result.tuning):
    after = jaxtile.explain(conv, tuning=tuning, **BUDGET)(X, W).convs[0].plan
    assert after.tile_shape != before.tile_shape
    assert after.spatial_tiles[0] == 1  # strips along the inner dim
  tiled = jaxtile.tile_convs(conv, tuning=result, **BUDGET)
  assert_same(tiled(X, W), jax.jit(conv)(X, W))
  assert jaxtile.explain(tiled)(X, W).convs[0].plan.spatial_tiles[0] == 1
  assert "tuning=Tuning(1 plan)" in jaxtile.explain(tiled)(X, W).policy
  # check runs the program tile_convs runs: the tuned plan.
  assert jaxtile.check(tiled)(X, W).convs[0].n_elemental == after.n_elemental
  # Another budget is another signature: the rule applies there.
  other = jaxtile.explain(conv, tuning=result, max_bytes=2**18)(X, W).convs[0].plan
  assert other.spatial_tiles[0] > 1
  # Given to autotune again, known plans are not timed again.
  again = jaxtile.autotune(conv, tuning=result, **BUDGET)(X, W)
  assert [c.chosen for c in again.convs] == ["cached"] and again.tuning == result.tuning


def test_tuning_is_an_immutable_hashable_value(fastest):
  fastest("inner-strips")
  tuning = jaxtile.autotune(conv, **BUDGET)(X, W).tuning
  assert jaxtile.Tuning(tuning.to_json()) == tuning
  assert hash(jaxtile.Tuning(tuning.to_json())) == hash(tuning)
  assert jaxtile.Tuning() != tuning and len(jaxtile.Tuning()) == 0
  assert tuning.merge(jaxtile.Tuning()) == tuning == jaxtile.Tuning().merge(tuning)
  # A policy holding it plans under jit as a static value.
  assert_same(jax.jit(jaxtile.tile_convs(conv, tuning=tuning, **BUDGET))(X, W),
              jax.jit(conv)(X, W))


def test_real_timing_picks_a_candidate():
  result = jaxtile.autotune(conv, repeats=1, **BUDGET)(X, W)
  (tuned,) = result.convs
  assert tuned.chosen in tuned.seconds and all(t > 0 for t in tuned.seconds.values())


def test_cache_file_round_trip(fastest, tmp_path):
  path = str(tmp_path / "tuning" / "plans.json")
  fastest("inner-strips")
  result = jaxtile.autotune(conv, cache=path, **BUDGET)(X, W)
  assert len(json.load(open(path))) == 1
  loaded = jaxtile.load_tuning(path)  # as a later process would
  assert loaded == result.tuning and len(loaded) == 1
  assert jaxtile.explain(conv, **BUDGET)(X, W).convs[0].plan.spatial_tiles[0] > 1
  assert jaxtile.explain(conv, tuning=loaded, **BUDGET)(X, W).convs[0].plan.spatial_tiles[0] == 1
  tiled = jaxtile.tile_convs(conv, tuning=path, **BUDGET)  # a path is read now
  assert jaxtile.explain(tiled)(X, W).convs[0].plan.spatial_tiles[0] == 1
  again = jaxtile.autotune(conv, cache=path, **BUDGET)(X, W)  # nothing to time
  assert [c.chosen for c in again.convs] == ["cached"]
  # Plans another process saved meanwhile are kept.
  other = jaxtile.Tuning({"another conv": {"batch_block": 1}})
  jaxtile.load_tuning(path).merge(other).save(path)
  jaxtile.autotune(conv, cache=path, **BUDGET)(X, W)
  assert "another conv" in jaxtile.load_tuning(path) and len(jaxtile.load_tuning(path)) == 2


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
  bad.write_text('{"key": {"tile_shape": [0, 4]}}')
  with pytest.raises(ValueError, match=r"does not hold a tuning cache.*tile_shape must be a "
                                       r"positive int"):
    jaxtile.load_tuning(str(bad))
  assert len(jaxtile.load_tuning(str(tmp_path / "missing.json"))) == 0
  with pytest.raises(FileNotFoundError, match=r"tile_convs: tuning=.*missing.json.* names no file"):
    jaxtile.tile_convs(conv, tuning=str(tmp_path / "missing.json"))
  with pytest.raises(TypeError, match=r"tuning must be a jaxtile.Tuning, a jaxtile.TuneResult or "
                                      r"the path of a tuning file, but got tuning=3"):
    jaxtile.tile_convs(conv, tuning=3)
