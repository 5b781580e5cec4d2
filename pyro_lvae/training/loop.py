"""Training by stochastic variational inference (either step engine), with KL warm-up,
per-epoch metrics and checkpoints.

:func:`train` runs a whole experiment from an :class:`~pyro_lvae.config.ExperimentConfig`:

1. load the data and move it to the device once (the training set as grey levels
   when it is binarized dynamically, the test set binarized once with the run's
   seed);
2. build the model, the guide named by the config and the ELBO valid for that
   guide (:func:`~pyro_lvae.inference.objectives.elbo_for`), and the training step of the
   configured engine (:class:`~pyro_lvae.training.steps.TrainingStep`);
3. for every epoch: draw a fresh binarization x ~ Bernoulli(grey) (paper §3)
   and an index permutation from a generator seeded by (seed, epoch)
   (:func:`~pyro_lvae.training.batches.epoch_batches`), and take one step per minibatch with the warm-up weight
   β of that epoch (:func:`~pyro_lvae.inference.warmup.warmup_beta`) as a tensor. A step
   whose loss or gradients are not finite is skipped and counted
   (``max_consecutive_skips`` in a row stop the run);
4. append one JSON line per epoch to ``metrics.jsonl`` and write an atomic
   checkpoint (:mod:`pyro_lvae.training.checkpoint`). Every line has ``epoch``, ``beta``,
   ``seconds``, ``train_objective`` (the β-weighted bound of eq. 20, running
   mean over the epoch's steps, which is the running train ELBO once β = 1) and the
   skipped steps (``skipped_steps``, and ``skipped_by_cause``: ``non_finite``, ``threshold``);
   every ``eval_every`` epochs (and the last) it also has ``train_elbo`` (the
   ELBO on as many training examples of the epoch as the evaluation set has),
   ``test_elbo``, ``test_kl_per_layer`` and ``test_kl_per_unit`` (one list per
   layer, see :func:`~pyro_lvae.analysis.latents.kl_per_unit`), all in nats per example,
   or ``valid_…`` instead of ``test_…`` when ``valid_size`` holds out a validation set.
   With ``ema`` every evaluation uses the moving average of the weights
   (:mod:`pyro_lvae.training.ema`) and says ``"weights": "ema"``;
5. with ``finetune_epochs`` > 0, continue for that many epochs on the
   importance-weighted bound with an annealed learning rate (paper §3; see
   :func:`~pyro_lvae.training.schedule.finetune_learning_rate` and
   :func:`~pyro_lvae.inference.objectives.importance_weighted_loss`);
6. finally evaluate the test ELBO and L_K and write ``results.json``
   (:class:`~pyro_lvae.training.results_file.RunResults`).

``resume=True`` restores parameters, batch-norm statistics, optimizer and RNG
state from the checkpoint and continues with the next epoch, so a resumed run
gives the same parameters as an uninterrupted one. SIGINT and SIGTERM stop the run
after the current step with a checkpoint of the position inside the epoch, which
``resume=True`` continues from (:class:`~pyro_lvae.training.signals.TrainingInterrupted`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..analysis.latents import kl_per_unit
from ..config import ExperimentConfig, is_count
from ..data import Dataset
from ..inference.evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from ..inference.objectives import ImportanceWeightedLoss
from ..models.families import make_guide, make_model
from ..rng import preserved_rng, rng_state, set_rng_state
from .batches import PreparedData, epoch_batches, epoch_seed, prepare_data
from .distributed import (
    DistributedContext,
    all_reduce_sum,
    broadcast_from_main,
    gather_objects,
    init_from_environment,
    local_device,
    shard,
)
from .ema import ExponentialMovingAverage
from .results import discrete_offset, final_results
from .results_file import RunResults
from .resume import changed_fields, check_resume
from .run_dir import RunDirectory
from .schedule import EpochPlan, epoch_plan, is_evaluation_epoch, warn_about_schedule
from .signals import StopRequest, TrainingInterrupted, agree_on_signal, stop_on_signals
from .skipping import SKIP_CAUSES, TooManySkippedSteps
from .steps import make_step, model_buffers
from .tensorboard import TensorBoardLog, require_tensorboard

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    :param model: The trained generative model (with ``ema``, its moving average of the weights,
        which the evaluations used; the raw weights stay in the checkpoint).
    :param guide: The trained guide (the same).
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
    results: RunResults | None = None


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
    tensorboard: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the model and guide of ``config`` by SVI with KL warm-up.

    Clears Pyro's param store and seeds every RNG with ``config.train.seed``.

    :param config: The experiment.
    :param out_dir: Run directory (config, metrics, checkpoints, results); ``None``: in memory only.
    :param dataset: Train on this :class:`~pyro_lvae.data.Dataset` instead of ``config.train.dataset``.
    :param data_root: Data root (default ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Allow torchvision to download missing MNIST files.
    :param device: ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
    :param resume: Continue the run in ``out_dir`` from its checkpoint.
    :param overwrite: Replace an existing run in ``out_dir``.
    :param final_evaluation: Evaluate test ELBO and L_K (K = ``num_importance_samples``) at the end.
    :param final_eval_subset: Evaluate only the first this many test examples (0 = all; L_5000 on
        10,000 MNIST images takes about 17–22 minutes on two CPU cores, docs/performance.md).
    :param memory_budget: Bytes per particle chunk in the L_K evaluation.
    :param progress: Show tqdm progress bars.
    :param tensorboard: Also write TensorBoard events into this folder
        (:mod:`pyro_lvae.training.tensorboard`; needs the ``tensorboard`` package).
    """
    _check_arguments(
        config,
        out_dir=out_dir,
        resume=resume,
        final_eval_subset=final_eval_subset,
        board=tensorboard,
        memory_budget=memory_budget,
    )
    warn_about_schedule(config)
    ctx, device = _start_processes(config, device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.train.seed)
    data = prepare_data(config, dataset=dataset, data_root=data_root, download=download, device=device)
    # After the data's checks: --overwrite must not clear a run for a command that cannot start.
    run_dir = _open_run_dir(out_dir, resume=resume, overwrite=overwrite, ctx=ctx)
    trainer = _Trainer(config, data, ctx, run_dir, memory_budget=memory_budget, progress=progress)
    trainer.start(resume=resume)

    with stop_on_signals() as stop, contextlib.closing(trainer.open_board(tensorboard)):
        for epoch in range(trainer.epochs_done, trainer.total_epochs):
            record, x_epoch = trainer.run_epoch(epoch, epoch_plan(config, epoch), stop)
            if is_evaluation_epoch(config, epoch):
                record |= trainer.evaluate_or_keep_the_epoch(epoch, x_epoch, record)
            trainer.end_epoch(record)
            if trainer.agreed_stop(stop) is not None:  # after the last epoch too: --resume evaluates
                raise TrainingInterrupted(stop.signal, run_dir and run_dir.path, epoch + 1, 0, 0)

    trainer.keep_final_weights()
    results = trainer.final_results(final_eval_subset) if final_evaluation else None
    return TrainResult(trainer.model, trainer.guide, config, data, metrics=trainer.metrics, results=results)


def _open_run_dir(
    out_dir: str | os.PathLike | None, *, resume: bool, overwrite: bool, ctx: DistributedContext
) -> RunDirectory | None:
    """The checked run directory (``None`` without ``out_dir``); every process waits for rank 0 to set it up."""
    if out_dir is None:
        return None
    run_dir = RunDirectory.prepare(out_dir, resume=resume, overwrite=overwrite, writer=ctx.is_main)
    ctx.barrier()
    return run_dir


def _check_arguments(
    config: ExperimentConfig,
    *,
    out_dir: str | os.PathLike | None,
    resume: bool,
    final_eval_subset: int,
    board: str | os.PathLike | None,
    memory_budget: Any,
) -> None:
    """Refuse bad arguments of :func:`train` before anything starts."""
    if board is not None:
        require_tensorboard()
    if not isinstance(config, ExperimentConfig):
        raise ValueError(f"config must be an ExperimentConfig, got {type(config).__name__}.")
    if not is_count(final_eval_subset, least=0):
        raise ValueError(f"final_eval_subset must be a non-negative integer (0 = all), got {final_eval_subset!r}.")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir, the run directory to continue.")
    budget_is_number = isinstance(memory_budget, (int, float)) and not isinstance(memory_budget, bool)
    if not budget_is_number or not 1 <= memory_budget < math.inf:
        raise ValueError(f"memory_budget must be a positive, finite number of bytes, got {memory_budget!r}.")


def _start_processes(config: ExperimentConfig, device: str | torch.device) -> tuple[DistributedContext, torch.device]:
    """The distributed context (one process unless launched by torchrun) and this process's device."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device torch knows; use cpu or cuda (or cuda:N).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu.")
    if config.train.engine == "cuda-graph" and device.type != "cuda":
        raise ValueError(f"engine 'cuda-graph' needs a CUDA device, not {device}; use --engine fast on the CPU.")
    ctx = init_from_environment(device)
    if config.train.engine == "cuda-graph" and ctx.enabled:
        raise ValueError("engine 'cuda-graph' runs in one process; use --engine fast for data-parallel training.")
    if config.train.compile and ctx.enabled:  # before --overwrite clears anything
        raise ValueError("compile runs in one process (not data-parallel); drop --compile for data-parallel training.")
    if ctx.enabled and config.train.batch_size < ctx.world_size:
        raise ValueError(
            f"batch_size {config.train.batch_size} is the global minibatch and cannot be split over "
            f"{ctx.world_size} processes; raise batch_size or use fewer processes."
        )
    return ctx, local_device(device, ctx)


@dataclass
class _EpochSums:
    """The running sums of an epoch; a checkpoint written inside the epoch stores them."""

    loss: torch.Tensor
    first_step: int = 0
    seen: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_CAUSES, 0))
    seconds_before: float = 0.0


class _Trainer:
    """The state of a training run and the steps of its loop (see :func:`train`)."""

    def __init__(
        self,
        config: ExperimentConfig,
        data: PreparedData,
        ctx: DistributedContext,
        run_dir: RunDirectory | None,
        *,
        memory_budget: int,
        progress: bool,
    ) -> None:
        tc = config.train
        self.config, self.data, self.ctx, self.run_dir = config, data, ctx, run_dir
        self.memory_budget, self.progress = memory_budget, progress
        self.board = TensorBoardLog(None)
        self.device = data.train.device
        self.model = make_model(config.model).to(self.device)
        self.guide = make_guide(self.model).to(self.device)
        self.step = make_step(
            self.model,
            self.guide,
            engine=tc.engine,
            learning_rate=tc.learning_rate,
            distributed=ctx,
            adam_eps=tc.adam_eps,
            grad_clip=tc.grad_clip,
            grad_clip_value=tc.grad_clip_value,
            free_bits=tc.free_bits,
            free_bits_mode=tc.free_bits_mode,
            skip_threshold=tc.skip_threshold,
            precision=tc.precision,
            compile=tc.compile,
        )
        if tc.compile:
            logger.info("compile: the first step compiles the loss with torch.compile (about a minute on a CPU).")
        #: The moving average of the weights (``ema`` > 0), what every evaluation uses.
        self.ema = ExponentialMovingAverage(self.model, self.guide, decay=tc.ema) if tc.ema else None
        if ctx.rank > 0:
            # Independent draws on every process (rank 0 keeps the single-process stream);
            # the parameters are equal everywhere, DDP broadcast them from rank 0.
            pyro.set_rng_seed(tc.seed + 1_000_003 * ctx.rank)
        self.total_epochs = tc.epochs + tc.finetune_epochs
        self.epochs_done = 0
        self.metrics: list[dict[str, Any]] = []
        self.consecutive_skips = 0
        self.partial: dict[str, Any] | None = None

    def open_board(self, log_dir: str | os.PathLike | None) -> TensorBoardLog:
        """Write TensorBoard events into ``log_dir`` from now on (the main process only).

        :param log_dir: The folder of the event files, or ``None``.
        """
        self.board = TensorBoardLog(log_dir if self.ctx.is_main else None)
        return self.board

    # -- resume and checkpoints ---------------------------------------------------------

    def start(self, *, resume: bool) -> None:
        """Restore the checkpoint when resuming, then write the run's ``config.json``.

        :param resume: Continue from the run directory's checkpoint.
        """
        if resume:
            self.restore()
        if self.run_dir is not None:
            self.run_dir.write_config(self.config)

    def restore(self) -> None:
        """Continue from the run directory's checkpoint: parameters, batch-norm statistics,
        optimizer, RNG streams, skip count, metrics and the position inside an epoch."""
        assert self.run_dir is not None
        ckpt = self.run_dir.load_checkpoint()
        stored = ExperimentConfig.from_dict(ckpt["config"])
        check_resume(stored, self.config, epochs_done=ckpt["epoch"], run_dir=self.run_dir.path)
        for change in changed_fields(stored, self.config):
            logger.warning("Resuming with a changed setting: %s.", change)
        if ckpt.get("device_type", self.device.type) != self.device.type:  # absent in older checkpoints
            logger.warning(
                "The run was trained on %s and continues on %s: its random draws differ from there on, so it will "
                "not repeat the uninterrupted run exactly (pass --device %s to continue where it ran).",
                ckpt["device_type"],
                self.device.type,
                ckpt["device_type"],
            )
        self.model.load_state_dict(ckpt["model"])
        self.guide.load_state_dict(ckpt["guide"])
        self.step.load_state_dict(ckpt["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        by_rank = ckpt.get("rng_by_rank") or [ckpt["rng"]]
        if len(by_rank) == self.ctx.world_size:
            set_rng_state(by_rank[self.ctx.rank])
        elif self.ctx.rank == 0:
            set_rng_state(ckpt["rng"])
            logger.warning(
                "The checkpoint was written by %d processes, not %d: the random streams of ranks > 0 restart.",
                len(by_rank),
                self.ctx.world_size,
            )
        self.epochs_done = ckpt["epoch"]
        self.metrics = self.run_dir.metrics(self.epochs_done)
        self.ctx.barrier()  # every process has read the file before rank 0 rewrites it
        self.run_dir.rewrite_metrics(self.metrics)
        self.consecutive_skips = ckpt.get("consecutive_skips", 0)
        self.partial = ckpt.get("partial")
        logger.info("Resuming %s from epoch %d.", self.run_dir.path, self.epochs_done)

    def checkpoint(self, epochs_done: int, partial: dict[str, Any] | None = None) -> None:
        """Write the checkpoint (every process takes part: it gathers the RNG states).

        :param epochs_done: Completed epochs.
        :param partial: The position and running sums inside the next epoch, if stopped in it.
        """
        assert self.run_dir is not None
        rng_by_rank = gather_objects(rng_state(), self.ctx)
        self.run_dir.save_checkpoint(
            {
                "config": self.config.to_dict(),
                "epoch": epochs_done,
                "partial": partial,
                "consecutive_skips": self.consecutive_skips,
                "model": self.model.state_dict(),
                "guide": self.guide.state_dict(),
                "optimizer": self.step.state_dict(),
                "rng": rng_by_rank[0],
                "rng_by_rank": rng_by_rank,
                "world_size": self.ctx.world_size,
                "device_type": self.device.type,
                "ema": self.ema.state_dict() if self.ema is not None else None,
            }
        )
        self.ctx.barrier()

    # -- one epoch ----------------------------------------------------------------------

    def agreed_stop(self, stop: StopRequest) -> int | None:
        """The signal every process stops on, if any process received one (a signal may reach one
        process only). The request is only ever set here, never cleared: a signal whose handler
        runs while the processes agree (it is deferred until the collective returns) is kept for
        the next agreement instead of being overwritten by that agreement's "no"."""
        if self.ctx.enabled:
            agreed = agree_on_signal(stop.signal, self.ctx, self.device)
            if agreed is not None:
                stop.signal = agreed
            return agreed
        return stop.signal

    def run_epoch(self, epoch: int, plan: EpochPlan, stop: StopRequest) -> tuple[dict[str, Any], torch.Tensor]:
        """Take one step per minibatch of 0-based ``epoch``; return its metric line and data."""
        t0 = time.perf_counter()
        self._begin_epoch(plan)
        x_epoch, batches = epoch_batches(self.data, self.config, epoch, world_size=self.ctx.world_size)
        sums = self._epoch_sums(epoch, len(batches))
        beta = torch.tensor(plan.beta, device=self.device)
        bar = tqdm(
            range(sums.first_step, len(batches)),
            disable=not self.progress,
            leave=False,
            desc=f"epoch {epoch + 1}/{self.total_epochs}",
            initial=sums.first_step,
            total=len(batches),
        )
        # Warnings (a skipped step) print above the bar instead of breaking it; the bar closes on any exit.
        with bar, logging_redirect_tqdm() if self.progress else contextlib.nullcontext():
            for i in bar:
                idx = shard(batches[i], self.ctx)
                self._take_step(x_epoch[idx], beta, sums, epoch=epoch, step=i)
                if self.progress and i % 25 == 0 and sums.seen:
                    bar.set_postfix(loss=f"{sums.loss.item() / sums.seen:.2f}", beta=f"{plan.beta:.3f}", refresh=False)
                if self.agreed_stop(stop) is not None and i + 1 < len(batches):
                    self._stop_inside_epoch(stop.signal, epoch, i + 1, len(batches), sums, time.perf_counter() - t0)
        return self._epoch_record(epoch, plan, sums, sums.seconds_before + time.perf_counter() - t0), x_epoch

    def _epoch_record(self, epoch: int, plan: EpochPlan, sums: _EpochSums, seconds: float) -> dict[str, Any]:
        """The metric line of an epoch's training: objective, time, skipped steps by cause."""
        total_loss, total_seen = all_reduce_sum([sums.loss.item(), sums.seen], self.ctx, self.device)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "beta": plan.beta,
            # The β-weighted objective of eq. 20, running mean over the epoch's steps;
            # it equals the running train ELBO once β = 1. While fine-tuning it is the
            # importance-weighted bound being maximized. None when every step was skipped.
            "train_objective": -total_loss / total_seen + discrete_offset(self.config) if total_seen else None,
            "seconds": seconds,
            "skipped_steps": sum(sums.skipped.values()),
            "skipped_by_cause": dict(sums.skipped),
        }
        if self.config.train.skip_threshold == "auto":  # null until enough norms were seen
            threshold = self.step.skip_rule.current_threshold()
            record["skip_threshold"] = threshold if math.isfinite(threshold) else None
        if plan.finetuning:
            record |= {"phase": "finetune", "learning_rate": plan.learning_rate}
        return record

    def _begin_epoch(self, plan: EpochPlan) -> None:
        tc = self.config.train
        if plan.finetuning and not isinstance(self.step.elbo, ImportanceWeightedLoss):
            # Paper §3: fine-tuning maximizes the importance-weighted bound at β = 1.
            self.step.use_objective(
                ImportanceWeightedLoss(mc_samples=tc.finetune_mc_samples, iw_samples=tc.finetune_iw_samples)
            )
        self.step.set_learning_rate(plan.learning_rate)
        self.model.train()
        self.guide.train()

    def _epoch_sums(self, epoch: int, steps: int) -> _EpochSums:
        """Fresh running sums, or those of a checkpoint written inside this epoch."""
        sums = _EpochSums(loss=torch.zeros((), device=self.device))
        partial, self.partial = self.partial, None
        if partial is None:
            return sums
        sums.first_step, sums.seconds_before = partial["step"], partial["seconds"]
        # Checkpoints written before skips had causes hold one count, of non-finite steps.
        by_cause = partial["skipped"] if isinstance(partial["skipped"], dict) else {"non_finite": partial["skipped"]}
        sums.skipped.update(by_cause)
        if len(partial["seen"]) == self.ctx.world_size:
            sums.seen, loss = partial["seen"][self.ctx.rank], partial["loss_sum"][self.ctx.rank]
        else:  # another number of processes: rank 0 carries the epoch's running sums
            sums.seen = sum(partial["seen"]) if self.ctx.is_main else 0
            loss = sum(partial["loss_sum"]) if self.ctx.is_main else 0.0
        sums.loss += loss
        logger.info("Continuing epoch %d at step %d of %d.", epoch + 1, sums.first_step + 1, steps)
        return sums

    def _take_step(self, x: torch.Tensor, beta: torch.Tensor, sums: _EpochSums, *, epoch: int, step: int) -> None:
        """One update (then the moving average follows); a skipped one is counted by cause,
        and too many in a row stop the run."""
        loss = self.step(x, beta)
        if not self.step.skipped:
            self.consecutive_skips = 0
            sums.loss += loss
            sums.seen += len(x)
            if self.ema is not None:
                self.ema.update()
            return
        sums.skipped[self.step.skip_cause] += 1
        self.consecutive_skips += 1
        logger.warning(
            "Skipped step %d of epoch %d: %s (%d in a row).",
            step + 1,
            epoch + 1,
            self._skip_reason(),
            self.consecutive_skips,
        )
        if self.consecutive_skips >= self.config.train.max_consecutive_skips:
            self._give_up(epoch)

    def _skip_reason(self) -> str:
        if self.step.skip_cause == "threshold":
            return (
                f"gradient norm {self.step.grad_norm:.4g} above the threshold {self.step.skip_rule.last_threshold:.4g}"
            )
        return "non-finite loss or gradient"

    def _give_up(self, epoch: int) -> None:
        """Stop the run after ``max_consecutive_skips`` skipped steps, naming the cause and the fix."""
        kept = (
            f"; the checkpoint of epoch {epoch} in {self.run_dir.path} is intact" if self.run_dir and epoch > 0 else ""
        )
        if self.step.skip_cause == "threshold":
            raise TooManySkippedSteps(
                f"{self.consecutive_skips} consecutive training steps were skipped because their gradient norm "
                f"exceeded skip_threshold={self.config.train.skip_threshold} (epoch {epoch + 1}){kept}; raise the "
                "threshold or use --skip-threshold auto, which follows the norms."
            )
        raise FloatingPointError(
            f"{self.consecutive_skips} consecutive training steps had a non-finite loss or gradient "
            f"(epoch {epoch + 1}){kept}; check the data and the configuration, or start again with "
            "--overwrite and a lower learning_rate (a resumed run keeps its learning rate)."
        )

    def _stop_inside_epoch(
        self, signum: int, epoch: int, done: int, steps: int, sums: _EpochSums, seconds: float
    ) -> None:
        """Save the position inside the epoch (this step is done) and raise
        :class:`~pyro_lvae.training.signals.TrainingInterrupted`."""
        if self.run_dir is not None:
            parts = gather_objects((sums.loss.item(), sums.seen), self.ctx)  # each process's part
            partial = {
                "step": done,
                "loss_sum": [loss for loss, _ in parts],
                "seen": [seen for _, seen in parts],
                "skipped": dict(sums.skipped),
                "seconds": sums.seconds_before + seconds,
            }
            self.checkpoint(epoch, partial)
        raise TrainingInterrupted(signum, self.run_dir and self.run_dir.path, epoch, done, steps)

    # -- evaluation and the end of an epoch ---------------------------------------------

    def share_main_weights(self) -> None:
        """Give every process rank 0's batch-norm statistics and moving average (nothing to do
        in one process). Each process updated its statistics from its own share of the last
        batch, and DDP hands them rank 0's again only at the next forward pass."""
        broadcast_from_main(model_buffers(self.model, self.guide), self.ctx)
        if self.ema is not None:
            self.ema.broadcast_from_main(self.ctx)

    def keep_final_weights(self) -> None:
        """After the last epoch: rank 0's statistics on every process, and the moving average
        as the live weights when there is one (what is evaluated and returned; the checkpoint
        keeps both)."""
        self.share_main_weights()
        if self.ema is not None:
            self.ema.copy_to_live()

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """The weights every evaluation uses, rank 0's on every process: the moving average
        when there is one, else the live weights."""
        self.share_main_weights()
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self, epoch: int, x_epoch: torch.Tensor) -> dict[str, Any]:
        """The periodic evaluation: the true ELBO (β = 1, batch norm in eval mode) on as many
        training examples of this epoch's data as the evaluation set has, and on that set,
        the validation set when one is held out (keys ``valid_…``), else the test set
        (keys ``test_…``).

        Its random draws do not advance the training stream, so that the training
        trajectory does not depend on when evaluations happen (a run stopped early and
        resumed evaluates at its first stop, an uninterrupted one does not).
        """
        tc, offset = self.config.train, discrete_offset(self.config)
        split, held_out = self.data.evaluation_set
        options = {
            "num_samples": tc.eval_particles,
            "memory_budget": self.memory_budget,
            "seed": epoch_seed(tc.seed, epoch),
        }
        with preserved_rng(), self.evaluation_weights():
            on_train = evaluate(self.model, self.guide, x_epoch[: len(held_out)], **options)
            on_held_out = evaluate(self.model, self.guide, held_out, **options)
            record = {
                "train_elbo": on_train["elbo"] + offset,
                f"{split}_elbo": on_held_out["elbo"] + offset,
                f"{split}_kl_per_layer": on_held_out["kl_per_layer"],
            }
            if self.model.gaussian_latents:
                per_unit = kl_per_unit(self.model, self.guide, held_out, num_samples=tc.eval_particles)
                record[f"{split}_kl_per_unit"] = [k.tolist() for k in per_unit]
            if self.ema is not None:
                record["weights"] = "ema"
            self._log_images(epoch, held_out)
        return record

    def _log_images(self, epoch: int, x: torch.Tensor) -> None:
        side = self.config.model.image_side
        if self.board.writer is not None and side * side == self.config.model.input_dim:
            self.board.log_images(epoch + 1, self.model, self.guide, x, side)

    def evaluate_or_keep_the_epoch(self, epoch: int, x_epoch: torch.Tensor, record: dict[str, Any]) -> dict[str, Any]:
        """:meth:`evaluate`; if it fails, the trained epoch is checkpointed without it first.

        :param epoch: The epoch just trained (0-based).
        :param x_epoch: Its binarized training data.
        :param record: Its metrics so far.
        """
        try:
            return self.evaluate(epoch, x_epoch)
        except Exception:
            logger.error("The evaluation after epoch %d failed; the epoch is checkpointed without it.", epoch + 1)
            self.end_epoch(record)
            raise

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Keep, log and write the epoch's metric line, then checkpoint.

        :param record: The epoch's metrics.
        """
        self.metrics.append(record)
        held_out = [
            f"{split} ELBO {record[f'{split}_elbo']:.3f}  " for split in ("valid", "test") if f"{split}_elbo" in record
        ]
        logger.info(
            "epoch %d/%d  beta %.3f  train objective %s  %s%s%.1fs",
            record["epoch"],
            self.total_epochs,
            record["beta"],
            "n/a" if record["train_objective"] is None else f"{record['train_objective']:.3f}",
            "".join(held_out),
            f"skipped steps {record['skipped_by_cause']}  " if record["skipped_steps"] else "",
            record["seconds"],
        )
        if self.run_dir is not None:
            self.run_dir.append_metrics(record)
            self.checkpoint(record["epoch"])
        if self.ctx.is_main:  # after the checkpoint: a failing event file cannot cost the epoch
            self.board.log_epoch(record)

    def final_results(self, subset: int) -> RunResults:
        """The final evaluation, on the first ``subset`` test examples (0 = all), written as
        ``results.json`` in the run directory.

        :param subset: Test examples to evaluate.
        """
        test = self.data.test[:subset] if subset else self.data.test
        # results.json records the subset that was evaluated
        config = self.config.replace(test_subset=len(test)) if subset else self.config
        results = final_results(
            self.model,
            self.guide,
            config,
            test,
            epochs=len(self.metrics),
            num_samples=self.config.train.num_importance_samples,
            train_seconds=sum(m["seconds"] for m in self.metrics),
            memory_budget=self.memory_budget,
            progress=self.progress,
            weights="ema" if self.ema is not None else "raw",
        )
        if self.run_dir is not None:
            self.run_dir.write_results(results)
        return results
