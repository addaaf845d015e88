"""A training step through tiled convs: both ways of combining `jax.grad` with `tile_convs`.

    python examples/training_step.py          # 2x1024x1024x8 batch, 32 channels (minutes, CPU)
    python examples/training_step.py --small  # 2x64x64x4 batch, 8 channels, seconds

The model is three plain `lax.conv_general_dilated` layers (the middle one strided, so its input
gradient is an lhs-dilated conv) and the loss a mean squared error against a half-resolution
target. One step of SGD with momentum, written with `jax.tree.map`, is taken three ways:

  untiled                  jax.value_and_grad(loss)
  grad(tile_convs(loss))   JAX differentiates the tiled forward program, piece by piece
  tile_convs(grad(loss))   the pass also plans and tiles the backward convs (input and weight
                           gradients), which `explain` lists after the forward ones

and the gradients and updated parameters of the tiled steps are compared with the untiled step.
It exits non-zero if any differs by more than float32 rounding. Both forms are exact and bounded
in memory (docs/guide.md, Gradients): the first differentiates each piece inside the forward
loop (with derivatives bound in the backend's fast form), the second plans the backward convs
as convs of their own, with their own pieces. For a whole model the first is the one to use:
strided convs and GroupNorms end the regions of a program JAX has already differentiated, and
what is left is tiled conv by conv, holding about what untiled holds (docs/guide.md,
Gradients).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxtile

DN = ("NHWC", "HWIO", "NHWC")
LEARNING_RATE, MOMENTUM = 0.1, 0.9
# Weight gradients sum over every pixel of the batch (2M terms at full size), and tiling splits
# those sums into blocks, which changes their float32 rounding: about 3e-7 relative at --small
# size and 8e-6 at full size, measured. Updated parameters are compared in absolute terms.
GRAD_RTOL, PARAM_ATOL = 5e-5, 1e-5


def forward(params, x):
  h = jax.lax.conv_general_dilated(x, params["w1"], (1, 1), "SAME", dimension_numbers=DN)
  h = jax.nn.relu(h + params["b1"])
  h = jax.lax.conv_general_dilated(h, params["w2"], (2, 2), "SAME", dimension_numbers=DN)
  h = jax.nn.relu(h + params["b2"])
  return jax.lax.conv_general_dilated(h, params["w3"], (1, 1), "SAME", dimension_numbers=DN)


def loss(params, x, y):
  return jnp.mean((forward(params, x) - y) ** 2)


def make_step(value_and_grad):
  """A jitted SGD-with-momentum step around a `(params, x, y) -> (loss, grads)` function."""
  @jax.jit
  def step(params, velocity, x, y):
    value, grads = value_and_grad(params, x, y)
    velocity = jax.tree.map(lambda v, g: MOMENTUM * v + g, velocity, grads)
    params = jax.tree.map(lambda p, v: p - LEARNING_RATE * v, params, velocity)
    return value, grads, params, velocity
  return step


def init_params(rng, in_channels, channels):
  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
  return {"w1": normal(3, 3, in_channels, channels), "b1": jnp.zeros(channels, jnp.float32),
          "w2": normal(3, 3, channels, channels), "b2": jnp.zeros(channels, jnp.float32),
          "w3": normal(3, 3, channels, in_channels)}


def rel_l2(a, b):
  """Relative L2 distance of two pytrees, leaf by leaf (in float64); the worst leaf."""
  def leaf(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return np.linalg.norm(u - v) / np.linalg.norm(v)
  return max(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def max_abs(a, b):
  """Largest absolute difference over all leaves of two pytrees."""
  def leaf(u, v):
    return np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max()
  return max(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="2x64x64x4 batch, 8 channels")
  args = parser.parse_args(argv)
  if args.small:
    size, in_channels, channels, max_bytes = 64, 4, 8, 2**17  # 128 KiB per elemental conv
  else:
    size, in_channels, channels, max_bytes = 1024, 8, 32, 2**27  # 128 MiB per elemental conv

  rng = np.random.default_rng(0)
  params = init_params(rng, in_channels, channels)
  velocity = jax.tree.map(jnp.zeros_like, params)
  x = jnp.asarray(rng.standard_normal((2, size, size, in_channels)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((2, size // 2, size // 2, in_channels)), jnp.float32)
  print(f"batch {x.shape}, {channels} channels\n")  # the report's header gives the budget

  # The convs of the forward pass and of its gradient: the forward ones first, then the backward
  # ones (input gradients as lhs-dilated convs, weight gradients with batch and features swapped).
  report = jaxtile.explain(jax.grad(loss), max_bytes=max_bytes)(params, x, y)
  print(report)
  n_forward = len(jaxtile.explain(loss, max_bytes=max_bytes)(params, x, y).convs)
  print(f"\n{len(report.convs)} convs ({n_forward} forward, {len(report.convs) - n_forward} "
        f"backward), {len(report.tiled)} tiled\n")
  assert any(c.tiled for c in report.convs[n_forward:]), "expected backward convs to be tiled"

  steps = {
      "untiled": make_step(jax.value_and_grad(loss)),
      "grad(tile_convs(loss))":
          make_step(jax.value_and_grad(jaxtile.tile_convs(loss, max_bytes=max_bytes))),
      "tile_convs(grad(loss))":
          make_step(jaxtile.tile_convs(jax.value_and_grad(loss), max_bytes=max_bytes)),
  }
  results = {}
  for name, step in steps.items():
    jax.block_until_ready(step(params, velocity, x, y))  # compile and warm up
    start = time.perf_counter()
    results[name] = jax.block_until_ready(step(params, velocity, x, y))
    elapsed = time.perf_counter() - start
    print(f"{name:24s} loss {float(results[name][0]):.6f}  step {elapsed:.3f} s")

  _, grads, new_params, _ = results["untiled"]
  ok = True
  for name in list(steps)[1:]:
    _, tiled_grads, tiled_params, _ = results[name]
    g_rel, p_abs = rel_l2(tiled_grads, grads), max_abs(tiled_params, new_params)
    print(f"{name}: gradients max abs error {max_abs(tiled_grads, grads):.3e}, relative L2 "
          f"error (worst leaf) {g_rel:.3e}; updated parameters max abs error {p_abs:.3e}")
    ok &= bool(g_rel < GRAD_RTOL and p_abs < PARAM_ATOL)
  if not ok:
    raise SystemExit(f"FAIL: a tiled step differs from the untiled step by more than "
                     f"{GRAD_RTOL} (gradients, relative L2) or {PARAM_ATOL} (parameters)")
  print("OK")


if __name__ == "__main__":
  main()
