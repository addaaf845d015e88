"""A gigapixel image streamed from disk through a small conv network, a tile at a time.

    python examples/gigapixel.py            # 1x32768x32768x3 uint8 (1.07 gigapixels, 3 GiB) in a
                                            # zarr store; the first run writes it (1.5 min), then
                                            # streams it (7 min on a busy 2-core CPU, 2.6 Mpx/s)
    python examples/gigapixel.py --small    # 1024x1024, in a temporary dir: seconds; checks the
                                            # streamed output against the untiled network
    python examples/gigapixel.py --size 4096 --data /scratch --max-bytes 4194304 --resume

The image lives in a zarr store under `--data` (default `./gigapixel_data`), written chunk by
chunk on the first run (sinusoids plus noise, never whole in memory); the network's output, one
float32 channel per pixel (4 GiB at full size), goes to a second zarr store beside it. Neither
is ever loaded whole: `jaxtile.stream` reads each output tile's input window (its halo included)
from the input store, runs one compiled tile program on the device and writes the tile to the
output store, reading ahead and writing behind on threads. It records finished tiles in a journal
beside the output, so `--resume` after an interruption computes only the missing ones.

The network is plain `lax`: two 3x3 convs with ReLU (8 channels), a stride-2 conv down and a 3x3
conv (16 channels), a 2x2 stride-2 transposed conv back up (8 channels), and a final 3x3 conv to
one channel, on `uint8 / 255`. The transposed conv starts a second stage of the tile program (see
`jaxtile.stream`). The example prints the plan, shows a progress bar, then the throughput and the
device memory; `--small` also runs the untiled network on the whole image and exits non-zero if
the outputs differ.

The image is stored with a leading batch axis of 1 (1xHxWx3), as the convs take it; an HxWx3
store works as well with a function that adds the axis itself (`network(x[None], params)[0]`):
`stream` reads and writes through unit axes added to an image or squeezed from the output.
"""

import argparse
import math
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import zarr
from jax import lax

import jaxtile

DN = ("NHWC", "HWIO", "NHWC")
# Spatial chunks of the stores. Output tiles are whole output chunks (`stream` rounds its tiles
# down to them), so no chunk is written twice; an input window, halo included, spans parts of
# several input chunks, each decoded whole, so those are larger (zarr's cost per chunk is high).
IMAGE_CHUNK = 512
OUT_CHUNK = 256
BLOCK = 2048  # the image is written this many rows and columns at a time
# (kernel, in channels, out channels, kind) per layer.
LAYERS = ((3, 3, 8, "conv"), (3, 8, 8, "conv"), (3, 8, 16, "down"), (3, 16, 16, "conv"),
          (2, 16, 8, "up"), (3, 8, 1, "last"))


def init_params(seed: int = 0) -> list[tuple[jax.Array, jax.Array]]:
  """(kernel HWIO, bias) per layer of `LAYERS`: N(0, 2/fan_in) kernels, small biases.

  One `jax.random.normal` draw cut into pieces: each eager jax.random call of a new shape
  compiles its own program (seconds on a CPU for a dozen of them)."""
  shapes = [((k, k, c_in, c_out), (c_out,)) for k, c_in, c_out, _ in LAYERS]
  sizes = [math.prod(s) for pair in shapes for s in pair]
  flat = np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),)))
  pieces = np.split(flat, np.cumsum(sizes)[:-1])
  params = []
  for n, (w_shape, b_shape) in enumerate(shapes):
    fan_in = math.prod(w_shape[:3])
    w = pieces[2 * n].reshape(w_shape) * math.sqrt(2 / fan_in)
    b = pieces[2 * n + 1].reshape(b_shape) * 0.01
    params.append((jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)))
  return params


def network(image, params):
  """1xHxWx3 uint8 -> 1xHxWx1 float32 (H and W even)."""
  x = image.astype(jnp.float32) / 255
  for (w, b), (_, _, _, kind) in zip(params, LAYERS):
    if kind == "up":
      x = lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN)
    else:
      stride = 2 if kind == "down" else 1
      x = lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN)
    x = x + b
    if kind != "last":
      x = jax.nn.relu(x)
  return x


def image_block(rows: slice, cols: slice, seed: int = 0) -> np.ndarray:
  """Pixels [rows, cols] of the synthetic image: smooth sinusoids per channel plus noise drawn
  from a generator seeded by the block's position (so every block is reproducible alone)."""
  y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
  x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :]
  base = np.stack([np.sin(y / 97 + x / 61) * np.cos(x / 173),
                   np.sin((y + x) / 131),
                   np.cos(y / 211) * np.sin(x / 59 + y / 1499)], axis=-1)
  rng = np.random.default_rng([seed, rows.start, cols.start])
  noise = rng.standard_normal(base.shape, dtype=np.float32) * 6
  return np.clip(127.5 + 100 * base + noise, 0, 255).astype(np.uint8)[None]


def open_image(path: pathlib.Path, size: int, compressors="auto") -> zarr.Array:
  """The 1 x size x size x 3 uint8 image at `path`, written chunk by chunk unless a complete one
  is already there (`compressors`: zarr's, for a new one)."""
  if path.exists():
    z = zarr.open_array(path, mode="r")
    if z.shape == (1, size, size, 3) and z.attrs.get("complete"):
      return z
  chunk = min(IMAGE_CHUNK, size)
  z = zarr.create_array(store=path, shape=(1, size, size, 3), chunks=(1, chunk, chunk, 3),
                        dtype="uint8", compressors=compressors, overwrite=True)
  n = -(-size // BLOCK)  # BLOCK is a multiple of IMAGE_CHUNK: each write fills whole chunks
  start = time.perf_counter()
  for i in range(n):
    rows = slice(i * BLOCK, min((i + 1) * BLOCK, size))
    for j in range(n):
      cols = slice(j * BLOCK, min((j + 1) * BLOCK, size))
      z[:, rows, cols] = image_block(rows, cols)
    if n > 1:
      print(f"\r  writing {path}: {i + 1}/{n} rows of {BLOCK}x{BLOCK} blocks", end="",
            file=sys.stderr, flush=True)
  if n > 1:
    print(file=sys.stderr)
  z.attrs["complete"] = True
  print(f"wrote {path} ({size}x{size}x3 uint8) in {time.perf_counter() - start:.1f} s")
  return zarr.open_array(path, mode="r")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="1024x1024 image in a temporary dir (unless --data), checked against "
                           "the untiled network")
  parser.add_argument("--size", type=int, default=None,
                      help="image height and width (default 32768; --small: 1024)")
  parser.add_argument("--data", type=pathlib.Path, default=None,
                      help="directory of the zarr stores (default ./gigapixel_data)")
  parser.add_argument("--max-bytes", type=int, default=None,
                      help="jaxtile.stream's budget per tile (default 16 MiB)")
  parser.add_argument("--resume", action="store_true",
                      help="compute only the tiles an interrupted run did not finish")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  size = args.size or (1024 if args.small else 32768)
  if size % 2:
    parser.error(f"--size must be even (the network halves and doubles it), but got {size}")
  max_bytes = args.max_bytes or 16 * 2**20

  if args.data is None and args.small:
    with tempfile.TemporaryDirectory(prefix="gigapixel-") as tmp:
      return run(pathlib.Path(tmp), size, max_bytes, args)
  return run(args.data or pathlib.Path("gigapixel_data"), size, max_bytes, args)


def run(data: pathlib.Path, size: int, max_bytes: int, args) -> None:
  data.mkdir(parents=True, exist_ok=True)
  image = open_image(data / f"image_{size}.zarr", size)
  params = init_params()
  print(f"image {image.shape} {image.dtype} ({size * size / 1e9:.2f} gigapixels) at "
        f"{data / f'image_{size}.zarr'}; device {jax.devices()[0].device_kind}\n")

  out_path = data / f"output_{size}.zarr"
  chunk = min(OUT_CHUNK, size)
  if args.resume and out_path.exists():
    out = zarr.open_array(out_path, mode="r+")
  else:
    out = zarr.create_array(store=out_path, shape=(1, size, size, 1),
                            chunks=(1, chunk, chunk, 1), dtype="float32", overwrite=True)

  streamed = jaxtile.stream(network, max_bytes=max_bytes)
  plan = streamed.explain(image, params, out=out)
  print(plan, "\n")

  start = time.perf_counter()
  streamed(image, params, out=out, resume=args.resume, progress=not args.no_progress)
  wall = time.perf_counter() - start
  stats = streamed.last_stats
  megapixels = stats.tiles / plan.n_tiles * size * size / 1e6
  print(f"\nstreamed {stats.tiles} tiles ({stats.skipped} skipped, already done) in "
        f"{stats.seconds:.1f} s (planning and compiling included: {wall:.1f} s): "
        f"{megapixels / max(stats.seconds, 1e-9):.1f} Mpx/s; waited {stats.read_wait:.2f} s for "
        f"reads")

  # Device memory: the compiled tile program (its arguments, output and temporaries) plus the
  # tiles in flight beside it: up to 3 output tiles queued for or being written, and the next
  # tile's input window.
  stage0 = plan.stages[0]
  window = math.prod(stage0.width[stage0.inputs[0]]) * 3  # uint8, 3 channels
  out_tile = math.prod(plan.tile) * 4  # float32, 1 channel
  estimate = plan.device_bytes + 3 * out_tile + window
  print(f"device memory: tile program {plan.device_bytes / 2**20:.1f} MiB + tiles in flight "
        f"{(3 * out_tile + window) / 2**20:.1f} MiB = {estimate / 2**20:.1f} MiB (estimate); "
        f"the image is {image.nbytes / 2**20:.0f} MiB, the output {out.nbytes / 2**20:.0f} MiB")
  memory_stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in memory_stats:
    print(f"device peak_bytes_in_use: {memory_stats['peak_bytes_in_use'] / 2**20:.1f} MiB")

  if args.small:
    whole = jax.jit(network)(jnp.asarray(image[...]), params)
    streamed_out = out[...]
    max_abs = np.abs(streamed_out - np.asarray(whole)).max()
    print(f"streamed vs untiled network on the whole image: max abs diff {max_abs:.2e}")
    np.testing.assert_allclose(streamed_out, np.asarray(whole), rtol=1e-5, atol=1e-5)
    assert stats.tiles + stats.skipped == plan.n_tiles > 1, (stats, plan.n_tiles)
    print("OK")


if __name__ == "__main__":
  main()
