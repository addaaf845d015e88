"""`tile_convs` composed with JAX transformations, control flow, and model libraries.

Every test checks two things: that tiling really happened (`jaxtile.explain` reports a tiled conv
with more than one elemental piece, and, where the composition is outside what `explain` sees,
the traced program holds the tiled call) and that the result equals the untiled function's.
Spatial and batch splits are bit-identical on CPU; channel blocks change the summation order and
are compared with a tolerance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax import test_util as jtu

import jaxtile
from jaxtile import tile_convs


def assert_same(actual, desired):
  """Tiled equals monolithic to float32 rounding. Not always bit for bit: XLA:CPU's own conv
  kernel can round the outputs of a padded window differently from the same outputs inside a
  larger conv (seen on AMD EPYC with jax 0.10.2; plain XLA, no jaxtile, shows it too)."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-5)


DN = ("NHWC", "HWIO", "NHWC")
TILE = (3, 8)  # along H: a halo tile at each edge, a loop over 4 interior tiles, a shifted last one
CHANNELS = (2, 3)  # does not divide 4 or 8 either
TOL = dict(rtol=1e-5, atol=1e-5)


def conv(x, w, padding="SAME"):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)


def _normal(seed, shape, scale=1.0):
  # NumPy's generator: eager jax.random compiles anew for every shape (about a second each).
  rng = np.random.default_rng(seed)
  return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))


def _data(seed=0, x_shape=(2, 16, 16, 4), w_shape=(3, 3, 4, 8)):
  return _normal(2 * seed, x_shape), _normal(2 * seed + 1, w_shape)


def _fill(tree, seed=0, scale=0.3):
  """The arrays (or ShapeDtypeStructs) of a pytree replaced by random float32 arrays."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = [_normal(seed + i, l.shape, scale) if hasattr(l, "shape") else l
            for i, l in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _assert_tiled(report, n_convs=None):
  """Some conv of the report is tiled into more than one piece (all of them with n_convs)."""
  assert report.convs, "explain found no conv"
  tiled = [c for c in report.convs if c.tiled and c.n_elemental > 1]
  assert tiled, f"nothing was tiled:\n{report}"
  if n_convs is not None:
    assert len(report.convs) == n_convs, str(report)
    assert len(tiled) == n_convs, f"not every conv was tiled:\n{report}"


def _assert_grads_close(got, want, names=("dx", "dw")):
  """Gradients sum many products in another order once tiled: tolerance relative to their scale."""
  for a, b, name in zip(got, want, names):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=name)


def _walk_eqns(jaxpr):
  """Every equation of a (closed) jaxpr, nested jaxprs in params included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          yield from _walk_eqns(v)


def _tiled_calls(fun, *args, **kwargs):
  """Distinct tiled conv programs (jaxtile's `jaxtile_convN` calls) in `fun`'s jaxpr, sorted.

  `explain` says what the planner decided; this checks that the program that runs, as composed,
  really holds the tiled loops.
  """
  closed = jax.make_jaxpr(fun)(*args, **kwargs)
  return sorted({str(e.params["name"]) for e in _walk_eqns(closed)
                 if str(e.params.get("name", "")).startswith(("jaxtile_conv", "jaxtile_region"))})


ONE = ["jaxtile_conv0"]


# ---------------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------------


def test_jit_of_tile_convs():
  x, w = _data()
  _assert_tiled(jaxtile.explain(conv, tile_shape=TILE)(x, w), n_convs=1)
  tiled = jax.jit(tile_convs(conv, tile_shape=TILE))
  assert _tiled_calls(tiled, x, w) == ["jaxtile_conv0"]
  assert_same(tiled(x, w), conv(x, w))


def test_jit_of_tile_convs_channel_blocks():
  x, w = _data()
  report = jaxtile.explain(conv, channel_block=CHANNELS)(x, w)
  _assert_tiled(report, n_convs=1)
  assert report.convs[0].in_channel_blocks == 2 and report.convs[0].out_channel_blocks == 3
  tiled = jax.jit(tile_convs(conv, channel_block=CHANNELS))
  assert _tiled_calls(tiled, x, w) == ONE
  np.testing.assert_allclose(tiled(x, w), conv(x, w), **TOL)


def test_tile_convs_of_jit_with_nested_jit():
  x, w = _data()
  _, w2 = _data(seed=2, w_shape=(3, 3, 8, 4))

  @jax.jit
  def inner(x, w):
    return jnp.tanh(conv(x, w))

  @jax.jit
  def f(x, w, w2):
    return conv(inner(x, w), w2)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w, w2), n_convs=2)
  tiled = tile_convs(f, tile_shape=TILE)
  assert_same(tiled(x, w, w2), f(x, w, w2))
  assert _tiled_calls(tiled, x, w, w2) == ["jaxtile_conv0", "jaxtile_conv1"]


def test_checkpoint():
  x, w = _data()

  @jax.checkpoint
  def block(x, w):
    return jax.nn.relu(conv(x, w))

  def f(x, w):
    return block(x, w) * 2.0

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w), n_convs=1)
  tiled = tile_convs(f, tile_shape=TILE)
  assert _tiled_calls(jax.jit(tiled), x, w) == ONE
  assert_same(jax.jit(tiled)(x, w), f(x, w))
  # And the gradient through the checkpointed, tiled block.
  grad = jax.grad(lambda x, w: jnp.sum(tiled(x, w) ** 2), (0, 1))
  assert _tiled_calls(grad, x, w) == ONE
  g = grad(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(x, w)
  _assert_grads_close(g, g_ref)


def test_scan_body():
  x, _ = _data()
  ws = _normal(3, (3, 3, 3, 4, 4), 0.3)

  def f(x, ws):
    def body(carry, w):
      y = jnp.tanh(conv(carry, w))
      return y, jnp.sum(y)
    return lax.scan(body, x, ws)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, ws), n_convs=1)
  assert _tiled_calls(tile_convs(f, tile_shape=TILE), x, ws) == ONE
  out, sums = tile_convs(f, tile_shape=TILE)(x, ws)
  ref_out, ref_sums = f(x, ws)
  assert_same(out, ref_out)
  assert_same(sums, ref_sums)


def test_while_loop_body():
  x, _ = _data()
  w = _normal(4, (3, 3, 4, 4), 0.3)

  def f(x, w):
    def body(state):
      i, y = state
      return i + 1, jnp.tanh(conv(y, w))
    return lax.while_loop(lambda s: s[0] < 3, body, (0, x))[1]

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w), n_convs=1)
  tiled = jax.jit(tile_convs(f, tile_shape=TILE))
  assert _tiled_calls(tiled, x, w) == ONE
  assert_same(tiled(x, w), f(x, w))


@pytest.mark.parametrize("pred", [True, False])
def test_cond_branches(pred):
  x, w = _data()

  def f(pred, x, w):
    return lax.cond(pred, lambda x, w: conv(x, w), lambda x, w: conv(x, w * 2.0) + 1.0, x, w)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(jnp.asarray(pred), x, w), n_convs=2)
  tiled = tile_convs(f, tile_shape=TILE)
  assert _tiled_calls(tiled, jnp.asarray(pred), x, w) == ["jaxtile_conv0", "jaxtile_conv1"]
  out = tiled(jnp.asarray(pred), x, w)
  assert_same(out, f(pred, x, w))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_branches(index):
  x, w = _data()

  def f(i, x, w):
    branches = [lambda x, w: conv(x, w),
                lambda x, w: jax.nn.relu(conv(x, w)),
                lambda x, w: conv(x, w[::-1, ::-1]) - 3.0]
    return lax.switch(i, branches, x, w)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(jnp.asarray(index), x, w), n_convs=3)
  tiled = jax.jit(tile_convs(f, tile_shape=TILE))
  assert _tiled_calls(tiled, jnp.asarray(index), x, w) == [f"jaxtile_conv{i}" for i in range(3)]
  out = tiled(jnp.asarray(index), x, w)
  assert_same(out, f(index, x, w))


def test_custom_vjp_forward():
  x, w = _data()

  @jax.custom_vjp
  def cconv(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    _, vjp = jax.vjp(conv, x, w)
    dx, dw = vjp(g)
    return 2.0 * dx, 3.0 * dw  # deliberately not the true gradient: the rule must be kept

  cconv.defvjp(fwd, bwd)

  def f(x, w):
    return jnp.sin(cconv(x, w))

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w))
  tiled = tile_convs(f, tile_shape=TILE)
  assert_same(jax.jit(tiled)(x, w), f(x, w))
  assert _tiled_calls(tiled, x, w) == ONE
  # The custom rule survives the rewrite.
  g = _cotangent()
  got = jax.grad(lambda x, w: jnp.sum(tiled(x, w) * g), (0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(f(x, w) * g), (0, 1))(x, w)
  _assert_grads_close(got, want)


def test_custom_jvp_forward():
  x, w = _data()

  @jax.custom_jvp
  def cconv(x, w):
    return conv(x, w)

  @cconv.defjvp
  def cconv_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    # Deliberately not the true derivative: the rule must be kept.
    return conv(x, w), 2.0 * conv(dx, w) + conv(x, dw)

  def f(x, w):
    return jnp.sin(cconv(x, w))

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w))
  tiled = tile_convs(f, tile_shape=TILE)
  assert_same(jax.jit(tiled)(x, w), f(x, w))
  assert _tiled_calls(tiled, x, w) == ONE
  dx, dw = _data(seed=1)
  _, got = jax.jvp(tiled, (x, w), (dx, dw))
  _, want = jax.jvp(f, (x, w), (dx, dw))
  np.testing.assert_allclose(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# vmap and pmap
# ---------------------------------------------------------------------------------------------


def test_vmap_over_tiled():
  xs, w = _data(x_shape=(3, 2, 16, 16, 4))
  _assert_tiled(jaxtile.explain(conv, tile_shape=TILE)(xs[0], w), n_convs=1)
  tiled = tile_convs(conv, tile_shape=TILE)
  batched = jax.vmap(tiled, in_axes=(0, None))
  assert _tiled_calls(batched, xs, w) == ONE
  assert_same(batched(xs, w), jax.vmap(conv, in_axes=(0, None))(xs, w))


def test_vmap_over_tiled_channel_blocks_both_operands():
  xs, ws = _data(x_shape=(3, 2, 16, 16, 4), w_shape=(3, 3, 3, 4, 8))
  _assert_tiled(jaxtile.explain(conv, channel_block=CHANNELS)(xs[0], ws[0]), n_convs=1)
  batched = jax.vmap(tile_convs(conv, channel_block=CHANNELS))
  assert _tiled_calls(batched, xs, ws) == ONE
  np.testing.assert_allclose(batched(xs, ws), jax.vmap(conv)(xs, ws), **TOL)


def _n_devices():
  n = jax.device_count()
  if n < 2:
    pytest.skip(f"pmap needs at least 2 devices, found {n} (tests/conftest.py asks XLA for 8 "
                "host CPU devices; XLA_FLAGS was overridden?)")
  return min(n, 8)


def test_pmap_over_tiled():
  n = _n_devices()
  xs, w = _data(x_shape=(n, 2, 16, 16, 4))
  _assert_tiled(jaxtile.explain(conv, tile_shape=TILE)(xs[0], w), n_convs=1)
  tiled = tile_convs(conv, tile_shape=TILE)
  out = jax.pmap(tiled, in_axes=(0, None))(xs, w)
  assert _tiled_calls(jax.pmap(tiled, in_axes=(0, None)), xs, w) == ONE
  assert_same(np.asarray(out), jax.vmap(conv, in_axes=(0, None))(xs, w))


def test_pmap_inside_tile_convs():
  n = _n_devices()
  xs, w = _data(x_shape=(n, 2, 16, 16, 4))

  def f(xs, w):
    return jax.pmap(lambda x, w: jnp.tanh(conv(x, w)), in_axes=(0, None))(xs, w)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(xs, w), n_convs=1)
  assert _tiled_calls(tile_convs(f, tile_shape=TILE), xs, w) == ONE
  out = tile_convs(f, tile_shape=TILE)(xs, w)
  assert_same(np.asarray(out), np.asarray(f(xs, w)))


# ---------------------------------------------------------------------------------------------
# Differentiation
# ---------------------------------------------------------------------------------------------


def _cotangent(shape=(2, 16, 16, 8)):
  return _normal(7, shape)


@pytest.mark.parametrize("policy", [dict(tile_shape=TILE), dict(channel_block=CHANNELS),
                                    dict(max_bytes=2**12)], ids=["tiles", "channels", "budget"])
def test_grad_through_tile_convs(policy):
  x, w = _data()
  g = _cotangent()
  _assert_tiled(jaxtile.explain(conv, **policy)(x, w), n_convs=1)

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * g)

  grad = jax.grad(loss(tile_convs(conv, **policy)), argnums=(0, 1))
  assert _tiled_calls(grad, x, w) == ONE
  got = grad(x, w)
  want = jax.grad(loss(conv), argnums=(0, 1))(x, w)
  _assert_grads_close(got, want)


def test_jvp_through_tile_convs():
  x, w = _data()
  dx, dw = _data(seed=1)
  _assert_tiled(jaxtile.explain(conv, tile_shape=TILE)(x, w), n_convs=1)
  tiled = tile_convs(conv, tile_shape=TILE)
  assert _tiled_calls(lambda *a: jax.jvp(tiled, a[:2], a[2:]), x, w, dx, dw) == ONE
  out, tangent = jax.jvp(tiled, (x, w), (dx, dw))
  ref_out, ref_tangent = jax.jvp(conv, (x, w), (dx, dw))
  assert_same(out, ref_out)
  np.testing.assert_allclose(tangent, ref_tangent, **TOL)


def test_tile_convs_of_grad_tiles_backward_convs():
  x, w = _data()
  g = _cotangent()

  def loss(x, w):
    return jnp.sum(jnp.sin(conv(x, w)) * g)

  grad = jax.grad(loss, argnums=(0, 1))
  # Forward conv (25 KiB), input-gradient conv and weight-gradient conv, all above 4 KiB.
  report = jaxtile.explain(grad, max_bytes=2**12, strict=True)(x, w)
  _assert_tiled(report, n_convs=3)
  assert all(c.tile_bytes <= 2**12 for c in report.convs), str(report)
  assert all(not c.over_budget for c in report.convs), str(report)
  tiled = jax.jit(tile_convs(grad, max_bytes=2**12, strict=True))
  assert _tiled_calls(tiled, x, w) == [f"jaxtile_conv{i}" for i in range(3)]
  got = tiled(x, w)
  want = grad(x, w)
  _assert_grads_close(got, want)


def test_check_grads_reverse_mode():
  x, w = _data(x_shape=(1, 8, 6, 2), w_shape=(3, 3, 2, 3))
  f = lambda x, w: conv(x, w)
  _assert_tiled(jaxtile.explain(f, tile_shape=(2, 4))(x, w), n_convs=1)
  tiled = tile_convs(f, tile_shape=(2, 4))
  assert _tiled_calls(tiled, x, w) == ONE
  assert_same(tiled(x, w), f(x, w))  # check_grads only checks consistency
  jtu.check_grads(tiled, (x, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2,
                            eps=1e-2)


def test_check_grads_float64_fwd_and_rev():
  with jax.enable_x64(True):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 2)))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)))
    assert x.dtype == jnp.float64
    policy = dict(tile_shape=(2, 4), channel_block=(1, 2))
    report = jaxtile.explain(conv, **policy)(x, w)
    _assert_tiled(report, n_convs=1)
    assert report.convs[0].dtype == np.float64
    assert _tiled_calls(tile_convs(conv, **policy), x, w) == ONE
    np.testing.assert_allclose(tile_convs(conv, **policy)(x, w), conv(x, w), rtol=1e-12)
    jtu.check_grads(tile_convs(conv, **policy), (x, w), order=1, modes=["fwd", "rev"])


# ---------------------------------------------------------------------------------------------
# Model libraries
# ---------------------------------------------------------------------------------------------


def test_flax_linen_model():
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), padding="SAME")(x)
      x = nn.relu(x)
      return nn.Conv(6, (3, 3), padding="SAME")(x)

  model = Net()
  x, _ = _data()
  # Shapes from flax's init (traced only), values from NumPy: running init eagerly is slow.
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x))
  budget = 2**13
  report = jaxtile.explain(model.apply, max_bytes=budget)(params, x)
  _assert_tiled(report, n_convs=2)
  assert all(c.tile_bytes <= budget for c in report.convs), str(report)
  # The source is the user's model, not flax's Conv layer.
  assert all(__file__.rsplit("/", 1)[-1] in c.source for c in report.convs), str(report)
  # conv -> bias -> relu -> conv -> bias: one region, one loop over tiles; or a loop per conv.
  assert [r.convs for r in report.regions] == [("jaxtile/conv0", "jaxtile/conv1")]
  per_conv = jax.jit(tile_convs(model.apply, max_bytes=budget, fuse=False))
  assert _tiled_calls(per_conv, params, x) == ["jaxtile_conv0", "jaxtile_conv1"]
  np.testing.assert_allclose(per_conv(params, x), model.apply(params, x), **TOL)
  tiled = jax.jit(tile_convs(model.apply, max_bytes=budget))
  assert _tiled_calls(tiled, params, x) == ["jaxtile_region0"]
  out = tiled(params, x)
  want = model.apply(params, x)
  if any(c.in_channel_blocks > 1 for c in report.convs):
    np.testing.assert_allclose(out, want, **TOL)
  else:
    assert_same(out, want)


def test_equinox_model():
  eqx = pytest.importorskip("equinox")
  k1, k2 = jax.random.split(jax.random.key(5))
  model = eqx.filter_eval_shape(lambda: eqx.nn.Sequential([
      eqx.nn.Conv2d(4, 8, 3, padding=1, key=k1),
      eqx.nn.Lambda(jax.nn.relu),
      eqx.nn.Conv2d(8, 6, 3, padding=1, key=k2),
  ]))
  model = _fill(model)  # eager random init is slow; shapes from equinox, values from NumPy
  x = _normal(6, (2, 4, 16, 16))  # NCHW
  traces = []

  def apply(model, x):
    traces.append(1)
    return jax.vmap(model)(x)

  report = jaxtile.explain(apply, tile_shape=TILE)(model, x)
  _assert_tiled(report, n_convs=2)
  del traces[:]
  tiled = tile_convs(apply, tile_shape=TILE)
  assert_same(tiled(model, x), apply(model, x))
  assert _tiled_calls(lambda x: tiled(model, x), x) == ["jaxtile_conv0", "jaxtile_conv1"]
  # Array leaves are traced: new weights of the same shapes neither retrace nor get ignored.
  n_traces = len(traces)
  model2 = jax.tree_util.tree_map(lambda a: a * 0.5 if eqx.is_array(a) else a, model)
  assert_same(tiled(model2, x), apply(model2, x))
  assert len(traces) == n_traces + 1  # the untiled reference call above; no retrace of tiled


def test_equinox_filter_jit_of_tile_convs():
  eqx = pytest.importorskip("equinox")
  model = _fill(eqx.filter_eval_shape(
      lambda: eqx.nn.Conv2d(4, 8, 3, padding=1, key=jax.random.key(8))))
  x = _normal(9, (2, 4, 16, 16))
  apply = lambda model, x: jax.vmap(model)(x)
  _assert_tiled(jaxtile.explain(apply, tile_shape=TILE)(model, x), n_convs=1)
  tiled = eqx.filter_jit(tile_convs(apply, tile_shape=TILE))
  assert _tiled_calls(lambda x: tiled(model, x), x) == ONE
  out = tiled(model, x)
  assert_same(out, apply(model, x))


# ---------------------------------------------------------------------------------------------
# Plain functions, arguments and outputs
# ---------------------------------------------------------------------------------------------


def test_function_without_conv():
  x, _ = _data()
  f = lambda x: jnp.cumsum(jnp.tanh(x) * 3.0, axis=1)
  report = jaxtile.explain(f, max_bytes=16)(x)
  assert report.convs == []
  assert _tiled_calls(tile_convs(f, max_bytes=16), x) == []
  assert_same(tile_convs(f, max_bytes=16)(x), f(x))


def test_static_keyword_bool():
  x, w = _data()

  def f(x, w, *, train):
    y = conv(x, w)
    if train:  # a Python branch: `train` must arrive static
      return y * 0.5
    return jax.nn.relu(y)

  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(x, w, train=False), n_convs=1)
  tiled = tile_convs(f, tile_shape=TILE)
  assert _tiled_calls(functools.partial(tiled, train=False), x, w) == ONE
  assert_same(tiled(x, w, train=False), f(x, w, train=False))
  assert_same(tiled(x, w, train=True), f(x, w, train=True))
  assert not np.array_equal(tiled(x, w, train=True), tiled(x, w, train=False))


def test_static_argnums_and_argnames():
  x, w = _data()

  def f(x, w, padding, scale=1.0):
    return conv(x, w, padding) * scale

  tiled = tile_convs(f, tile_shape=TILE, static_argnums=2, static_argnames="scale")
  _assert_tiled(jaxtile.explain(f, tile_shape=TILE, static_argnums=2, static_argnames="scale")(
      x, w, "VALID", scale=2.0), n_convs=1)
  assert _tiled_calls(lambda x, w: tiled(x, w, "SAME", scale=2.0), x, w) == ONE
  same = tiled(x, w, "SAME", scale=2.0)
  valid = tiled(x, w, "VALID", scale=2.0)
  assert same.shape == (2, 16, 16, 8) and valid.shape == (2, 14, 14, 8)
  assert_same(same, f(x, w, "SAME", scale=2.0))
  assert_same(valid, f(x, w, "VALID", scale=2.0))
  # A negative static_argnums counts from the end, as in jax.jit.
  explicit = tile_convs(f, tile_shape=TILE, static_argnums=(-1,))(x, w, [(2, 0), (0, 1)], 1.0)
  assert_same(explicit, f(x, w, [(2, 0), (0, 1)], 1.0))


def test_pytree_outputs_preserved():
  x, w = _data()

  def f(inputs):
    y = conv(inputs["x"], inputs["w"])
    return {"y": y, "stats": (jnp.mean(y), jnp.max(y)), "none": None, "list": [y[:1]]}

  inputs = {"x": x, "w": w}
  _assert_tiled(jaxtile.explain(f, tile_shape=TILE)(inputs), n_convs=1)
  assert _tiled_calls(tile_convs(f, tile_shape=TILE), inputs) == ONE
  out = tile_convs(f, tile_shape=TILE)(inputs)
  want = f(inputs)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(want)
  assert isinstance(out, dict) and isinstance(out["stats"], tuple)
  assert isinstance(out["list"], list) and out["none"] is None
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
    assert_same(a, b)


# ---------------------------------------------------------------------------------------------
# Other spatial ranks
# ---------------------------------------------------------------------------------------------


def test_conv1d_tiled_under_jit():
  x, w = _data(x_shape=(2, 37, 4), w_shape=(3, 4, 8))
  f = lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME",
                                            dimension_numbers=("NWC", "WIO", "NWC"))
  report = jaxtile.explain(f, tile_shape=(5,))(x, w)
  _assert_tiled(report, n_convs=1)
  assert report.convs[0].spatial_tiles == (8,)
  tiled = jax.jit(tile_convs(f, tile_shape=(5,)))
  assert _tiled_calls(tiled, x, w) == ONE
  assert_same(tiled(x, w), f(x, w))


def test_conv3d_tiled_under_jit():
  x, w = _data(x_shape=(1, 7, 8, 9, 2), w_shape=(3, 3, 3, 2, 4))
  f = lambda x, w: lax.conv_general_dilated(x, w, (1, 2, 1), "SAME",
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  report = jaxtile.explain(f, tile_shape=(3, 2, 4))(x, w)
  _assert_tiled(report, n_convs=1)
  assert report.convs[0].spatial_tiles == (3, 2, 3)
  tiled = jax.jit(tile_convs(f, tile_shape=(3, 2, 4)))
  assert _tiled_calls(tiled, x, w) == ONE
  assert_same(tiled(x, w), f(x, w))
