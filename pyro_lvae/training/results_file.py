"""``results.json`` as a typed object, :class:`RunResults`, readable without torch (the
sweep's summary, the results page and the pretrained-model manifest read it), and its
per-example companion ``per_example.npz`` (:class:`PerExample`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExperimentConfig
from .run_files import PER_EXAMPLE_NAME, RESULTS_NAME

logger = logging.getLogger(__name__)

#: Entries written only where they apply: Gaussian latents, dequantized data, the VQ-VAE.
_OPTIONAL = ("test_kl_per_unit", "test_active_units", "dequantized", "test_bits_per_dim", "vq")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename.

    :param path: The file.
    :param obj: A JSON-serializable object.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True, eq=False)
class PerExample:
    """The test bounds of each evaluated example, in the order of the test set, so that two
    runs evaluated on the same examples can be compared *paired* (:meth:`paired_difference`).

    :param elbo: ELBO of each example (nats), shape ``(N,)``.
    :param log_likelihood: L_K of each example (nats), shape ``(N,)``.
    """

    elbo: np.ndarray
    log_likelihood: np.ndarray

    def __post_init__(self) -> None:
        if self.elbo.ndim != 1 or self.elbo.shape != self.log_likelihood.shape:
            raise ValueError(
                f"PerExample needs two (N,) arrays of equal length, got {self.elbo.shape} and "
                f"{self.log_likelihood.shape}."
            )

    def save(self, path: Path) -> None:
        """Write atomically as the ``.npz`` file ``path``, in float32 (about 1e-5 nats at MNIST's
        magnitudes; coarser for the offset bounds of dequantized runs).

        :param path: The file.
        """
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, elbo=self.elbo.astype(np.float32), log_likelihood=self.log_likelihood.astype(np.float32)
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PerExample:
        """Read a file written by :meth:`save`.

        :param path: The file.
        """
        with np.load(path) as f:
            return cls(elbo=f["elbo"].astype(np.float64), log_likelihood=f["log_likelihood"].astype(np.float64))

    def paired_difference(self, reference: PerExample, key: str) -> tuple[float, float]:
        """Mean and standard error of ``self − reference`` in ``key``, paired by example.

        :param reference: The other run's values on the same examples.
        :param key: ``"elbo"`` or ``"log_likelihood"``.
        :raises ValueError: if the runs were evaluated on different numbers of examples.
        """
        if key not in ("elbo", "log_likelihood"):
            raise ValueError(f"key must be 'elbo' or 'log_likelihood', got {key!r}.")
        a, b = getattr(self, key), getattr(reference, key)
        if a.shape != b.shape:
            raise ValueError(
                f"Paired differences need the same test examples in both runs, got {len(a)} and {len(b)}; "
                "evaluate both on the same test subset."
            )
        if len(a) < 2:
            raise ValueError(f"A standard error needs at least two examples, got {len(a)}.")
        d = a - b
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


@dataclass(frozen=True)
class RunResults(Mapping):
    """The final evaluation of a run, as stored in ``results.json``.

    It reads like that file's dict too (``results["test_elbo"]``), as code written
    before this class did.

    :param test_elbo: Test ELBO (nats per example).
    :param test_log_likelihood: Test L_K, K = ``num_importance_samples``.
    :param num_importance_samples: K.
    :param epochs: Epochs trained.
    :param config: The run's configuration (with ``test_subset`` set to the evaluated
        examples when a subset was evaluated).
    :param test_kl_per_layer: KL(q||p) per layer, bottom first.
    :param num_test_examples: Test examples evaluated.
    :param test_reconstruction: Mean log p(x|z1).
    :param train_seconds: Training time.
    :param eval_seconds: Time of this evaluation.
    :param device: The hardware.
    :param versions: ``torch`` and ``pyro`` versions.
    :param date: UTC date and time of the evaluation (ISO 8601).
    :param test_kl_per_unit: KL per unit, one list per layer (Gaussian latents).
    :param test_active_units: Active units per layer (Gaussian latents).
    :param dequantized: Whether the bounds are of a dequantized run, on the 8-bit images.
    :param test_bits_per_dim: -L_K in bits per dimension (dequantized runs).
    :param vq: The VQ-VAE's codebook statistics (``vq_statistics``).
    :param weights: Which weights were evaluated: ``"raw"`` (the optimizer's) or ``"ema"``
        (their moving average, for a run trained with ``ema``).
    :param per_example: The bounds of each example, stored beside ``results.json`` in
        ``per_example.npz`` rather than in it (``None`` for runs evaluated before it existed).
    """

    test_elbo: float
    test_log_likelihood: float
    num_importance_samples: int
    epochs: int
    config: ExperimentConfig
    test_kl_per_layer: list[float]
    num_test_examples: int
    test_reconstruction: float | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    device: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    date: str = ""
    test_kl_per_unit: list[list[float]] | None = None
    test_active_units: list[int] | None = None
    dequantized: bool = False
    test_bits_per_dim: float | None = None
    vq: dict[str, Any] | None = None
    weights: str = "raw"
    per_example: PerExample | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``results.json``; the family- and data-specific entries only when present."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_example"}
        d["config"] = self.config.to_dict()
        return {k: v for k, v in d.items() if k not in _OPTIONAL or v}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResults:
        """Read the JSON object of ``results.json``.

        :param d: The object.
        :raises ValueError: if it has entries this class does not know.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"per_example"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"results.json has unknown entries {unknown}; it was written by another pyro-lvae version."
            )
        return cls(**{**d, "config": ExperimentConfig.from_dict(d["config"])})

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunResults:
        """Read ``results.json``, or the one in the run directory ``path``, with the
        ``per_example.npz`` beside it when there is one.

        :param path: The file or its run directory.
        """
        path = Path(path)
        path = path / RESULTS_NAME if path.is_dir() else path
        results = cls.from_dict(json.loads(path.read_text()))
        companion = path.with_name(PER_EXAMPLE_NAME)
        if path.name == RESULTS_NAME and companion.exists():
            per_example = PerExample.load(companion)
            if results.matches(per_example):
                results = dataclasses.replace(results, per_example=per_example)
            else:
                logger.warning("%s does not belong to %s (other examples or numbers); it is ignored.", companion, path)
        return results

    def matches(self, per_example: PerExample) -> bool:
        """Whether ``per_example`` holds this evaluation's examples: as many, averaging to its
        bounds (to 1e-3 nats, the float32 rounding of the file).

        :param per_example: Values read from ``per_example.npz``.
        """
        return (
            len(per_example.elbo) == self.num_test_examples
            and abs(per_example.elbo.mean() - self.test_elbo) < 1e-3
            and abs(per_example.log_likelihood.mean() - self.test_log_likelihood) < 1e-3
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as ``path`` (a file) or ``path/results.json`` (a directory), and, for
        a ``results.json``, the per-example values as ``per_example.npz`` beside it (removing an
        older one when there are none).

        :param path: The file or its run directory.
        """
        path = Path(path)
        path = path / RESULTS_NAME if path.is_dir() else path
        if path.name == RESULTS_NAME:  # the companion belongs to the run directory's results.json only
            companion = path.with_name(PER_EXAMPLE_NAME)
            if self.per_example is not None:
                self.per_example.save(companion)
            else:
                companion.unlink(missing_ok=True)  # an earlier evaluation's values do not belong to this one
        write_json_atomic(path, self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
