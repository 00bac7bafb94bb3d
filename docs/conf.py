"""Sphinx configuration for the gradsmith documentation.

The API reference lists every public name of ``optimizers`` and ``regularizers``
(read from the packages at build time), the notebooks are rendered with their
stored outputs (never executed here), and the benchmark tables are generated
from ``bench/results/*.json``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _results  # noqa: E402  (docs/_results.py: benchmark JSON -> Markdown tables)

project = "gradsmith"
author = "gradsmith contributors"
copyright = "2026, gradsmith contributors"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# Generated at build time (gitignored): api/*.md, api/_autosummary/, _generated/, notebooks/.
# Notebooks are rendered with the outputs stored in them; the test suite executes them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as a field list: the NamedTuple fields are autodoc members already.
napoleon_use_ivar = True

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_generated/*.md"]
suppress_warnings = [
    "myst.header",  # notebooks start at level-2 headings in places
    "mystnb.unknown_mime_type",  # widget/plotly outputs have a text fallback
]
html_theme = "alabaster"
html_title = "gradsmith"
html_theme_options = {"description": "Optax-style gradient transformations in JAX"}

GENERATED = DOCS / "_generated"


def _public_names(package: str) -> list[tuple[str, str]]:
  """(name, kind) of the public names a package defines itself (not re-exports)."""
  mod = __import__(package)
  rows = []
  for name in sorted(vars(mod)):
    obj = getattr(mod, name)
    if name.startswith("_") or inspect.ismodule(obj):
      continue
    home = getattr(obj, "__module__", "") or ""
    if home.split(".")[0] != package:
      continue  # re-exported from another package: documented there
    if getattr(obj, "__name__", name) != name and getattr(mod, obj.__name__, None) is obj:
      rows.append((name, "alias"))  # another public name for the same object
      continue
    kind = "class" if inspect.isclass(obj) else "function"
    rows.append((name, kind))
  return rows


def _reexports(package: str) -> list[tuple[str, str]]:
  mod = __import__(package)
  out = []
  for name in sorted(vars(mod)):
    obj = getattr(mod, name)
    if name.startswith("_") or inspect.ismodule(obj):
      continue
    home = (getattr(obj, "__module__", "") or "").split(".")[0]
    if home != package:
      out.append((name, home))
  return out


def _write_api_pages() -> None:
  # Stubs of names that are gone (or became aliases) would be orphan pages: regenerate all.
  shutil.rmtree(DOCS / "api" / "_autosummary", ignore_errors=True)
  for package, blurb in [
      ("optimizers", "Update-direction transformations, full optimizers and matrix numerics."),
      ("regularizers", "Objective-shaping transformations: sharpness, SAF/MESA, gradient surgery."),
  ]:
    names = _public_names(package)
    lines = [f"# `{package}`", "", blurb, "", "```{eval-rst}",
             f".. currentmodule:: {package}", ""]
    for kind, title in [("function", "Functions"), ("class", "Classes and state types")]:
      group = [n for n, k in names if k == kind]
      if not group:
        continue
      lines += [f".. rubric:: {title}", "", ".. autosummary::", "   :toctree: _autosummary",
                "   :nosignatures:", ""]
      lines += [f"   {n}" for n in group] + [""]
    lines += ["```", ""]
    mod = __import__(package)
    aliases = [n for n, k in names if k == "alias"]
    if aliases:
      lines += ["Aliases: " + ", ".join(
          f"`{n}` is {{py:obj}}`{getattr(mod, n).__name__} <{package}.{getattr(mod, n).__name__}>`"
          for n in aliases) + ".", ""]
    again = _reexports(package)
    if again:
      lines += ["Also importable from here: "
                + ", ".join(f"{{py:obj}}`{n} <{home}.{n}>`" for n, home in again) + ".", ""]
    _write_if_changed(DOCS / "api" / f"{package}.md", "\n".join(lines))


def _write_if_changed(path: Path, text: str) -> None:
  path.parent.mkdir(exist_ok=True)
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def _copy_notebooks() -> None:
  dst = DOCS / "notebooks"
  dst.mkdir(exist_ok=True)
  for old in dst.glob("*.ipynb"):
    if not (ROOT / "notebooks" / old.name).exists():
      old.unlink()
  for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    if not (dst / nb.name).exists() or (dst / nb.name).read_bytes() != nb.read_bytes():
      shutil.copy2(nb, dst / nb.name)


GENERATED.mkdir(exist_ok=True)
_write_api_pages()
_results.write_tables(ROOT / "bench" / "results", GENERATED / "results.md")
_write_if_changed(GENERATED / "ablation.md",
                  "\n".join(_results.ablation_table(ROOT / "bench" / "results")))
_copy_notebooks()
