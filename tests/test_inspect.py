"""Inspection: the report's cost fields, `Report.plot`, `jaxtile.check` and the command line."""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile
from jaxtile._src import verify as verify_lib
from jaxtile._src import cli
from jaxtile._src import lower as lower_lib
from jaxtile._src import geometry
from jaxtile._src import spec as spec_lib
from jaxtile import reference

THIS_FILE = os.path.basename(__file__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DN = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _line_of(marker: str) -> int:
  with open(__file__) as f:
    (line,) = [i for i, text in enumerate(f, 1) if text.rstrip().endswith("# " + marker)]
  return line


def conv1d(x, w):
  return lax.conv_general_dilated(x, w, (1,), "SAME")


def _one(fun, *args, **policy) -> jaxtile.ConvReport:
  (c,) = jaxtile.explain(fun, **policy)(*args).convs
  return c


# ---------------------------------------------------------------------------------------------
# Report: halo overhead, padding waste, pieces per device
# ---------------------------------------------------------------------------------------------


def test_two_tiles_of_a_three_tap_conv_by_hand():
  """n=16, k=3, SAME (1, 1), 2 tiles of 8 outputs.

  Tile [0, 8) reads x[0:9] (padding (1, 0)); tile [8, 16) reads x[7:16] (padding (0, 1)): 18
  elements of 16, +12.5%. Each tile does 8 * 3 = 24 MACs, 48 in all, as the whole conv: +0%. One
  MAC per tile lands on padding (output 0 tap 0; output 15 tap 2): 2 / 48.
  """
  x, w = jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3))
  c = _one(conv1d, x, w, tile_shape=(8,))
  assert c.tiled and c.n_elemental == 2
  assert c.extra_input_percent == pytest.approx(12.5)
  assert c.extra_flops_percent == pytest.approx(0.0)
  assert c.padding_waste_percent == pytest.approx(100 * 2 / 48)
  assert c.pieces_per_device == c.plan.pieces_per_device == (2,)


def test_shifted_last_tile_counts_as_recomputation():
  """Tiles of 6 over 16 outputs start at 0, 6 and 10 (the last shifted back): 18 outputs
  computed for 16 (+12.5% MACs); they read x[0:7], x[5:13], x[9:16], 22 elements (+37.5%)."""
  c = _one(conv1d, jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)), tile_shape=(6,))
  assert c.n_elemental == 3
  assert c.extra_input_percent == pytest.approx(37.5)
  assert c.extra_flops_percent == pytest.approx(12.5)
  assert c.padding_waste_percent == pytest.approx(100 * 2 / 54)


def test_output_channel_blocks_read_the_input_again():
  x, w = jnp.ones((1, 4, 16)), jnp.ones((8, 4, 3))
  c = _one(conv1d, x, w, channel_block=(None, 2))
  assert c.out_channel_blocks == 4
  assert c.extra_input_percent == pytest.approx(300.0)
  assert c.extra_flops_percent == pytest.approx(0.0)


def test_untiled_conv_has_no_overhead():
  c = _one(conv1d, jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)))
  assert not c.tiled
  assert (c.extra_input_percent, c.extra_flops_percent) == (0.0, 0.0)
  assert c.padding_waste_percent == pytest.approx(100 * 2 / 48)
  assert c.pieces_per_device == (1,)


def _brute_costs(plan: geometry.ConvPlan):
  """(lhs elements read, MACs, MACs on padding), piece by piece, counting taps explicitly."""
  s = plan.spec
  pieces_per_axis = [[(run, k) for run in axis.runs for k in range(run.count)]
                     for axis in plan.axes()]
  read = macs = padding = 0
  for combo in itertools.product(*pieces_per_axis):
    if any(run.empty for run, _ in combo):
      continue
    sizes, pads = {}, {}
    for run, _ in combo:
      sizes.update({sp.dim: sp.size for sp in run.spans if sp.size is not None})
      if run.padding is not None:
        pads[run.padding[0]] = run.padding[1]
    lhs = [sizes.get(("lhs", a), n) for a, n in enumerate(s.lhs_shape)]
    rhs = [sizes.get(("rhs", a), n) for a, n in enumerate(s.rhs_shape)]
    out = [sizes.get(("out", a), n) for a, n in enumerate(s.out_shape)]
    inside = np.ones((), bool)
    for d in range(s.n_spatial):
      (lo, hi), width = pads[d], lhs[s.lhs_axes[2 + d]]
      tile, taps = out[s.out_axes[2 + d]], rhs[s.rhs_axes[2 + d]]
      line = np.zeros(lo + (width - 1) * s.lhs_dilation[d] + 1 + hi, bool)
      line[lo:lo + (width - 1) * s.lhs_dilation[d] + 1] = True
      q = np.add.outer(np.arange(tile) * s.window_strides[d],
                       np.arange(taps) * s.rhs_dilation[d])
      inside = np.multiply.outer(inside, line[q])
    channels = out[s.out_axes[0]] * out[s.out_axes[1]] * rhs[s.rhs_axes[1]]
    read += math.prod(lhs)
    macs += channels * inside.size
    padding += channels * int((~inside).sum())
  return read, macs, padding


COST_CASES = {
    "strided 2-D tiles": dict(lhs=(1, 3, 13, 11), rhs=(4, 3, 3, 2), tile_shape=(4, 3),
                              window_strides=(2, 1), padding=((1, 2), (0, 1))),
    "negative padding, rhs dilation": dict(lhs=(2, 2, 15), rhs=(2, 2, 3), tile_shape=(4,),
                                           padding=((-2, 3),), rhs_dilation=(2,)),
    "lhs dilation (transposed)": dict(lhs=(1, 2, 9), rhs=(2, 2, 4), tile_shape=(5,),
                                      padding=((3, 2),), lhs_dilation=(2,), window_strides=(2,)),
    "groups and channel blocks": dict(lhs=(1, 4, 10), rhs=(6, 2, 3), channel_block=(1, 2),
                                      tile_shape=(4,), padding=((1, 1),), feature_group_count=2),
    "padding-only tiles skipped": dict(lhs=(1, 1, 4), rhs=(1, 1, 3), tile_shape=(2,),
                                       padding=((6, 5),)),
}


@pytest.mark.parametrize("case", COST_CASES.values(), ids=COST_CASES.keys())
def test_costs_match_piece_by_piece_count(case):
  case = dict(case)
  lhs, rhs = jnp.ones(case.pop("lhs")), jnp.ones(case.pop("rhs"))
  policy = {k: case.pop(k) for k in ("tile_shape", "channel_block") if k in case}
  case.setdefault("window_strides", (1,) * (lhs.ndim - 2))
  c = _one(lambda x, w: lax.conv_general_dilated(x, w, **case), lhs, rhs, **policy)
  assert c.tiled
  read, macs, padding = _brute_costs(c.plan)
  spec = c.plan.spec
  whole = math.prod(spec.out_shape) * spec.in_per_group * math.prod(spec.kernel_spatial)
  assert c.extra_input_percent == pytest.approx(100 * (read / lhs.size - 1))
  assert c.extra_flops_percent == pytest.approx(100 * (macs / whole - 1))
  assert c.padding_waste_percent == pytest.approx(100 * padding / macs)


def test_padding_waste_of_a_whole_conv_matches_the_reference():
  """Without lhs dilation, the MACs on real input are the conv of ones by ones."""
  kw = dict(window_strides=(2, 1), padding=((2, 1), (3, -1)), rhs_dilation=(1, 2))
  x, w = np.ones((1, 1, 9, 12)), np.ones((1, 1, 3, 4))
  real = reference.conv_general_dilated(x, w, **kw).sum()
  c = _one(lambda x, w: lax.conv_general_dilated(x, w, **kw), jnp.asarray(x, jnp.float32),
           jnp.asarray(w, jnp.float32))
  all_macs = math.prod(c.out_shape) * w.size
  assert c.padding_waste_percent == pytest.approx(100 * (1 - real / all_macs))
  # Tiles that divide the output evenly add no padding and no MACs.
  t = _one(lambda x, w: lax.conv_general_dilated(x, w, **kw), jnp.asarray(x, jnp.float32),
           jnp.asarray(w, jnp.float32), tile_shape=(None, c.out_shape[3] // 2))
  assert t.tiled and t.extra_flops_percent == pytest.approx(0.0)
  assert t.padding_waste_percent == pytest.approx(c.padding_waste_percent)


def test_report_prints_the_costs():
  report = jaxtile.explain(conv1d, tile_shape=(8,))(jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)))
  lines = str(report).splitlines()
  header = next(line for line in lines if line.startswith("conv "))
  assert all(column in header for column in ("pieces", "split", "+read%", "layer"))
  row = next(line for line in lines if line.startswith("conv0"))
  assert " 12.5 " in row and " tiles 2 " in row
  # The footer says what +read% counts.
  assert any(line.startswith("+read%: input read by all pieces beyond the input's size")
             for line in lines), str(report)
  wide = report.table(wide=True).splitlines()
  header = next(line for line in wide if line.startswith("name "))
  assert all(column in header for column in ("+read%", "+MACs%", "pad%", "pieces/device"))
  row = next(line for line in wide if line.startswith("conv0"))
  assert " 12.5 " in row and " 4.2 " in row and f"{THIS_FILE}:" in row


def _many_layers(x, ws):
  """Six convs with long shapes, three of them in a deep named scope."""
  for i, w in enumerate(ws):
    with jax.named_scope(f"EncoderStage_{i}/ResidualBlock_{i}/DepthwiseSeparableConv_{i}" if i % 2
                         else ""):
      x = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return x


def test_report_fits_100_columns_and_wide_shows_everything():
  x = jax.ShapeDtypeStruct((16, 1024, 1024, 16, 128), jnp.bfloat16)
  ws = [jax.ShapeDtypeStruct((3, 3, 3, 128, 128), jnp.bfloat16)] * 6
  report = jaxtile.explain(_many_layers, max_bytes=2**26, devices=jax.devices()[:8])(x, ws)
  text = str(report)
  assert len(report.tiled) == 6
  assert max(map(len, text.splitlines())) <= 100, text
  assert " devices " in text and " 512 x8 " in text  # distributed: pieces per device
  # The deep scopes are cut from the left, keeping what tells them apart.
  layers = [line.rsplit("  ", 1)[1] for line in text.splitlines() if line.startswith("conv")][1:]
  assert all(f"Conv_{i} {THIS_FILE}:" in layers[i] for i in (1, 3, 5)), layers
  wide = report.table(wide=True)
  assert max(map(len, wide.splitlines())) > 100
  assert "EncoderStage_3/ResidualBlock_3/DepthwiseSeparableConv_3" in wide
  assert "bf16[16,1024,1024,16,128]" in wide and "+MACs%" in wide


@pytest.mark.parametrize("max_bytes, shown", [
    (100, "max_bytes=100 (100 B)"), (2048, "max_bytes=2048 (2 KiB)"),
    (3 * 2**10 // 2, "max_bytes=1536 (1.5 KiB)"), (2**26, "max_bytes=67108864 (64 MiB)"),
    (2**31, "max_bytes=2147483648 (2 GiB)")])
def test_budgets_print_in_their_own_unit(max_bytes, shown):
  x, w = jax.ShapeDtypeStruct((1, 1, 64), jnp.float32), jax.ShapeDtypeStruct((1, 1, 3), jnp.float32)
  header = str(jaxtile.explain(conv1d, max_bytes=max_bytes)(x, w)).splitlines()[0]
  assert header.endswith(shown), header
  assert "0.0 MiB" not in header and "0.1 MiB" not in header


# ---------------------------------------------------------------------------------------------
# Report.plot
# ---------------------------------------------------------------------------------------------


def _mixed_report():
  def f(x, w, x1, w1, x3, w3):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    z = lax.conv_general_dilated(x1, w1, (2,), "SAME")
    v = lax.conv_general_dilated(x3, w3, (1, 1, 1), "SAME")
    return y, z, v
  args = (jnp.ones((1, 16, 12, 2)), jnp.ones((3, 3, 2, 4)), jnp.ones((1, 2, 20)),
          jnp.ones((4, 2, 3)), jnp.ones((1, 1, 6, 6, 6)), jnp.ones((1, 1, 3, 3, 3)))
  return jaxtile.explain(f, max_bytes=2**10, channel_block=(None, 2))(*args)


def test_plot_writes_png_and_svg(tmp_path):
  pytest.importorskip("matplotlib", reason="Report.plot needs matplotlib (jaxtile[plot])")
  report = _mixed_report()
  assert len(report.tiled) == 3
  png, svg = tmp_path / "tiles.png", str(tmp_path / "tiles.svg")
  assert report.plot(png) == png and report.plot(svg) == svg
  assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
  assert "<svg" in (tmp_path / "tiles.svg").read_text()
  untiled = jaxtile.explain(conv1d)(jnp.ones((1, 1, 8)), jnp.ones((1, 1, 3)))
  assert untiled.plot(tmp_path / "none.png").stat().st_size > 0


def test_plot_rejects_other_formats(tmp_path):
  report = jaxtile.explain(conv1d, tile_shape=(8,))(jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)))
  with pytest.raises(ValueError, match=r"path must end in \.png or \.svg.*tiles\.pdf"):
    report.plot(tmp_path / "tiles.pdf")


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
  for name in ("matplotlib", "matplotlib.figure", "matplotlib.collections",
               "matplotlib.patches"):
    monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError
  report = jaxtile.explain(conv1d, tile_shape=(8,))(jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)))
  with pytest.raises(ImportError, match=r"pip install jaxtile\[plot\]"):
    report.plot(tmp_path / "tiles.png")
  assert not (tmp_path / "tiles.png").exists()


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------


def model(x, w1, w2):
  y = jax.nn.relu(lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=DN))  # C1
  y, _ = lax.scan(
      lambda y, _: (lax.conv_general_dilated(y, w2, (1, 1), "SAME",  # C2
                                             dimension_numbers=DN), None), y, None, length=2)
  skipped = lax.cond(y.sum() > 1e30,
                     lambda y: lax.conv_general_dilated(y, w2, (1, 1), "SAME",  # C3
                                                        dimension_numbers=DN),
                     lambda y: y, y)
  return {"y": y, "z": skipped * 2}


def _model_args():
  return (_normal(0, (2, 12, 12, 3)), _normal(1, (3, 3, 3, 4), 0.3),
          _normal(2, (3, 3, 4, 4), 0.3))


def test_check_a_model():
  result = jaxtile.check(model, max_bytes=2**12)(*_model_args())
  names = [c.name for c in result.convs]
  assert names == ["jaxtile/conv0", "jaxtile/conv1", "jaxtile/conv2"]
  assert len(result.report.convs) == 3 and all(c.n_elemental > 1 for c in result.convs)
  first, loop, branch = result.convs
  for c in (first, loop):
    assert c.max_abs_error < 1e-5 and c.rel_l2_error < 1e-5
    assert c.ref_scope == "full"
    assert c.ref_max_abs_error < 1e-5 and c.ref_rel_l2_error < 1e-5
  assert f"{THIS_FILE}:{_line_of('C1')}" in first.source
  assert f"{THIS_FILE}:{_line_of('C2')}" in loop.source
  assert loop.calls == 2 and "first of 2 calls" in loop.note
  assert branch.ref_scope == "skipped" and branch.max_abs_error is None
  assert branch.calls == 0 and "never ran" in branch.note
  assert result.n_outputs == 2
  assert result.output_max_abs_error < 1e-5 and result.output_rel_l2_error < 1e-5
  text = str(result)
  assert "conv1" in text and "first of 2 calls" in text and f"{THIS_FILE}:" in text


def test_check_runs_the_program_tile_convs_runs_regions_included():
  """Convs fused into a region are not compared on their own (they exist a tile at a time); the
  function's outputs are, through the same region loop `tile_convs` runs."""
  def two_layers(x, w):
    y = jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN))
    return lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=DN)

  x, w = _normal(0, (1, 32, 32, 8)), _normal(1, (3, 3, 8, 8), 0.2)
  result = jaxtile.check(two_layers, max_bytes=2**14)(x, w)
  assert result.report.regions and result.compared
  assert all(c.ref_scope == "skipped" and c.max_abs_error is None for c in result.convs)
  assert all("jaxtile/region0's loop" in c.note for c in result.convs)
  assert all(c.region == "jaxtile/region0" for c in result.convs)
  # Their pieces are the region's tiles, not those `decide` would give each conv alone.
  rows = [line.split()[:2] for line in str(result).splitlines() if re.match(r"conv\d+ ", line)]
  assert rows == [["conv0", "-"], ["conv1", "-"]], str(result)
  assert result.output_rel_l2_error < 1e-6
  unfused = jaxtile.check(two_layers, max_bytes=2**14, fuse=False)(x, w)
  assert all(c.rel_l2_error < 1e-6 and c.ref_scope == "full" for c in unfused.convs)


WINDOW_CASES = {
    "strided, asymmetric padding": dict(lhs=(2, 3, 11, 13), rhs=(5, 3, 3, 2),
                                        window_strides=(2, 1), padding=((1, 2), (-1, 1))),
    "lhs and rhs dilation": dict(lhs=(1, 2, 9, 7), rhs=(3, 2, 3, 2), window_strides=(1, 1),
                                 padding=((2, 1), (1, 1)), lhs_dilation=(2, 1),
                                 rhs_dilation=(1, 2)),
    "feature groups": dict(lhs=(2, 4, 10, 10), rhs=(6, 2, 3, 3), window_strides=(1, 1),
                           padding=((1, 1), (1, 1)), feature_group_count=2),
    "batch groups": dict(lhs=(4, 2, 10, 10), rhs=(4, 2, 3, 3), window_strides=(1, 1),
                         padding=((1, 1), (0, 0)), batch_group_count=2),
}


def test_check_on_reference_windows(monkeypatch):
  """Every conv compared on windows (as for big convs) still matches the reference."""
  monkeypatch.setattr(verify_lib, "FULL_REFERENCE_ELEMENTS", 0)
  monkeypatch.setattr(verify_lib, "WINDOW_EXTENT", 3)
  monkeypatch.setattr(verify_lib, "WINDOW_CHANNELS", 2)
  cases = [dict(c) for c in WINDOW_CASES.values()]
  args = []
  for i, case in enumerate(cases):
    args += [_normal(2 * i, case.pop("lhs")), _normal(2 * i + 1, case.pop("rhs"))]

  def f(*args):
    return [lax.conv_general_dilated(x, w, **case)
            for x, w, case in zip(args[::2], args[1::2], cases)]

  result = jaxtile.check(f, tile_shape=2, windows=3, seed=1)(*args)
  assert len(result.convs) == len(cases)
  for c, name in zip(result.convs, WINDOW_CASES):
    assert c.ref_scope == "windows", name
    assert c.ref_max_abs_error < 1e-5 and c.ref_rel_l2_error < 1e-5, (name, c)
    assert c.max_abs_error < 1e-5, (name, c)


def test_check_without_windows_skips_big_convs(monkeypatch):
  monkeypatch.setattr(verify_lib, "FULL_REFERENCE_ELEMENTS", 0)
  (c,) = jaxtile.check(conv1d, tile_shape=(8,), windows=0)(jnp.ones((1, 1, 16)),
                                                         jnp.ones((1, 1, 3))).convs
  assert c.ref_scope == "skipped" and c.ref_max_abs_error is None
  assert c.max_abs_error == 0.0 and "windows=0" in c.note


def test_check_finds_a_wrong_tiling(monkeypatch):
  real_lower = lower_lib.lower

  def off_by_a_bit(plan, name, policy=None):
    tiled = real_lower(plan, name, policy)
    return lambda lhs, rhs: tiled(lhs, rhs) * 1.01
  monkeypatch.setattr(lower_lib, "lower", off_by_a_bit)
  x, w = _normal(0, (1, 2, 16)), _normal(1, (2, 2, 3))
  result = jaxtile.check(conv1d, tile_shape=(8,))(x, w)
  (c,) = result.convs
  assert c.rel_l2_error == pytest.approx(0.01, rel=1e-3)
  assert c.ref_rel_l2_error == pytest.approx(0.01, rel=1e-3)
  assert result.output_rel_l2_error == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(windows=-1), ValueError, r"windows must be >= 0, but got windows=-1"),
    (dict(windows=1.5), TypeError, r"windows must be an int >= 0, but got windows=1.5"),
    (dict(seed=True), TypeError, r"seed must be an int"),
    (dict(max_byte=10), TypeError, r"unknown keyword argument\(s\) 'max_byte'"),
    (dict(max_bytes=0), ValueError, r"max_bytes must be positive, but got max_bytes=0"),
])
def test_check_rejects_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxtile.check(conv1d, **kwargs)


def test_check_rejects_a_non_callable():
  with pytest.raises(TypeError, match="check: fun must be callable, but got fun=3"):
    jaxtile.check(3)


# ---------------------------------------------------------------------------------------------
# explain, check and autotune: one call style, decorated functions, nothing tiled, layers
# ---------------------------------------------------------------------------------------------


def conv2d(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # CONV2D


@jaxtile.tile_convs(max_bytes=2**14)
def decorated(x, w):
  return jax.nn.relu(conv2d(x, w))


def _conv2d_args():
  return _normal(0, (1, 32, 32, 4)), _normal(1, (3, 3, 4, 4), 0.3)


@pytest.mark.parametrize("op, returns", [("explain", "Report"), ("check", "CheckResult"),
                                         ("autotune", "TuneResult")])
def test_one_call_style_and_a_forgotten_call_says_what_to_do(op, returns):
  staged = getattr(jaxtile, op)(conv2d, max_bytes=2**14)
  text = str(staged)  # what print(jaxtile.explain(f, max_bytes=...)) shows
  assert text == repr(staged) and "<function" not in text
  assert f"jaxtile.{op}(conv2d) with policy max_bytes=16384 given to {op}: not run yet" in text
  assert f"Call it with conv2d's arguments to get the {returns}" in text
  assert staged.__name__ == "conv2d"
  # The old form, arguments passed to the op itself, says what to write instead.
  x, w = _conv2d_args()
  with pytest.raises(TypeError, match=re.escape(f"{op}: takes the function and policy keywords, "
                                                f"then is called with the function's arguments, "
                                                f"as jaxtile.{op}(fun, **policy)(*args)")):
    getattr(jaxtile, op)(conv2d, x, w, max_bytes=2**14)


def test_check_takes_keyword_arguments_like_the_function():
  x, w = _conv2d_args()
  result = jaxtile.check(conv2d, max_bytes=2**14)(x, w=w)
  assert result.compared and result.convs[0].rel_l2_error < 1e-6


def test_a_decorated_function_is_explained_checked_and_tuned_undecorated():
  x, w = _conv2d_args()
  where = f"{THIS_FILE}:{_line_of('CONV2D')} (conv2d)"
  report = jaxtile.explain(decorated)(x, w)
  (c,) = report.convs  # the user's conv, not jaxtile's pieces
  assert c.tiled and c.source.endswith(where) and report.max_bytes == 2**14
  assert report.policy == "@tile_convs(max_bytes=16384) of decorated"
  assert "policy: @tile_convs(max_bytes=16384) of decorated" in str(report)
  # Keywords given to explain override the decorator's, and the report says so.
  bigger = jaxtile.explain(decorated, max_bytes=2**20)(x, w)
  assert bigger.max_bytes == 2**20 and not bigger.tiled
  assert bigger.policy == ("@tile_convs(max_bytes=16384) of decorated, with max_bytes=1048576 "
                           "given to explain")
  result = jaxtile.check(decorated)(x, w)
  assert result.compared and result.convs[0].source.endswith(where)
  assert result.report.policy == "@tile_convs(max_bytes=16384) of decorated"
  assert result.convs[0].rel_l2_error < 1e-6
  tuned = jaxtile.autotune(decorated, repeats=1)(x, w)
  assert len(tuned.convs) == 1 and tuned.convs[0].source.endswith(where)
  assert "policy: @tile_convs(max_bytes=16384) of decorated" in str(tuned)


def test_a_call_to_an_already_tiled_function_is_named_not_explained():
  x, w = _conv2d_args()
  report = jaxtile.explain(lambda x, w: conv2d(decorated(x, w), w), max_bytes=2**14)(x, w)
  (c,) = report.convs  # the outer conv only; none of jaxtile's pieces
  assert c.source.endswith(f"{THIS_FILE}:{_line_of('CONV2D')} (conv2d)")
  assert report.already_tiled == ("tile_convs(decorated)",)
  assert "not listed: tile_convs(decorated), already tiled" in str(report)
  jitted = jaxtile.explain(jax.jit(decorated))(x, w)
  assert jitted.convs == [] and jitted.already_tiled == ("tile_convs(decorated)",)


def _relu_convs(x, *ws, strides=(1, 1)):
  for w, s in zip(ws, strides):
    x = jax.nn.relu(lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=DN))
  return x


def test_a_program_differentiated_before_tiling_is_told_what_it_keeps_whole():
  # A strided conv ends the regions of a program JAX has already differentiated: its forward
  # convs are tiled one by one, and the report says what that keeps whole and what to do.
  x = jax.ShapeDtypeStruct((1, 64, 64, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
  loss = lambda *a, strides: jnp.sum(_relu_convs(*a, strides=strides))
  grad = lambda strides: jax.grad(functools.partial(loss, strides=strides), argnums=(0, 1, 2))
  report = jaxtile.explain(grad((1, 2)), max_bytes=40_000)(x, w, w)
  assert [c.name for c in report.differentiated_alone()] == ["jaxtile/conv0", "jaxtile/conv1"]
  text = " ".join(str(report).split())
  assert ("differentiated before tiling: the forward conv(s) conv0, conv1 are tiled one by one"
          in text), text
  assert "jax.grad(tile_convs(f))" in text
  # Without a stride the whole differentiated program is one region: nothing to say.
  report = jaxtile.explain(grad((1, 1)), max_bytes=40_000)(x, w, w)
  assert report.regions and report.differentiated_alone() == []
  assert "differentiated before tiling" not in str(report)
  # A forward program alone has no backward pass.
  report = jaxtile.explain(functools.partial(_relu_convs, strides=(1, 2)), max_bytes=40_000,
                           fuse=False)(x, w, w)
  assert report.tiled and "differentiated before tiling" not in str(report)


def test_regions_inside_and_outside_a_nested_jit_have_names_of_their_own():
  # A region in a nested jaxpr (a `jax.jit` inside the function) is planned while the
  # enclosing jaxpr's regions are placed. Both were once named region0, and the report listed
  # every conv of the two under each.
  x = _normal(0, (1, 32, 32, 4))
  ws = [_normal(i, (3, 3, 4, 4), 0.3) for i in range(1, 5)]
  block = jax.jit(_relu_convs)

  def f(x, *ws):
    return _relu_convs(block(x, *ws[:2]), *ws[2:])

  report = jaxtile.explain(f, max_bytes=8_000)(x, *ws)
  names = [r.name for r in report.regions]
  assert len(names) == 2 and len(set(names)) == 2, names
  for region in report.regions:
    assert list(region.convs) == [c.name for c in report.convs if c.region == region.name]
  assert sorted(c for r in report.regions for c in r.convs) == [
      f"jaxtile/conv{i}" for i in range(4)]
  inner = next(r for r in report.regions if "jaxtile/conv0" in r.convs)
  assert inner.convs == ("jaxtile/conv0", "jaxtile/conv1")
  text = str(report)
  for region in report.regions:
    short = region.name.removeprefix("jaxtile/")
    convs = ", ".join(c.removeprefix("jaxtile/") for c in region.convs)
    assert f"{short}: {convs} and" in text, text
  tiled = jax.jit(jaxtile.tile_convs(f, max_bytes=8_000))
  np.testing.assert_array_equal(tiled(x, *ws), jax.jit(f)(x, *ws))


def test_explain_and_check_say_plainly_when_nothing_is_tiled():
  x, w = _conv2d_args()
  report = jaxtile.explain(conv2d)(x, w)  # the default budget: 2 GiB on a CPU host
  budget = report.max_bytes_to_tile()
  text = str(report)
  assert "nothing is tiled: every conv fits max_bytes=2147483648 (2 GiB)" in " ".join(text.split())
  assert f"max_bytes={budget} ({spec_lib.format_bytes(budget)}) or less" in " ".join(text.split())
  assert "+read%:" not in text
  result = jaxtile.check(conv2d)(x, w)
  text = " ".join(str(result).split())
  assert not result.compared and result.convs == []
  assert "NOTHING WAS COMPARED: nothing is tiled" in text and "max abs error" not in text
  assert f"max_bytes={budget}" in text
  # The budget named tiles it.
  assert jaxtile.check(conv2d, max_bytes=budget)(x, w).compared
  for tier in ("native", "reference"):
    text = str(jaxtile.explain(conv2d, tier=tier, max_bytes=2**10)(x, w))
    assert f"nothing is tiled: tier={tier!r} rewrites no conv into pieces" in text


def test_over_budget_is_logged_once_and_names_the_rule(caplog, fixture_module):
  """One warning per conv whichever way it is inspected, saying the budget forced the split."""
  import logging

  x, w = _conv2d_args()
  runs = {"explain": lambda: jaxtile.explain(conv2d, max_bytes=16)(x, w),
          "check": lambda: jaxtile.check(conv2d, max_bytes=16)(x, w),
          "cli explain --jaxpr": lambda: cli.main(
              ["explain", f"{fixture_module}:forward", *SMALL[:4], "--max-bytes", "16",
               "--jaxpr"])}
  for name, run in runs.items():
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, (name, warnings)
    assert "finest split reachable leaves pieces of" in warnings[0], warnings
    assert "above the budget max_bytes=16 (16 B)" in warnings[0], warnings


def test_layers_built_by_one_helper_are_told_apart():
  nn = pytest.importorskip("flax.linen", reason="the flax model needs flax")

  def block(x, features, name):
    """One helper builds every conv layer: the innermost user frame is the same for all."""
    return nn.relu(nn.Conv(features, (3, 3), name=name)(x))  # HELPER

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      return block(block(x, 4, "stem"), 4, "head")

  model = Encoder()
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  report = jaxtile.explain(model.apply, max_bytes=2**14)(params, x)
  stem, head = report.convs
  helper = f"{THIS_FILE}:{_line_of('HELPER')} (test_layers_built_by_one_helper_are_told_apart."
  helper += "<locals>.block)"
  assert stem.source.endswith(helper) and head.source.endswith(helper)  # the same frame
  assert (stem.scope, head.scope) == ("Encoder/stem", "Encoder/head")
  assert stem.layer != head.layer
  rows = [line for line in str(report).splitlines() if line.startswith("conv")][1:]
  assert "Encoder/stem" in rows[0] and "Encoder/head" in rows[1]
  # Without module paths (a plain function), the call sites tell them apart.
  def forward(x, w1, w2):
    y = conv2d(x, w1)  # FIRST
    return conv2d(y, w2)  # SECOND
  args = _conv2d_args()
  first, second = jaxtile.explain(forward, max_bytes=2**14)(*args, args[1]).convs
  assert first.source == second.source and first.scope == second.scope == ""
  assert first.call_site.endswith(f"{THIS_FILE}:{_line_of('FIRST')} (test_layers_built_by_one_"
                                  "helper_are_told_apart.<locals>.forward)")
  assert second.call_site.endswith(f":{_line_of('SECOND')} (test_layers_built_by_one_helper_are_"
                                   "told_apart.<locals>.forward)")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

FIXTURE = '''
import jax
from jax import lax


def forward(x, w):
  return jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def fixture_module(tmp_path):
  path = tmp_path / "inspect_fixture_model.py"
  path.write_text(textwrap.dedent(FIXTURE))
  return path


SMALL = ["--arg", "1x32x32x3:float32", "--arg", "3x3x3x8:float32", "--max-bytes", "2**14"]


def test_cli_explain(fixture_module, capsys):
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL, "--jaxpr"]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("jaxtile report: 1 conv(s), 1 tiled")
  assert "inspect_fixture_model.py:7 (forward)" in out
  assert "name=jaxtile_conv0" in out  # the rewritten jaxpr: the tiled conv's program
  assert "Traceback" not in err


def test_cli_wide_prints_every_column(fixture_module, capsys):
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL]) == 0
  narrow = capsys.readouterr().out
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL, "--wide"]) == 0
  wide = capsys.readouterr().out
  assert "+MACs%" not in narrow and "+MACs%" in wide and "f32[3,3,3,8]" in wide
  assert max(map(len, narrow.splitlines())) <= 100
  assert f"{fixture_module}:7 (forward)" in wide  # the full path


def test_cli_explain_plot(fixture_module, capsys, tmp_path):
  pytest.importorskip("matplotlib", reason="--plot needs matplotlib (jaxtile[plot])")
  path = tmp_path / "tiles.svg"
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL, "--plot", str(path)]) == 0
  assert f"plot: {path}" in capsys.readouterr().out and "<svg" in path.read_text()


def test_cli_explain_is_abstract(fixture_module, capsys):
  """A 4 GiB input is only traced: explain takes ShapeDtypeStructs, nothing is allocated."""
  argv = ["explain", f"{fixture_module}:forward", "--arg", "1x4096x4096x64:float32",
          "--arg", "3x3x64x64:float32", "--max-bytes", "256MiB", "--wide"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "f32[1,4096,4096,64]" in out and "1 tiled" in out


def test_cli_check(fixture_module, capsys):
  assert cli.main(["check", f"{fixture_module}:forward", *SMALL, "--seed", "3"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("jaxtile check: 1 tiled conv(s) of 1")
  row = next(line for line in out.splitlines() if line.startswith("conv0"))
  assert " full " in row


def test_cli_check_that_tiles_nothing_says_so(fixture_module, capsys):
  """At the default budget nothing is tiled: no error numbers, a plain statement, exit status 1,
  and a --max-bytes that does tile it."""
  argv = ["check", f"{fixture_module}:forward", *SMALL[:4]]
  assert cli.main(argv) == 1
  out, err = capsys.readouterr()
  assert out.startswith("jaxtile check: 0 tiled conv(s) of 1")
  assert "NOTHING WAS COMPARED: nothing is tiled" in out and "max abs error" not in out
  budget = re.search(r"--max-bytes (\d+) tiles the largest conv", err).group(1)
  assert cli.main(argv + ["--max-bytes", budget]) == 0
  assert "jaxtile check: 1 tiled conv(s) of 1" in capsys.readouterr().out


def test_python_dash_m_entry_point(fixture_module):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtile", "explain", f"{fixture_module.stem}:forward", *SMALL],
      cwd=fixture_module.parent, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("jaxtile report: 1 conv(s), 1 tiled")
  bad = subprocess.run([sys.executable, "-m", "jaxtile", "explain", "no_such_module:f"],
                       cwd=fixture_module.parent, env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines() == [
      "jaxtile: error: cannot import module 'no_such_module'",
      "  No module named 'no_such_module' (from 'no_such_module:f')"]


BAD_COMMANDS = {
    "no colon": (["explain", "{path}", *SMALL], "must be MODULE:FUNCTION"),
    "unknown module": (["explain", "no_such_module_xyz:f", *SMALL],
                       "cannot import module 'no_such_module_xyz'"),
    "no such file": (["explain", "{dir}/missing.py:f", *SMALL], "no such file"),
    "unknown function": (["explain", "{path}:backward", *SMALL], "has no attribute 'backward'"),
    "not callable": (["explain", "{path}:NOT_A_FUNCTION", *SMALL], "is not callable"),
    "arg without colon": (["explain", "{path}:forward", "--arg", "1x32x32x3"],
                          "argument --arg: expected SHAPE:DTYPE"),
    "bad shape": (["explain", "{path}:forward", "--arg", "1x3y2:float32"], "the shape must be"),
    "bad dtype": (["explain", "{path}:forward", "--arg", "1x32:floaty"], "'floaty'"),
    "bad plot suffix": (["explain", "{path}:forward", *SMALL, "--plot", "{dir}/tiles.pdf"],
                        "argument --plot: expected a path ending in .png or .svg"),
    "bad max-bytes": (["explain", "{path}:forward", "--max-bytes", "lots"],
                      "argument --max-bytes: expected a byte count"),
    "zero max-bytes": (["explain", "{path}:forward", "--max-bytes", "0"], "must be positive"),
    "bad tile-shape": (["explain", "{path}:forward", "--tile-shape", "4,x"],
                       "argument --tile-shape"),
    "tile-shape of the wrong rank": (["explain", "{path}:forward", *SMALL, "--tile-shape", "4,4,4"],
                                     "--tile-shape must have one extent per spatial dim"),
    "budget unreachable": (["explain", "{path}:forward", *SMALL[:4], "--max-bytes", "16",
                            "--strict"], "a conv cannot be split within --max-bytes 16"),
    "missing --arg": (["explain", "{path}:forward", *SMALL[:2]], "missing --arg for 'w'"),
    "one --arg too many": (["check", "{path}:forward", *SMALL[:4], "--arg", "3:float32"],
                           "1 --arg too many"),
    "shapes that do not convolve": (["check", "{path}:forward", "--arg", "1x8x8x3:float32",
                                     "--arg", "3x3x4x8:float32"], "feature dimension"),
    "negative windows": (["check", "{path}:forward", *SMALL, "--windows", "-1"],
                         "--windows must be >= 0"),
    "no command": ([], "required"),
}


@pytest.mark.parametrize("argv, message", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_cli_errors_are_a_short_line_then_the_detail(fixture_module, capsys, argv, message):
  argv = [a.format(path=fixture_module, dir=fixture_module.parent) for a in argv]
  assert cli.main(argv) == 2
  out, err = capsys.readouterr()
  assert "Traceback" not in err and out == ""
  first, *detail = err.rstrip("\n").splitlines()
  assert first.startswith("jaxtile: error: ") and "error: jaxtile:" not in first, first
  # Lines fit in 100 columns, but for a word longer than that alone on its line (a path).
  assert all(len(line) <= 100 or len(line.split()) == 1 for line in [first, *detail]), err
  assert all(line.startswith("  ") for line in detail), err
  assert message in " ".join(err.split()), err
  assert "strict=False" not in err and "max_bytes=" not in err  # shell words, not Python's


def test_cli_budget_error_gives_the_shell_remedies(fixture_module, capsys):
  argv = ["explain", f"{fixture_module}:forward", *SMALL[:4], "--max-bytes", "16", "--strict"]
  assert cli.main(argv) == 2
  first, *detail = capsys.readouterr().err.rstrip("\n").splitlines()
  assert first == "jaxtile: error: a conv cannot be split within --max-bytes 16 (16 B)"
  detail = " ".join(" ".join(detail).split())
  assert "finest split reachable leaves pieces of 84 bytes" in detail
  assert "lhs=f32[1,32,32,3] rhs=f32[3,3,3,8]" in detail and "inspect_fixture_model.py:7" in detail
  assert "to fix: drop --strict" in detail and "pass --max-bytes 84 or more" in detail
  # The remedy works.
  assert cli.main(argv[:-3] + ["--max-bytes", "84", "--strict"]) == 0


def test_cli_errors_never_break_a_path(tmp_path, capsys):
  # The error names the user's source line; wrapped to the terminal's width, a path longer than
  # a line was cut in two (seen in a pytest-xdist worker's deep temporary directory), and what
  # a user copied from the message named no file.
  deep = tmp_path / ("a_directory_with_a_rather_long_name_" * 3) / "model_in_a_deep_directory.py"
  deep.parent.mkdir()
  deep.write_text(textwrap.dedent(FIXTURE))
  argv = ["explain", f"{deep}:forward", *SMALL[:4], "--max-bytes", "16", "--strict"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert len(str(deep)) > cli.WIDTH and f"{deep}:7" in err, err


def test_cli_missing_arg_names_it(fixture_module, capsys):
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL[:2]]) == 2
  err = capsys.readouterr().err
  assert err.splitlines()[:2] == ["jaxtile: error: forward(x, w) needs 2 --arg, but got 1",
                                  "  missing --arg for 'w'"]
  assert "required positional argument" not in err


def _two_convs(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.lax.conv_general_dilated(y, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_named_scopes_name_each_conv_and_step():
  """The compiled program's op names (what profilers and HLO dumps show) carry
  jaxtile/convN/.../{select,process,reassemble} for every rewritten conv."""
  import re

  x, w = jnp.ones((1, 32, 32, 4)), jnp.ones((3, 3, 4, 4))
  hlo = jax.jit(jaxtile.tile_convs(_two_convs, tile_shape=(8, 32))).lower(x, w).compile().as_text()
  names = set(re.findall(r'op_name="([^"]*)"', hlo))
  for conv in ("jaxtile/conv0/", "jaxtile/conv1/"):
    for step in ("select", "process", "reassemble"):
      assert any(conv in n and f"/{step}/" in n.split(conv, 1)[1] for n in names), (conv, step)


def test_one_info_line_per_rewritten_conv(caplog):
  """Each rewritten conv logs one absl INFO line: its name, shapes, plan, piece bytes, source."""
  import logging

  x, w = jnp.ones((1, 32, 32, 4)), jnp.ones((3, 3, 4, 4))
  with caplog.at_level(logging.INFO):
    jaxtile.tile_convs(_two_convs, tile_shape=(8, 32), devices=jax.devices()[:2])(x, w)
  lines = [r.getMessage() for r in caplog.records
           if r.levelno == logging.INFO and r.getMessage().startswith("jaxtile: jaxtile/conv")]
  assert len(lines) == 2, lines
  for i, line in enumerate(lines):
    assert f"jaxtile/conv{i} " in line and "f32[1,32,32,4]" in line
    assert "n_elemental=4" in line and "pieces_per_device=(2, 2)" in line
    assert "pieces of <=" in line and "test_inspect.py" in line
