"""results.json as RunResults: every stored file round-trips, and bad files fail clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pyro_lvae.training.results_file import RunResults

REPO = Path(__file__).resolve().parents[2]
STORED = sorted((REPO / "experiments").rglob("results.json")) + sorted(
    (REPO / "tests" / "fixtures").rglob("results.json")
)


def test_there_are_stored_results_to_read():
    assert len(STORED) > 50


@pytest.mark.parametrize("path", STORED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stored_results_file_round_trips(path):
    raw = json.loads(path.read_text())
    results = RunResults.load(path)
    written = json.loads(json.dumps(results.to_dict()))
    # Every entry is kept as it was; entries and configuration fields added since appear at their defaults.
    assert {k: v for k, v in written.items() if k != "config"} == {"weights": "raw"} | {
        k: v for k, v in raw.items() if k != "config"
    }
    stored = raw["config"]
    assert all(written["config"][part] | stored[part] == written["config"][part] for part in ("model", "train"))
    assert results.config.name == raw["config"]["name"]
    assert results.test_log_likelihood == raw["test_log_likelihood"] and results["test_elbo"] == raw["test_elbo"]
    assert dict(results).keys() == raw.keys() | {"weights"}  # it reads like the dict, for code written before it


def test_save_then_load_gives_the_same_results(tmp_path):
    results = RunResults.load(STORED[0])
    results.save(tmp_path)
    assert RunResults.load(tmp_path) == results


def test_an_unknown_entry_is_named_in_the_error(tmp_path):
    raw = json.loads(STORED[0].read_text()) | {"test_elbow": 1.0}
    (tmp_path / "results.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown entries \['test_elbow'\]"):
        RunResults.load(tmp_path)


def test_entries_that_apply_to_every_run_are_written_even_when_empty():
    results = RunResults.load(STORED[0])
    unset = dataclasses.replace(results, train_seconds=None)
    assert unset.to_dict()["train_seconds"] is None and unset["train_seconds"] is None
    assert "vq" not in unset.to_dict() and "dequantized" not in unset.to_dict()
