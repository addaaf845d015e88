"""Gradient checks of tiled convs, run in a child process by `test_gradients.py`.

XLA can abort the process (a CHECK failure is SIGABRT: nothing to catch) on a conv it
mis-simplifies, so these checks run away from the test runner. Before it compiles a case the
worker prints `CASE <description>`, so a crash names the case that caused it.

  python gradient_worker.py grid [--full] [--part I/N]  # the transposed-conv grid of issue 12
  python gradient_worker.py random N [--part I/N]  # N hypothesis-drawn convs (derandomized)
  python gradient_worker.py paths              # jvp, linearize, second order, vmap of grad
"""

import functools
import itertools
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxtile
from jaxtile import reference

jax.config.update("jax_enable_x64", False)

LAYOUTS = {2: {"NCHW": ("NCHW", "OIHW", "NCHW"), "NHWC": ("NHWC", "HWIO", "NHWC")},
           1: {"NCHW": ("NCH", "OIH", "NCH"), "NHWC": ("NWC", "WIO", "NWC")}}


def announce(case: str):
  print("CASE", case, flush=True)


def operands(lhs_shape, rhs_shape, kw, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=lhs_shape).astype(np.float32)
  w = rng.normal(size=rhs_shape).astype(np.float32)
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **kw), x, w)
  ct = rng.normal(size=out.shape).astype(np.float32)
  return x, w, ct


def reference_vjp(kw, x, w, ct, argnum):
  """d/d(operand argnum) of sum(conv(x, w) * ct), from the float64 NumPy conv alone.

  The conv is linear in each operand, so entry i of the gradient is sum(conv(.. e_i ..) * ct)
  with e_i the i-th basis array in place of that operand.
  """
  x64, w64, ct64 = (np.asarray(a, np.float64) for a in (x, w, ct))
  target = (x64, w64)[argnum]
  grad = np.zeros(target.size)
  for i in range(target.size):
    basis = np.zeros(target.size)
    basis[i] = 1
    basis = basis.reshape(target.shape)
    args = (basis, w64) if argnum == 0 else (x64, basis)
    grad[i] = np.sum(reference.conv_general_dilated(*args, **kw) * ct64)
  return grad.reshape(target.shape)


def n_pieces(f, max_bytes, x, w) -> int:
  report = jaxtile.explain(f, max_bytes=max_bytes)(x, w)
  return max([c.n_elemental for c in report.convs] or [1])


def check_grads(kw, x, w, ct, max_bytes, *, argnums, with_reference=True):
  """Tiled gradients w.r.t. `argnums` (an int: that operand alone; a tuple: taken together),
  through both paths, equal the untiled gradient and the NumPy reference."""
  f = functools.partial(lax.conv_general_dilated, **kw)
  loss = lambda fn: (lambda x, w: jnp.sum(fn(x, w) * ct))
  scale = float(np.abs(ct).sum() * max(np.abs(x).max(), np.abs(w).max()) ** 2 / ct.size) + 1e-6
  grads = {
      "untiled": jax.jit(jax.grad(loss(f), argnums))(x, w),
      "jax.grad(tile_convs(f))": jax.jit(
          jax.grad(loss(jaxtile.tile_convs(f, max_bytes=max_bytes)), argnums))(x, w),
      "tile_convs(jax.grad(f))": jax.jit(
          jaxtile.tile_convs(jax.grad(loss(f), argnums), max_bytes=max_bytes))(x, w),
  }
  single = isinstance(argnums, int)
  untiled = grads.pop("untiled")
  for path, got in grads.items():
    for i, argnum in enumerate([argnums] if single else argnums):
      g, u = (got, untiled) if single else (got[i], untiled[i])
      np.testing.assert_allclose(g, u, rtol=1e-4, atol=1e-5 * scale,
                                 err_msg=f"{path} d/d operand {argnum} vs untiled")
      if with_reference:
        np.testing.assert_allclose(g, reference_vjp(kw, x, w, ct, argnum), rtol=1e-4,
                                   atol=1e-5 * scale,
                                   err_msg=f"{path} d/d operand {argnum} vs NumPy reference")


def grid(full: bool, part: int = 0, parts: int = 1):
  """Issue 12's grid of transposed convs: with 4x4 kernels 10 of its 64 gradients aborted the
  process. The suite runs the 4x4 half (compiling is what it costs); `--full` adds the 3x3.
  With `parts` > 1, every `parts`-th case from `part` on (the suite runs two parts at once,
  one per core); the two single cases at the end go to the first and the last part."""
  n = 0
  for i, (size, k, pad, max_bytes, layout) in enumerate(itertools.product(
      (7, 16), (3, 4) if full else (4,), ((1, 0), (2, 2)), (600, 2000), ("NCHW", "NHWC"))):
    if i % parts != part:
      continue
    dn = LAYOUTS[2][layout]
    lhs_shape = (1, 4, size, size) if layout == "NCHW" else (1, size, size, 4)
    rhs_shape = (4, 4, k, k) if layout == "NCHW" else (k, k, 4, 4)
    kw = dict(window_strides=(1, 1), padding=(pad, pad), lhs_dilation=(2, 2),
              dimension_numbers=dn)
    x, w, ct = operands(lhs_shape, rhs_shape, kw, seed=i)
    announce(f"grid {layout} in={size} k={k} pad={pad} max_bytes={max_bytes}")
    check_grads(kw, x, w, ct, max_bytes, argnums=(0, 1), with_reference=size == 7)
    n += 1
  if part == 0:
    grid_reduced_case()
    n += 1
  if part == parts - 1:
    grid_negative_padding_transpose()
    n += 1
  print(f"grid: {n} cases exact", flush=True)


def grid_reduced_case():
  # The reduced case: lhs 1x1x3x1, kernel 1x1x4x1, two pieces.
  kw = dict(window_strides=(1, 1), padding=((1, 0), (0, 1)), lhs_dilation=(2, 2),
            dimension_numbers=LAYOUTS[2]["NCHW"])
  x, w, ct = operands((1, 1, 3, 1), (1, 1, 4, 1), kw, seed=0)
  announce("grid reduced case")
  assert n_pieces(functools.partial(lax.conv_general_dilated, **kw), 32, x, w) == 2
  check_grads(kw, x, w, ct, 32, argnums=(0, 1))


def grid_negative_padding_transpose():
  # Issue 12 part 2: transposed pieces with negative-low, positive-high padding (1-D, NWC).
  kw = dict(window_strides=(1,), padding=((5, 0),), lhs_dilation=(2,),
            dimension_numbers=LAYOUTS[1]["NHWC"])
  x, w, ct = operands((1, 6, 1), (4, 1, 2), kw, seed=1)
  announce("grid negative-padding transpose, 100 eager calls")
  f = functools.partial(lax.conv_general_dilated, **kw)
  want = reference_vjp(kw, x, w, ct, 0)
  g = jax.grad(lambda x: jnp.sum(jaxtile.tile_convs(f, tile_shape=12)(x, w) * ct))
  jg = jax.jit(g)
  for _ in range(100):
    np.testing.assert_allclose(g(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jg(x), want, rtol=1e-5, atol=1e-5)


def random_cases(count: int, part: int = 0, parts: int = 1):
  """`count` convs drawn by hypothesis: transposed and not, even and odd kernels, 1-D and 2-D,
  both layouts, 2-8 pieces; each gradient taken w.r.t. each operand separately. With `parts`
  > 1, the draws whose hash is `part` modulo `parts` (the draws are the same in every part)."""
  from hypothesis import HealthCheck, given, settings, strategies as st

  @st.composite
  def convs(draw):
    k = draw(st.sampled_from([1, 2]))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = 2 * groups, 2 * groups
    lhs_dilation = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(k))
    kernel = tuple(draw(st.integers(1, 5)) for _ in range(k))
    in_spatial = tuple(draw(st.integers(3, 9)) for _ in range(k))
    strides = tuple(draw(st.sampled_from([1, 2])) for _ in range(k))
    rhs_dilation = tuple(draw(st.sampled_from([1, 2])) for _ in range(k))
    padding = tuple((draw(st.integers(-2, 4)), draw(st.integers(-2, 4))) for _ in range(k))
    dn = LAYOUTS[k][layout]
    if layout == "NCHW":
      lhs_shape, rhs_shape = (1, cin, *in_spatial), (cout, cin // groups, *kernel)
    else:
      lhs_shape, rhs_shape = (1, *in_spatial, cin), (*kernel, cin // groups, cout)
    kw = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation,
              rhs_dilation=rhs_dilation, dimension_numbers=dn, feature_group_count=groups)
    return lhs_shape, rhs_shape, kw, draw(st.integers(0, 2**16))

  checked = []

  @settings(max_examples=count, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(convs())
  def run(case):
    lhs_shape, rhs_shape, kw, seed = case
    # By the case itself, not by a count of draws: hypothesis replays a failing case to report it.
    if zlib.crc32(repr(case).encode()) % parts != part:
      return
    try:
      out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **kw),
                           jnp.zeros(lhs_shape), jnp.zeros(rhs_shape))
    except (TypeError, ValueError):
      return  # not a valid conv (window larger than the padded input)
    if 0 in out.shape or np.prod(out.shape) < 4:
      return
    x, w, ct = operands(lhs_shape, rhs_shape, kw, seed)
    f = functools.partial(lax.conv_general_dilated, **kw)
    total = 4 * (x.size + w.size + ct.size)
    budget = next((b for b in (total // 2, total // 3, total // 4, total // 6)
                   if 2 <= n_pieces(f, b, x, w) <= 8), None)
    if budget is None:
      return
    announce(f"random lhs={lhs_shape} rhs={rhs_shape} {kw} max_bytes={budget}")
    for argnum in (0, 1):  # each operand alone: its own gradient program
      check_grads(kw, x, w, ct, budget, argnums=argnum)
    checked.append(case)

  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)  # over-budget notes are expected here
  run()
  transposed = sum(any(d > 1 for d in c[2]["lhs_dilation"]) for c in checked)
  print(f"random: {len(checked)} convs checked ({transposed} transposed)", flush=True)
  assert len(checked) >= count // (3 * parts), (
      f"only {len(checked)} of {count // parts} draws were usable")


def other_paths():
  """jvp, linearize, second order and vmap of grad through a tiled 4x4 transposed conv."""
  for layout in ("NCHW", "NHWC"):
    dn = LAYOUTS[2][layout]
    lhs_shape = (1, 4, 8, 8) if layout == "NCHW" else (1, 8, 8, 4)
    rhs_shape = (4, 4, 4, 4)
    kw = dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
              dimension_numbers=dn)
    x, w, ct = operands(lhs_shape, rhs_shape, kw, seed=3)
    f = functools.partial(lax.conv_general_dilated, **kw)
    tiled = jaxtile.tile_convs(f, max_bytes=2000)
    tol = dict(rtol=1e-4, atol=1e-3)
    announce(f"paths {layout} jvp")
    np.testing.assert_allclose(jax.jit(lambda x, w: jax.jvp(tiled, (x, w), (x, w)))(x, w)[1],
                               jax.jvp(f, (x, w), (x, w))[1], **tol)
    announce(f"paths {layout} linearize")
    _, lin_t = jax.linearize(tiled, x, w)
    _, lin_u = jax.linearize(f, x, w)
    np.testing.assert_allclose(lin_t(x, w), lin_u(x, w), **tol)
    announce(f"paths {layout} second order")
    second = lambda fn: jax.jit(jax.grad(
        lambda x, w: jnp.sum(jax.grad(lambda w: jnp.sum(fn(x, w) * ct))(w) ** 2), (0, 1)))
    for a, b in zip(second(tiled)(x, w), second(f)(x, w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)
    announce(f"paths {layout} vmap of grad")
    vgrad = lambda fn: jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(fn(x, w) * ct), 1),
                                        (0, None)))
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(vgrad(tiled)(xs, w), vgrad(f)(xs, w), **tol)
  print("paths: exact", flush=True)


if __name__ == "__main__":
  mode = sys.argv[1]
  part, parts = 0, 1
  if "--part" in sys.argv:
    part, parts = map(int, sys.argv[sys.argv.index("--part") + 1].split("/"))
  if mode == "grid":
    grid(full="--full" in sys.argv[2:], part=part, parts=parts)
  elif mode == "random":
    random_cases(int(sys.argv[2]), part=part, parts=parts)
  elif mode == "paths":
    other_paths()
  else:
    raise SystemExit(f"unknown mode {mode!r}")
