"""TensorBoard event files of a training run (``--tensorboard DIR``), with the optional
``tensorboard`` package (``pip install 'pyro-lvae[tensorboard]'``).

Per epoch it writes the scalars of the epoch's ``metrics.jsonl`` line: β, the training
objective, the train, validation and test ELBO, the KL of every layer, the seconds and
the skipped steps; at every evaluation epoch also a grid of prior samples and one of
test images beside their reconstructions. The step of every entry is the epoch, so a
resumed run continues the same curves. Only the main process writes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: The metric-line entries written as scalars, under these tags.
SCALARS = {
    "beta": "schedule/beta",
    "learning_rate": "schedule/learning_rate",
    "train_objective": "elbo/train_objective",
    "train_elbo": "elbo/train",
    "valid_elbo": "elbo/valid",
    "test_elbo": "elbo/test",
    "seconds": "time/seconds_per_epoch",
    "skipped_steps": "steps/skipped",
    "skip_threshold": "steps/skip_threshold",
}


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``.

    :raises ValueError: if the ``tensorboard`` package is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the tensorboard package, which is not installed; "
            "run pip install 'pyro-lvae[tensorboard]' or leave out --tensorboard."
        ) from None
    return SummaryWriter


def open_summary_writer(log_dir: str | os.PathLike) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``.

    :param log_dir: The folder of the event files.
    :raises ValueError: if the ``tensorboard`` package is not installed.
    """
    return require_tensorboard()(log_dir=os.fspath(log_dir))


class TensorBoardLog:
    """Writes a run's metric lines and image grids as TensorBoard events.

    :param log_dir: The folder of the event files; ``None`` writes nothing.
    """

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.writer = None if log_dir is None else open_summary_writer(log_dir)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Write the scalars of one ``metrics.jsonl`` line.

        :param record: The line; its ``epoch`` is the step.
        """
        if self.writer is None:
            return
        epoch = record["epoch"]
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], epoch)
        for split in ("valid", "test"):
            for layer, kl in enumerate(record.get(f"{split}_kl_per_layer") or [], start=1):
                self.writer.add_scalar(f"kl_{split}/z{layer}", kl, epoch)
        self.writer.flush()

    @torch.no_grad()
    def log_images(self, epoch: int, model: nn.Module, guide: nn.Module, x: torch.Tensor, side: int) -> None:
        """Write 64 prior samples and up to 32 images of ``x`` beside their reconstructions.

        Batch norm is in evaluation mode for the grids, and the training mode is restored.

        :param epoch: The step of the images.
        :param model: The model.
        :param guide: Its guide.
        :param x: Images to reconstruct, ``(batch, side²)``.
        :param side: The images' side.
        """
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        modes = (model.training, guide.training)
        model.eval()
        guide.eval()
        try:
            samples = model.sample(64).reshape(-1, 1, side, side).clamp(0, 1)
            shown = x[:32]
            pairs = torch.stack([shown, model.reconstruct(shown, guide)], dim=1).reshape(-1, 1, side, side)
        finally:
            model.train(modes[0])
            guide.train(modes[1])
        self.writer.add_image("samples/prior", make_grid(samples.float().cpu(), nrow=8), epoch)
        self.writer.add_image("samples/reconstructions", make_grid(pairs.float().cpu().clamp(0, 1), nrow=8), epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
