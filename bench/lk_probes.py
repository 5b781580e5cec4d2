"""Probes of the L_K evaluation's speed on the shipped models (docs/performance.md reports them).

    python bench/lk_probes.py slices --data-root /path/to/data       # pairs/s against the slice size
    python bench/lk_probes.py elementwise                            # the Bernoulli term's operations
    python bench/lk_probes.py inference-mode --data-root /path/to/data  # torch.inference_mode against no_grad
    python bench/lk_probes.py folded-batch-norm --data-root /path/to/data  # batch norm folded into the Linears
    python bench/lk_probes.py bf16 --data-root /path/to/data         # bfloat16 autocast against fp32
    python bench/lk_probes.py evaluate-bf16 --data-root /path/to/data  # evaluate() in bf16 against fp32

``slices`` evaluates L_K (K = ``--num-samples``) on the first ``--examples`` MNIST test
images with the shipped ``lvae-bn-wu-5`` and ``vae-bn-wu-3``, once per value of
:data:`~pyro_lvae.inference.closed_form.CPU_PAIRS_PER_SLICE`, in interleaved rounds. The
draws do not depend on the slice size, so every row prints the same L_K, up to the float32
rounding of matrix products of other sizes.

``inference-mode`` times the closed-form weights of the shipped ``lvae-bn-wu-5`` (3 chunks of
``--num-samples`` particles per round) under ``torch.inference_mode`` and under ``torch.no_grad``.

``folded-batch-norm`` times the closed-form weights of the shipped ``lvae-bn-wu-5`` (one call of
``--num-samples`` particles per round) with each MLP's evaluation-mode batch norm as its own pass
and folded into the ``Linear`` before it (:func:`~pyro_lvae.models.nn.batch_norm_folded`, what the
closed form now does), and prints the largest difference of the log weights on the same draws.

``bf16`` times the closed-form weights of the shipped ``lvae-bn-wu-5`` (one call of
``--num-samples`` particles per round) in fp32 and under the bfloat16 autocast that
``evaluate(precision="bf16")`` uses (the networks' matrix products in bf16, the densities in
fp32), and prints how far the bf16 log weights and the per-image L_K are from the fp32 ones on
the same draws.

``evaluate-bf16`` times :func:`~pyro_lvae.inference.evaluation.evaluate` itself (its batches of
500, particle chunks and seeded draws, as ``pyro-lvae evaluate`` and ``bench/lk_pretrained.py``
run it) on the first ``--examples`` test images with the shipped ``lvae-bn-wu-5``, with
``precision="fp32"`` and ``"bf16"`` in interleaved rounds, and prints each one's L_K and L1: the
whole-test-set ratio, measured in one run rather than across two runs at other moments.

``elementwise`` times, on a 10,000 × 784 float32 tensor of logits, torch's ``log1p``,
``exp``, ``log`` and ``F.softplus``, and the Bernoulli term x·ℓ − softplus(ℓ) summed over
the pixels, written with ``F.softplus`` and as the closed form writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from pyro_lvae.data import binarize, load_dataset
from pyro_lvae.inference import closed_form
from pyro_lvae.inference.evaluation import evaluate, importance_sampled_bounds
from pyro_lvae.precision import autocast_for
from pyro_lvae.pretrained import load_pretrained


def slices(args: argparse.Namespace) -> None:
    """Pairs per second of L_K against the number of (particle, example) pairs per slice."""
    x = _test_images(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    for name in ("lvae-bn-wu-5", "vae-bn-wu-3"):
        model, guide = load_pretrained(name)
        rates: dict[int, list[float]] = {size: [] for size in sizes}
        bound: dict[int, float] = {}
        for _ in range(args.rounds):
            for size in sizes:
                closed_form.CPU_PAIRS_PER_SLICE = size
                torch.manual_seed(1)
                t0 = time.perf_counter()
                out = importance_sampled_bounds(model, guide, x, num_samples=args.num_samples)
                rates[size].append(len(x) * args.num_samples / (time.perf_counter() - t0))
                bound[size] = out["log_likelihood"].mean().item()
        for size, values in rates.items():
            runs = ", ".join(f"{v:,.0f}" for v in values)
            print(f"{name}: {size:>7,} pairs per slice: {runs} pairs/s (L_K {bound[size]:.4f})")


def _test_images(args: argparse.Namespace) -> torch.Tensor:
    images = load_dataset("mnist", root=args.data_root, download=False).test_x[: args.examples]
    return binarize(images.reshape(len(images), -1).float(), generator=torch.Generator().manual_seed(0))


def _shipped_weights(args: argparse.Namespace) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """The probes' test images, and a call that weighs ``--num-samples`` particles of each with the
    shipped ``lvae-bn-wu-5`` in evaluation mode (the closed form's log weights, one call)."""
    x = _test_images(args)
    model, guide = load_pretrained("lvae-bn-wu-5")
    model.eval(), guide.eval()

    def weights() -> torch.Tensor:
        return closed_form.closed_form_log_weights(model, guide, x, args.num_samples)[0]

    return x, weights


def _interleaved_rates(
    variants: dict[str, Callable[[], torch.Tensor | None]], *, rounds: int, pairs: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor | None]]:
    """Pairs per second of each variant, one call of each per round on the same seed, and each
    variant's result of the last round: the loop of the timed probes below.

    :param variants: Name to a call that weighs ``pairs`` (particle, example) pairs.
    :param rounds: Interleaved rounds.
    :param pairs: The pairs one call weighs.
    """
    rates: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, torch.Tensor | None] = {}
    for _ in range(rounds):
        for name, call in variants.items():
            torch.manual_seed(1)
            t0 = time.perf_counter()
            results[name] = call()
            rates[name].append(pairs / (time.perf_counter() - t0))
    for name, values in rates.items():
        print(f"{name:15s} median {statistics.median(values):,.0f} pairs/s over {len(values)} rounds")
    return rates, results


def inference_mode(args: argparse.Namespace) -> None:
    """Pairs per second of the closed-form weights under ``inference_mode`` and ``no_grad``."""
    x = _test_images(args)
    model, guide = load_pretrained("lvae-bn-wu-5")

    def three_chunks(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
        def call() -> None:
            with context():
                for _ in range(3):
                    closed_form.closed_form_log_weights(model, guide, x, args.num_samples)

        return call

    variants = {"no_grad": three_chunks(torch.no_grad), "inference_mode": three_chunks(torch.inference_mode)}
    _interleaved_rates(variants, rounds=args.rounds, pairs=3 * len(x) * args.num_samples)


@contextlib.contextmanager
def _unfolded():
    """Inside, the closed form keeps batch norm as its own pass (as before 2026-12-07): the
    probe swaps the module's reference to :func:`~pyro_lvae.models.nn.batch_norm_folded`,
    since the library offers no switch for a path it has replaced."""
    original = closed_form.batch_norm_folded
    closed_form.batch_norm_folded = lambda *modules: contextlib.nullcontext()
    try:
        yield
    finally:
        closed_form.batch_norm_folded = original


@torch.no_grad()
def folded(args: argparse.Namespace) -> None:
    """Pairs per second of the closed-form weights with batch norm as its own pass and folded."""
    x, weights = _shipped_weights(args)

    def unfolded_weights() -> torch.Tensor:
        with _unfolded():
            return weights()

    variants = {"unfolded": unfolded_weights, "folded": weights}
    _, results = _interleaved_rates(variants, rounds=args.rounds, pairs=len(x) * args.num_samples)
    _print_difference(results["folded"], results["unfolded"])


def _print_difference(weights: torch.Tensor, reference: torch.Tensor) -> None:
    """The largest difference of two sets of log weights on the same draws, in nats and relative."""
    difference = (weights - reference).abs()
    relative = (difference / reference.abs()).max()
    print(f"log weights on the same draws: largest difference {difference.max():.2e} nats ({relative:.1e} relative)")


@torch.no_grad()
def bf16(args: argparse.Namespace) -> None:
    """Pairs per second of the closed-form weights in fp32 and under bfloat16 autocast, and how far
    the bf16 log weights and L_K are from the fp32 ones on the same draws."""
    x, weights = _shipped_weights(args)

    def bf16_weights() -> torch.Tensor:
        with autocast_for("bf16", x.device):  # what evaluate(precision="bf16") wraps each chunk in
            return weights()

    variants = {"fp32": weights, "bf16": bf16_weights}
    _, results = _interleaved_rates(variants, rounds=args.rounds, pairs=len(x) * args.num_samples)
    _print_difference(results["bf16"], results["fp32"])
    bounds = {name: torch.logsumexp(w, 0) - math.log(args.num_samples) for name, w in results.items()}
    gap = bounds["bf16"] - bounds["fp32"]
    print(
        f"L_{args.num_samples} on {len(x)} images: fp32 {bounds['fp32'].mean():.4f}, bf16 {bounds['bf16'].mean():.4f}; "
        f"per image bf16 − fp32 mean {gap.mean():+.4f}, sd {gap.std():.4f}, largest {gap.abs().max():.4f} nats"
    )


def evaluate_bf16(args: argparse.Namespace) -> None:
    """Pairs per second of ``evaluate`` with ``precision="fp32"`` and ``"bf16"``, interleaved."""
    x = _test_images(args)
    model, guide = load_pretrained("lvae-bn-wu-5")
    results: dict[str, dict] = {}

    def call(precision: str) -> Callable[[], None]:
        def run() -> None:
            results[precision] = evaluate(model, guide, x, num_samples=args.num_samples, seed=0, precision=precision)

        return run

    variants = {precision: call(precision) for precision in ("fp32", "bf16")}
    rates, _ = _interleaved_rates(variants, rounds=args.rounds, pairs=len(x) * args.num_samples)
    speedup = statistics.median(rates["bf16"]) / statistics.median(rates["fp32"])
    print(f"bf16 / fp32, medians: {speedup:.2f}x")
    for precision, out in results.items():
        print(f"{precision}: L_{args.num_samples} {out['log_likelihood']:.4f}, L1 {out['elbo']:.4f} on {len(x)} images")


def elementwise(args: argparse.Namespace) -> None:
    """Milliseconds of the Bernoulli term's operations, median of ``--rounds`` rounds of 10 calls."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10_000, 784, generator=generator) * 4
    x = torch.bernoulli(torch.full((10_000, 784), 0.2), generator=generator)
    positive, out = logits.abs(), torch.empty_like(logits)
    ops: dict[str, Callable[[], object]] = {
        "log1p": lambda: torch.log1p(positive, out=out),
        "exp": lambda: torch.exp(logits, out=out),
        "log": lambda: torch.log(positive, out=out),
        "F.softplus": lambda: F.softplus(logits),
        "x·ℓ − F.softplus(ℓ), summed": lambda: (x * logits - F.softplus(logits)).sum(-1),
        "the closed form's term": lambda: closed_form._bernoulli_log_likelihood(logits, x),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.rounds):
        for name, op in ops.items():
            t0 = time.perf_counter()
            for _ in range(10):
                op()
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    for name, values in times.items():
        print(f"{name:30s} {statistics.median(values):7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "probe", choices=("slices", "elementwise", "inference-mode", "folded-batch-norm", "bf16", "evaluate-bf16")
    )
    parser.add_argument("--data-root", default=None, help="data root (default $PYRO_LVAE_DATA)")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--sizes", default="1000,2500,5000,10000,20000,1000000", help="pairs per slice")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    probes = {
        "slices": slices,
        "elementwise": elementwise,
        "inference-mode": inference_mode,
        "folded-batch-norm": folded,
        "bf16": bf16,
        "evaluate-bf16": evaluate_bf16,
    }
    probes[args.probe](args)


if __name__ == "__main__":
    main()
