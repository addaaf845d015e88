"""The paper's headline case: a 1024x1024 image, 3x3 kernels, 1024 -> 1024 channels, split into
64 spatial tiles of 128x128 and 8 x 8 channel blocks of 128: 4096 elemental convs.

    python examples/paper_case.py            # full size (4 GiB per activation; minutes on a CPU)
    python examples/paper_case.py --small    # the same split structure at 1/8 the size, seconds

It explains the plan, runs the tiled and the monolithic conv, checks them against each other and a
corner of the output against the float64 NumPy reference, and prints errors and times.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtile


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def timed(fn, *args):
  out = fn(*args).block_until_ready()  # compile and warm up
  start = time.perf_counter()
  out = fn(*args).block_until_ready()
  return out, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="1/8 size: 128x128, 128 channels")
  args = parser.parse_args(argv)
  size, channels = (128, 128) if args.small else (1024, 1024)
  tile, block = size // 8, channels // 8  # 64 tiles, 8 x 8 channel blocks: 4096 pieces

  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (1, size, size, channels), jnp.float32)
  w = jax.random.normal(kw, (3, 3, channels, channels), jnp.float32) / np.sqrt(9 * channels)

  policy = dict(tile_shape=(tile, tile), channel_block=(block, block))
  report = jaxtile.explain(conv, **policy)(x, w)
  print(report)
  (c,) = report.convs
  print(f"\n{c.n_elemental} elemental convs = {np.prod(c.spatial_tiles)} spatial tiles x "
        f"{c.in_channel_blocks} x {c.out_channel_blocks} channel blocks; "
        f"piece working set {c.tile_bytes / 2**20:.1f} MiB of {c.working_bytes / 2**20:.0f} MiB")

  tiled, t_tiled = timed(jax.jit(jaxtile.tile_convs(conv, **policy)), x, w)
  mono, t_mono = timed(jax.jit(conv), x, w)
  err = np.asarray(jnp.max(jnp.abs(tiled - mono)))
  rel_l2 = np.asarray(jnp.linalg.norm(tiled - mono) / jnp.linalg.norm(mono))
  print(f"tiled vs monolithic: max abs error {err:.3e}, relative L2 error {rel_l2:.3e}")
  print(f"time: tiled {t_tiled:.3f} s, monolithic {t_mono:.3f} s, ratio {t_tiled / t_mono:.2f}")

  # A 16x16 corner against the float64 reference: its outputs only read the 17x17 corner.
  corner = jaxtile.reference.conv_general_dilated(
      np.asarray(x[:, :17, :17]), np.asarray(w), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, :16, :16]
  ref_err = np.abs(np.asarray(tiled[:, :16, :16], np.float64) - corner).max()
  print(f"tiled vs float64 reference (16x16 corner): max abs error {ref_err:.3e}")
  assert rel_l2 < 1e-5 and ref_err < 1e-4, "tiled result does not match"
  print("OK")


if __name__ == "__main__":
  main()
