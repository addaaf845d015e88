"""A layout-free description of one `conv_general_dilated` equation, and its shape arithmetic.

`ConvSpec` names every dimension by its role (batch, feature, spatial i) and remembers where that
role lives in each operand's layout, so the planner and the lowering never look at a layout string.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxtile._src import _compat

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One convolution, normalised.

  Shapes are the operands' own (user layout); the `*_axes` fields say which array axis holds each
  role, in canonical order (batch, feature, spatial...) for lhs/out and (out-feature, in-feature,
  spatial...) for rhs, exactly as `ConvDimensionNumbers` does. `padding` is explicit (lo, hi) pairs,
  possibly negative.
  """
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  lhs_dtype: np.dtype
  rhs_dtype: np.dtype
  out_dtype: np.dtype
  lhs_axes: tuple[int, ...]
  rhs_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  feature_group_count: int
  batch_group_count: int
  params: tuple[tuple[str, Any], ...]  # the equation's full params, for re-binding pieces
  source: str = "<unknown>"

  @classmethod
  def from_eqn(cls, eqn) -> ConvSpec:
    lhs, rhs = (v.aval for v in eqn.invars)
    (out,) = (v.aval for v in eqn.outvars)
    return cls.from_avals(lhs, rhs, out, eqn.params,
                          _compat.user_source_line(eqn.source_info))

  @classmethod
  def from_avals(cls, lhs, rhs, out, p, source: str = "<unknown>") -> ConvSpec:
    """The spec of a conv with operands `lhs`, `rhs`, output `out` (shaped values) and params."""
    dn = p["dimension_numbers"]
    return cls(
        lhs_shape=tuple(lhs.shape), rhs_shape=tuple(rhs.shape), out_shape=tuple(out.shape),
        lhs_dtype=np.dtype(lhs.dtype), rhs_dtype=np.dtype(rhs.dtype),
        out_dtype=np.dtype(out.dtype),
        lhs_axes=tuple(dn.lhs_spec), rhs_axes=tuple(dn.rhs_spec), out_axes=tuple(dn.out_spec),
        window_strides=tuple(p["window_strides"]),
        padding=tuple((int(lo), int(hi)) for lo, hi in p["padding"]),
        lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
        feature_group_count=int(p["feature_group_count"]),
        batch_group_count=int(p["batch_group_count"]),
        params=tuple(sorted(p.items())),
        source=source,
    )

  # Roles. The lhs batch holds `batch_group_count` groups of `batch` rows each; features hold
  # `groups` groups of `in_per_group` (lhs) and `out_per_group` (rhs and out) each.
  @property
  def n_spatial(self) -> int:
    return len(self.lhs_axes) - 2

  @property
  def batch(self) -> int:
    """Output batch size (the lhs batch is `batch_group_count` times this)."""
    return self.out_shape[self.out_axes[0]]

  @property
  def groups(self) -> int:
    """Feature groups or batch groups (at most one of the two exceeds 1)."""
    return self.feature_group_count * self.batch_group_count

  @property
  def in_per_group(self) -> int:
    return self.rhs_shape[self.rhs_axes[1]]

  @property
  def out_per_group(self) -> int:
    return self.rhs_shape[self.rhs_axes[0]] // self.groups

  @property
  def in_spatial(self) -> tuple[int, ...]:
    return tuple(self.lhs_shape[a] for a in self.lhs_axes[2:])

  @property
  def kernel_spatial(self) -> tuple[int, ...]:
    return tuple(self.rhs_shape[a] for a in self.rhs_axes[2:])

  @property
  def out_spatial(self) -> tuple[int, ...]:
    return tuple(self.out_shape[a] for a in self.out_axes[2:])

  @property
  def param_dict(self) -> dict[str, Any]:
    return dict(self.params)

  @property
  def acc_dtype(self) -> np.dtype:
    """Dtype in which input-channel partial sums are accumulated.

    Half-precision partials accumulate in float32 and round once at the end, as the monolithic
    conv does internally; everything else accumulates in its own output dtype.
    """
    if self.out_dtype in (np.dtype(np.float16), np.dtype("bfloat16")):
      return np.dtype(np.float32)
    return self.out_dtype

  def working_bytes(self) -> int:
    """Bytes the monolithic conv holds at once: both operands and its output."""
    return (array_bytes(self.lhs_shape, self.lhs_dtype) + array_bytes(self.rhs_shape, self.rhs_dtype)
            + array_bytes(self.out_shape, self.out_dtype))

  def describe(self) -> str:
    """`conv_general_dilated lhs=f32[...] rhs=f32[...] -> f32[...] at file:line`, for messages."""
    return (f"conv_general_dilated lhs={short_aval(self.lhs_shape, self.lhs_dtype)} "
            f"rhs={short_aval(self.rhs_shape, self.rhs_dtype)} -> "
            f"{short_aval(self.out_shape, self.out_dtype)} (window_strides={self.window_strides}, "
            f"padding={self.padding}, lhs_dilation={self.lhs_dilation}, "
            f"rhs_dilation={self.rhs_dilation}, feature_group_count={self.feature_group_count}, "
            f"batch_group_count={self.batch_group_count}) at {self.source}")


def array_bytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def format_bytes(n: int) -> str:
  """`100 B`, `1.5 KiB`, `548 KiB`, `16 MiB`, `2 GiB`: three significant digits at most."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n} B"


def short_aval(shape, dtype) -> str:
  return f"{_short_dtype(np.dtype(dtype))}[{','.join(map(str, shape))}]"


def _short_dtype(dtype: np.dtype) -> str:
  kind = {"f": "f", "i": "i", "u": "u", "c": "c", "b": "bool"}.get(dtype.kind, dtype.name)
  if dtype.name == "bfloat16":
    return "bf16"
  return "bool" if kind == "bool" else f"{kind}{8 * dtype.itemsize}"


def dilated_extent(n: int, dilation: int) -> int:
  """Length of `n` elements with `dilation - 1` zeros inserted between neighbours."""
  return 0 if n == 0 else (n - 1) * dilation + 1


def out_extent(n: int, k: int, stride: int, pad: tuple[int, int], lhs_dil: int, rhs_dil: int) -> int:
  """Output length along one spatial dim, as XLA's convolution shape rule computes it."""
  padded = pad[0] + dilated_extent(n, lhs_dil) + pad[1]
  window = dilated_extent(k, rhs_dil)
  return max(0, (padded - window) // stride + 1) if padded >= window else 0
