"""Region tiling: chains of spatially local ops run as one loop over output tiles.

`tile_convs(f, fuse=True)` groups a chain of convs and the elementwise ops between them into one
loop, so intermediates live one tile at a time; `fuse=False` tiles each conv on its own. Every
result is checked against the untiled program, `jax.jit(f)`, never against a hand derivation.

XLA:CPU misreads a float conv whose padding is negative on the low side and positive on the high
side (openxla/xla#48713, see docs/guide.md). A conv left monolithic is XLA's, so the untiled
program itself would be wrong there: the chains below draw negative padding only in the other
combinations ((-1, -1), (-1, 0), (hi >= 0, -1)), and the untiled program stays a valid oracle.
Its gradient is another matter: a conv padded (lo, hi) has an input-gradient conv padded about
(k - 1 - lo, k - 1 - hi), which can be mixed-sign, so the gradient oracle is the same function
with its padding made explicit (`Chain.fn(explicit_padding=True)`).
"""

import dataclasses
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax import lax

import jaxtile
from jaxtile._src import upsample

RTOL = ATOL = 1e-5  # float32: tiled vs untiled differ only by summation order
GRAD_TOL = 1e-4

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "leaky_relu": jax.nn.leaky_relu,
    "identity": lambda y: y,
    # jnp.where with a scalar: a broadcast to the full shape inside the call, made on windows.
    "elu": jax.nn.elu,
    "hard_tanh": jax.nn.hard_tanh,
}

#: (lhs, rhs, out) specs per (spatial rank, channels last).
LAYOUTS = {
    (1, True): ("NWC", "WIO", "NWC"),
    (1, False): ("NCW", "OIW", "NCW"),
    (2, True): ("NHWC", "HWIO", "NHWC"),
    (2, False): ("NCHW", "OIHW", "NCHW"),
}

CHANNELS = 4

Padding = Union[str, tuple[tuple[int, int], ...]]


# ---------------------------------------------------------------------------------------------
# Chain networks: conv -> optional bias -> activation, repeated; channels stay CHANNELS.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layer:
  kernel: tuple[int, ...]
  strides: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  padding: Padding
  groups: int = 1
  bias: bool = True
  activation: str = "relu"
  lhs_dilation: int = 1  # 2: a transposed conv, which ends a region (tiled on its own)
  pool: Optional[str] = None  # "max" or "avg" after the activation, window 2 or 3
  pool_stride: int = 1
  residual: bool = False  # add the layer's input when the shapes agree (a skip in a region)
  # Nearest-neighbour upsampling of the layer's input by these factors per spatial dim (none if
  # empty), as `jax.image.resize(..., "nearest")` or `jnp.repeat` emits it.
  upsample: tuple[int, ...] = ()
  upsample_with: str = "resize"


@dataclasses.dataclass(frozen=True)
class Chain:
  channels_last: bool
  batch: int
  spatial: tuple[int, ...]
  layers: tuple[Layer, ...]
  seed: int = 0
  # Each conv on one example under vmap, a batch axis of 1 added and squeezed again, as equinox
  # runs its convs (`canonical.drop_round_trips`).
  per_example: bool = False

  @property
  def rank(self) -> int:
    return len(self.spatial)

  @property
  def layout(self) -> tuple[str, str, str]:
    return LAYOUTS[self.rank, self.channels_last]

  def lhs_shape(self, batch: Optional[int] = None) -> tuple[int, ...]:
    n = self.batch if batch is None else batch
    if self.channels_last:
      return (n, *self.spatial, CHANNELS)
    return (n, CHANNELS, *self.spatial)

  def rhs_shape(self, layer: Layer) -> tuple[int, ...]:
    if self.channels_last:  # "WIO" / "HWIO"
      return (*layer.kernel, CHANNELS // layer.groups, CHANNELS)
    return (CHANNELS, CHANNELS // layer.groups, *layer.kernel)  # "OIW" / "OIHW"

  def bias_shape(self) -> tuple[int, ...]:
    if self.channels_last:
      return (1,) * (self.rank + 1) + (CHANNELS,)
    return (1, CHANNELS) + (1,) * self.rank

  def fn(self, explicit_padding: bool = False) -> Callable:
    """`f(x, *params)`: params are each layer's kernel, then its bias if it has one. With
    `explicit_padding`, each conv's padding and lhs dilation are a `lax.pad` before a conv
    without them: the same function, whose gradient XLA:CPU computes without the mixed-sign
    padding it misreads (the module docstring)."""
    layout, bias_shape = self.layout, self.bias_shape()

    spatial_axes = tuple(range(1, self.rank + 1)) if self.channels_last else tuple(
        range(2, self.rank + 2))

    def pool(x, layer):
      window = [1] * x.ndim
      strides = [1] * x.ndim
      padding = [(0, 0)] * x.ndim
      for a in spatial_axes:
        window[a], strides[a], padding[a] = 3 if layer.pool == "avg" else 2, layer.pool_stride, (
            (1, 1) if layer.pool == "avg" else (0, 1))
      if layer.pool == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
      return lax.reduce_window(x, 0.0, lax.add, window, strides, padding) / math.prod(window)

    def upsample(x, layer):
      factors = [1] * x.ndim
      for a, f in zip(spatial_axes, layer.upsample):
        factors[a] = f
      if layer.upsample_with == "resize":
        return jax.image.resize(x, [n * f for n, f in zip(x.shape, factors)], "nearest")
      for a, f in enumerate(factors):
        x = jnp.repeat(x, f, axis=a)
      return x

    def conv(x, w, layer):
      def one(x):
        padding, lhs_dilation = layer.padding, (layer.lhs_dilation,) * self.rank
        if explicit_padding:
          dilated = [(x.shape[a] - 1) * d + 1 for a, d in zip(spatial_axes, lhs_dilation)]
          if isinstance(padding, str):  # as lax resolves it: on the dilated input and kernel
            extent = [(k - 1) * r + 1 for k, r in zip(layer.kernel, layer.rhs_dilation)]
            padding = lax.padtype_to_pads(dilated, extent, layer.strides, padding)
          config = [(0, 0, 0)] * x.ndim
          for a, (lo, hi), d in zip(spatial_axes, padding, lhs_dilation):
            config[a] = (lo, hi, d - 1)
          x = lax.pad(x, jnp.zeros((), x.dtype), config)
          padding, lhs_dilation = ((0, 0),) * self.rank, (1,) * self.rank
        return lax.conv_general_dilated(
            x, w, window_strides=layer.strides, padding=padding, lhs_dilation=lhs_dilation,
            rhs_dilation=layer.rhs_dilation, dimension_numbers=layout,
            feature_group_count=layer.groups)
      return jax.vmap(lambda x: one(x[None])[0])(x) if self.per_example else one(x)

    def f(x, *params):
      params = iter(params)
      for layer in self.layers:
        if layer.upsample:
          x = upsample(x, layer)
        skip = x
        x = conv(x, next(params), layer)
        if layer.bias:
          x = x + next(params).reshape(bias_shape)
        x = ACTIVATIONS[layer.activation](x)
        if layer.residual and x.shape == skip.shape:
          x = x + skip
        if layer.pool:
          x = pool(x, layer)
      return x

    return f

  def param_shapes(self) -> list[tuple[int, ...]]:
    shapes = []
    for layer in self.layers:
      shapes.append(self.rhs_shape(layer))
      if layer.bias:
        shapes.append((CHANNELS,))
    return shapes

  def operands(self, batch: Optional[int] = None):
    """Input and params; kernels scaled by 1/sqrt(fan-in) so activations stay about 1."""
    rng = np.random.default_rng(self.seed)
    x = rng.standard_normal(self.lhs_shape(batch)).astype(np.float32)
    params = []
    for shape in self.param_shapes():
      if len(shape) == 1:  # bias
        params.append((0.5 * rng.standard_normal(shape)).astype(np.float32))
      else:
        fan_in = math.prod(shape) // CHANNELS
        params.append((rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32))
    return jnp.asarray(x), [jnp.asarray(p) for p in params]

  def activation_shapes(self) -> Optional[list[tuple[int, ...]]]:
    """The input's shape and every layer's output shape; None if some layer has no output."""
    shapes = [self.lhs_shape()]
    for layer in self.layers:
      spatial = shapes[-1][1:-1] if self.channels_last else shapes[-1][2:]
      single = dataclasses.replace(self, spatial=spatial, layers=(layer,))
      args = [jax.ShapeDtypeStruct(s, jnp.float32)
              for s in [single.lhs_shape(), *single.param_shapes()]]
      try:
        out = jax.eval_shape(single.fn(), *args).shape
      except (TypeError, ValueError):  # padded input smaller than the dilated kernel
        return None
      if min(out) < 1:
        return None
      shapes.append(tuple(out))
    return shapes

  def budget(self) -> int:
    """A quarter of the largest activation's bytes: every conv touching it must be tiled."""
    largest = max(math.prod(s) for s in self.activation_shapes()) * 4  # float32
    return largest // 4


def pad_pairs(rank: int):
  # Not lo < 0 < hi: XLA:CPU misreads those in the untiled program (see the module docstring).
  pair = st.tuples(st.integers(-1, 3), st.integers(-1, 3)).filter(lambda p: not p[0] < 0 < p[1])
  return st.tuples(*[pair] * rank)


@st.composite
def layers(draw, rank: int) -> Layer:
  per_dim = lambda values: st.tuples(*[st.sampled_from(values)] * rank)
  return Layer(
      kernel=draw(per_dim([1, 2, 3, 4])),
      strides=draw(per_dim([1, 2])),
      rhs_dilation=draw(per_dim([1, 2])),
      padding=draw(st.one_of(st.sampled_from(["SAME", "VALID"]), pad_pairs(rank))),
      groups=draw(st.sampled_from([1, 2])),
      bias=draw(st.booleans()),
      activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
      lhs_dilation=draw(st.sampled_from([1, 1, 1, 2])),
      pool=draw(st.sampled_from([None, None, "max", "avg"])),
      pool_stride=draw(st.sampled_from([1, 2])),
      residual=draw(st.booleans()),
      upsample=draw(st.one_of(st.just(()), st.just(()), per_dim([1, 2, 3]))),
      upsample_with=draw(st.sampled_from(["resize", "repeat"])))


@st.composite
def chains(draw) -> Chain:
  rank = draw(st.sampled_from([1, 2]))
  chain = Chain(
      channels_last=draw(st.booleans()),
      batch=draw(st.integers(1, 2)),
      spatial=draw(st.tuples(*[st.integers(16, 40)] * rank)),
      layers=tuple(draw(st.lists(layers(rank), min_size=2, max_size=5))),
      seed=draw(st.integers(0, 2**16)),
      per_example=draw(st.booleans()))
  assume(chain.activation_shapes() is not None)
  return chain


def assert_matches_untiled(chain: Chain, max_bytes: int, fuse, x=None, params=None):
  f = chain.fn()
  if x is None:
    x, params = chain.operands()
  want = jax.jit(f)(x, *params)
  got = jax.jit(jaxtile.tile_convs(f, max_bytes=max_bytes, fuse=fuse))(x, *params)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"fuse={fuse!r} {chain}")


# ---------------------------------------------------------------------------------------------
# 1. Random chains, fused and per conv, against the untiled program.
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True)
@given(chains())
def test_random_chains_match_untiled(chain):
  f, max_bytes = chain.fn(), chain.budget()
  x, params = chain.operands()
  report = jaxtile.explain(f, max_bytes=max_bytes)(x, *params)
  assert any(c.tiled for c in report.convs), str(report)
  for fuse in (True, False):
    assert_matches_untiled(chain, max_bytes, fuse, x, params)


# ---------------------------------------------------------------------------------------------
# 2. Derivatives through a fused chain.
# ---------------------------------------------------------------------------------------------
# Chain(channels_last, batch, spatial, layers), Layer(kernel, strides, rhs_dilation, padding, ...).
GRAD_CHAINS = {
    "strided": Chain(True, 1, (24, 20), (
        Layer((3, 3), (2, 2), (1, 1), "SAME", activation="relu"),
        Layer((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), activation="tanh"),
        Layer((4, 3), (2, 1), (1, 1), ((1, 2), (2, 1)), activation="silu"),
    ), seed=1),
    "dilated_negative_padding": Chain(False, 1, (26, 22), (
        Layer((3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), activation="relu"),
        Layer((3, 3), (1, 1), (2, 1), ((-1, -1), (1, -1)), activation="leaky_relu"),
        Layer((2, 3), (1, 1), (1, 2), ((-1, 0), (3, -1)), activation="tanh"),
    ), seed=2),
    "where_activations": Chain(True, 1, (30, 26), (
        Layer((3, 3), (1, 1), (1, 1), "SAME", activation="elu"),
        Layer((3, 3), (1, 1), (1, 1), "SAME", activation="hard_tanh"),
        Layer((3, 3), (1, 1), (1, 1), "SAME", activation="elu"),
    ), seed=5),
    # Nearest upsampling before a conv: a stage of the region (jax.image.resize's gathers,
    # then jnp.repeat's broadcasts and reshapes).
    "upsampled": Chain(False, 2, (11, 9), (
        Layer((3, 3), (1, 1), (1, 1), "SAME", activation="silu"),
        Layer((3, 3), (1, 1), (1, 1), ((2, 0), (1, 1)), activation="relu", upsample=(2, 2)),
        Layer((3, 2), (1, 1), (1, 1), "SAME", activation="tanh", upsample=(1, 3),
              upsample_with="repeat"),
    ), seed=6),
    "groups_gelu": Chain(False, 2, (48,), (
        Layer((3,), (1,), (1,), "SAME", groups=2, activation="gelu"),
        Layer((1,), (1,), (1,), "VALID", groups=1, bias=False, activation="gelu"),
        Layer((4,), (2,), (1,), ((2, 1),), groups=2, activation="gelu"),
    ), seed=3),
}


@pytest.mark.parametrize("name", sorted(GRAD_CHAINS))
def test_gradients_through_a_fused_chain_match_untiled(name):
  chain = GRAD_CHAINS[name]
  f, max_bytes = chain.fn(), chain.budget()
  x, params = chain.operands()
  report = jaxtile.explain(f, max_bytes=max_bytes, fuse=True)(x, *params)
  assert any(c.tiled for c in report.convs)
  if name == "where_activations":  # jnp.where(x > 0, x, 0.0) inside elu and hard_tanh
    assert len(report.regions) == 1 and len(report.regions[0].convs) >= 2, str(report)
  if name == "upsampled":
    assert sum(r.upsamplings for r in report.regions) == 2, str(report)
  ct = jnp.asarray(np.random.default_rng(7).standard_normal(
      jax.eval_shape(f, x, *params).shape).astype(np.float32))
  argnums = tuple(range(1 + len(params)))

  def grad(fun):
    return jax.jit(jax.grad(lambda *args: jnp.sum(fun(*args) * ct), argnums=argnums))

  # The untiled gradient of a conv padded (lo, hi) has an input-gradient conv padded about
  # (k - 1 - lo, k - 1 - hi), which XLA:CPU misreads when that is mixed-sign (it reads out of
  # bounds: the untiled result changed from run to run). The oracle is the same function with
  # its padding explicit, whose gradient has none.
  explicit = chain.fn(explicit_padding=True)
  np.testing.assert_allclose(jax.jit(explicit)(x, *params), jax.jit(f)(x, *params), rtol=RTOL,
                             atol=ATOL)
  want = grad(explicit)(x, *params)
  got = grad(jaxtile.tile_convs(f, max_bytes=max_bytes, fuse=True))(x, *params)
  assert len(got) == len(want) == 1 + len(params)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL,
                               err_msg=f"{name}: gradient w.r.t. argument {i}")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(chains())
def test_random_chains_gradients_match_untiled(chain):
  # The region's transpose (`region.emit_transpose`) on random chains: strides, dilations,
  # transposed convs (stages), pools, skips. Every operand's cotangent against untiled.
  f, max_bytes = chain.fn(), chain.budget()
  x, params = chain.operands()
  ct = jnp.asarray(np.random.default_rng(chain.seed).standard_normal(
      jax.eval_shape(f, x, *params).shape).astype(np.float32))
  argnums = tuple(range(1 + len(params)))
  grad = lambda fun: jax.jit(jax.grad(lambda *a: jnp.sum(fun(*a) * ct), argnums=argnums))
  # The untiled gradient of a conv padded (lo, hi) has an input-gradient conv padded about
  # (k - 1 - lo, k - 1 - hi), which XLA:CPU misreads when that is mixed-sign (it reads out of
  # bounds: the untiled result changed from run to run). The oracle is the same function with
  # its padding explicit, whose gradient has none.
  explicit = chain.fn(explicit_padding=True)
  np.testing.assert_allclose(jax.jit(explicit)(x, *params), jax.jit(f)(x, *params), rtol=RTOL,
                             atol=ATOL)
  want = grad(explicit)(x, *params)
  got = grad(jaxtile.tile_convs(f, max_bytes=max_bytes, fuse=True))(x, *params)
  # And the program JAX differentiated, tiled: forward and backward as one region, its weight
  # gradients reductions (section 8).
  differentiated = jax.jit(jaxtile.tile_convs(
      jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=argnums), max_bytes=max_bytes,
      fuse=True))(x, *params)
  for form, values in (("grad(tile_convs(f))", got), ("tile_convs(grad(f))", differentiated)):
    for i, (g, w) in enumerate(zip(values, want)):
      np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * max(1.0, float(
          jnp.abs(w).max())), err_msg=f"{form}: gradient w.r.t. argument {i}: {chain}")


def _kinked_net(x, w1, w2, w3):
  """Activations meeting relu's kink exactly: zero images give convs of exactly 0."""
  y = jax.nn.relu(_c(x, w1))
  y = jax.nn.relu(_c(y, w2))
  return _c(y, w3)


def _kinked_args():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 40, 36, 4)).astype(np.float32)
  x[:, :20] = 0.0  # a black border, as satellite and slide scans have
  ws = [rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(3, 3, 8, 8)), rng.normal(size=(3, 3, 8, 4))]
  return (jnp.asarray(x), *[jnp.asarray(w / 4, jnp.float32) for w in ws])


def test_activation_derivatives_at_their_kinks_are_the_untiled_ones():
  # relu is a custom_jvp: its derivative at 0 is 0. A window must run relu's rule, not the
  # derivative of its body max(x, 0), which is 1/2 there: before, a fused region's gradient
  # differed wherever a conv gave exactly 0 (all of a black border).
  args = _kinked_args()
  tiled = jaxtile.tile_convs(_kinked_net, max_bytes=8000, fuse=True)
  assert len(jaxtile.explain(tiled)(*args).regions) == 1
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3)))
  for got, want in zip(loss(tiled)(*args), loss(_kinked_net)(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_forward_mode_and_second_derivatives_through_a_region():
  # jax.jvp runs the region's tangent loop (`region.emit_jvp`); a Hessian-vector product
  # differentiates that loop's tangent once more (at full size, each conv tiled on its own).
  args = _kinked_args()
  tiled = jaxtile.tile_convs(_kinked_net, max_bytes=8000, fuse=True)
  rng = np.random.default_rng(4)
  tangents = tuple(jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in args)
  (out, t_out), (want_out, want_t) = (jax.jit(lambda *a: jax.jvp(f, a, tangents))(*args)
                                      for f in (tiled, _kinked_net))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t_out, want_t, rtol=1e-4, atol=1e-4 * float(jnp.abs(want_t).max()))

  def hvp(f):
    loss = lambda x: jnp.sum(jnp.tanh(f(x, *args[1:])))
    return jax.jit(lambda x, v: jax.jvp(jax.grad(loss), (x,), (v,))[1])(args[0], tangents[0])
  got, want = hvp(tiled), hvp(_kinked_net)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("name", sorted(GRAD_CHAINS))
def test_vmap_of_a_fused_chain_matches_untiled(name):
  chain = GRAD_CHAINS[name]
  f, max_bytes = chain.fn(), chain.budget()
  x, params = chain.operands()
  xs = jnp.stack([x, -0.5 * x, x[::-1]])  # a leading batch of 3 inputs
  in_axes = (0,) + (None,) * len(params)
  want = jax.jit(jax.vmap(f, in_axes))(xs, *params)
  got = jax.jit(jax.vmap(jaxtile.tile_convs(f, max_bytes=max_bytes, fuse=True), in_axes))(
      xs, *params)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# 3. Borders: an intermediate outside the image is the next conv's zero padding, not
#    relu(bias + ...) computed there.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("fuse", [True, False, "auto"])
def test_same_padding_chain_is_exact_at_image_borders(fuse, channels_last):
  same = Layer((3, 3), (1, 1), (1, 1), "SAME", activation="relu")
  chain = Chain(channels_last, 1, (37, 29), (same,) * 3, seed=4)
  x, params = chain.operands()
  params = [jnp.full_like(p, 5.0) if p.ndim == 1 else p for p in params]  # large biases
  max_bytes = 4096  # an activation is 17168 bytes: several tiles per conv
  report = jaxtile.explain(chain.fn(), max_bytes=max_bytes)(x, *params)
  assert any(c.tiled and c.n_elemental > 1 for c in report.convs), str(report)
  assert_matches_untiled(chain, max_bytes, fuse, x, params)


# ---------------------------------------------------------------------------------------------
# 4. Memory, from XLA's buffer assignment (deterministic; nothing is allocated).
# ---------------------------------------------------------------------------------------------
def temp_bytes(fn, *args) -> int:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    pytest.skip("this backend reports no memory analysis")
  return stats.temp_size_in_bytes


MiB = 2**20


def _deep_chain(x, ws):
  for w in ws:
    x = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return x


_DEEP_ARGS = (jax.ShapeDtypeStruct((1, 512, 512, 32), jnp.float32),  # 32 MiB per activation
              [jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)] * 8)


@pytest.fixture(scope="module")
def deep_chain_untiled_bytes():
  return temp_bytes(_deep_chain, *_DEEP_ARGS)


def test_fused_chain_holds_tiles_not_activations(deep_chain_untiled_bytes):
  untiled = deep_chain_untiled_bytes
  assert untiled >= 32 * MiB, untiled
  tiled = temp_bytes(jaxtile.tile_convs(_deep_chain, max_bytes=MiB, fuse=True), *_DEEP_ARGS)
  assert tiled <= 8 * MiB, (tiled, untiled)
  assert tiled <= untiled // 4, (tiled, untiled)


def test_gradient_of_a_fused_chain_holds_tiles_not_activations():
  # Issue 9, target 3: the untiled gradient keeps every activation for the backward pass
  # (544 MiB here); the region's transpose recomputes each tile's forward, so the gradient holds
  # the region's input, output and their cotangents (36 MiB: 0.07x).
  grad = lambda f: jax.grad(lambda x, ws: f(x, ws).sum(), argnums=(0, 1))
  untiled = temp_bytes(grad(_deep_chain), *_DEEP_ARGS)
  tiled = temp_bytes(grad(jaxtile.tile_convs(_deep_chain, max_bytes=MiB, fuse=True)),
                     *_DEEP_ARGS)
  assert untiled >= 8 * 32 * MiB, untiled
  assert tiled <= untiled // 8, (tiled, untiled)


def test_per_conv_tiling_holds_no_more_than_untiled(deep_chain_untiled_bytes):
  untiled = deep_chain_untiled_bytes
  tiled = temp_bytes(jaxtile.tile_convs(_deep_chain, max_bytes=MiB, fuse=False), *_DEEP_ARGS)
  assert tiled <= untiled + 2 * MiB, (tiled, untiled)


# ---------------------------------------------------------------------------------------------
# 5. Validation of `fuse`.
# ---------------------------------------------------------------------------------------------
def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME")


@pytest.mark.parametrize("fuse", [True, False, "auto"])
def test_fuse_accepts_true_false_and_auto(fuse):
  assert callable(jaxtile.tile_convs(_conv, fuse=fuse))


def test_bad_fuse_value_raises_value_error_naming_it():
  for call in (lambda: jaxtile.tile_convs(_conv, fuse="yes"),
               lambda: jaxtile.tile_convs(fuse="yes")):
    with pytest.raises(ValueError, match="fuse") as info:
      call()
    assert "yes" in str(info.value), str(info.value)


@pytest.mark.parametrize("fuse", [1, 0])
def test_non_bool_fuse_raises_naming_it(fuse):
  # 1 == True and 0 == False, but an int is not a bool: as for strict= and shard_output=.
  with pytest.raises((TypeError, ValueError), match="fuse"):
    jaxtile.tile_convs(_conv, fuse=fuse)


# ---------------------------------------------------------------------------------------------
# 6. Residual adds and pools inside a region.
# ---------------------------------------------------------------------------------------------
_DN = ("NHWC", "HWIO", "NHWC")


def _c(x, w, stride=1, padding="SAME"):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)


def _residual_net(x, w1, w2, w3):
  y = _c(jax.nn.relu(_c(x, w1)), w2)
  x = jax.nn.relu(x + y)  # the region's input, read by a conv and, past two convs, by this add
  return jax.nn.relu(_c(x, w3, 2, ((1, 0), (0, 1))))


def _pool_net(x, w1, w2):
  y = lax.reduce_window(_c(x, w1) - 3.0, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                        ((0, 0), (1, 1), (1, 1), (0, 0))) / 9.0
  y = lax.reduce_window(y - 5.0, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1),
                        ((0, 0), (1, 0), (0, 1), (0, 0)))
  return _c(y, w2)


@pytest.mark.parametrize("net, n_weights, max_bytes", [
    (_residual_net, 3, 20000), (_residual_net, 3, 40000), (_pool_net, 2, 30000)])
def test_residual_adds_and_pools_fuse_exactly(net, n_weights, max_bytes):
  # Pool windows outside the image are the reduction's identity (-inf for max), not zero: the
  # shifted max pool and the negative values before it catch a loop that pads with zeros.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 41, 37, 8)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(3, 3, 8, 8)) / 8, jnp.float32) for _ in range(n_weights)]
  report = jaxtile.explain(net, max_bytes=max_bytes)(x, *ws)
  assert len(report.regions) == 1 and len(report.regions[0].convs) == n_weights, str(report)
  np.testing.assert_allclose(jax.jit(jaxtile.tile_convs(net, max_bytes=max_bytes))(x, *ws),
                             jax.jit(net)(x, *ws), rtol=1e-5, atol=1e-5)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1))(x, *ws)
  for got, want in zip(grads(jaxtile.tile_convs(net, max_bytes=max_bytes)), grads(net)):
    # Kernel gradients sum over pieces in another order: float32 rounding of the largest terms.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def _padded_net(channels_last):
  """`jnp.pad` with zeros (the image, and between convs: low, high, one side), crops by
  slicing, and `lax.pad` with negative low padding (a crop of one side, a pad of the other)."""
  dn = _DN if channels_last else ("NCHW", "OIHW", "NCHW")
  h, w = (1, 2) if channels_last else (2, 3)

  def spatial(pairs):
    config = [(0, 0)] * 4
    config[h], config[w] = pairs
    return config

  def crop(x, lo, hi):
    index = [slice(None)] * 4
    index[h], index[w] = slice(lo[0], x.shape[h] - hi[0]), slice(lo[1], x.shape[w] - hi[1])
    return x[tuple(index)]

  def f(x, w1, w2, w3):
    c = lambda x, k, padding: lax.conv_general_dilated(x, k, (1, 1), padding,
                                                       dimension_numbers=dn)
    y = jax.nn.relu(c(jnp.pad(x, spatial([(2, 1), (0, 3)])), w1, "VALID"))
    y = crop(jax.nn.relu(c(y, w2, "SAME") - 0.5), (1, 0), (2, 3))
    y = lax.pad(y, 0.0, [(lo, hi, 0) for lo, hi in spatial([(-1, 2), (3, -2)])])
    return c(jnp.pad(jnp.tanh(y), spatial([(1, 1), (1, 1)])), w3, "VALID")
  return f


def _assert_same_gradients(tiled, f, *args):
  """The gradients of sum(sin(.)) of `tiled` and `f` with respect to every argument agree."""
  grads = lambda g: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(g(*a))),
                                     argnums=range(len(args))))(*args)
  for i, (got, want) in enumerate(zip(grads(tiled), grads(f))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()),
                               err_msg=f"gradient w.r.t. argument {i}")


def test_a_conv_alone_with_its_pool_is_a_region():
  # A ResNet stem: a strided conv, a batch norm in inference mode, relu and a padded max pool.
  # Tiled on its own, the conv's full-size output existed for the ops after it (32 MiB at
  # 1x512x512x32); as a region of one conv, only the pooled output does. A conv with
  # elementwise ops alone stays its own loop.
  def stem(w, scale, shift, x):
    y = lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y * scale + shift)
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))

  rng = np.random.default_rng(11)
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((7, 7, 3, 16), (16,), (16,), (2, 97, 83, 3))]
  tiled = jaxtile.tile_convs(stem, max_bytes=40_000)
  (region,) = jaxtile.explain(stem, max_bytes=40_000)(*args).regions
  assert region.convs == ("jaxtile/conv0",) and region.tiles != (1, 1)
  np.testing.assert_array_equal(jax.jit(tiled)(*args), jax.jit(stem)(*args))
  _assert_same_gradients(tiled, stem, *args)
  sds = [jax.ShapeDtypeStruct(s, jnp.float32)
         for s in ((7, 7, 3, 32), (32,), (32,), (1, 1024, 1024, 3))]
  assert temp_bytes(jaxtile.tile_convs(stem, max_bytes=2**20), *sds) <= 2 * 2**20
  conv_relu = lambda w, x: jax.nn.relu(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  report = jaxtile.explain(conv_relu, max_bytes=40_000)(args[0][:3, :3], args[3])
  assert not report.regions and report.convs[0].tiled


def test_a_stem_in_training_mode_is_a_region_with_its_statistics():
  # The same stem with batch statistics (haiku's and flax's BatchNorm in training mode): mean
  # and variance over the batch and every position of the conv's output. Its own loop left that
  # output whole, and the normalized values beside it: XLA does not normalize a loop's output in
  # place (its heap simulator shares no buffer that holds aliased values, as a loop's carry
  # does, with a user), so it held twice what the untiled program holds. As a region of one
  # conv, a statistics pass computes the conv's tiles once for the sums, the loop once more.
  def stem(w, gamma, beta, x):
    y = lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean = y.mean(axis=(0, 1, 2))
    var = (y * y).mean(axis=(0, 1, 2)) - mean * mean
    y = jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5) * gamma + beta)
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))

  rng = np.random.default_rng(12)
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((7, 7, 3, 16), (16,), (16,), (2, 97, 83, 3))]
  report = jaxtile.explain(stem, max_bytes=40_000)(*args)
  (region,) = report.regions
  assert region.convs == ("jaxtile/conv0",) and region.tiles != (1, 1), report
  tiled = jaxtile.tile_convs(stem, max_bytes=40_000)
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(stem)(*args), rtol=1e-5, atol=1e-5)
  _assert_same_gradients(tiled, stem, *args)
  sds = [jax.ShapeDtypeStruct(s, jnp.float32)
         for s in ((7, 7, 3, 32), (32,), (32,), (1, 1024, 1024, 3))]
  untiled = temp_bytes(stem, *sds)  # the conv's output, 32 MiB, normalized in place
  assert temp_bytes(jaxtile.tile_convs(stem, max_bytes=2**20), *sds) <= untiled / 8


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_pads_with_zeros_and_crops_are_region_ops(channels_last):
  # A pad's border is zeros, a crop drops positions: both shift the window a tile reads, and the
  # positions a pad adds are the zeros outside its operand (`region._shift_window`). Every op
  # is in one region; the output and every gradient (a pad's transpose is a crop, and a crop's
  # a pad) against the untiled program, at two budgets.
  f = _padded_net(channels_last)
  rng = np.random.default_rng(5)
  shape = (2, 33, 29, 3) if channels_last else (2, 3, 33, 29)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = lambda i, o: (3, 3, i, o) if channels_last else (o, i, 3, 3)
  ws = [jnp.asarray(rng.normal(size=kernel(i, o)) / 3, jnp.float32)
        for i, o in ((3, 6), (6, 6), (6, 4))]
  for budget in (12_000, 30_000):
    report = jaxtile.explain(f, max_bytes=budget)(x, *ws)
    (region,) = report.regions
    assert len(region.convs) == 3 and region.tiles != (1, 1), report
    np.testing.assert_allclose(jax.jit(jaxtile.tile_convs(f, max_bytes=budget))(x, *ws),
                               jax.jit(f)(x, *ws), rtol=1e-5, atol=1e-5)
  _assert_same_gradients(jaxtile.tile_convs(f, max_bytes=12_000), f, x, *ws)
  # Differentiated by JAX first, the crops' and pads' transposes are region ops too.
  loss = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=range(4))
  for i, (got, want) in enumerate(zip(
      jax.jit(jaxtile.tile_convs(loss, max_bytes=30_000))(x, *ws), jax.jit(loss)(x, *ws))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()),
                               err_msg=f"tile_convs(grad): argument {i}")


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_norms_over_the_channels_are_region_ops(channels_last):
  # A LayerNorm over the channels (ConvNeXt's) reduces each position's features to a value of
  # one feature, computes its mean and variance there and broadcasts them back; channel
  # attention's mean and max over the features (CBAM's) are concatenated and convolved. Each is
  # a pool over the features at one position (`canonical.keep_reduced_axes`), so the whole
  # network is one region: its temporaries a fraction of untiled, its output and gradients
  # the untiled program's. They used to end regions, holding what untiled holds.
  feature = -1 if channels_last else 1
  dn = ("NHWC", "HWIO", "NHWC") if channels_last else ("NCHW", "OIHW", "NCHW")
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  def layer_norm(y):
    mean = jnp.mean(y, axis=feature, keepdims=True)
    var = jnp.mean(y * y, axis=feature, keepdims=True) - mean * mean
    return (y - mean) * lax.rsqrt(jnp.maximum(var, 0.0) + 1e-6)

  def f(x, w1, w2, w3, w4):
    y = jax.nn.gelu(layer_norm(conv(x, w1)))
    y = conv(y, w2)
    att = jnp.concatenate([y.mean(axis=feature, keepdims=True),
                           y.max(axis=feature, keepdims=True)], axis=feature)
    y = y * jax.nn.sigmoid(conv(att, w3))
    return conv(jax.nn.relu(y), w4)

  rng = np.random.default_rng(6)
  shape = (2, 64, 48, 3) if channels_last else (2, 3, 64, 48)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = lambda i, o: (3, 3, i, o) if channels_last else (o, i, 3, 3)
  ws = [jnp.asarray(rng.normal(size=kernel(i, o)) / 3, jnp.float32)
        for i, o in ((3, 16), (16, 16), (2, 1), (16, 4))]
  budget = 200_000
  report = jaxtile.explain(f, max_bytes=budget)(x, *ws)
  (region,) = report.regions
  assert len(region.convs) == 4 and region.tiles != (1, 1), report
  tiled = jaxtile.tile_convs(f, max_bytes=budget)
  temp = lambda g: jax.jit(g).lower(x, *ws).compile().memory_analysis().temp_size_in_bytes
  assert temp(tiled) < temp(f) / 4, (temp(tiled), temp(f))
  np.testing.assert_allclose(jax.jit(tiled)(x, *ws), jax.jit(f)(x, *ws), rtol=1e-5, atol=1e-5)
  _assert_same_gradients(tiled, f, x, *ws)
  # Differentiated by JAX first, the program is exact too (a feature pool's transpose, a pad
  # and a pool along the features, ends a region there: it holds what untiled holds).
  loss = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=range(5))
  for i, (got, want) in enumerate(zip(
      jax.jit(jaxtile.tile_convs(loss, max_bytes=budget))(x, *ws), jax.jit(loss)(x, *ws))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()),
                               err_msg=f"tile_convs(grad): argument {i}")


def test_a_max_over_the_channels_has_the_untiled_gradients_at_the_image_edges():
  # `y - max(y)` over the features at each position: a max pool over the features with no
  # spatial window. Filled with the max's identity outside the image, as a pool with a window
  # is, its edge tiles computed -inf - -inf there: masked away in the output, but NaN in every
  # gradient. A pool that reads no neighbour is not filled.
  def f(x, w1, w2):
    y = _c(x, w1)
    return _c(jax.nn.gelu(y - jnp.max(y, axis=-1, keepdims=True)), w2)

  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(1, 24, 20, 3)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(k, k, i, o)) / 3, jnp.float32)
        for k, i, o in ((1, 3, 4), (3, 4, 4))]
  (region,) = jaxtile.explain(f, max_bytes=3_000)(x, *ws).regions
  assert len(region.convs) == 2 and region.tiles != (1, 1)
  _assert_same_gradients(jaxtile.tile_convs(f, max_bytes=3_000), f, x, *ws)


def test_explain_reports_each_convs_input_halo_as_the_receptive_field_grows():
  # The halo of each conv's input window, against the receptive field measured independently:
  # the support of the gradient of one interior output tile's sum with respect to that conv's
  # input (positive kernels and inputs, so nothing cancels), minus the tile's own footprint.
  strides = (1, 2, 1, 1)
  conv = lambda x, w, s: jax.nn.relu(_c(x, w, s))

  def f(x, *ws, start=0):
    for w, s in zip(ws[start:], strides[start:]):
      x = conv(x, w, s)
    return x

  x = jnp.ones((1, 256, 512, 16))
  ws = [jnp.full((3, 3, 16, 16), 0.01)] * 4
  report = jaxtile.explain(f, max_bytes=2**20)(x, *ws)
  (region,) = report.regions
  assert len(region.conv_halos) == 4 and min(region.tiles) >= 3, report
  tile, inputs = region.tile_shape, [x]
  for w, s in zip(ws, strides[:-1]):
    inputs.append(conv(inputs[-1], w, s))
  for k, halo in enumerate(region.conv_halos):
    scale = math.prod(strides[k:])
    corner = tile  # the second tile along each dim: its receptive field clear of the borders
    loss = lambda a: f(a, *ws, start=k)[:, corner[0]:corner[0] + tile[0],
                                        corner[1]:corner[1] + tile[1]].sum()
    support = np.nonzero(np.asarray(jax.grad(loss)(inputs[k])).any(axis=(0, 3)))
    width = tuple(int(ix.max() - ix.min() + 1) for ix in support)
    assert halo == tuple(w - t * scale for w, t in zip(width, tile)), (k, halo, width)
  assert "each conv's input halo: conv0 11x11, conv1 9x9, conv2 4x4, conv3 2x2" in " ".join(
      str(report).split()), report


def test_skip_concatenation_joins_the_decoder_region():
  # A UNet decoder level: transposed conv + bias, concatenated with the skip, then two convs.
  # All of it is one region starting at the transposed conv; the low-resolution input and the
  # skip are its two inputs, each read a window at a time.
  rng = np.random.default_rng(1)
  skip = jnp.asarray(rng.normal(size=(1, 38, 34, 4)), jnp.float32)
  low = jnp.asarray(rng.normal(size=(1, 19, 17, 8)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(2, 2, 8, 4)) / 4, jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(3, 3, 8, 4)) / 6, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.float32)
  b = jnp.asarray(rng.normal(size=(4,)), jnp.float32)

  def level(low, skip, wt, w1, w2, b):
    up = lax.conv_transpose(low, wt, (2, 2), "SAME", dimension_numbers=_DN) + b
    y = jax.nn.relu(_c(jnp.concatenate([up, skip], axis=-1), w1))
    return jax.nn.relu(_c(y, w2) - 0.5)

  args = (low, skip, wt, w1, w2, b)
  report = jaxtile.explain(level, max_bytes=12000)(*args)
  (region,) = report.regions
  # transposed conv, bias add, concatenate, conv, relu, conv, sub, relu
  assert len(region.convs) == 3 and region.n_eqns == 8, region
  np.testing.assert_allclose(jax.jit(jaxtile.tile_convs(level, max_bytes=12000))(*args),
                             jax.jit(level)(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, max_bytes", [
    (2, 2, "SAME", 6000), (3, 2, "VALID", 15000), (4, 3, ((1, 2), (0, 1)), 6000),
    (3, 3, "SAME", 15000)])
def test_transposed_conv_starts_a_region_exactly(kernel, stride, padding, max_bytes):
  # The transposed conv's input window starts at ceil(p0 / stride), not affine in the tile
  # offset; the loop dilates the window and aligns it per tile.
  rng = np.random.default_rng(kernel * 10 + stride)
  low = jnp.asarray(rng.normal(size=(1, 13, 11, 4)), jnp.float32)
  wt = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 4)) / 4, jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.float32)

  def f(low, wt, w1):
    up = lax.conv_transpose(low, wt, (stride, stride), padding, dimension_numbers=_DN) + 0.3
    return jax.nn.relu(_c(jax.nn.relu(up), w1))

  report = jaxtile.explain(f, max_bytes=max_bytes)(low, wt, w1)
  assert [r.convs for r in report.regions] == [("jaxtile/conv0", "jaxtile/conv1")], str(report)
  np.testing.assert_allclose(jax.jit(jaxtile.tile_convs(f, max_bytes=max_bytes))(low, wt, w1),
                             jax.jit(f)(low, wt, w1), rtol=1e-5, atol=1e-5)


def test_transposed_convs_inside_a_region_chain_stages():
  """An encoder-decoder: a strided conv down, convs, a transposed conv up joined by a skip, convs
  and a second transposed conv. The transposed convs inside the region start stages of one loop
  (`region.Chain`), every stage's output only a window per tile; the result is the untiled
  program's, and the report counts the stages."""
  keys = jax.random.split(jax.random.key(7), 6)
  w = [jax.random.normal(k, s) * 0.2 for k, s in zip(keys, [
      (3, 3, 4, 8), (3, 3, 8, 8), (2, 2, 8, 8), (3, 3, 12, 8), (4, 4, 8, 4), (3, 3, 4, 4)])]
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, k, s=1, p="SAME": lax.conv_general_dilated(x, k, (s, s), p,
                                                              dimension_numbers=dn)

  def f(x, skip):
    y = jax.nn.relu(conv(x, w[0], 2))
    y = jax.nn.relu(conv(y, w[1]))
    y = lax.conv_transpose(y, w[2], (2, 2), "VALID", dimension_numbers=dn)
    y = jnp.concatenate([jax.nn.relu(y), skip], axis=-1)
    y = jax.nn.relu(conv(y, w[3]))
    y = lax.conv_transpose(y, w[4], (2, 2), "SAME", dimension_numbers=dn)
    return conv(jax.nn.relu(y), w[5], 1, ((1, 0), (2, -1)))

  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(1, 38, 44, 4)), jnp.float32)
  skip = jnp.asarray(rng.normal(size=(1, 38, 44, 4)), jnp.float32)
  for budget in (40_000, 120_000):
    tiled = jaxtile.tile_convs(f, max_bytes=budget, fuse=True)
    report = jaxtile.explain(tiled)(x, skip)
    assert [r.stages for r in report.regions] == [3], report
    np.testing.assert_allclose(jax.jit(tiled)(x, skip), jax.jit(f)(x, skip), rtol=1e-6,
                               atol=1e-5)


def test_elementwise_ops_making_a_transposed_convs_input_start_its_stage():
  """A region that starts with elementwise ops (an activation, a bias) on its input and then a
  transposed conv: the ops run on the transposed conv's input window (whose start is a ceiling
  division of the tile offset), and the window is zeroed outside the input before the conv."""
  keys = jax.random.split(jax.random.key(13), 3)
  wt = jax.random.normal(keys[0], (3, 3, 4, 4)) * 0.3
  w = jax.random.normal(keys[1], (3, 3, 4, 4)) * 0.3
  b = jax.random.normal(keys[2], (4,))
  dn = ("NHWC", "HWIO", "NHWC")

  def f(x):
    y = jnp.exp(x) + b  # nonzero where the window reaches past the input: must be masked
    y = lax.conv_transpose(y, wt, (2, 2), "SAME", dimension_numbers=dn)
    y = lax.conv_general_dilated(jax.nn.relu(y), w, (1, 1), "SAME", dimension_numbers=dn)
    return lax.conv_general_dilated(y, w, (1, 1), ((1, 1), (0, 2)), dimension_numbers=dn)

  x = jnp.asarray(np.random.default_rng(14).normal(size=(1, 13, 17, 4)), jnp.float32)
  for budget in (8_000, 20_000):
    tiled = jaxtile.tile_convs(f, max_bytes=budget, fuse=True)
    report = jaxtile.explain(tiled)(x)
    first = report.regions[0]  # exp, add, the transposed conv, relu, a conv (and the last)
    assert first.convs[0] == "jaxtile/conv0" and first.n_eqns >= 5, report
    np.testing.assert_allclose(jax.jit(tiled)(x), jax.jit(f)(x), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5b. Nearest-neighbour upsampling: a stage, read as a transposed conv with a kernel of ones.
# ---------------------------------------------------------------------------------------------
def _upsampled(x, factors, form, spatial_axes):
  full = [1] * x.ndim
  for a, f in zip(spatial_axes, factors):
    full[a] = f
  if form == "resize":
    return jax.image.resize(x, [n * f for n, f in zip(x.shape, full)], "nearest")
  for a, f in enumerate(full):
    x = jnp.repeat(x, f, axis=a)
  return x


def _decoder_level(channels_last, factors, form, channels=4):
  """conv -> relu -> upsample -> exp + bias (nonzero past the image: must be masked before the
  next conv) -> conv -> relu -> conv with asymmetric padding."""
  dn = ("NHWC", "HWIO", "NHWC") if channels_last else ("NCHW", "HWIO", "NCHW")
  axes, bias_shape = ((1, 2), (1, 1, 1, channels)) if channels_last else (
      (2, 3), (1, channels, 1, 1))
  conv = lambda x, w, p="SAME": lax.conv_general_dilated(x, w, (1, 1), p, dimension_numbers=dn)

  def f(x, w1, w2, w3, b):
    y = _upsampled(jax.nn.relu(conv(x, w1)), factors, form, axes)
    y = jax.nn.relu(conv(jnp.exp(y) + b.reshape(bias_shape), w2))
    return conv(y, w3, ((1, 2), (0, 1)))
  return f


def _decoder_operands(channels_last, seed=0, spatial=(13, 11)):
  rng = np.random.default_rng(seed)
  shape = (2, *spatial, 4) if channels_last else (2, 4, *spatial)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.float32) for _ in range(3)]
  return x, *ws, jnp.asarray(rng.normal(size=(4,)), jnp.float32)


@pytest.mark.parametrize("form", ["resize", "repeat"])
@pytest.mark.parametrize("channels_last, factors", [(True, (2, 2)), (False, (3, 2)),
                                                    (True, (1, 3))])
def test_nearest_upsampling_is_a_stage_of_its_region(form, channels_last, factors):
  # The upsampled value exists a window per tile: its window starts at floor(tile start / f),
  # not affine in the tile offset, as a transposed conv's input. Tiles that do not divide the
  # image, a batch of 2, and forward and every gradient against the untiled program.
  f = _decoder_level(channels_last, factors, form)
  args = _decoder_operands(channels_last)
  for budget in (14_000, 20_000):
    report = jaxtile.explain(f, max_bytes=budget)(*args)
    (region,) = report.regions
    assert (len(region.convs), region.stages, region.upsamplings) == (3, 2, 1), report
    assert "and 1 upsampling fused" in region.describe()
    tiled = jaxtile.tile_convs(f, max_bytes=budget)
    np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-5)
  grads = lambda g: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(g(*a))), argnums=range(5)))(
      *args)
  for i, (got, want) in enumerate(zip(grads(jaxtile.tile_convs(f, max_bytes=14_000)),
                                      grads(f))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()),
                               err_msg=f"gradient w.r.t. argument {i}")


@pytest.mark.parametrize("form", ["resize", "repeat"])
def test_a_region_may_start_with_an_upsampling(form):
  # The upsampling (and the activation before it) make the first conv's input: the region's
  # input is the low-resolution value, read a window at a time.
  w1, w2 = _decoder_operands(True)[1:3]

  def f(low, w1, w2):
    y = _upsampled(jnp.tanh(low) + 0.5, (2, 2), form, (1, 2))
    return _c(jax.nn.relu(_c(y, w1)), w2, 1, ((2, 0), (1, 1)))

  low = jnp.asarray(np.random.default_rng(3).normal(size=(1, 17, 15, 4)), jnp.float32)
  report = jaxtile.explain(f, max_bytes=8_000)(low, w1, w2)
  (region,) = report.regions
  assert (len(region.convs), region.upsamplings, region.n_eqns) == (2, 1, 6), report
  tiled = jaxtile.tile_convs(f, max_bytes=8_000)
  np.testing.assert_allclose(jax.jit(tiled)(low, w1, w2), jax.jit(f)(low, w1, w2), rtol=1e-5,
                             atol=1e-5)


def test_upsampling_no_region_takes_keeps_its_own_equations():
  # Without regions (fuse=False) the program runs the user's own gather and reshapes; a resize
  # by a factor that is not an integer is no upsampling a region can take, and ends it.
  f = _decoder_level(True, (2, 2), "resize")
  args = _decoder_operands(True)
  text = str(jax.make_jaxpr(jaxtile.tile_convs(f, max_bytes=6_000, fuse=False))(*args))
  assert "gather" in text and "upsample" not in text

  def g(x, w1, w2, w3, b):
    y = jax.nn.relu(_c(x, w1))
    y = jax.image.resize(y, (2, 19, 22, 4), "nearest")  # 1.5x along H
    return _c(jax.nn.relu(_c(y, w2)), w3)

  report = jaxtile.explain(g, max_bytes=6_000)(*args)
  assert all(r.upsamplings == 0 for r in report.regions) and report.regions, report
  np.testing.assert_allclose(jax.jit(jaxtile.tile_convs(g, max_bytes=6_000))(*args),
                             jax.jit(g)(*args), rtol=1e-5, atol=1e-5)


def test_upsampling_steps_read_elsewhere_are_kept():
  # jnp.repeat along H, then along W: the value repeated along H alone is also returned, so the
  # two steps are two upsamplings, not one.
  args = _decoder_operands(True)

  def f(x, w1, w2, w3, b):
    h = jnp.repeat(jax.nn.relu(_c(x, w1)), 2, axis=1)
    z = jnp.repeat(h, 2, axis=2)
    return _c(jax.nn.relu(_c(z, w2)), w3), h

  tiled = jaxtile.tile_convs(f, max_bytes=6_000)
  for got, want in zip(jax.jit(tiled)(*args), jax.jit(f)(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert sum(r.upsamplings for r in jaxtile.explain(tiled)(*args).regions) == 1


@pytest.mark.parametrize("n", [1, 5, 17, 64, 1000])
def test_resize_is_an_upsampling_exactly_when_its_factor_is_an_integer(n):
  # jax.image.resize's gather indices, folded at trace time, against its own definition: a
  # size n * f is an upsampling by f; any other size is not one.
  x = jax.ShapeDtypeStruct((1, n, 3, 2), jnp.float32)
  for m in sorted({n * 2, n * 3, n * 7, n * 2 + 1, max(n - 1, 1), 3 * n // 2}):
    closed = jax.make_jaxpr(lambda x: jax.image.resize(x, (1, m, 3, 2), "nearest"))(x)
    factors = [upsample.factors_of(e) for e in upsample.group(closed.jaxpr).jaxpr.eqns]
    want = [(1, m // n, 1, 1)] if m % n == 0 and m > n else [None]
    assert factors == want, (n, m, factors)


def test_regions_run_under_jax_enable_x64():
  # With x64 a Python int in index arithmetic is int64; a region's tile offsets were int32, and
  # the loop's dynamic slices, given both, raised a TypeError at trace time.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np, jaxtile
      from test_region import _decoder_level, _decoder_operands
      f = _decoder_level(True, (2, 2), "resize")
      args = [a.astype(jnp.float64) for a in _decoder_operands(True)]
      tiled = jaxtile.tile_convs(f, max_bytes=28_000)
      (region,) = jaxtile.explain(tiled)(*args).regions
      assert np.prod(region.tiles) > 1, region
      np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(f)(*args), rtol=1e-12,
                                 atol=1e-12)
      grad = lambda g: jax.grad(lambda *a: jnp.sum(jnp.sin(g(*a))), argnums=(0, 1))(*args)
      for got, want in zip(grad(tiled), grad(f)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
      print("x64 ok", region.tiles)
      """)
  env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "x64 ok" in proc.stdout, proc.stderr[-3000:]


def test_a_region_in_bfloat16_matches_untiled_and_sums_its_gradients_in_float32():
  # A region computes each tile's layers in the program's dtype, as untiled does, so the
  # forward is the untiled one; its weight and bias gradients are summed over the tiles in
  # float32 (`region._accumulator_dtype`). Rounded to bfloat16 after each of these 64 tiles
  # instead, a bias gradient's error came out 2.0x untiled's. Errors are taken against the
  # same untiled program in float32 on the same rounded operands.
  def net(x, *params):
    for w, b in zip(params[::2], params[1::2]):
      x = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + b)
    return x

  rng = np.random.default_rng(0)
  shapes = [(3, 3, 8, 16), (16,), (3, 3, 16, 16), (16,), (1, 1, 16, 4), (4,)]
  params = [jnp.asarray(rng.standard_normal(s) / (math.sqrt(math.prod(s[:-1])) if len(s) > 1
                                                   else 4), jnp.bfloat16) for s in shapes]
  x = jnp.asarray(rng.standard_normal((1, 128, 128, 8)), jnp.bfloat16)
  target = jnp.asarray(rng.standard_normal((1, 128, 128, 4)), jnp.float32)
  tiled = jaxtile.tile_convs(net, max_bytes=40_000)
  (region,) = jaxtile.explain(tiled)(x, *params).regions
  assert math.prod(region.tiles) == 64, region

  np.testing.assert_array_equal(jax.jit(tiled)(x, *params), jax.jit(net)(x, *params))
  loss = lambda f: lambda *a: jnp.mean((f(*a).astype(jnp.float32) - target) ** 2)
  grad = lambda f, *a: jax.jit(jax.grad(loss(f), argnums=tuple(range(len(a)))))(*a)
  f32 = lambda a: a.astype(jnp.float32)
  want = grad(net, *map(f32, [x, *params]))
  error = lambda got, w: float(jnp.linalg.norm(f32(got) - w) / jnp.linalg.norm(w))
  for i, (t, u, w) in enumerate(zip(grad(tiled, x, *params), grad(net, x, *params), want)):
    assert error(t, w) <= 1.5 * error(u, w), (i, error(t, w), error(u, w))


def test_upsampled_activation_never_exists_at_full_size():
  # 128x128 -> x4 -> two convs at 512x512x16 (16 MiB per activation): untiled holds the
  # upsampled value and the conv between; tiled holds tiles.
  f = _decoder_level(True, (4, 4), "resize", channels=16)
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  args = (spec(1, 128, 128, 16), spec(3, 3, 16, 16), spec(3, 3, 16, 16), spec(3, 3, 16, 16),
          spec(16))
  untiled = temp_bytes(f, *args)
  tiled = temp_bytes(jaxtile.tile_convs(f, max_bytes=2**20), *args)
  assert untiled >= 32 * 2**20 and tiled <= untiled / 8, (untiled, tiled)


# ---------------------------------------------------------------------------------------------
# 6. Norms: statistics as tiled reductions (region.Statistics)
# ---------------------------------------------------------------------------------------------
def _group_norm(x, scale, groups, channel_axis, eps=1e-5):
  """GroupNorm as flax writes it: mean and E[x^2] per group over the image, broadcast back to
  the channels and applied to `x` in its own layout."""
  shape, c = x.shape, x.shape[channel_axis]
  g = x.reshape(shape[:channel_axis] + (groups, c // groups) + shape[channel_axis + 1:])
  axes = tuple(a for a in range(1, g.ndim) if a != channel_axis)
  mean, mean2 = jnp.mean(g, axes), jnp.mean(g * g, axes)  # (batch, groups)
  per_channel = [1] * x.ndim
  per_channel[0], per_channel[channel_axis] = shape[0], c
  back = lambda s: jnp.repeat(s, c // groups, axis=1).reshape(per_channel)
  return (x - back(mean)) * lax.rsqrt(back(mean2 - mean * mean) + eps) * scale


def _norm_net(channels_last):
  spec = ("NHWC", "HWIO", "NHWC") if channels_last else ("NCHW", "OIHW", "NCHW")
  c = -1 if channels_last else 1
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=spec)
  bshape = (1, 1, 1, 8) if channels_last else (1, 8, 1, 1)

  def net(x, w0, w1, w2, w3, s):
    x = conv(x, w0)
    # A residual block: norm, silu, conv, norm, silu, conv, add. Both norms read values the
    # region makes: their statistics are passes over those values' tiles.
    h = conv(jax.nn.silu(_group_norm(x, s.reshape(bshape), 4, c % 4)), w1)
    h = jax.nn.silu(_group_norm(h, s.reshape(bshape), 4, c % 4))
    x = x + conv(h, w2)
    return conv(jax.nn.relu(x), w3)

  def scaled(x, w0, w1, w2, w3, s):
    # Scaled by the image's largest magnitude: a max reduction over the tiles.
    x = conv(x, w0)
    x = x / jnp.max(jnp.abs(x), axis=(1, 2) if channels_last else (2, 3), keepdims=True)
    return conv(jax.nn.relu(conv(jax.nn.relu(x), w1)) * s.reshape(bshape), w3)
  return net, scaled


def _norm_operands(channels_last, shape=(1, 61, 47)):
  rng = np.random.default_rng(11)
  n, h, w = shape
  x = rng.normal(size=(n, h, w, 3) if channels_last else (n, 3, h, w))
  kernels = [(3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 2)]
  if not channels_last:
    kernels = [(o, i, kh, kw) for kh, kw, i, o in kernels]
  ws = [rng.normal(size=k) / 6 for k in kernels]
  return [jnp.asarray(a, jnp.float32) for a in (x, *ws, 1 + rng.normal(size=(8,)) / 4)]


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
@pytest.mark.parametrize("which, max_bytes, passes", [("block", 90000, 2), ("max", 24000, 1)])
def test_norm_statistics_are_tiled_reductions(channels_last, which, max_bytes, passes):
  # 61x47 does not divide into the tiles: the shifted-back last tiles overlap the ones before,
  # and a position must count once in a sum (and in a max). NCHW with a batch of 2: statistics
  # per sample, small operands of shape (2, 8, 1, 1).
  block, scaled = _norm_net(channels_last)
  net = block if which == "block" else scaled
  batch = 1 if channels_last else 2
  args = _norm_operands(channels_last, (batch, 61, 47))
  tiled = jaxtile.tile_convs(net, max_bytes=batch * max_bytes, fuse=True)  # tiles span the batch
  report = jaxtile.explain(tiled)(*args)
  (region,) = report.regions
  assert region.statistics == passes and len(region.convs) == 3, str(report)
  assert f"{passes} statistics pass{'es' if passes > 1 else ''})" in str(report)
  assert any(e % t for e, t in zip((61, 47), region.tile_shape)), region
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(net)(*args), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=range(6)))
  for got, want in zip(loss(tiled)(*args), loss(net)(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_flax_group_norm_blocks_hold_less_than_untiled():
  # The blocks of a VAE decoder or a diffusion UNet: GroupNorm, silu, conv, twice, plus the
  # skip. Before, every norm cut the network and each conv was tiled alone (every activation
  # at full size); now each block is a region and its second norm's statistics a tiled pass.
  nn = pytest.importorskip("flax.linen")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(16, (3, 3))(jax.nn.silu(nn.GroupNorm(num_groups=4)(x)))
      h = nn.Conv(16, (3, 3))(jax.nn.silu(nn.GroupNorm(num_groups=4)(h)))
      return x + h

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = Block()(Block()(nn.Conv(16, (3, 3))(x)))
      return nn.Conv(3, (3, 3))(x)

  model = Net()
  x = jax.random.normal(jax.random.key(1), (1, 250, 190, 3))
  params = model.init(jax.random.key(0), x)
  tiled = jaxtile.tile_convs(model.apply, max_bytes=400_000)
  report = jaxtile.explain(tiled)(params, x)
  assert len(report.regions) == 2 and all(r.statistics for r in report.regions), str(report)
  np.testing.assert_allclose(jax.jit(tiled)(params, x), jax.jit(model.apply)(params, x),
                             rtol=1e-5, atol=1e-5)
  untiled = temp_bytes(model.apply, params, x)
  assert temp_bytes(tiled, params, x) <= untiled // 2, (temp_bytes(tiled, params, x), untiled)
  # The gradient: the regions' backward loops, and the statistics passes' too (their sums'
  # derivatives run over tiles): 0.21x untiled here, 0.64x with the passes at full size.
  grad = lambda f: jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2))
  untiled, got = temp_bytes(grad(model.apply), params, x), temp_bytes(grad(tiled), params, x)
  assert got <= untiled // 3, (got, untiled)


def _centered_group_norm(x, scale, groups, channel_axis, eps=1e-5, xp=jnp):
  """GroupNorm as equinox and haiku write it: the channels split into groups, the mean and
  `jnp.var` (centred: a second pass over x - mean) per group, normalized while split, then
  merged back."""
  shape, c = x.shape, x.shape[channel_axis]
  g = x.reshape(shape[:channel_axis] + (groups, c // groups) + shape[channel_axis + 1:])
  axes = tuple(a for a in range(1, g.ndim) if a != channel_axis)
  mean, var = xp.mean(g, axes, keepdims=True), xp.var(g, axes, keepdims=True)
  return ((g - mean) / xp.sqrt(var + eps)).reshape(shape) * scale


@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_centered_group_norm_statistics_are_tiled_passes(channels_last):
  # The variance's sum reads the mean, a small value made from the first pass's sums, as a
  # second pass would; it is computed in the first pass by Chan's update. The normalization on
  # the split channels runs on the unsplit ones (`canonical.sink_splits`), and the per-channel
  # scale, broadcast to the image, is broadcast to each window. Before, no region formed.
  spec = ("NHWC", "HWIO", "NHWC") if channels_last else ("NCHW", "OIHW", "NCHW")
  c = -1 if channels_last else 1
  shape = (1, 1, 8) if channels_last else (8, 1, 1)  # one image's

  def make(xp, conv, offset):
    """The network in `xp` (jnp, or NumPy in float64 for the reference)."""
    silu = lambda v: v / (1 + xp.exp(-v))

    def net(x, w0, w1, w2, w3, s):
      x = conv(x, w0)
      # The scale broadcast to one image first, as equinox's GroupNorm does.
      scale = xp.broadcast_to(s.reshape(shape), x.shape[1:])
      h = conv(silu(_centered_group_norm(x + offset, scale, 4, c % 4, xp=xp)), w1)
      h = silu(_centered_group_norm(h + offset, s.reshape(shape), 4, c % 4, xp=xp))
      return conv(xp.maximum(x + conv(h, w2), 0), w3)
    return net

  net = make(jnp, lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=spec), 0)
  batch = 1 if channels_last else 2
  args = _norm_operands(channels_last, (batch, 61, 47))
  tiled = jaxtile.tile_convs(net, max_bytes=batch * 120000, fuse=True)
  report = jaxtile.explain(tiled)(*args)
  (region,) = report.regions
  # One pass per norm: the variance's sum of squares about the mean is computed in the mean's
  # pass (`region._centred`). As two passes each, the four would cost +129% multiply-adds,
  # past the recomputation limit, and the region would hold only the last two convs.
  assert region.statistics == 2 and len(region.convs) == 3, str(report)
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(net)(*args), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=range(6)))
  for got, want in zip(loss(tiled)(*args), loss(net)(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  if not channels_last:
    return  # the accuracy below once: it does not depend on the layout
  # The norms' inputs far from zero: E[x^2] - E[x]^2 would lose the variance to rounding (about
  # 1 against a mean square of 9e4, in float32); Chan's update is as accurate as the program's
  # two passes, against the NumPy reference in float64.
  far = make(jnp, lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=spec), 300)
  exact = make(np, lambda x, w: jaxtile.reference.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=spec), 300)(
          *[np.asarray(a, np.float64) for a in args])
  errors = [float(np.abs(np.asarray(jax.jit(f)(*args), np.float64) - exact).max())
            for f in (jaxtile.tile_convs(far, max_bytes=batch * 120000, fuse=True), far)]
  assert errors[0] <= 2 * errors[1], errors


def test_equinox_group_norm_blocks_hold_less_than_untiled():
  # equinox's GroupNorm under vmap: (C, H, W) split into groups, a centred variance, the
  # channelwise affine broadcast to the image. Before, no region formed, and the weights'
  # broadcasts made each conv's loop hold twice what untiled holds.
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.key(0), 6)

  class Block(eqx.Module):
    n1: eqx.nn.GroupNorm
    c1: eqx.nn.Conv2d
    n2: eqx.nn.GroupNorm
    c2: eqx.nn.Conv2d

    def __init__(self, k1, k2):
      self.n1, self.n2 = eqx.nn.GroupNorm(4, 16), eqx.nn.GroupNorm(4, 16)
      self.c1 = eqx.nn.Conv2d(16, 16, 3, padding=1, key=k1)
      self.c2 = eqx.nn.Conv2d(16, 16, 3, padding=1, key=k2)

    def __call__(self, x):
      h = self.c1(jax.nn.silu(self.n1(x)))
      return x + self.c2(jax.nn.silu(self.n2(h)))

  model = (eqx.nn.Conv2d(3, 16, 3, padding=1, key=keys[0]), Block(*keys[1:3]),
           Block(*keys[3:5]), eqx.nn.Conv2d(16, 3, 3, padding=1, key=keys[5]))

  def net(model, x):
    def one(x):
      for layer in model:
        x = layer(x)
      return x
    return jax.vmap(one)(x)

  x = jax.random.normal(jax.random.key(1), (1, 3, 160, 120))
  tiled = jaxtile.tile_convs(net, max_bytes=160_000)
  report = jaxtile.explain(tiled)(model, x)
  assert len(report.regions) == 2 and all(r.statistics for r in report.regions), str(report)
  # Each program compiled once: its temporaries, then its result.
  grad = lambda f: jax.grad(lambda m, x: jnp.sum(f(m, x) ** 2))
  (untiled, want), (got_bytes, got) = [
      (c.memory_analysis().temp_size_in_bytes, c(model, x))
      for c in (jax.jit(f).lower(model, x).compile() for f in (net, tiled))]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got_bytes <= untiled // 2, (got_bytes, untiled)
  (untiled, want), (got_bytes, got) = [
      (c.memory_analysis().temp_size_in_bytes, c(model, x))
      for c in (jax.jit(grad(f)).lower(model, x).compile() for f in (net, tiled))]
  assert got_bytes <= untiled // 2, (got_bytes, untiled)
  for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


def test_vae_decoder_gradient_matches_untiled():
  # examples/flax_vae_decoder.py at a small size: GroupNorm statistics passes, upsamplings
  # starting stages, residual blocks; every parameter's gradient and the latent's against
  # untiled, through the regions' backward loops.
  pytest.importorskip("flax.linen")
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
  try:
    import flax_vae_decoder
  finally:
    sys.path.pop(0)
  model = flax_vae_decoder.Decoder(widths=(16, 8), groups=4)
  z = jax.random.normal(jax.random.key(2), (1, 24, 20, 4))
  params = flax_vae_decoder.random_params(model, z)
  tiled = jaxtile.tile_convs(model.apply, max_bytes=2**17)
  report = jaxtile.explain(tiled)(params, z)
  assert sum(r.upsamplings for r in report.regions) >= 1, str(report)
  assert sum(r.statistics for r in report.regions) >= 1, str(report)
  ct = jax.random.normal(jax.random.key(3), jax.eval_shape(model.apply, params, z).shape)
  grad = lambda f: jax.jit(jax.grad(lambda p, z: jnp.sum(f(p, z) * ct), argnums=(0, 1)))
  want, got = grad(model.apply)(params, z), grad(tiled)(params, z)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# Equinox: unbatched layers under vmap
# ---------------------------------------------------------------------------------------------
def test_unit_axes_added_and_removed_around_convs_do_not_end_a_region():
  # What equinox's Conv does per example, under vmap: a batch axis of 1 added before the conv
  # (broadcast_in_dim + reshape once batched) and squeezed from its result (reshape + squeeze).
  # Each round trip leaves the value as it was; before, the first ended every region and each
  # conv was tiled alone, holding more than untiled.
  dn = ("NCHW", "OIHW", "NCHW")
  conv = lambda x, w: lax.conv_general_dilated(x[None], w, (1, 1), "SAME",
                                               dimension_numbers=dn)[0]
  def net(x, w1, b1, w2, b2):
    def one(x):
      h = jax.nn.relu(conv(x, w1) + b1[:, None, None])
      return conv(h, w2) + b2[:, None, None]
    return jax.vmap(one)(x)

  keys = jax.random.split(jax.random.key(5), 5)
  args = (jax.random.normal(keys[0], (2, 4, 96, 80)),
          jax.random.normal(keys[1], (8, 4, 3, 3)) / 6, jax.random.normal(keys[2], (8,)),
          jax.random.normal(keys[3], (4, 8, 3, 3)) / 8, jax.random.normal(keys[4], (4,)))
  tiled = jaxtile.tile_convs(net, max_bytes=40_000)
  (region,) = jaxtile.explain(tiled)(*args).regions
  assert len(region.convs) == 2, region
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(net)(*args), rtol=RTOL, atol=ATOL)
  assert temp_bytes(tiled, *args) <= temp_bytes(net, *args) // 4
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=range(5)))
  for got, want in zip(loss(tiled)(*args), loss(net)(*args)):
    np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(want).max()))


def _checkpointed(block, x, ws):
  """Conv blocks of two 3x3 convs with relus, each block wrapped by `block`."""
  conv = lambda x, w: jax.nn.relu(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for i in range(0, len(ws), 2):
    x = block(lambda x, w1, w2: conv(conv(x, w1), w2))(x, ws[i], ws[i + 1])
  return x


def test_checkpointed_blocks_are_inlined_into_the_region_around_them():
  # flax's nn.remat, haiku's hk.remat and diffusers' gradient checkpointing wrap each block in
  # `jax.checkpoint`. Its body was a jaxpr of its own, so a region stopped at every block and
  # each block's output existed whole. A checkpoint whose convs all join a region is its body:
  # the region's derivative recomputes what is inside it tile by tile anyway.
  ws = [jax.random.normal(k, (3, 3, 8, 8)) / 8 for k in jax.random.split(jax.random.key(8), 6)]
  x = jax.random.normal(jax.random.key(9), (1, 96, 80, 8))
  plain = lambda x, *ws: _checkpointed(lambda f: f, x, ws)
  remat = lambda x, *ws: _checkpointed(jax.checkpoint, x, ws)
  tiled = jaxtile.tile_convs(remat, max_bytes=100_000)
  (region,) = jaxtile.explain(tiled)(x, *ws).regions
  assert len(region.convs) == 6, region
  np.testing.assert_array_equal(jax.jit(tiled)(x, *ws), jax.jit(remat)(x, *ws))
  loss = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=range(7))
  for got, want in zip(jax.jit(loss(tiled))(x, *ws), jax.jit(loss(remat))(x, *ws)):
    np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(want).max()))
  # It holds what the same network without checkpoints holds tiled, forward and backward.
  plain_tiled = jaxtile.tile_convs(plain, max_bytes=100_000)
  assert temp_bytes(tiled, x, *ws) == temp_bytes(plain_tiled, x, *ws)
  assert temp_bytes(loss(tiled), x, *ws) == temp_bytes(loss(plain_tiled), x, *ws)
  assert temp_bytes(tiled, x, *ws) <= temp_bytes(remat, x, *ws) // 2


def test_a_checkpoint_whose_conv_no_region_takes_stays():
  # A block whose second conv reads its value transposed (H and W swapped: no region holds
  # that) keeps its checkpoint, so that jax.grad still recomputes the block instead of saving
  # its values; its first conv is tiled on its own inside it.
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  block = jax.checkpoint(lambda x, w: conv(jnp.swapaxes(jax.nn.relu(conv(x, w)), 1, 2), w))
  w = jax.random.normal(jax.random.key(10), (3, 3, 8, 8)) / 8
  x = jax.random.normal(jax.random.key(11), (1, 48, 40, 8))
  tiled = jaxtile.tile_convs(block, max_bytes=20_000)
  report = jaxtile.explain(tiled)(x, w)
  assert not report.regions and len(report.tiled) == 2, str(report)
  jaxpr = str(jax.make_jaxpr(tiled)(x, w))
  assert re.search(r"\b(remat2|checkpoint)\[", jaxpr), jaxpr
  np.testing.assert_allclose(jax.jit(tiled)(x, w), jax.jit(block)(x, w), rtol=RTOL, atol=ATOL)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1)))
  for got, want in zip(loss(tiled)(x, w), loss(block)(x, w)):
    np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(want).max()))


def _convnext_blocks(x, *params):
  """ConvNeXt's block, twice: a 7x7 depthwise conv, a LayerNorm over the features, and an MLP
  of two dense layers on the features (`h @ w`, and an einsum with a weight stored (out, in))
  with a GELU between, added to the block's input."""
  for wd, scale, w1, b1, w2, b2 in zip(*[iter(params)] * 6):
    h = lax.conv_general_dilated(x, wd, (1, 1), "SAME", feature_group_count=x.shape[-1],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean = h.mean(-1, keepdims=True)
    h = (h - mean) * lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    h = jax.nn.gelu(h @ w1 + b1.reshape(1, 1, 1, -1))  # flax's nn.Dense adds its bias so
    x = x + jnp.einsum("nhwd,cd->nhwc", h, w2) + b2
  return x


def _convnext_args(size=(2, 48, 40), channels=8):
  keys = iter(jax.random.split(jax.random.key(12), 16))
  x = jax.random.normal(next(keys), (*size, channels))
  block = lambda: (jax.random.normal(next(keys), (7, 7, 1, channels)) / 7,
                   1 + jax.random.normal(next(keys), (channels,)) / 8,
                   jax.random.normal(next(keys), (channels, 4 * channels)) / channels ** 0.5,
                   jax.random.normal(next(keys), (4 * channels,)) / 8,
                   jax.random.normal(next(keys), (channels, 4 * channels)) / (2 * channels),
                   jax.random.normal(next(keys), (channels,)) / 8)
  return x, *block(), *block()


def test_dense_layers_on_an_image_are_1x1_convs_of_its_region():
  # A product of an image's features with a weight matrix (flax's nn.Dense, `x @ w`) ended
  # every region, and the MLP's 4x-wide activation was whole. It is a 1x1 conv, and a region
  # holds it as one: the two blocks are one loop.
  args = _convnext_args()
  tiled = jaxtile.tile_convs(_convnext_blocks, max_bytes=60_000)
  report = jaxtile.explain(tiled)(*args)
  assert len(report.convs) == 6 and all(c.region for c in report.convs), str(report)
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(_convnext_blocks)(*args),
                             rtol=RTOL, atol=ATOL)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=range(13)))
  for got, want in zip(loss(tiled)(*args), loss(_convnext_blocks)(*args)):
    np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(want).max()))
  assert temp_bytes(tiled, *args) <= temp_bytes(_convnext_blocks, *args) // 4
  assert temp_bytes(loss(tiled), *args) <= temp_bytes(loss(_convnext_blocks), *args) // 4
  # In the program JAX has differentiated, the products of the backward pass too.
  grad = jax.grad(lambda *a: jnp.sum(jnp.sin(_convnext_blocks(*a))), argnums=range(13))
  for got, want in zip(jax.jit(jaxtile.tile_convs(grad, max_bytes=60_000))(*args),
                       jax.jit(grad)(*args)):
    np.testing.assert_allclose(got, want, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(want).max()))


def test_dense_layers_no_region_takes_stay_products():
  args = _convnext_args()
  for tiled in (jaxtile.tile_convs(_convnext_blocks),  # nothing to split at the default budget
                jaxtile.tile_convs(_convnext_blocks, max_bytes=60_000, fuse=False)):
    report = jaxtile.explain(tiled)(*args)
    assert len(report.convs) == 2 and not report.regions, str(report)
    jaxpr = str(jax.make_jaxpr(tiled)(*args))
    assert jaxpr.count("dot_general") == 4, jaxpr
    # and nothing made for the convs they stood for (a weight transposed for one)
    assert jaxpr.count("transpose[") == str(jax.make_jaxpr(_convnext_blocks)(*args)).count(
        "transpose["), jaxpr
    np.testing.assert_array_equal(jax.jit(tiled)(*args), jax.jit(_convnext_blocks)(*args))


def test_reshapes_that_do_not_come_back_stay():
  # A reshape splitting the features (not undone) and one undone only after an op on the split
  # value: neither is a round trip, both stay, and the result is the untiled one.
  def net(x, w1, w2):
    h = jax.nn.relu(lax.conv(x, w1, (1, 1), "SAME"))
    g = h.reshape(h.shape[0], 2, h.shape[1] // 2, *h.shape[2:]) * 2.0
    return lax.conv(g.reshape(h.shape), w2, (1, 1), "SAME"), g

  keys = jax.random.split(jax.random.key(6), 3)
  args = (jax.random.normal(keys[0], (1, 4, 40, 36)), jax.random.normal(keys[1], (8, 4, 3, 3)),
          jax.random.normal(keys[2], (4, 8, 3, 3)))
  tiled = jaxtile.tile_convs(net, max_bytes=20_000)
  for got, want in zip(jax.jit(tiled)(*args), jax.jit(net)(*args)):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_equinox_resnet_blocks_are_regions_and_their_gradient_matches():
  # examples/equinox_resnet.py at a small size, under vmap as equinox models run: its relus'
  # JVP rules, vmapped, broadcast their zeros twice (unbatched, then batched), folded into one
  # broadcast a tile makes at its window's shape.
  eqx = pytest.importorskip("equinox")
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
  try:
    import equinox_resnet
  finally:
    sys.path.pop(0)
  model = equinox_resnet.random_model(equinox_resnet.ResNet, 3, (8, 8, 16), strides=(1, 2, 1),
                                      n_classes=3)
  x = jax.random.normal(jax.random.key(7), (2, 3, 64, 56))
  tiled = jaxtile.tile_convs(equinox_resnet.forward, max_bytes=2**16)
  report = jaxtile.explain(tiled)(model, x)
  assert report.regions and sum(len(r.convs) for r in report.regions) == len(report.convs), (
      str(report))
  np.testing.assert_allclose(jax.jit(tiled)(model, x), jax.jit(equinox_resnet.forward)(model, x),
                             rtol=RTOL, atol=ATOL)
  params, static = eqx.partition(model, eqx.is_array)
  grad = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(eqx.combine(p, static), x) ** 2),
                                    argnums=(0, 1)))
  want, got = grad(equinox_resnet.forward)(params, x), grad(tiled)(params, x)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))


def test_a_classifier_head_does_not_pull_the_network_into_its_pooling():
  # A ResNet classifier (haiku's ResNet18 at inference is this shape): blocks, then a global
  # average pool over the image and a dense layer. The pool is a reduction of the last
  # activation; elementwise ops read by it alone may join its statistics group, but the walk
  # used to move everything before them too, conv by conv, and no region formed (haiku's
  # ResNet18 at 1x1024x1024x3 held 136 MiB tiled against 88 untiled; now 29).
  def net(x, w0, w1, w2, dense):
    x = jax.nn.relu(lax.conv(x, w0, (1, 1), "SAME"))
    h = jax.nn.relu(lax.conv(x, w1, (1, 1), "SAME"))
    x = jax.nn.relu(x + lax.conv(h, w2, (1, 1), "SAME"))
    return jnp.mean(x, axis=(2, 3)) @ dense

  keys = jax.random.split(jax.random.key(8), 5)
  args = (jax.random.normal(keys[0], (1, 3, 96, 80)),
          jax.random.normal(keys[1], (8, 3, 3, 3)) / 5, jax.random.normal(keys[2], (8, 8, 3, 3)) / 8,
          jax.random.normal(keys[3], (8, 8, 3, 3)) / 8, jax.random.normal(keys[4], (8, 10)))
  tiled = jaxtile.tile_convs(net, max_bytes=30_000)
  (region,) = jaxtile.explain(tiled)(*args).regions
  assert len(region.convs) == 3, region
  np.testing.assert_allclose(jax.jit(tiled)(*args), jax.jit(net)(*args), rtol=RTOL, atol=ATOL)
  assert temp_bytes(tiled, *args) <= temp_bytes(net, *args) // 2


# ---------------------------------------------------------------------------------------------
# 8. A program JAX has already differentiated: `tile_convs(jax.grad(f))`.
# ---------------------------------------------------------------------------------------------
# The forward's convs, the input-gradient convs and the activations' derivatives are one region;
# the weight gradients (convs summing over every position), bias gradients and the loss are
# reductions its loop adds up itself (`region.Reductions`).
def _net(p, x, stride=1, padding="SAME"):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.nn.relu(lax.conv_general_dilated(x, p["w1"], (1, 1), "SAME", dimension_numbers=dn)
                  + p["b1"])
  h = jnp.tanh(lax.conv_general_dilated(h, p["w2"], (stride, stride), "SAME", rhs_dilation=(2, 2),
                                        dimension_numbers=dn, feature_group_count=2) + p["b2"])
  return lax.conv_general_dilated(h, p["w3"], (1, 1), padding, dimension_numbers=dn)


def _net_operands(shape=(2, 100, 92, 4)):
  keys = jax.random.split(jax.random.key(9), 7)
  params = {"w1": jax.random.normal(keys[0], (3, 3, 4, 8)) * 0.3,
            "b1": jax.random.normal(keys[1], (8,)) * 0.1,
            "w2": jax.random.normal(keys[2], (3, 3, 4, 8)) * 0.3,
            "b2": jax.random.normal(keys[3], (8,)) * 0.1,
            "w3": jax.random.normal(keys[4], (5, 5, 8, 8)) * 0.2}
  x = jax.random.normal(keys[5], shape)
  y = jax.random.normal(keys[6], (*shape[:-1], 8))
  return params, x, y


DIFFERENTIATED = {
    # the loss too, and every gradient: 3 weights, 2 biases, the input
    "value_and_grad": (lambda p, x, y: jax.value_and_grad(
        lambda p, x: jnp.sum(_net(p, x) ** 2), argnums=(0, 1))(p, x), 6, True),
    # no input gradient: the region's last value is read by reductions alone, never written
    "weights only": (lambda p, x, y: jax.grad(lambda p: jnp.sum(_net(p, x) ** 2))(p), 5, False),
    # a target read a window at a time, and VALID padding
    "mean squared error, VALID": (lambda p, x, y: jax.grad(
        lambda p, x: jnp.mean((_net(p, x, padding="VALID") - y[:, 2:-2, 2:-2]) ** 2),
        argnums=(0, 1))(p, x), 5, True),
    # the strided conv's input gradient is lhs-dilated: the region starts after it
    "strided": (lambda p, x, y: jax.grad(lambda p, x: jnp.sum(jnp.sin(_net(p, x, stride=2))),
                                         argnums=(0, 1))(p, x), 2, True),
}


@pytest.mark.parametrize("name", sorted(DIFFERENTIATED))
def test_a_differentiated_program_is_a_region_adding_up_its_weight_gradients(name):
  fn, reductions, written = DIFFERENTIATED[name]
  params, x, y = _net_operands()
  tiled = jaxtile.tile_convs(fn, max_bytes=2**18)
  (region,) = jaxtile.explain(tiled)(params, x, y).regions
  assert region.reductions == reductions, region
  want, got = jax.jit(fn)(params, x, y), jax.jit(tiled)(params, x, y)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))
  # The region writes its last value (the input's gradient) only where something reads it.
  jaxpr = jax.make_jaxpr(tiled)(params, x, y)
  outs = [e.outvars for e in _all_eqns(jaxpr.jaxpr)
          if e.primitive.name == "jaxtile_region_reductions"]
  assert len(outs) == 1 and (len(outs[0]) == reductions + 1) == written, outs


def test_a_differentiated_region_too_tight_for_its_budget_takes_larger_tiles(caplog):
  # At 32 kB no tile of the differentiated program's region is within the budget and under the
  # recomputation limit (its halo is the forward's and the backward's). Rather than tile each
  # conv on its own, which keeps every activation whole, the region takes tiles of up to 8x
  # the budget, and says so; `strict=True` keeps the budget instead.
  params, x, _ = _net_operands()
  fn = lambda p, x: jax.grad(lambda p, x: jnp.sum(_net(p, x) ** 2), argnums=(0, 1))(p, x)
  budget = 2**15
  with caplog.at_level(logging.WARNING):
    tiled = jaxtile.tile_convs(fn, max_bytes=budget)
    (region,) = jaxtile.explain(tiled)(params, x).regions
  assert region.reductions == 5 and budget < region.tile_bytes <= 8 * budget, region
  assert any(f"above max_bytes={budget}" in r.getMessage() and "jax.grad(tile_convs(f))"
             in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
  want = jax.jit(fn)(params, x)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(jax.jit(tiled)(params, x))):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()))
  strict = jaxtile.tile_convs(fn, max_bytes=budget, strict=True)
  assert all(r.tile_bytes <= budget for r in jaxtile.explain(strict)(params, x).regions)
  temp = lambda f: jax.jit(f).lower(params, x).compile().memory_analysis().temp_size_in_bytes
  assert temp(tiled) < 0.5 * temp(strict), (temp(tiled), temp(strict))


def _all_eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _all_eqns(sub)


def test_a_training_step_reading_weight_gradients_before_the_region_ends():
  # The optimizer's update of w3 reads its gradient, made early in the backward pass, before
  # the backward convs that the region ends with: it must wait for the region's loop.
  def step(p, x, y):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((_net(p, x) - y) ** 2))(p)
    return loss, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

  params, x, y = _net_operands()
  tiled = jaxtile.tile_convs(step, max_bytes=2**18)
  assert jaxtile.explain(tiled)(params, x, y).regions
  for w, g in zip(jax.tree.leaves(jax.jit(step)(params, x, y)),
                  jax.tree.leaves(jax.jit(tiled)(params, x, y))):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()))


@st.composite
def differentiated_chains(draw) -> Chain:
  """Chains whose differentiated program forms a region: convs at stride 1 (a strided conv's
  input gradient is a transposed conv), no pools or upsamplings, images large enough for a few
  tiles within the recomputation limit."""
  rank = draw(st.sampled_from([1, 2]))
  layer = st.builds(
      Layer, kernel=st.tuples(*[st.sampled_from([1, 2, 3])] * rank),
      strides=st.just((1,) * rank), rhs_dilation=st.tuples(*[st.sampled_from([1, 2])] * rank),
      padding=st.one_of(st.sampled_from(["SAME", "VALID"]), pad_pairs(rank)),
      groups=st.sampled_from([1, 2]), bias=st.booleans(),
      activation=st.sampled_from(sorted(ACTIVATIONS)), residual=st.booleans())
  chain = Chain(
      channels_last=draw(st.booleans()), batch=draw(st.integers(1, 2)),
      spatial=draw(st.tuples(*[st.integers(96, 128)] * rank) if rank == 2 else st.tuples(
          st.integers(400, 600))),
      layers=tuple(draw(st.lists(layer, min_size=2, max_size=3))),
      seed=draw(st.integers(0, 2**16)), per_example=draw(st.booleans()))
  assume(chain.activation_shapes() is not None)
  return chain


@settings(max_examples=10, deadline=None, derandomize=True)
@given(differentiated_chains())
def test_random_differentiated_chains_match_untiled(chain):
  # `tile_convs(jax.grad(f))` on random chains whose gradient forms a region with reductions:
  # every operand's gradient (input, kernels, biases) against the untiled gradient of the same
  # function with its padding explicit (the module docstring).
  f = chain.fn()
  x, params = chain.operands()
  ct = jnp.asarray(np.random.default_rng(chain.seed).standard_normal(
      jax.eval_shape(f, x, *params).shape).astype(np.float32))
  argnums = tuple(range(1 + len(params)))
  grad = lambda fun: jax.grad(lambda *a: jnp.sum(fun(*a) * ct), argnums=argnums)
  max_bytes = 2 * chain.budget()  # half the largest activation's bytes
  tiled = jaxtile.tile_convs(grad(f), max_bytes=max_bytes, fuse=True)
  regions = jaxtile.explain(tiled)(x, *params).regions
  want = jax.jit(grad(chain.fn(explicit_padding=True)))(x, *params)
  got = jax.jit(tiled)(x, *params)
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * max(1.0, float(
        jnp.abs(w).max())), err_msg=f"gradient w.r.t. argument {i}: {chain}, {regions}")


def test_a_differentiated_per_example_chain_is_one_region():
  # Convs run per example under vmap (equinox's): the gradient transposes each added unit axis
  # into a sum over that axis of extent 1 and a broadcast back, a round trip too
  # (`canonical.drop_round_trips`). Before, the region started after the first layer.
  layer = Layer(kernel=(3, 3), strides=(1, 1), rhs_dilation=(1, 1), padding="SAME")
  chain = Chain(True, 1, (96, 96), (layer, dataclasses.replace(layer, activation="tanh")),
                per_example=True)
  f = chain.fn()
  x, params = chain.operands()
  grad = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(1 + len(params))))
  tiled = jaxtile.tile_convs(grad, max_bytes=2 * chain.budget())
  report = jaxtile.explain(tiled)(x, *params)
  (region,) = report.regions
  assert len(region.convs) == len(report.convs) == 6, str(report)  # 2 forward, 2 + 2 backward
  for g, w in zip(jax.jit(tiled)(x, *params), jax.jit(grad)(x, *params)):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()))


@pytest.mark.parametrize("argnum", [0, 1])
def test_a_differentiated_region_whose_operands_are_all_small_plans(argnum):
  # A tiny grouped 1-D conv's gradient with respect to one operand: every operand of the region
  # is small enough to be read whole, so none is read in windows; planning halved its tiles by
  # the windowed inputs' halo and raised "max() arg is an empty sequence" from inside the pass.
  from jaxtile import reference
  kw = dict(window_strides=(1,), padding=((-1, -1),), dimension_numbers=("NCH", "OIH", "NCH"),
            feature_group_count=2)
  rng = np.random.default_rng(0)
  operands = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((1, 4, 3), (4, 2, 1))]
  f = lambda x, w: lax.conv_general_dilated(x, w, **kw)
  ct = jnp.asarray(rng.normal(size=f(*operands).shape), jnp.float32)
  grad = jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), argnums=argnum)
  got = jax.jit(jaxtile.tile_convs(grad, max_bytes=48))(*operands)
  np.testing.assert_allclose(got, jax.jit(grad)(*operands), rtol=1e-5, atol=1e-6)
  # The conv is linear in each operand: the float64 reference gradient, entry by entry.
  target = operands[argnum]
  want = np.zeros(target.size)
  for j in range(target.size):
    args = [np.asarray(a, np.float64) for a in operands]
    args[argnum] = np.eye(target.size)[j].reshape(target.shape)
    want[j] = np.sum(reference.conv_general_dilated(*args, **kw) * np.asarray(ct))
  np.testing.assert_allclose(got, want.reshape(target.shape), rtol=1e-5, atol=1e-5)


def test_a_differentiated_region_under_jvp_and_vmap():
  # Forward mode through a gradient (a Hessian-vector product) and vmap run the region's
  # equations at full size, each conv tiled on its own: exact, without the loop.
  params, x, _ = _net_operands((1, 64, 60, 4))
  grad = lambda p, x: jax.grad(lambda p, x: jnp.sum(_net(p, x) ** 2), argnums=(0, 1))(p, x)
  tiled = jaxtile.tile_convs(grad, max_bytes=2**16)
  assert jaxtile.explain(tiled)(params, x).regions
  dp = jax.tree.map(jnp.ones_like, params)
  want = jax.jit(lambda p: jax.jvp(lambda p: grad(p, x), (p,), (dp,)))(params)
  got = jax.jit(lambda p: jax.jvp(lambda p: tiled(p, x), (p,), (dp,)))(params)
  xs = jnp.stack([x, -x])
  want_v = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(params, xs)
  got_v = jax.jit(jax.vmap(tiled, in_axes=(None, 0)))(params, xs)
  for w, g in zip(jax.tree.leaves((want, want_v)), jax.tree.leaves((got, got_v))):
    np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()))


def test_a_differentiated_chain_holds_tiles_not_activations():
  # The 8-layer chain's gradient JAX has made: its activations and their cotangents are values
  # of one region, the weight gradients its reductions (31 MiB against 544 untiled, max_bytes
  # 8 MiB). Tiling each conv on its own held 483.
  grad = jax.grad(lambda x, ws: _deep_chain(x, ws).sum(), argnums=(0, 1))
  untiled = temp_bytes(grad, *_DEEP_ARGS)
  tiled = temp_bytes(jaxtile.tile_convs(grad, max_bytes=8 * MiB), *_DEEP_ARGS)
  assert untiled >= 8 * 32 * MiB, untiled
  assert tiled <= untiled // 8, (tiled, untiled)


def test_a_loss_inside_the_tiled_function_is_a_reduction_of_its_region():
  # `jax.grad(tile_convs(loss))` with the loss inside: the sum over the last activation is
  # the region's reduction, so neither that activation nor its cotangent exists at full size;
  # the reduction's derivative runs over the same tiles (`region_reductions_jvp_p`, transposed
  # by the backward loop). A max among them has its derivative at full size, exactly.
  params, x, _ = _net_operands((1, 64, 60, 4))
  losses = {"sum": lambda p, x: jnp.sum(_net(p, x) ** 2),
            "sum and max": lambda p, x: (lambda y: jnp.sum(y) + jnp.max(y))(_net(p, x))}
  for name, loss in losses.items():
    tiled = jaxtile.tile_convs(loss, max_bytes=2**16)
    (region,) = jaxtile.explain(tiled)(params, x).regions
    assert region.reductions == (1 if name == "sum" else 2), region
    np.testing.assert_allclose(jax.jit(tiled)(params, x), jax.jit(loss)(params, x), rtol=RTOL)
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    got = jax.jit(jax.grad(tiled, argnums=(0, 1)))(params, x)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree_util.tree_leaves(got)):
      np.testing.assert_allclose(g, w, rtol=GRAD_TOL, atol=GRAD_TOL * float(jnp.abs(w).max()),
                                 err_msg=f"{name}: {jax.tree_util.keystr(path)}")


def test_a_loss_inside_the_tiled_chain_holds_less_than_one_outside():
  # The 8-layer chain's gradient at max_bytes 8 MiB: with the sum outside `tile_convs` the last
  # activation and its cotangent exist at full size (78 MiB); inside, neither does (48).
  loss = lambda x, ws: (_deep_chain(x, ws) ** 2).sum()
  grad = lambda f: jax.grad(f, argnums=(0, 1))
  outside = temp_bytes(grad(lambda x, ws: (jaxtile.tile_convs(_deep_chain, max_bytes=8 * MiB)(
      x, ws) ** 2).sum()), *_DEEP_ARGS)
  inside = temp_bytes(grad(jaxtile.tile_convs(loss, max_bytes=8 * MiB)), *_DEEP_ARGS)
  assert inside <= outside - 16 * MiB, (inside, outside)


def _longest_or_chain(hlo_text: str) -> int:
  """The most `or`s in a row, each reading the one before, in a lowered StableHLO program."""
  depth = {}
  for line in hlo_text.splitlines():
    defined = re.match(r"\s*(%[\w#]+) = (\S+)(?: (%[\w#]+), (%[\w#]+))?", line)
    if defined is None:
      continue
    name, op, a, b = defined.groups()
    depth.pop(name, None)  # SSA names are reused from one function to the next
    if op == "stablehlo.or":
      depth[name] = 1 + max(depth.get(a, 0), depth.get(b, 0))
  return max(depth.values(), default=0)


def test_a_region_of_many_operands_waits_for_them_through_a_tree():
  # A region's loop starts from zeros made once all its operands exist (`region._zeros_after`),
  # computed from an element of each. Joined by a chain of `or`s, XLA's simplifier moved a
  # reshape past one `or` per run of its fixed-point pipeline, so the pipeline ran once per
  # operand (haiku's ResNet18 gradient: 43 runs of the simplification passes, 5 untiled): work
  # a user waits for at every compile. A balanced tree takes log2 of them (11 runs). Compile
  # time itself is never asserted; the chain is the deterministic part of it.
  def f(x, ws, bs):
    for w, b in zip(ws, bs):
      x = jax.nn.relu(_c(x, w) + b)
    return x

  layers = 16
  x = jax.ShapeDtypeStruct((1, 128, 128, 4), jnp.float32)
  ws = [jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.float32)] * layers
  bs = [jax.ShapeDtypeStruct((4,), jnp.float32)] * layers
  (region,) = jaxtile.explain(f, max_bytes=2**14)(x, ws, bs).regions
  assert len(region.convs) == layers and region.tiles != (1, 1)
  hlo = jax.jit(jaxtile.tile_convs(f, max_bytes=2**14)).lower(x, ws, bs).as_text()
  operands = 2 * layers + 1
  assert 0 < _longest_or_chain(hlo) <= math.ceil(math.log2(operands)), _longest_or_chain(hlo)
