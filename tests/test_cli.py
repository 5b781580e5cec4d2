"""``pyro-lvae train`` then ``pyro-lvae evaluate`` on a subset of MNIST."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyro_lvae.cli import main
from pyro_lvae.repro.presets import PRESETS
from pyro_lvae.training.results_file import RunResults

REQUIRED = {"test_elbo", "test_log_likelihood", "num_importance_samples", "epochs", "config"}


def test_train_then_evaluate(tmp_path, shared_data_root, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "lvae-bn-wu-2",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--train-subset",
        "1000",
        "--test-subset",
        "100",
        "--num-importance-samples",
        "20",
        "--latent-sizes",
        "16,8",
        "--hidden-sizes",
        "64,32",
        "--eval-every",
        "1",
        "--data-root",
        str(shared_data_root),
        "--no-download",
        "--no-progress",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test ELBO (L1)" in out and "test L_20" in out
    results = json.loads((run / "results.json").read_text())
    assert REQUIRED <= set(results)
    assert results["epochs"] == 2 and results["num_importance_samples"] == 20
    assert results["config"]["model"]["latent_sizes"] == [16, 8]
    assert results["test_log_likelihood"] >= results["test_elbo"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # The per-example bounds beside results.json average to its numbers.
    per = RunResults.load(run).per_example
    assert per.elbo.shape == (results["num_test_examples"],)
    assert per.elbo.mean() == pytest.approx(results["test_elbo"], abs=1e-4)
    assert per.log_likelihood.mean() == pytest.approx(results["test_log_likelihood"], abs=1e-4)

    # Both evaluations are seeded: the same K reproduces the training run's numbers exactly.
    assert (
        main(["evaluate", str(run), "--num-samples", "20", "--data-root", str(shared_data_root), "--no-progress"]) == 0
    )
    again = json.loads((run / "results.json").read_text())
    assert again["test_elbo"] == results["test_elbo"]
    assert again["test_log_likelihood"] == results["test_log_likelihood"]
    assert again["test_kl_per_layer"] == results["test_kl_per_layer"]

    assert (
        main(["evaluate", str(run), "--num-samples", "30", "--data-root", str(shared_data_root), "--no-progress"]) == 0
    )
    results = json.loads((run / "results.json").read_text())
    assert results["num_importance_samples"] == 30 and results["epochs"] == 2

    # The same directory again, without --resume or --overwrite: a one-line error, exit code 2.
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "--epoch", "3"], "unknown argument '--epoch' for `pyro-lvae train`; did you mean --epochs?"),
        (["train", "--batch-norm", "maybe"], "batch_norm expects true or false, got 'maybe'"),
        (["train", "--latent-sizes", "a,b"], "comma-separated integers"),
        (["train", "--preset", "nope"], "Unknown preset"),
        (["train", "--activation", "relu6"], "choose one of leaky_relu, tanh, identity, got 'relu6'"),
        (["train", "--guide", "top-down"], "choose one of ladder, vae, bottom-up"),
        (["train", "--skip-threshold", "often"], "skip_threshold expects a number or auto, got 'often'"),
        (["train", "--memory-budget-gib", "inf"], "--memory-budget-gib: must be a positive, finite number of GiB"),
        (["train", "--memory-budget-gib", "0"], "--memory-budget-gib: must be a positive, finite number of GiB"),
        (["evaluate", "run", "--memory-budget-gib", "nan"], "must be a positive, finite number of GiB"),
    ],
)
def test_bad_cli_input(args, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_compile_from_the_cli_reaches_the_training_step(tmp_path, shared_data_root, monkeypatch):
    """``--compile`` alone switches it on, and the step then runs the compiled loss (torch.compile
    is replaced by a recorder here: tests/inference/test_compiled.py compiles for real)."""
    from pyro_lvae.inference import compiled

    calls = []

    def recorder(fn, **options):
        def run(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(compiled.torch, "compile", recorder)
    run = tmp_path / "run"
    args = ["train", "--preset", "lvae-bn-wu-2", "--epochs", "1", "--train-subset", "300", "--test-subset", "50"]
    args += ["--num-importance-samples", "2", "--latent-sizes", "4,2", "--hidden-sizes", "16,8", "--compile"]
    args += ["--data-root", str(shared_data_root), "--no-download", "--no-progress", "--out", str(run)]
    assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is True
    assert calls == ["negative_elbo"] * 2  # 300 examples: two minibatches of 256 and 44


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pyro-lvae")
    assert script.load() is main  # the installed `pyro-lvae` command runs the CLI's main
    out = subprocess.run([sys.executable, "-m", "pyro_lvae", "presets"], capture_output=True, text=True, check=True)
    assert "lvae-bn-wu-5" in out.stdout and "vlae-3" in out.stdout and len(out.stdout.splitlines()) == len(PRESETS)


@pytest.mark.parametrize(
    "preset,extra",
    [("vlae-3", ["--hidden-sizes", "32,32,32"]), ("vqvae", ["--hidden-sizes", "32", "--codebook-ema", "true"])],
)
def test_other_families_train_from_the_cli(preset, extra, tmp_path, shared_data_root, capsys):
    run = tmp_path / preset
    args = [
        "train",
        "--preset",
        preset,
        "--epochs",
        "1",
        "--train-subset",
        "500",
        "--test-subset",
        "100",
        "--num-importance-samples",
        "5",
        *extra,
        "--data-root",
        str(shared_data_root),
        "--no-download",
        "--no-progress",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["model"]["family"] == preset.split("-")[0]
    assert results["test_log_likelihood"] >= results["test_elbo"] - 1e-4
    if preset == "vqvae":
        assert results["config"]["model"]["codebook_ema"] is True and results["vq"]["codes_used"] >= 1
        # The analysis report refuses discrete latents with a one-line reason.
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(run), "--out", str(tmp_path / "report"), "--data-root", str(shared_data_root)])
        assert exit_info.value.code == 2 and "family 'vqvae'" in capsys.readouterr().err


def _tiny_train_args(run, root) -> list[str]:
    return [
        "train",
        "--preset",
        "vae-bn-wu-2",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--train-subset",
        "256",
        "--test-subset",
        "40",
        "--num-importance-samples",
        "5",
        "--latent-sizes",
        "4,2",
        "--hidden-sizes",
        "16,8",
        "--batch-size",
        "64",
        "--data-root",
        str(root),
        "--no-download",
        "--no-progress",
        "--out",
        str(run),
    ]


def test_no_final_eval_runs_no_evaluation_and_resume_keeps_the_stored_overrides(
    tmp_path, shared_data_root, capsys, monkeypatch
):
    import pyro_lvae.training.loop as loop

    def no_lk(*args, **kwargs):
        raise AssertionError("final_results ran although --no-final-eval was given")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop, "final_results", no_lk)  # the name the training loop calls
        assert main(_tiny_train_args(run, shared_data_root) + ["--no-final-eval", "--guide", "bottom-up"]) == 0
    assert "pyro-lvae evaluate" in capsys.readouterr().out and not (run / "results.json").exists()
    # Resume naming only what changes: the latent sizes, subsets and guide stay the run's own.
    resume = [
        "train",
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2",
        "--final-eval-subset",
        "10",
        "--data-root",
        str(shared_data_root),
        "--no-progress",
    ]
    assert main(resume) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["model"]["latent_sizes"] == [4, 2] and results["config"]["model"]["guide"] == "vae"
    assert results["config"]["train"]["train_subset"] == 256 and results["epochs"] == 2
    assert results["num_test_examples"] == 10
    # evaluate --test-subset
    assert (
        main(["evaluate", str(run), "--test-subset", "20", "--data-root", str(shared_data_root), "--no-progress"]) == 0
    )
    assert json.loads((run / "results.json").read_text())["num_test_examples"] == 20
    # With --preset, the configuration is the preset with the options (as the sweep resumes
    # its runs); one that does not match the stored configuration is refused.
    with pytest.raises(SystemExit) as exit_info:
        main(resume[:3] + ["--resume", "--preset", "lvae-bn-wu-2"])
    assert exit_info.value.code == 2 and "different configuration" in capsys.readouterr().err
    assert (
        main(
            _tiny_train_args(run, shared_data_root)[:-2]
            + ["--out", str(run), "--resume", "--epochs", "3", "--guide", "bottom-up", "--no-final-eval"]
        )
        == 0
    )


def test_a_warm_up_longer_than_training_warns_at_start(tmp_path, shared_data_root):
    args = _tiny_train_args(tmp_path / "run", shared_data_root)
    args[args.index("--warmup-epochs") + 1] = "200"
    with pytest.warns(UserWarning, match=r"training ends at β = 0.000 but is scored at β = 1"):
        assert main(args + ["--no-final-eval"]) == 0


def test_option_help_comes_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "N_t of eq. 20" in text  # --warmup-epochs, from TrainConfig's :param:
    assert "Adam's ε" in text and "{ladder,vae,bottom-up}" in text


def test_the_cli_and_the_package_import_no_heavy_library():
    """`pyro-lvae --help` and argument errors answer without torch (1.7 s to import on
    two cores), Pyro or the plotting and analysis libraries; the handlers load them."""
    heavy = "('torch', 'pyro', 'matplotlib', 'arviz', 'xarray', 'scipy')"
    for module in ("pyro_lvae", "pyro_lvae.cli"):
        code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", module
    code = "import sys, pyro_lvae; pyro_lvae.GenerativeModel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # the public names still load on first use


def test_training_controls_from_the_cli_then_evaluate_either_weights(tmp_path, shared_data_root, capsys):
    """--ema, --skip-threshold auto, --valid-size and --tensorboard together; evaluate uses the
    moving average by default and the raw weights with --weights raw, and results.json says which."""
    run, board = tmp_path / "run", tmp_path / "tb"
    extra = ["--epochs", "2", "--eval-every", "1", "--ema", "0.99", "--skip-threshold", "auto", "--valid-size", "56"]
    assert main(_tiny_train_args(run, shared_data_root) + extra + ["--tensorboard", str(board)]) == 0
    assert "moving-average weights" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_by_cause"] for m in metrics] == [{"non_finite": 0, "threshold": 0}] * 2
    assert all("valid_elbo" in m and "test_elbo" not in m and m["weights"] == "ema" for m in metrics)
    assert any(p.name.startswith("events.out.tfevents") for p in board.iterdir())
    trained = json.loads((run / "results.json").read_text())
    assert trained["weights"] == "ema" and trained["config"]["train"]["valid_size"] == 56
    evaluate = ["evaluate", str(run), "--data-root", str(shared_data_root), "--no-progress"]
    assert main(evaluate) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["weights"] == "ema" and again["test_elbo"] == trained["test_elbo"]
    assert main(evaluate + ["--weights", "raw"]) == 0
    raw = json.loads((run / "results.json").read_text())
    assert raw["weights"] == "raw" and raw["test_elbo"] != trained["test_elbo"]
    # export takes the weights results.json evaluated, and says which.
    export = [
        "export",
        str(run),
        "--name",
        "tiny",
        "--out",
        str(tmp_path / "pre"),
        "--data-root",
        str(shared_data_root),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(export)  # auto: the average, but results.json evaluated the raw weights
    assert exit_info.value.code == 2 and "--weights ema" in capsys.readouterr().err
    assert main(export + ["--weights", "raw"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "raw"


def test_a_threshold_that_skips_every_step_stops_training_with_one_line(tmp_path, shared_data_root, capsys):
    args = _tiny_train_args(tmp_path / "run", shared_data_root)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--skip-threshold", "1e-9", "--max-consecutive-skips", "2", "--no-final-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert err[-1].startswith("pyro-lvae: error: 2 consecutive training steps were skipped") and "auto" in err[-1]


@pytest.mark.parametrize("guide", ["ladder", "bottom-up"])
def test_the_conv_bottom_trains_resumes_and_evaluates_from_the_cli(tmp_path, shared_data_root, guide):
    run = tmp_path / "run"
    common = ["--data-root", str(shared_data_root), "--no-download", "--no-progress"]
    args = ["train", "--preset", "lvae-bn-wu-2", "--bottom", "conv", "--conv-channels", "4", "--guide", guide]
    args += ["--epochs", "1", "--warmup-epochs", "1", "--train-subset", "512", "--test-subset", "50"]
    args += ["--latent-sizes", "8,4", "--hidden-sizes", "32,16", "--num-importance-samples", "10", "--out", str(run)]
    assert main(args + common) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", str(run)] + common) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["model"]["bottom"] == "conv" and results["epochs"] == 2
    assert results["test_log_likelihood"] >= results["test_elbo"]
    assert (
        main(["evaluate", str(run), "--num-samples", "10", "--data-root", str(shared_data_root), "--no-progress"]) == 0
    )
    assert json.loads((run / "results.json").read_text())["test_log_likelihood"] == results["test_log_likelihood"]
