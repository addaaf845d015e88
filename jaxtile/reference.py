"""Pure-NumPy reference implementation of ``jax.lax.conv_general_dilated``.

This module is the ground truth that the tiled convolutions produced by
``jaxtile`` are checked against.  It is written for clarity, not speed, and it
deliberately imports nothing but NumPy (no JAX, nothing from ``jaxtile``), so
that it can serve as an independent oracle.

The semantics follow ``jax.lax.conv_general_dilated`` (XLA's ``Conv`` HLO):

1. The operands are transposed to the canonical layouts ``(N, C, *spatial)``
   for ``lhs``, ``(O, I, *spatial)`` for ``rhs``; the output is produced in
   ``(N, O, *spatial)`` and transposed to the requested output layout.
2. ``lhs`` is dilated (``lhs_dilation - 1`` zeros between neighbouring
   elements; a.k.a. transposed convolution), then padded with ``(lo, hi)``
   zeros per spatial dimension (negative padding crops).
3. ``rhs`` is dilated by ``rhs_dilation`` (atrous convolution) and slid over
   the padded input with ``window_strides``.
4. ``feature_group_count`` splits the input features and output features
   into that many groups; ``batch_group_count`` splits the input batch and the
   output features into that many groups (both group-major).

Accumulation is done in float64 (complex128 for complex inputs, int64 for
integer/bool inputs) and the result is cast to the output dtype at the end.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Sequence, Tuple

import numpy as np

__all__ = ["conv_general_dilated"]

_PADDING_STRINGS = ("SAME", "SAME_LOWER", "VALID")


# --------------------------------------------------------------------------
# Argument canonicalisation helpers
# --------------------------------------------------------------------------


def _as_int(value: Any, name: str) -> int:
    """Converts ``value`` to a Python int, or raises a ValueError naming it."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def _int_tuple(values: Any, name: str, length: int, minimum: int) -> Tuple[int, ...]:
    """Converts a sequence to a tuple of ``length`` ints that are >= minimum."""
    try:
        seq = tuple(values)
    except TypeError:
        raise ValueError(
            f"{name} must be a sequence of {length} integers, got {values!r}."
        ) from None
    if len(seq) != length:
        raise ValueError(
            f"{name} must have one entry per spatial dimension ({length}), "
            f"got {len(seq)} entries: {values!r}."
        )
    result = tuple(_as_int(v, f"{name} entry") for v in seq)
    if any(v < minimum for v in result):
        raise ValueError(f"{name} entries must all be >= {minimum}, got {values!r}.")
    return result


def _string_specs(
    dimension_numbers: Sequence[str], ndim: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """Converts layout strings such as ``('NHWC', 'HWIO', 'NHWC')`` to specs.

    Mirrors ``jax.lax.conv_general_permutations``: each spec lists, for the
    canonical positions ``(batch/out-feature, feature/in-feature, spatial...)``,
    the axis of the array that holds that dimension.  The order of the
    spatial dimensions is the order in which their letters appear in the
    *rhs* string, for all three operands.
    """
    if len(dimension_numbers) != 3:
        raise ValueError(
            "dimension_numbers must have exactly 3 layout strings "
            f"(lhs, rhs, out), got {dimension_numbers!r}."
        )
    names = ("lhs", "rhs", "out")
    charpairs = (("N", "C"), ("O", "I"), ("N", "C"))
    for name, spec, (a, b) in zip(names, dimension_numbers, charpairs):
        if not isinstance(spec, str):
            raise ValueError(
                f"dimension_numbers {name} layout must be a string, got {spec!r}."
            )
        if len(spec) != ndim:
            raise ValueError(
                f"dimension_numbers {name} layout {spec!r} must have one letter per "
                f"operand dimension ({ndim}), got {len(spec)}."
            )
        if spec.count(a) != 1 or spec.count(b) != 1:
            raise ValueError(
                f"dimension_numbers {name} layout {spec!r} must contain the "
                f"characters '{a}' and '{b}' exactly once."
            )
        if len(set(spec)) != len(spec):
            raise ValueError(
                f"dimension_numbers {name} layout {spec!r} cannot have duplicate "
                "characters."
            )
    lhs_str, rhs_str, out_str = dimension_numbers
    spatial_sets = [set(s) - set(p) for s, p in zip(dimension_numbers, charpairs)]
    if not spatial_sets[0] == spatial_sets[1] == spatial_sets[2]:
        raise ValueError(
            "dimension_numbers layouts must each have the same set of spatial "
            f"characters, got {tuple(dimension_numbers)!r}."
        )

    # The rhs string fixes the order of the spatial dimensions.
    spatial_letters = [c for c in rhs_str if c not in ("O", "I")]

    def spec_of(layout: str, pair: Tuple[str, str]) -> Tuple[int, ...]:
        return tuple(layout.index(c) for c in pair + tuple(spatial_letters))

    return (
        spec_of(lhs_str, charpairs[0]),
        spec_of(rhs_str, charpairs[1]),
        spec_of(out_str, charpairs[2]),
    )


def _canonical_specs(
    dimension_numbers: Any, ndim: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """Returns ``(lhs_spec, rhs_spec, out_spec)`` as tuples of axis indices."""
    if dimension_numbers is None:
        iota = tuple(range(ndim))
        return iota, iota, iota
    if all(hasattr(dimension_numbers, a) for a in ("lhs_spec", "rhs_spec", "out_spec")):
        specs = []
        for name in ("lhs_spec", "rhs_spec", "out_spec"):
            raw = getattr(dimension_numbers, name)
            spec = tuple(_as_int(v, f"dimension_numbers.{name} entry") for v in raw)
            if sorted(spec) != list(range(ndim)):
                raise ValueError(
                    f"dimension_numbers.{name} must be a permutation of "
                    f"range({ndim}), got {tuple(raw)!r}."
                )
            specs.append(spec)
        return specs[0], specs[1], specs[2]
    if isinstance(dimension_numbers, (tuple, list)):
        return _string_specs(dimension_numbers, ndim)
    raise ValueError(
        "dimension_numbers must be None, a 3-tuple of layout strings or an object "
        "with lhs_spec/rhs_spec/out_spec attributes, got "
        f"{dimension_numbers!r}."
    )


def _dilated_size(size: int, dilation: int) -> int:
    """Size of a dimension after inserting ``dilation - 1`` holes (>= 0)."""
    return max(0, 1 + dilation * (size - 1))


def _string_padding_to_pairs(
    padding: str,
    in_shape: Sequence[int],
    window_shape: Sequence[int],
    strides: Sequence[int],
) -> Tuple[Tuple[int, int], ...]:
    """Mirrors ``jax.lax.padtype_to_pads`` for 'SAME', 'SAME_LOWER', 'VALID'."""
    mode = padding.upper()
    if mode not in _PADDING_STRINGS:
        raise ValueError(
            f"padding must be one of {_PADDING_STRINGS} (any case) or a sequence of "
            f"(low, high) pairs, got {padding!r}."
        )
    if mode == "VALID":
        return tuple((0, 0) for _ in in_shape)
    pairs = []
    for size, window, stride in zip(in_shape, window_shape, strides):
        out_size = -(-size // stride)  # ceil division
        total = max((out_size - 1) * stride + window - size, 0)
        small, large = total // 2, total - total // 2
        # SAME puts the odd extra element at the end, SAME_LOWER at the start.
        pairs.append((small, large) if mode == "SAME" else (large, small))
    return tuple(pairs)


def _explicit_padding(padding: Any, nspatial: int) -> Tuple[Tuple[int, int], ...]:
    """Validates a sequence of ``(low, high)`` integer padding pairs."""
    try:
        pairs = tuple((operator.index(lo), operator.index(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise ValueError(
            "padding must be 'SAME', 'SAME_LOWER', 'VALID' or a sequence of "
            f"(low, high) integer pairs, got {padding!r}."
        ) from None
    if len(pairs) != nspatial:
        raise ValueError(
            f"padding must have one (low, high) pair per spatial dimension "
            f"({nspatial}), got {len(pairs)}: {padding!r}."
        )
    return pairs


def _default_dtypes(lhs: np.ndarray, rhs: np.ndarray, preferred_element_type: Any):
    """Returns ``(accumulation dtype, output dtype)``."""
    in_dtype = np.result_type(lhs.dtype, rhs.dtype)
    out_dtype = in_dtype if preferred_element_type is None else np.dtype(preferred_element_type)
    if np.issubdtype(in_dtype, np.complexfloating) or np.issubdtype(
        out_dtype, np.complexfloating
    ):
        acc_dtype = np.dtype(np.complex128)
    elif (np.issubdtype(in_dtype, np.integer) or in_dtype == np.bool_) and (
        np.issubdtype(out_dtype, np.integer) or out_dtype == np.bool_
    ):
        acc_dtype = np.dtype(np.int64)
    else:
        # Floating point, including float16 and ml_dtypes.bfloat16 (which do
        # not satisfy np.issubdtype(..., np.floating) but convert fine).
        acc_dtype = np.dtype(np.float64)
    return acc_dtype, out_dtype


# --------------------------------------------------------------------------
# Array helpers (operate on canonical (N, C, *spatial) arrays)
# --------------------------------------------------------------------------


def _dilate_lhs(x: np.ndarray, dilation: Sequence[int]) -> np.ndarray:
    """Inserts ``d - 1`` zeros between neighbouring spatial elements."""
    if all(d == 1 for d in dilation):
        return x
    spatial = tuple(_dilated_size(s, d) for s, d in zip(x.shape[2:], dilation))
    out = np.zeros(x.shape[:2] + spatial, dtype=x.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = x
    return out


def _pad_spatial(x: np.ndarray, pads: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Zero-pads the spatial dims; negative amounts crop instead."""
    positive = [(0, 0), (0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
    x = np.pad(x, positive, mode="constant")
    crop = [slice(None), slice(None)]
    for (lo, hi), size in zip(pads, x.shape[2:]):
        crop.append(slice(max(-lo, 0), size - max(-hi, 0)))
    return x[tuple(crop)]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    preferred_element_type=None,
) -> np.ndarray:
    """NumPy reference for ``jax.lax.conv_general_dilated``.

    Args:
      lhs: input array of rank ``n + 2`` (``n`` spatial dimensions).
      rhs: kernel array of rank ``n + 2``.
      window_strides: sequence of ``n`` positive ints, the window strides.
      padding: ``'SAME'``, ``'SAME_LOWER'`` or ``'VALID'`` (case-insensitive),
        or a sequence of ``n`` ``(low, high)`` integer pairs.  Negative pairs
        crop the (dilated) input.  String padding is computed from the input
        shape and the dilated kernel shape exactly like JAX, and, like JAX, is
        rejected when ``lhs_dilation`` is non-trivial.
      lhs_dilation: ``None`` or ``n`` positive ints; dilation of the input
        (transposed convolution).
      rhs_dilation: ``None`` or ``n`` positive ints; dilation of the kernel
        (atrous convolution).
      dimension_numbers: ``None`` (``('NC...', 'OI...', 'NC...')``), a 3-tuple of
        layout strings such as ``('NHWC', 'HWIO', 'NHWC')``, or an object with
        ``lhs_spec``, ``rhs_spec`` and ``out_spec`` attributes holding axis
        indices in canonical order (e.g. ``jax.lax.ConvDimensionNumbers``).
        With strings, the spatial dimensions are ordered as their letters
        appear in the rhs string; strides, padding and dilations follow that
        order.
      feature_group_count: positive int; number of feature groups
        (``lhs`` features == ``feature_group_count * rhs`` input features).
      batch_group_count: positive int; number of batch groups (the ``lhs`` batch
        is split group-major, each group paired with one group of output
        features).  At most one of the two group counts may exceed 1.
      preferred_element_type: optional output dtype.  Defaults to
        ``np.result_type(lhs.dtype, rhs.dtype)``.

    Returns:
      The convolution result as a NumPy array in the ``out`` layout.

    Raises:
      ValueError: if the arguments are inconsistent (rank mismatch, bad layout
        strings, group counts that do not divide, wrong number of strides, ...).

    Example:
      >>> import numpy as np
      >>> x = np.arange(5.0, dtype=np.float32).reshape(1, 1, 5)   # N, C, W
      >>> w = np.ones((1, 1, 3), dtype=np.float32)                # O, I, W
      >>> conv_general_dilated(x, w, (1,), 'VALID')
      array([[[3., 6., 9.]]], dtype=float32)
      >>> conv_general_dilated(x, w, (2,), [(1, 1)])
      array([[[1., 6., 7.]]], dtype=float32)
    """
    lhs = np.asarray(lhs)
    rhs = np.asarray(rhs)

    # ---- Validate ranks and canonicalise the dimension numbers. ----------
    if lhs.ndim != rhs.ndim:
        raise ValueError(
            "lhs and rhs must have the same rank, got lhs.shape="
            f"{lhs.shape} (rank {lhs.ndim}) and rhs.shape={rhs.shape} "
            f"(rank {rhs.ndim})."
        )
    if lhs.ndim < 2:
        raise ValueError(
            f"lhs and rhs must have rank >= 2 (batch, feature, spatial...), got "
            f"rank {lhs.ndim}."
        )
    ndim = lhs.ndim
    nspatial = ndim - 2
    lhs_spec, rhs_spec, out_spec = _canonical_specs(dimension_numbers, ndim)

    # ---- Transpose to canonical layouts: (N, C, *S) and (O, I, *K). ------
    x = np.transpose(lhs, lhs_spec)
    w = np.transpose(rhs, rhs_spec)
    batch, in_features = x.shape[:2]
    out_features, kernel_in_features = w.shape[:2]

    # ---- Validate scalar / per-dimension parameters. ---------------------
    window_strides = _int_tuple(window_strides, "window_strides", nspatial, 1)
    lhs_dilation_given = lhs_dilation is not None
    lhs_dilation = _int_tuple(
        (1,) * nspatial if lhs_dilation is None else lhs_dilation,
        "lhs_dilation", nspatial, 1,
    )
    rhs_dilation = _int_tuple(
        (1,) * nspatial if rhs_dilation is None else rhs_dilation,
        "rhs_dilation", nspatial, 1,
    )

    feature_group_count = _as_int(feature_group_count, "feature_group_count")
    batch_group_count = _as_int(batch_group_count, "batch_group_count")
    if feature_group_count < 1:
        raise ValueError(
            f"feature_group_count must be a positive integer, got {feature_group_count}."
        )
    if batch_group_count < 1:
        raise ValueError(
            f"batch_group_count must be a positive integer, got {batch_group_count}."
        )
    if feature_group_count > 1 and batch_group_count > 1:
        raise ValueError(
            "At most one of feature_group_count and batch_group_count may be > 1, "
            f"got feature_group_count={feature_group_count} and "
            f"batch_group_count={batch_group_count}."
        )
    if in_features % feature_group_count:
        raise ValueError(
            f"feature_group_count={feature_group_count} must divide the lhs feature "
            f"dimension size {in_features}."
        )
    if in_features // feature_group_count != kernel_in_features:
        raise ValueError(
            "lhs feature dimension size divided by feature_group_count must equal "
            f"the rhs input feature dimension size, but {in_features} // "
            f"feature_group_count={feature_group_count} != {kernel_in_features}."
        )
    if out_features % feature_group_count:
        raise ValueError(
            f"feature_group_count={feature_group_count} must divide the rhs output "
            f"feature dimension size {out_features}."
        )
    if batch % batch_group_count:
        raise ValueError(
            f"batch_group_count={batch_group_count} must divide the lhs batch "
            f"dimension size {batch}."
        )
    if out_features % batch_group_count:
        raise ValueError(
            f"batch_group_count={batch_group_count} must divide the rhs output "
            f"feature dimension size {out_features}."
        )

    # ---- Resolve the padding to explicit (lo, hi) pairs. -----------------
    kernel_shape = w.shape[2:]
    effective_kernel = tuple(
        _dilated_size(k, d) for k, d in zip(kernel_shape, rhs_dilation)
    )
    if isinstance(padding, str):
        if lhs_dilation_given and any(d != 1 for d in lhs_dilation):
            # jax.lax.conv_general_dilated rejects this combination too.
            raise ValueError(
                f"String padding {padding!r} is not supported together with "
                f"lhs_dilation={lhs_dilation}; pass explicit (low, high) pairs."
            )
        pads = _string_padding_to_pairs(
            padding, x.shape[2:], effective_kernel, window_strides
        )
    else:
        pads = _explicit_padding(padding, nspatial)

    # ---- Output shape. ---------------------------------------------------
    dilated_in = tuple(_dilated_size(s, d) for s, d in zip(x.shape[2:], lhs_dilation))
    padded_in = tuple(s + lo + hi for s, (lo, hi) in zip(dilated_in, pads))
    if any(p < 0 for p in padded_in):
        raise ValueError(
            f"Negative padding {pads} is larger than the (dilated) lhs spatial "
            f"shape {dilated_in}."
        )
    out_spatial = tuple(
        max((p - k) // s + 1, 0)
        for p, k, s in zip(padded_in, effective_kernel, window_strides)
    )
    out_batch = batch // batch_group_count

    acc_dtype, out_dtype = _default_dtypes(lhs, rhs, preferred_element_type)
    out_shape_canonical = (out_batch, out_features) + out_spatial
    result = np.zeros(out_shape_canonical, dtype=acc_dtype)

    if result.size and x.size and w.size:
        # ---- Dilate and pad the input (in the accumulation dtype). -------
        xp = _pad_spatial(_dilate_lhs(x.astype(acc_dtype), lhs_dilation), pads)
        wk = w.astype(acc_dtype)

        # ---- Expose the groups. ------------------------------------------
        # lhs: (N, C, *S)  -> (B, N/B, G, C/G, *S)   (both group-major)
        # rhs: (O, I, *K)  -> (B, G, O/(B*G), I, *K) (output features are
        #      split group-major; at most one of B, G exceeds 1)
        bgc, fgc = batch_group_count, feature_group_count
        xg = xp.reshape((bgc, out_batch, fgc, in_features // fgc) + xp.shape[2:])
        wg = wk.reshape(
            (bgc, fgc, out_features // (bgc * fgc), kernel_in_features) + kernel_shape
        )
        acc = np.zeros(
            (out_batch, bgc, fgc, out_features // (bgc * fgc)) + out_spatial,
            dtype=acc_dtype,
        )

        # ---- Loop over kernel offsets; one strided window per offset. -----
        for offset in itertools.product(*(range(k) for k in kernel_shape)):
            window = tuple(
                slice(k * d, k * d + (o - 1) * s + 1, s)
                for k, d, o, s in zip(offset, rhs_dilation, out_spatial, window_strides)
            )
            patch = xg[(slice(None),) * 4 + window]  # (B, N/B, G, C/G, *out)
            tap = wg[(slice(None),) * 4 + offset]  # (B, G, O/(BG), I)
            acc += np.einsum("bngc...,bgoc->nbgo...", patch, tap)
        result = acc.reshape(out_shape_canonical)

    # ---- Back to the requested output layout and dtype. ------------------
    out = np.transpose(result, tuple(np.argsort(out_spec)))
    return np.asarray(out.astype(out_dtype))
