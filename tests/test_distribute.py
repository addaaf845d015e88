"""Pieces divided among devices (`devices=`): same numbers as on one device, for every split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxtile


def assert_same(actual, desired):
  """Tiled equals monolithic to float32 rounding. Not always bit for bit: XLA:CPU's own conv
  kernel can round the outputs of a padded window differently from the same outputs inside a
  larger conv (seen on AMD EPYC with jax 0.10.2; plain XLA, no jaxtile, shows it too)."""
  np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-5)


N_DEVICES = len(jax.devices())
needs_8 = pytest.mark.skipif(N_DEVICES < 8, reason="needs 8 devices (tests/conftest.py sets 8 "
                             "host CPU devices before jax is imported)")

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def operands(shape=(2, 28, 30, 8), cout=12):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], cout))
  return x, w


def single_device(fn, x, w, **policy):
  return jaxtile.tile_convs(fn, **policy)(x, w)


@needs_8
@pytest.mark.parametrize("policy, axis", [
    (dict(tile_shape=(4, 30), batch_block=2), "spatial0"),        # 7 row tiles on 4 devices
    (dict(tile_shape=(5, 7), batch_block=2), "spatial0"),         # 6 x 5 tiles
    (dict(batch_block=1, tile_shape=(28, 30)), "batch"),           # batch rows
    (dict(channel_block=(None, 2), batch_block=2, tile_shape=(28, 30)), "out_channel"),
    (dict(channel_block=(4, 4), tile_shape=(14, 15)), "out_channel"),  # with partial sums
])
@pytest.mark.parametrize("n_devices", [4, 3])
def test_equals_single_device(policy, axis, n_devices):
  x, w = operands()
  devices = jax.devices()[:n_devices]
  report = jaxtile.explain(conv, devices=devices, **policy)(x, w).convs[0]
  plan = report.plan
  if axis != "batch" or n_devices <= 2:
    assert plan.distributed_axis == axis
  assert len(report.pieces_per_device) == n_devices
  assert sum(report.pieces_per_device) == report.n_elemental
  got = jaxtile.tile_convs(conv, devices=devices, **policy)(x, w)
  want = single_device(conv, x, w, **policy)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


@needs_8
def test_uneven_counts_seven_tiles_on_four_devices():
  x, w = operands((1, 28, 16, 4), 4)
  policy = dict(tile_shape=(4, 16), devices=jax.devices()[:4])
  report = jaxtile.explain(conv, **policy)(x, w).convs[0]
  assert report.plan.spatial_tiles == (7, 1)
  assert report.pieces_per_device == (2, 2, 2, 1)
  assert_same(jaxtile.tile_convs(conv, **policy)(x, w),
                                single_device(conv, x, w, tile_shape=(4, 16)))


def test_one_device_reports_all_pieces():
  x, w = operands()
  report = jaxtile.explain(conv, tile_shape=(7, 10))(x, w).convs[0]
  assert report.pieces_per_device == (report.n_elemental,) == (12,)


@needs_8
def test_more_devices_than_blocks_splits_further():
  """A plan with fewer blocks than devices is split further so no device idles."""
  x, w = operands((1, 16, 16, 8), 8)
  report = jaxtile.explain(conv, max_bytes=2**13, devices=jax.devices())(x, w).convs[0]
  assert sum(1 for n in report.pieces_per_device if n) == 8
  np.testing.assert_allclose(
      jaxtile.tile_convs(conv, max_bytes=2**13, devices=jax.devices())(x, w),
      jax.jit(conv)(x, w), rtol=1e-5, atol=1e-5)


@needs_8
def test_gradients_through_distributed_conv():
  x, w = operands()
  tiled = jaxtile.tile_convs(conv, tile_shape=(5, 7), devices=jax.devices()[:4])
  loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()
  got = jax.grad(loss(tiled), argnums=(0, 1))(x, w)
  want = jax.grad(loss(conv), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
  tiled_grad = jaxtile.tile_convs(jax.grad(loss(conv), argnums=(0, 1)), tile_shape=(5, 7),
                                  devices=jax.devices()[:4])
  for g, r in zip(tiled_grad(x, w), want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


@needs_8
def test_mesh_axis_of_a_two_axis_mesh_and_sharded_output():
  x, w = operands()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tiles"))
  tiled = jaxtile.tile_convs(conv, tile_shape=(7, 30), devices=mesh, mesh_axis="tiles",
                             shard_output=True)
  report = jaxtile.explain(conv, tile_shape=(7, 30), devices=mesh, mesh_axis="tiles")(x, w)
  assert report.convs[0].pieces_per_device == (1, 1, 1, 1)
  out = tiled(x, w)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tiles")), out.ndim)
  np.testing.assert_allclose(out, jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


@needs_8
def test_user_pmap_is_left_as_is_and_convs_tiled_per_device():
  x, w = operands((4, 16, 16, 4), 4)
  tiled = jaxtile.tile_convs(jax.pmap(lambda x, w: conv(x[None], w)[0], in_axes=(0, None)),
                             tile_shape=(4, 16), devices=jax.devices()[:4])
  report = jaxtile.explain(jax.pmap(lambda x, w: conv(x[None], w)[0], in_axes=(0, None)),
                           tile_shape=(4, 16), devices=jax.devices()[:4])(x, w)
  assert report.convs[0].tiled and report.convs[0].pieces_per_device == (4,)
  np.testing.assert_allclose(tiled(x, w), jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


@needs_8
def test_sharded_inputs_under_jit():
  """A user's jit over inputs sharded on the batch: the result is the same; the pass tiles the
  (global) conv it sees."""
  x, w = operands((8, 12, 12, 4), 4)
  mesh = Mesh(np.array(jax.devices()), ("b",))
  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  got = jax.jit(jaxtile.tile_convs(conv, tile_shape=(4, 12)))(xs, w)
  np.testing.assert_allclose(got, jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(devices="gpu"), TypeError, r"devices must be a non-empty sequence of jax.Device.*'gpu'"),
    (dict(devices=[]), TypeError, r"devices must be a non-empty sequence"),
    (dict(mesh_axis="x"), ValueError, r"mesh_axis='x' needs devices="),
    (dict(shard_output=True), ValueError, r"shard_output=True needs devices="),
    (dict(shard_output=1, devices=None), TypeError, r"shard_output must be a bool"),
])
def test_bad_device_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxtile.tile_convs(conv, **kwargs)


@needs_8
def test_bad_mesh_axis():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tiles"))
  with pytest.raises(ValueError, match=r"pass mesh_axis= .* mesh_axis=None"):
    jaxtile.tile_convs(conv, devices=mesh)
  with pytest.raises(ValueError, match=r"one of the mesh's axes \('data', 'tiles'\).*'rows'"):
    jaxtile.tile_convs(conv, devices=mesh, mesh_axis="rows")
  with pytest.raises(ValueError, match="distinct"):
    jaxtile.tile_convs(conv, devices=[jax.devices()[0]] * 2)


@needs_8
def test_make_mesh_with_explicit_axes():
  x, w = operands()
  mesh = jax.make_mesh((4,), ("b",))
  got = jaxtile.tile_convs(conv, tile_shape=(7, 30), devices=mesh)(x, w)
  np.testing.assert_allclose(got, jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


def test_explain_with_shapes_only():
  """Plans a model from shapes, without allocating its arguments."""
  x = jax.ShapeDtypeStruct((1, 4096, 4096, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
  report = jaxtile.explain(lambda x, w: jnp.tanh(conv(x, w)), max_bytes=2**24)(x, w)
  assert report.convs[0].tiled


@needs_8
def test_user_shard_map_is_left_as_is_and_convs_tiled_per_device():
  x, w = operands((4, 16, 16, 4), 4)
  mesh = Mesh(np.array(jax.devices()[:4]), ("b",))
  per_device = jax.shard_map(conv, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"))
  report = jaxtile.explain(per_device, tile_shape=(4, 16), devices=jax.devices()[:4])(x, w)
  (c,) = report.convs
  assert c.lhs_shape == (1, 16, 16, 4)  # the per-device conv
  assert c.tiled and c.pieces_per_device == (c.n_elemental,)
  got = jaxtile.tile_convs(per_device, tile_shape=(4, 16), devices=jax.devices()[:4])(x, w)
  np.testing.assert_allclose(got, jax.jit(conv)(x, w), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Regions (chains of convs and activations tiled as one loop) under devices=
# ---------------------------------------------------------------------------------------------
def _chain(x, w1, w2, w3):
  y = jax.nn.relu(conv(x, w1))
  y = jax.nn.relu(conv(y, w2) + 0.1)
  return jax.nn.relu(conv(y, w3))


def _chain_operands():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 40, 36, 4)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) / 4, jnp.float32)
        for s in [(3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 4)]]
  return x, *ws


def _loops_per_device(jaxpr, inside=False) -> int:
  """How many loops of `jaxpr` run inside a `shard_map` (each device its own)."""
  count = 0
  for e in jaxpr.eqns:
    count += inside and e.primitive.name == "while"
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _loops_per_device(inner, inside or e.primitive.name == "shard_map")
  return count


@needs_8
@pytest.mark.parametrize("n_devices", [4, 3])
def test_region_tiles_are_dealt_out_over_devices(n_devices):
  # 64 tiles on 3 devices: 22 each, the last device recomputing the final tile twice; its
  # backward loop pulls back 22, 22 and 20.
  args = _chain_operands()
  tiled = jaxtile.tile_convs(_chain, max_bytes=8000, devices=jax.devices()[:n_devices])
  (region,) = jaxtile.explain(tiled)(*args).regions
  assert region.devices == n_devices and math.prod(region.tiles) > n_devices, region
  assert f"on {n_devices} devices" in region.describe()
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(_chain)(*args), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3))
  for got, want in zip(jax.jit(loss(tiled))(*args), jax.jit(loss(_chain))(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  # The region's backward loop runs on the devices too (it used to run on one).
  assert _loops_per_device(jax.make_jaxpr(loss(tiled))(*args).jaxpr) == 1


@needs_8
@pytest.mark.parametrize("upsampled", [False, True])
def test_region_program_is_compiled_for_its_devices(upsampled):
  # 7x4 tiles of a 4-channel chain on 4 devices: this program used to be compiled for one
  # device (the region's shard_map is inside its primitive's lowering, where jit does not see
  # it) and XLA:CPU refused it. With a nearest upsampling starting a stage, too.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 41, 37, 4)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 4, jnp.float32) for _ in range(3)]

  def f(x, w1, w2, w3):
    y = jax.nn.relu(conv(x, w1))
    if upsampled:
      y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)
    return conv(jax.nn.relu(conv(y, w2)), w3)

  tiled = jaxtile.tile_convs(f, max_bytes=8000, devices=jax.devices()[:4])
  (region,) = jaxtile.explain(tiled)(x, *ws).regions
  assert region.devices == 4 and region.upsamplings == upsampled, region
  np.testing.assert_allclose(jax.jit(tiled)(x, *ws), jax.jit(f)(x, *ws), rtol=1e-5, atol=1e-5)
  loss = lambda g: jax.jit(jax.grad(lambda *a: jnp.sum(g(*a) ** 2), argnums=(0, 1)))
  for got, want in zip(loss(tiled)(x, *ws), loss(f)(x, *ws)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  # The tangent alone (its loop's tiles dealt out too, the primal output unused).
  tangents = tuple(jnp.ones_like(a) for a in (x, *ws))
  jvp = lambda g: jax.jit(lambda *a: jax.jvp(g, a, tangents)[1])
  np.testing.assert_allclose(jvp(tiled)(x, *ws), jvp(f)(x, *ws), rtol=1e-4, atol=1e-4)


@needs_8
def test_region_on_a_mesh_axis_with_sharded_output():
  args = _chain_operands()
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tiles"))
  tiled = jaxtile.tile_convs(_chain, max_bytes=8000, devices=mesh, mesh_axis="tiles",
                             shard_output=True)
  assert jaxtile.explain(tiled)(*args).regions[0].devices == 4
  out = jax.jit(tiled)(*args)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tiles")), out.ndim)
  np.testing.assert_allclose(out, jax.jit(_chain)(*args), rtol=1e-5, atol=1e-5)


@needs_8
@pytest.mark.parametrize("centred", [False, True], ids=["mean-square", "jnp.var"])
def test_region_statistics_and_derivatives_are_dealt_out_over_devices(centred):
  # A norm's statistics over the image, of a value the region makes, are a pass over its tiles:
  # on 4 devices each pass takes a quarter of them and the parts are summed across devices, in
  # the forward, in the tangent and in the backward loops. A centred variance (`jnp.var`) is
  # computed in the mean's pass: each device's count, mean and sum of squares about its mean
  # are joined about the total mean; its derivative is the program's two passes.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 36, 30, 4)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) / 4, jnp.float32)
        for s in [(3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 4)]]

  def f(x, w1, w2, w3):
    h = jax.nn.relu(conv(x, w1))
    mean = h.mean(axis=(1, 2), keepdims=True)
    if centred:
      var = h.var(axis=(1, 2), keepdims=True)
    else:
      var = (h * h).mean(axis=(1, 2), keepdims=True) - mean * mean
    h = (h - mean) * lax.rsqrt(var + 1e-5)
    return conv(jax.nn.relu(conv(jax.nn.silu(h), w2)), w3)

  tiled = jaxtile.tile_convs(f, max_bytes=12000, devices=jax.devices()[:4])
  (region,) = jaxtile.explain(tiled)(x, *ws).regions
  assert region.devices == 4 and region.statistics == 1, region
  np.testing.assert_allclose(jax.jit(tiled)(x, *ws), jax.jit(f)(x, *ws), rtol=1e-5, atol=1e-5)
  loss = lambda g: jax.grad(lambda *a: jnp.sum(g(*a) ** 2), argnums=(0, 1, 2, 3))
  for got, want in zip(jax.jit(loss(tiled))(x, *ws), jax.jit(loss(f))(x, *ws)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  # The region's backward loop and the statistics passes' (the forward ones are inside their
  # primitives' lowering, not in the jaxpr).
  assert _loops_per_device(jax.make_jaxpr(loss(tiled))(x, *ws).jaxpr) == 2 + centred
  tangents = tuple(jnp.ones_like(a) for a in (x, *ws))
  jvp = lambda g: jax.jit(lambda *a: jax.jvp(g, a, tangents)[1])
  np.testing.assert_allclose(jvp(tiled)(x, *ws), jvp(f)(x, *ws), rtol=1e-4, atol=1e-4)


@needs_8
@pytest.mark.parametrize("n_devices", [4, 3])
def test_a_differentiated_region_deals_its_tiles_and_reductions_out(n_devices):
  # `tile_convs(jax.grad(f))`: one region of the forward and backward convs, whose weight
  # gradients and loss are reductions each device adds up over its tiles, summed across the
  # devices (3 devices: the last recomputes a tile another has, and adds nothing for it).
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(1, 72, 40, 4)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) / 4, jnp.float32)
        for s in [(3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 4)]]

  def grad(x, *ws):
    f = lambda x, *ws: jnp.sum(conv(jax.nn.relu(conv(jax.nn.relu(conv(x, ws[0])), ws[1])),
                                    ws[2]) ** 2)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(x, *ws)

  tiled = jaxtile.tile_convs(grad, max_bytes=60000, devices=jax.devices()[:n_devices])
  (region,) = jaxtile.explain(tiled)(x, *ws).regions
  assert region.devices == n_devices and region.reductions == 4, region
  # 16 tiles: 4 each on 4 devices; on 3, the last recomputes a tile
  assert bool(math.prod(region.tiles) % n_devices) == (n_devices == 3), region
  for got, want in zip(jax.tree.leaves(jax.jit(tiled)(x, *ws)),
                       jax.tree.leaves(jax.jit(grad)(x, *ws))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
