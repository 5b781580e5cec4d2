"""``pyro-lvae sweep``: a tiny grid runs in parallel, aggregates, skips finished runs and resumes."""

from __future__ import annotations

import json

import pytest

from pyro_lvae.cli import main
from pyro_lvae.repro.sweep import Grid, load_grid, parse_override, run_state, shipped_grids

TINY = """
description = "tiny test grid"
presets = ["vae", "lvae-bn-wu"]
depths = [1, 2]
seeds = [0]

[overrides]
epochs = 1
batch_size = 128
train_subset = 512
test_subset = 64
num_importance_samples = 5
eval_every = 1
"""


def test_sweep_runs_aggregates_skips_and_resumes(tmp_path, shared_data_root, capsys):
    grid_file = tmp_path / "tiny.toml"
    grid_file.write_text(TINY)
    out = tmp_path / "sweep"
    args = ["sweep", str(grid_file), "--out", str(out), "--workers", "2", "--data-root", str(shared_data_root)]
    assert main(args) == 0
    names = ["vae-1-seed0", "vae-2-seed0", "lvae-bn-wu-1-seed0", "lvae-bn-wu-2-seed0"]
    summary = json.loads((out / "summary.json").read_text())
    for name in names:
        results = json.loads((out / name / "results.json").read_text())
        assert results["epochs"] == 1 and results["num_test_examples"] == 64
        assert results["config"]["train"]["train_subset"] == 512
        row = next(r for r in summary["runs"] if r["run"] == name)  # the summary quotes each run's own numbers
        assert (row["test_elbo"], row["test_log_likelihood"]) == (results["test_elbo"], results["test_log_likelihood"])
    assert [r["run"] for r in summary["runs"]] == names
    assert all(r["status"] == "done" for r in summary["runs"])
    table = (out / "summary.md").read_text()
    for preset in ("vae-1", "vae-2", "lvae-bn-wu-1", "lvae-bn-wu-2"):
        row = next(line for line in table.splitlines() if f"`{preset}`" in line)
        ll = next(r for r in summary["runs"] if r["preset"] == preset)["test_log_likelihood"]
        assert f"{ll:.2f}" in row and "1/1" in row
    assert table in capsys.readouterr().out

    # Re-running skips every finished run: no process starts, no log grows.
    logs = {n: (out / n / "train.log").read_text() for n in names}
    assert main(args) == 0
    assert {n: (out / n / "train.log").read_text() for n in names} == logs

    # More epochs: every run continues from its checkpoint (--resume), not from scratch.
    assert main(args + ["--set", "epochs=2"]) == 0
    for name in names:
        log = (out / name / "train.log").read_text()
        assert log.count("--resume") == 1 and "Resuming" in log
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
        assert json.loads((out / name / "results.json").read_text())["epochs"] == 2


def test_a_failed_run_does_not_stop_the_others(tmp_path, shared_data_root):
    grid_file = tmp_path / "bad.toml"
    grid_file.write_text(TINY.replace("depths = [1, 2]", "depths = [1]"))
    out = tmp_path / "sweep"
    # A run directory that holds a corrupt checkpoint cannot be resumed: that run fails.
    (out / "vae-1-seed0").mkdir(parents=True)
    (out / "vae-1-seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["sweep", str(grid_file), "--out", str(out), "--data-root", str(shared_data_root)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["missing", "done"]
    assert "unreadable" in (out / "vae-1-seed0" / "train.log").read_text()


def test_shipped_grids_cover_the_paper():
    assert {"fig3", "table1", "table2-omniglot", "table2-norb", "table2-fashion-gauss"} <= set(shipped_grids())
    fig3 = load_grid("fig3")
    assert len(fig3.runs()) == 20 and {r.config.train.epochs for r in fig3.runs()} == {2000}
    assert {r.preset for r in fig3.runs()} >= {"vae-1", "vae-bn-3", "vae-bn-wu-4", "lvae-bn-wu-5"}
    table1 = load_grid("table1", overrides={"epochs": 3})
    assert [r.preset for r in table1.runs()] == ["lvae-bn-wu-5-ft", "lvae-bn-wu-5-ft-iw10"]
    assert all(r.config.train.epochs == 3 and r.config.train.finetune_epochs == 2000 for r in table1.runs())
    assert len(load_grid("table2-omniglot").runs()) == 20 and len(load_grid("table2-fashion-gauss").runs()) == 20


@pytest.mark.parametrize(
    "text, match",
    [
        ('presets = ["vae"]\ndepths = [9]', "Unknown preset 'vae-9'"),
        ('presets = ["vae"]\ncolour = 3', "unknown keys"),
        ('presets = ["vae-1"]\n[overrides]\nepochs = 0', "epochs must be a positive integer"),
        ('presets = ["vae-1"]\n[overrides]\nlearning_rat = 0.1', "Unknown configuration key"),
        ("presets = [", "not valid TOML"),
        ("presets = []", "at least one preset"),
    ],
)
def test_invalid_grid_files(tmp_path, text, match):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_grid(path)


def test_overrides_and_states(tmp_path):
    assert parse_override("epochs=10") == ("epochs", 10)
    assert parse_override("latent-sizes=8,4") == ("latent_sizes", (8, 4))
    assert parse_override("batch_norm=false") == ("batch_norm", False)
    with pytest.raises(ValueError, match="configuration field"):
        parse_override("epoch=10")
    with pytest.raises(ValueError, match="epochs expects an integer"):
        parse_override("epochs=ten")
    with pytest.raises(FileNotFoundError, match="shipped grid"):
        load_grid(tmp_path / "nope.toml")
    run = Grid(presets=("vae-1",), overrides={"epochs": 2}).runs()[0]
    assert run.changes() == {"epochs": 2}
    assert run_state(run, tmp_path / "x") == "new"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps({"config": run.config.to_dict()}))
    assert run_state(run, tmp_path / "x") == "done"
    (tmp_path / "x" / "results.json").write_text(json.dumps({"config": run.config.replace(epochs=1).to_dict()}))
    assert run_state(run, tmp_path / "x") == "new"
    (tmp_path / "x" / "checkpoint.pt").write_bytes(b"")
    assert run_state(run, tmp_path / "x") == "resume"
    # A checkpoint of another configuration (not just shorter) is not resumed but replaced.
    (tmp_path / "x" / "config.json").write_text(json.dumps(run.config.replace(epochs=1).to_dict()))
    assert run_state(run, tmp_path / "x") == "resume"
    (tmp_path / "x" / "config.json").write_text(json.dumps(run.config.replace(warmup_epochs=1).to_dict()))
    assert run_state(run, tmp_path / "x") == "new"


def test_epochs_option_shortens_the_schedule_without_adding_warmup():
    runs = {r.preset: r for r in load_grid("fig3", epochs=5).runs()}
    assert runs["vae-bn-3"].config.train.warmup_epochs == 0
    assert runs["lvae-bn-wu-3"].config.train.warmup_epochs == 1
    assert {r.config.train.epochs for r in runs.values()} == {5}
    assert runs["lvae-bn-wu-3"].changes() == {"epochs": 5, "warmup_epochs": 1}
