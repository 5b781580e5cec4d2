"""The ``pyro-lvae`` command line.

``pyro-lvae train --preset NAME [--FIELD VALUE ...] --out DIR``
    Train a preset, with any configuration field overridden by its own option
    (``--epochs 10``, ``--latent-sizes 64,32``, ``--batch-norm false``), then print
    and write the test ELBO and L_K to ``DIR/results.json``.
``pyro-lvae evaluate RUN_DIR [--num-samples K]``
    Re-evaluate a trained run (e.g. with K = 5000) and rewrite its ``results.json``.
``pyro-lvae report RUN_DIR [RUN_DIR ...] --out DIR [--num-samples K]``
    Every analysis figure, PSIS k̂ diagnostics and ``report.md`` (:mod:`pyro_lvae.report`).
``pyro-lvae presets``
    List the presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

from .config import ModelConfig, TrainConfig
from .evaluation import DEFAULT_MEMORY_BUDGET
from .presets import PRESETS, get_preset
from .report import write_report
from .training import evaluate_run, train

logger = logging.getLogger("pyro_lvae")

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,32, got {text!r}") from None


_PARSERS = {"int": int, "float": float, "str": str, "bool": _parse_bool, "tuple[int, ...]": _parse_sizes}


def _config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ModelConfig)) + list(dataclasses.fields(TrainConfig))


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration overrides (default: the preset's value)")
    for f in _config_fields():
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_PARSERS[str(f.type)],
            default=None,
            metavar=str(f.type).split("[")[0].upper(),
        )


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, help="data folder (default: $PYRO_LVAE_DATA or ./data)")
    parser.add_argument("--no-download", action="store_true", help="never download missing data files")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=DEFAULT_MEMORY_BUDGET / 2**30,
        help="memory for one particle chunk of the L_K evaluation (default: 4)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-lvae``."""
    parser = argparse.ArgumentParser(
        prog="pyro-lvae", description="Ladder VAEs in Pyro (Sønderby et al., 2016).", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", allow_abbrev=False, help="train a preset and report test ELBO and L_K")
    p_train.add_argument("--preset", default="lvae-bn-wu-5", help="named configuration (default: lvae-bn-wu-5)")
    p_train.add_argument("--out", required=True, help="run directory")
    p_train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p_train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _add_config_options(p_train)
    _add_runtime_options(p_train)

    p_eval = sub.add_parser("evaluate", allow_abbrev=False, help="evaluate a trained run's test ELBO and L_K")
    p_eval.add_argument("run_dir", help="run directory written by `pyro-lvae train`")
    p_eval.add_argument("--num-samples", type=int, default=None, help="K of L_K (default: the run's setting)")
    _add_runtime_options(p_eval)

    p_report = sub.add_parser(
        "report", allow_abbrev=False, help="figures, PSIS diagnostics and a report.md for one or more runs"
    )
    p_report.add_argument("run_dirs", nargs="+", help="run directories written by `pyro-lvae train`")
    p_report.add_argument("--out", required=True, help="folder for the PNGs, netCDF files and report.md")
    p_report.add_argument("--num-samples", type=int, default=1000, help="K of L_K and of PSIS (default: 1000)")
    _add_runtime_options(p_report)

    sub.add_parser("presets", allow_abbrev=False, help="list the named presets")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in _config_fields() if getattr(args, f.name) is not None}


def _report(results: dict[str, Any]) -> str:
    k = results["num_importance_samples"]
    return (
        f"test ELBO (L1): {results['test_elbo']:.3f} nats\n"
        f"test L_{k}: {results['test_log_likelihood']:.3f} nats\n"
        f"({results['num_test_examples']} test examples, {results['epochs']} epochs)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-lvae`` console script.

    :param argv: The arguments, without the program name (default: ``sys.argv[1:]``).
    :returns: The exit status: 0 on success; invalid input exits with status 2 and one line on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "presets":
            for name, cfg in PRESETS.items():
                m = cfg.model
                sys.stdout.write(
                    f"{name:14s} family={m.family:5s} guide={m.guide:6s} latents={'-'.join(map(str, m.latent_sizes)):14s} "
                    f"bn={m.batch_norm!s:5s} warmup={cfg.train.warmup_epochs}\n"
                )
            return 0
        budget = int(args.memory_budget_gib * 2**30)
        if args.command == "report":
            report = write_report(
                args.run_dirs,
                args.out,
                num_samples=args.num_samples,
                data_root=args.data_root,
                download=not args.no_download,
                device=args.device,
                memory_budget=budget,
            )
            sys.stdout.write(report.read_text().split("\n## Comparisons")[0] + f"\nwritten: {report}\n")
            return 0
        if args.command == "train":
            config = get_preset(args.preset).replace(**_overrides(args))
            logger.info("Training %s: %s", config.name, json.dumps(config.to_dict()))
            result = train(
                config,
                out_dir=args.out,
                data_root=args.data_root,
                download=not args.no_download,
                device=args.device,
                resume=args.resume,
                overwrite=args.overwrite,
                memory_budget=budget,
                progress=not args.no_progress,
            )
            results = result.results
        else:
            results = evaluate_run(
                args.run_dir,
                num_samples=args.num_samples,
                data_root=args.data_root,
                download=not args.no_download,
                device=args.device,
                memory_budget=budget,
                progress=not args.no_progress,
            )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        parser.exit(2, f"pyro-lvae: error: {exc}\n")
    assert results is not None
    sys.stdout.write(_report(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
