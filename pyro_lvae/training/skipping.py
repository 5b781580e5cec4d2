r"""Which updates are skipped: a non-finite loss or gradient always, an exploding gradient on request.

VDVAE (Child 2021) skips every update whose global gradient norm exceeds a fixed
threshold. A fixed threshold can end up above nothing: if the norms rise for good (a
larger β, a sharper posterior), every later step is skipped and training freezes
silently. :class:`SkipRule` offers that fixed threshold, and ``"auto"``, which follows
the norms::

    threshold_t = factor × quantile_q(‖g‖ of the last `window` steps)

Every finite norm enters the window, skipped or not, so after a permanent upward
shift of the norms the quantile follows within about ``(1 − q) × window + 1`` steps and
updates resume (``tests/training/test_skipping.py`` checks this). Until ``min_history``
norms have been seen, ``"auto"`` skips nothing. A fixed threshold that keeps skipping
is caught by ``max_consecutive_skips``, which stops the run with a message naming
the cause.

The rule holds the window as state, saved in the checkpoint, so that a resumed run
skips exactly the steps an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..config import check_skip_threshold

#: The causes of a skipped step, as ``metrics.jsonl`` counts them.
SKIP_CAUSES = ("non_finite", "threshold")


class TooManySkippedSteps(RuntimeError):
    """Training stopped because ``max_consecutive_skips`` steps in a row were skipped for their
    gradient norm (a non-finite loss or gradient raises :class:`FloatingPointError` instead)."""


class SkipRule:
    """Decide, from the loss and the global gradient norm, whether an update is skipped and why.

    :param threshold: ``0`` (skip only non-finite steps), a fixed gradient norm, or ``"auto"``.
    :param window: ``"auto"``: how many recent norms the quantile is taken over.
    :param quantile: ``"auto"``: which quantile q of them.
    :param factor: ``"auto"``: the threshold is this multiple of the quantile.
    :param min_history: ``"auto"``: norms seen before anything is skipped for its size.

    >>> rule = SkipRule(10.0)
    >>> rule.cause(loss_finite=True, grad_norm=3.0), rule.cause(loss_finite=True, grad_norm=30.0)
    (None, 'threshold')
    >>> rule.cause(loss_finite=True, grad_norm=float("nan"))
    'non_finite'
    """

    def __init__(
        self,
        threshold: float | str = 0.0,
        *,
        window: int = 500,
        quantile: float = 0.99,
        factor: float = 2.0,
        min_history: int = 50,
    ) -> None:
        check_skip_threshold(threshold)
        if not 0 < quantile < 1 or not factor >= 1 or not 0 < min_history <= window:
            raise ValueError(
                f"SkipRule needs 0 < quantile < 1, factor ≥ 1 and 0 < min_history ≤ window, got "
                f"quantile={quantile!r}, factor={factor!r}, min_history={min_history!r}, window={window!r}."
            )
        self.threshold = threshold
        self.quantile, self.factor, self.min_history = quantile, factor, min_history
        self._norms: deque[float] = deque(maxlen=window)
        #: The threshold the last decision was taken against.
        self.last_threshold = math.inf

    @property
    def active(self) -> bool:
        """Whether the gradient norm is compared with a threshold at all."""
        return self.threshold == "auto" or self.threshold > 0

    def current_threshold(self) -> float:
        """The norm above which the next step is skipped (``inf``: none is)."""
        if self.threshold != "auto":
            return float(self.threshold) if self.threshold > 0 else math.inf
        if len(self._norms) < self.min_history:
            return math.inf
        ordered = sorted(self._norms)
        # The q-quantile with linear interpolation between order statistics (numpy's default).
        position = self.quantile * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        value = ordered[low] + (position - low) * (ordered[high] - ordered[low])
        return self.factor * value

    def cause(self, *, loss_finite: bool, grad_norm: float | None) -> str | None:
        """Why this step is skipped (one of :data:`SKIP_CAUSES`), or ``None`` to take it.

        A finite norm is remembered for ``"auto"`` whether or not the step is taken.

        :param loss_finite: Whether the loss is finite (on every process); where ``grad_norm``
            is ``None``, whether the loss and every gradient entry are.
        :param grad_norm: The global 2-norm of the gradient before clipping, or ``None`` where
            it was not computed, which only a rule that is not :attr:`active` accepts.
        :raises ValueError: for ``grad_norm=None`` with an active rule.
        """
        if grad_norm is None:
            if self.active:
                raise ValueError("This skip rule compares the gradient norm with a threshold; pass grad_norm.")
            return None if loss_finite else "non_finite"
        if not loss_finite or not math.isfinite(grad_norm):
            return "non_finite"
        limit = self.last_threshold = self.current_threshold()
        if self.threshold == "auto":
            self._norms.append(float(grad_norm))
        return "threshold" if grad_norm > limit else None

    def state_dict(self) -> dict[str, Any]:
        """The remembered norms, for checkpoints."""
        return {"threshold": self.threshold, "norms": list(self._norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the norms are kept only when the threshold is ``"auto"``).

        :param state: A dict from :meth:`state_dict`.
        """
        self._norms.clear()
        if self.threshold == "auto":
            self._norms.extend(state.get("norms", []))
