"""Sphinx configuration of the pyro-lvae documentation site.

Build it strictly (every warning is an error, broken cross-references included):

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import pyro_lvae

project = "pyro-lvae"
author = "pyro-lvae developers"
release = pyro_lvae.__version__
copyright = "2026, pyro-lvae developers"

extensions = [
    "myst_parser",  # the pages are Markdown
    "sphinx.ext.autodoc",  # the API reference, from the reST docstrings
    "sphinx.ext.mathjax",
    "sphinxarg.ext",  # the CLI reference, from the real argument parser
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"pyro-lvae {release}"

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # links such as concepts.md#which-elbo

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

# Nitpicky mode fails on any unresolved reference to this package. References to
# other libraries cannot be resolved offline (no intersphinx), so they are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|pyro|np|numpy|xr|xarray|matplotlib|arviz|nn|dist|argparse|contextlib|os|pathlib|typing|collections|importlib|_frozen_importlib|types)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Tensor|Figure|Any|Iterator|Mapping|Sequence|Callable|Path|Field|PathLike|Distribution|Module|Parameter|Size)",
    ),
    (r"py:.*", r"(Dataset|LogWeights|PreparedData|TrainResult|ExperimentConfig|ModelConfig|TrainConfig)"),
]
