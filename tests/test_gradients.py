"""Gradients of tiled convs: exact against the untiled program and the NumPy reference, never an
abort, and half-precision kernel gradients as accurate as untiled at any piece count.

The checks that compile many transposed convs run in a child process (`gradient_worker.py`): an
XLA CHECK failure is SIGABRT, which would kill the test runner with every later test. There it
fails one test, naming the case it was compiling.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile

WORKER = os.path.join(os.path.dirname(__file__), "gradient_worker.py")


def run_workers(*arg_lists, timeout=600) -> list[str]:
  """Runs a worker per argument list, all at once (the machine's cores compile in parallel),
  and returns their outputs; fails naming the first that died and the case it was on."""
  env = dict(os.environ, XLA_FLAGS="")  # one host device is enough
  procs = [subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for args in arg_lists]
  try:
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for args, proc, (stdout, stderr) in zip(arg_lists, procs, outputs):
    cases = [l for l in stdout.splitlines() if l.startswith("CASE ")]
    if proc.returncode != 0:
      died = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else "failed"
      pytest.fail(f"gradient worker {' '.join(args)} {died} at "
                  f"{cases[-1] if cases else 'start'}\n--- stderr (tail) ---\n{stderr[-4000:]}")
  return [stdout for stdout, _ in outputs]


def run_worker(*args, timeout=600) -> str:
  return run_workers(args, timeout=timeout)[0]


def test_transposed_conv_gradient_grid_is_exact_and_never_aborts():
  # 16 transposed convs with 4x4 kernels (both layouts, two paddings and budgets; d/dx and d/dw
  # through jax.grad(tile_convs(f)) and tile_convs(jax.grad(f))): 10 of their gradients aborted
  # the process before. `python tests/gradient_worker.py grid --full` adds the 3x3 kernels.
  # Two workers, half the cases each.
  outs = run_workers(("grid", "--part", "0/2"), ("grid", "--part", "1/2"))
  assert all("grid: 9 cases exact" in out for out in outs), outs


def test_random_convs_gradients_per_operand_match_untiled_and_reference():
  outs = run_workers(("random", "24", "--part", "0/2"), ("random", "24", "--part", "1/2"))
  assert all("random: " in out and "transposed)" in out for out in outs), outs


def test_other_derivative_paths_through_a_tiled_transposed_conv():
  assert "paths: exact" in run_worker("paths")


def test_crash_in_worker_fails_one_test_and_names_the_case(tmp_path):
  # The harness itself: a child that aborts mid-case is reported with the case it was on.
  script = tmp_path / "abort.py"
  script.write_text("import os\nprint('CASE the-aborting-one', flush=True)\nos.abort()\n")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
  assert proc.returncode < 0
  with pytest.raises(pytest.fail.Exception, match="signal 6 at CASE the-aborting-one"):
    global WORKER
    saved, WORKER = WORKER, str(script)
    try:
      run_worker()
    finally:
      WORKER = saved


DN = ("NHWC", "HWIO", "NHWC")


def _half_precision_grads(dtype, tile):
  """Relative L2 error of d/dx and d/dw of a 3x3 SAME conv in `dtype` vs float32 (tiled with
  `tile` x `tile` output tiles, or untiled when `tile` is None)."""
  f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 64, 64, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 8)) / 8, jnp.float32)
  ct = jnp.asarray(rng.normal(size=(1, 64, 64, 8)), jnp.float32)

  def grads(fn, x, w):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * ct), (0, 1)))(
        x, w)
  want = grads(f, x, w)
  fn = f if tile is None else jaxtile.tile_convs(f, tile_shape=(tile, tile))
  got = grads(fn, x.astype(dtype), w.astype(dtype))
  return [float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
          for g, r in zip(got, want)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_kernel_gradient_error_does_not_grow_with_tiles(dtype):
  dx0, dw0 = _half_precision_grads(dtype, None)
  dx, dw = _half_precision_grads(dtype, 8)  # 64 tiles
  # Summed in the kernel's own half precision, the 64 partial kernel gradients lost 2-3x.
  assert dw <= 1.5 * dw0, (dw, dw0)
  assert dx <= 1.5 * dx0, (dx, dx0)


def test_the_reference_tier_is_differentiated_on_the_host():
  # `jax.grad(tile_convs(f, tier="reference"))` raised JAX's "Pure callbacks do not support
  # JVP" from inside the rewrite. The reference conv's derivative is now JAX's (the convs of its
  # transpose rules), each conv of which runs on the host too: checked against the untiled
  # gradient for a strided, dilated, grouped conv, and a second derivative.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 11, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 2, 2, 6)) / 4, jnp.float32)

  def f(x, w):
    y = lax.conv_general_dilated(x, w, (2, 1), ((1, 2), (0, 1)), rhs_dilation=(1, 2),
                                 feature_group_count=2,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.sin(y))

  ref = jaxtile.tile_convs(f, tier="reference")
  grad = jax.grad(ref, argnums=(0, 1))
  program = str(jax.make_jaxpr(grad)(x, w))
  assert "pure_callback" in program and "conv_general_dilated" not in program
  for got, want in zip(grad(x, w), jax.grad(f, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  second = lambda g: jax.grad(lambda x, w: jnp.sum(g(x, w)[1] ** 2))(x, w)
  np.testing.assert_allclose(second(grad), second(jax.grad(f, argnums=(0, 1))), rtol=1e-4,
                             atol=1e-4)
