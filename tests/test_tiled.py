"""The tiled program against lax and the NumPy reference, across conv_general_dilated's parameters.

Cases are linked the way jax's lax_test does it: shapes are built in canonical order with groups
built in, then permuted into each layout; every case is run under policies that really split it
(asserted through `explain`).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import jaxtile
from jaxtile import reference

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, np.dtype(jnp.bfloat16): 1.6e-2,
       np.dtype(np.float64): 1e-12}

LAYOUTS = {
    1: [("NCH", "OIH", "NCH"), ("NHC", "HIO", "NHC"), ("HNC", "OHI", "CHN")],
    2: [("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"), ("CHWN", "WHIO", "NWHC")],
    3: [("NCDHW", "OIDHW", "NCDHW"), ("NDHWC", "DHWIO", "NDHWC")],
}


def make_operands(layout, batch, in_spatial, kernel, cin, cout, fgc=1, bgc=1,
                  dtype=np.float32, seed=0):
  """Random lhs/rhs in `layout` for a conv with the given canonical sizes (groups built in)."""
  lhs_spec, rhs_spec, _ = layout
  spatial_chars = [c for c in rhs_spec if c not in "OI"]
  lhs_sizes = dict(N=batch * bgc, C=cin * fgc, **dict(zip(spatial_chars, in_spatial)))
  rhs_sizes = dict(O=cout * fgc * bgc, I=cin, **dict(zip(spatial_chars, kernel)))
  rng = np.random.default_rng(seed)
  lhs = rng.standard_normal([lhs_sizes[c] for c in lhs_spec]).astype(dtype)
  rhs = rng.standard_normal([rhs_sizes[c] for c in rhs_spec]).astype(dtype)
  return lhs, rhs


def assert_close(got, want, dtype):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = max(1.0, float(np.abs(want).max(initial=0)))
  err = float(np.abs(got - want).max(initial=0)) / scale
  assert err <= TOL[np.dtype(dtype)], f"relative error {err}"


def conv_fn(**kw):
  fn = lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, **kw)
  fn.kw = kw
  return fn


def lax_oracle(fn, lhs, rhs):
  """`fn(lhs, rhs)` by lax, with negative explicit padding applied by `lax.pad` first.

  XLA:CPU misreads float convs whose padding is negative on the low side and positive on the
  high side (openxla/xla#48713). Cropping and dilating with `lax.pad`, then convolving unpadded,
  is the same computation without the bug. (jaxtile's own pieces never have negative padding.)
  """
  kw = dict(fn.kw)
  padding = kw.get("padding")
  if isinstance(padding, str) or not any(lo < 0 or hi < 0 for lo, hi in padding):
    return fn(lhs, rhs)
  n = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kw.get("dimension_numbers"))
  lhs_dilation = kw.get("lhs_dilation") or (1,) * n
  config = [(0, 0, 0)] * lhs.ndim
  for d, (lo, hi) in enumerate(padding):
    config[dn.lhs_spec[2 + d]] = (lo, hi, lhs_dilation[d] - 1)
  lhs = lax.pad(jnp.asarray(lhs), jnp.zeros((), lhs.dtype), config)
  kw.update(padding=[(0, 0)] * n, lhs_dilation=None)
  return lax.conv_general_dilated(lhs, rhs, **kw)


def check_tiled(fn, lhs, rhs, exact=False, reference_kw=None, **policy):
  report = jaxtile.explain(fn, **policy)(lhs, rhs)
  assert any(c.tiled and c.n_elemental > 1 for c in report.convs), str(report)
  for c in report.convs:
    if c.tiled and not c.over_budget and "max_bytes" in policy:
      assert c.tile_bytes <= policy["max_bytes"]
  want = lax_oracle(fn, lhs, rhs)
  got = jax.jit(jaxtile.tile_convs(fn, **policy))(lhs, rhs)
  assert got.dtype == want.dtype and got.shape == want.shape
  if exact:  # float32 rounding: XLA:CPU's kernel rounds padded windows on its own (see test_api)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  else:
    assert_close(got, want, want.dtype)
  if reference_kw is not None:
    assert_close(got, reference.conv_general_dilated(lhs, rhs, **reference_kw), want.dtype)
  return report


# ---------------------------------------------------------------------------------------------
# Linked cases: (name, spatial rank, conv kwargs, canonical sizes).
# ---------------------------------------------------------------------------------------------
def _cases():
  yield "basic", 2, dict(window_strides=(1, 1), padding="SAME"), dict(
      batch=2, in_spatial=(13, 11), kernel=(3, 3), cin=4, cout=6)
  yield "strided_valid", 2, dict(window_strides=(2, 3), padding="VALID"), dict(
      batch=1, in_spatial=(17, 19), kernel=(3, 2), cin=3, cout=5)
  yield "same_lower", 2, dict(window_strides=(2, 2), padding="SAME_LOWER"), dict(
      batch=2, in_spatial=(12, 9), kernel=(4, 3), cin=2, cout=4)
  yield "negative_padding", 2, dict(window_strides=(1, 2), padding=((-2, 3), (1, -1))), dict(
      batch=1, in_spatial=(15, 14), kernel=(3, 3), cin=3, cout=4)
  yield "asymmetric_big_padding", 2, dict(window_strides=(1, 1), padding=((6, 0), (0, 5))), dict(
      batch=1, in_spatial=(8, 9), kernel=(2, 3), cin=2, cout=3)
  yield "lhs_dilation", 2, dict(window_strides=(1, 1), padding=((2, 1), (1, 2)),
                                lhs_dilation=(2, 3)), dict(
      batch=1, in_spatial=(7, 6), kernel=(3, 3), cin=3, cout=4)
  yield "lhs_dilation_strided", 2, dict(window_strides=(3, 2), padding=((1, 2), (2, 0)),
                                        lhs_dilation=(2, 2)), dict(
      batch=2, in_spatial=(9, 8), kernel=(3, 2), cin=2, cout=3)
  yield "rhs_dilation", 2, dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3)), dict(
      batch=1, in_spatial=(14, 16), kernel=(3, 3), cin=3, cout=4)
  yield "both_dilations", 2, dict(window_strides=(2, 1), padding=((3, -1), (2, 2)),
                                  lhs_dilation=(2, 1), rhs_dilation=(1, 2)), dict(
      batch=1, in_spatial=(9, 12), kernel=(3, 3), cin=2, cout=3)
  yield "grouped", 2, dict(window_strides=(1, 1), padding="SAME", feature_group_count=3), dict(
      batch=1, in_spatial=(10, 9), kernel=(3, 3), cin=2, cout=4, fgc=3)
  yield "depthwise", 2, dict(window_strides=(2, 2), padding="SAME", feature_group_count=6), dict(
      batch=2, in_spatial=(11, 10), kernel=(3, 3), cin=1, cout=2, fgc=6)
  yield "batch_groups", 2, dict(window_strides=(1, 1), padding="VALID", batch_group_count=2), dict(
      batch=2, in_spatial=(9, 8), kernel=(3, 3), cin=3, cout=2, bgc=2)
  yield "conv1d", 1, dict(window_strides=(2,), padding=((2, 1),), rhs_dilation=(2,)), dict(
      batch=2, in_spatial=(31,), kernel=(4,), cin=3, cout=5)
  yield "conv3d", 3, dict(window_strides=(1, 2, 1), padding="SAME"), dict(
      batch=1, in_spatial=(7, 8, 6), kernel=(3, 3, 2), cin=2, cout=3)


CASES = list(_cases())


def _policies(rank, sizes):
  tiles = tuple(2 for _ in range(rank))
  yield "tiles", dict(tile_shape=tiles)
  yield "channels", dict(channel_block=(max(1, sizes["cin"] // 2), max(1, sizes["cout"] // 2)))
  yield "budget", dict(max_bytes=1200)


@pytest.mark.parametrize(
    "name,rank,kw,sizes,policy_name,policy,layout",
    [(n, r, kw, sz, pn, p, lay) for n, r, kw, sz in CASES for pn, p in _policies(r, sz)
     for lay in LAYOUTS[r][:2]],
    ids=lambda v: v if isinstance(v, str) else None)
def test_tiled_matches_lax_and_reference(name, rank, kw, sizes, policy_name, policy, layout):
  lhs, rhs = make_operands(layout, **sizes)
  fn = conv_fn(dimension_numbers=layout, **kw)
  check_tiled(fn, lhs, rhs, reference_kw=dict(dimension_numbers=layout, **kw), **policy)


@pytest.mark.parametrize("name,rank,kw,sizes", CASES, ids=[c[0] for c in CASES])
def test_permuted_layouts_and_conv_dimension_numbers(name, rank, kw, sizes):
  layout = LAYOUTS[rank][-1]
  lhs, rhs = make_operands(layout, **sizes)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, layout)
  check_tiled(conv_fn(dimension_numbers=dn, **kw), lhs, rhs, tile_shape=(2,) * rank)


# XLA:CPU picks its conv kernel by shape; for lhs-dilated (transposed) convs and for degenerate
# pieces (one input row between padding) it may sum in another order, ~1 ulp apart: those are
# checked to tolerance by the sweep above, and docs/accuracy.md records the exception.
EXACT_CASES = [c for c in CASES if "lhs_dilation" not in c[2]
                       and c[0] != "asymmetric_big_padding"]


@pytest.mark.parametrize("name,rank,kw,sizes", EXACT_CASES,
                         ids=[c[0] for c in EXACT_CASES])
def test_spatial_and_batch_splits_are_exact(name, rank, kw, sizes):
  layout = LAYOUTS[rank][1]
  lhs, rhs = make_operands(layout, **sizes)
  fn = conv_fn(dimension_numbers=layout, **kw)
  check_tiled(fn, lhs, rhs, exact=True, tile_shape=(4,) * rank, batch_block=1)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32])
@pytest.mark.parametrize("policy", [dict(tile_shape=(4, 3)), dict(channel_block=(2, 3))])
def test_dtypes(dtype, policy):
  layout = LAYOUTS[2][1]
  lhs, rhs = make_operands(layout, 2, (12, 10), (3, 3), 8, 6, dtype=dtype)
  check_tiled(conv_fn(dimension_numbers=layout, window_strides=(1, 1), padding="SAME"), lhs, rhs,
              **policy)


def test_float64_under_x64():
  with jax.enable_x64(True):
    layout = LAYOUTS[2][0]
    lhs, rhs = make_operands(layout, 1, (9, 9), (3, 3), 4, 4, dtype=np.float64)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=layout)
    check_tiled(conv_fn(**kw), lhs, rhs, channel_block=(2, 2), reference_kw=kw)


@pytest.mark.parametrize("preferred", [np.float32, None])
def test_preferred_element_type_and_precision(preferred):
  layout = LAYOUTS[2][1]
  lhs, rhs = make_operands(layout, 1, (10, 10), (3, 3), 4, 4, dtype=jnp.bfloat16)
  fn = conv_fn(window_strides=(1, 1), padding="SAME", dimension_numbers=layout,
               precision=lax.Precision.HIGHEST, preferred_element_type=preferred)
  check_tiled(fn, lhs, rhs, channel_block=(2, 2), tile_shape=(4, 4))


def test_zero_size_conv_is_left_alone():
  lhs, rhs = np.ones((0, 4, 8, 8), np.float32), np.ones((4, 4, 3, 3), np.float32)
  fn = conv_fn(window_strides=(1, 1), padding="SAME")
  report = jaxtile.explain(fn, tier="tiled")(lhs, rhs)
  assert not report.convs[0].tiled
  assert jaxtile.tile_convs(fn, tier="tiled")(lhs, rhs).shape == (0, 4, 8, 8)


def test_rewritten_graph_does_not_grow_with_pieces():
  """16 and 4096 pieces of the same conv lower to jaxprs of the same size."""
  lhs = jax.ShapeDtypeStruct((1, 256, 256, 4), jnp.float32)
  rhs = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)
  fn = conv_fn(window_strides=(1, 1), padding="SAME", dimension_numbers=LAYOUTS[2][1])

  def count_eqns(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      total += 1
      for param in jax.tree_util.tree_leaves(eqn.params, is_leaf=lambda x: hasattr(x, "eqns")):
        if hasattr(param, "eqns"):
          total += count_eqns(param)
        elif hasattr(param, "jaxpr") and hasattr(param.jaxpr, "eqns"):
          total += count_eqns(param.jaxpr)
    return total

  def size(tile):
    return count_eqns(jax.make_jaxpr(jaxtile.tile_convs(fn, tile_shape=tile))(lhs, rhs).jaxpr)

  assert jaxtile.explain(fn, tile_shape=(4, 4))(lhs, rhs).convs[0].n_elemental == 4096
  assert size((4, 4)) == size((64, 64))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_random_configurations(data):
  """Random valid convs, random splits: the tiled program equals lax."""
  rank = data.draw(st.integers(1, 3))
  layout = data.draw(st.sampled_from(LAYOUTS[rank]))
  groups = data.draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (3, 1)]))
  kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
  rhs_dil = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
  lhs_dil = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
  strides = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
  in_spatial = tuple(data.draw(st.integers(3, 9 if rank < 3 else 6)) for _ in range(rank))
  padding = data.draw(st.one_of(
      st.sampled_from(["SAME", "VALID", "SAME_LOWER"]),
      st.tuples(*[st.tuples(st.integers(-1, 3), st.integers(-1, 3)) for _ in range(rank)])))
  sizes = dict(batch=data.draw(st.integers(1, 3)), in_spatial=in_spatial, kernel=kernel,
               cin=data.draw(st.integers(1, 4)), cout=data.draw(st.integers(1, 4)),
               fgc=groups[0], bgc=groups[1])
  kw = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
            dimension_numbers=layout, feature_group_count=groups[0], batch_group_count=groups[1])
  lhs, rhs = make_operands(layout, **sizes)
  fn = conv_fn(**kw)
  try:
    want_shape = jax.eval_shape(fn, lhs, rhs).shape
  except (TypeError, ValueError):
    return  # not a valid conv (e.g. the window is longer than the padded input)
  if 0 in want_shape:
    return
  policy = data.draw(st.sampled_from([
      dict(tile_shape=tuple(data.draw(st.integers(1, 4)) for _ in range(rank))),
      dict(channel_block=(1, 1)),
      dict(batch_block=1, tile_shape=(2,) * rank),
      dict(max_bytes=data.draw(st.integers(200, 3000))),
  ]))
  report = jaxtile.explain(fn, **policy)(lhs, rhs)
  got = jaxtile.tile_convs(fn, **policy)(lhs, rhs)
  assert_close(got, lax_oracle(fn, lhs, rhs), np.float32)
  if report.convs[0].tiled:
    assert report.convs[0].n_elemental > 1
