"""Inspection: the report's cost fields, `Report.plot`, `jaxtile.check` and the command line."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxtile
from jaxtile import verify as verify_lib
from jaxtile import cli
from jaxtile import lower as lower_lib
from jaxtile import plan as plan_lib
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


def _brute_costs(plan: plan_lib.ConvPlan):
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
  text = str(jaxtile.explain(conv1d, tile_shape=(8,))(jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3))))
  header = next(line for line in text.splitlines() if line.startswith("name"))
  assert all(column in header for column in ("+read%", "+MACs%", "pad%", "pieces/device"))
  row = next(line for line in text.splitlines() if line.startswith("conv0"))
  assert " 12.5 " in row and " 4.2 " in row


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
  result = verify_lib.check(model, *_model_args(), max_bytes=2**12)
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

  result = verify_lib.check(f, *args, tile_shape=2, windows=3, seed=1)
  assert len(result.convs) == len(cases)
  for c, name in zip(result.convs, WINDOW_CASES):
    assert c.ref_scope == "windows", name
    assert c.ref_max_abs_error < 1e-5 and c.ref_rel_l2_error < 1e-5, (name, c)
    assert c.max_abs_error < 1e-5, (name, c)


def test_check_without_windows_skips_big_convs(monkeypatch):
  monkeypatch.setattr(verify_lib, "FULL_REFERENCE_ELEMENTS", 0)
  (c,) = verify_lib.check(conv1d, jnp.ones((1, 1, 16)), jnp.ones((1, 1, 3)), tile_shape=(8,),
                         windows=0).convs
  assert c.ref_scope == "skipped" and c.ref_max_abs_error is None
  assert c.max_abs_error == 0.0 and "windows=0" in c.note


def test_check_finds_a_wrong_tiling(monkeypatch):
  real_lower = lower_lib.lower

  def off_by_a_bit(plan, name):
    tiled = real_lower(plan, name)
    return lambda lhs, rhs: tiled(lhs, rhs) * 1.01
  monkeypatch.setattr(lower_lib, "lower", off_by_a_bit)
  x, w = _normal(0, (1, 2, 16)), _normal(1, (2, 2, 3))
  result = verify_lib.check(conv1d, x, w, tile_shape=(8,))
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
    verify_lib.check(conv1d, jnp.ones((1, 1, 8)), jnp.ones((1, 1, 3)), **kwargs)


def test_check_rejects_a_non_callable():
  with pytest.raises(TypeError, match="check: fun must be callable, but got fun=3"):
    verify_lib.check(3)


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
  assert "jaxtile_conv0" in out and "conv_general_dilated" in out  # the rewritten jaxpr
  assert "Traceback" not in err


def test_cli_explain_plot(fixture_module, capsys, tmp_path):
  pytest.importorskip("matplotlib", reason="--plot needs matplotlib (jaxtile[plot])")
  path = tmp_path / "tiles.svg"
  assert cli.main(["explain", f"{fixture_module}:forward", *SMALL, "--plot", str(path)]) == 0
  assert f"plot: {path}" in capsys.readouterr().out and "<svg" in path.read_text()


def test_cli_explain_is_abstract(fixture_module, capsys):
  """A 4 GiB input is only traced: explain takes ShapeDtypeStructs, nothing is allocated."""
  argv = ["explain", f"{fixture_module}:forward", "--arg", "1x4096x4096x64:float32",
          "--arg", "3x3x64x64:float32", "--max-bytes", "256MiB"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "f32[1,4096,4096,64]" in out and " yes " in out


def test_cli_check(fixture_module, capsys):
  assert cli.main(["check", f"{fixture_module}:forward", *SMALL, "--seed", "3"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("jaxtile check: 1 tiled conv(s) of 1")
  row = next(line for line in out.splitlines() if line.startswith("conv0"))
  assert " full " in row


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
      "jaxtile: error: cannot import module 'no_such_module' (from 'no_such_module:f'): "
      "No module named 'no_such_module'"]


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
                                     "tile_shape must have one extent per spatial dim"),
    "budget unreachable": (["explain", "{path}:forward", *SMALL[:4], "--max-bytes", "16",
                            "--strict"], "the finest split reachable"),
    "wrong argument count": (["explain", "{path}:forward", *SMALL[:2]], "missing 1 required"),
    "shapes that do not convolve": (["check", "{path}:forward", "--arg", "1x8x8x3:float32",
                                     "--arg", "3x3x4x8:float32"], "feature dimension"),
    "negative windows": (["check", "{path}:forward", *SMALL, "--windows", "-1"],
                         "windows must be >= 0"),
    "no command": ([], "required"),
}


@pytest.mark.parametrize("argv, message", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_cli_bad_arguments_get_one_line(fixture_module, capsys, argv, message):
  argv = [a.format(path=fixture_module, dir=fixture_module.parent) for a in argv]
  assert cli.main(argv) == 2
  out, err = capsys.readouterr()
  assert "Traceback" not in err and out == ""
  (line,) = err.strip().splitlines()
  assert line.startswith("jaxtile: error: ") and message in line, line


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
