"""An equinox ResNet on a batch of high-resolution images, with its large convs tiled by jaxtile.

    python examples/equinox_resnet.py          # 2x3x1024x1024 images, widths 32..128 (1 min, CPU)
    python examples/equinox_resnet.py --small  # 2x3x128x128 images, widths 8..32, seconds

The model is a plain `equinox.Module`: a stem conv, residual blocks of two 3x3 `eqx.nn.Conv2d`
(strided blocks with a 1x1 projection on the skip path), and a 1x1 head giving per-pixel class
scores, as a segmentation backbone would. Equinox layers take one unbatched (C, H, W) image, so
the batch is a `jax.vmap`. The model itself is passed to the tiled function as an argument:
`tile_convs` traces its array leaves (the weights) and keeps its other leaves static, as
`equinox.filter_jit` does, so

    jaxtile.tile_convs(lambda model, x: jax.vmap(model)(x), max_bytes=...)(model, x)

works with no wrapping. The example prints the report, runs the tiled and untiled forward passes
and exits non-zero if they differ by more than float32 rounding. It needs equinox
(`pip install -e ".[examples]"`).
"""

import argparse
import time
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxtile


class ResidualBlock(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  projection: Optional[eqx.nn.Conv2d]  # on the skip path when the shape changes

  def __init__(self, in_channels, out_channels, stride, *, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(out_channels, out_channels, 3, padding=1, key=k2)
    reshape = stride != 1 or in_channels != out_channels
    self.projection = (eqx.nn.Conv2d(in_channels, out_channels, 1, stride, key=k3)
                       if reshape else None)

  def __call__(self, x):
    y = self.conv2(jax.nn.relu(self.conv1(x)))
    skip = x if self.projection is None else self.projection(x)
    return jax.nn.relu(y + skip)


class ResNet(eqx.Module):
  stem: eqx.nn.Conv2d
  blocks: list
  head: eqx.nn.Conv2d

  def __init__(self, in_channels, widths, strides, n_classes, *, key):
    keys = jax.random.split(key, len(widths) + 2)  # stem, one per block, head
    self.stem = eqx.nn.Conv2d(in_channels, widths[0], 3, padding=1, key=keys[0])
    self.blocks = [ResidualBlock(c_in, c_out, s, key=k) for c_in, c_out, s, k in
                   zip((widths[0],) + tuple(widths[:-1]), widths, strides, keys[1:-1])]
    self.head = eqx.nn.Conv2d(widths[-1], n_classes, 1, key=keys[-1])

  def __call__(self, x):
    """(C, H, W) image -> (n_classes, H / prod(strides), W / prod(strides)) scores."""
    x = jax.nn.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def forward(model, x):
  return jax.vmap(model)(x)


def random_model(cls, *args, seed=0, **kwargs):
  """`cls(*args, **kwargs, key=...)` with weights drawn by NumPy: N(0, 1/fan_in), small biases.

  The structure comes from `eqx.filter_eval_shape` (nothing is computed); drawing the arrays with
  NumPy only avoids compiling equinox's initialisers, which takes seconds on a CPU.
  """
  rng = np.random.default_rng(seed)
  def draw(leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf  # a static leaf
    fan_in = int(np.prod(leaf.shape[1:])) if leaf.ndim == 4 else 10  # weights (O, I, H, W)
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
  return jax.tree.map(draw, eqx.filter_eval_shape(cls, *args, **kwargs, key=jax.random.key(0)))


def timed(fn, *args):
  out = fn(*args).block_until_ready()  # compile and warm up
  start = time.perf_counter()
  out = fn(*args).block_until_ready()
  return out, time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="2x3x128x128 images, widths 8..32")
  args = parser.parse_args(argv)
  if args.small:
    size, widths, max_bytes = 128, (8, 8, 16, 32), 2**18  # 256 KiB per elemental conv
  else:
    size, widths, max_bytes = 1024, (32, 32, 64, 128), 2**26  # 64 MiB per elemental conv

  model = random_model(ResNet, 3, widths, strides=(1, 1, 2, 2), n_classes=5)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, size, size)), jnp.float32)
  print(f"ResNet widths {widths} on a batch {x.shape}\n")  # the report's header gives the budget

  report = jaxtile.explain(forward, max_bytes=max_bytes)(model, x)
  print(report)
  print(f"\n{len(report.tiled)} of {len(report.convs)} convs tiled, "
        f"{sum(c.n_elemental for c in report.tiled)} elemental convs in all")
  assert report.tiled, "expected the full-resolution convs to be tiled"

  # tile_convs compiles what it runs (like eqx.filter_jit), so it needs no jit around it.
  tiled, t_tiled = timed(jaxtile.tile_convs(forward, max_bytes=max_bytes), model, x)
  untiled, t_untiled = timed(eqx.filter_jit(forward), model, x)
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
