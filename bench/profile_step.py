"""Where the fast engine's training step spends its time, beside the compact baseline.

Two views of the same steps (``lvae-bn-wu-5`` by default, batch 256):

1. **cProfile**, self time partitioned by where the code lives: PyTorch's C++ kernels and
   autograd (every built-in call), and the Python of Pyro's handlers and traces, of
   Pyro's ELBO, of ``torch.distributions`` and Pyro's distributions, of ``torch.nn`` module
   calls, of this library, and the rest. cProfile slows Python code more than C++ calls,
   so the Python shares are upper bounds; the times of the step without the profiler are
   printed beside them.
2. **torch.profiler**, self CPU time per ATen operator, engine against baseline: the
   operators whose time differs most, with their calls per step. It says which extra
   kernels (and their autograd records) the engine's Python asks for.
3. **Direct timings** of the pieces the engine adds around the loss: saving (and, on a
   skipped step, restoring) the batch-norm statistics, and the finiteness check (the
   gradient norm read back to the host).

    python bench/profile_step.py --data-root ../shared/data
    python bench/profile_step.py --guide vae --steps 100

It prints Markdown tables; docs/performance.md quotes them with their command and date.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import CompactLVAE, compact_loss  # noqa: E402

from pyro_lvae import get_preset  # noqa: E402
from pyro_lvae.data import load_dataset  # noqa: E402
from pyro_lvae.models.families import make_guide  # noqa: E402
from pyro_lvae.models.model import GenerativeModel  # noqa: E402
from pyro_lvae.training.steps import (  # noqa: E402
    TrainingStep,
    loss_and_grad_norm,
    loss_and_gradients_finite,
    trainable_parameters,
)

#: Where a function's self time is counted, by the first matching part of its file path.
CATEGORIES = (
    ("pyro/poutine/", "Pyro handlers and traces"),
    ("pyro/infer/", "Pyro ELBO"),
    ("pyro/distributions/", "distribution objects"),
    ("torch/distributions/", "distribution objects"),
    ("pyro/", "Pyro, other"),
    ("torch/nn/", "torch.nn module calls"),
    ("torch/optim/", "optimizer (Python)"),
    ("pyro_lvae/", "pyro-lvae (Python)"),
)


def _category(filename: str) -> str:
    if filename == "~":  # a built-in: a C++ call into PyTorch (kernels, autograd) or Python's own
        return "C++ calls (kernels, autograd)"
    for part, name in CATEGORIES:
        if part in filename.replace("\\", "/"):
            return name
    return "other Python"


def profile_shares(fn: Callable[[], object], steps: int) -> dict[str, float]:
    """Seconds of self time per category over ``steps`` calls of ``fn`` under cProfile.

    :param fn: One training step.
    :param steps: How many to profile.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():
        key = _category(filename)
        totals[key] = totals.get(key, 0.0) + tottime
    return totals


#: The key of :func:`operator_times`'s wall-clock row.
WALL = "the whole step, wall clock"


def operator_times(fn: Callable[[], object], steps: int) -> dict[str, tuple[float, float]]:
    """Self CPU milliseconds and calls per step of each operator over ``steps`` calls of ``fn``,
    from ``torch.profiler`` (autograd's backward nodes are operators of their own there).

    :param fn: One training step.
    :param steps: How many to profile.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    times = {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}
    return {WALL: (wall, 1.0), **times}


def _print_operator_table(ops: dict[str, dict[str, tuple[float, float]]], rows: int) -> None:
    """The ``rows`` operators whose self time differs most between engine and baseline."""
    fast, base = ({k: v for k, v in ops[name].items() if k != WALL} for name in ("fast engine", "baseline"))
    names = sorted(fast.keys() | base.keys(), key=lambda k: -abs(fast.get(k, (0, 0))[0] - base.get(k, (0, 0))[0]))
    total = [sum(t for t, _ in v.values()) for v in (fast, base)]
    calls = [sum(c for _, c in v.values()) for v in (fast, base)]
    wall = [ops[name][WALL][0] for name in ("fast engine", "baseline")]
    print()
    print("| under torch.profiler (self CPU time) | engine ms/step | calls | baseline ms/step | calls |")
    print("|---|---|---|---|---|")
    print(f"| {WALL} | {wall[0]:.2f} | | {wall[1]:.2f} | |")
    print(f"| all operators | {total[0]:.2f} | {calls[0]:.0f} | {total[1]:.2f} | {calls[1]:.0f} |")
    print(f"| the rest: Python, and the calls' way in | {wall[0] - total[0]:.2f} | | {wall[1] - total[1]:.2f} | |")
    for name in names[:rows]:
        (tf, cf), (tb, cb) = fast.get(name, (0.0, 0.0)), base.get(name, (0.0, 0.0))
        print(f"| `{name}` | {tf:.3f} | {cf:.0f} | {tb:.3f} | {cb:.0f} |")


def median_ms(fn: Callable[[], object], *, steps: int, rounds: int = 5) -> float:
    """Median milliseconds per call over ``rounds`` rounds of ``steps // rounds`` calls.

    :param fn: The code to time.
    :param steps: Calls in all.
    :param rounds: Rounds, whose median is taken.
    """
    times = []
    per = max(1, steps // rounds)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times.append((time.perf_counter() - t0) / per * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lvae-bn-wu-5")
    parser.add_argument("--guide", default="ladder", choices=("ladder", "vae"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--operators", type=int, default=20, help="rows of the torch.profiler table")
    args = parser.parse_args(argv)

    config = get_preset(args.preset).replace(guide=args.guide)
    pyro.set_rng_seed(0)
    x = torch.bernoulli(load_dataset("mnist", root=args.data_root, download=False).train_x[: config.train.batch_size])
    beta = torch.tensor(1.0)
    model = GenerativeModel(config.model, name="profile")
    guide = make_guide(model)
    step = TrainingStep(model, guide, learning_rate=config.train.learning_rate)
    compact = CompactLVAE(*(lambda m: (m, make_guide(m)))(GenerativeModel(config.model, name="compact")))
    opt = torch.optim.Adam(compact.parameters(), lr=config.train.learning_rate, fused=True)

    def baseline() -> None:
        compact_loss(compact, x, beta).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fast() -> None:
        step(x, beta)

    for fn in (fast, baseline):  # warm-up
        for _ in range(5):
            fn()
    timed = {"fast engine": median_ms(fast, steps=args.steps), "baseline": median_ms(baseline, steps=args.steps)}
    shares = {"fast engine": profile_shares(fast, args.steps), "baseline": profile_shares(baseline, args.steps)}
    command = "python bench/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"`{command}`, {when}; torch {torch.__version__}, pyro-ppl {pyro.__version__}")
    print()
    print(f"{args.preset}, guide {args.guide}, batch {config.train.batch_size}, {torch.get_num_threads()} threads")
    print()
    print("| | fast engine | baseline |\n|---|---|---|")
    print(f"| ms/step, no profiler | {timed['fast engine']:.2f} | {timed['baseline']:.2f} |")
    names = sorted({k for s in shares.values() for k in s}, key=lambda k: -shares["fast engine"].get(k, 0.0))
    for name in names:
        cells = [f"{shares[v].get(name, 0.0) / args.steps * 1e3:.2f}" for v in ("fast engine", "baseline")]
        print(f"| {name}, ms/step under cProfile | {cells[0]} | {cells[1]} |")
    ops = {"fast engine": operator_times(fast, args.steps), "baseline": operator_times(baseline, args.steps)}
    _print_operator_table(ops, args.operators)
    _engine_pieces(step, model, guide, x, beta, args.steps)


def _engine_pieces(step: TrainingStep, model, guide, x: torch.Tensor, beta: torch.Tensor, steps: int) -> None:
    """The pieces the engine adds around the loss, timed one by one."""
    buffers = step._buffers()
    saved = [b.clone() for b in buffers]
    step.loss(x, beta).backward()
    params = trainable_parameters(model, guide)
    loss = torch.tensor(1.0)

    def clone_each() -> None:
        [b.clone() for b in buffers]

    def foreach_copy() -> None:
        torch._foreach_copy_(saved, buffers)

    def check() -> None:
        loss_and_grad_norm(loss, [p.grad for p in params])

    def finite_check() -> None:
        loss_and_gradients_finite(loss, [p.grad for p in params])

    rows = {
        "find the BN buffers: walk every module of model and guide (each step)": step._buffers,
        f"clone {len(buffers)} BN buffers, one by one (before)": clone_each,
        "copy them into kept storage, one multi-tensor call (now)": foreach_copy,
        f"finiteness check with a skip threshold: gradient norm of {len(params)} tensors, read back": check,
        "finiteness check without one (the default): one multi-tensor check, read back (now)": finite_check,
    }
    print()
    print("| piece of the fast step | ms |\n|---|---|")
    for name, fn in rows.items():
        for _ in range(5):
            fn()
        print(f"| {name} | {median_ms(fn, steps=steps * 5):.3f} |")


if __name__ == "__main__":
    main()
