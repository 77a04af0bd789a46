"""Sphinx configuration: the Markdown guides (MyST) and an autosummary API reference."""

from __future__ import annotations

import importlib.metadata

project = "qapfuse"
author = "qapfuse developers"
copyright = "2026, qapfuse developers"
release = importlib.metadata.version("qapfuse")
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "api/generated/*.md"]
templates_path = ["_templates"]

# Markdown guides: headings get anchors so that [x](file.md#heading) links resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "none"  # the numpydoc sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

intersphinx_mapping = {}  # no network at build time


html_theme = "furo"
html_title = f"qapfuse {release}"
autosummary_ignore_module_all = False  # a namespace documents exactly its __all__
