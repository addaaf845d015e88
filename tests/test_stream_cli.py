"""`python -m jaxtile stream`: an image on disk through a function, a tile at a time.

Outputs are compared with the untiled function on the whole image to float32 rounding: XLA:CPU
rounds a conv's outputs differently with the window's shape (see tests/test_stream.py).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import textwrap

import numpy as np
import pytest

from jaxtile._src import cli
from jaxtile._src import stream as stream_lib

zarr = pytest.importorskip("zarr", reason="python -m jaxtile stream reads zarr (jaxtile[stream])")

SHAPE = (1, 64, 64, 3)
TILE = ["--tile-shape", "16x16"]  # 4 x 4 = 16 output tiles

MODEL = '''
import jax
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")
_k1, _k2, _k3 = jax.random.split(jax.random.key(0), 3)
W1 = jax.random.normal(_k1, (3, 3, 3, 8)) * 0.3
W2 = jax.random.normal(_k2, (3, 3, 8, 8)) * 0.2
W3 = jax.random.normal(_k3, (1, 1, 8, 2)) * 0.3


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def forward(x):
  return conv(jax.nn.relu(conv(jax.nn.relu(conv(x, W1)), W2)), W3)


def normalised(x):
  y = conv(x, W1)
  return y - y.mean(axis=(1, 2), keepdims=True)


def with_weights(x, w):
  return conv(x, w)
'''


@pytest.fixture
def files(tmp_path):
  """(the model's path, the input zarr array's path); outputs go in the same directory."""
  model = tmp_path / "stream_cli_model.py"
  model.write_text(textwrap.dedent(MODEL))
  image = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=SHAPE, dtype="float32",
                          chunks=(1, 32, 32, 3))
  image[...] = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  return model, tmp_path / "in.zarr"


def _untiled(model, image: np.ndarray, function: str = "forward") -> np.ndarray:
  spec = importlib.util.spec_from_file_location("stream_cli_reference", model)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return np.asarray(getattr(module, function)(image))


def _stream(model, source, output, *flags, function="forward"):
  return cli.main(["stream", f"{model}:{function}", "--input", str(source),
                   *([] if output is None else ["--output", str(output)]), *flags])


def _counts(out: str) -> tuple[int, int]:
  match = re.fullmatch(r"jaxtile stream: (\d+) tiles computed, (\d+) skipped \(resumed\) in "
                       r"[\d.]+ s, [\d.e+-]+ Mpx/s -> .*\n", out)
  assert match, out
  return int(match.group(1)), int(match.group(2))


def test_stream_writes_the_untiled_result_then_resume_skips_every_tile(files, capsys):
  model, source = files
  output = source.parent / "out.zarr"
  assert _stream(model, source, output, *TILE, "--no-progress") == 0
  assert _counts(capsys.readouterr().out) == (16, 0)
  out = zarr.open_array(str(output), mode="r+")
  assert out.shape == (1, 64, 64, 2) and out.dtype == np.float32
  assert tuple(out.chunks) == (1, 16, 16, 2)  # one chunk per output tile, whole batch and channels
  expected = _untiled(model, zarr.open_array(str(source), mode="r")[...])
  np.testing.assert_allclose(out[...], expected, rtol=1e-6, atol=1e-5)

  # The run finished: --resume finds every tile in the journal and computes none.
  out[...] = np.float32(7)  # so a recomputed tile would show
  assert _stream(model, source, output, *TILE, "--no-progress", "--resume") == 0
  assert _counts(capsys.readouterr().out) == (0, 16)
  assert (out[...] == 7).all()

  # --explain plans against the existing output's chunks.
  assert _stream(model, source, output, *TILE, "--explain") == 0
  assert capsys.readouterr().out.splitlines()[-1] == f"  output {output}: exists, chunks 1x16x16x2"


def test_stream_npy_input_and_output_tiled_by_max_bytes(files, capsys):
  model, source = files
  image = zarr.open_array(str(source), mode="r")[...]
  np.save(source.parent / "in.npy", image)
  output = source.parent / "out.npy"
  assert _stream(model, source.parent / "in.npy", output, "--max-bytes", "64KiB",
                 "--no-progress") == 0
  tiles, skipped = _counts(capsys.readouterr().out)
  assert tiles > 1 and skipped == 0
  np.testing.assert_allclose(np.load(output), _untiled(model, image), rtol=1e-6, atol=1e-5)


def test_stream_a_function_with_a_norm_in_segments(files, capsys):
  """A function with ops that need the whole image (a norm's mean) streams in segments, as
  `jaxtile.stream` runs it: --explain prints them, the output is the untiled function's."""
  model, source = files
  output = source.parent / "out.zarr"
  assert _stream(model, source, output, *TILE, "--explain", function="normalised") == 0
  out = capsys.readouterr().out
  assert "in 2 segments: `reduce_sum` at" in out and "needs the whole image" in out, out
  # The last segment writes its output in bands of rows, not tiles: zarr chooses the chunks.
  assert "1 pass over them for its statistics (reduce_sum), then one writing" in out, out
  assert out.splitlines()[-1] == f"  output {output}: to be created", out
  assert _stream(model, source, output, *TILE, "--no-progress", function="normalised") == 0
  tiles, skipped = _counts(capsys.readouterr().out)
  assert tiles == 16 and skipped == 0
  out = zarr.open_array(str(output), mode="r")
  expected = _untiled(model, zarr.open_array(str(source), mode="r")[...], "normalised")
  np.testing.assert_allclose(out[...], expected, rtol=1e-6, atol=1e-5)


def test_stream_explain_prints_the_plan_and_writes_nothing(files, capsys):
  model, source = files
  output = source.parent / "out.zarr"
  assert _stream(model, source, output, *TILE, "--explain") == 0
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0] == "stream: 1x64x64x3 -> 1x64x64x2 float32"
  assert "output tiles: 16 (4 x 4) of 16 x 16" in lines[1]
  assert "compiled tile program" in out and "stage 0: " in out
  assert lines[-1] == f"  output {output}: to be created, chunks 1x16x16x2"
  assert not output.exists() and err == ""
  # No --output is needed to explain.
  assert _stream(model, source, None, *TILE, "--explain") == 0
  assert capsys.readouterr().out.splitlines() == lines[:-1]


def _zarr_array(path, shape, dtype="float32"):
  zarr.open_array(str(path), mode="w", shape=shape, dtype=dtype)


def _nothing(d):
  pass


# (what to make in the directory first, FUNCTION, flags, what the message says); --input is the
# fixture's unless the flags name one.
BAD = {
    "missing input": (_nothing, "forward", ["--input", "{d}/nothing.zarr"],
                      "no such --input {d}/nothing.zarr does not exist"),
    "input a zarr group": (lambda d: zarr.open_group(str(d / "g.zarr"), mode="w"), "forward",
                           ["--input", "{d}/g.zarr"], "is not a zarr array"),
    "input a text file": (lambda d: (d / "image.txt").write_text("pixels"), "forward",
                          ["--input", "{d}/image.txt"], "is not a .npy file"),
    "output of the wrong shape": (
        lambda d: _zarr_array(d / "out.zarr", (1, 64, 64, 5)), "forward",
        ["--output", "{d}/out.zarr"],
        "{d}/out.zarr is 1x64x64x5 float32, but FUNCTION makes 1x64x64x2 float32 from the input "
        "to fix: delete {d}/out.zarr or choose another --output"),
    "output of the wrong dtype, even with --resume": (
        lambda d: _zarr_array(d / "out.zarr", (1, 64, 64, 2), "float16"), "forward",
        ["--output", "{d}/out.zarr", "--resume"], "{d}/out.zarr is 1x64x64x2 float16"),
    "output is the input": (_nothing, "forward", ["--output", "{d}/in.zarr"],
                            "--output is the input"),
    "no output": (_nothing, "forward", [], "stream needs --output"),
    "a parameter to pass": (_nothing, "with_weights", ["--output", "{d}/out.zarr"],
                            "FUNCTION must take the image alone, but with_weights(x, w) does not"),
    "no tile within max-bytes": (_nothing, "forward",
                                 ["--output", "{d}/out.zarr", "--max-bytes", "16"],
                                 "no output tile fits within --max-bytes 16 (16 B)"),
    "bad tile-shape": (_nothing, "forward", ["--output", "{d}/out.zarr", "--tile-shape", "16x"],
                       "argument --tile-shape: expected N or NxN"),
    "tile-shape of the wrong rank": (_nothing, "forward",
                                     ["--output", "{d}/out.zarr", "--tile-shape", "4x4x4"],
                                     "--tile-shape=(4, 4, 4) has 3 entries"),
}


@pytest.mark.parametrize("make, function, flags, message", BAD.values(), ids=BAD.keys())
def test_stream_errors_are_a_short_line_then_the_detail(files, capsys, make, function, flags,
                                                        message):
  model, source = files
  d = source.parent
  make(d)
  flags = [f.format(d=d) for f in flags]
  if "--input" not in flags:
    flags = ["--input", str(source), *flags]
  assert cli.main(["stream", f"{model}:{function}", *flags]) == 2
  out, err = capsys.readouterr()
  assert "Traceback" not in err and out == ""
  first, *detail = err.rstrip("\n").splitlines()
  assert first.startswith("jaxtile: error: ") and "error: stream:" not in first, first
  # Lines fit in 100 columns, but for a word longer than that alone on its line (a path).
  assert all(len(line) <= 100 or len(line.split()) == 1 for line in [first, *detail]), err
  assert all(line.startswith("  ") for line in detail), err
  assert message.format(d=d) in " ".join(err.split()), err
  assert "resume=" not in err and "max_bytes" not in err and "fun " not in err
  if make is _nothing:
    assert not (d / "out.zarr").exists()  # an error creates no output


def test_stream_resume_of_another_command_is_refused(files, capsys):
  """The journal beside --output records 16x16 tiles; --resume at 32x32 would mix two runs."""
  model, source = files
  output = source.parent / "out.zarr"
  assert _stream(model, source, output, *TILE, "--no-progress") == 0
  capsys.readouterr()
  assert _stream(model, source, output, "--tile-shape", "32x32", "--resume") == 2
  first, *detail = capsys.readouterr().err.splitlines()
  assert first == ("jaxtile: error: --resume, but the tiles recorded beside --output are another "
                   "run's")
  assert "to fix: drop --resume to start over" in " ".join(" ".join(detail).split())


def test_stream_over_a_deleted_output_ignores_its_old_journal(files, capsys):
  """A new output is computed whole, even with --resume and a finished journal left beside it."""
  model, source = files
  output = source.parent / "out.zarr"
  assert _stream(model, source, output, *TILE, "--no-progress") == 0
  capsys.readouterr()
  before = zarr.open_array(str(output), mode="r")[...]
  shutil.rmtree(output)
  assert (source.parent / "out.zarr.jaxtile").is_dir()
  assert _stream(model, source, output, *TILE, "--no-progress", "--resume") == 0
  assert _counts(capsys.readouterr().out) == (16, 0)
  np.testing.assert_array_equal(zarr.open_array(str(output), mode="r")[...], before)


def test_stream_interrupted_says_to_resume(files, capsys, monkeypatch):
  model, source = files

  def interrupt(self, *args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(stream_lib.Streamed, "__call__", interrupt)
  assert _stream(model, source, source.parent / "out.zarr", *TILE) == 130
  assert "rerun the command with --resume to finish" in capsys.readouterr().err


def test_tile_shape_is_n_or_one_extent_per_dim():
  assert cli.tile_extents("512") == 512
  assert cli.tile_extents("512x256") == cli.tile_extents("512,256") == (512, 256)
  assert cli.tile_extents("nonex64") == (None, 64)


def test_stream_without_zarr_says_what_to_install(files, capsys, monkeypatch):
  model, source = files
  monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` fails
  assert _stream(model, source, source.parent / "out.zarr") == 2
  err = " ".join(capsys.readouterr().err.split())
  assert err.startswith("jaxtile: error: --input is a zarr array, which needs zarr: it is not "
                        "installed")
  assert 'pip install "jaxtile[stream]"' in err
