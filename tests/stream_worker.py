"""Child processes of `test_stream.py`: a streamed run killed midway, and a 2-process run.

    python tests/stream_worker.py kill --out OUT.npy --after N
    python tests/stream_worker.py multihost --coordinator 127.0.0.1:PORT --num-processes 2 \\
        --process-id I --out OUT.zarr

`kill` streams `network()` over `image()` into the .npy memmap OUT (made by the test) and, while
writing the N-th tile, writes half of it and kills itself with SIGKILL: an interruption in the
middle of a tile write, as a crash or a cluster's preemption would leave it. `multihost` joins a
`jax.distributed` job (gloo CPU collectives) and streams its share of tiles into the shared zarr
array OUT (made by the test).

Importing this module does not import jax; `network` and `image` are what both sides stream.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

#: Output tile of the streamed runs: 4 x 3 = 12 tiles of the 1x64x48 output, chunk-aligned.
TILE = (16, 16)
SHAPE = (1, 64, 48, 3)


def image() -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)


def network():
  """uint8 image -> float32, through a strided and a transposed conv (two stages)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  dn = ("NHWC", "HWIO", "NHWC")
  keys = jax.random.split(jax.random.key(1), 4)
  w1 = jax.random.normal(keys[0], (3, 3, 3, 8)) * 0.3
  w2 = jax.random.normal(keys[1], (3, 3, 8, 8)) * 0.3
  wt = jax.random.normal(keys[2], (4, 4, 8, 4)) * 0.3
  w3 = jax.random.normal(keys[3], (3, 3, 4, 2)) * 0.3

  def f(x):
    x = x.astype(jnp.float32) / 255
    y = jax.nn.relu(lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=dn))
    y = jax.nn.relu(lax.conv_general_dilated(y, w2, (2, 2), "SAME", dimension_numbers=dn))
    y = jax.nn.relu(lax.conv_transpose(y, wt, (2, 2), "SAME", dimension_numbers=dn))
    return lax.conv_general_dilated(y, w3, (1, 1), "SAME", dimension_numbers=dn)
  return f


class _KillMidWrite:
  """A sink that writes half of its `after`-th block, then kills the process."""

  def __init__(self, out, after: int):
    self.out, self.after, self.writes = out, after, 0
    self.shape, self.dtype = out.shape, out.dtype

  def __setitem__(self, index, block):
    self.writes += 1
    if self.writes == self.after:
      half = list(index)
      rows = half[1]
      half[1] = slice(rows.start, rows.start + (rows.stop - rows.start) // 2)
      self.out[tuple(half)] = block[:, :(rows.stop - rows.start) // 2]
      self.out.flush()
      os.kill(os.getpid(), signal.SIGKILL)
    self.out[index] = block


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["kill", "multihost"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--after", type=int, default=5)
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args = parser.parse_args(argv)
  import jax
  import jaxtile
  if args.mode == "kill":
    out = np.load(args.out, mmap_mode="r+")
    streamed = jaxtile.stream(network(), tile_shape=TILE, prefetch=1)
    streamed(image(), out=_KillMidWrite(out, args.after), journal=args.out + ".jaxtile",
             progress=False)
    return 3  # not reached: the kill comes first
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)
  import zarr
  out = zarr.open_array(args.out, mode="r+")
  streamed = jaxtile.stream(network(), tile_shape=TILE)
  streamed(image(), out=out, progress=False)
  print(f"process {jax.process_index()}: {streamed.last_stats.tiles} tiles", flush=True)
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("jaxtile stream done")  # both wrote their tiles
  return 0


if __name__ == "__main__":
  sys.exit(main())
