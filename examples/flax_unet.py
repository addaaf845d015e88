"""A flax (linen) UNet on a high-resolution image, with its large convs tiled by jaxtile.

    python examples/flax_unet.py          # 1x2048x2048x3 image, widths 32/64/128 (1-2 min, CPU)
    python examples/flax_unet.py --small  # 1x128x128x3 image, widths 8/16/32, seconds

The model is an ordinary `flax.linen` module; nothing in it knows about jaxtile. The example runs
`jax.jit(jaxtile.tile_convs(model.apply, max_bytes=...))`, which rewrites every conv of the
forward pass whose working set is above `max_bytes` into tiles (here all but the smallest, at the
bottom of the UNet, which fits and stays as it is: strided downsampling convs and transposed
upsampling convs are tiled like the others). It prints the report, compares the output with the
untiled model's and exits non-zero if they differ by more than float32 rounding.
It needs flax (`pip install -e ".[examples]"`).
"""

import argparse
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxtile


class ConvBlock(nn.Module):
  """Two 3x3 convs with ReLU, the building block of every UNet level."""
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return nn.relu(nn.Conv(self.features, (3, 3))(x))


class UNet(nn.Module):
  """Encoder (strided-conv downsampling), bottleneck, decoder (transposed convs) with skips."""
  widths: Sequence[int]
  out_channels: int

  @nn.compact
  def __call__(self, x):
    skips = []
    for width in self.widths[:-1]:
      x = ConvBlock(width)(x)
      skips.append(x)
      x = nn.Conv(width, (3, 3), strides=(2, 2))(x)  # downsample by 2
    x = ConvBlock(self.widths[-1])(x)
    for width, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      x = nn.ConvTranspose(width, (2, 2), strides=(2, 2))(x)  # upsample by 2
      x = ConvBlock(width)(jnp.concatenate([x, skip], axis=-1))
    return nn.Conv(self.out_channels, (1, 1))(x)


def random_params(model, x, seed=1):
  """Parameters of `model` for input `x`, drawn with NumPy: N(0, 1/fan_in) weights, small biases.

  (`model.init` gives the same structure; drawing with NumPy only avoids compiling flax's
  initializers, which takes seconds on a CPU.)
  """
  rng = np.random.default_rng(seed)
  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 10
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
  return jax.tree.map(draw, jax.eval_shape(model.init, jax.random.key(0), x))


def timed(fn, *args):
  out = fn(*args).block_until_ready()  # compile and warm up
  start = time.perf_counter()
  out = fn(*args).block_until_ready()
  return out, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="128x128 image, widths 8/16/32")
  args = parser.parse_args(argv)
  if args.small:
    size, widths, max_bytes = 128, (8, 16, 32), 2**18  # 256 KiB per elemental conv
  else:
    size, widths, max_bytes = 2048, (32, 64, 128), 2**28  # 256 MiB per elemental conv

  model = UNet(widths=widths, out_channels=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, 3)), jnp.float32)
  params = random_params(model, x)
  print(f"UNet widths {widths} on a {x.shape} image\n")  # the report's header gives the budget

  report = jaxtile.explain(model.apply, max_bytes=max_bytes)(params, x)
  print(report)
  print(f"\n{len(report.tiled)} of {len(report.convs)} convs tiled, "
        f"{sum(c.n_elemental for c in report.tiled)} elemental convs in all")
  assert report.tiled, "expected the full-resolution convs to be tiled"

  tiled, t_tiled = timed(jax.jit(jaxtile.tile_convs(model.apply, max_bytes=max_bytes)), params, x)
  untiled, t_untiled = timed(jax.jit(model.apply), params, x)
  diff = np.asarray(tiled, np.float64) - np.asarray(untiled, np.float64)
  max_abs = np.abs(diff).max()
  rel_l2 = np.linalg.norm(diff) / np.linalg.norm(np.asarray(untiled, np.float64))
  print(f"tiled vs untiled model: max abs error {max_abs:.3e}, relative L2 error {rel_l2:.3e}")
  print(f"time: tiled {t_tiled:.3f} s, untiled {t_untiled:.3f} s")
  if not rel_l2 < 1e-5:
    raise SystemExit(f"FAIL: relative L2 error {rel_l2:.3e} is not below 1e-5")
  print("OK")


if __name__ == "__main__":
  main()
