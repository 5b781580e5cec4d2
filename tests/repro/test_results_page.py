"""``pyro-lvae results-page``: generated from results.json, identical on regeneration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pyro_lvae.cli import main
from pyro_lvae.repro.presets import get_preset
from pyro_lvae.repro.results_page import split_preset, write_results_page
from pyro_lvae.repro.sweep import shorten_schedule
from pyro_lvae.training.results_file import PerExample

REPO = Path(__file__).resolve().parents[2]
COMMITTED = [
    "experiments/full",
    "experiments/fig3",
    "experiments/table1",
    "experiments/table2-omniglot",
    "experiments/table2-fashion-gauss",
]


def test_the_committed_results_page_regenerates_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweeps = [s for s in COMMITTED if (REPO / s).exists()]
    assert sweeps, "experiments/ holds the runs behind docs/results.md"
    page = write_results_page(sweeps, tmp_path / "results.md")
    assert page.read_text() == (REPO / "docs" / "results.md").read_text()
    # The same figures (their content is checked on runs of known numbers below: the bytes of
    # a PNG depend on matplotlib's version).
    generated = {figure.name for figure in (tmp_path / "results_figures").iterdir()}
    assert generated and generated == {figure.name for figure in (REPO / "docs" / "results_figures").iterdir()}


def _fake_run(sweep: Path, preset: str, l_k: float, *, active=None, epochs=5, seed=0) -> Path:
    """A results.json as `train` writes it, with chosen numbers; ``epochs=None`` is the
    preset's full protocol (2000 epochs, L_5000 on every test image)."""
    if epochs is None:
        config, epochs = get_preset(preset), get_preset(preset).train.epochs
    else:
        config = shorten_schedule(get_preset(preset), epochs).replace(num_importance_samples=100, test_subset=500)
    config = config.replace(seed=seed)
    depth = config.model.depth
    results = {
        "test_elbo": l_k - 5.0,
        "test_log_likelihood": l_k,
        "num_importance_samples": config.train.num_importance_samples,
        "epochs": epochs,
        "config": config.to_dict(),
        "test_kl_per_layer": [1.0] * depth,
        "test_kl_per_unit": [[0.5] * n for n in config.model.latent_sizes],
        "test_active_units": active or [3] * depth,
        "num_test_examples": 500,
        "train_seconds": 7200.0,
        "eval_seconds": 600.0,
        "device": "cpu (test, 1 threads)",
        "versions": {"torch": "t", "pyro": "p"},
        "date": "2026-01-02T03:04:05+00:00",
    }
    run = sweep / f"{preset}-seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    return run


def _figures_drawn(monkeypatch) -> dict[str, object]:
    """Every figure the results page saves from now on, by file name."""
    from pyro_lvae.repro import results_page

    drawn: dict[str, object] = {}
    save = results_page._save

    def spy(fig, path):
        drawn[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(results_page, "_save", spy)
    return drawn


def test_page_content_claims_and_determinism(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drawn = _figures_drawn(monkeypatch)
    sweep = Path("fig3")
    values = {"vae": -100.0, "vae-bn": -98.0, "vae-bn-wu": -97.0, "lvae-bn-wu": -96.0}
    l_k: dict[str, list[float]] = {}
    for variant, base in values.items():
        for depth in range(1, 6):
            # The LVAE wins at depths 3 and 4 but not at 5; BN helps everywhere. At depth 1 the
            # LVAE is the VAE+BN+WU's model, and equal to it, so the tie margin stays at 0.6.
            value = base - 0.1 * depth if not (variant == "lvae-bn-wu" and depth == 5) else -99.0
            value = -97.1 if (variant, depth) == ("lvae-bn-wu", 1) else value
            active = [10, 8, 5, 2, 1] if variant == "lvae-bn-wu" else [10, 6, 2, 0, 0]
            _fake_run(sweep, f"{variant}-{depth}", value, active=active[:depth])
            l_k.setdefault(variant, []).append(value)
    omni = Path("table2-omniglot")
    _fake_run(omni, "omniglot-vae-bn-wu-2", -110.0)
    _fake_run(omni, "omniglot-lvae-bn-wu-2", -108.0)
    assert main(["results-page", "fig3", "table2-omniglot", "--out", "page/results.md"]) == 0
    text = Path("page/results.md").read_text()
    assert "pyro-lvae results-page fig3 table2-omniglot --out docs/results.md" in text
    assert (
        "pyro-lvae sweep fig3 --out runs/fig3 --workers 2 --epochs 5 "
        "--set num_importance_samples=100 --set test_subset=500" in text
    )
    assert "| LVAE+BN+WU (`lvae-bn-wu-5`) | 5 | -82.12 | -99.00 | -104.00 | 5 | 0 |" in text
    assert "in every run:** `epochs` = 5 (paper: 2000); `num_importance_samples` = 100 (paper: 5000)" in text
    assert "- In `lvae-bn-wu-1`, `lvae-bn-wu-2`, " in text and ": `warmup_epochs` = 1 (paper: 200)." in text
    assert "*The LVAE beats the VAE at depth ≥ 3*: **mixed: holds at 2 of 3, fails at 1 of 3**" in text
    assert "*Batch normalization helps* (VAE+BN vs VAE): **holds** (difference" in text
    assert "A difference holds only beyond both the tie margin and two of its standard errors" in text
    assert "differ by 0.00 nats here, so the margin is 0.60 nats. One seed per setting" in text
    # Burda's count favours the LVAE (8 vs 16 in z2–z5), the KL > 0.01 count does not (60 vs 60).
    assert "*The LVAE uses more upper-layer units*: **the measures disagree**" in text
    assert "z2–z5 8 vs 16" in text and "z2–z5 60 vs 60" in text
    assert "Substituted data." in text and "| VAE+BN+WU (`omniglot-vae-bn-wu-2`) | 2 | -102.61 | -110.00 |" in text
    assert "Hardware: cpu (test, 1 threads)." in text
    figures = sorted(p.name for p in Path("page/results_figures").iterdir())
    assert figures == ["mnist_layers.png", "mnist_units.png", "omniglot_layers.png"]
    # What the figures plot: Fig. 3's L1 and L_K per depth (the fake runs' ELBO is L_K − 5),
    # and the 5-layer runs' KL and active units per layer.
    elbo_axes, lk_axes = drawn["mnist_layers.png"].axes
    assert len(lk_axes.get_lines()) == len(values)
    for elbo_line, lk_line, variant in zip(elbo_axes.get_lines(), lk_axes.get_lines(), values, strict=True):
        assert list(lk_line.get_xdata()) == [1, 2, 3, 4, 5]
        assert list(lk_line.get_ydata()) == pytest.approx(l_k[variant])
        assert list(elbo_line.get_ydata()) == pytest.approx([v - 5.0 for v in l_k[variant]])
    kl_axes, units_axes, _ = drawn["mnist_units.png"].axes
    heights = [[bar.get_height() for bar in bars] for bars in units_axes.containers]
    assert heights == [[10, 6, 2, 0, 0], [10, 8, 5, 2, 1]]
    assert [[bar.get_height() for bar in bars] for bars in kl_axes.containers] == [[1.0] * 5] * 2
    first = {name: Path("page/results_figures", name).read_bytes() for name in figures}
    assert main(["results-page", "fig3", "table2-omniglot", "--out", "page/results.md"]) == 0
    assert Path("page/results.md").read_text() == text
    assert {name: Path("page/results_figures", name).read_bytes() for name in figures} == first


def test_missing_sweep_and_preset_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="pyro-lvae sweep GRID"):
        write_results_page([tmp_path], tmp_path / "r.md")
    assert split_preset("fashion-gauss-lvae-bn-wu-4") == ("fashion-gauss", "lvae-bn-wu", 4, "")
    assert split_preset("lvae-bn-wu-5-ft-iw10") == ("mnist", "lvae-bn-wu", 5, "-ft-iw10")
    assert split_preset("vqvae") is None


def test_a_withdrawn_setting_shows_its_reason_and_no_numbers(tmp_path):
    _fake_run(tmp_path, "fashion-gauss-vae-bn-2", 321.77)
    _fake_run(tmp_path, "vae-bn-2", -95.5)
    text = write_results_page([tmp_path], tmp_path / "r.md").read_text()
    section = text.split("## Gaussian setting on Fashion-MNIST")[1]
    assert "**Withdrawn.**" in section and "dequantization" in section
    assert "321.77" not in text and "-95.50" in text


def test_verdicts_use_the_tie_margin_and_two_standard_errors():
    from pyro_lvae.repro.results_page import TIE_MARGIN, Difference, _verdict

    assert TIE_MARGIN == 0.6
    assert _verdict([Difference(0.7), Difference(2.0)]) == "holds"
    assert _verdict([Difference(0.5), Difference(-0.3)]) == "inconclusive"
    assert _verdict([Difference(-0.7), Difference(-1.0)]) == "does not hold"
    three = [Difference(1.0), Difference(0.1), Difference(-1.0)]
    assert _verdict(three) == "mixed: holds at 1 of 3, inconclusive at 1 of 3, fails at 1 of 3"
    # Beyond the margin but within two standard errors of zero: inconclusive.
    assert _verdict([Difference(0.9, se=0.5)]) == "inconclusive"
    assert _verdict([Difference(0.9, se=0.4)]) == "holds"
    assert _verdict([Difference(-1.2, se=0.7)]) == "inconclusive"
    assert str(Difference(0.9, se=0.456)) == "+0.90 ± 0.46" and str(Difference(-0.3)) == "-0.30"


def _with_per_example(run: Path, values: np.ndarray) -> None:
    """Per-example values for a run written by :func:`_fake_run`, shifted to average to its
    bounds (ELBO = L_K − 5)."""
    raw = json.loads((run / "results.json").read_text())
    lk = values - values.mean() + raw["test_log_likelihood"]
    PerExample(elbo=lk - 5.0, log_likelihood=lk).save(run / "per_example.npz")


def test_sweep_claims_use_the_paired_standard_error_over_test_images(tmp_path):
    """One seed: ± is the standard error of the per-image differences. The same +1.00 nats
    holds with a small one and is inconclusive with a large one."""
    base = np.linspace(-7.0, 7.0, 500)
    noise = np.where(np.arange(500) % 2 == 0, 1.0, -1.0)  # per-image differences of +1 ± 1
    for sweep, scale in (("small", 1.0), ("large", 15.0)):
        for variant, value in (("vae", -100.0), ("vae-bn", -99.0)):
            run = _fake_run(tmp_path / sweep, f"{variant}-2", value)
            _with_per_example(run, base + (scale * noise if variant == "vae-bn" else 0.0))
        text = write_results_page([tmp_path / sweep], tmp_path / f"{sweep}.md").read_text()
        se = scale * np.sqrt(500 / 499) / np.sqrt(500)
        verdict = "holds" if scale == 1.0 else "inconclusive"
        assert f"*Batch normalization helps* (VAE+BN vs VAE): **{verdict}** (difference by number of " in text
        assert f"layers 2: +1.00 ± {se:.2f} nats)" in text
        assert "the ± is the standard error of the difference paired by test image" in text


def test_sweep_claims_with_several_seeds_use_the_standard_error_over_seeds(tmp_path):
    sweep = tmp_path / "fig3"
    for seed, (bn, plain) in enumerate(((-98.0, -100.0), (-99.5, -100.1), (-98.2, -99.0))):
        for variant, value in (("vae-bn", bn), ("vae", plain)):
            _fake_run(sweep, f"{variant}-2", value, seed=seed)
    text = write_results_page([sweep], tmp_path / "r.md").read_text()
    diffs = np.array([2.0, 0.6, 0.8])
    se = diffs.std(ddof=1) / np.sqrt(3)
    assert f"(VAE+BN vs VAE): **holds** (difference by number of layers 2: +1.13 ± {se:.2f} nats)" in text
    assert "Up to 3 seeds per setting, averaged: the ± is the standard error over seeds." in text


def test_dequantized_runs_of_a_withdrawn_setting_are_shown_with_bits_per_dimension(tmp_path):
    _fake_run(tmp_path, "fashion-gauss-vae-bn-2", -1234.56)
    path = tmp_path / "fashion-gauss-vae-bn-2-seed0" / "results.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"dequantized": True, "test_bits_per_dim": 2.2714}))
    text = write_results_page([tmp_path], tmp_path / "r.md").read_text()
    assert "**Withdrawn.**" not in text
    assert "| VAE+BN (`fashion-gauss-vae-bn-2`) | 2 | — | -1234.56 | -1239.56 | 2.271 | 5 | 0 |" in text
    assert "measured −L_100, bits/dim |" in text and "dequantized: each level k becomes (k + u) / 256" in text


def test_a_setting_whose_same_model_pair_differs_more_gets_that_margin(tmp_path):
    """The depth-1 LVAE and VAE+BN+WU are one model; when they differ by 5 nats, a 3-nat
    effect is inconclusive (with the 0.6-nat margin it would hold)."""
    for variant, value in (("lvae-bn-wu-1", -100.0), ("vae-bn-wu-1", -105.0), ("vae-bn-1", -108.0)):
        _fake_run(tmp_path, variant, value)
    text = write_results_page([tmp_path], tmp_path / "r.md").read_text()
    assert "differ by 5.00 nats here, so the margin is 5.00 nats" in text
    assert (
        "*Warm-up helps* (VAE+BN+WU vs VAE+BN): **inconclusive** (difference by number of layers 1: +3.00 nats)" in text
    )


def test_full_length_runs_get_their_own_section_with_paired_claims(tmp_path):
    lvae = _fake_run(tmp_path / "full", "lvae-bn-wu-5", -82.0, epochs=None, active=[60, 40, 20, 10, 5])
    vae = _fake_run(tmp_path / "full", "vae-bn-wu-3", -83.0, epochs=None, active=[60, 30, 2])
    raw = json.loads((vae / "results.json").read_text())
    raw["config"]["train"]["eval_every"] = 50  # watching a run more or less often keeps it at full length
    (vae / "results.json").write_text(json.dumps(raw))
    # Per-example values that average to each run's bounds (ELBO = L_K - 5 in _fake_run): the
    # LVAE is better by 1.0 on average, with differences ±0.5 around it.
    spread = np.linspace(-7.0, 7.0, 500)
    wiggle = np.where(np.arange(500) % 2 == 0, 0.5, -0.5)
    PerExample(elbo=spread + wiggle - 87.0, log_likelihood=spread + wiggle - 82.0).save(lvae / "per_example.npz")
    PerExample(elbo=spread - 88.0, log_likelihood=spread - 83.0).save(vae / "per_example.npz")
    _fake_run(tmp_path / "short", "lvae-bn-wu-5", -99.0)  # a shortened run goes to the MNIST section
    text = write_results_page([tmp_path / "full", tmp_path / "short"], tmp_path / "r.md").read_text()
    full, rest = text.split("## Full-length runs")[1].split("## MNIST")
    assert "| LVAE+BN+WU, 5 layers (`lvae-bn-wu-5`) | 2000 | -82.12 | **-82.00** (K = 5000) | -85.23 |" in full
    assert "| VAE+BN+WU, 3 layers (`vae-bn-wu-3`) | 2000 | -82.74 | **-83.00** (K = 5000) | -87.49 |" in full
    assert "| 2.00 h | 10 min |" in full and "- The paper's full schedule (the presets' values)." in full
    assert "- Changed for watching the runs only (not part of the paper's protocol): `eval_every`." in full
    se = 0.5 * np.sqrt(500 / 499) / np.sqrt(500)  # the sd of ±0.5 (ddof 1) over √N
    assert f"in L_K*: **holds** (measured +1.00 ± {se:.2f} (paired standard error over the 500 test" in full
    assert "paper +0.62" in full and "paper +2.26" in full
    assert "| z4 | 10 / 8 of 8; KL 1.00 | — |" in full  # Burda / KL > 0.01 counts, deeper run only
    assert "pyro-lvae train --preset vae-bn-wu-3 --eval-every 50 --out runs/full/vae-bn-wu-3-seed0" in full
    assert "different depths, so their units are shown side by side, without a verdict" in full
    assert "-99.00" in rest and "-99.00" not in full
    assert (tmp_path / "r_figures" / "full_units.png").exists()


def test_full_length_claims_without_per_example_values_say_so(tmp_path):
    _fake_run(tmp_path, "lvae-bn-wu-5", -82.0, epochs=None)
    _fake_run(tmp_path, "vae-bn-wu-3", -82.3, epochs=None)
    text = write_results_page([tmp_path], tmp_path / "r.md").read_text()
    assert "in L_K*: **inconclusive** (measured +0.30 (no per-example values stored" in text


def test_a_run_with_a_changed_model_or_evaluation_is_not_full_length(tmp_path):
    from pyro_lvae.repro.results_page import RunResult, is_full_length
    from pyro_lvae.training.results_file import RunResults

    path = _fake_run(tmp_path, "lvae-bn-wu-5", -82.0, epochs=None)
    full = RunResult(sweep="s", run="r", results=RunResults.load(path))
    assert is_full_length(full)
    changed_model = full.results.config.replace(variance_floor=1e-2)
    fewer_draws = dataclasses.replace(full.results, num_importance_samples=10)
    for results in (dataclasses.replace(full.results, config=changed_model), fewer_draws):
        assert not is_full_length(RunResult(sweep="s", run="r", results=results))


def test_a_setting_with_only_fine_tuned_runs_gets_no_bits_column(tmp_path):
    _fake_run(tmp_path, "lvae-bn-wu-5-ft", -90.0)
    text = write_results_page([tmp_path], tmp_path / "r.md").read_text()
    assert "bits/dim" not in text and "Units: nats per example." in text
