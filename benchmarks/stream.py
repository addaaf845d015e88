"""Streaming vs compute alone: is the I/O of `jaxtile.stream` hidden behind the device's work?

    python benchmarks/stream.py                   # 8192x8192x3, 16 MiB tiles, 3 repeats (7-10 min
                                                  # on a busy 2-core CPU: 15-30 s a run)
    python benchmarks/stream.py --size 2048 --repeats 2 --no-numpy   # a quick look (~30 s)

Target: streamed time <= 1.15 x the compute-only time of the same tile program on the same tiles.
The network and the synthetic image are `examples/gigapixel.py`'s. In one process, alternating
after one warm-up call each, the benchmark times:

- compute-only: every tile's input window read into memory (NumPy) beforehand, then the jitted
  tile program (`jaxtile._src.stream._program(plan)`) over all tiles, blocking at the end;
- streamed zarr -> zarr: `jaxtile.stream(network)(image, params, out=zarr_out, progress=False)`
  from the zarr image on disk into a fresh zarr store (created before the clock starts);
- streamed numpy -> numpy (unless `--no-numpy`): the same from an in-memory image, `out=None`;

The streamed times are the whole call (analysis, planning, tracing included); `loop s` is
`last_stats.seconds`, the tile loop alone. Afterwards it times, one tile at a time on one thread,
what the streamed runs do besides computing: reading a window from the zarr store, writing a tile
to it, and copying a result to the host. Prints Markdown tables; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shlex
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import zarr

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
import bench  # pylint: disable=g-import-not-at-top
import gigapixel  # pylint: disable=g-import-not-at-top

import jaxtile
from jaxtile._src import api
from jaxtile._src import stream as stream_lib

MiB = 2**20


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=8192, help="image height and width")
  parser.add_argument("--max-bytes", type=int, default=16 * MiB, help="jaxtile.stream's budget")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
  parser.add_argument("--data", type=pathlib.Path, default=None,
                      help="directory for the zarr stores (default: a temporary one)")
  parser.add_argument("--no-numpy", action="store_true", help="skip numpy -> numpy streaming")
  parser.add_argument("--prefetch", type=int, default=None, help="jaxtile.stream's prefetch")
  parser.add_argument("--uncompressed", action="store_true",
                      help="zarr stores without a compressor (default: zarr's, zstd)")
  return parser.parse_args(argv)


def cpu_seconds() -> float:
  """User + system CPU seconds of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


class Case:
  """The image, the plan and the tile program, shared by every timed variant."""

  def __init__(self, data: pathlib.Path, size: int, max_bytes: int, prefetch: int,
               compressors):
    self.size, self.data, self.compressors = size, data, compressors
    suffix = "" if compressors == "auto" else "_uncompressed"
    self.image = gigapixel.open_image(data / f"image_{size}{suffix}.zarr", size, compressors)
    self.image_np = self.image[...]
    self.params = gigapixel.init_params()
    self.out_path = data / f"stream_bench_out_{size}.zarr"
    self.streamed = jaxtile.stream(gigapixel.network, max_bytes=max_bytes, prefetch=prefetch)
    out = self.new_out()
    # The plan the streamed run makes: same function, arguments, budget and output chunks.
    self.analysis, leaves = stream_lib._analyse(gigapixel.network, (self.image, self.params), None)
    self.plan = stream_lib.make_plan(self.analysis, api.make_policy(max_bytes=max_bytes)(),
                                     out.chunks)
    self.program = stream_lib._program(self.plan)
    # The small operands as the tile program takes them (per stage, or per chain of stages).
    stages = getattr(self.plan, "chain", None) or self.plan.stages
    self.smalls = jax.device_put(stream_lib._smalls(self.analysis, leaves, stages))
    self.tiles = []
    for t in range(self.plan.n_tiles):
      offsets = self.plan.offsets(self.plan.tile_index(t))
      windows = stream_lib.tile_windows(self.plan, offsets, self.reader(self.image_np))
      self.tiles.append((windows, [np.asarray(o, np.int32) for o in offsets]))

  @staticmethod
  def reader(source):
    """`stream_lib.tile_windows`'s `read` from `source` (every image of the network is it)."""
    return lambda v, starts, widths, spatial: stream_lib.read_window(source, starts, widths,
                                                                     spatial)

  def new_out(self) -> zarr.Array:
    chunk = min(gigapixel.OUT_CHUNK, self.size)
    return zarr.create_array(store=self.out_path, shape=(1, self.size, self.size, 1),
                             chunks=(1, chunk, chunk, 1), dtype="float32",
                             compressors=self.compressors, overwrite=True)

  # The timed variants: each returns (seconds, last_stats or None).
  def compute_only(self):
    start = time.perf_counter()
    ys = [self.program(windows, self.smalls, offsets) for windows, offsets in self.tiles]
    jax.block_until_ready(ys)
    return time.perf_counter() - start, None

  def streamed_zarr(self):
    out = self.new_out()
    start = time.perf_counter()
    self.streamed(self.image, self.params, out=out, progress=False)
    return time.perf_counter() - start, self.streamed.last_stats

  def streamed_numpy(self):
    start = time.perf_counter()
    self.streamed(self.image_np, self.params, progress=False)
    return time.perf_counter() - start, self.streamed.last_stats

  def per_tile_costs(self, n: int = 16) -> list[tuple[str, float]]:
    """Mean seconds per tile of each thing a streamed run does, one tile at a time, one thread."""
    plan = self.plan
    picks = [round(i * (plan.n_tiles - 1) / max(n - 1, 1)) for i in range(min(n, plan.n_tiles))]
    out = self.new_out()
    costs = {"compute (program, blocked)": 0.0, "read window from zarr": 0.0,
             "read window from numpy": 0.0, "result to host (np.asarray)": 0.0,
             "write tile to zarr": 0.0}
    for t in picks:
      windows, offsets = self.tiles[t]
      start = time.perf_counter()
      stream_lib.tile_windows(plan, offsets, self.reader(self.image))
      costs["read window from zarr"] += time.perf_counter() - start
      start = time.perf_counter()
      stream_lib.tile_windows(plan, offsets, self.reader(self.image_np))
      costs["read window from numpy"] += time.perf_counter() - start
      start = time.perf_counter()
      y = self.program(windows, self.smalls, offsets).block_until_ready()
      costs["compute (program, blocked)"] += time.perf_counter() - start
      start = time.perf_counter()
      tile = np.asarray(y)
      costs["result to host (np.asarray)"] += time.perf_counter() - start
      begin, stop = plan.write_box(plan.tile_index(t))
      box = tuple(slice(b - o, e - o) for b, e, o in zip(begin, stop, offsets[-1]))
      target = tuple(slice(b, e) for b, e in zip(begin, stop))
      start = time.perf_counter()
      out[(slice(None),) + target] = tile[(slice(None),) + box]
      costs["write tile to zarr"] += time.perf_counter() - start
    return [(name, seconds / len(picks)) for name, seconds in costs.items()]


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  device = jax.devices()[0]
  print("command: " + shlex.join(["python"] + sys.argv if argv is None else
                                 ["python", "benchmarks/stream.py", *argv]))
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}, "
        f"jaxtile {jaxtile.__version__}, zarr {zarr.__version__}, {os.cpu_count()} CPU cores; "
        f"load average at start {load()}")
  with tempfile.TemporaryDirectory(prefix="jaxtile-stream-bench-") as tmp:
    data = args.data or pathlib.Path(tmp)
    data.mkdir(parents=True, exist_ok=True)
    case = Case(data, args.size, args.max_bytes, args.prefetch,
                None if args.uncompressed else "auto")
    plan = case.plan
    print(f"\n{plan}\n")

    variants = [("compute-only (windows in memory)", case.compute_only),
                ("streamed zarr -> zarr", case.streamed_zarr)]
    if not args.no_numpy:
      variants.append(("streamed numpy -> numpy", case.streamed_numpy))
    for _, run in variants:  # warm-up: compiles, first touches of the stores
      run()
    times = {name: [] for name, _ in variants}
    cpu = {name: [] for name, _ in variants}
    stats = {name: [] for name, _ in variants}
    loads = [load()]
    for _ in range(args.repeats):
      for name, run in variants:
        before = cpu_seconds()
        seconds, s = run()
        cpu[name].append(cpu_seconds() - before)
        times[name].append(seconds)
        stats[name].append(s)
      loads.append(load())

    megapixels = args.size * args.size / 1e6
    codec = "uncompressed" if args.uncompressed else "zarr's default codec (zstd)"
    base = statistics.median(times[variants[0][0]])
    rows = []
    for name, _ in variants:
      t = times[name]
      s = [x for x in stats[name] if x is not None]
      loop = statistics.median(x.seconds for x in s) if s else None
      wait = statistics.median(x.read_wait for x in s) if s else None
      median = statistics.median(t)
      busy = statistics.median(c / w for c, w in zip(cpu[name], t))
      rows.append([name, f"{median:.2f}", f"{min(t):.2f}-{max(t):.2f}",
                   "-" if loop is None else f"{loop:.2f}", "-" if wait is None else f"{wait:.2f}",
                   f"{statistics.median(cpu[name]):.1f}", f"{busy:.2f}",
                   f"{median / base:.2f}", f"{megapixels / median:.2f}"])
    bench.print_table(
        f"Streaming {args.size}x{args.size}x3 uint8 through examples/gigapixel.py's network, "
        f"{plan.n_tiles} tiles of {'x'.join(map(str, plan.tile))}, median of {args.repeats} "
        "alternating runs",
        ["variant", "s", "range s", "loop s", "read_wait s", "CPU s", "cores busy",
         "/ compute-only", "Mpx/s"], rows,
        notes=[f"Target: streamed / compute-only <= 1.15. s: median wall seconds of the whole "
               "call; CPU s: this process's user + system seconds, all threads; cores busy: CPU "
               f"s / s. Stores: {codec}. Load average (1/5/15 min) after each round: "
               f"{', '.join(loads)}."])

    costs = case.per_tile_costs()
    compute = costs[0][1]
    bench.print_table(
        "Per tile, one at a time on one thread (mean of 16 tiles)",
        ["step", "ms", "/ compute"],
        [[name, bench.ms(seconds), f"{seconds / compute:.2f}"] for name, seconds in costs])
    print(f"\nload average at end {load()}")


if __name__ == "__main__":
  main()
