"""Training with ``pyro.infer.SVI``, KL warm-up, per-epoch metrics and checkpoints.

:func:`train` runs a whole experiment from an :class:`~pyro_lvae.config.ExperimentConfig`:

1. load the data and move it to the device once (the training set as grey levels
   when it is binarized dynamically, the test set binarized once with the run's
   seed);
2. build the model, the guide named by the config and the ELBO valid for that
   guide (:func:`~pyro_lvae.inference.objectives.elbo_for`), and the training step of the
   configured engine (:class:`~pyro_lvae.training.steps.TrainingStep`);
3. for every epoch: draw a fresh binarization x ~ Bernoulli(grey) (paper §3)
   and an index permutation from a generator seeded by (seed, epoch)
   (:func:`epoch_batches`), and take one step per minibatch with the warm-up weight
   β of that epoch (:func:`~pyro_lvae.inference.warmup.warmup_beta`) as a tensor. A step
   whose loss or gradients are not finite is skipped and counted
   (``max_consecutive_skips`` in a row stop the run);
4. append one JSON line per epoch to ``metrics.jsonl`` and write an atomic
   checkpoint (:mod:`pyro_lvae.training.checkpoint`). Every line has ``epoch``, ``beta``,
   ``seconds`` and ``train_objective`` (the β-weighted bound of eq. 20, running
   mean over the epoch's steps, which is the running train ELBO once β = 1);
   every ``eval_every`` epochs (and the last) it also has ``train_elbo`` (the
   ELBO on the first ``len(test)`` training examples of the epoch),
   ``test_elbo``, ``test_kl_per_layer`` and ``test_kl_per_unit`` (one list per
   layer, see :func:`~pyro_lvae.analysis.latents.kl_per_unit`), all in nats per example;
5. with ``finetune_epochs`` > 0, continue for that many epochs on the
   importance-weighted bound with an annealed learning rate (paper §3; see
   :func:`finetune_learning_rate` and
   :func:`~pyro_lvae.inference.objectives.importance_weighted_loss`);
6. finally evaluate the test ELBO and L_K and write ``results.json``.

``resume=True`` restores parameters, batch-norm statistics, optimizer and RNG
state from the checkpoint and continues with the next epoch, so a resumed run
gives the same parameters as an uninterrupted one. SIGINT and SIGTERM stop the run
after the current step with a checkpoint of the position inside the epoch, which
``resume=True`` continues from (:class:`TrainingInterrupted`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyro
import torch
from tqdm.auto import tqdm

from ..analysis.latents import active_units, kl_per_unit
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from ..config import ExperimentConfig
from ..data import Dataset, binarize, check_data, dequantization_offset, dequantize, load_dataset
from .distributed import all_reduce_sum, all_true, gather_objects, init_from_environment, local_device, shard
from .steps import make_step
from ..inference.objectives import ImportanceWeightedLoss
from ..inference.evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from ..models.families import make_guide, make_model
from .run_files import CONFIG_NAME, METRICS_NAME, RESULTS_NAME
from ..models.vqvae import vq_statistics
from ..inference.warmup import warmup_beta

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PreparedData:
    """Training and test tensors on the training device.

    :param train: Grey levels (dynamic binarization) or the data itself, ``(N, D)``.
    :param test: Test data as evaluated (binarized once for dynamic binarization).
    :param train_labels: Labels of ``train``.
    :param test_labels: Labels of ``test``.
    :param dynamic: Whether ``train`` is re-binarized every epoch.
    :param dequantized: Whether ``train`` is dequantized afresh every epoch (``test`` is, once).
    """

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    dynamic: bool
    dequantized: bool = False


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
    if tc.dequantize:
        # The test set is dequantized once, with a generator seeded by the run's seed.
        gen = torch.Generator(device=device).manual_seed(tc.seed)
        test_x = dequantize(test_x, generator=gen)
    return PreparedData(
        train=train_x,
        test=test_x,
        train_labels=train_y,
        test_labels=test_y,
        dynamic=tc.binarization == "dynamic",
        dequantized=tc.dequantize,
    )



class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after finishing a step and writing a checkpoint.

    :param signum: The signal received.
    :param out_dir: The run directory (``None`` when nothing was saved).
    :param epochs_done: Completed epochs.
    :param step: Steps done in the next epoch (0 when it stopped between epochs).
    :param steps: Steps in that epoch.
    """

    def __init__(self, signum: int, out_dir: Path | None, epochs_done: int, step: int, steps: int) -> None:
        self.signum = signum
        where = f"epoch {epochs_done + 1}, step {step} of {steps}" if step else f"the end of epoch {epochs_done}"
        if out_dir is None:
            saved = "nothing was saved (no run directory); pass out_dir to make runs resumable"
        else:
            saved = f"the checkpoint in {out_dir} is up to date: continue with --resume"
        super().__init__(f"Interrupted by {signal.Signals(signum).name} at {where}; {saved}.")


@dataclass
class _StopRequest:
    signal: int | None = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """Turn SIGINT and SIGTERM into a request to stop after the current step.

    Only the main thread can install signal handlers; elsewhere the request never fires.
    The previous handlers are restored on exit.
    """
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is None:
            logger.warning("%s received: finishing the current step, then writing a checkpoint.", signal.Signals(signum).name)
        request.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _agree_on_signal(signum: int | None, ctx: Any, device: torch.device) -> int | None:
    """The signal to stop on if any process received one (every process must stop at the same step)."""
    if all_true(signum is None, ctx, device):
        return None
    return signum if signum is not None else signal.SIGTERM


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the data randomness (binarization and order) of 0-based ``epoch``.

    Drawing these from their own generator makes them a function of (seed, epoch)
    alone: a run resumed inside an epoch rebuilds the same batches, and every process
    of a distributed run draws the same permutation without communicating.

    :param seed: The run's seed.
    :param epoch: The epoch.
    """
    return (seed * 1_000_003 + epoch) % 2**63


def epoch_batches(
    data: PreparedData, config: ExperimentConfig, epoch: int, *, world_size: int = 1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The training data of ``epoch`` (a fresh binarization when dynamic) and its global
    minibatches of indices.

    :param data: The prepared data.
    :param config: The run's configuration.
    :param epoch: The 0-based epoch.
    :param world_size: Processes that split every minibatch
        (:func:`~pyro_lvae.training.distributed.shard`); a last minibatch too small to give every
        process an example (two with batch norm) is dropped.
    """
    gen = torch.Generator(device=data.train.device).manual_seed(epoch_seed(config.train.seed, epoch))
    x_epoch = data.train
    if data.dynamic:
        x_epoch = binarize(data.train, generator=gen)
    elif data.dequantized:
        x_epoch = dequantize(data.train, generator=gen)
    batches = list(torch.randperm(len(data.train), generator=gen, device=data.train.device).split(config.train.batch_size))
    smallest = 2 if config.model.batch_norm else 1  # batch norm cannot normalize one example
    if len(batches) > 1 and len(batches[-1]) // world_size < smallest:
        batches = batches[:-1]
    return x_epoch, batches


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


_FINETUNE_FIELDS = (
    "finetune_epochs",
    "finetune_mc_samples",
    "finetune_iw_samples",
    "finetune_lr_decay",
    "finetune_decay_every",
)


def _comparable(config: ExperimentConfig, *, finetuning_started: bool) -> dict[str, Any]:
    d = config.to_dict()
    d["train"].pop("epochs")  # a resumed run may be extended
    d["train"].pop("eval_every")
    d["train"].pop("num_importance_samples")
    d["train"].pop("finetune_epochs")
    d["train"].pop("max_consecutive_skips")
    if not finetuning_started:  # a trained run may be fine-tuned with any settings
        for key in _FINETUNE_FIELDS[1:]:
            d["train"].pop(key)
    return d


def can_resume_as(stored: ExperimentConfig, config: ExperimentConfig, *, finetuning_started: bool) -> bool:
    """Whether a run written with ``stored`` may be resumed with ``config``.

    They may differ in ``epochs``, ``eval_every``, ``num_importance_samples``,
    ``finetune_epochs`` and ``max_consecutive_skips``, and, until fine-tuning has
    started, in the other fine-tuning settings.

    :param stored: The configuration in the checkpoint.
    :param config: The configuration to continue with.
    :param finetuning_started: Whether the checkpoint is past the training epochs.
    """
    return _comparable(stored, finetuning_started=finetuning_started) == _comparable(
        config, finetuning_started=finetuning_started
    )


def finetune_learning_rate(config: ExperimentConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: ``learning_rate`` during training, then
    multiplied by ``finetune_lr_decay`` after every ``finetune_decay_every``
    fine-tuning epochs (paper §3: × 0.75 every 200).

    :param config: The run's configuration.
    :param epoch: The 0-based epoch, counting the training epochs first.

    >>> from pyro_lvae.repro.presets import get_preset
    >>> cfg = get_preset("lvae-bn-wu-5-ft")
    >>> [round(finetune_learning_rate(cfg, e), 8) for e in (1999, 2000, 2199, 2200, 2400)]
    [0.001, 0.001, 0.001, 0.00075, 0.0005625]
    """
    tc = config.train
    if epoch < tc.epochs:
        return tc.learning_rate
    decays = (epoch - tc.epochs) // tc.finetune_decay_every
    return tc.learning_rate * tc.finetune_lr_decay**decays


def discrete_offset(config: ExperimentConfig) -> float:
    """What turns a bound on the dequantized density into one on the 8-bit images:
    −D log 256 with ``dequantize``, else 0.

    :param config: The run's configuration.
    """
    return dequantization_offset(config.model.input_dim) if config.train.dequantize else 0.0


def warn_about_schedule(config: ExperimentConfig) -> None:
    """Warn when the warm-up is longer than training, so that training ends at β < 1.

    The final ELBO and L_K are always scored at β = 1, so such a run is scored on an
    objective it was never trained on.

    :param config: The run's configuration.
    """
    tc = config.train
    final_beta = warmup_beta(tc.epochs - 1, tc.warmup_epochs)
    if final_beta < 1 and not tc.finetune_epochs:  # fine-tuning trains at β = 1
        warnings.warn(
            f"warmup_epochs={tc.warmup_epochs} is not shorter than epochs={tc.epochs}: training ends at "
            f"β = {final_beta:.3f} but is scored at β = 1; set warmup_epochs below epochs "
            f"(e.g. --warmup-epochs {max(1, tc.epochs // 2)}) or 0 for a variant without warm-up.",
            UserWarning,
            stacklevel=3,
        )


def _prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Check the run directory against ``resume``/``overwrite``; with ``create`` (rank 0
    of a distributed run) also clear or create it."""
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
        if create:
            shutil.rmtree(out_dir)
    if create:
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
    final_eval_subset: int = 0,
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
    :param final_eval_subset: Run that final evaluation on the first this many test
        examples only (0 = all of them). L_5000 on 10,000 MNIST test images takes
        about 35 minutes on two CPU cores.
    :param memory_budget: Bytes per particle chunk in the L_K evaluation.
    :param progress: Show tqdm progress bars.
    :returns: A :class:`TrainResult`.
    """
    if not isinstance(config, ExperimentConfig):
        raise ValueError(f"config must be an ExperimentConfig, got {type(config).__name__}.")
    if isinstance(final_eval_subset, bool) or not isinstance(final_eval_subset, int) or final_eval_subset < 0:
        raise ValueError(f"final_eval_subset must be a non-negative integer (0 = all), got {final_eval_subset!r}.")
    warn_about_schedule(config)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu.")
    ctx = init_from_environment(device)
    device = local_device(device, ctx)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        _prepare_run_dir(out_path, resume=resume, overwrite=overwrite, create=ctx.is_main)
        ctx.barrier()
    elif resume:
        raise ValueError("resume needs out_dir, the run directory to continue.")

    tc = config.train
    if ctx.enabled and tc.batch_size < ctx.world_size:
        raise ValueError(
            f"batch_size {tc.batch_size} is the global minibatch and cannot be split over "
            f"{ctx.world_size} processes; raise batch_size or use fewer processes."
        )
    pyro.clear_param_store()
    pyro.set_rng_seed(tc.seed)
    data = prepare_data(config, dataset=dataset, data_root=data_root, download=download, device=device)

    model = make_model(config.model).to(device)
    guide = make_guide(model).to(device)
    step = make_step(
        model,
        guide,
        learning_rate=tc.learning_rate,
        engine=tc.engine,
        distributed=ctx,
        adam_eps=tc.adam_eps,
        grad_clip=tc.grad_clip,
        grad_clip_value=tc.grad_clip_value,
    )
    if ctx.rank > 0:
        # Independent draws on every process (rank 0 keeps the single-process stream);
        # the parameters are equal everywhere, DDP broadcast them from rank 0.
        pyro.set_rng_seed(tc.seed + 1_000_003 * ctx.rank)

    start_epoch = 0
    metrics: list[dict[str, Any]] = []
    if resume:
        assert out_path is not None
        ckpt = load_checkpoint(out_path)
        stored = ExperimentConfig.from_dict(ckpt["config"])
        started = ckpt["epoch"] > stored.train.epochs
        if not can_resume_as(stored, config, finetuning_started=started):
            raise ValueError(
                f"The checkpoint in {out_path} was written with a different configuration; "
                "resume with the same preset and options (only epochs, eval_every, "
                "num_importance_samples, finetune_epochs and max_consecutive_skips may change, and the other "
                "fine-tuning settings until fine-tuning starts), or use --overwrite."
            )
        if ckpt["epoch"] > tc.epochs and stored.train.epochs != tc.epochs:
            raise ValueError(
                f"The run in {out_path} is fine-tuning after {stored.train.epochs} training epochs; "
                f"resume it with --epochs {stored.train.epochs}."
            )
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
        step.load_state_dict(ckpt["optimizer"])
        by_rank = ckpt.get("rng_by_rank") or [ckpt["rng"]]
        if len(by_rank) == ctx.world_size:
            _set_rng_state(by_rank[ctx.rank])
        elif ctx.rank == 0:
            _set_rng_state(ckpt["rng"])
            logger.warning("The checkpoint was written by %d processes, not %d: the random streams of ranks > 0 restart.", len(by_rank), ctx.world_size)
        start_epoch = ckpt["epoch"]
        metrics = _read_metrics(out_path / METRICS_NAME, start_epoch)
        if ctx.is_main:
            (out_path / METRICS_NAME).write_text("".join(json.dumps(m) + "\n" for m in metrics))
        logger.info("Resuming %s from epoch %d.", out_path, start_epoch)
    if out_path is not None and ctx.is_main:
        _write_json_atomic(out_path / CONFIG_NAME, config.to_dict())

    n = len(data.train)
    train_seconds = sum(m["seconds"] for m in metrics)
    total_epochs = tc.epochs + tc.finetune_epochs
    consecutive_skips = ckpt.get("consecutive_skips", 0) if resume else 0
    partial = ckpt.get("partial") if resume else None

    def checkpoint(epochs_done: int, partial_state: dict[str, Any] | None = None) -> None:
        assert out_path is not None
        rng_by_rank = gather_objects(_rng_state(), ctx)  # every process takes part
        if ctx.is_main:
            save_checkpoint(
                out_path,
                {
                    "config": config.to_dict(),
                    "epoch": epochs_done,
                    "partial": partial_state,
                    "consecutive_skips": consecutive_skips,
                    "model": model.state_dict(),
                    "guide": guide.state_dict(),
                    "optimizer": step.state_dict(),
                    "rng": rng_by_rank[0],
                    "rng_by_rank": rng_by_rank,
                    "world_size": ctx.world_size,
                },
            )
        ctx.barrier()

    with _stop_on_signals() as stop:
        for epoch in range(start_epoch, total_epochs):
            t0 = time.perf_counter()
            finetuning = epoch >= tc.epochs
            if finetuning:
                # Paper §3: β = 1, the importance-weighted bound with more samples, and a
                # learning rate multiplied by 0.75 every 200 epochs.
                if not isinstance(step.elbo, ImportanceWeightedLoss):
                    step.use_objective(
                        ImportanceWeightedLoss(mc_samples=tc.finetune_mc_samples, iw_samples=tc.finetune_iw_samples)
                    )
                beta = 1.0
            else:
                beta = warmup_beta(epoch, tc.warmup_epochs)
            learning_rate = finetune_learning_rate(config, epoch)
            step.set_learning_rate(learning_rate)
            beta_t = torch.tensor(beta, device=device)
            model.train()
            guide.train()
            x_epoch, batches = epoch_batches(data, config, epoch, world_size=ctx.world_size)
            # Running sums of the epoch; a run interrupted by a signal inside this epoch
            # stored them with the number of steps it had taken.
            first, loss_sum, seen, skipped, seconds_before = 0, torch.zeros((), device=device), 0, 0, 0.0
            if partial is not None:
                first, skipped, seconds_before = partial["step"], partial["skipped"], partial["seconds"]
                if len(partial["seen"]) == ctx.world_size:
                    seen, part_loss = partial["seen"][ctx.rank], partial["loss_sum"][ctx.rank]
                else:  # another number of processes: rank 0 carries the epoch's running sums
                    seen = sum(partial["seen"]) if ctx.is_main else 0
                    part_loss = sum(partial["loss_sum"]) if ctx.is_main else 0.0
                loss_sum += part_loss
                partial = None
                logger.info("Continuing epoch %d at step %d of %d.", epoch + 1, first + 1, len(batches))
            bar = tqdm(
                range(first, len(batches)),
                disable=not progress,
                leave=False,
                desc=f"epoch {epoch + 1}/{total_epochs}",
                initial=first,
                total=len(batches),
            )
            for i in bar:
                idx = shard(batches[i], ctx)
                loss = step(x_epoch[idx], beta_t)
                if step.skipped:
                    skipped += 1
                    consecutive_skips += 1
                    logger.warning(
                        "Skipped step %d of epoch %d: non-finite loss or gradient (%d in a row).",
                        i + 1,
                        epoch + 1,
                        consecutive_skips,
                    )
                    if consecutive_skips >= tc.max_consecutive_skips:
                        kept = (
                            f"; the checkpoint of epoch {epoch} in {out_path} is intact"
                            if out_path is not None and epoch > 0
                            else ""
                        )
                        raise FloatingPointError(
                            f"{consecutive_skips} consecutive training steps had a non-finite loss or gradient "
                            f"(epoch {epoch + 1}){kept}; lower learning_rate or check the data and the configuration."
                        )
                else:
                    consecutive_skips = 0
                    loss_sum += loss
                    seen += len(idx)
                if progress and i % 25 == 0 and seen:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.2f}", beta=f"{beta:.3f}", refresh=False)
                if ctx.enabled:  # stop together: a signal may reach one process only
                    stop.signal = _agree_on_signal(stop.signal, ctx, device)
                if stop.signal is not None and i + 1 < len(batches):
                    # Finish here: this step is done; save the position inside the epoch.
                    if out_path is not None:
                        sums = gather_objects((loss_sum.item(), seen), ctx)  # each process's part
                        checkpoint(
                            epoch,
                            {
                                "step": i + 1,
                                "loss_sum": [a for a, _ in sums],
                                "seen": [b for _, b in sums],
                                "skipped": skipped,
                                "seconds": seconds_before + time.perf_counter() - t0,
                            },
                        )
                    raise TrainingInterrupted(stop.signal, out_path, epoch, i + 1, len(batches))
            seconds = seconds_before + time.perf_counter() - t0
            train_seconds += seconds
            total_loss, total_seen = all_reduce_sum([loss_sum.item(), seen], ctx, device)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "beta": beta,
                # The β-weighted objective of eq. 20, running mean over the epoch's steps;
                # it equals the running train ELBO once β = 1. While fine-tuning it is the
                # importance-weighted bound being maximized.
                "train_objective": -total_loss / total_seen + discrete_offset(config),
                "seconds": seconds,
                "skipped_steps": skipped,
            }
            if finetuning:
                record["phase"] = "finetune"
                record["learning_rate"] = learning_rate
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == total_epochs:
                # The true ELBO (β = 1, batch norm in eval mode) on as many training
                # examples of this epoch's binarization as the test set has, and on the test set.
                # Its random draws do not advance the training stream, so that the training
                # trajectory does not depend on when evaluations happen (a run stopped early and
                # resumed evaluates at its first stop, an uninterrupted one does not).
                training_rng = _rng_state()
                train_part = x_epoch[: len(data.test)]
                eval_seed = epoch_seed(tc.seed, epoch)
                ev_train = evaluate(
                    model, guide, train_part, num_samples=tc.eval_particles, memory_budget=memory_budget, seed=eval_seed
                )
                ev = evaluate(
                    model, guide, data.test, num_samples=tc.eval_particles, memory_budget=memory_budget, seed=eval_seed
                )
                record["train_elbo"] = ev_train["elbo"] + discrete_offset(config)
                record["test_elbo"] = ev["elbo"] + discrete_offset(config)
                record["test_kl_per_layer"] = ev["kl_per_layer"]
                if config.model.family != "vqvae":  # per-unit KL needs Gaussian latents
                    record["test_kl_per_unit"] = [
                        k.tolist() for k in kl_per_unit(model, guide, data.test, num_samples=tc.eval_particles)
                    ]
                _set_rng_state(training_rng)
            metrics.append(record)
            logger.info(
                "epoch %d/%d  beta %.3f  train objective %.3f  %s%s%.1fs",
                epoch + 1,
                total_epochs,
                beta,
                record["train_objective"],
                f"test ELBO {record['test_elbo']:.3f}  " if "test_elbo" in record else "",
                f"skipped steps {skipped}  " if skipped else "",
                seconds,
            )
            if out_path is not None:
                if ctx.is_main:
                    with open(out_path / METRICS_NAME, "a") as f:
                        f.write(json.dumps(record) + "\n")
                checkpoint(epoch + 1)
            if stop.signal is not None and epoch + 1 < total_epochs:
                raise TrainingInterrupted(stop.signal, out_path, epoch + 1, 0, 0)

    result = TrainResult(model=model, guide=guide, config=config, data=data, metrics=metrics)
    if final_evaluation:
        final_test = data.test[:final_eval_subset] if final_eval_subset else data.test
        result.results = final_results(
            model,
            guide,
            # results.json records the subset that was evaluated
            config.replace(test_subset=len(final_test)) if final_eval_subset else config,
            final_test,
            epochs=len(metrics),
            num_samples=tc.num_importance_samples,
            train_seconds=train_seconds,
            memory_budget=memory_budget,
            progress=progress,
        )
        if out_path is not None and ctx.is_main:
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
        the library versions and the date; for Gaussian latents also
        ``test_kl_per_unit`` (one list per layer) and ``test_active_units`` (count per
        layer, :func:`~pyro_lvae.analysis.latents.active_units`).
    """
    t0 = time.perf_counter()
    ev = evaluate(
        model, guide, test, num_samples=num_samples, memory_budget=memory_budget, progress=progress, seed=config.train.seed
    )
    device = next(model.parameters()).device
    extra: dict[str, Any] = {}
    if config.model.family == "vqvae":
        extra["vq"] = vq_statistics(model, guide, test)
    else:
        # The paper's Figs. 4-5: KL per unit and active units (Cov_x E_q[u] > 0.01) per layer.
        extra["test_kl_per_unit"] = [k.tolist() for k in kl_per_unit(model, guide, test)]
        extra["test_active_units"] = [int(c) for c in active_units(model, guide, test)["counts"]]
    offset = discrete_offset(config)
    if config.train.dequantize:
        # Bounds on the 8-bit images: the dequantized density's, minus D log 256 (see data.dequantize).
        extra["dequantized"] = True
        extra["test_bits_per_dim"] = -(ev["log_likelihood"] + offset) / (config.model.input_dim * math.log(2))
    return extra | {
        "test_elbo": ev["elbo"] + offset,
        "test_log_likelihood": ev["log_likelihood"] + offset,
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
    test_subset: int | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run's test ELBO and L_K and write ``results.json`` into it.

    :param num_samples: K (default: the run's ``num_importance_samples``).
    :param test_subset: Evaluate the first this many test examples only (default: the
        run's ``test_subset``, usually all of them).
    """
    ctx = init_from_environment(torch.device(device))
    device = local_device(torch.device(device), ctx)
    model, guide, config, ckpt = load_run(run_dir, device=device)
    if num_samples is not None:
        config = config.replace(num_importance_samples=num_samples)
    if test_subset is not None:
        config = config.replace(test_subset=test_subset)
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
    if ctx.is_main:
        _write_json_atomic(Path(run_dir) / RESULTS_NAME, results)
    return results
