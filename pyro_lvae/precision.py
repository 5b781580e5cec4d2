"""bfloat16 autocast, shared by training (``precision="bf16"`` of the fast engine) and L_K
evaluation (:func:`~pyro_lvae.inference.evaluation.evaluate`'s ``precision``).

Under ``precision="bf16"`` the networks' matrix products run in bfloat16, while the Gaussian
heads and the likelihood hand fp32 back to the log-densities, the KL and the merge
(:class:`~pyro_lvae.models.nn.GaussianHead`). fp32 is the default everywhere, and every
reproduction number is fp32.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .config import PRECISIONS


def check_precision(precision: str) -> None:
    """Refuse a precision the library does not know.

    :param precision: ``"fp32"`` or ``"bf16"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``precision="bf16"``, nothing for ``"fp32"``.

    :param precision: ``"fp32"`` or ``"bf16"``.
    :param device: The device the networks run on.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    # torch.cpu exposes the CPU's instruction sets only as private functions (torch 2.14).
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def warn_if_bf16_is_emulated(model: nn.Module, *, stacklevel: int = 3) -> None:
    """Warn that ``precision="bf16"`` is slow on a CPU without bfloat16 instructions, where
    oneDNN emulates the bfloat16 matrix products: on the 2-core AMD EPYC (Zen 3, AVX2) of
    docs/performance.md, the fast step of ``lvae-bn-wu-5`` took 16–19× its fp32 time, against
    0.84–0.85× on a CPU with AVX512-BF16.

    :param model: The generative model; only its parameters' device is read.
    :param stacklevel: That of ``warnings.warn``: 3 names the caller of this function's caller.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not cpu_has_bf16_instructions():
        warnings.warn(
            "precision='bf16' is 15-20x slower than fp32 on this CPU, which has no bfloat16 "
            "instructions (AVX512-BF16 or AMX); use precision='fp32' here.",
            stacklevel=stacklevel,
        )
