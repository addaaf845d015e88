"""The public surface of jaxtile: `tile_convs` (decorator forms, validation, tiers, errors,
caching) and `explain` (the report's fields)."""

from __future__ import annotations

import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile
from jaxtile import tile_convs


def assert_same(actual, desired):
  """Tiled equals monolithic to float32 rounding. Not always bit for bit: XLA:CPU's own conv
  kernel can round the outputs of a padded window differently from the same outputs inside a
  larger conv (seen on AMD EPYC with jax 0.10.2; plain XLA, no jaxtile, shows it too)."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-5)


THIS_FILE = os.path.basename(__file__)
DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # CONV_LINE


def _line_of(marker: str) -> int:
  with open(__file__) as f:
    (line,) = [i for i, text in enumerate(f, 1) if text.rstrip().endswith("# " + marker)]
  return line


CONV_LINE = _line_of("CONV_LINE")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _data(x_shape=(2, 16, 16, 4), w_shape=(3, 3, 4, 8)):
  return _normal(0, x_shape), _normal(1, w_shape)


def _tiled_calls(fun, *args):
  """Names of jaxtile's tiled conv programs (`jaxtile_convN` calls) in `fun`'s jaxpr."""
  def walk(jaxpr):
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
      name = str(eqn.params.get("name", ""))
      if name.startswith("jaxtile_conv"):
        yield name
      for value in eqn.params.values():
        for v in value if isinstance(value, tuple) else (value,):
          if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
            yield from walk(v)
  return sorted(set(walk(jax.make_jaxpr(fun)(*args))))


# ---------------------------------------------------------------------------------------------
# Decorator forms
# ---------------------------------------------------------------------------------------------


def test_bare_decorator():
  @tile_convs
  def f(x, w):
    """Docstring of f."""
    return conv(x, w) + 1.0

  x, w = _data()
  assert f.__name__ == "f" and f.__doc__ == "Docstring of f."
  assert_same(f(x, w), conv(x, w) + 1.0)
  # The default budget (2 GiB on a CPU host) leaves this small conv alone.
  assert _tiled_calls(f, x, w) == []


def test_decorator_with_arguments():
  @tile_convs(max_bytes=2**16)
  def g(x, w):
    """Docstring of g."""
    return conv(x, w)

  x, w = _data(x_shape=(2, 32, 32, 4))  # 96 KiB of lhs and output: above 2**16
  assert g.__name__ == "g" and g.__doc__ == "Docstring of g."
  assert _tiled_calls(g, x, w) == ["jaxtile_conv0"]
  assert_same(g(x, w), conv(x, w))


def test_call_form():
  def h(x, w):
    """Docstring of h."""
    return conv(x, w)

  x, w = _data(x_shape=(2, 32, 32, 4))
  tiled = tile_convs(h, max_bytes=2**16)
  assert tiled.__name__ == "h" and tiled.__doc__ == "Docstring of h."
  assert tiled.__wrapped__ is h
  assert _tiled_calls(tiled, x, w) == ["jaxtile_conv0"]
  assert_same(tiled(x, w), conv(x, w))
  # The policy of one wrapper does not leak into another.
  assert _tiled_calls(tile_convs(h), x, w) == []


def test_constant_outputs_pass_through():
  """A function may return constants: a Python number, and the `float0` gradient of an integer
  argument under `jax.grad(..., allow_int=True)` (a haiku model's state). Their jaxpr outputs
  are literals, which jaxtile's passes must skip, not look up."""
  def f(x, w):
    return jax.nn.relu(conv(x, w)), 1.0

  x, w = _data(x_shape=(2, 32, 32, 4))
  out, one = tile_convs(f, max_bytes=2**16)(x, w)
  assert one == 1.0
  assert_same(out, f(x, w)[0])

  def loss(params, x):
    w, steps = params
    return jnp.sum(jax.nn.relu(conv(x, w)) ** 2)

  grad = jax.grad(loss, allow_int=True)
  params = (w, jnp.int32(3))
  tiled = tile_convs(grad, max_bytes=2**16)
  assert "jaxtile" in str(jax.make_jaxpr(tiled)(params, x))  # tiled, not left alone
  (dw, dsteps), (dw_, dsteps_) = tiled(params, x), grad(params, x)
  assert dsteps.dtype == dsteps_.dtype == jax.dtypes.float0
  # Sums over 2048 positions of values up to ~1e3: float32 rounding of a different order.
  np.testing.assert_allclose(dw, dw_, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dw_))))


@pytest.mark.parametrize("shape", [(0, 32, 32, 4), (2, 0, 32, 4), (2, 32, 32, 0)],
                         ids=["batch", "height", "channels"])
def test_empty_arrays_pass_through(shape):
  """An empty image (a batch of none, a side of 0, no channels) has nothing to tile: a chain of
  convs, which would otherwise be a region, runs as it is, and so does its gradient."""
  def chain(x, w1, w2):
    return conv(jax.nn.relu(conv(x, w1)), w2)

  x = jnp.zeros(shape)
  w1, w2 = _normal(1, (3, 3, shape[-1], 8)), _normal(2, (3, 3, 8, 8))
  for tier in ("auto", "tiled"):
    tiled = tile_convs(chain, max_bytes=2**12, tier=tier)
    assert tiled(x, w1, w2).shape == chain(x, w1, w2).shape
    grads = jax.grad(lambda *a: tiled(*a).sum(), argnums=(0, 1, 2))(x, w1, w2)
    for got, want in zip(grads, jax.grad(lambda *a: chain(*a).sum(), argnums=(0, 1, 2))(
        x, w1, w2)):
      np.testing.assert_array_equal(got, want)


def test_int_tile_shape_applies_to_every_spatial_dim():
  """The docstring: `tile_shape` is "an int for all dims"."""
  x, w = _data()
  report = jaxtile.explain(conv, tile_shape=4)(x, w)
  assert report.convs[0].tiled and report.convs[0].spatial_tiles == (4, 4), str(report)
  assert_same(tile_convs(conv, tile_shape=4)(x, w), conv(x, w))


def test_int_channel_block_sets_both():
  x, w = _data()
  c = jaxtile.explain(conv, channel_block=2)(x, w).convs[0]
  assert (c.in_channel_blocks, c.out_channel_blocks) == (2, 4)


# ---------------------------------------------------------------------------------------------
# Validation at decoration time
# ---------------------------------------------------------------------------------------------

BAD_POLICIES = [
    (dict(max_bytes=0), ValueError),
    (dict(max_bytes=-5), ValueError),
    (dict(max_bytes=1.5), TypeError),
    (dict(max_bytes=True), TypeError),
    (dict(tile_shape=(0, 4)), ValueError),
    (dict(tile_shape=(4, -1)), ValueError),
    (dict(tile_shape="ab"), TypeError),
    (dict(channel_block=(0, 2)), ValueError),
    (dict(channel_block=(1, 2, 3)), ValueError),
    (dict(batch_block=0), ValueError),
    (dict(tier="fast"), ValueError),
    (dict(strict="yes"), TypeError),
]


def _bad_id(case):
  (kwargs, _) = case
  ((k, v),) = kwargs.items()
  return f"{k}={v!r}"


@pytest.mark.parametrize("case", BAD_POLICIES, ids=[_bad_id(c) for c in BAD_POLICIES])
def test_bad_policy_raises_at_decoration(case):
  kwargs, error = case
  ((name, value),) = kwargs.items()
  value_repr = repr(tuple(value) if isinstance(value, tuple) else value)
  match = re.escape(name) + r".*" + re.escape(f"{name}={value_repr}")
  calls = []

  def f(x):
    calls.append(x)
    return x

  with pytest.raises(error, match=match):
    tile_convs(f, **kwargs)
  with pytest.raises(error, match=match):
    tile_convs(**kwargs)  # the decorator factory validates too, before any function is given
  with pytest.raises(error, match=match):
    jaxtile.explain(f, **kwargs)
  assert calls == []


def test_non_callable_raises():
  with pytest.raises(TypeError, match="fun must be callable"):
    tile_convs(3)


# ---------------------------------------------------------------------------------------------
# Errors at trace time name the conv
# ---------------------------------------------------------------------------------------------


def test_tile_shape_of_wrong_rank_names_the_conv():
  x, w = _data()
  for fun in (tile_convs(conv, tile_shape=(4, 4, 4)),
              jaxtile.explain(conv, tile_shape=(4, 4, 4))):
    with pytest.raises(ValueError) as info:
      fun(x, w)
    message = str(info.value)
    assert "tile_shape" in message and "(4, 4, 4)" in message
    assert "f32[2,16,16,4]" in message and "f32[3,3,4,8]" in message
    assert f"{THIS_FILE}:{CONV_LINE}" in message


def test_strict_budget_error_names_the_conv():
  x, w = _data(x_shape=(1, 4, 4, 2), w_shape=(3, 3, 2, 2))
  tiled = tile_convs(conv, max_bytes=16, strict=True)
  with pytest.raises(jaxtile.BudgetError) as info:
    tiled(x, w)
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert "lhs=f32[1,4,4,2]" in message and "rhs=f32[3,3,2,2]" in message
  assert f"{THIS_FILE}:{CONV_LINE}" in message
  assert "max_bytes=16" in message
  with pytest.raises(jaxtile.BudgetError):
    jaxtile.explain(conv, max_bytes=16, strict=True)(x, w)


def test_non_strict_over_budget_runs_and_warns(caplog):
  x, w = _data(x_shape=(1, 4, 4, 2), w_shape=(3, 3, 2, 2))
  report = jaxtile.explain(conv, max_bytes=16)(x, w)
  (c,) = report.convs
  assert c.over_budget and c.tiled and c.n_elemental > 1, str(report)
  assert c.tile_bytes > 16
  tiled = tile_convs(conv, max_bytes=16)
  with caplog.at_level(logging.WARNING):
    out = tiled(x, w)
  assert _tiled_calls(tiled, x, w) == ["jaxtile_conv0"]  # run at the finest split reachable
  # The finest split reachable splits input channels too: compare with a tolerance.
  np.testing.assert_allclose(out, conv(x, w), rtol=1e-5, atol=1e-5)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert any("f32[1,4,4,2]" in r.getMessage() and "max_bytes=16" in r.getMessage()
             for r in warnings), [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------
# Tiers
# ---------------------------------------------------------------------------------------------


def _two_convs(x, w, w2):
  return conv(jnp.tanh(conv(x, w)), w2)


def _two_conv_data():
  x, w = _data()
  return x, w, _normal(2, (3, 3, 8, 4))


def test_tier_native_rewrites_nothing():
  args = _two_conv_data()
  policy = dict(tier="native", max_bytes=16, tile_shape=(4, 4))
  report = jaxtile.explain(_two_convs, **policy)(*args)
  assert len(report.convs) == 2 and report.tier == "native"
  assert not any(c.tiled for c in report.convs) and report.tiled == []
  assert all(c.n_elemental == 1 for c in report.convs)
  tiled = tile_convs(_two_convs, **policy)
  assert _tiled_calls(tiled, *args) == []
  assert_same(tiled(*args), _two_convs(*args))


def test_tier_reference_matches():
  args = _two_conv_data()
  report = jaxtile.explain(_two_convs, tier="reference")(*args)
  assert len(report.convs) == 2 and report.tier == "reference"
  tiled = tile_convs(_two_convs, tier="reference")
  jaxpr = str(jax.make_jaxpr(tiled)(*args))
  assert "pure_callback" in jaxpr and "conv_general_dilated" not in jaxpr
  np.testing.assert_allclose(jax.jit(tiled)(*args), _two_convs(*args), rtol=1e-5, atol=1e-5)


def test_tier_tiled_plans_every_conv():
  args = _two_conv_data()
  auto = jaxtile.explain(_two_convs, max_bytes=2**40)(*args)
  report = jaxtile.explain(_two_convs, tier="tiled", max_bytes=2**40)(*args)
  assert report.tier == "tiled" and len(report.convs) == 2
  for c, a in zip(report.convs, auto.convs):
    assert c.plan is not None and c.plan.n_elemental == c.n_elemental >= 1
    assert a.reason.startswith("fits"), a.reason
    assert not c.reason.startswith("fits"), c.reason  # planned, not skipped as small enough
  assert_same(
      tile_convs(_two_convs, tier="tiled", max_bytes=2**40)(*args), _two_convs(*args))
  # Planned against max_bytes: a budget below each conv's working set tiles both.
  small = jaxtile.explain(_two_convs, tier="tiled", max_bytes=2**13)(*args)
  assert all(c.tiled and c.n_elemental > 1 and c.tile_bytes <= 2**13 for c in small.convs)
  tiled = tile_convs(_two_convs, tier="tiled", max_bytes=2**13, fuse=False)
  assert _tiled_calls(tiled, *args) == ["jaxtile_conv0", "jaxtile_conv1"]
  # By default the two convs and the tanh between them are one region: one loop over tiles.
  fused = jaxtile.explain(_two_convs, tier="tiled", max_bytes=2**13)(*args)
  assert [r.convs for r in fused.regions] == [("jaxtile/conv0", "jaxtile/conv1")]
  assert_same(tile_convs(_two_convs, tier="tiled", max_bytes=2**13)(*args), _two_convs(*args))
  np.testing.assert_allclose(tiled(*args), _two_convs(*args), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# explain's report
# ---------------------------------------------------------------------------------------------


def test_report_fields_under_a_budget():
  x, w = _data()
  budget = 2**12
  report = jaxtile.explain(conv, max_bytes=budget)(x, w)
  assert report.max_bytes == budget and report.tier == "auto"
  (c,) = report.convs
  assert c.lhs_shape == (2, 16, 16, 4) and c.rhs_shape == (3, 3, 4, 8)
  assert c.out_shape == (2, 16, 16, 8)
  assert c.dtype == np.float32
  assert c.working_bytes == 4 * (2 * 16 * 16 * 4 + 3 * 3 * 4 * 8 + 2 * 16 * 16 * 8)
  assert c.tiled and not c.over_budget
  assert c.n_elemental == (c.batch_blocks * c.in_channel_blocks * c.out_channel_blocks
                           * math.prod(c.spatial_tiles) * math.prod(c.kernel_blocks))
  assert c.n_elemental > 1
  assert 0 < c.tile_bytes <= budget < c.working_bytes
  assert f"{THIS_FILE}:{CONV_LINE}" in c.source
  text = report.table(wide=True)  # every column: all three shapes, the full source path
  assert "f32[2,16,16,4]" in text and "f32[3,3,4,8]" in text and "f32[2,16,16,8]" in text
  assert f"{THIS_FILE}:{CONV_LINE}" in text


def test_report_fields_with_explicit_blocks():
  x, w = _data()
  report = jaxtile.explain(conv, tile_shape=(8, 6), channel_block=(3, 3), batch_block=1)(x, w)
  (c,) = report.convs
  assert c.tiled
  assert c.spatial_tiles == (2, 3)
  assert c.in_channel_blocks == 2 and c.out_channel_blocks == 3 and c.batch_blocks == 2
  assert c.kernel_blocks == (1, 1)
  assert c.n_elemental == 2 * 3 * 2 * 3 * 2
  assert c.tile_bytes < c.working_bytes


def test_report_untiled_conv():
  x, w = _data()
  (c,) = jaxtile.explain(conv, max_bytes=2**20)(x, w).convs
  assert not c.tiled and c.n_elemental == 1 and c.tile_bytes == c.working_bytes
  assert c.spatial_tiles == (1, 1)


def test_default_max_bytes_on_cpu():
  x, w = _data()
  assert jaxtile.default_max_bytes(jax.devices("cpu")[0]) == 2**31
  assert jaxtile.explain(conv)(x, w).max_bytes == jaxtile.default_max_bytes()


def test_int32_element_limit_splits_whatever_the_budget():
  """An operand over 2**31 - 1 elements is split even under a huge budget (tracing only)."""
  lhs = jax.ShapeDtypeStruct((1, 4, 32768, 32768), jnp.float32)  # 2**32 elements
  rhs = jax.ShapeDtypeStruct((4, 4, 1, 1), jnp.float32)
  f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID")  # NCHW, OIHW
  budget = 2**62
  report = jaxtile.explain(f, max_bytes=budget)(lhs, rhs)
  (c,) = report.convs
  assert c.lhs_shape == (1, 4, 32768, 32768)
  assert c.tiled and c.n_elemental > 1 and not c.over_budget, str(report)
  pieces = c.plan.largest_piece()
  assert all(math.prod(shape) <= 2**31 - 1 for shape in pieces.values()), pieces
  # The tiled program traces (nothing runs) to the untiled output shape.
  out = jax.eval_shape(tile_convs(f, max_bytes=budget), lhs, rhs)
  assert out.shape == (1, 4, 32768, 32768) and out.dtype == jnp.float32
  assert _tiled_calls(tile_convs(f, max_bytes=budget), lhs, rhs) == ["jaxtile_conv0"]


# ---------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------


def test_traces_once_per_shape():
  traces = []

  def f(x, w):
    traces.append((x.shape, w.shape))
    return conv(x, w)

  tiled = tile_convs(f, tile_shape=(8, 6))
  x, w = _data()
  first = tiled(x, w)
  second = tiled(x + 1.0, w)
  assert len(traces) == 1
  assert_same(first, conv(x, w))
  assert_same(second, conv(x + 1.0, w))
  x2, _ = _data(x_shape=(1, 12, 12, 4))
  assert_same(tiled(x2, w), conv(x2, w))
  assert len(traces) == 2 and traces[-1][0] == (1, 12, 12, 4)
  tiled(x2, w)
  tiled(x, w)
  assert len(traces) == 2


def test_static_values_key_the_cache():
  traces = []

  def f(x, w, scale):
    traces.append(scale)
    return conv(x, w) * scale

  tiled = tile_convs(f, tile_shape=(8, 6))
  x, w = _data()
  assert_same(tiled(x, w, 2.0), conv(x, w) * 2.0)
  assert_same(tiled(x, w, 2.0), conv(x, w) * 2.0)
  assert_same(tiled(x, w, 3.0), conv(x, w) * 3.0)
  assert traces == [2.0, 3.0]


def test_unhashable_static_argument_is_reported():
  f = tile_convs(lambda x, s: x * len(s))
  with pytest.raises(TypeError, match=r"hashable.*\{1, 2\}"):
    f(jnp.ones(3), {1, 2})


def test_version_comes_from_the_package_metadata():
  import importlib.metadata
  import pathlib

  assert jaxtile.__version__ == importlib.metadata.version("jaxtile")
  # pyproject.toml holds the one copy of the version: no module of the package repeats it.
  package = pathlib.Path(jaxtile.__file__).parent
  copies = [p.name for p in package.glob("*.py") if f'"{jaxtile.__version__}"' in p.read_text()]
  assert copies == []


def test_public_surface_is_all():
  # Implementation modules are private (jaxtile._src); users see what __all__ promises.
  public = {n for n in dir(jaxtile) if not n.startswith("_")}
  assert public == set(jaxtile.__all__), public ^ set(jaxtile.__all__)
  assert "RegionReport" in jaxtile.__all__ and "tile_convs" in jaxtile.__all__
