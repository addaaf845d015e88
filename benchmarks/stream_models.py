"""Whole models streamed from host memory, side by side with the untiled model on the same image.

    python benchmarks/stream_models.py                  # flax UNet at 1024x1024, 3 rounds
    python benchmarks/stream_models.py --model vae      # the flax VAE decoder (GroupNorm)
    python benchmarks/stream_models.py --size 2048 --repeats 2
    python benchmarks/stream_models.py --model equinox-vae --size 512 --memory

With `--memory`, the streamed model runs once into a `.npy` memmap on disk (nothing untiled, so
any size), and the script prints the process's peak anonymous memory during the call (Linux
`RssAnon`, sampled every 5 ms: what the host holds, not counting pages of mapped files, which
the kernel writes back to disk when it needs them) and its peak RSS.

`jaxtile.stream(model.apply, max_bytes=...)(params, image)` against `jax.jit(model.apply)` on the
whole image, N alternating rounds after one warm-up call each (compiling both). A UNet's skips
and a norm's statistics spill to the host between streamed parts of the network (`explain`
prints the parts); the image here is small enough for the untiled model to run, so the two can
be compared. Prints the plan, then a Markdown table: median seconds, the ratio streamed /
untiled and the largest difference. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shlex
import resource
import statistics
import sys
import tempfile
import threading
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import jaxtile  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("unet", "vae", "equinox-vae"), default="unet")
  parser.add_argument("--size", type=int, default=None,
                      help="image side (unet, default 1024) or latent side (vae, default 128)")
  parser.add_argument("--max-bytes", type=int, default=16 * 2**20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory", action="store_true",
                      help="stream once into a memmap and print the peak host memory")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  rng = np.random.default_rng(0)
  if args.model == "unet":
    import flax_unet  # noqa: E402
    size = args.size or 1024
    model = flax_unet.UNet(widths=(32, 64, 128), out_channels=2)
    image = rng.normal(size=(1, size, size, 3)).astype(np.float32)
    label = f"flax UNet widths (32, 64, 128) on 1x{size}x{size}x3"
  elif args.model == "vae":
    import flax_vae_decoder  # noqa: E402
    size = args.size or 128
    model = flax_vae_decoder.Decoder(widths=(128, 64, 32), groups=32)
    image = rng.normal(size=(1, size, size, 4)).astype(np.float32)
    label = (f"flax VAE decoder widths (128, 64, 32), GroupNorm(32), on a 1x{size}x{size}x4 "
             "latent")
  else:
    import equinox as eqx  # noqa: E402
    from whole_models import _equinox_decoder  # noqa: E402
    size = args.size or 128
    arrays, static = eqx.partition(_equinox_decoder(eqx, (128, 64, 32), 32), eqx.is_array)
    apply = lambda p, z: jax.vmap(eqx.combine(p, static))(z)
    model = type("Model", (), {"init": lambda _, key, z: arrays, "apply": staticmethod(apply)})()
    image = rng.normal(size=(1, 4, size, size)).astype(np.float32)
    label = (f"equinox VAE decoder widths (128, 64, 32), GroupNorm(32), under vmap on a "
             f"1x4x{size}x{size} latent")
  params = model.init(jax.random.key(0), image[:, :16, :16])
  print("command: " + shlex.join(["python", "benchmarks/stream_models.py",
                                  *(sys.argv[1:] if argv is None else argv)]))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; "
        f"{label}, max_bytes {args.max_bytes / 2**20:g} MiB; load average "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}\n")
  streamed = jaxtile.stream(model.apply, max_bytes=args.max_bytes)
  print(streamed.explain(params, image), "\n")
  if args.memory:
    _memory(streamed, params, image)
    return
  untiled = jax.jit(model.apply)
  device_params = jax.device_put(params)
  runs = {
      "untiled (jax.jit, image on the device)":
          lambda: np.asarray(untiled(device_params, jax.device_put(image))),
      "streamed (jaxtile.stream, image on the host)":
          lambda: streamed(params, image, progress=False),
  }
  outs = {name: run() for name, run in runs.items()}  # warm-up: compiles both
  times = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  base = statistics.median(next(iter(times.values())))
  diff = float(np.abs(np.subtract(*outs.values())).max())
  print(f"| program | median s | range s | / untiled | max abs diff |")
  print("|---|--:|--:|--:|--:|")
  for name, t in times.items():
    median = statistics.median(t)
    print(f"| {name} | {median:.2f} | {min(t):.2f}-{max(t):.2f} | {median / base:.2f} | "
          f"{diff:.1e} |")
  print(f"\n{args.repeats} alternating rounds after a warm-up each; load average at the end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


def _anonymous_mib() -> float:
  with open("/proc/self/status") as status:
    return int(status.read().split("RssAnon:")[1].split()[0]) / 1024


def _memory(streamed, params, image):
  """One streamed call into a memmap on disk, with the peak anonymous memory sampled."""
  out_aval = jax.eval_shape(streamed.fun, params, image)
  peak, done = [0.0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _anonymous_mib())
      time.sleep(0.005)

  with tempfile.TemporaryDirectory() as tmp:
    out = np.lib.format.open_memmap(pathlib.Path(tmp) / "out.npy", mode="w+",
                                    dtype=out_aval.dtype, shape=out_aval.shape)
    before = _anonymous_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    streamed(params, image, out=out, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"streamed into a memmap in {seconds:.1f} s (compiling included): anonymous memory "
        f"{before:.0f} MiB before the call, peak {peak[0]:.0f} MiB (+{peak[0] - before:.0f}); "
        f"peak RSS with mapped files {rss:.0f} MiB; jaxtile from "
        f"{pathlib.Path(jaxtile.__file__).parent.parent}")


if __name__ == "__main__":
  main()
