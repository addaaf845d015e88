"""Per-leaf accuracy of the chain gradient, tiled and untiled float32, against float64 (GPU check).

    python benchmarks/gpu_grad_check.py
"""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from jax import lax
import jaxtile

DN = ("NHWC", "HWIO", "NHWC")


def f(x, ws):
  for w in ws:
    x = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))
  return x


def main():
  keys = jax.random.split(jax.random.key(0), 9)
  x = jax.random.normal(keys[0], (1, 512, 512, 32), jnp.float32)
  ws = [jax.random.normal(k, (3, 3, 32, 32), jnp.float32) / 17 for k in keys[1:]]
  grad = lambda fn: jax.jit(jax.grad(lambda x, ws: jnp.sum(fn(x, ws)), argnums=(0, 1)))
  truth = grad(f)(x.astype(jnp.float64), [w.astype(jnp.float64) for w in ws])
  truth = jax.tree.leaves(truth)
  programs = {"untiled f32": grad(f),
              "grad(tile_convs) 1MiB": grad(jaxtile.tile_convs(f, max_bytes=2**20)),
              "grad(tile_convs fuse=False) 1MiB": grad(jaxtile.tile_convs(f, max_bytes=2**20,
                                                                           fuse=False)),
              "tile_convs(grad) 1MiB": jax.jit(jaxtile.tile_convs(jax.grad(
                  lambda x, ws: jnp.sum(f(x, ws)), argnums=(0, 1)), max_bytes=2**20)),
              "grad(tile_convs) 8MiB": grad(jaxtile.tile_convs(f, max_bytes=8 * 2**20))}
  names = ["dx"] + [f"dw{i}" for i in range(8)]
  print("| program | " + " | ".join(names) + " |")
  print("|---|" + "--:|" * len(names))
  for name, fn in programs.items():
    got = jax.tree.leaves(fn(x, ws))
    errs = [float(jnp.linalg.norm(g.astype(jnp.float64) - t) / jnp.linalg.norm(t))
            for g, t in zip(got, truth)]
    print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
  main()
