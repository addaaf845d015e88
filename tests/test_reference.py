"""Tests for ``jaxtile.reference.conv_general_dilated`` against JAX.

The NumPy reference is compared with ``jax.lax.conv_general_dilated`` run on
the CPU backend.  As in JAX's own ``tests/lax_test.py``, the parameter space is
sampled with linked cases (each case sets several parameters at once) plus a
Hypothesis property test drawing random valid configurations.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

from jaxtile.reference import conv_general_dilated as ref_conv

REFERENCE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxtile", "reference.py"
)

FLOAT_DTYPES = {
    "float32": (np.float32, 1e-5),
    "float16": (np.float16, 1e-2),
    "bfloat16": (ml_dtypes.bfloat16, 2e-2),
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _mixed_sign_padding(padding):
    """True if some spatial dim has negative low and positive high padding."""
    return not isinstance(padding, str) and any(lo < 0 < hi for lo, hi in padding)


def _jax_conv(lhs, rhs, *, direct=False, **kwargs):
    """Runs jax.lax.conv_general_dilated on the CPU and returns a NumPy array.

    XLA:CPU currently miscomputes floating-point convolutions whose padding has
    a negative low and a positive high amount in the same dimension (it reads
    outside the input buffer; https://github.com/openxla/xla/issues/48713, see
    ``test_xla_cpu_mixed_sign_padding_bug``).  Unless ``direct`` is set, such
    explicit padding (and the lhs dilation) is therefore applied with
    ``lax.pad`` first, and the convolution itself is run unpadded.  This is the
    same computation by definition, and keeps JAX as the oracle.
    """
    with jax.default_device(jax.devices("cpu")[0]):
        padding = kwargs["padding"]
        is_int = np.issubdtype(np.asarray(lhs).dtype, np.integer)
        if not direct and not is_int and _mixed_sign_padding(padding):
            nsp = np.ndim(lhs) - 2
            dn = lax.conv_dimension_numbers(
                np.shape(lhs), np.shape(rhs), kwargs.get("dimension_numbers")
            )
            lhs_dilation = kwargs.get("lhs_dilation") or (1,) * nsp
            config = [(0, 0, 0)] * np.ndim(lhs)
            for j, (lo, hi) in enumerate(padding):
                config[dn.lhs_spec[2 + j]] = (lo, hi, lhs_dilation[j] - 1)
            lhs = lax.pad(lhs, np.zeros((), np.asarray(lhs).dtype), config)
            kwargs = dict(kwargs, padding=[(0, 0)] * nsp, lhs_dilation=None)
        out = lax.conv_general_dilated(
            lhs, rhs, precision=lax.Precision.HIGHEST, **kwargs
        )
        return np.asarray(out)


def _layout_shapes(lhs_canon, rhs_canon, dimension_numbers):
    """Maps canonical (N, C, *S) / (O, I, *K) shapes to the operand layouts.

    Uses JAX's own parsing of ``dimension_numbers`` so that the reference's
    (independent, NumPy-only) parsing is checked against it.
    """
    ndim = len(lhs_canon)
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    lhs_shape = [0] * ndim
    rhs_shape = [0] * ndim
    for canon_pos, axis in enumerate(dn.lhs_spec):
        lhs_shape[axis] = lhs_canon[canon_pos]
    for canon_pos, axis in enumerate(dn.rhs_spec):
        rhs_shape[axis] = rhs_canon[canon_pos]
    return tuple(lhs_shape), tuple(rhs_shape)


def _random_operands(rng, lhs_canon, rhs_canon, dimension_numbers, dtype):
    lhs_shape, rhs_shape = _layout_shapes(lhs_canon, rhs_canon, dimension_numbers)
    lhs = rng.standard_normal(lhs_shape).astype(dtype)
    rhs = rng.standard_normal(rhs_shape).astype(dtype)
    return lhs, rhs


def _assert_close(actual, expected, tol):
    """Checks values with rtol=tol and atol=tol * max(1, max|expected|)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a = actual.astype(np.float64) if actual.dtype != np.complex64 else actual.astype(np.complex128)
    e = expected.astype(a.dtype)
    scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale)


def _check_against_jax(lhs, rhs, tol, **kwargs):
    expected = _jax_conv(lhs, rhs, **kwargs)
    actual = ref_conv(lhs, rhs, **kwargs)
    _assert_close(actual, expected, tol)
    return actual


# --------------------------------------------------------------------------
# Linked cases (canonical shapes: lhs (N, C, *S), rhs (O, I, *K))
# --------------------------------------------------------------------------

CDN = lax.ConvDimensionNumbers

CASES = [
    # ---- 1-D ------------------------------------------------------------
    dict(id="1d_default_valid", lhs=(2, 3, 9), rhs=(4, 3, 3), strides=(1,), padding="VALID"),
    dict(id="1d_nwc_same_s2", lhs=(2, 3, 10), rhs=(5, 3, 3), strides=(2,), padding="SAME",
         dn=("NWC", "WIO", "NWC")),
    dict(id="1d_same_lower_even_kernel_s3", lhs=(1, 2, 11), rhs=(3, 2, 4), strides=(3,),
         padding="SAME_LOWER"),
    dict(id="1d_lowercase_same", lhs=(2, 2, 7), rhs=(2, 2, 2), strides=(1,), padding="same"),
    dict(id="1d_negative_lo_pad", lhs=(2, 3, 9), rhs=(4, 3, 3), strides=(1,), padding=[(-2, 1)]),
    dict(id="1d_transposed_lhs_dil2", lhs=(2, 3, 6), rhs=(2, 3, 3), strides=(1,),
         padding=[(2, 2)], lhs_dilation=(2,), dn=("NWC", "WIO", "NWC")),
    dict(id="1d_atrous_rhs_dil3_same", lhs=(2, 2, 12), rhs=(3, 2, 3), strides=(1,),
         padding="SAME", rhs_dilation=(3,)),
    dict(id="1d_depthwise", lhs=(2, 4, 8), rhs=(8, 1, 3), strides=(1,), padding="SAME",
         feature_group_count=4, dn=("NWC", "WIO", "NWC")),
    dict(id="1d_batch_group", lhs=(4, 3, 8), rhs=(6, 3, 3), strides=(1,), padding="VALID",
         batch_group_count=2),
    dict(id="1d_cwn_layout", lhs=(3, 2, 9), rhs=(2, 2, 2), strides=(2,), padding=[(0, 1)],
         dn=("CWN", "OWI", "WNC")),
    # ---- 2-D ------------------------------------------------------------
    dict(id="2d_nchw_same_16ch", lhs=(2, 16, 16, 16), rhs=(16, 16, 3, 3), strides=(1, 1),
         padding="SAME"),
    dict(id="2d_nhwc_hwio_same_s21", lhs=(2, 3, 7, 9), rhs=(4, 3, 3, 2), strides=(2, 1),
         padding="SAME", dn=("NHWC", "HWIO", "NHWC")),
    dict(id="2d_spatial_order_from_rhs", lhs=(2, 3, 7, 9), rhs=(4, 3, 3, 2), strides=(2, 1),
         padding=[(1, 0), (0, 2)], rhs_dilation=(1, 2), dn=("NWHC", "HWIO", "NHWC")),
    dict(id="2d_rhs_wh_order", lhs=(2, 3, 8, 5), rhs=(2, 3, 2, 3), strides=(3, 1),
         padding="SAME_LOWER", dn=("NCHW", "OIWH", "NHWC")),
    dict(id="2d_chwn_layout", lhs=(3, 2, 6, 5), rhs=(4, 2, 3, 3), strides=(1, 2),
         padding="VALID", dn=("CHWN", "IHWO", "HWCN")),
    dict(id="2d_conv_dimension_numbers", lhs=(2, 3, 6, 7), rhs=(4, 3, 3, 2), strides=(1, 2),
         padding=[(1, 1), (0, 1)], dn=CDN(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                          out_spec=(0, 3, 1, 2))),
    dict(id="2d_conv_dimension_numbers_odd", lhs=(2, 3, 6, 7), rhs=(4, 3, 3, 2),
         strides=(2, 1), padding="SAME",
         dn=CDN(lhs_spec=(2, 0, 3, 1), rhs_spec=(1, 3, 2, 0), out_spec=(3, 1, 0, 2))),
    dict(id="2d_asymmetric_pads", lhs=(2, 3, 6, 7), rhs=(2, 3, 3, 3), strides=(1, 2),
         padding=[(1, 2), (0, -1)]),
    dict(id="2d_negative_pads", lhs=(1, 2, 8, 9), rhs=(3, 2, 2, 3), strides=(1, 1),
         padding=[(-1, -2), (-2, 0)]),
    dict(id="2d_lhs_and_rhs_dilation", lhs=(2, 2, 5, 4), rhs=(3, 2, 3, 2), strides=(1, 2),
         padding=[(1, 1), (2, 0)], lhs_dilation=(2, 3), rhs_dilation=(1, 2)),
    dict(id="2d_lhs_dilation_negative_pad", lhs=(1, 2, 5, 5), rhs=(2, 2, 3, 3), strides=(2, 1),
         padding=[(-1, 2), (1, -3)], lhs_dilation=(3, 2), dn=("NHWC", "HWIO", "NHWC")),
    dict(id="2d_rhs_dil_same_lower_s2", lhs=(2, 3, 9, 10), rhs=(2, 3, 3, 3), strides=(2, 2),
         padding="SAME_LOWER", rhs_dilation=(2, 2)),
    dict(id="2d_grouped_nhwc", lhs=(2, 6, 5, 5), rhs=(4, 3, 3, 3), strides=(1, 1),
         padding="SAME", feature_group_count=2, dn=("NHWC", "HWIO", "NHWC")),
    dict(id="2d_grouped_3", lhs=(1, 6, 6, 4), rhs=(9, 2, 2, 2), strides=(2, 1),
         padding=[(0, 1), (1, 1)], feature_group_count=3),
    dict(id="2d_depthwise_multiplier2", lhs=(2, 3, 7, 7), rhs=(6, 1, 3, 3), strides=(2, 2),
         padding="SAME", feature_group_count=3, dn=("NHWC", "HWIO", "NHWC")),
    dict(id="2d_batch_group_wgrad_like", lhs=(6, 2, 6, 6), rhs=(3, 2, 3, 3), strides=(1, 1),
         padding=[(1, 1), (1, 1)], batch_group_count=3, dn=("CHWN", "HWIO", "NHWC")),
    dict(id="2d_batch_group_rhs_dil", lhs=(4, 2, 7, 6), rhs=(4, 2, 2, 2), strides=(1, 2),
         padding="VALID", rhs_dilation=(2, 1), batch_group_count=2),
    dict(id="2d_stride_gt_kernel", lhs=(2, 3, 10, 11), rhs=(2, 3, 2, 2), strides=(3, 4),
         padding="VALID"),
    dict(id="2d_1x1_kernel_s2", lhs=(2, 4, 5, 6), rhs=(3, 4, 1, 1), strides=(2, 2),
         padding="SAME"),
    dict(id="2d_zero_spatial_output", lhs=(2, 3, 2, 2), rhs=(4, 3, 3, 3), strides=(1, 1),
         padding="VALID"),
    dict(id="2d_zero_output_negative_pad", lhs=(2, 3, 5, 5), rhs=(4, 3, 3, 3), strides=(1, 1),
         padding=[(-3, -2), (0, 0)], dn=("NHWC", "HWIO", "NHWC")),
    dict(id="2d_zero_batch", lhs=(0, 3, 5, 5), rhs=(4, 3, 3, 3), strides=(1, 1),
         padding="SAME"),
    dict(id="2d_kernel_larger_than_input_padded", lhs=(1, 2, 3, 3), rhs=(2, 2, 5, 5),
         strides=(1, 1), padding="SAME"),
    # ---- 3-D ------------------------------------------------------------
    dict(id="3d_default_valid", lhs=(2, 2, 5, 6, 4), rhs=(3, 2, 2, 3, 2),
         strides=(1, 1, 1), padding="VALID"),
    dict(id="3d_ndhwc_same_strided_dilated", lhs=(1, 3, 6, 7, 8), rhs=(2, 3, 3, 2, 3),
         strides=(1, 2, 2), padding="SAME", rhs_dilation=(1, 1, 2),
         dn=("NDHWC", "DHWIO", "NDHWC")),
    dict(id="3d_grouped_lhs_dil", lhs=(1, 4, 3, 4, 3), rhs=(4, 2, 2, 2, 2),
         strides=(1, 1, 2), padding=[(1, 1), (0, 1), (1, -1)], lhs_dilation=(2, 1, 2),
         feature_group_count=2),
    dict(id="3d_batch_group_permuted", lhs=(4, 2, 4, 5, 3), rhs=(2, 2, 2, 2, 2),
         strides=(2, 1, 1), padding="SAME_LOWER", batch_group_count=2,
         dn=("CDHWN", "OIWDH", "NCWHD")),
]


def _case_kwargs(case):
    kwargs = dict(window_strides=case["strides"], padding=case["padding"])
    for key in ("lhs_dilation", "rhs_dilation", "feature_group_count", "batch_group_count"):
        if key in case:
            kwargs[key] = case[key]
    kwargs["dimension_numbers"] = case.get("dn")
    return kwargs


# Low-precision dtypes run on a representative subset (each compile costs time).
LOW_PRECISION_CASE_IDS = (
    "1d_nwc_same_s2", "1d_depthwise", "1d_batch_group", "1d_negative_lo_pad",
    "2d_nchw_same_16ch", "2d_spatial_order_from_rhs", "2d_conv_dimension_numbers_odd",
    "2d_lhs_and_rhs_dilation", "2d_grouped_nhwc", "2d_batch_group_wgrad_like",
    "2d_negative_pads", "2d_zero_spatial_output", "3d_ndhwc_same_strided_dilated",
    "3d_grouped_lhs_dil", "3d_batch_group_permuted",
)
assert set(LOW_PRECISION_CASE_IDS) <= {c["id"] for c in CASES}

MATCH_PARAMS = [
    pytest.param(case, dtype_name, id=f"{case['id']}-{dtype_name}")
    for case in CASES
    for dtype_name in FLOAT_DTYPES
    if dtype_name == "float32" or case["id"] in LOW_PRECISION_CASE_IDS
]


@pytest.mark.parametrize("case,dtype_name", MATCH_PARAMS)
def test_matches_jax(case, dtype_name):
    dtype, tol = FLOAT_DTYPES[dtype_name]
    rng = np.random.default_rng(zlib.crc32(f"{case['id']}-{dtype_name}".encode()))
    kwargs = _case_kwargs(case)
    lhs, rhs = _random_operands(rng, case["lhs"], case["rhs"], kwargs["dimension_numbers"], dtype)
    out = _check_against_jax(lhs, rhs, tol, **kwargs)
    assert out.dtype == np.dtype(dtype)


def test_zero_spatial_output_shape():
    lhs = np.ones((2, 3, 2, 2), np.float32)
    rhs = np.ones((4, 3, 3, 3), np.float32)
    out = ref_conv(lhs, rhs, (1, 1), "VALID")
    assert out.shape == (2, 4, 0, 0)
    assert out.dtype == np.float32


def test_simple_values_by_hand():
    x = np.arange(5.0, dtype=np.float32).reshape(1, 1, 5)
    w = np.array([1.0, 10.0, 100.0], np.float32).reshape(1, 1, 3)
    # Cross-correlation (no kernel flip), as in XLA.
    np.testing.assert_array_equal(ref_conv(x, w, (1,), "VALID")[0, 0], [210.0, 321.0, 432.0])
    # lhs_dilation=2 -> [0, 0, 1, 0, 2, 0, 3, 0, 4]; pads crop/extend the ends.
    out = ref_conv(x, w, (1,), [(-1, 1)], lhs_dilation=(2,))
    np.testing.assert_array_equal(
        out[0, 0], [10.0, 201.0, 20.0, 302.0, 30.0, 403.0, 40.0]
    )


# --------------------------------------------------------------------------
# preferred_element_type and non-float dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_dtype,preferred,tol",
    [
        (np.float16, np.float32, 1e-5),
        (ml_dtypes.bfloat16, np.float32, 1e-5),
        (np.float32, np.float32, 1e-5),
        (np.float16, None, 1e-2),
        (np.int8, np.int32, 0),
        (np.int8, np.float32, 1e-6),
        (np.int8, None, 0),
        (np.int32, None, 0),
        (np.complex64, None, 1e-5),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_preferred_element_type_and_dtypes(in_dtype, preferred, tol):
    rng = np.random.default_rng(7)
    dn = ("NHWC", "HWIO", "NHWC")
    lhs_shape, rhs_shape = _layout_shapes((2, 4, 6, 5), (6, 2, 3, 2), dn)
    if np.issubdtype(np.dtype(in_dtype), np.integer):
        lhs = rng.integers(-4, 5, lhs_shape).astype(in_dtype)
        rhs = rng.integers(-3, 4, rhs_shape).astype(in_dtype)
    elif np.issubdtype(np.dtype(in_dtype), np.complexfloating):
        lhs = (rng.standard_normal(lhs_shape) + 1j * rng.standard_normal(lhs_shape)).astype(in_dtype)
        rhs = (rng.standard_normal(rhs_shape) + 1j * rng.standard_normal(rhs_shape)).astype(in_dtype)
    else:
        lhs = rng.standard_normal(lhs_shape).astype(in_dtype)
        rhs = rng.standard_normal(rhs_shape).astype(in_dtype)
    kwargs = dict(window_strides=(1, 2), padding=[(1, 1), (0, 1)], dimension_numbers=dn,
                  feature_group_count=2, preferred_element_type=preferred)
    out = _check_against_jax(lhs, rhs, tol, **kwargs)
    expected_dtype = np.dtype(in_dtype) if preferred is None else np.dtype(preferred)
    assert out.dtype == expected_dtype


@pytest.mark.parametrize(
    "pads,lhs_dilation,strides",
    [([(-2, 1)], None, (1,)), ([(-1, 1)], None, (2,)), ([(-1, 2)], None, (2,)),
     ([(-3, 3)], (2,), (1,)), ([(-2, 4)], (3,), (2,))],
)
def test_mixed_sign_padding_int32_direct(pads, lhs_dilation, strides):
    # XLA:CPU's integer convolution (elemental emitter) handles negative-low /
    # positive-high padding correctly, so compare with it directly.
    rng = np.random.default_rng(3)
    lhs = rng.integers(-9, 10, (2, 3, 9)).astype(np.int32)
    rhs = rng.integers(-9, 10, (4, 3, 3)).astype(np.int32)
    kwargs = dict(window_strides=strides, padding=pads, lhs_dilation=lhs_dilation)
    np.testing.assert_array_equal(
        ref_conv(lhs, rhs, **kwargs), _jax_conv(lhs, rhs, direct=True, **kwargs)
    )


@pytest.mark.xfail(
    reason="XLA:CPU f32 conv with negative low + positive high padding reads out of "
    "bounds (https://github.com/openxla/xla/issues/48713)",
    strict=False,
)
def test_xla_cpu_mixed_sign_padding_bug():
    # Documents the upstream bug worked around in _jax_conv; starts passing
    # (XPASS) once XLA is fixed, at which point the workaround can go.
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((2, 3, 9)).astype(np.float32)
    rhs = rng.standard_normal((4, 3, 3)).astype(np.float32)
    kwargs = dict(window_strides=(1,), padding=[(-2, 1)])
    expected = _jax_conv(lhs, rhs, **kwargs)  # pad-first oracle
    _assert_close(ref_conv(lhs, rhs, **kwargs), expected, 1e-5)
    _assert_close(_jax_conv(lhs, rhs, direct=True, **kwargs), expected, 1e-5)


def test_default_output_dtype_is_result_type():
    lhs = np.ones((1, 2, 4), np.float16)
    rhs = np.ones((1, 2, 2), np.float32)
    assert ref_conv(lhs, rhs, (1,), "VALID").dtype == np.float32


# --------------------------------------------------------------------------
# dimension_numbers parsing
# --------------------------------------------------------------------------


def _layout_strings():
    """A deterministic sample of 2-D layout triples (all kinds of orders)."""
    lhs_layouts = ["".join(p) for p in itertools.permutations("NCHW")]
    rhs_layouts = ["".join(p) for p in itertools.permutations("OIHW")]
    out_layouts = ["".join(p) for p in itertools.permutations("NCHW")]
    rng = np.random.default_rng(0)
    picks = set()
    while len(picks) < 40:
        picks.add((lhs_layouts[rng.integers(24)], rhs_layouts[rng.integers(24)],
                   out_layouts[rng.integers(24)]))
    return sorted(picks)


def test_string_dimension_numbers_parse_like_jax():
    from jaxtile.reference import _canonical_specs  # internal helper

    for dn in _layout_strings() + [("NDHWC", "DHWIO", "NDHWC"), ("NWC", "WIO", "NWC"),
                                   ("CDWHN", "IOHDW", "WNDCH")]:
        expected = lax.conv_dimension_numbers((1,) * len(dn[0]), (1,) * len(dn[0]), dn)
        got = _canonical_specs(dn, len(dn[0]))
        assert got == (tuple(expected.lhs_spec), tuple(expected.rhs_spec),
                       tuple(expected.out_spec)), dn


@pytest.mark.parametrize("dn", _layout_strings()[:8], ids=lambda d: "-".join(d))
def test_random_layouts_match_jax(dn):
    rng = np.random.default_rng(1)
    lhs, rhs = _random_operands(rng, (2, 3, 7, 6), (4, 3, 3, 2), dn, np.float32)
    _check_against_jax(lhs, rhs, 1e-5, window_strides=(2, 1), padding=[(1, 0), (2, -1)],
                       rhs_dilation=(1, 2), dimension_numbers=dn)


# --------------------------------------------------------------------------
# Hypothesis property test
# --------------------------------------------------------------------------

_SPATIAL_LETTERS = "HWD"


@st.composite
def conv_configs(draw):
    nsp = draw(st.integers(1, 3))
    max_size = {1: 9, 2: 6, 3: 4}[nsp]
    groups = draw(st.sampled_from([(1, 1), (2, 1), (3, 1), (1, 2), (1, 3)]))
    fgc, bgc = groups
    batch = bgc * draw(st.integers(1, 2))
    in_feat = fgc * draw(st.integers(1, 3))
    out_feat = fgc * bgc * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nsp))
    spatial = tuple(draw(st.integers(1, max_size)) for _ in range(nsp))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nsp))
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
    lhs_dil = draw(st.one_of(st.none(),
                             st.tuples(*[st.integers(1, 2) for _ in range(nsp)])))
    if lhs_dil is None or all(d == 1 for d in lhs_dil):
        padding = draw(st.one_of(
            st.sampled_from(["SAME", "SAME_LOWER", "VALID", "same", "valid"]),
            st.tuples(*[st.tuples(st.integers(-2, 2), st.integers(-2, 2))
                        for _ in range(nsp)]),
        ))
    else:
        padding = draw(st.tuples(*[st.tuples(st.integers(-2, 2), st.integers(-2, 2))
                                   for _ in range(nsp)]))
    if not isinstance(padding, str):
        # Negative padding may not remove more than the (dilated) input.
        dil = lhs_dil or (1,) * nsp
        padding = tuple(
            (lo, hi) if 1 + d * (s - 1) + lo + hi >= 0 else (0, 0)
            for (lo, hi), s, d in zip(padding, spatial, dil)
        )
    letters = list(_SPATIAL_LETTERS[:nsp])
    layout_kind = draw(st.sampled_from(["none", "strings", "cdn"]))
    if layout_kind == "none":
        dn = None
    elif layout_kind == "strings":
        dn = tuple("".join(draw(st.permutations(list(pair) + letters)))
                   for pair in (("N", "C"), ("O", "I"), ("N", "C")))
    else:
        perms = [tuple(draw(st.permutations(range(nsp + 2)))) for _ in range(3)]
        dn = CDN(*perms)
    return dict(lhs=(batch, in_feat) + spatial, rhs=(out_feat, in_feat // fgc) + kernel,
                strides=strides, padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                feature_group_count=fgc, batch_group_count=bgc, dn=dn,
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_property_random_configs(cfg):
    rng = np.random.default_rng(cfg["seed"])
    lhs, rhs = _random_operands(rng, cfg["lhs"], cfg["rhs"], cfg["dn"], np.float32)
    _check_against_jax(
        lhs, rhs, 1e-5,
        window_strides=cfg["strides"], padding=cfg["padding"],
        lhs_dilation=cfg["lhs_dilation"], rhs_dilation=cfg["rhs_dilation"],
        dimension_numbers=cfg["dn"], feature_group_count=cfg["feature_group_count"],
        batch_group_count=cfg["batch_group_count"],
    )


# --------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------

_X = np.ones((4, 6, 5, 5), np.float32)
_W = np.ones((6, 6, 3, 3), np.float32)

ERROR_CASES = [
    ("rank_mismatch", dict(lhs=np.ones((2, 3, 5)), rhs=_W), r"same rank"),
    ("rank_too_small", dict(lhs=np.ones(3), rhs=np.ones(3), window_strides=()), r"rank >= 2"),
    ("strides_length", dict(window_strides=(1,)), r"window_strides.*\(2\)"),
    ("strides_zero", dict(window_strides=(1, 0)), r"window_strides entries must all be >= 1"),
    ("rhs_dilation_length", dict(rhs_dilation=(1, 1, 1)), r"rhs_dilation"),
    ("lhs_dilation_zero", dict(lhs_dilation=(0, 1), padding=[(0, 0), (0, 0)]),
     r"lhs_dilation entries must all be >= 1"),
    ("bad_padding_string", dict(padding="FULL"), r"padding must be one of.*'FULL'"),
    ("bad_padding_pairs", dict(padding=[(1, 2, 3), (0, 0)]), r"\(low, high\)"),
    ("padding_length", dict(padding=[(1, 1)]), r"one \(low, high\) pair per spatial"),
    ("negative_padding_too_large", dict(padding=[(-4, -2), (0, 0)]),
     r"Negative padding .* larger"),
    ("string_padding_with_lhs_dilation", dict(padding="SAME", lhs_dilation=(2, 1)),
     r"String padding 'SAME' is not supported.*lhs_dilation"),
    ("feature_group_not_dividing", dict(feature_group_count=4, rhs=np.ones((4, 1, 3, 3))),
     r"feature_group_count=4 must divide the lhs feature dimension size 6"),
    ("feature_group_in_features", dict(feature_group_count=2),
     r"rhs input feature dimension size.*6 // feature_group_count=2 != 6"),
    ("feature_group_out_features", dict(feature_group_count=2, rhs=np.ones((5, 3, 3, 3))),
     r"feature_group_count=2 must divide the rhs output feature dimension size 5"),
    ("feature_group_nonpositive", dict(feature_group_count=0),
     r"feature_group_count must be a positive integer, got 0"),
    ("batch_group_not_dividing", dict(batch_group_count=3),
     r"batch_group_count=3 must divide the lhs batch dimension size 4"),
    ("batch_group_out_features", dict(batch_group_count=4),
     r"batch_group_count=4 must divide the rhs output feature dimension size 6"),
    ("batch_group_nonpositive", dict(batch_group_count=-1),
     r"batch_group_count must be a positive integer, got -1"),
    ("both_groups", dict(batch_group_count=2, feature_group_count=2, rhs=np.ones((6, 3, 3, 3))),
     r"At most one of feature_group_count and batch_group_count"),
    ("dn_missing_char", dict(dimension_numbers=("NHWC", "HWIX", "NHWC")),
     r"rhs layout 'HWIX' must contain the characters 'O' and 'I'"),
    ("dn_duplicate_char", dict(dimension_numbers=("NHHC", "HWIO", "NHWC")),
     r"lhs layout 'NHHC'.*(duplicate|exactly once)"),
    ("dn_wrong_length", dict(dimension_numbers=("NHWC", "HWIO", "NHWCX")),
     r"out layout 'NHWCX' must have one letter per operand dimension \(4\)"),
    ("dn_spatial_mismatch", dict(dimension_numbers=("NHWC", "HXIO", "NHWC")),
     r"same set of spatial characters"),
    ("dn_two_strings", dict(dimension_numbers=("NHWC", "HWIO")), r"exactly 3 layout strings"),
    ("dn_bad_type", dict(dimension_numbers="NCHW"), r"dimension_numbers must be None"),
    ("dn_spec_not_permutation", dict(dimension_numbers=CDN((0, 1, 2, 2), (0, 1, 2, 3),
                                                          (0, 1, 2, 3))),
     r"dimension_numbers.lhs_spec must be a permutation of range\(4\)"),
]


@pytest.mark.parametrize("overrides,match", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors(overrides, match):
    kwargs = dict(lhs=_X, rhs=_W, window_strides=(1, 1), padding="VALID")
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=match):
        ref_conv(**kwargs)


def test_jax_also_rejects_string_padding_with_lhs_dilation():
    # Documents why the reference refuses this combination: JAX does too.
    with pytest.raises(ValueError, match="String padding"):
        _jax_conv(_X, _W, window_strides=(1, 1), padding="SAME", lhs_dilation=(2, 1))


# --------------------------------------------------------------------------
# The reference must not depend on JAX
# --------------------------------------------------------------------------


def test_reference_imports_no_jax():
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("jaxtile_reference", {REFERENCE_PATH!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        import numpy as np
        out = mod.conv_general_dilated(np.ones((1, 1, 4)), np.ones((1, 1, 2)), (1,), "VALID")
        assert out.tolist() == [[[2.0, 2.0, 2.0]]], out
        leaked = sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib")))
        assert not leaked, leaked
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
