"""Error of each kind of split against the float64 NumPy reference, per dtype.

    python benchmarks/accuracy.py          # forward splits
    python benchmarks/accuracy.py --grad   # gradients in half precision vs the tile count
    python benchmarks/accuracy.py --model  # a whole UNet's gradient in bfloat16 (needs flax)

Prints a Markdown table (docs/accuracy.md holds its last output): max abs error and relative L2
error of the monolithic conv and of the tiled program, for a 1x64x64x64 -> 64 3x3 SAME conv;
with --grad, relative L2 error of d/dx and d/dw of a 1x128x128x16 -> 16 3x3 SAME conv in
bfloat16 and float16 against the float32 gradient, untiled and at 4, 16 and 64 tiles; with
--model, relative L2 error of each parameter's gradient of examples/flax_unet.py's small UNet in
bfloat16 against the same program in float32, untiled and tiled.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxtile

SPLITS = {
    "monolithic (lax)": None,
    "spatial 4x4 tiles": dict(tile_shape=(16, 16)),
    "batch 1 per piece": dict(batch_block=1, tile_shape=(32, 64)),
    "out channels 4 blocks": dict(channel_block=(None, 16)),
    "in channels 4 blocks": dict(channel_block=(16, None)),
    "in channels 16 blocks": dict(channel_block=(4, None)),
    "4x4 tiles x 4x4 channel blocks": dict(tile_shape=(16, 16), channel_block=(16, 16)),
}


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  rng = np.random.default_rng(0)
  x64 = rng.standard_normal((2, 64, 64, 64))
  w64 = rng.standard_normal((3, 3, 64, 64)) / np.sqrt(9 * 64)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; conv f[2,64,64,64] * "
        f"f[3,3,64,64] SAME; errors against the float64 NumPy reference\n")
  print("| dtype | split | pieces | max abs error | relative L2 error |")
  print("|---|---|---|---|---|")
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    x, w = jnp.asarray(x64, dtype), jnp.asarray(w64, dtype)
    # The reference sees the same rounded inputs, so only the conv's own error is measured.
    want = jaxtile.reference.conv_general_dilated(
        np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for name, policy in SPLITS.items():
      fn = jax.jit(conv if policy is None else jaxtile.tile_convs(conv, **policy))
      pieces = 1 if policy is None else jaxtile.explain(conv, **policy)(x, w).convs[0].n_elemental
      got = np.asarray(fn(x, w), np.float64)
      abs_err = np.abs(got - want).max()
      rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
      print(f"| {jnp.dtype(dtype).name} | {name} | {pieces} | {abs_err:.2e} | {rel_l2:.2e} |")


def gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 128, 128, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) / 12, jnp.float32)
  ct = jnp.asarray(rng.standard_normal((1, 128, 128, 16)), jnp.float32)

  def grads(fn, x, w):
    loss = lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  want = grads(conv, x, w)
  rel = lambda got, want: float(jnp.linalg.norm(got.astype(jnp.float32) - want)
                                / jnp.linalg.norm(want))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d/dx and d/dw of "
        f"sum(conv(x, w) * ct), conv f[1,128,128,16] * f[3,3,16,16] SAME, against float32\n")
  print("| dtype | tiles | d/dx rel L2 | d/dw rel L2 |")
  print("|---|---|---|---|")
  for dtype in (jnp.bfloat16, jnp.float16):
    for tile in (None, 64, 32, 16):
      fn = conv if tile is None else jaxtile.tile_convs(conv, tile_shape=(tile, tile))
      dx, dw = grads(fn, x.astype(dtype), w.astype(dtype))
      tiles = "untiled" if tile is None else (128 // tile) ** 2
      print(f"| {jnp.dtype(dtype).name} | {tiles} | {rel(dx, want[0]):.2e} | "
            f"{rel(dw, want[1]):.2e} |")


def model():
  """A whole network in bfloat16: each parameter's gradient of a mean squared error, untiled and
  tiled (regions, and per conv), against the same untiled program in float32 on the same
  bfloat16-rounded parameters and image."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
  from flax_unet import UNet, random_params  # needs flax

  net = UNet((8, 16, 32), 3)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 128, 128, 3)), jnp.bfloat16)
  target = jnp.asarray(rng.standard_normal((1, 128, 128, 3)), jnp.float32)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(net, x))
  loss = lambda p, x: jnp.mean((net.apply(p, x).astype(jnp.float32) - target) ** 2)
  f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
  want = jax.tree.leaves_with_path(jax.jit(jax.grad(loss))(f32(params), f32(x)))
  max_bytes = 64 << 10
  programs = {"untiled": jax.grad(loss),
              "jax.grad(tile_convs(f))": jax.grad(jaxtile.tile_convs(loss, max_bytes=max_bytes)),
              "per conv (fuse=False)": jax.grad(jaxtile.tile_convs(loss, max_bytes=max_bytes,
                                                                    fuse=False))}
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; examples/flax_unet.py's UNet "
        f"(8, 16, 32) on 1x128x128x3 in bfloat16, max_bytes {max_bytes}; each parameter's "
        f"gradient of a mean squared error, relative L2 error against float32\n")
  print("| program | kernels: median | kernels: max | biases: median | biases: max |")
  print("|---|--:|--:|--:|--:|")
  for name, grad in programs.items():
    got = jax.tree.leaves(jax.jit(grad)(params, x))
    errors = {"kernel": [], "bias": []}
    for (path, w), g in zip(want, got):
      err = float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
      errors[path[-1].key].append(err)
    cells = [f"{f(errors[k]):.2e}" for k in ("kernel", "bias") for f in (np.median, np.max)]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  args = sys.argv[1:]
  gradients() if "--grad" in args else model() if "--model" in args else main()
