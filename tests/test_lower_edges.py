"""Pieces that meet the padding read zero-filled windows: one branch per conv, same numbers.

The loops read each piece's input window unclamped, with zeros outside the input, and convolve it
with the interior pieces' padding (`geometry.ConvPlan.loop_axes`, `lower._select`), so edge tiles
no longer need branches of their own. These tests check the window arithmetic against the NumPy
reference, that the branches are gone, and that the tiled programs still equal the untiled ones
where edges are awkward: lhs dilation (transposed convs), strides, negative and large padding,
tiles that read only padding, kernel-tap blocks of weight gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax import lax

import jaxtile
from jaxtile import reference
from jaxtile._src import geometry

DN = ("NHWC", "HWIO", "NHWC")


def conv1d(x, w, s, pad, dl, dr):
  return reference.conv_general_dilated(x[None, None], w[None, None], (s,), [pad], (dl,), (dr,))[0, 0]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 4), s=st.integers(1, 3), lo=st.integers(-4, 5),
       hi=st.integers(-4, 5), dl=st.integers(1, 3), dr=st.integers(1, 3), data=st.data())
def test_zero_filled_window_reproduces_every_output_tile_and_kernel_block(n, k, s, lo, hi, dl, dr,
                                                                          data):
  """x[i0:i0+w] read with zeros outside x, padded (lo', hi') with 0 <= lo', hi' < dl, and taps
  [j0, j1) give exactly out[o0:o1]'s partial sum."""
  assume(lo + (n - 1) * dl + 1 + hi >= 0)
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal(n), rng.standard_normal(k)
  o = conv1d(x, w, s, (lo, hi), dl, dr).shape[0]
  assume(o > 0)
  o0 = data.draw(st.integers(0, o - 1))
  o1 = data.draw(st.integers(o0 + 1, o))
  j0 = data.draw(st.integers(0, k - 1))
  j1 = data.draw(st.integers(j0 + 1, k))
  win = geometry.tile_window(o0, o1, j0, j1, n, s, (lo, hi), dl, dr, zero_fill=True)
  w_block = np.zeros_like(w)
  w_block[j0:j1] = w[j0:j1]
  want = conv1d(x, w_block, s, (lo, hi), dl, dr)[o0:o1]
  if win.in_size == 0:
    np.testing.assert_array_equal(want, 0)
    return
  assert 0 <= win.padding[0] < dl and 0 <= win.padding[1] < dl
  if lo <= 0:
    assert win.in_start >= 0
  if hi <= 0:
    assert win.in_start + win.in_size <= n
  clamped = geometry.tile_window(o0, o1, j0, j1, n, s, (lo, hi), dl, dr)
  if clamped.in_size:  # the loops read zero-filled windows only where some input is inside
    assert win.in_start <= clamped.in_start
    assert clamped.in_start + clamped.in_size <= win.in_start + win.in_size
    assert win.in_start > -win.in_size and win.in_start < n
  window = np.array([x[i] if 0 <= i < n else 0.0
                     for i in range(win.in_start, win.in_start + win.in_size)])
  got = conv1d(window, w[j0:j1], s, win.padding, dl, dr)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _case_count(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.case")


def test_edge_tiles_share_the_interior_branch():
  """A SAME conv in 8x8 tiles: first, interior and last tiles along each dim were three runs
  (nine branches); the loops read them as one run per dim, with no branch at all."""
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 64, 48, 4)).astype(np.float32)
  w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
  policy = dict(tile_shape=(8, 8))
  plan = jaxtile.explain(conv, **policy)(x, w).convs[0].plan
  spatial = [a for a in plan.axes() if a.name.startswith("spatial")]
  loop = [a for a in plan.loop_axes() if a.name.startswith("spatial")]
  assert [len(a.runs) for a in spatial] == [3, 3]
  assert [len(a.runs) for a in loop] == [1, 1]
  assert [a.count for a in loop] == [a.count for a in spatial] == [8, 6]
  tiled = jaxtile.tile_convs(conv, **policy)
  assert _case_count(tiled, x, w) == 0
  np.testing.assert_allclose(jax.jit(tiled)(x, w), conv(x, w), rtol=1e-6, atol=1e-5)


def _oracle(x, w, strides, padding, lhs_dilation, rhs_dilation):
  """lax's conv with negative padding applied by `lax.pad` first (openxla/xla#48713)."""
  config = [(0, 0, 0)] * x.ndim
  for d, (lo, hi) in enumerate(padding):
    config[1 + d] = (lo, hi, lhs_dilation[d] - 1)
  x = lax.pad(jnp.asarray(x), jnp.zeros((), x.dtype), config)
  return lax.conv_general_dilated(x, w, strides, [(0, 0)] * len(padding),
                                  rhs_dilation=rhs_dilation, dimension_numbers=DN)


# (strides, padding, lhs dilation, rhs dilation, kernel): edges that are awkward for windows.
GEOMETRIES = {
    "same": ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), (3, 3)),
    "transposed_gradient": ((1, 1), ((2, 1), (2, 1)), (2, 2), (1, 1), (3, 3)),
    "transposed_strided": ((3, 2), ((1, 2), (2, 0)), (2, 2), (1, 1), (3, 2)),
    "lhs_dilation_3": ((2, 1), ((4, 3), (0, 2)), (3, 2), (1, 2), (3, 3)),
    "negative_padding": ((1, 2), ((-2, 3), (1, -1)), (1, 1), (1, 1), (3, 3)),
    "big_padding": ((1, 1), ((9, 0), (0, 7)), (1, 1), (1, 1), (2, 3)),
    "rhs_dilation": ((2, 2), ((3, 2), (2, 3)), (1, 1), (3, 2), (3, 3)),
}


@pytest.mark.parametrize("tile", [(1, 2), (3, 4), (2, 5)])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_zero_filled_edges_match_untiled(geometry, tile):
  strides, padding, dl, dr, kernel = GEOMETRIES[geometry]
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation=dl, rhs_dilation=dr, dimension_numbers=DN)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 11, 10, 3)).astype(np.float32)
  w = rng.standard_normal((*kernel, 3, 4)).astype(np.float32)
  report = jaxtile.explain(conv, tile_shape=tile)(x, w).convs[0]
  assert report.tiled and report.n_elemental > 1
  plan = report.plan
  for clamped, loop in zip(plan.axes(), plan.loop_axes()):
    assert loop.count == clamped.count and len(loop.runs) <= len(clamped.runs)
  got = jax.jit(jaxtile.tile_convs(conv, tile_shape=tile))(x, w)
  want = _oracle(x, w, strides, padding, dl, dr)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  ref = reference.conv_general_dilated(x, w, strides, padding, dl, dr, dimension_numbers=DN)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", ["same", "transposed_gradient", "rhs_dilation"])
def test_gradients_with_kernel_blocks_match_untiled(geometry):
  """Weight gradients split their kernel (the image-sized output cotangent) into tap blocks whose
  first block meets the padding: it reads a zero-filled window like the interior blocks."""
  strides, padding, dl, dr, kernel = GEOMETRIES[geometry]
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation=dl, rhs_dilation=dr, dimension_numbers=DN)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 40, 36, 4)).astype(np.float32)
  w = rng.standard_normal((*kernel, 4, 4)).astype(np.float32)
  loss = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
  got = loss(jaxtile.tile_convs(conv, max_bytes=2**13))(x, w)
  want = loss(conv)(x, w)
  for g, h in zip(got, want):
    scale = max(1.0, float(np.abs(h).max()))
    np.testing.assert_allclose(g / scale, h / scale, rtol=1e-5, atol=1e-5)
