"""A diffusion VAE decoder (flax linen, GroupNorm residual blocks) tiled by jaxtile.

    python examples/flax_vae_decoder.py          # 1x256x256x4 latent -> 1x1024x1024x3 image
    python examples/flax_vae_decoder.py --small  # 1x32x32x4 latent -> 1x128x128x3, seconds

The decoder has the shape of the ones latent diffusion models use (diffusers'
`FlaxAutoencoderKL`, at a smaller width): a 3x3 conv in, residual blocks of GroupNorm, silu and
3x3 conv twice plus the skip, nearest-neighbour upsampling by 2 followed by a conv, and a norm,
silu and conv out. Every GroupNorm cuts an untiled-per-layer view of the network; with jaxtile
each residual block is one region whose second norm's statistics are a pass over the tiles of
the block's first conv (`jaxtile.explain` prints "statistics passes"), and each upsampling
(`jax.image.resize(..., "nearest")`) is a stage of the region holding the conv after it and the
next block: no activation inside a block, and no upsampled one, exists at full size. The example prints the report and the compiled temporaries tiled and
untiled, compares the outputs and exits non-zero if they differ by more than float32 rounding.
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


class ResBlock(nn.Module):
  """GroupNorm, silu, 3x3 conv, twice, plus the input (through a 1x1 conv where widths differ)."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(self.groups)(x)))
    h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(self.groups)(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1))(x)
    return x + h


class Decoder(nn.Module):
  """Latent -> image: conv in, a block per level, each level but the last upsampled by 2."""
  widths: Sequence[int]
  groups: int

  @nn.compact
  def __call__(self, z):
    x = nn.Conv(self.widths[0], (3, 3))(z)
    for level, width in enumerate(self.widths):
      x = ResBlock(width, self.groups)(x)
      if level + 1 < len(self.widths):
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="nearest")
        x = nn.Conv(width, (3, 3))(x)
    x = nn.silu(nn.GroupNorm(self.groups)(x))
    return nn.Conv(3, (3, 3))(x)


def random_params(model, z, seed=1):
  """Parameters drawn with NumPy (N(0, 1/fan_in) weights; norms' scales near 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return jnp.asarray(1 + rng.standard_normal(leaf.shape) / 10, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 10
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0), z))


def temporaries(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="32x32 latent, widths 32/16/16")
  args = parser.parse_args(argv)
  if args.small:
    size, widths, groups, max_bytes = 32, (32, 16, 16), 8, 2**18
  else:
    size, widths, groups, max_bytes = 256, (128, 64, 32), 32, 16 * 2**20

  model = Decoder(widths=widths, groups=groups)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, 4)), jnp.float32)
  params = random_params(model, z)
  tiled_fn = jaxtile.tile_convs(model.apply, max_bytes=max_bytes)
  report = jaxtile.explain(tiled_fn)(params, z)
  print(f"decoder widths {widths} on a {z.shape} latent\n")
  print(report)
  passes = sum(r.statistics for r in report.regions)
  upsamplings = sum(r.upsamplings for r in report.regions)
  print(f"\n{len(report.regions)} regions, {passes} statistics passes, {upsamplings} "
        f"upsamplings inside regions; temporaries "
        f"{temporaries(tiled_fn, params, z):.0f} MiB tiled, "
        f"{temporaries(model.apply, params, z):.0f} MiB untiled")
  assert passes, "expected the residual blocks' norms as statistics passes"
  assert upsamplings, "expected the upsamplings inside regions"

  start = time.perf_counter()
  tiled = np.asarray(jax.jit(tiled_fn)(params, z), np.float64)
  t_tiled = time.perf_counter() - start
  start = time.perf_counter()
  untiled = np.asarray(jax.jit(model.apply)(params, z), np.float64)
  t_untiled = time.perf_counter() - start
  rel_l2 = np.linalg.norm(tiled - untiled) / np.linalg.norm(untiled)
  print(f"tiled vs untiled: max abs error {np.abs(tiled - untiled).max():.3e}, relative L2 "
        f"error {rel_l2:.3e}; compile + run: tiled {t_tiled:.1f} s, untiled {t_untiled:.1f} s")
  if not rel_l2 < 1e-5:
    raise SystemExit(f"FAIL: relative L2 error {rel_l2:.3e} is not below 1e-5")
  print("OK")


if __name__ == "__main__":
  main()
