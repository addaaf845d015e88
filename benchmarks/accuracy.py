"""Error of each kind of split against the float64 NumPy reference, per dtype.

    python benchmarks/accuracy.py

Prints a Markdown table (docs/accuracy.md holds its last output): max abs error and relative L2
error of the monolithic conv and of the tiled program, for a 1x64x64x64 -> 64 3x3 SAME conv.
"""

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


if __name__ == "__main__":
  main()
