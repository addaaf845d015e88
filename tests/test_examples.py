"""Every `examples/*.py` runs with `--small` and exits 0 (each checks its own tiled result).

Examples are found by glob, so a new one is covered without touching this file. An example that
imports an optional package (flax, equinox: the `examples` extra) is skipped, with the reason,
when that package is not installed.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
OPTIONAL = ("flax", "equinox", "optax")  # not runtime dependencies of jaxtile
TIMEOUT_S = 300  # --small runs take seconds; this only stops a hung run


def _top_level_imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names


def test_examples_are_found():
  assert any(p.name == "paper_case.py" for p in EXAMPLES), EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_small(path: pathlib.Path):
  for module in sorted(_top_level_imports(path) & set(OPTIONAL)):
    pytest.importorskip(module, reason=f"examples/{path.name} needs {module} "
                                       f"(pip install -e '.[examples]')")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  try:
    proc = subprocess.run([sys.executable, str(path), "--small"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    so_far = [s.decode(errors="replace") if isinstance(s, bytes) else s or ""
              for s in (e.stdout, e.stderr)]
    pytest.fail(f"examples/{path.name} --small ran past {TIMEOUT_S} s; output so far:\n"
                + "".join(so_far)[-4000:])
  assert proc.returncode == 0, (
      f"examples/{path.name} --small exited {proc.returncode}\n--- stdout ---\n"
      f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")


def test_gigapixel_small_writes_stores_and_resumes(tmp_path):
  """examples/gigapixel.py --small --data DIR: the image and output zarr stores land in DIR, the
  streamed output matches the untiled network (the example asserts it), and a rerun with
  --resume reuses the image and skips every tile the first run finished."""
  pytest.importorskip("zarr", reason="examples/gigapixel.py needs zarr "
                                     "(pip install -e '.[stream]')")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  command = [sys.executable, str(ROOT / "examples" / "gigapixel.py"), "--small", "--no-progress",
             "--data", str(tmp_path)]
  first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
  assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
  assert "wrote " in first.stdout and first.stdout.rstrip().endswith("OK"), first.stdout
  assert (tmp_path / "image_1024.zarr").is_dir() and (tmp_path / "output_1024.zarr").is_dir()
  assert (tmp_path / "output_1024.zarr.jaxtile").is_dir()  # the journal of finished tiles

  again = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
  assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
  assert "wrote " not in again.stdout, again.stdout  # the complete image is reused
  assert "streamed 0 tiles (8 skipped" in again.stdout, again.stdout
  assert again.stdout.rstrip().endswith("OK"), again.stdout
