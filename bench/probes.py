"""Probes of speed-ups that the fast engine does *not* use, timed against it.

    python bench/probes.py jit       # Pyro's JIT ELBOs (torch.jit.trace)
    python bench/probes.py jit-fixed # the same, with JitTraceMeanField_ELBO's cache bug worked around
    python bench/probes.py compile   # torch.compile of the fast engine's loss
    python bench/probes.py compile-networks  # torch.compile of each deterministic network only

Each probe builds the paper's 5-layer model for one guide (``--guide``), times
the fast engine's step and the probed variant in interleaved rounds, and prints
both (or the error that stopped the variant). docs/performance.md reports them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import _build, _median_ms  # noqa: E402

from pyro_lvae import get_preset  # noqa: E402
from pyro_lvae.models.nn import MLP, GaussianHead  # noqa: E402
from pyro_lvae.training.steps import TrainingStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("jit", "jit-fixed", "compile", "compile-networks"))
    parser.add_argument("--guide", choices=("ladder", "vae"), default="ladder")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config = get_preset("lvae-bn-wu-5").replace(guide=args.guide)
    x = torch.bernoulli(torch.rand(config.train.batch_size, config.model.input_dim))
    beta = torch.tensor(0.5)
    model, guide = _build(config, x.device, "fast")
    fast = TrainingStep(model, guide, learning_rate=1e-3)
    fns = {"fast engine": lambda: fast(x, beta)}

    model2, guide2 = _build(config, x.device, "probe")
    probe_step = TrainingStep(model2, guide2, learning_rate=1e-3)
    opt = probe_step.optimizer
    if args.probe == "jit":
        elbo = (JitTraceMeanField_ELBO if guide2.mean_field_compatible else JitTrace_ELBO)(ignore_jit_warnings=True)
        loss_fn = lambda: elbo.differentiable_loss(model2, guide2, x, beta)  # noqa: E731
    elif args.probe == "jit-fixed":
        # Pyro 1.9's JitTraceMeanField_ELBO checks for its compiled function under
        # `_loss_and_surrogate_loss` but stores it as `_differentiable_loss`, so it
        # recompiles on every call. Compile the same loss once instead.
        mean_field = TraceMeanField_ELBO() if guide2.mean_field_compatible else Trace_ELBO()
        compiled_loss = pyro.ops.jit.trace(
            lambda x, beta: mean_field.differentiable_loss(model2, guide2, x, beta), ignore_warnings=True
        )
        loss_fn = lambda: compiled_loss(x, beta)  # noqa: E731
    elif args.probe == "compile":
        compiled = torch.compile(probe_step.loss)
        loss_fn = lambda: compiled(x, beta)  # noqa: E731
    else:
        # Each MLP and Gaussian head compiled in place (their parameters and state_dict
        # keys stay as they are); Pyro's sample sites and handlers stay in Python.
        for module in list(model2.modules()) + list(guide2.modules()):
            if isinstance(module, (MLP, GaussianHead)):
                module.compile()
        loss_fn = lambda: probe_step.loss(x, beta)  # noqa: E731

    def probe() -> None:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    try:
        probe()
    except Exception as exc:  # the probe's outcome is what we report
        print(
            f"{args.probe} ({args.guide}): the first step failed after {time.perf_counter() - t0:.1f} s: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        )
        return
    print(f"{args.probe} ({args.guide}): first step (compilation included) {time.perf_counter() - t0:.1f} s")
    fns[args.probe] = probe
    ms = _median_ms(fns, device=x.device, rounds=args.rounds, per_round=10, warmup=3)
    for name, value in ms.items():
        print(f"{name:12s} {value:7.2f} ms/step")
    pyro.clear_param_store()


if __name__ == "__main__":
    main()
