"""The GPU figures of issues 9 and 10 in one short run: memory, time ratios, streaming.

    python benchmarks/gpu.py            # on a machine with a GPU (a few minutes)
    python benchmarks/gpu.py --quick    # smaller sizes, to try the script on a CPU

Prints Markdown tables. Temporaries are XLA's buffer assignment of the compiled program
(`memory_analysis().temp_size_in_bytes`; on GPU it includes cuDNN's workspace); times are
medians of alternating runs (untiled, tiled, untiled, ...) after a warm-up, ratios tiled /
untiled. Sections: the 8-layer conv + ReLU chain (forward and gradient), the flax UNet of
`examples/flax_unet.py` (forward and gradient, compile time too), and `jaxtile.stream` on the
test network of `tests/stream_worker.py` against the untiled program.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxtile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
MiB = 2**20
DN = ("NHWC", "HWIO", "NHWC")


def temp_mib(fn, *args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes / MiB, seconds


def alternate(fns, args, repeats):
  """Median seconds per function over `repeats` alternating runs, and each one's output."""
  jitted = [jax.jit(f) for f in fns]
  outs = [jax.block_until_ready(f(*args)) for f in jitted]  # compile + warm-up
  times = [[] for _ in fns]
  for _ in range(repeats):
    for f, t in zip(jitted, times):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times], outs


def max_rel(a, b):
  a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def chain(size: int, layers: int = 8, channels: int = 32):
  def f(x, ws):
    for w in ws:
      x = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))
    return x
  keys = jax.random.split(jax.random.key(0), layers + 1)
  x = jax.random.normal(keys[0], (1, size, size, channels))
  ws = [jax.random.normal(k, (3, 3, channels, channels)) / 17 for k in keys[1:]]
  return f, (x, ws)


def chain_tables(quick: bool, repeats: int) -> None:
  print("\n### Chain: 8 x (3x3 conv 32->32 + ReLU), float32\n")
  print("| program | size | max_bytes MiB | untiled temp MiB | tiled temp MiB | tiled / untiled "
        "time | max rel diff |")
  print("|---|--:|--:|--:|--:|--:|--:|")
  for size, budget in ([(256, 1)] if quick else [(1024, 4), (512, 8), (512, 2)]):
    f, args = chain(size)
    tiled = jaxtile.tile_convs(f, max_bytes=budget * MiB)
    (t_u, _), (t_t, _) = temp_mib(f, *args), temp_mib(tiled, *args)
    (s_u, s_t), (o_u, o_t) = alternate([f, tiled], args, repeats)
    print(f"| forward | {size} | {budget} | {t_u:.0f} | {t_t:.0f} | {s_t / s_u:.2f} | "
          f"{max_rel(o_t, o_u):.1e} |", flush=True)
  size, budget = (256, 1) if quick else (512, 1)
  f, args = chain(size)
  grad = lambda fn: jax.grad(lambda x, ws: jnp.sum(fn(x, ws)), argnums=(0, 1))
  g_u, g_t = grad(f), grad(jaxtile.tile_convs(f, max_bytes=budget * MiB))
  (t_u, _), (t_t, _) = temp_mib(g_u, *args), temp_mib(g_t, *args)
  (s_u, s_t), (o_u, o_t) = alternate([g_u, g_t], args, repeats)
  err = max(max_rel(a, b) for a, b in zip(jax.tree.leaves(o_t), jax.tree.leaves(o_u)))
  print(f"| gradient | {size} | {budget} | {t_u:.0f} | {t_t:.0f} | {s_t / s_u:.2f} | "
        f"{err:.1e} |", flush=True)


def unet_table(quick: bool, repeats: int) -> None:
  try:
    import flax_unet
  except ImportError as e:
    print(f"\n(flax UNet skipped: {e})")
    return
  size = 256 if quick else 2048
  model = flax_unet.UNet(widths=(32, 64, 128), out_channels=2)
  x = jax.random.normal(jax.random.key(1), (1, size, size, 3))
  params = model.init(jax.random.key(0), x)
  tiled = jaxtile.tile_convs(model.apply, max_bytes=16 * MiB)
  grad = lambda fn: jax.grad(lambda p, x: fn(p, x).sum())
  print(f"\n### flax UNet (examples/flax_unet.py), 1x{size}x{size}x3, widths 32/64/128, "
        "max_bytes 16 MiB\n")
  print("| program | untiled temp MiB | tiled temp MiB | temp ratio | untiled compile s | "
        "tiled compile s | tiled / untiled time | max rel diff |")
  print("|---|--:|--:|--:|--:|--:|--:|--:|")
  for name, (u, t) in [("forward", (model.apply, tiled)),
                       ("gradient", (grad(model.apply), grad(tiled)))]:
    (t_u, c_u), (t_t, c_t) = temp_mib(u, params, x), temp_mib(t, params, x)
    (s_u, s_t), (o_u, o_t) = alternate([u, t], (params, x), repeats)
    err = max(max_rel(a, b) for a, b in zip(jax.tree.leaves(o_t), jax.tree.leaves(o_u)))
    print(f"| {name} | {t_u:.0f} | {t_t:.0f} | {t_t / t_u:.2f} | {c_u:.1f} | {c_t:.1f} | "
          f"{s_t / s_u:.2f} | {err:.1e} |", flush=True)


def stream_table(quick: bool) -> None:
  import stream_worker
  f = stream_worker.network()
  size = 512 if quick else 4096
  image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  whole_fn = jax.jit(f)
  whole = np.asarray(whole_fn(jnp.asarray(image)))
  start = time.perf_counter()
  whole = np.asarray(whole_fn(jnp.asarray(image)))
  whole_s = time.perf_counter() - start
  print(f"\n### stream: tests/stream_worker.py's network on 1x{size}x{size}x3 uint8, host "
        "NumPy in and out\n")
  print("| max_bytes MiB | tiles | tile | device bytes MiB | streamed s | untiled (device "
        "array, incl. transfer) s | Mpx/s | max rel diff |")
  print("|--:|--:|--:|--:|--:|--:|--:|--:|")
  for budget in ([1] if quick else [64, 16]):
    streamed = jaxtile.stream(f, max_bytes=budget * MiB)
    plan = streamed.explain(image)
    streamed(image, progress=False)  # compiles
    out = streamed(image, progress=False)
    stats = streamed.last_stats
    print(f"| {budget} | {plan.n_tiles} | {'x'.join(map(str, plan.tile))} | "
          f"{plan.device_bytes / MiB:.1f} | {stats.seconds:.2f} | {whole_s:.2f} | "
          f"{stats.megapixels_per_second:.0f} | {max_rel(out, whole):.1e} |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="chain,unet,stream")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind}; "
        f"command: python benchmarks/gpu.py {' '.join(argv or sys.argv[1:])}")
  only = args.only.split(",")
  if "stream" in only:
    stream_table(args.quick)
  if "chain" in only:
    chain_tables(args.quick, args.repeats)
  if "unet" in only:
    unet_table(args.quick, args.repeats)


if __name__ == "__main__":
  main()
