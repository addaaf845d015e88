"""Every ```python block in README.md and docs/*.md runs.

The blocks of one file run in order in one shared namespace, so a later block can use names an
earlier one defined, as a reader following the page would. They run in this process, so with the
8 host CPU devices `tests/conftest.py` sets up, and in a temporary working directory, so files a
block writes (plots, tuning caches) do not land in the repository. A failure names the file, the
line of the block's opening fence and the line of the Markdown file that raised; the code is
compiled at its own line numbers, so the traceback points into the page too.

A block opts out of running only by being fenced as ```text, ```console or ```bash (shell
commands, program output, diagrams); every fenced block must carry one of those labels or
```python, so Python code cannot skip the test by accident.

The shell commands are held to what they show too: every `python -m jaxtile` command (in ```bash
blocks and the command line's docstring) runs on a stand-in `my_model` and must tile a conv, and
the README says what its two commands cost before it shows them.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUN = "python"
OPT_OUT = ("text", "console", "bash")

# An opening fence: indentation, three or more backticks or tildes, the info string. Its closing
# fence is the same character, at least as many, and nothing else on the line (CommonMark).
_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  path: pathlib.Path
  line: int  # 1-based line of the opening fence
  lang: str  # first word of the info string, "" when unlabelled
  source: str

  @property
  def where(self) -> str:
    return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: pathlib.Path) -> list[Block]:
  """The fenced code blocks of a Markdown file, in order."""
  lines = path.read_text().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    match = _OPEN.match(lines[i])
    if not match:
      i += 1
      continue
    fence, indent = match["fence"], len(match["indent"])
    close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    body, j = [], i + 1
    while j < len(lines) and not close.match(lines[j]):
      # Content lines lose up to the opening fence's indentation, as CommonMark says.
      text = lines[j]
      body.append(text[min(indent, len(text) - len(text.lstrip(" "))):])
      j += 1
    lang = (match["info"].split() or [""])[0].lower()
    blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def _ids(paths):
  return [str(p.relative_to(ROOT)) for p in paths]


def test_docs_have_python_blocks():
  """The parser finds blocks at all (guards against a regex that silently matches nothing)."""
  assert any(b.lang == RUN for path in DOCS for b in fenced_blocks(path))


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_every_block_is_labelled(path: pathlib.Path):
  bad = [f"{b.where}: fenced as {b.lang or 'nothing'!r}" for b in fenced_blocks(path)
         if b.lang not in (RUN,) + OPT_OUT]
  assert not bad, (
      f"fence every code block as ```{RUN} (it runs) or as one of "
      f"{', '.join('```' + t for t in OPT_OUT)} (it does not):\n" + "\n".join(bad))


@pytest.fixture
def isolated_tuning(monkeypatch):
  """A page's `autotune` reads and writes no tuning cache the environment names."""
  monkeypatch.delenv("JAXTILE_AUTOTUNE_CACHE", raising=False)


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_python_blocks_run(path: pathlib.Path, tmp_path, monkeypatch, isolated_tuning):
  blocks = [b for b in fenced_blocks(path) if b.lang == RUN]
  if not blocks:
    return  # nothing to run on this page
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__docs__"}
  for block in blocks:
    # Leading newlines put the code at its own line numbers in the Markdown file, so tracebacks
    # name the line of the page that failed.
    try:
      exec(compile("\n" * block.line + block.source, str(block.path), "exec"), namespace)
    except Exception as e:  # any failure of the block is the test's failure
      pytest.fail(f"the ```{RUN} block at {block.where} failed at line {_failing_line(e, block)}: "
                  f"{type(e).__name__}: {e}\n\n" + "".join(traceback.format_exception(e))[-4000:],
                  pytrace=False)


def _failing_line(e: Exception, block: Block) -> int:
  """The line of the Markdown file where the block failed (its innermost frame in the file)."""
  if isinstance(e, SyntaxError) and e.filename == str(block.path) and e.lineno:
    return e.lineno
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if f.filename == str(block.path) and f.lineno]
  return lines[-1] if lines else block.line


def test_readme_says_what_the_two_commands_cost_before_they_run():
  """Memory for the main example and minutes for the tests, in the prose above the commands."""
  section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1]
  before = section.split("```", 1)[0]
  assert re.search(r"\d+ GiB of free memory", before), before
  assert re.search(r"up to \d+ minutes", before), before


# Every `python -m jaxtile ...` command in the docs, run on this model: a module with the
# function the commands name. A command that claims to explain or check a split must tile.
MY_MODEL = '''
import jax


def forward(x, w):
  return jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
'''


def cli_commands() -> list[tuple[str, list[str]]]:
  """(where, argv) of each `python -m jaxtile` command in a ```bash block or cli.py's docstring."""
  import shlex

  import jaxtile._src.cli

  sources = [(b.where, b.source) for path in DOCS for b in fenced_blocks(path) if b.lang == "bash"]
  sources.append(("jaxtile/_src/cli.py", jaxtile._src.cli.__doc__))
  commands = []
  for where, text in sources:
    for line in text.replace("\\\n", " ").splitlines():
      line = line.strip()
      if line.startswith("python -m jaxtile "):
        commands.append((where, shlex.split(line)[3:]))
  return commands


CLI_COMMANDS = cli_commands()


def test_the_docs_show_cli_commands():
  assert {argv[0] for _, argv in CLI_COMMANDS} == {"explain", "check"}, CLI_COMMANDS


@pytest.mark.parametrize("where, argv", CLI_COMMANDS,
                         ids=[f"{w} {a[0]}" for w, a in CLI_COMMANDS])
def test_cli_commands_in_the_docs_tile_what_they_show(where, argv, tmp_path, monkeypatch, capsys):
  from jaxtile._src import cli

  (tmp_path / "my_model.py").write_text(MY_MODEL)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert cli.main(argv) == 0, capsys.readouterr()
  out = capsys.readouterr().out
  counts = re.search(r"(\d+) conv\(s\), (\d+) tiled|(\d+) tiled conv\(s\) of (\d+)", out)
  assert counts, out
  tiled = int(counts.group(2) or counts.group(3))
  assert tiled >= 1, f"{where}: `python -m jaxtile {' '.join(argv)}` tiles nothing:\n{out}"
