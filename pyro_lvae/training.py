"""Training with ``pyro.infer.SVI``, KL warm-up, per-epoch metrics and checkpoints.

:func:`train` runs a whole experiment from an :class:`~pyro_lvae.config.ExperimentConfig`:

1. load the data and move it to the device once (the training set as grey levels
   when it is binarized dynamically, the test set binarized once with the run's
   seed);
2. build the model, the guide named by the config and the ELBO valid for that
   guide (:func:`~pyro_lvae.objectives.elbo_for`), and the training step of the
   configured engine (:class:`~pyro_lvae.engine.TrainingStep`);
3. for every epoch: draw a fresh binarization x ~ Bernoulli(grey) (paper §3),
   shuffle by an index permutation on the device, and take one step per
   minibatch with the warm-up weight β of that epoch
   (:func:`~pyro_lvae.warmup.warmup_beta`) as a tensor;
4. append one JSON line per epoch to ``metrics.jsonl`` and write an atomic
   checkpoint (:mod:`pyro_lvae.checkpoint`). Every line has ``epoch``, ``beta``,
   ``seconds`` and ``train_objective`` (the β-weighted bound of eq. 20, running
   mean over the epoch's steps, which is the running train ELBO once β = 1);
   every ``eval_every`` epochs (and the last) it also has ``train_elbo`` (the
   ELBO on the first ``len(test)`` training examples of the epoch),
   ``test_elbo``, ``test_kl_per_layer`` and ``test_kl_per_unit`` (one list per
   layer, see :func:`~pyro_lvae.analysis.kl_per_unit`), all in nats per example;
5. finally evaluate the test ELBO and L_K and write ``results.json``.

``resume=True`` restores parameters, batch-norm statistics, optimizer and RNG
state from the checkpoint and continues with the next epoch, so a resumed run
gives the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from .analysis import kl_per_unit
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .data import Dataset, binarize, check_data, load_dataset
from .engine import TrainingStep
from .evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from .families import make_guide, make_model
from .vqvae import vq_statistics
from .warmup import warmup_beta

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class PreparedData:
    """Training and test tensors on the training device.

    :param train: Grey levels (dynamic binarization) or the data itself, ``(N, D)``.
    :param test: Test data as evaluated (binarized once for dynamic binarization).
    :param train_labels: Labels of ``train``.
    :param test_labels: Labels of ``test``.
    :param dynamic: Whether ``train`` is re-binarized every epoch.
    """

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    dynamic: bool

    def epoch_data(self) -> torch.Tensor:
        """The training data for one epoch: a fresh binarization when dynamic."""
        return binarize(self.train) if self.dynamic else self.train


@dataclass
class TrainResult:
    """What :func:`train` returns.

    :param model: The trained generative model.
    :param guide: The trained guide.
    :param config: The configuration of the run.
    :param data: The data it was trained and evaluated on.
    :param metrics: One dict per epoch (the lines of ``metrics.jsonl``).
    :param results: The final evaluation (the contents of ``results.json``), or
        ``None`` when ``final_evaluation=False``.
    """

    model: torch.nn.Module
    guide: torch.nn.Module
    config: ExperimentConfig
    data: PreparedData
    metrics: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None


def prepare_data(
    config: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> PreparedData:
    """Load, subset, check and move the data named by ``config`` to ``device``.

    :param dataset: Use this :class:`~pyro_lvae.data.Dataset` instead of loading
        ``config.train.dataset`` (tests and custom data).
    :raises ValueError: with a one-line fix if the data cannot be modelled.
    """
    tc, mc = config.train, config.model
    if dataset is None:
        dataset = load_dataset(tc.dataset, root=data_root, download=download)
    train_x, train_y = dataset.train_x, dataset.train_y
    test_x, test_y = dataset.test_x, dataset.test_y
    if tc.train_subset:
        train_x, train_y = train_x[: tc.train_subset], train_y[: tc.train_subset]
    if tc.test_subset:
        test_x, test_y = test_x[: tc.test_subset], test_y[: tc.test_subset]
    for what, x in (("training data", train_x), ("test data", test_x)):
        if tc.binarization == "dynamic":
            check_data(x, input_dim=mc.input_dim, likelihood="gaussian", what=what)
            if not ((x >= 0) & (x <= 1)).all():
                raise ValueError(
                    f"{what} has values outside [0, 1], but dynamic binarization samples "
                    "Bernoulli(grey level); rescale it to [0, 1] (e.g. divide by 255)."
                )
        else:
            check_data(x, input_dim=mc.input_dim, likelihood=mc.likelihood, what=what)
    if tc.batch_size > len(train_x):
        raise ValueError(
            f"batch_size {tc.batch_size} is larger than the {len(train_x)} training examples; lower batch_size."
        )
    device = torch.device(device)
    train_x, test_x = train_x.to(device), test_x.to(device)
    if tc.binarization == "dynamic":
        # The test set is binarized once, with a generator seeded by the run's seed.
        gen = torch.Generator(device=device).manual_seed(tc.seed)
        test_x = binarize(test_x, generator=gen)
    return PreparedData(
        train=train_x,
        test=test_x,
        train_labels=train_y,
        test_labels=test_y,
        dynamic=tc.binarization == "dynamic",
    )


def _rng_state() -> dict[str, Any]:
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    state = dict(state)
    cuda = state.pop("cuda", None)
    pyro.util.set_rng_state(state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _comparable(config: ExperimentConfig) -> dict[str, Any]:
    d = config.to_dict()
    d["train"].pop("epochs")  # a resumed run may be extended
    d["train"].pop("eval_every")
    d["train"].pop("num_importance_samples")
    return d


def _prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("Choose either --resume or --overwrite, not both.")
    has_run = (out_dir / CHECKPOINT_NAME).exists() or (out_dir / METRICS_NAME).exists()
    if resume and not has_run:
        raise FileNotFoundError(f"Nothing to resume in {out_dir}: no checkpoint; drop --resume to start the run.")
    if has_run and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to replace it."
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """Metric lines of epochs ≤ ``up_to_epoch`` (later ones were not checkpointed)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["epoch"] <= up_to_epoch:
                lines.append(record)
    return lines


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train(
    config: ExperimentConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    dataset: Dataset | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    final_evaluation: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> TrainResult:
    """Train the model and guide of ``config`` with SVI and warm-up.

    Clears Pyro's param store and seeds every RNG with ``config.train.seed``.

    :param config: The experiment.
    :param out_dir: Run directory for ``config.json``, ``metrics.jsonl``,
        checkpoints and ``results.json``; ``None`` keeps everything in memory.
    :param dataset: Train on this :class:`~pyro_lvae.data.Dataset` instead of
        loading ``config.train.dataset``.
    :param data_root: Data root (default ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Allow torchvision to download missing MNIST files.
    :param device: ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
    :param resume: Continue the run in ``out_dir`` from its checkpoint.
    :param overwrite: Replace an existing run in ``out_dir``.
    :param final_evaluation: Evaluate test ELBO and L_K (K =
        ``config.train.num_importance_samples``) after the last epoch.
    :param memory_budget: Bytes per particle chunk in the L_K evaluation.
    :param progress: Show tqdm progress bars.
    :returns: A :class:`TrainResult`.
    """
    if not isinstance(config, ExperimentConfig):
        raise ValueError(f"config must be an ExperimentConfig, got {type(config).__name__}.")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu.")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        _prepare_run_dir(out_path, resume=resume, overwrite=overwrite)
    elif resume:
        raise ValueError("resume needs out_dir, the run directory to continue.")

    tc = config.train
    pyro.clear_param_store()
    pyro.set_rng_seed(tc.seed)
    data = prepare_data(config, dataset=dataset, data_root=data_root, download=download, device=device)

    model = make_model(config.model).to(device)
    guide = make_guide(model).to(device)
    step = TrainingStep(model, guide, learning_rate=tc.learning_rate, engine=tc.engine)

    start_epoch = 0
    metrics: list[dict[str, Any]] = []
    if resume:
        assert out_path is not None
        ckpt = load_checkpoint(out_path)
        stored = ExperimentConfig.from_dict(ckpt["config"])
        if _comparable(stored) != _comparable(config):
            raise ValueError(
                f"The checkpoint in {out_path} was written with a different configuration; "
                "resume with the same preset and options (only epochs, eval_every and "
                "num_importance_samples may change), or use --overwrite."
            )
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
        step.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"]
        metrics = _read_metrics(out_path / METRICS_NAME, start_epoch)
        (out_path / METRICS_NAME).write_text("".join(json.dumps(m) + "\n" for m in metrics))
        logger.info("Resuming %s from epoch %d.", out_path, start_epoch)
    if out_path is not None:
        _write_json_atomic(out_path / CONFIG_NAME, config.to_dict())

    n = len(data.train)
    train_seconds = sum(m["seconds"] for m in metrics)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        beta = warmup_beta(epoch, tc.warmup_epochs)
        beta_t = torch.tensor(beta, device=device)
        model.train()
        guide.train()
        x_epoch = data.epoch_data()
        batches = torch.randperm(n, device=device).split(tc.batch_size)
        if config.model.batch_norm and len(batches) > 1 and len(batches[-1]) == 1:
            batches = batches[:-1]  # batch norm cannot normalize a single example
        # The loss is summed on the device; reading it (a host sync on a GPU) happens
        # only for the progress bar, every 25 steps, and once at the end of the epoch.
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(batches, disable=not progress, leave=False, desc=f"epoch {epoch + 1}/{tc.epochs}")
        for i, idx in enumerate(bar):
            loss_sum += step(x_epoch[idx], beta_t)
            seen += len(idx)
            if progress and i % 25 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.2f}", beta=f"{beta:.3f}", refresh=False)
        loss_mean = loss_sum.item() / seen
        if not math.isfinite(loss_mean):
            # The fast engine runs without Pyro's validation, so a diverging run is caught
            # here, before this epoch's checkpoint could overwrite the last good one.
            kept = f"; the checkpoint of epoch {epoch} in {out_path} is intact" if out_path is not None and epoch > 0 else ""
            raise FloatingPointError(
                f"The training loss became non-finite in epoch {epoch + 1}{kept}; lower learning_rate "
                "or check the data and the configuration."
            )
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "beta": beta,
            # The β-weighted objective of eq. 20, running mean over the epoch's steps;
            # it equals the running train ELBO once β = 1.
            "train_objective": -loss_mean,
            "seconds": seconds,
        }
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            # The true ELBO (β = 1, batch norm in eval mode) on as many training
            # examples of this epoch's binarization as the test set has, and on the test set.
            train_part = x_epoch[: len(data.test)]
            ev_train = evaluate(model, guide, train_part, num_samples=tc.eval_particles, memory_budget=memory_budget)
            ev = evaluate(model, guide, data.test, num_samples=tc.eval_particles, memory_budget=memory_budget)
            record["train_elbo"] = ev_train["elbo"]
            record["test_elbo"] = ev["elbo"]
            record["test_kl_per_layer"] = ev["kl_per_layer"]
            if config.model.family != "vqvae":  # per-unit KL needs Gaussian latents
                record["test_kl_per_unit"] = [
                    k.tolist() for k in kl_per_unit(model, guide, data.test, num_samples=tc.eval_particles)
                ]
        metrics.append(record)
        logger.info(
            "epoch %d/%d  beta %.3f  train objective %.3f  %s%.1fs",
            epoch + 1,
            tc.epochs,
            beta,
            record["train_objective"],
            f"test ELBO {record['test_elbo']:.3f}  " if "test_elbo" in record else "",
            seconds,
        )
        if out_path is not None:
            with open(out_path / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(
                out_path,
                {
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "guide": guide.state_dict(),
                    "optimizer": step.state_dict(),
                    "rng": _rng_state(),
                },
            )

    result = TrainResult(model=model, guide=guide, config=config, data=data, metrics=metrics)
    if final_evaluation:
        result.results = final_results(
            model,
            guide,
            config,
            data.test,
            epochs=len(metrics),
            num_samples=tc.num_importance_samples,
            train_seconds=train_seconds,
            memory_budget=memory_budget,
            progress=progress,
        )
        if out_path is not None:
            _write_json_atomic(out_path / RESULTS_NAME, result.results)
    return result


def final_results(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    config: ExperimentConfig,
    test: torch.Tensor,
    *,
    epochs: int,
    num_samples: int,
    train_seconds: float | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate test ELBO and L_K and describe the run, in nats per example.

    :param model: The trained model.
    :param guide: Its guide.
    :param config: The run's configuration (stored in the results).
    :param test: Test data on the model's device.
    :param epochs: Epochs trained.
    :param num_samples: K of L_K.
    :param train_seconds: Training time, stored in the results.
    :param memory_budget: Bytes per particle chunk of the L_K evaluation.
    :param progress: Show a progress bar.

    :returns: The contents of ``results.json``: ``test_elbo``,
        ``test_log_likelihood``, ``num_importance_samples``, ``epochs``,
        ``config``, ``test_kl_per_layer``, ``num_test_examples``, the hardware,
        the library versions and the date.
    """
    t0 = time.perf_counter()
    ev = evaluate(model, guide, test, num_samples=num_samples, memory_budget=memory_budget, progress=progress)
    device = next(model.parameters()).device
    extra = {}
    if config.model.family == "vqvae":
        extra["vq"] = vq_statistics(model, guide, test)
    return extra | {
        "test_elbo": ev["elbo"],
        "test_log_likelihood": ev["log_likelihood"],
        "num_importance_samples": num_samples,
        "epochs": epochs,
        "config": config.to_dict(),
        "test_kl_per_layer": ev["kl_per_layer"],
        "test_reconstruction": ev["reconstruction"],
        "num_test_examples": ev["num_examples"],
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_run(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the model and guide of a run from its newest checkpoint.

    :param run_dir: The run directory.
    :param device: Where to put the model and guide.

    :returns: ``(model, guide, config, checkpoint)``, in evaluation mode.
    """
    ckpt = load_checkpoint(run_dir)
    config = ExperimentConfig.from_dict(ckpt["config"])
    pyro.clear_param_store()
    model = make_model(config.model)
    guide = make_guide(model)
    try:
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
    except RuntimeError as exc:
        raise ValueError(f"The checkpoint in {run_dir} does not match its own configuration ({exc}); it is corrupt.") from exc
    model.to(device).eval()
    guide.to(device).eval()
    return model, guide, config, ckpt


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run's test ELBO and L_K and write ``results.json`` into it.

    :param num_samples: K (default: the run's ``num_importance_samples``).
    """
    model, guide, config, ckpt = load_run(run_dir, device=device)
    if num_samples is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, num_importance_samples=num_samples))
    pyro.set_rng_seed(config.train.seed)
    data = prepare_data(config, data_root=data_root, download=download, device=device)
    metrics = _read_metrics(Path(run_dir) / METRICS_NAME, ckpt["epoch"])
    results = final_results(
        model,
        guide,
        config,
        data.test,
        epochs=ckpt["epoch"],
        num_samples=config.train.num_importance_samples,
        train_seconds=sum(m["seconds"] for m in metrics),
        memory_budget=memory_budget,
        progress=progress,
    )
    _write_json_atomic(Path(run_dir) / RESULTS_NAME, results)
    return results
