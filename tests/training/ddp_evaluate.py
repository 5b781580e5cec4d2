"""Run by tests/training/test_distributed.py under ``torchrun``: the sharded L_K of a fixed model."""

from __future__ import annotations

import sys


def main(out: str) -> None:
    import pyro
    import torch
    import torch.distributed as dist
    from ddp_step import _exit_without_teardown

    from pyro_lvae import GenerativeModel, LadderGuide, ModelConfig
    from pyro_lvae.inference import evaluation
    from pyro_lvae.inference.evaluation import evaluate
    from pyro_lvae.training.distributed import init_from_environment

    # Count the batches this process weighs, to show that the work was shared.
    batches = []
    bounds = evaluation._bounds  # what evaluate runs per batch, after the batch's checks
    evaluation._bounds = lambda *a, **k: batches.append(a[2].shape[0]) or bounds(*a, **k)

    ctx = init_from_environment(torch.device("cpu"))
    pyro.set_rng_seed(0)
    model = GenerativeModel(ModelConfig(input_dim=10, latent_sizes=(4, 2), hidden_sizes=(16, 8), batch_norm=True))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((30, 10), 0.4), generator=torch.Generator().manual_seed(1))
    pyro.set_rng_seed(100 + ctx.rank)  # the global streams differ: the result must not depend on them
    result = evaluate(model, guide, x, num_samples=20, batch_size=7, seed=3)
    torch.save({"world_size": ctx.world_size, "batch_sizes": batches}, f"{out}.rank{ctx.rank}")
    if ctx.is_main:
        torch.save({k: result[k] for k in ("elbo_per_example", "log_likelihood_per_example", "kl_per_layer")}, out)
    dist.barrier()  # rank 0 has written the file before either process exits
    _exit_without_teardown()


if __name__ == "__main__":
    main(sys.argv[1])
