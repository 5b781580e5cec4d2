"""SIGINT and SIGTERM as a request to stop after the current step, agreed by every process.

The trainer checks the request after every step; it then writes a checkpoint of the
position inside the epoch and raises :class:`TrainingInterrupted`, and ``resume=True``
continues from that step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for its exception; torch loads only for training
    import torch

    from .distributed import DistributedContext

logger = logging.getLogger(__name__)


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
class StopRequest:
    """The signal received, if any.

    :param signal: The signal number, ``None`` until one arrives.
    """

    signal: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a request to stop after the current step.

    Only the main thread can install signal handlers; elsewhere the request never fires.
    The previous handlers are restored on exit.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is None:
            logger.warning(
                "%s received: finishing the current step, then writing a checkpoint.", signal.Signals(signum).name
            )
        request.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def agree_on_signal(signum: int | None, ctx: DistributedContext, device: torch.device) -> int | None:
    """The signal to stop on if any process received one (every process must stop at the same step).

    :param signum: This process's signal, or ``None``.
    :param ctx: The distributed context.
    :param device: The device of the collective.
    """
    from .distributed import all_true

    if all_true(signum is None, ctx, device):
        return None
    return signum if signum is not None else signal.SIGTERM
