"""A 3-D conv on a medical-imaging-sized volume, tiled in depth, height and width.

    python examples/volume3d.py          # 1x256x256x256x8 -> 16 channels, 3x3x3 kernel: 64 tiles
                                         # of 64^3 (1.5 GiB working set; about 2 minutes, CPU)
    python examples/volume3d.py --small  # 1x32x32x32x4 -> 8 channels: 64 tiles of 8^3, seconds

A 256^3 CT or MRI volume with 8 feature channels is 512 MiB in float32 and the conv's output twice
that. `tile_shape` asks for cubic output tiles, so every spatial dim is split (each tile reads its
64^3 block plus a one-voxel halo on every side). The example prints the plan, checks that all
three dims are split, runs the tiled and the monolithic conv, compares them, and compares one
corner of the output with the float64 NumPy reference. It exits non-zero on a mismatch.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtile

DN = ("NDHWC", "DHWIO", "NDHWC")


def conv3d(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=DN)


def timed(fn, *args):
  out = fn(*args).block_until_ready()  # compile and warm up
  start = time.perf_counter()
  out = fn(*args).block_until_ready()
  return out, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="32^3 volume, 4 -> 8 channels")
  args = parser.parse_args(argv)
  size, c_in, c_out = (32, 4, 8) if args.small else (256, 8, 16)
  tile = size // 4  # 4 tiles along each of depth, height and width: 64 pieces

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, size, size, size, c_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, c_in, c_out)) / np.sqrt(27 * c_in), jnp.float32)
  print(f"volume {x.shape} -> {c_out} channels, 3x3x3 kernel, output tiles of {tile}^3\n")

  policy = dict(tile_shape=(tile, tile, tile))
  report = jaxtile.explain(conv3d, **policy)(x, w)
  print(report)
  (c,) = report.convs
  print(f"\n{c.n_elemental} elemental convs, tiles per dim (D, H, W) = {c.spatial_tiles}; piece "
        f"working set {c.tile_bytes / 2**20:.2f} MiB of {c.working_bytes / 2**20:.1f} MiB")
  assert len(c.spatial_tiles) == 3 and all(t > 1 for t in c.spatial_tiles), (
      f"expected depth, height and width all split, got tiles {c.spatial_tiles}")
  # For comparison: a budget alone lets the planner choose, and it prefers thin slabs of the outer
  # dims (contiguous, fast) until their halo costs clearly more than cubes'.
  budget_only = jaxtile.explain(conv3d, max_bytes=c.tile_bytes)(x, w).convs[0]
  print(f"(max_bytes={c.tile_bytes} alone would give tiles {budget_only.spatial_tiles})\n")

  tiled, t_tiled = timed(jax.jit(jaxtile.tile_convs(conv3d, **policy)), x, w)
  mono, t_mono = timed(jax.jit(conv3d), x, w)
  diff = np.asarray(tiled, np.float64) - np.asarray(mono, np.float64)
  max_abs = np.abs(diff).max()
  rel_l2 = np.linalg.norm(diff) / np.linalg.norm(np.asarray(mono, np.float64))
  print(f"tiled vs monolithic: max abs error {max_abs:.3e}, relative L2 error {rel_l2:.3e}")
  print(f"time: tiled {t_tiled:.3f} s, monolithic {t_mono:.3f} s")

  # An 8^3 corner against the float64 reference: with SAME padding it reads only the 9^3 corner.
  corner = jaxtile.reference.conv_general_dilated(
      np.asarray(x[:, :9, :9, :9]), np.asarray(w), (1, 1, 1), "SAME",
      dimension_numbers=DN)[:, :8, :8, :8]
  ref_err = np.abs(np.asarray(tiled[:, :8, :8, :8], np.float64) - corner).max()
  print(f"tiled vs float64 reference (8^3 corner): max abs error {ref_err:.3e}")
  if not (rel_l2 < 1e-5 and ref_err < 1e-4):
    raise SystemExit("FAIL: the tiled conv does not match")
  print("OK")


if __name__ == "__main__":
  main()
