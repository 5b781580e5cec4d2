"""L_K of the shipped pretrained models on the whole test set, timed, on any device.

The same path as ``pyro-lvae evaluate`` (the run's seed, its data preparation and
:func:`~pyro_lvae.inference.evaluation.evaluate` with ``seed=config.train.seed``), but
from the pretrained files that ship with the package, so that it needs no run
directory. Prints, per model, the time, L_K and L1 next to the manifest's values
(computed on the CPU; another device draws other noise, so the values agree to
Monte Carlo error, not to rounding)::

    python bench/lk_pretrained.py --device cuda --num-samples 5000 --data-root DATA

``--precision bf16`` evaluates under bfloat16 autocast (``evaluate``'s ``precision``); the
manifest's values are fp32, so they then agree to bf16's rounding, not to float32's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import pyro
import torch
from machine import machine, provenance  # bench/machine.py, beside this script

from pyro_lvae.inference.evaluation import DEFAULT_MEMORY_BUDGET, evaluate
from pyro_lvae.pretrained import available, config_of, load_pretrained, read_manifest
from pyro_lvae.training.batches import prepare_data

logger = logging.getLogger("lk_pretrained")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, *, device: torch.device, num_samples: int, data_root: str | None, budget: int, precision: str = "fp32"
) -> dict:
    """Time L_K of one shipped model on its whole test set, in ``precision`` (``evaluate``'s)."""
    config = config_of(name)
    model, guide = load_pretrained(name, device=device)
    pyro.set_rng_seed(config.train.seed)
    data = prepare_data(config, data_root=data_root, download=False, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    result = evaluate(
        model,
        guide,
        data.test,
        num_samples=num_samples,
        memory_budget=budget,
        seed=config.train.seed,
        precision=precision,
    )
    _sync(device)
    seconds = time.perf_counter() - start
    entry = read_manifest()[name]
    return {
        "model": name,
        **machine(device),
        "num_samples": num_samples,
        "num_examples": int(data.test.shape[0]),
        "precision": precision,
        "seconds": seconds,
        "log_likelihood": result["log_likelihood"],
        "elbo": result["elbo"],
        "manifest_log_likelihood": entry["test_log_likelihood"],
        "manifest_elbo": entry["test_elbo"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--models", default=",".join(available()), help="comma-separated shipped model names")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--memory-budget-gib", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="evaluate()'s precision")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        row = measure(
            name,
            device=device,
            num_samples=args.num_samples,
            data_root=args.data_root,
            budget=int(args.memory_budget_gib * 2**30),
            precision=args.precision,
        ) | provenance("bench/lk_pretrained.py", argv)
        logger.info(
            "%s on %s in %s: L_%d %.4f (manifest %.4f), L1 %.4f (manifest %.4f), %.1f s",
            name,
            row["device"],
            args.precision,
            args.num_samples,
            row["log_likelihood"],
            row["manifest_log_likelihood"],
            row["elbo"],
            row["manifest_elbo"],
            row["seconds"],
        )
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
