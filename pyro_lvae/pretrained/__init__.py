"""Trained models that ship with the package, and how to make more.

A pretrained model is one file of model and guide parameters (fp32, no optimizer
state) described by an entry of a ``manifest.json`` beside it::

    {"lvae-bn-wu-5": {"file": "lvae-bn-wu-5.pt", "sha256": "…", "preset": "lvae-bn-wu-5",
                      "epochs": 2000, "test_log_likelihood": …, "num_importance_samples": 5000,
                      "test_elbo": …, "commit": "…",
                      "check": {"num_samples": 1000, "num_examples": 100, "seed": 0, "value": …}}}

``check`` is L_1000 on the first 100 test images, binarized and sampled with a fixed
seed: loading a model and recomputing it (:func:`check_value`) shows that the file, the
code and the data give the numbers the manifest was written with.

:func:`load_pretrained` reads a shipped model by name (the manifest in this folder) or
any exported file by path, verifies its sha256 and returns ``(model, guide)`` in
evaluation mode. :func:`export_run` writes a run's newest checkpoint as such a file and
adds it to a manifest. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from ..config import ExperimentConfig
from ..inference.evaluation import evaluate
from ..models.families import make_guide, make_model

logger = logging.getLogger(__name__)

#: The folder of the shipped models and their manifest.
SHIPPED = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
FORMAT = "pyro-lvae-pretrained"
VERSION = 1
#: The check value's protocol: L_1000 on the first 100 test images, seed 0.
CHECK = {"num_samples": 1000, "num_examples": 100, "seed": 0}


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 digest of a file.

    :param path: The file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike = SHIPPED) -> dict[str, dict[str, Any]]:
    """The manifest of ``folder`` (empty when it has none).

    :param folder: A folder of pretrained files; default: the shipped ones.
    """
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def available() -> list[str]:
    """Names of the models that ship with this version."""
    return sorted(read_manifest())


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The file to load and its manifest entry (``None`` for a file outside any manifest)."""
    shipped = read_manifest()
    if str(name_or_path) in shipped:
        entry = shipped[str(name_or_path)]
        return SHIPPED / entry["file"], entry
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(available()) or "none yet"
        raise ValueError(
            f"No pretrained model {str(name_or_path)!r}: give the name of a shipped one ({names}) "
            "or the path of a file written by pyro_lvae.pretrained.export_run."
        )
    entries = [e for e in read_manifest(path.parent).values() if e["file"] == path.name]
    return path, (entries[0] if entries else None)


def load_pretrained(
    name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", name: str | None = None
) -> tuple[nn.Module, nn.Module]:
    """A trained model and its guide, in evaluation mode.

    Ready for :func:`~pyro_lvae.inference.evaluation.evaluate`, ``pyro.infer.Importance``,
    ``model.sample`` and the analysis functions; nothing is trained or downloaded.

    :param name_or_path: The name of a shipped model (``"lvae-bn-wu-5"``; see
        :func:`available`) or the path of an exported ``.pt`` file. A file listed in
        the ``manifest.json`` beside it is checked against its sha256.
    :param device: Where to put the model and guide.
    :param name: Param-store prefix of the model (default: the family's name).
    :raises ValueError: if the name is unknown, or the file does not match its sha256.
    """
    path, entry = _resolve(name_or_path)
    if entry is not None:
        actual = sha256_of(path)
        if actual != entry["sha256"]:
            raise ValueError(
                f"{path} has sha256 {actual}, but its manifest says {entry['sha256']}: the file is "
                "corrupt or was changed; restore it (git checkout, or export it again)."
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a training checkpoint (it holds more than tensors), or no torch file at all
        raise ValueError(
            f"{path} is not a pyro-lvae pretrained file (a training checkpoint? load a run with "
            "pyro_lvae.load_run(run_dir), or export it with pyro_lvae.pretrained.export_run)."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro-lvae pretrained file; write one with pyro_lvae.pretrained.export_run.")
    config = ExperimentConfig.from_dict(state["config"])
    model = make_model(config.model, name=name)
    guide = make_guide(model)
    model.load_state_dict(state["model"])
    # The stored guide state leaves out the model it holds (the ladder guide shares the
    # model's networks), so those keys are the only ones allowed to be missing.
    missing, unexpected = guide.load_state_dict(state["guide"], strict=False)
    if unexpected or any(not key.startswith("model.") for key in missing):
        raise ValueError(f"{path} does not match its own configuration (keys {missing + unexpected}); export it again.")
    return model.to(device).eval(), guide.to(device).eval()


def config_of(name_or_path: str | os.PathLike) -> ExperimentConfig:
    """The configuration a pretrained model was trained with.

    :param name_or_path: As for :func:`load_pretrained`.
    """
    path, _ = _resolve(name_or_path)
    return ExperimentConfig.from_dict(torch.load(path, map_location="cpu", weights_only=True)["config"])


def check_value(
    model: nn.Module,
    guide: nn.Module,
    config: ExperimentConfig,
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
) -> float:
    """L_1000 on the first 100 test images with seed 0 (the manifest's ``check``).

    :param model: A trained model, e.g. from :func:`load_pretrained`.
    :param guide: Its guide.
    :param config: Its configuration (:func:`config_of`).
    :param data_root: Data root (default ``$PYRO_LVAE_DATA`` or ``./data``).
    :param download: Allow torchvision to download missing MNIST files.
    """
    from ..training.batches import prepare_data  # the trainer's data path, so that binarization matches

    subset = config.replace(test_subset=CHECK["num_examples"], seed=CHECK["seed"])
    device = next(model.parameters()).device
    data = prepare_data(subset, data_root=data_root, download=download, device=device)
    result = evaluate(model, guide, data.test, num_samples=CHECK["num_samples"], seed=CHECK["seed"])
    return float(result["log_likelihood"])


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors in fp32 (counters such as BN's stay integers)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _guide_state(guide: nn.Module) -> dict[str, torch.Tensor]:
    """The guide's own state in fp32, without the model it holds."""
    return _fp32({k: v for k, v in guide.state_dict().items() if not k.startswith("model.")})


def save_pretrained(
    model: nn.Module, guide: nn.Module, config: ExperimentConfig, path: str | os.PathLike, *, epochs: int = 0
) -> Path:
    """Write a model and its guide as a pretrained file that :func:`load_pretrained` reads.

    Use it for a model trained by your own loop; :func:`export_run` does the same for a
    run directory and adds a manifest entry.

    :param model: The trained model.
    :param guide: Its guide.
    :param config: The configuration it was built from (``config.model`` must match it).
    :param path: The ``.pt`` file to write.
    :param epochs: Epochs trained, stored for the record.
    :returns: The path written.
    """
    state = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "epochs": epochs}
    state |= {"model": _fp32(model.state_dict()), "guide": _guide_state(guide)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    commit: str = "",
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    weights: str = "auto",
) -> dict[str, Any]:
    """Write a run's trained model and guide as ``out_dir/{name}.pt`` and add it to the manifest there.

    The entry takes the test ELBO and L_K from the run's ``results.json`` (evaluate the run
    first) and computes the check value on the exported file. A run trained with ``ema``
    exports its moving average of the weights (the entry's ``weights`` says which).

    :param run_dir: A run directory written by ``pyro-lvae train``.
    :param out_dir: The folder of the pretrained files (``pyro_lvae/pretrained`` to ship it).
    :param name: The model's name, usually its preset.
    :param commit: The code version that trained it (``git rev-parse HEAD``).
    :param data_root: Data root for the check value.
    :param download: Allow torchvision to download missing MNIST files.
    :param weights: ``"auto"`` (the moving average when the run kept one), ``"ema"`` or ``"raw"``;
        the run's ``results.json`` must have evaluated the same weights.
    :returns: The manifest entry.
    """
    from ..training.results_file import RunResults
    from ..training.run_dir import load_run
    from ..training.run_files import RESULTS_NAME

    results_path = Path(run_dir) / RESULTS_NAME
    if not results_path.exists():
        raise ValueError(f"{run_dir} has no {RESULTS_NAME}; evaluate it first (pyro-lvae evaluate {run_dir}).")
    results = RunResults.load(results_path)
    model, guide, config, ckpt = load_run(run_dir, weights=weights)
    if results.weights != ckpt["weights"]:
        raise ValueError(
            f"{results_path} evaluated the {results.weights} weights but the export takes the {ckpt['weights']} "
            f"ones; evaluate the run again (pyro-lvae evaluate {run_dir} --weights {ckpt['weights']}) "
            "before exporting it."
        )
    if results.epochs != ckpt["epoch"]:
        raise ValueError(
            f"{results_path} was written after epoch {results.epochs} but the checkpoint is at epoch "
            f"{ckpt['epoch']}; evaluate the run again (pyro-lvae evaluate {run_dir}) before exporting it."
        )
    out = Path(out_dir)
    save_pretrained(model, guide, config, out / f"{name}.pt", epochs=ckpt["epoch"])
    pyro.clear_param_store()
    loaded, loaded_guide = load_pretrained(out / f"{name}.pt")
    entry = {
        "file": f"{name}.pt",
        "sha256": sha256_of(out / f"{name}.pt"),
        "preset": config.name,
        "epochs": ckpt["epoch"],
        "test_log_likelihood": results.test_log_likelihood,
        "num_importance_samples": results.num_importance_samples,
        "test_elbo": results.test_elbo,
        "num_test_examples": results.num_test_examples,
        "weights": ckpt["weights"],
        "commit": commit,
        "check": CHECK | {"value": check_value(loaded, loaded_guide, config, data_root=data_root, download=download)},
    }
    manifest = read_manifest(out) | {name: entry}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("Exported %s as %s (check value %.4f).", run_dir, out / entry["file"], entry["check"]["value"])
    return entry
