"""Seconds per MNIST training epoch for each guide, measured in one process.

Each preset trains for one full epoch (235 SVI steps of 256 on MNIST, dynamic
binarization included, evaluation excluded), ``--repeats`` times, alternating
presets so that both see the same machine state. Prints one line per preset.

    python bench/epoch_time.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pyro_lvae import get_preset
from pyro_lvae.data import load_dataset
from pyro_lvae.training import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--presets", default="lvae-bn-wu-5,vae-bn-wu-5")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    mnist = load_dataset("mnist", root=args.data_root, download=False)
    times: dict[str, list[float]] = {name: [] for name in args.presets.split(",")}
    for _ in range(args.repeats):
        for name in times:
            result = train(
                get_preset(name).replace(epochs=1), dataset=mnist, device=args.device, progress=False, final_evaluation=False
            )
            times[name].append(result.metrics[0]["seconds"])
    print(f"device {args.device}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        print(f"{name:14s} epochs {[round(v, 2) for v in values]}  median {statistics.median(values):.2f} s/epoch")


if __name__ == "__main__":
    main()
