"""What a benchmark ran on, for its results file: the device and, on a CPU, its vector
instructions, which decide the speed of bf16 (emulated without AVX512-BF16 or AMX, 15–20×
slower than fp32 on the 2-core AVX2 CPU of docs/performance.md) and of the matrix products."""

from __future__ import annotations

import datetime
import platform
import sys
from typing import Any

import pyro
import torch

from pyro_lvae.precision import cpu_has_bf16_instructions


def machine(device: torch.device) -> dict[str, Any]:
    """The device's name; on a CPU also torch's instruction level and whether bf16 is native.

    :param device: The device the benchmark runs on.
    """
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device)}
    return {
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_bf16_instructions(),
    }


def provenance(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The versions, the UTC time and the command line of a benchmark's run.

    :param script: The script's path from the repository root, e.g. ``bench/run.py``.
    :param argv: The arguments the script's ``main`` was given (``None``: the command line's).
    """
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv),
    }
