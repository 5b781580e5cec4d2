"""``results.json`` as a typed object, :class:`RunResults`, readable without torch (the
sweep's summary, the results page and the pretrained-model manifest read it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from .run_files import RESULTS_NAME

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

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``results.json``; the family- and data-specific entries only when present."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        return {k: v for k, v in d.items() if k not in _OPTIONAL or v}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResults:
        """Read the JSON object of ``results.json``.

        :param d: The object.
        :raises ValueError: if it has entries this class does not know.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"results.json has unknown entries {unknown}; it was written by another pyro-lvae version."
            )
        return cls(**{**d, "config": ExperimentConfig.from_dict(d["config"])})

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunResults:
        """Read ``results.json``, or the one in the run directory ``path``.

        :param path: The file or its run directory.
        """
        path = Path(path)
        return cls.from_dict(json.loads((path / RESULTS_NAME if path.is_dir() else path).read_text()))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as ``path`` (a file) or ``path/results.json`` (a directory).

        :param path: The file or its run directory.
        """
        path = Path(path)
        write_json_atomic(path / RESULTS_NAME if path.is_dir() else path, self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
