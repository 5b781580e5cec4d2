"""pyro-lvae benchmark: the library against a plain-PyTorch baseline, in one run.

Measures, for the ladder and the bottom-up guide of one preset (default
``lvae-bn-wu-5``, the paper's 5-layer model, batch 256):

* training-step time of the library's engines (``fast``, the default, and
  ``svi``, the textbook ``pyro.infer.SVI`` loop), of the intermediate stages
  between them (an ablation), and of the plain-PyTorch baseline in
  ``bench/baseline.py``; each divided by the baseline's time;
* seconds per MNIST epoch with :func:`pyro_lvae.training.loop.train`, with each engine;
* L_K evaluation throughput, in (examples × samples)/s, and its peak memory;
* FLOPs per step (counted by ``torch.utils.flop_counter``) and the achieved
  FLOP/s, against a matmul of the model's largest layer shape timed in the same
  run (the practical roofline).

Every time is the median over interleaved rounds after warm-up steps; on CUDA
each timed block ends with ``torch.cuda.synchronize()``. The baseline's loss is
checked against the library's on the same seed before anything is timed.

    python bench/run.py --data-root ../shared/data            # full run
    python bench/run.py --quick --data-root ../shared/data    # smoke test (CI)

It prints a table and writes the same numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline import CompactLVAE, compact_loss, plain_loss  # noqa: E402
from machine import machine, provenance  # noqa: E402

from pyro_lvae import get_preset  # noqa: E402
from pyro_lvae.data import load_dataset  # noqa: E402
from pyro_lvae.inference import evaluation  # noqa: E402
from pyro_lvae.inference.evaluation import evaluate  # noqa: E402
from pyro_lvae.inference.objectives import elbo_for  # noqa: E402
from pyro_lvae.models.families import make_guide  # noqa: E402
from pyro_lvae.models.model import GenerativeModel  # noqa: E402
from pyro_lvae.training import train  # noqa: E402
from pyro_lvae.training.steps import TrainingStep, registered_once, trainable_parameters  # noqa: E402

GUIDES = ("ladder", "vae")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(
    fns: dict[str, Callable[[], Any]], *, device: torch.device, rounds: int, per_round: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def _fused_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True)


def _build(config, device: torch.device, name: str):
    model = GenerativeModel(config.model, name=name).to(device)
    guide = make_guide(model).to(device)
    return model, guide


def step_functions(
    config, x: torch.Tensor, beta: torch.Tensor, *, compiled: bool = False
) -> dict[str, Callable[[], Any]]:
    """The step variants to time, each on its own copy of the networks.

    From the textbook loop to the library's fast engine, one change at a time:
    ``svi engine`` (``pyro.infer.SVI`` + ``pyro.optim.Adam``); ``+torch Adam`` (the
    same ELBO's ``differentiable_loss`` with one fused ``torch.optim.Adam``);
    ``+no validation`` (Pyro's argument checks off); ``+registered once`` (no
    per-call ``pyro.module``); ``fast engine`` (the library's engine, which also
    shares the top-down priors between the ladder guide and the model);
    ``plain, library modules`` (the loss in plain PyTorch on the library's modules) and
    ``baseline`` (the compact plain-PyTorch step of ``bench/baseline.py``); with ``compiled``
    also ``fast engine, compiled`` (``compile=True``: the closed form compiled by
    ``torch.compile``; the warm-up calls trace it and take the code from TorchInductor's caches,
    which :func:`compile_seconds` filled), ``fast engine, bf16`` and ``fast engine, bf16, compiled``
    (``precision="bf16"``, eager and compiled).
    """
    device, lr = x.device, config.train.learning_rate
    fns: dict[str, Callable[[], Any]] = {}

    model, guide = _build(config, device, "svi")
    svi = TrainingStep(model, guide, learning_rate=lr, engine="svi")
    fns["svi engine"] = lambda: svi(x, beta)

    for label, validate, once in (
        ("+torch Adam", True, False),
        ("+no validation", False, False),
        ("+registered once", False, True),
    ):
        model, guide = _build(config, device, label)
        elbo, opt = elbo_for(guide), _fused_adam(trainable_parameters(model, guide), lr)

        def stage(model=model, guide=guide, elbo=elbo, opt=opt, validate=validate, once=once):
            with pyro.validation_enabled(validate), registered_once(*((model, guide) if once else ())):
                loss = elbo.differentiable_loss(model, guide, x, beta)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[label] = stage

    model, guide = _build(config, device, "fast")
    fast = TrainingStep(model, guide, learning_rate=lr, engine="fast")
    fns["fast engine"] = lambda: fast(x, beta)
    if compiled:
        for label, precision, compile in (
            ("fast engine, compiled", "fp32", True),
            ("fast engine, bf16", "bf16", False),
            ("fast engine, bf16, compiled", "bf16", True),
        ):
            step = TrainingStep(*_build(config, device, label), learning_rate=lr, precision=precision, compile=compile)
            fns[label] = lambda step=step: step(x, beta)

    model, guide = _build(config, device, "plain")
    opt = _fused_adam(trainable_parameters(model, guide), lr)

    def plain(model=model, guide=guide, opt=opt):
        loss = plain_loss(model, guide, x, beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns["plain, library modules"] = plain

    compact = CompactLVAE(*_build(config, device, "baseline"))
    compact_opt = _fused_adam(list(compact.parameters()), lr)

    def baseline(compact=compact, opt=compact_opt):
        loss = compact_loss(compact, x, beta)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns["baseline"] = baseline
    return fns


def graph_step_functions(config, x: torch.Tensor, beta: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """On a GPU, both steps recorded as CUDA graphs: the library's engine and the baseline."""
    model, guide = _build(config, x.device, "graph")
    graphed = TrainingStep(model, guide, learning_rate=config.train.learning_rate, engine="cuda-graph")
    baseline = _graphed_baseline(CompactLVAE(*_build(config, x.device, "gbase")), x, beta, config.train.learning_rate)
    return {"cuda-graph engine": lambda: graphed(x, beta), "baseline, CUDA graph": baseline}


def _graphed_baseline(compact, x: torch.Tensor, beta: torch.Tensor, lr: float) -> Callable[[], Any]:
    """The compact baseline's step recorded as a CUDA graph (PyTorch's whole-network recipe)."""
    opt = torch.optim.Adam(
        list(compact.parameters()), lr=torch.tensor(lr, device=x.device), fused=True, capturable=True
    )

    def step():
        loss = compact_loss(compact, x, beta)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay(graph=graph, keep=(compact, opt)):  # the graph reads and writes their tensors: keep them alive
        graph.replay()

    return replay


def head_to_head(
    config, x: torch.Tensor, beta: torch.Tensor, *, rounds: int, per_round: int, compiled: bool = False
) -> dict[str, float]:
    """The fast engine and the baseline alone (and the compiled fast engine, with ``compiled``),
    interleaved: the ratio of the goal, without the other variants' networks and optimizer
    states competing for the cache between rounds."""
    alone = ("fast engine", "baseline", "fast engine, compiled")
    fns = {k: v for k, v in step_functions(config, x, beta, compiled=compiled).items() if k in alone}
    return _median_ms(fns, device=x.device, rounds=rounds, per_round=per_round, warmup=3)


def compile_seconds(config, x: torch.Tensor, beta: torch.Tensor, *, precision: str = "fp32") -> float:
    """Seconds of the first step with ``compile=True`` (torch.compile of the closed form), which
    compiles; TorchInductor's on-disk cache of an earlier process shortens it."""
    lr = config.train.learning_rate
    step = TrainingStep(
        *_build(config, x.device, f"compiling-{precision}"), learning_rate=lr, precision=precision, compile=True
    )
    start = time.perf_counter()
    step(x, beta)
    _sync(x.device)
    return time.perf_counter() - start


def check_baseline(config, x: torch.Tensor, beta: torch.Tensor) -> float:
    """Largest relative difference between a plain loss (the compact baseline's and the one on
    the library's modules) and the library's, on the same draws."""
    model, guide = _build(config, x.device, "check")
    step = TrainingStep(model, guide, learning_rate=config.train.learning_rate)
    compact = CompactLVAE(model, guide)  # the same values, copied before any step
    pyro.set_rng_seed(7)
    library = step.loss(x, beta).item()
    worst = 0.0
    for name, loss in (
        ("plain", lambda: plain_loss(model, guide, x, beta)),
        ("compact", lambda: compact_loss(compact, x, beta)),
    ):
        pyro.set_rng_seed(7)
        value = loss().item()
        rel = abs(library - value) / abs(library)
        if rel > 1e-4:
            raise RuntimeError(
                f"The {name} baseline computes a different loss ({value} vs {library}); the comparison is invalid."
            )
        worst = max(worst, rel)
    return worst


def step_flops(config, x: torch.Tensor, beta: torch.Tensor) -> int:
    """FLOPs of one baseline step (forward and backward), as counted by PyTorch."""
    compact = CompactLVAE(*_build(config, x.device, "flops"))
    with FlopCounterMode(display=False) as counter:
        compact_loss(compact, x, beta).backward()
    return counter.get_total_flops()


def matmul_roofline(config, batch: int, device: torch.device, *, rounds: int) -> float:
    """FLOP/s of a matmul with the model's largest layer shape, (batch × input_dim) @ (input_dim × hidden_0)."""
    m, k, n = batch, config.model.input_dim, config.model.hidden_sizes[0]
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    ms = _median_ms({"mm": lambda: a @ b}, device=device, rounds=rounds, per_round=20, warmup=10)["mm"]
    return 2 * m * k * n / (ms / 1e3)


def _time_lk(model, guide, test: torch.Tensor, num_samples: int, device: torch.device) -> float:
    """Seconds of one L_K evaluation."""
    _sync(device)
    t0 = time.perf_counter()
    evaluate(model, guide, test, num_samples=num_samples, seed=0)
    _sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _traced_weights():
    """Weigh on Pyro's traced path: the closed form switched off, both where the evaluation
    reads it (imported by name) and where the objectives read it (looked up at call time)."""
    from pyro_lvae.inference import closed_form

    originals = evaluation.closed_form_applies, closed_form.closed_form_applies
    evaluation.closed_form_applies = closed_form.closed_form_applies = lambda *args: False
    try:
        yield
    finally:
        evaluation.closed_form_applies, closed_form.closed_form_applies = originals


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is the process's peak resident set in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--preset", default="lvae-bn-wu-5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=None, help="data root (default $PYRO_LVAE_DATA)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the L_K throughput measurement")
    parser.add_argument("--lk-examples", type=int, default=None, help="test examples for the L_K measurement")
    parser.add_argument("--epoch-subset", type=int, default=0, help="train examples for the epoch time (0 = all)")
    parser.add_argument("--steps-only", action="store_true", help="time the training steps only (no epoch, no L_K)")
    parser.add_argument("--json", default=None, help="where to write the results (default bench/results/<device>.json)")
    args = parser.parse_args(argv)
    # The quick mode's sizes: a smoke test of every code path, in seconds.
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.per_round = 2 if args.quick else 10
    args.num_samples = 50 if args.quick else args.num_samples
    args.lk_examples = args.lk_examples or (16 if args.quick else 200)
    args.epoch_subset = 1024 if args.quick else args.epoch_subset
    return args


def measure_steps(config, x: torch.Tensor, beta: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Every step variant in interleaved rounds, the head-to-head pair, the baseline's check, the
    FLOPs and, outside the quick mode (it compiles for about a minute), the compile times."""
    device, rounds, per_round = x.device, args.rounds, args.per_round
    rel = check_baseline(config, x, beta)
    flops = step_flops(config, x, beta)
    compiled = not args.quick
    compiling = compile_seconds(config, x, beta) if compiled else None
    compiling_bf16 = compile_seconds(config, x, beta, precision="bf16") if compiled else None
    fns = step_functions(config, x, beta, compiled=compiled)
    ms = _median_ms(fns, device=device, rounds=rounds, per_round=per_round, warmup=3)
    measured = {
        "step_ms": ms,
        "ratio_to_baseline": {k: v / ms["baseline"] for k, v in ms.items()},
        "baseline_loss_rel_diff": rel,
        "step_flops": flops,
        "achieved_flops": {k: flops / (v / 1e3) for k, v in ms.items() if k in ("fast engine", "baseline")},
        "head_to_head_ms": head_to_head(config, x, beta, rounds=2 * rounds, per_round=per_round, compiled=compiled),
        "compile_seconds": compiling,
        "compile_seconds_bf16": compiling_bf16,
    }
    if device.type == "cuda":
        graphs = graph_step_functions(config, x, beta)
        measured["graph_step_ms"] = _median_ms(graphs, device=device, rounds=rounds, per_round=per_round, warmup=5)
    return measured


def _train_quietly(config, mnist, device: torch.device, *, epochs: int = 1, **options: Any):
    """:func:`~pyro_lvae.training.loop.train` for ``epochs`` with ``options`` set, without a
    progress bar or the final evaluation: the run, for its metrics, model and data."""
    config = config.replace(epochs=epochs, **options)
    return train(config, dataset=mnist, device=device, progress=False, final_evaluation=False)


def _epoch_seconds(config, mnist, device: torch.device, *, epochs: int = 1, **options: Any) -> list[float]:
    """Seconds of each epoch of :func:`_train_quietly` with ``options`` set."""
    return [m["seconds"] for m in _train_quietly(config, mnist, device, epochs=epochs, **options).metrics]


def measure_epochs_and_lk(config, mnist, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Epoch seconds of each engine, then L_K on the fast engine's model, closed form and traced."""
    epoch_cfg = config.replace(train_subset=args.epoch_subset)
    epoch = _train_quietly(epoch_cfg, mnist, device)
    measured: dict[str, Any] = {
        "epoch_seconds": epoch.metrics[0]["seconds"],
        "epoch_seconds_svi_engine": _epoch_seconds(epoch_cfg, mnist, device, engine="svi")[0],
        "epoch_steps": -(-len(epoch.data.train) // config.train.batch_size),
    }
    if not args.quick:  # the second epoch: the first step of the first traces the loss again (2 s)
        measured["epoch_seconds_compiled"] = _epoch_seconds(epoch_cfg, mnist, device, epochs=2, compile=True)[1]
    if device.type == "cuda":  # two epochs: the first records the graphs after its warm-up steps
        measured["epoch_seconds_cuda_graph"] = _epoch_seconds(epoch_cfg, mnist, device, epochs=2, engine="cuda-graph")

    test = epoch.data.test[: args.lk_examples]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lk_seconds = _time_lk(epoch.model, epoch.guide, test, args.num_samples, device)
    # The same evaluation on the traced path (Pyro traces and distribution objects), for the ratio.
    with _traced_weights():
        lk_seconds_traced = _time_lk(epoch.model, epoch.guide, test, args.num_samples, device)
    return measured | {
        "lk_num_samples": args.num_samples,
        "lk_examples": len(test),
        "lk_seconds": lk_seconds,
        "lk_seconds_traced": lk_seconds_traced,
        "lk_pairs_per_second": len(test) * args.num_samples / lk_seconds,
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    device = torch.device(args.device)
    base = get_preset(args.preset)
    if args.quick:
        base = base.replace(latent_sizes=(8, 4), hidden_sizes=(32, 16), batch_size=64)
    batch = base.train.batch_size

    # One fixed binarized minibatch and β for every step timing.
    pyro.set_rng_seed(0)
    mnist = load_dataset("mnist", root=args.data_root, download=False)
    x = torch.bernoulli(mnist.train_x[:batch]).to(device)
    beta = torch.tensor(0.5, device=device)

    results: dict[str, Any] = {
        "preset": args.preset,
        "quick": args.quick,
        **machine(device),
        **provenance("bench/run.py", argv),
        "batch_size": batch,
        "matmul_roofline_flops": matmul_roofline(base, batch, device, rounds=args.rounds),
        "guides": {},
    }
    for guide_name in GUIDES:
        config = base.replace(guide=guide_name)
        pyro.clear_param_store()
        results["guides"][guide_name] = measure_steps(config, x, beta, args)
        if not args.steps_only:
            results["guides"][guide_name] |= measure_epochs_and_lk(config, mnist, device, args)

    print(format_table(results))
    suffix = ("-quick" if args.quick else "") + ("-steps" if args.steps_only else "")
    out = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / f"{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, one row per guide and step variant."""
    lines = [
        f"device: {results['device']}"
        + (
            f", {results['cpu_capability']}, native bf16: {results['cpu_native_bf16']}"
            if "cpu_capability" in results
            else ""
        )
        + f"; torch {results['torch']}, pyro {results['pyro']}; {results['date']}",
        f"preset {results['preset']}{' (quick sizes)' if results['quick'] else ''}, batch {results['batch_size']}; "
        f"matmul roofline {results['matmul_roofline_flops'] / 1e9:.1f} GFLOP/s",
        "",
        "| guide | step variant | ms/step | × baseline |",
        "|---|---|---|---|",
    ]
    for guide, r in results["guides"].items():
        for variant, ms in r["step_ms"].items():
            lines.append(f"| {guide} | {variant} | {ms:.2f} | {r['ratio_to_baseline'][variant]:.2f} |")
    for guide, r in results["guides"].items():
        for variant, ms in r.get("graph_step_ms", {}).items():
            lines.append(
                f"| {guide} | {variant} | {ms:.2f} | {ms / r['graph_step_ms']['baseline, CUDA graph']:.2f} "
                "× the graphed baseline |"
            )
    for guide, r in results["guides"].items():
        pair = r["head_to_head_ms"]
        for variant in ("fast engine", "fast engine, compiled"):
            if variant in pair:
                lines.append(
                    f"| {guide} | {variant}, timed alone with the baseline ({pair['baseline']:.2f} ms) "
                    f"| {pair[variant]:.2f} | {pair[variant] / pair['baseline']:.2f} |"
                )
    lines += [
        "",
        "| guide | s/epoch fast (svi engine) (steps) | L_K: K, examples, s (traced path), pairs/s | peak memory "
        "| GFLOP/step | GFLOP/s fast (baseline) | of roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for guide, r in results["guides"].items():
        if "epoch_seconds" not in r:
            continue
        fast, base = r["achieved_flops"]["fast engine"], r["achieved_flops"]["baseline"]
        lines.append(
            f"| {guide} | {r['epoch_seconds']:.2f} ({r['epoch_seconds_svi_engine']:.2f}) ({r['epoch_steps']}) "
            f"| {r['lk_num_samples']}, {r['lk_examples']}, "
            f"{r['lk_seconds']:.1f} (traced {r['lk_seconds_traced']:.1f}), {r['lk_pairs_per_second']:,.0f} "
            f"| {r['peak_memory_bytes'] / 2**20:,.0f} MiB | "
            f"{r['step_flops'] / 1e9:.3f} | {fast / 1e9:.1f} ({base / 1e9:.1f}) "
            f"| {fast / results['matmul_roofline_flops']:.0%} |"
        )
    for guide, r in results["guides"].items():
        if r.get("compile_seconds") is not None:
            epoch = r.get("epoch_seconds_compiled")
            lines.append(
                f"\n{guide}: compile=True: the first step compiles in {r['compile_seconds']:.1f} s "
                f"(under bf16 {r['compile_seconds_bf16']:.1f} s)"
                + (f"; s/epoch compiled {epoch:.2f}" if epoch is not None else "")
            )
        if "epoch_seconds_cuda_graph" in r:
            epochs = ", ".join(f"{s:.2f}" for s in r["epoch_seconds_cuda_graph"])
            lines.append(f"\n{guide}: s/epoch, cuda-graph engine (first epoch records the graphs): {epochs}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
