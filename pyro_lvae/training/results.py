"""The final evaluation of a run, the contents of ``results.json``
(:class:`~pyro_lvae.training.results_file.RunResults`).

:func:`final_results` evaluates the test ELBO and L_K of a trained model and describes the
run (epochs, time, hardware, library versions, date); :func:`evaluate_run` does it for a
run directory. Every number is in nats per example; for a dequantized run the bounds are
on the 8-bit images (see :func:`discrete_offset`).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from pathlib import Path

import pyro
import torch

from ..config import ExperimentConfig
from ..data import dequantization_offset
from ..inference.evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from .batches import prepare_data
from .distributed import init_from_environment, local_device
from .results_file import PerExample, RunResults
from .run_dir import load_run, read_metrics
from .run_files import RESULTS_NAME


def discrete_offset(config: ExperimentConfig) -> float:
    """What turns a bound on the dequantized density into one on the 8-bit images:
    −D log 256 with ``dequantize``, else 0.

    :param config: The run's configuration.
    """
    return dequantization_offset(config.model.input_dim) if config.train.dequantize else 0.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    weights: str = "raw",
) -> RunResults:
    """Evaluate test ELBO and L_K and describe the run, in nats per example.

    Besides the bounds it records the model's family-specific metrics
    (:meth:`~pyro_lvae.models.protocol.HierarchicalModel.test_metrics`: for Gaussian
    latents the paper's Figs. 4-5, KL per unit and active units per layer).

    :param model: The trained model.
    :param guide: Its guide.
    :param config: The run's configuration (stored in the results).
    :param test: Test data on the model's device.
    :param epochs: Epochs trained.
    :param num_samples: K of L_K.
    :param train_seconds: Training time, stored in the results.
    :param memory_budget: Bytes per particle chunk of the L_K evaluation.
    :param progress: Show a progress bar.
    :param weights: Which weights ``model`` and ``guide`` hold, ``"raw"`` or ``"ema"`` (recorded).
    """
    t0 = time.perf_counter()
    ev = evaluate(
        model,
        guide,
        test,
        num_samples=num_samples,
        memory_budget=memory_budget,
        progress=progress,
        seed=config.train.seed,
    )
    extra = model.test_metrics(guide, test)
    offset = discrete_offset(config)
    if config.train.dequantize:
        # Bounds on the 8-bit images: the dequantized density's, minus D log 256 (see data.dequantize).
        extra["dequantized"] = True
        extra["test_bits_per_dim"] = -(ev["log_likelihood"] + offset) / (config.model.input_dim * math.log(2))
    return RunResults(
        test_elbo=ev["elbo"] + offset,
        test_log_likelihood=ev["log_likelihood"] + offset,
        num_importance_samples=num_samples,
        epochs=epochs,
        config=config,
        test_kl_per_layer=ev["kl_per_layer"],
        test_reconstruction=ev["reconstruction"],
        num_test_examples=ev["num_examples"],
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - t0,
        device=_device_name(next(model.parameters()).device),
        versions={"torch": torch.__version__, "pyro": pyro.__version__},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        weights=weights,
        per_example=_per_example(ev, offset),
        **extra,
    )


def _per_example(ev: dict, offset: float) -> PerExample:
    """The per-example bounds of an :func:`~pyro_lvae.inference.evaluation.evaluate` result, offset as the means are."""
    return PerExample(
        elbo=ev["elbo_per_example"].double().numpy() + offset,
        log_likelihood=ev["log_likelihood_per_example"].double().numpy() + offset,
    )


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int | None = None,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    test_subset: int | None = None,
    weights: str = "auto",
) -> RunResults:
    """Evaluate a trained run's test ELBO and L_K and write ``results.json`` into it.

    :param run_dir: The run directory.
    :param num_samples: K (default: the run's ``num_importance_samples``).
    :param data_root: Data root (default ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Allow torchvision to download missing MNIST files.
    :param device: Where to evaluate.
    :param memory_budget: Bytes per particle chunk of the L_K evaluation.
    :param progress: Show a progress bar.
    :param test_subset: Evaluate the first this many test examples only (default: the
        run's ``test_subset``, usually all of them).
    :param weights: ``"auto"`` (the moving average when the run has one), ``"ema"`` or ``"raw"``
        (:func:`~pyro_lvae.training.run_dir.load_run`).
    """
    ctx = init_from_environment(torch.device(device))
    device = local_device(torch.device(device), ctx)
    model, guide, config, ckpt = load_run(run_dir, device=device, weights=weights)
    if num_samples is not None:
        config = config.replace(num_importance_samples=num_samples)
    if test_subset is not None:
        config = config.replace(test_subset=test_subset)
    pyro.set_rng_seed(config.train.seed)
    data = prepare_data(config, data_root=data_root, download=download, device=device)
    results = final_results(
        model,
        guide,
        config,
        data.test,
        epochs=ckpt["epoch"],
        num_samples=config.train.num_importance_samples,
        train_seconds=sum(m["seconds"] for m in read_metrics(run_dir, ckpt["epoch"])),
        memory_budget=memory_budget,
        progress=progress,
        weights=ckpt["weights"],
    )
    if ctx.is_main:
        results.save(Path(run_dir) / RESULTS_NAME)
    return results
