"""`forms.conv`: the backend's fast form of a conv equals the plain conv, and so do its
derivatives (which jaxtile defines itself, to keep them in the fast form)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxtile._src import forms
from jaxtile import reference

FAST = forms.Forms(pad_unpadded=True, channels_last=True, xla_cpu_workarounds=True)

CASES = {
    # name: (lhs shape, rhs shape, conv kwargs)
    "nhwc-valid": ((2, 9, 8, 4), (3, 3, 4, 5), dict(window_strides=(1, 1), padding="VALID",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "nchw-same": ((2, 4, 9, 8), (5, 4, 3, 3), dict(window_strides=(1, 1), padding="SAME",
                                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "strided-dilated": ((1, 4, 11, 10), (6, 4, 3, 2), dict(
        window_strides=(2, 3), padding=((0, 0), (0, 0)), rhs_dilation=(2, 1),
        dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "lhs-dilated": ((1, 7, 6, 3), (2, 3, 3, 4), dict(
        window_strides=(1, 1), padding=((1, 2), (0, 1)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "feature-groups": ((2, 6, 7, 7), (6, 3, 3, 3), dict(
        window_strides=(1, 1), padding="VALID", feature_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "batch-groups": ((4, 3, 6, 6), (4, 3, 2, 2), dict(
        window_strides=(1, 1), padding="VALID", batch_group_count=2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "odd-layout": ((5, 6, 2, 3), (3, 2, 3, 4), dict(
        window_strides=(1, 1), padding="VALID", dimension_numbers=("HWNC", "WHIO", "CWNH"))),
    "1d": ((2, 3, 12), (4, 3, 3), dict(window_strides=(2,), padding="VALID",
                                      dimension_numbers=("NCH", "OIH", "NCH"))),
    "3d": ((1, 5, 6, 4, 2), (2, 2, 3, 2, 3), dict(
        window_strides=(1, 1, 1), padding="VALID",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}


def operands(name):
  lhs_shape, rhs_shape, _ = CASES[name]
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=lhs_shape), jnp.float32),
          jnp.asarray(rng.normal(size=rhs_shape), jnp.float32))


def plain_and_fast(name):
  kwargs = CASES[name][2]
  plain = functools.partial(lax.conv_general_dilated, **kwargs)
  params = jax.make_jaxpr(plain)(*operands(name)).jaxpr.eqns[-1].params
  return plain, lambda l, r: forms.conv(l, r, dict(params), FAST)


@pytest.mark.parametrize("name", CASES)
def test_value_and_derivatives_match_the_plain_conv(name):
  plain, fast = plain_and_fast(name)
  lhs, rhs = operands(name)
  np.testing.assert_allclose(fast(lhs, rhs), plain(lhs, rhs), rtol=1e-5, atol=1e-5)
  tangents = (jnp.cos(lhs), 0.5 - rhs)
  _, t_fast = jax.jvp(fast, (lhs, rhs), tangents)
  _, t_plain = jax.jvp(plain, (lhs, rhs), tangents)
  np.testing.assert_allclose(t_fast, t_plain, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda l, r: jnp.sum(jnp.sin(f(l, r)))
  for got, want in zip(jax.grad(loss(fast), argnums=(0, 1))(lhs, rhs),
                       jax.grad(loss(plain), argnums=(0, 1))(lhs, rhs)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["nchw-same", "strided-dilated"])
def test_second_order(name):
  plain, fast = plain_and_fast(name)
  lhs, rhs = operands(name)
  hvp = lambda f: jax.grad(lambda l: jnp.vdot(jax.grad(lambda l: jnp.sum(f(l, rhs) ** 2))(l), l))
  np.testing.assert_allclose(hvp(fast)(lhs), hvp(plain)(lhs), rtol=1e-4, atol=1e-3)


def test_gradient_convs_are_bound_in_the_fast_form():
  """The convs XLA receives for the gradient are channels-last, like the forward's (JAX's own
  transposes of an NCHW conv would be channels-first)."""
  _, fast = plain_and_fast("nchw-same")
  lhs, rhs = operands("nchw-same")
  grad = jax.grad(lambda l, r: jnp.sum(jnp.sin(fast(l, r))), argnums=(0, 1))
  convs = [l for l in jax.jit(grad).lower(lhs, rhs).as_text().splitlines()
           if "stablehlo.convolution" in l]
  assert len(convs) == 3, convs  # forward, d/dlhs, d/drhs
  for line in convs:
    assert "dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]" in line, line


@pytest.mark.parametrize("name", ["lhs-dilated", "strided-dilated", "1d"])
def test_vmap_of_grad_and_mixed_second_order(name):
  # vmap of a gradient (per-example gradients) and d/dlhs of a kernel gradient (gradient
  # penalties) failed with the earlier custom_jvp + linear_call derivatives.
  plain, fast = plain_and_fast(name)
  lhs, rhs = operands(name)
  per_example = lambda f: jax.vmap(jax.grad(lambda l, r: jnp.sum(jnp.sin(f(l[None], r))), 1),
                                   (0, None))(lhs, rhs)
  np.testing.assert_allclose(per_example(fast), per_example(plain), rtol=1e-4, atol=1e-4)
  penalty = lambda f: jax.grad(
      lambda l, r: jnp.sum(jax.grad(lambda r: jnp.sum(jnp.sin(f(l, r))))(r) ** 2), (0, 1))(
          lhs, rhs)
  for got, want in zip(penalty(fast), penalty(plain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_negative_padding_is_cropped_exactly():
  # XLA:CPU reads out of bounds for negative-low / positive-high padding (values that change
  # from call to call; the plain lax conv below shows it). The fast form crops the operand
  # instead: checked against the NumPy reference over repeated calls and every mix of signs.
  rng = np.random.default_rng(0)
  cases = [((1, 12, 2), (4, 2, 1), dict(window_strides=(2,), padding=(pad,),
                                         dimension_numbers=("NWC", "WIO", "NWC")))
           for pad in ((-2, 2), (-1, 3))] * 20
  for lhs_dilation in (1, 2, 3):
    for lo in (-7, -3, -1, 0, 2):
      for hi in (-4, -1, 0, 3):
        cases.append(((1, 5, 4, 2), (2, 3, 2, 3), dict(
            window_strides=(1, 2), padding=((lo, hi), (1, -1)), lhs_dilation=(lhs_dilation, 1),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  for lhs_shape, rhs_shape, kw in cases:
    lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=rhs_shape), jnp.float32)
    try:
      params = jax.make_jaxpr(functools.partial(lax.conv_general_dilated, **kw))(
          lhs, rhs).jaxpr.eqns[-1].params
    except ValueError:  # padding crops more than the input
      continue
    got = forms.conv(lhs, rhs, dict(params), FAST)
    np.testing.assert_allclose(got, reference.conv_general_dilated(lhs, rhs, **kw),
                               rtol=1e-5, atol=1e-5, err_msg=str(kw))


def test_plain_forms_bind_directly():
  lhs, rhs = operands("nhwc-valid")
  kwargs = CASES["nhwc-valid"][2]
  params = jax.make_jaxpr(functools.partial(lax.conv_general_dilated, **kwargs))(
      lhs, rhs).jaxpr.eqns[-1].params
  jaxpr = jax.make_jaxpr(lambda l, r: forms.conv(l, r, dict(params), forms.Forms()))(lhs, rhs)
  assert [e.primitive for e in jaxpr.jaxpr.eqns] == [lax.conv_general_dilated_p]
