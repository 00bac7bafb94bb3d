"""The README's integration snippets run as written (blocks after a readme-exec marker)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- readme-exec -->\n```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_executed_snippets():
  assert BLOCKS, "no <!-- readme-exec --> python block in README.md"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, capsys):
  exec(compile(BLOCKS[index], f"README.md[readme-exec {index}]", "exec"), {})
  assert capsys.readouterr().out  # the snippets print what they set up
