"""`jaxtile.stream`: images on the host or on disk through a network, a tile at a time.

Every streamed result is compared with the untiled function on the whole image (`jax.jit`), to
float32 rounding: XLA:CPU on this machine rounds a conv's outputs differently with the window's
shape, so tiled and whole results agree to ~1e-7 relative, not bit for bit (docs/guide.md).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import jaxtile

TESTS = Path(__file__).resolve().parent
WORKER_PATH = TESTS / "stream_worker.py"
DN = ("NHWC", "HWIO", "NHWC")


def _load_worker():
  spec = importlib.util.spec_from_file_location("stream_worker", WORKER_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()


def assert_same(streamed, whole):
  assert streamed.shape == whole.shape and streamed.dtype == whole.dtype
  np.testing.assert_allclose(streamed, whole, rtol=1e-6, atol=1e-5)


def untiled(f, *args):
  return np.asarray(jax.jit(f)(*[jnp.asarray(a) for a in args]))


@pytest.mark.parametrize("tile_shape", [None, (16, 16), (7, 13), (64, 5), (1, 48)])
def test_two_stages_match_untiled(tile_shape):
  f, x = worker.network(), worker.image()
  kwargs = dict(tile_shape=tile_shape) if tile_shape else dict(max_bytes=40_000)
  streamed = jaxtile.stream(f, **kwargs)
  plan = streamed.explain(x)
  assert len(plan.stages) == 2 and plan.n_tiles > 1, str(plan)
  assert_same(streamed(x), untiled(f, x))
  assert streamed.last_stats.tiles == plan.n_tiles


def _conv(x, w, stride=1, padding="SAME", **kw):
  return lax.conv_general_dilated(x, w, (stride,) * (x.ndim - 2), padding,
                                  dimension_numbers=kw.pop("dn", DN), **kw)


def test_local_ops_of_every_kind():
  """Pools, residual adds, a channel concatenation of two images, dilation, groups, negative
  padding, a nested jit, a `jnp.pad` with zeros, a crop and a final activation, in one
  stage."""
  keys = jax.random.split(jax.random.key(2), 5)
  w1 = jax.random.normal(keys[0], (3, 3, 4, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 4, 8)) * 0.3  # feature groups 2
  w3 = jax.random.normal(keys[2], (5, 5, 8, 8)) * 0.1
  b = jax.random.normal(keys[3], (8,))
  w4 = jax.random.normal(keys[4], (3, 3, 8, 4)) * 0.3

  @jax.jit
  def block(y, w):
    return jax.nn.gelu(_conv(y, w, rhs_dilation=(2, 2)) + y)

  def f(a, c):
    x = jnp.concatenate([a, c], axis=-1)
    y = jax.nn.relu(_conv(x, w1) + b)
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    y = _conv(y, w2, feature_group_count=2) + y
    y = block(y, w3)
    y = _conv(jnp.pad(y, ((0, 0), (2, 0), (1, 3), (0, 0))), w4, padding=((-1, 2), (0, 1)))
    return jnp.tanh(y[:, 1:-2, 2:])

  rng = np.random.default_rng(3)
  a = rng.normal(size=(2, 45, 38, 2)).astype(np.float32)
  c = rng.normal(size=(2, 45, 38, 2)).astype(np.float32)
  streamed = jaxtile.stream(f, tile_shape=(5, 6))
  plan = streamed.explain(a, c)
  assert len(plan.stages) == 1 and plan.n_tiles > 4
  assert_same(streamed(a, c), untiled(f, a, c))


def test_volume_3d():
  dn = ("NDHWC", "DHWIO", "NDHWC")
  keys = jax.random.split(jax.random.key(4), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 1, 4)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 3, 4, 4)) * 0.3
  wt = jax.random.normal(keys[2], (2, 2, 2, 4, 2)) * 0.3

  def f(x):
    y = jax.nn.relu(_conv(x, w1, dn=dn))
    y = jax.nn.relu(_conv(y, w2, stride=2, dn=dn))
    return lax.conv_transpose(y, wt, (2, 2, 2), "VALID", dimension_numbers=dn)

  x = np.random.default_rng(5).normal(size=(1, 20, 17, 22, 1)).astype(np.float32)
  streamed = jaxtile.stream(f, tile_shape=(6, 8, 7))
  assert len(streamed.explain(x).stages) == 2
  assert_same(streamed(x), untiled(f, x))


@pytest.mark.parametrize("form", ["resize", "repeat"])
def test_nearest_upsampling_is_a_stage(form):
  # A decoder streamed: a strided conv down, nearest upsampling by 2 (the gathers of
  # jax.image.resize or jnp.repeat's reshapes), convs; the upsampled value is made a window
  # per tile, its first input at floor(tile start / 2).
  keys = jax.random.split(jax.random.key(6), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 4)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 4, 4)) * 0.3
  w3 = jax.random.normal(keys[2], (3, 3, 4, 2)) * 0.3

  def f(x):
    y = jax.nn.relu(_conv(x, w1, stride=2))
    if form == "resize":
      n, h, w, c = y.shape
      y = jax.image.resize(y, (n, 2 * h, 2 * w, c), "nearest")
    else:
      y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)
    return _conv(jax.nn.relu(_conv(y + 0.5, w2)), w3, padding=((2, 0), (1, 1)))

  x = np.random.default_rng(7).normal(size=(1, 46, 38, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, tile_shape=(9, 14))
  assert len(streamed.explain(x).stages) == 2
  assert_same(streamed(x), untiled(f, x))


def test_on_disk_stores_and_parameters_as_arguments(tmp_path):
  """A memmap source, a zarr sink whose chunks the tiles follow, and parameters passed as device
  arrays beside the image."""
  zarr = pytest.importorskip("zarr")
  f = worker.network()
  src = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.uint8,
                                  shape=worker.SHAPE)
  src[:] = worker.image()
  src.flush()
  src = np.load(tmp_path / "in.npy", mmap_mode="r")
  whole = untiled(f, src)
  out = zarr.open_array(tmp_path / "out.zarr", mode="w", shape=whole.shape, dtype=whole.dtype,
                        chunks=(1, 16, 16, 2))
  streamed = jaxtile.stream(lambda scale, x: f(x) * scale, max_bytes=100_000)
  plan = streamed.explain(jnp.float32(2), src, out=out)
  assert plan.tile == (32, 16), plan.tile  # whole chunks (the budget alone: 32 x 24)
  assert streamed(jnp.float32(2), src, out=out) is None
  assert_same(out[...], whole * 2)
  assert (tmp_path / "out.zarr.jaxtile" / "plan.json").exists()

  # The store made again at the same path: its journal's tiles are not in it, so no resume.
  out = zarr.open_array(tmp_path / "out.zarr", mode="w", shape=whole.shape, dtype=whole.dtype,
                        chunks=(1, 16, 16, 2))
  with pytest.raises(jaxtile.StreamError, match="earlier output"):
    streamed(jnp.float32(2), src, out=out, resume=True)


def test_resume_after_a_kill_mid_write(tmp_path):
  """A run killed (SIGKILL) while writing a tile resumes from its journal: the tiles it wrote
  whole are not computed again, the cut one is, and the output is the uninterrupted run's."""
  f, x = worker.network(), worker.image()
  streamed = jaxtile.stream(f, tile_shape=worker.TILE, prefetch=1)
  whole = streamed(x)
  path = tmp_path / "out.npy"
  out = np.lib.format.open_memmap(path, mode="w+", dtype=whole.dtype, shape=whole.shape)
  out[:] = np.nan
  out.flush()
  del out
  after = 6
  env = dict(os.environ)  # this process's devices too: XLA:CPU rounds with its thread pool
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
  run = subprocess.run([sys.executable, str(WORKER_PATH), "kill", "--out", str(path),
                        "--after", str(after)], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  journal = Path(str(path) + ".jaxtile")
  done = set((journal / "done-0.log").read_text().split())
  # The tile cut short is not in the journal (nor one another writer thread had written but
  # not yet recorded when the kill came).
  assert 1 <= len(done) <= after - 1, done
  out = np.load(path, mmap_mode="r+")
  assert np.isnan(out).any()  # the run really stopped midway
  streamed(x, out=out, journal=journal, resume=True)
  stats = streamed.last_stats
  assert (stats.skipped, stats.tiles) == (len(done), streamed.explain(x).n_tiles - len(done))
  np.testing.assert_array_equal(np.load(path), whole)  # the same bytes as one run

  # Resuming a finished run computes nothing; a different call refuses the journal.
  streamed(x, out=out, journal=journal, resume=True)
  assert streamed.last_stats.tiles == 0
  with pytest.raises(jaxtile.StreamError, match="different call"):
    jaxtile.stream(f, tile_shape=(32, 16))(x, out=out, journal=journal, resume=True)


def test_tiles_dealt_to_every_local_device():
  if jax.local_device_count() < 2:
    pytest.skip("needs several devices (conftest.py asks for 8 host devices)")
  f, x = worker.network(), worker.image()
  streamed = jaxtile.stream(f, tile_shape=worker.TILE, devices=jax.local_devices()[:3])
  assert_same(streamed(x), untiled(f, x))


def _streams_in_one_program(f):
  """`f` of a 1x40x36x3 image streams in 12 tiles of one tile program, as untiled computes it."""
  x = np.random.default_rng(5).normal(size=(1, 40, 36, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, tile_shape=(10, 12))
  plan = streamed.explain(x)
  assert len(plan.stages) == 1 and plan.n_tiles == 12, str(plan)
  assert_same(streamed(x), untiled(f, x))


def test_checkpointed_blocks_stream_in_one_program():
  """`jax.checkpoint` (flax's `nn.remat`) around blocks, one nested in another: evaluated, a
  checkpoint is its body. It was read as an op needing the whole image, and the function ran
  whole on the host."""
  keys = jax.random.split(jax.random.key(4), 4)
  ws = [jax.random.normal(k, (3, 3, 3 if i == 0 else 8, 8)) * 0.3 for i, k in enumerate(keys)]
  conv = lambda y, w: jax.nn.relu(_conv(y, w))
  inner = jax.checkpoint(conv)
  block = jax.checkpoint(lambda y, w1, w2: inner(conv(y, w1), w2))

  def f(x):
    return block(block(x, *ws[:2]), *ws[2:])

  _streams_in_one_program(f)


def test_dense_layers_on_the_features_stream_in_one_program():
  """A product of an image's features with a weight (flax's `nn.Dense`, ConvNeXt's MLP) is a
  1x1 conv: local. It was read as an op needing the whole image, run on the host."""
  keys = jax.random.split(jax.random.key(6), 3)
  w = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w1 = jax.random.normal(keys[1], (8, 32)) * 0.3
  w2 = jax.random.normal(keys[2], (32, 8)) * 0.2

  def f(x):
    y = _conv(x, w)
    return y + jax.nn.gelu(y @ w1) @ w2

  _streams_in_one_program(f)


def test_explain_prints_the_plan():
  f, x = worker.network(), worker.image()
  plan = jaxtile.stream(f, tile_shape=worker.TILE).explain(
      jax.ShapeDtypeStruct(worker.SHAPE, jnp.uint8))
  text = str(plan)
  assert "1x64x48x3 -> 1x64x48x2 float32" in text
  assert "output tiles: 12 (4 x 3) of 16 x 16" in text
  assert "stage 0" in text and "stage 1" in text
  assert plan.device_bytes > 0


# ---------------------------------------------------------------------------------------------
# Errors: before any tile, naming what is wrong
# ---------------------------------------------------------------------------------------------
def test_a_global_op_is_named_with_its_line():
  w = jnp.ones((3, 3, 3, 4))

  def f(x):
    y = _conv(x, w)
    return y - y.mean(axis=(1, 2), keepdims=True)  # a norm's statistics: not local

  with pytest.raises(jaxtile.StreamError, match=r"not spatially local: `reduce_sum` at "
                     r".*test_stream.py:\d+"):
    jaxtile.stream(f, spill=False)(np.zeros((1, 16, 16, 3), np.float32))


def test_an_image_read_after_a_transposed_conv_is_a_window_of_that_stage():
  """A stage after a transposed conv may read an image (a full-resolution guide beside a
  low-resolution one): each stage reads its own windows of the images, at its own offsets."""
  keys = jax.random.split(jax.random.key(24), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 2, 4)) * 0.3
  wt = jax.random.normal(keys[1], (2, 2, 4, 4)) * 0.3
  w2 = jax.random.normal(keys[2], (3, 3, 7, 2)) * 0.3

  def f(low, guide):
    y = lax.conv_transpose(jax.nn.relu(_conv(low, w1)), wt, (2, 2), "VALID",
                           dimension_numbers=DN)
    return _conv(jnp.concatenate([jax.nn.relu(y), guide], axis=-1), w2)

  rng = np.random.default_rng(25)
  low = rng.normal(size=(1, 21, 17, 2)).astype(np.float32)
  guide = rng.normal(size=(1, 42, 34, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=15_000)
  plan = streamed.explain(low, guide)
  assert isinstance(plan, jaxtile.StreamPlan) and len(plan.stages) == 2, str(plan)
  assert plan.n_tiles > 1, str(plan)
  assert_same(streamed(low, guide, progress=False), untiled(f, low, guide))


def _unet(widths=(4, 8)):
  """Two levels: a conv block, a strided conv down, a block; back up by a transposed conv at
  the inner level and a nearest upsampling at the outer one, each concatenated with its skip."""
  keys = iter(jax.random.split(jax.random.key(26), 16))
  w = lambda i, o, k=3: jax.random.normal(next(keys), (k, k, i, o)) * (0.5 / k)
  a, b = widths
  ws = dict(e1=w(3, a), e2=w(a, a), down=w(a, b), m1=w(b, b), up=w(b, b, 2), d1=w(2 * b, b),
            up2=w(b, a, 1), d2=w(2 * a, a), out=w(a, 2, 1))

  def f(x):
    s1 = jax.nn.relu(_conv(jax.nn.relu(_conv(x, ws["e1"])), ws["e2"]))
    s2 = jax.nn.relu(_conv(s1, ws["down"], stride=2))
    m = jax.nn.relu(_conv(jax.nn.relu(_conv(s2, ws["m1"], stride=2)), ws["m1"]))
    u = lax.conv_transpose(m, ws["up"], (2, 2), "SAME", dimension_numbers=DN)
    d = jax.nn.relu(_conv(jnp.concatenate([u, s2], axis=-1), ws["d1"]))
    n, h, w_, c = d.shape
    u2 = _conv(jax.image.resize(d, (n, 2 * h, 2 * w_, c), "nearest"), ws["up2"])
    d2 = jax.nn.relu(_conv(jnp.concatenate([u2, s1], axis=-1), ws["d2"]))
    return _conv(d2, ws["out"])
  return f


def test_a_unet_streams_with_its_skips_spilled_to_the_host(tmp_path):
  """A value read across an upsampling (a UNet's skip) cannot be carried by one tile program:
  `stream` cuts the function after each skip, the part before writes it to the host, and the
  part after reads it back as an image, in the stage that reads it. Every part streams on the
  device; the result is the untiled one, into a memmap. With spill=False, a clear error."""
  f = _unet()
  x = np.random.default_rng(27).normal(size=(2, 52, 44, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=40_000)
  text = str(streamed.explain(x))
  assert " 3 segments" in text and "is read across an upsampling" in text, text
  assert text.count("streamed on the device") == 3 and "whole, on the host" not in text, text
  out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32,
                                  shape=(2, 52, 44, 2))
  streamed(x, out=out, progress=False)
  assert_same(np.asarray(out), untiled(f, x))
  with pytest.raises(jaxtile.StreamError, match="skip connection spanning an upsampling.*"
                     "spill=True"):
    jaxtile.stream(f, max_bytes=40_000, spill=False)(x)


@pytest.mark.parametrize("out, message", [
    (np.zeros((1, 64, 48, 3), np.float32), r"out has shape \(1, 64, 48, 3\), but fun's output "
     r"is \(1, 64, 48, 2\)"),
    (np.zeros((1, 64, 48, 2), np.float16), "out has dtype float16, but fun's output is float32"),
    (np.zeros((1, 64, 48, 2), np.float32).view(), "read-only"),  # made read-only below
])
def test_a_wrong_output_store(out, message):
  if message == "read-only":
    out.flags.writeable = False  # a memmap opened with mode="r"
  with pytest.raises(jaxtile.StreamError, match=message):
    jaxtile.stream(worker.network())(worker.image(), out=out)


def test_bad_arguments():
  f, x = worker.network(), worker.image()
  with pytest.raises(jaxtile.StreamError, match="no image argument"):
    jaxtile.stream(f)(jnp.asarray(x))  # a device array is a parameter, not an image
  with pytest.raises(jaxtile.StreamError, match="resume=True needs out="):
    jaxtile.stream(f)(x, resume=True)
  with pytest.raises(jaxtile.StreamError, match="not on disk"):
    jaxtile.stream(f)(x, out=np.zeros((1, 64, 48, 2), np.float32), resume=True)
  with pytest.raises(ValueError, match="stream: max_bytes must be positive"):
    jaxtile.stream(f, max_bytes=0)
  with pytest.raises(TypeError, match="stream: progress must be"):
    jaxtile.stream(f)(x, progress="yes")
  with pytest.raises(jaxtile.StreamError, match="output .* is empty"):
    jaxtile.stream(lambda x: _conv(x, jnp.ones((5, 5, 3, 1)), padding="VALID"))(
        np.zeros((1, 3, 3, 3), np.float32))
  with pytest.raises(jaxtile.StreamError, match="tracing fun at its image shapes"):
    jaxtile.stream(lambda x: _conv(x, jnp.ones((3, 3, 4, 1))))(np.zeros((1, 8, 8, 3)))
  with pytest.raises(jaxtile.StreamError, match="tile_shape=.* has 3 entries"):
    jaxtile.stream(f, tile_shape=(4, 4, 4))(x)
  with pytest.raises(jaxtile.StreamError, match=r"must return one array .* returns PyTreeDef\("
                     r"\{'y': \*\}\); return the array itself"):
    jaxtile.stream(lambda x: {"y": f(x)})(x)  # it returned the bare array


def test_argnums_streams_a_device_array():
  f, x = worker.network(), worker.image()
  assert_same(jaxtile.stream(f, argnums=0, tile_shape=(32, 16))(jnp.asarray(x)), untiled(f, x))


# ---------------------------------------------------------------------------------------------
# Two processes of a jax.distributed job write one zarr store
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_share_the_tiles(tmp_path):
  zarr = pytest.importorskip("zarr")
  if not hasattr(jax, "distributed"):
    pytest.skip("no jax.distributed")
  f, x = worker.network(), worker.image()
  whole = untiled(f, x)
  path = tmp_path / "out.zarr"
  zarr.open_array(path, mode="w", shape=whole.shape, dtype=whole.dtype, chunks=(1, 16, 16, 2),
                  fill_value=np.nan)
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.lower().endswith("_proxy")}
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER_PATH), "multihost", "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(i), "--out", str(path)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.monotonic() + 240
  try:
    outputs = [p.communicate(timeout=max(1, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-3000:]
  counts = sorted(int(o.split("process ")[1].split(": ")[1].split()[0]) for o, _ in outputs)
  assert counts == [6, 6], outputs  # 12 tiles, every other one
  assert_same(zarr.open_array(path, mode="r")[...], whole)


def test_device_memory_does_not_grow_with_the_image():
  """The compiled tile program (XLA's buffer assignment: arguments, output, temporaries) is the
  same for a 512x512 image and a 16384x16384 one, and within a small multiple of max_bytes."""
  f = worker.network()
  budget = 2**20
  streamed = jaxtile.stream(f, max_bytes=budget)
  plans = [streamed.explain(jax.ShapeDtypeStruct((1, n, n, 3), jnp.uint8)) for n in (512, 16384)]
  assert plans[1].n_tiles > 100 * plans[0].n_tiles
  assert plans[0].tile == plans[1].tile
  assert plans[0].device_bytes == plans[1].device_bytes
  assert plans[1].device_bytes <= 3 * budget, plans[1].device_bytes


def test_chunk_cache_windows_equal_plain_reads():
  """Windows cut from cached whole chunks equal windows read directly, at the image's edges, past
  them and across chunk borders; the cache stays within its bytes."""
  zarr = pytest.importorskip("zarr")
  from jaxtile._src import stream as stream_lib
  data = np.random.default_rng(9).normal(size=(2, 37, 50, 3)).astype(np.float32)
  z = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=data.shape, dtype=data.dtype,
                      chunks=(2, 8, 16, 3))
  z[...] = data
  cache = stream_lib._ChunkCache(z, (1, 2), max_bytes=6 * 8 * 16 * 3 * 2 * 4)
  rng = np.random.default_rng(10)
  for _ in range(60):
    starts = [int(rng.integers(-12, 45)), int(rng.integers(-20, 60))]
    widths = [int(rng.integers(1, 30)), int(rng.integers(1, 40))]
    np.testing.assert_array_equal(cache.window(starts, widths),
                                  stream_lib.read_window(data, starts, widths, (1, 2)))
    assert cache._bytes <= cache.max_bytes


def test_unit_axes_added_to_the_image_and_squeezed_from_the_output(tmp_path):
  """`fun(x)` on an HxWxC image that adds the batch axis its convs need (`x[None]`) and drops it
  from the result (`[0]`): the image is read, and the output written, without that axis."""
  zarr = pytest.importorskip("zarr")
  f = worker.network()
  g = lambda x: f(x[None])[0]
  x = worker.image()[0]
  whole = untiled(g, x)
  out = zarr.open_array(tmp_path / "out.zarr", mode="w", shape=whole.shape, dtype=whole.dtype,
                        chunks=(16, 16, 2))
  streamed = jaxtile.stream(g, max_bytes=100_000)
  plan = streamed.explain(x, out=out)
  assert plan.tile == (32, 16) and "64x48x3 -> 64x48x2 float32" in str(plan)
  streamed(x, out=out, progress=False)
  assert_same(out[...], whole)
  assert_same(jaxtile.stream(g, tile_shape=(7, 13))(x), whole)


def test_a_norm_between_convs_spills_to_the_host(tmp_path):
  """A GroupNorm-like norm (statistics over the image) between convs: the convs before it and
  the ones after stream tile by tile, the statistics are computed whole on the host, and the
  full-size activation between them is a temporary file; the result is the untiled function's,
  into a memmap, resumable (the last segment's journal)."""
  keys = jax.random.split(jax.random.key(11), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 8, 8)) * 0.3
  w3 = jax.random.normal(keys[2], (3, 3, 8, 2)) * 0.3

  def norm(y):
    mean = y.mean(axis=(1, 2), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(1, 2), keepdims=True)
    return (y - mean) * lax.rsqrt(var + 1e-5)

  def f(x):
    y = _conv(jax.nn.relu(_conv(x, w1)), w2, stride=2)
    y = jax.nn.silu(norm(y))
    y = lax.conv_transpose(y, w2, (2, 2), "SAME", dimension_numbers=DN)
    return _conv(jax.nn.relu(y), w3)

  x = np.random.default_rng(12).normal(size=(2, 40, 36, 3)).astype(np.float32)
  whole = untiled(f, x)
  streamed = jaxtile.stream(f, max_bytes=60_000)
  text = str(streamed.explain(x))
  assert "needs the whole image" in text and "to a temporary file" in text, text
  # The norm's reductions and the elementwise ops between them are one segment, run in bands
  # of rows: the mean in one pass, the centred variance, which reads it, in a second.
  assert text.count("streamed on the device") == 2, text
  assert "2 passes over them for its statistics (reduce_sum x2)" in text, text
  assert " 3 segments" in text, text
  assert "whole, on the host" not in text, text
  out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32,
                                  shape=whole.shape)
  streamed(x, out=out, progress=False)
  assert_same(np.asarray(out), whole)
  first = streamed.last_stats.tiles
  assert first > 2
  # Resumed: the segments before the last run again (their spills are temporary), the last
  # one's tiles are all in the journal.
  streamed(x, out=out, progress=False, resume=True)
  stats = streamed.last_stats
  assert stats.skipped > 0 and stats.tiles == first - stats.skipped, stats
  assert_same(np.asarray(out), whole)


def test_an_unbatched_equinox_model_streams():
  """An equinox model called on one (C, H, W) image, as equinox layers take it: each conv adds a
  batch axis of 1 and squeezes it from its result, and the bias and relu between act on the
  squeezed value. Those ops are not in the convs' layout; streaming used to crash on the bias
  (an IndexError from the layout check). Now they split the function into segments streamed
  tile by tile, spilled to the host between them, and the result is the untiled one. Under
  vmap the whole network is one tile program."""
  eqx = pytest.importorskip("equinox")

  class Net(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d

    def __call__(self, x):
      return self.conv2(jax.nn.relu(self.conv1(x)))

  k1, k2 = jax.random.split(jax.random.key(13))
  model = Net(eqx.nn.Conv2d(3, 8, 3, padding=1, key=k1), eqx.nn.Conv2d(8, 2, 3, padding=1, key=k2))
  x = np.random.default_rng(14).normal(size=(3, 48, 40)).astype(np.float32)
  apply = lambda model, x: model(x)
  whole = untiled(lambda x: model(x), x)
  assert_same(np.asarray(jaxtile.stream(apply, max_bytes=30_000)(model, x)), whole)
  # Called under vmap on a batch of one, as the guide suggests, the network is one tile
  # program: the unit axes equinox adds and squeezes around each conv cancel out.
  batched = jaxtile.stream(lambda model, x: jax.vmap(model)(x[None])[0], max_bytes=30_000)
  text = str(batched.explain(model, x))
  assert "needs the whole image" not in text and "conv_general_dilated x2" in text, text
  assert_same(np.asarray(batched(model, x)), whole)
  # A leaf that is no array (`eqx.nn.Lambda`'s function) is static, as `tile_convs` keeps it.
  wrapped = (model, eqx.nn.Lambda(jax.nn.relu))
  apply_both = lambda layers, x: layers[1](layers[0](x))
  assert_same(np.asarray(jaxtile.stream(apply_both, max_bytes=30_000)(wrapped, x)),
              untiled(lambda x: apply_both(wrapped, x), x))


def test_biases_broadcast_to_the_activation_stream_in_one_program():
  """haiku's `Conv2D` adds its bias as `jnp.broadcast_to(b, out.shape)`, and equinox's
  `GroupNorm` scales by a weight broadcast to the activation's shape: full-size values computed
  from parameters alone. Streaming such a network crashed (a KeyError: the tile program read
  the broadcast as a full-size input it had no windows of). Each broadcast is now made on the
  window of the stage that reads it, as a region's is (`region.canonical_form`), and the
  network is one tile program."""
  keys = jax.random.split(jax.random.key(15), 4)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 8, 2)) * 0.3
  b1, scale = jax.random.normal(keys[2], (8,)), jax.random.normal(keys[3], (1, 1, 8))

  def f(x):
    y = _conv(x, w1)
    y = y + jnp.broadcast_to(b1, y.shape)
    y = jax.nn.relu(jnp.broadcast_to(scale, y.shape) * y)
    y = _conv(y, w2, stride=2)
    return y + jnp.broadcast_to(b1[:2], y.shape)

  x = np.random.default_rng(16).normal(size=(1, 50, 44, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=20_000)
  plan = streamed.explain(x)
  assert isinstance(plan, jaxtile.StreamPlan) and plan.n_tiles > 1, str(plan)
  assert "broadcast_in_dim x3" in str(plan), str(plan)
  assert_same(streamed(x, progress=False), untiled(f, x))


def test_norms_with_batch_statistics_or_repeated_group_statistics_spill():
  """Two norms between convs, each spilled to the host (`spill`), each of which crashed:
  - batch norm in training mode, after a bias broadcast to the activation's shape (haiku's
    `Conv2D` and `BatchNorm`): the segment after it read the broadcast, computed once at full
    size, as a parameter it had no windows of (a KeyError);
  - GroupNorm's per-group statistics repeated to the channels (flax's `GroupNorm`: a
    `jnp.repeat` of a (N, groups) value, an upsampling of rank 2), which the segmentation
    took for an upsampling of the image (an IndexError)."""
  keys = jax.random.split(jax.random.key(17), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 8, 2)) * 0.3
  b1 = jax.random.normal(keys[2], (8,))

  def batch_norm(y):
    mean = y.mean(axis=(0, 1, 2))
    return (y - mean) * lax.rsqrt(((y - mean) ** 2).mean(axis=(0, 1, 2)) + 1e-5)

  def group_norm(y, groups=4):
    n, c = y.shape[0], y.shape[-1]
    grouped = y.reshape(n, -1, groups, c // groups)
    mean = jnp.repeat(grouped.mean(axis=(1, 3)), c // groups, axis=-1)
    var = jnp.repeat((grouped ** 2).mean(axis=(1, 3)), c // groups, axis=-1) - mean ** 2
    return (y - mean[:, None, None]) * lax.rsqrt(var[:, None, None] + 1e-5)

  x = np.random.default_rng(18).normal(size=(2, 36, 30, 3)).astype(np.float32)
  for norm in (batch_norm, group_norm):
    def f(x):
      y = _conv(x, w1)
      y = jax.nn.relu(norm(y + jnp.broadcast_to(b1, y.shape)))
      return _conv(y, w2)

    streamed = jaxtile.stream(f, max_bytes=20_000)
    text = str(streamed.explain(x))
    assert text.count("streamed on the device") == 2, text
    # The batch norm's statistics run in bands of rows; the group norm's reshape merges the
    # rows with the columns, which bands cannot split, so it runs whole on the host.
    assert ("whole, on the host's CPU" in text) == (norm is group_norm), text
    assert_same(streamed(x, progress=False), untiled(f, x))


class _Recording:
  """A host image that records the shape of each read."""

  def __init__(self, array):
    self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

  def __getitem__(self, index):
    block = self.array[index]
    self.reads.append(block.shape)
    return block


def _centred_norm(y):  # per sample and channel: jnp.var's centred form reads the mean
  mean = y.mean(axis=(1, 2), keepdims=True)
  return (y - mean) * lax.rsqrt(((y - mean) ** 2).mean(axis=(1, 2), keepdims=True) + 1e-5)


def _group_norm(y, groups=4):  # flax's GroupNorm: the mean of squares beside the mean
  grouped = y.reshape(*y.shape[:-1], groups, y.shape[-1] // groups)
  mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
  var = (grouped ** 2).mean(axis=(1, 2, 4), keepdims=True) - mean ** 2
  return ((grouped - mean) * lax.rsqrt(var + 1e-5)).reshape(y.shape)


def _max_norm(y):  # over the batch too, with a max
  return y / jnp.max(jnp.abs(y), axis=(0, 1, 2))


@pytest.mark.parametrize("norm, passes", [
    (_centred_norm, "2 passes over them for its statistics (reduce_sum x2)"),
    (_group_norm, "1 pass over them for its statistics (reduce_sum x2)\n"),
    (_max_norm, "1 pass over them for its statistics (reduce_max)"),
    (lambda y: jax.nn.standardize(y, axis=(1, 2)),
     "1 pass over them for its statistics (reduce_sum x2)")])
def test_a_norms_statistics_are_passes_over_bands_of_rows(norm, passes):
  """A norm's statistics need every position of the image, but not all at once: the segment
  that computes them runs in passes over bands of rows, one pass per level of statistics (a
  centred variance reads the mean). The image, on the host, is never read whole."""
  w = jax.random.normal(jax.random.key(24), (3, 3, 8, 4)) * 0.3
  f = lambda x: _conv(jax.nn.relu(norm(x)), w)
  x = np.random.default_rng(25).normal(size=(2, 64, 40, 8)).astype(np.float32) + 0.5
  image = _Recording(x)
  streamed = jaxtile.stream(f, max_bytes=60_000)
  text = str(streamed.explain(image))
  assert passes in text and "on the device in" in text, text
  assert "whole, on the host" not in text, text
  image.reads.clear()
  assert_same(streamed(image, progress=False), untiled(f, x))
  assert image.reads and max(shape[1] for shape in image.reads) < x.shape[1] // 2, image.reads


def test_a_banded_segment_writes_each_full_size_result_to_its_own_file():
  """Two full-size values made between a norm's reductions (the centred value and its square)
  and both read by the convs after them: the banded segment writes each into a temporary file
  of its own."""
  keys = jax.random.split(jax.random.key(30), 3)
  w1, w2, w3 = (jax.random.normal(k, s) * 0.3 for k, s in zip(
      keys, [(3, 3, 3, 8), (3, 3, 8, 4), (3, 3, 8, 4)]))

  def f(x):
    y = _conv(x, w1)
    centred = y - y.mean(axis=(1, 2), keepdims=True)
    square = centred * centred
    scale = lax.rsqrt(square.mean(axis=(1, 2), keepdims=True) + 1e-5)
    return _conv(centred * scale, w2) + _conv(square, w3)

  x = np.random.default_rng(31).normal(size=(2, 48, 40, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=30_000)
  text = str(streamed.explain(x))
  assert "2 passes over them for its statistics (reduce_sum x2)" in text, text
  assert text.count("(0.1 MiB) to a temporary file") == 3, text  # y, centred, square
  assert_same(streamed(x, progress=False), untiled(f, x))


def test_bfloat16_sums_over_bands_are_added_in_float64():
  """A bfloat16 sum over the image, in 96 bands of one row: the bands' partial sums are added
  in float64 and rounded to bfloat16 once (NumPy does not take bfloat16 for a float type, so
  they were added in bfloat16: 1.9% off the exact sum)."""
  w = (jax.random.normal(jax.random.key(36), (3, 3, 3, 8)) * 0.3).astype(jnp.bfloat16)
  act = lambda x: jax.nn.relu(_conv(x, w))
  f = lambda x: lax.reduce_sum(act(x), (1, 2))
  x = np.random.default_rng(37).normal(size=(1, 96, 64, 3)).astype(jnp.bfloat16)
  streamed = jaxtile.stream(f, max_bytes=2_000)
  assert "in 96 bands of 1 row of 96" in str(streamed.explain(x))
  exact = np.asarray(jax.jit(act)(x)).astype(np.float64).sum((1, 2))
  got = np.asarray(streamed(x, progress=False)).astype(np.float64)
  np.testing.assert_allclose(got, exact, rtol=2**-8)  # bfloat16's rounding, once


def test_a_global_pool_ending_the_function_streams_into_a_small_out():
  """A classifier's head: a global max pool over a conv's output, plus the image's mean. The
  last segment is statistics only, run in bands; its small result is what `out` receives."""
  w = jax.random.normal(jax.random.key(28), (3, 3, 3, 8))
  f = lambda x: (jnp.max(jax.nn.relu(_conv(x, w)), axis=(1, 2))
                 + jnp.mean(x, axis=(1, 2, 3))[:, None])
  x = np.random.default_rng(29).normal(size=(2, 64, 48, 3)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=30_000)
  text = str(streamed.explain(x))
  assert "1 pass over them for its statistics (reduce_max, reduce_sum)" in text, text
  assert_same(streamed(x, progress=False), untiled(f, x))
  out = np.zeros((2, 8), np.float32)
  assert streamed(x, out=out, progress=False) is None
  assert_same(out, untiled(f, x))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_pooled_vector_scaling_a_later_conv_streams(layout):
  """Squeeze-excitation's shape: a globally pooled (N, C) vector, and the image's (N,) mean,
  scaling the output of the next conv. Each statistic is another rank than the activations;
  `bands` took the (N,) vector for the image (an IndexError), and the mean's division, which the
  jaxpr interleaves with the conv, made the conv's segment run whole on the host."""
  nchw = layout == "NCHW"
  dn = ("NCHW", "OIHW", "NCHW") if nchw else DN
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
  keys = jax.random.split(jax.random.key(34), 2)
  w1 = jax.random.normal(keys[0], (8, 3, 3, 3) if nchw else (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (8, 8, 3, 3) if nchw else (3, 3, 8, 8)) * 0.3
  spatial = (2, 3) if nchw else (1, 2)

  def f(x):
    y = jax.nn.relu(conv(x, w1))
    pooled = jnp.expand_dims(y.mean(axis=spatial), spatial)  # (N, C, 1, 1) or (N, 1, 1, C)
    scale = x.mean(axis=(1, 2, 3))[:, None, None, None]
    return conv(y, w2) * jax.nn.sigmoid(pooled) * scale

  shape = (2, 3, 40, 24) if nchw else (2, 40, 24, 3)
  x = np.random.default_rng(35).normal(size=shape).astype(np.float32) + 0.2
  streamed = jaxtile.stream(f, tile_shape=(8, 8))
  text = str(streamed.explain(x))
  assert "whole, on the host" not in text and text.count("streamed on the device") == 2, text
  assert_same(streamed(x, progress=False), untiled(f, x))


@pytest.mark.parametrize("norm", ["LayerNorm", "InstanceNorm", "RMSNorm"])
def test_flax_norms_after_a_conv_leave_no_segment_whole(norm):
  """flax's LayerNorm, InstanceNorm and RMSNorm square the conv's output beside it, both read
  after the conv: the conv's run had two outputs, so it ran whole on the host's CPU. The square
  now runs with the instance norm's segment, in bands; LayerNorm and RMSNorm, over the channels
  at each position, are ops of the tile program (`canonical.keep_reduced_axes`): no spill."""
  nn = pytest.importorskip("flax.linen")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = getattr(nn, norm)()(nn.Conv(8, (3, 3))(x))
      return nn.Conv(4, (3, 3))(jax.nn.relu(y))

  x = np.random.default_rng(38).normal(size=(2, 40, 24, 3)).astype(np.float32)
  model = Block()
  params = model.init(jax.random.key(39), x)
  streamed = jaxtile.stream(model.apply, max_bytes=20_000)
  plan = streamed.explain(params, x)
  if norm == "InstanceNorm":
    text = str(plan)
    assert "whole, on the host" not in text and text.count("streamed on the device") == 2, text
  else:
    assert isinstance(plan, jaxtile.StreamPlan) and plan.n_tiles > 1, str(plan)
  assert_same(streamed(params, x, progress=False), np.asarray(jax.jit(model.apply)(params, x)))


NORMS = ("none", "instance", "groups", "layer", "max", "standardize", "batch")


@st.composite
def _networks(draw):
  """A random network of convs (1x1 or 3x3, stride 1 or 2), activations, norms of every kind
  `spill` and `bands` meet, squeeze-excitation scales and residual adds, in either layout."""
  blocks = draw(st.lists(st.tuples(
      st.sampled_from([1, 3]), st.sampled_from([4, 8]), st.sampled_from([1, 1, 1, 2]),
      st.sampled_from(["relu", "silu", "none"]), st.sampled_from(NORMS), st.booleans(),
      st.booleans()), min_size=2, max_size=4))
  shape = (draw(st.integers(1, 2)), draw(st.integers(12, 40)), draw(st.integers(12, 40)))
  return (draw(st.sampled_from(["NHWC", "NCHW"])), shape, blocks,
          draw(st.sampled_from([8_000, 20_000, 60_000])), draw(st.integers(0, 2**16)))


def _network(layout, blocks, seed):
  nchw = layout == "NCHW"
  dn = ("NCHW", "OIHW", "NCHW") if nchw else DN
  spatial, channel = ((2, 3), 1) if nchw else ((1, 2), 3)
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(blocks)))
  layers, c_in = [], 3
  for k, c_out, stride, act, norm, se, residual in blocks:
    shape = (c_out, c_in, k, k) if nchw else (k, k, c_in, c_out)
    layers.append((jax.random.normal(next(keys), shape) * (2 / (k * k * c_in)) ** 0.5,
                   stride, act, norm, se, residual and stride == 1 and c_in == c_out))
    c_in = c_out

  def normed(y, norm):
    if norm == "instance":  # the centred variance: two passes
      mean = y.mean(axis=spatial, keepdims=True)
      return (y - mean) * lax.rsqrt(((y - mean) ** 2).mean(axis=spatial, keepdims=True) + 1e-5)
    if norm == "groups":  # flax's GroupNorm of 2 groups: the mean of squares beside the mean
      split = y.shape[:channel] + (2, y.shape[channel] // 2) + y.shape[channel + 1:]
      g = y.reshape(split)
      axes = tuple(a + (a > channel) for a in spatial) + (channel + 1,)
      mean = g.mean(axis=axes, keepdims=True)
      var = (g ** 2).mean(axis=axes, keepdims=True) - mean ** 2
      return ((g - mean) * lax.rsqrt(var + 1e-5)).reshape(y.shape)
    if norm == "layer":  # over the channels alone: local
      mean = y.mean(axis=channel, keepdims=True)
      return (y - mean) * lax.rsqrt(y.var(axis=channel, keepdims=True) + 1e-5)
    if norm == "max":
      return y / (jnp.max(jnp.abs(y), axis=spatial, keepdims=True) + 1e-3)
    if norm == "standardize":
      return jax.nn.standardize(y, axis=spatial)
    if norm == "batch":  # over the batch too
      axes = (0, *spatial)
      return (y - y.mean(axis=axes, keepdims=True)) / (y.std(axis=axes, keepdims=True) + 1e-3)
    return y

  def f(x):
    for w, stride, act, norm, se, residual in layers:
      y = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dn)
      y = {"relu": jax.nn.relu, "silu": jax.nn.silu, "none": lambda v: v}[act](normed(y, norm))
      if se:
        y = y * jax.nn.sigmoid(y.mean(axis=spatial, keepdims=True))
      x = x + y if residual else y
    return x

  return f


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(_networks())
def test_random_networks_with_norms_stream_like_untiled(network):
  """Random networks of convs and norms of every kind, streamed (spilled, norms in bands)
  against `jax.jit` of the same function: sums over bands are added in another order, hence
  the tolerance."""
  layout, (n, h, w), blocks, max_bytes, seed = network
  f = _network(layout, blocks, seed)
  shape = (n, 3, h, w) if layout == "NCHW" else (n, h, w, 3)
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  want = untiled(f, x)
  got = jaxtile.stream(f, max_bytes=max_bytes)(x, progress=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(network))


def test_equinox_group_norms_run_in_bands_of_rows_under_vmap():
  """equinox's `GroupNorm` on (C, H, W), vmapped: it splits the channels into (G, C // G, H, W),
  moving the rows to another axis, and takes a centred variance (two passes). Each norm's
  segment runs in bands, and several bands per pass, so each pass runs its own program."""
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.key(26), 2)
  block = eqx.nn.Sequential([eqx.nn.Conv2d(3, 8, 3, padding=1, key=keys[0]),
                             eqx.nn.GroupNorm(4, 8), eqx.nn.Lambda(jax.nn.silu),
                             eqx.nn.Conv2d(8, 4, 3, padding=1, key=keys[1]),
                             eqx.nn.GroupNorm(2, 4)])
  f = jax.vmap(block)
  x = np.random.default_rng(27).normal(size=(2, 3, 40, 24)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=30_000)
  text = str(streamed.explain(x))
  assert text.count("2 passes over them for its statistics") == 2, text
  assert "whole, on the host" not in text, text
  bands = [int(b) for b in re.findall(r"in (\d+) bands of", text)]
  assert len(bands) == 2 and min(bands) > 2, text
  assert_same(streamed(x, progress=False), untiled(f, x))


def test_tiles_smaller_than_the_chunks_of_a_zarr_out_are_all_written(tmp_path):
  """Tiles of 8x8 into a zarr array of one 48x48 chunk: writing part of a chunk reads, updates
  and rewrites the whole chunk, so writer threads with tiles of one chunk overwrote each
  other's (without a lock per chunk, a third or more of the pixels came back zero)."""
  zarr = pytest.importorskip("zarr")
  w = jax.random.normal(jax.random.key(32), (3, 3, 3, 4)) * 0.3
  f = lambda x: _conv(x, w)
  x = np.random.default_rng(33).normal(size=(1, 48, 48, 3)).astype(np.float32)
  out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=(1, 48, 48, 4),
                        dtype=np.float32, chunks=(1, 48, 48, 4))
  streamed = jaxtile.stream(f, tile_shape=(8, 8))
  assert streamed.explain(x, out=out).n_tiles == 36
  streamed(x, out=out, progress=False)
  assert_same(out[...], untiled(f, x))


def test_a_full_size_value_that_is_no_image_is_refused():
  """A value of the image's size made from a device array (a positional encoding) would be read
  whole by every tile: a clear error naming the op and the remedy, not a KeyError from the
  reader threads; passed as an image it streams."""
  w = jax.random.normal(jax.random.key(19), (3, 3, 3, 4))
  f = lambda x, pos: _conv(x + pos, w)
  x = np.random.default_rng(20).normal(size=(1, 40, 30, 3)).astype(np.float32)
  pos = np.random.default_rng(21).normal(size=x.shape).astype(np.float32)
  with pytest.raises(jaxtile.StreamError, match=r"`add` at .*test_stream.py.* reads "
                     r"float32\[1,40,30,3\].*no image.*argnums"):
    jaxtile.stream(f, max_bytes=20_000)(x, jnp.asarray(pos), progress=False)
  assert_same(jaxtile.stream(f, max_bytes=20_000)(x, pos, progress=False), untiled(f, x, pos))


def test_convs_reading_different_images_stream_as_one_program():
  """Two images, each read by a conv of its own (a residual block's 1x1 skip conv reading the
  block's input beside its main branch, as a spilled segment of a VAE decoder's block sees them):
  one tile program reading a window of each. It used to be refused (`plan_region` took only
  the first conv's input, or values read by elementwise ops, as inputs), so the segment ran
  whole on the host's CPU."""
  keys = jax.random.split(jax.random.key(22), 3)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (1, 1, 5, 8)) * 0.3
  w3 = jax.random.normal(keys[2], (3, 3, 8, 2)) * 0.3
  f = lambda x, y: _conv(jax.nn.relu(_conv(x, w1)) + _conv(y, w2), w3)
  rng = np.random.default_rng(23)
  x = rng.normal(size=(1, 44, 38, 3)).astype(np.float32)
  y = rng.normal(size=(1, 44, 38, 5)).astype(np.float32)
  streamed = jaxtile.stream(f, max_bytes=20_000)
  plan = streamed.explain(x, y)
  assert isinstance(plan, jaxtile.StreamPlan) and plan.n_tiles > 1, str(plan)
  assert "conv_general_dilated x3" in str(plan), str(plan)
  assert_same(streamed(x, y, progress=False), untiled(f, x, y))
