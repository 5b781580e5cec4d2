"""Every kind of bad input gets one clear sentence that names the fix, raised before any
training step (table-driven: one row per case)."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import synthetic_dataset

from pyro_lvae import ExperimentConfig, ModelConfig, TrainConfig, get_preset
from pyro_lvae.cli import main
from pyro_lvae.data import DATA_ENV, Dataset, load_dataset
from pyro_lvae.training import train

SMALL = ExperimentConfig(
    model=ModelConfig(input_dim=12, latent_sizes=(3,), hidden_sizes=(8,)),
    train=TrainConfig(epochs=1, batch_size=16, num_importance_samples=2),
)


def _dataset(train_x: torch.Tensor) -> Dataset:
    good = synthetic_dataset()
    return Dataset("bad", train_x, torch.zeros(len(train_x), dtype=torch.int64), good.test_x, good.test_y, binary=False)


def _train_on(train_x: torch.Tensor, **overrides) -> Callable[[Path], object]:
    return lambda tmp: train(SMALL.replace(**overrides), out_dir=tmp / "run", dataset=_dataset(train_x), progress=False)


def _grey(n: int = 64) -> torch.Tensor:
    return synthetic_dataset().train_x[:n]


def _with(value: float) -> torch.Tensor:
    x = _grey().clone()
    x[3, 4] = value
    return x


def _trained_run(tmp: Path) -> Path:
    train(SMALL, out_dir=tmp / "run", dataset=synthetic_dataset(), progress=False, final_evaluation=False)
    return tmp / "run"


def _resume(tmp: Path, config: ExperimentConfig = SMALL):
    return train(
        config.replace(epochs=2), out_dir=tmp / "run", dataset=synthetic_dataset(), progress=False, resume=True
    )


def _small_pair():
    from pyro_lvae import LadderGuide, make_model

    model = make_model(SMALL.model)
    return model, LadderGuide(model)


def _evaluate_on(convert: Callable[[torch.Tensor], object]) -> Callable[[Path], object]:
    from pyro_lvae import evaluate

    return lambda tmp: evaluate(*_small_pair(), convert(synthetic_dataset().test_x[:8].round()), num_samples=2)


def _pretrained_from_a_checkpoint(tmp: Path):
    from pyro_lvae import load_pretrained

    return load_pretrained(_trained_run(tmp) / "checkpoint.pt")


def _run_from_a_file(tmp: Path):
    from pyro_lvae.training import load_run

    return load_run(_trained_run(tmp) / "checkpoint.pt")


def _analysis_with_one_sample(tmp: Path):
    from pyro_lvae.analysis.report import analyse_run

    return analyse_run(_trained_run(tmp), tmp / "report", name="a", num_samples=1)


def _corrupt_checkpoint(tmp: Path):
    run = _trained_run(tmp)
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    return _resume(tmp)


def _truncated_checkpoint(tmp: Path):
    run = _trained_run(tmp)
    raw = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    return _resume(tmp)


def _incompatible_checkpoint(tmp: Path):
    _trained_run(tmp)
    return _resume(tmp, SMALL.replace(hidden_sizes=(16,)))


def _existing_run_dir(tmp: Path):
    _trained_run(tmp)
    return train(SMALL, out_dir=tmp / "run", dataset=synthetic_dataset(), progress=False)


def _corrupt_mnist(tmp: Path):
    shared = Path(os.environ.get(DATA_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))
    shutil.copytree(shared / "MNIST", tmp / "MNIST")
    gz = tmp / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.open(gz).read())
    raw[100] ^= 1
    gz.chmod(0o644)
    gz.write_bytes(gzip.compress(bytes(raw)))
    return load_dataset("mnist", root=tmp, download=False)


def _cli(*args: str) -> Callable[[Path], object]:
    def run(tmp: Path):
        code = main(list(args) + ["--out", str(tmp / "run")])
        raise AssertionError(f"expected an error, got exit code {code}")

    return run


# (case, action, exception type, words of the fix that the message must contain)
CASES = [
    ("wrong shape", _train_on(torch.zeros(64, 5)), ValueError, "flatten images"),
    ("wrong dtype", _train_on(torch.zeros(64, 12, dtype=torch.int64)), ValueError, "convert it with .float()"),
    ("NaN in the data", _train_on(_with(float("nan"))), ValueError, "clean or drop"),
    ("Inf in the data", _train_on(_with(float("inf"))), ValueError, "clean or drop"),
    (
        "non-binary values, static binarization",
        _train_on(_grey(), binarization="static"),
        ValueError,
        "binarize it (binarization='dynamic')",
    ),
    ("values outside [0, 1]", _train_on(_grey() * 3), ValueError, "rescale it to [0, 1]"),
    ("empty dataset", _train_on(torch.zeros(0, 12)), ValueError, "check the data root and the subset size"),
    ("batch size larger than the data", _train_on(_grey(10)), ValueError, "lower batch_size"),
    (
        "mismatched layer sizes",
        lambda tmp: ModelConfig(latent_sizes=(64, 32), hidden_sizes=(512,)),
        ValueError,
        "make them match",
    ),
    (
        "non-positive layer size",
        lambda tmp: ModelConfig(latent_sizes=(64, 0), hidden_sizes=(8, 8)),
        ValueError,
        "fix the entry 0",
    ),
    ("unknown activation", lambda tmp: ModelConfig(activation="relu6"), ValueError, "choose one of leaky_relu"),
    ("unknown likelihood", lambda tmp: ModelConfig(likelihood="poisson"), ValueError, "choose one of bernoulli"),
    (
        "Gaussian likelihood on binarized data",
        lambda tmp: SMALL.replace(likelihood="gaussian"),
        ValueError,
        "set binarization='none'",
    ),
    ("unknown preset", lambda tmp: get_preset("lvae-bn-wu-7"), ValueError, "did you mean lvae-bn-wu-5"),
    ("negative free bits", lambda tmp: SMALL.replace(free_bits=-0.5), ValueError, "free_bits must be a finite number"),
    ("non-finite clip", lambda tmp: SMALL.replace(grad_clip=float("inf")), ValueError, "grad_clip must be a finite"),
    ("negative skip threshold", lambda tmp: SMALL.replace(skip_threshold=-1.0), ValueError, "use 'auto'"),
    ("EMA decay of 1", _cli("train", "--ema", "1"), SystemExit, "ema must be a decay in [0, 1)"),
    ("validation split too large", _train_on(_grey(), valid_size=64), ValueError, "set valid_size below 64"),
    ("unknown configuration key", lambda tmp: SMALL.replace(learning_rat=0.1), ValueError, "known keys are"),
    (
        "unknown CLI key",
        _cli("train", "--preset", "vae-1", "--learnin-rate", "0.1"),
        SystemExit,
        "did you mean --learning-rate?",
    ),
    ("missing data file", lambda tmp: load_dataset("omniglot28", root=tmp), FileNotFoundError, "point --data-root"),
    ("corrupt data file (checksum)", _corrupt_mnist, ValueError, "delete it and download or copy it again"),
    ("corrupt checkpoint", _corrupt_checkpoint, ValueError, "start again with --overwrite"),
    ("truncated checkpoint", _truncated_checkpoint, ValueError, "start again with --overwrite"),
    ("incompatible checkpoint", _incompatible_checkpoint, ValueError, "resume with the same preset and options"),
    ("existing run directory", _existing_run_dir, FileExistsError, "pass --resume to continue it or --overwrite"),
    (
        "an ExperimentConfig where a ModelConfig goes",
        lambda tmp: __import__("pyro_lvae").make_model(SMALL),
        ValueError,
        "pass config.model",
    ),
    (
        "a guide built on a guide",
        lambda tmp: __import__("pyro_lvae").LadderGuide(_small_pair()[1]),
        ValueError,
        "build the model first (model = make_model(config.model))",
    ),
    ("float64 data for a float32 model", _evaluate_on(lambda x: x.double()), ValueError, "x.to(torch.float32)"),
    (
        "the guide of a re-created model",
        lambda tmp: __import__("pyro_lvae").evaluate(
            __import__("pyro_lvae").make_model(SMALL.model), _small_pair()[1], _grey(8).round(), num_samples=2
        ),
        ValueError,
        "guide was built for another model",
    ),
    (
        "a batch size of 0 for the analyses",
        lambda tmp: __import__("pyro_lvae.analysis", fromlist=["kl_per_unit"]).kl_per_unit(
            *_small_pair(), _grey(8).round(), batch_size=0
        ),
        ValueError,
        "batch_size must be a positive integer, got 0",
    ),
    (
        "one example without its batch dimension",
        lambda tmp: _small_pair()[0](_grey(1)[0].round()),
        ValueError,
        "for one example use x[None]",
    ),
    (
        "an ELBO with no particles",
        lambda tmp: __import__("pyro_lvae").elbo_for(_small_pair()[1], num_particles=0),
        ValueError,
        "num_particles must be a positive integer, got 0",
    ),
    (
        "model and guide swapped",
        lambda tmp: __import__("pyro_lvae").encode(*reversed(_small_pair()), _grey(8).round()),
        ValueError,
        "pass the model first, then its guide",
    ),
    ("a numpy array", _evaluate_on(lambda x: x.numpy()), ValueError, "torch.as_tensor(x, dtype=torch.float32)"),
    (
        "a dataset that is not a Dataset",
        lambda tmp: train(SMALL, out_dir=tmp / "run", dataset=(_grey(), _grey()), progress=False),
        ValueError,
        "build one with Dataset(",
    ),
    ("a checkpoint given to load_pretrained", _pretrained_from_a_checkpoint, ValueError, "pyro_lvae.load_run(run_dir)"),
    ("a file given to load_run", _run_from_a_file, ValueError, "give load_run the run directory"),
    ("an analysis with K = 1", _analysis_with_one_sample, ValueError, "num_samples must be an integer of at least 2"),
]


@pytest.mark.parametrize("case, action, error, fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_sentence_naming_the_fix(tmp_path, capsys, case, action, error, fix):
    with pytest.raises(error) as err:
        action(tmp_path)
    if error is SystemExit:
        assert err.value.code == 2
        message = capsys.readouterr().err.strip()
    else:
        message = str(err.value)
    assert fix in message, message
    assert "\n" not in message and message.count(". ") <= 2, message  # one sentence, one line
    made_a_run = ("existing run directory", "corrupt checkpoint", "truncated checkpoint", "incompatible checkpoint")
    if case not in made_a_run and not case.startswith(("a checkpoint given", "a file given", "an analysis")):
        # Raised before the run started: config.json is written after the checks, before the first step.
        assert not (tmp_path / "run" / "config.json").exists()
