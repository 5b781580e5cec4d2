"""results.json as RunResults: every stored file round-trips, and bad files fail clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pyro_lvae.training.results_file import PerExample, RunResults

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


def _with_matching_per_example(n: int = 50) -> tuple[RunResults, PerExample]:
    """A stored RunResults with per-example values that average to its bounds."""
    rng = np.random.default_rng(0)
    base = RunResults.load(STORED[0])
    elbo, ll = rng.normal(-90, 5, n), rng.normal(-85, 5, n)
    per = PerExample(elbo=elbo - elbo.mean() + base.test_elbo, log_likelihood=ll - ll.mean() + base.test_log_likelihood)
    return dataclasses.replace(base, num_test_examples=n, per_example=per), per


def test_per_example_values_are_stored_beside_results_and_read_back(tmp_path):
    results, per = _with_matching_per_example()
    results.save(tmp_path)
    assert "per_example" not in json.loads((tmp_path / "results.json").read_text())
    back = RunResults.load(tmp_path).per_example
    np.testing.assert_allclose(back.elbo, per.elbo, rtol=1e-6)  # float32 on disk
    np.testing.assert_allclose(back.log_likelihood, per.log_likelihood, rtol=1e-6)
    assert RunResults.load(STORED[0]).per_example is None  # runs evaluated before the file existed


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    reference = PerExample(elbo=np.array([-90.0, -80.0, -85.0, -95.0]), log_likelihood=np.zeros(4))
    # A constant shift of 1.5 plus (+1, -1, +1, -1): mean 1.5, sd of d = sqrt(4/3), SE = sqrt(4/3)/2.
    values = PerExample(elbo=reference.elbo + 1.5 + np.array([1.0, -1.0, 1.0, -1.0]), log_likelihood=np.zeros(4))
    mean, se = values.paired_difference(reference, "elbo")
    assert mean == pytest.approx(1.5) and se == pytest.approx(np.sqrt(4 / 3) / 2)
    with pytest.raises(ValueError, match="same test examples"):
        values.paired_difference(PerExample(elbo=np.zeros(3), log_likelihood=np.zeros(3)), "elbo")


def test_per_example_values_that_do_not_belong_to_the_results_are_ignored_or_removed(tmp_path, caplog):
    results, per = _with_matching_per_example()
    results.save(tmp_path)
    # Another evaluation without per-example values removes the old file instead of leaving it beside.
    dataclasses.replace(results, per_example=None).save(tmp_path)
    assert not (tmp_path / "per_example.npz").exists()
    # A file of other examples (here: shifted by one nat) is not attached to the results.
    PerExample(elbo=per.elbo + 1.0, log_likelihood=per.log_likelihood).save(tmp_path / "per_example.npz")
    with caplog.at_level("WARNING"):
        assert RunResults.load(tmp_path).per_example is None
    assert "does not belong to" in caplog.text
    # Only results.json pairs with the folder's per_example.npz.
    results.save(tmp_path)
    results.save(tmp_path / "other.json")
    assert RunResults.load(tmp_path / "other.json").per_example is None


def test_paired_differences_refuse_unknown_keys_and_single_examples():
    one = PerExample(elbo=np.zeros(1), log_likelihood=np.zeros(1))
    with pytest.raises(ValueError, match="at least two examples"):
        one.paired_difference(one, "elbo")
    with pytest.raises(ValueError, match="key must be 'elbo' or 'log_likelihood'"):
        one.paired_difference(one, "kl")
