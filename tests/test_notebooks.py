"""Every notebook runs without error in smoke mode (``CI`` set: a small subset, few steps)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, shared_data_root, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PYRO_LVAE_DATA", str(shared_data_root))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]


def _output_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            parts.append(out.get("text", ""))
            parts += [
                v if isinstance(v, str) else "".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")
            ]
    return " ".join(parts)


def test_numbers_in_a_notebooks_summary_come_from_its_stored_outputs():
    """Every number with two or more decimals in a "what the committed run shows" cell
    (thresholds such as "> 0.01" aside) is printed by one of the notebook's cells."""
    checked = 0
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        outputs = _output_text(nb)
        for cell in nb.cells:
            if cell.cell_type == "markdown" and "committed run" in cell.source:
                for sign, number in re.findall(r"(?<![<>≤≥\d.])(?<![<>≤≥] )([−-]?)(\d+\.\d{2,})", cell.source):
                    # The whole number (not a prefix of a longer one), with its sign where the text gives one.
                    printed = rf"{re.escape('-' if sign else '')}(?<![\d.]){re.escape(number)}(?!\d)"
                    found = re.search(printed, outputs.replace("−", "-"))
                    assert found, f"{path.name}: {sign}{number} in the text is not in any output"
                    checked += 1
    assert checked >= 5  # notebook 02's summary quotes its bounds
