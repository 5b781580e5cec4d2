"""Run by tests/training/test_distributed.py under ``torchrun`` (or alone): one training step of a
fixed model, with batch norm off and every Gaussian draw fixed at its mean, so that the
step depends on the data alone. Writes each process's parameters after the step and
whether it skipped it. A second argument puts a NaN into that rank's part of the batch."""

from __future__ import annotations

import sys


def one_step(out_prefix: str, poison_rank: int | None = None) -> None:
    import pyro
    import torch
    import torch.distributed as dist
    from torch.distributions import normal

    from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
    from pyro_lvae.inference import closed_form
    from pyro_lvae.training.distributed import init_from_environment, shard
    from pyro_lvae.training.steps import TrainingStep

    # Fixed draws: the reparametrized noise is zero, so z = loc on every process (the traced
    # path draws through torch's Normal, the fast engine's closed form through its own helper).
    zeros = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
    normal._standard_normal = closed_form.standard_normal = zeros
    ctx = init_from_environment(torch.device("cpu"))
    pyro.set_rng_seed(0)
    model = GenerativeModel(
        ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=False)
    ).double()
    guide = LadderGuide(model).double()
    x = torch.bernoulli(torch.full((12, 10), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    # ε = 1e6 ≫ |g| makes Adam's first update lr·g/ε, linear in the gradient: a wrong
    # world-size scaling of the gradient would show in the parameters (Adam with a small ε
    # divides any constant scale away).
    step = TrainingStep(model, guide, learning_rate=1.0, adam_eps=1e6, distributed=ctx)
    mine = x[shard(torch.arange(12), ctx)].clone()
    if ctx.rank == poison_rank:
        mine[0, 0] = float("nan")  # a non-finite loss on this process only
    step(mine, torch.tensor(1.0, dtype=torch.float64))
    params = [p.detach().clone() for p in dict.fromkeys(list(model.parameters()) + list(guide.parameters()))]
    torch.save({"params": params, "skipped": step.skipped}, f"{out_prefix}{ctx.rank}.pt")
    if ctx.enabled:
        dist.barrier()  # both processes are done with every collective and have written their file
        _exit_without_teardown()


def _exit_without_teardown() -> None:
    """End this process now, skipping gloo's teardown.

    In one fresh-clone CI run, one rank aborted in gloo's teardown ("terminate called without
    an active exception", SIGABRT) after a barrier and ``destroy_process_group``, once both ranks
    had written their results, and torchrun reported a failure (70 runs here did not repeat it).
    Nothing is left to tear down that the test checks.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    one_step(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
