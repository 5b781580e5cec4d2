"""The ``pyro-lvae`` command line.

``pyro-lvae train --preset NAME [--FIELD VALUE ...] --out DIR``
    Train a preset, with any configuration field overridden by its own option
    (``--epochs 10``, ``--latent-sizes 64,32``, ``--batch-norm false``), then print
    and write the test ELBO and L_K to ``DIR/results.json``.
``pyro-lvae evaluate RUN_DIR [--num-samples K]``
    Re-evaluate a trained run (e.g. with K = 5000) and rewrite its ``results.json``.
``pyro-lvae report RUN_DIR [RUN_DIR ...] --out DIR [--num-samples K]``
    Every analysis figure, PSIS k̂ diagnostics and ``report.md`` (:mod:`pyro_lvae.analysis.report`).
``pyro-lvae sweep GRID --out DIR [--workers N] [--set KEY=VALUE ...]``
    Run a grid of presets × depths × seeds as parallel, resumable processes and
    aggregate their results (:mod:`pyro_lvae.repro.sweep`).
``pyro-lvae results-page SWEEP_DIR [...] --out docs/results.md``
    The results page, paper beside measured numbers, from the sweeps' ``results.json``
    (:mod:`pyro_lvae.repro.results_page`).
``pyro-lvae export RUN_DIR --name NAME --out DIR [--commit SHA]``
    Write a trained run's model and guide as a pretrained file with a manifest entry
    (:mod:`pyro_lvae.pretrained`), for :func:`~pyro_lvae.pretrained.load_pretrained`.
``pyro-lvae presets``
    List the presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    ALIASES,
    CHOICES,
    DEFAULT_MEMORY_BUDGET,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    field_type,
    parse_field,
    type_form,
)
from .repro.presets import PRESETS, get_preset
from .repro.sweep import SUMMARY_MD, load_grid, parse_override, run_sweep, shipped_grids
from .training.signals import TrainingInterrupted
from .training.skipping import TooManySkippedSteps

if TYPE_CHECKING:
    from .training.results_file import RunResults

# torch, Pyro and the trainer are imported by the handlers that need them, so that
# `pyro-lvae --help` and argument errors answer without loading them.

logger = logging.getLogger("pyro_lvae")

#: The preset of ``pyro-lvae train`` without ``--preset``: the paper's 5-layer LVAE.
DEFAULT_PRESET = "lvae-bn-wu-5"


def _config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ModelConfig)) + list(dataclasses.fields(TrainConfig))


def param_docs(cls: type) -> dict[str, str]:
    """The ``:param name: text`` entries of a class docstring, as plain one-line text.

    :param cls: A class with a reST docstring, e.g. :class:`~pyro_lvae.config.TrainConfig`.
    """
    doc = cls.__doc__ or ""
    docs = {}
    for name, text in re.findall(r":param (\w+): (.*?)(?=\n\s*:param |\n\s*\n|\Z)", doc, flags=re.S):
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)  # :class:`~a.b.C` -> C
        docs[name] = " ".join(text.replace("``", "").split())
    return docs


def _field_parser(name: str) -> Any:
    """An argparse ``type`` for configuration field ``name`` (:func:`~pyro_lvae.config.parse_field`)."""

    def parse(text: str) -> Any:
        try:
            return parse_field(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _metavar(f: dataclasses.Field) -> str:
    """How an option's value is shown in ``--help``: its choices, or the form of its type."""
    kind = field_type(f.name)
    choices = CHOICES.get(f.name, ()) + tuple(ALIASES.get(f.name, {}))
    if choices:  # the words, and the other arms of a union (FLOAT beside "auto")
        other = [_METAVARS.get(type_form(arm), "VALUE") for arm in typing.get_args(kind) if arm is not str]
        return "{" + ",".join(choices + tuple(other)) + "}"
    return _METAVARS.get(type_form(kind), "VALUE")


#: ``--help``'s short names of the forms of :func:`~pyro_lvae.config.type_form`.
_METAVARS = {
    "true or false": "BOOL",
    "an integer": "INT",
    "a number": "FLOAT",
    "text": "TEXT",
    "comma-separated integers": "INT,INT,...",
    "none": "none",
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration overrides (default: the preset's value, or the run's on --resume)")
    docs = param_docs(ModelConfig) | param_docs(TrainConfig)
    for f in _config_fields():
        # A switch alone means true (--compile), as well as --compile true / false.
        switch = {"nargs": "?", "const": True} if field_type(f.name) is bool else {}
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_field_parser(f.name),
            default=None,
            metavar=_metavar(f),
            help=docs.get(f.name, "").replace("%", "%%"),
            **switch,
        )


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, help="data folder (default: $PYRO_LVAE_DATA or ./data)")
    parser.add_argument("--no-download", action="store_true", help="never download missing data files")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--memory-budget-gib",
        type=_memory_budget_gib,
        default=DEFAULT_MEMORY_BUDGET / 2**30,
        help="memory for one particle chunk of the L_K evaluation (default: 4)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help=f"named configuration (default: {DEFAULT_PRESET}; on --resume, the run's stored configuration)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its stored configuration; "
        "options change only what they name",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument(
        "--final-eval-subset",
        type=int,
        default=0,
        metavar="N",
        help="run the final test ELBO and L_K on the first N test examples only (default: all)",
    )
    p.add_argument("--no-final-eval", action="store_true", help="skip the final test ELBO and L_K evaluation")
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard events (scalars per epoch, image grids per evaluation) into DIR; "
        "needs pip install 'pyro-lvae[tensorboard]'",
    )
    _add_config_options(p)
    _add_runtime_options(p)


def _add_evaluate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `pyro-lvae train`")
    p.add_argument("--num-samples", type=int, default=None, help="K of L_K (default: the run's setting)")
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        metavar="N",
        help="evaluate the first N test examples only (default: the run's setting)",
    )
    _add_weights_option(p)
    _add_runtime_options(p)


def _add_report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories written by `pyro-lvae train`")
    p.add_argument("--out", required=True, help="folder for the PNGs, netCDF files and report.md")
    p.add_argument("--num-samples", type=int, default=1000, help="K of L_K and of PSIS (default: 1000)")
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        metavar="N",
        help="analyse the first N test examples only (default: the run's setting)",
    )
    _add_weights_option(p)
    _add_runtime_options(p)


def _add_weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="auto: the moving average of the weights when the run kept one (--ema), else the raw weights",
    )


def _add_sweep_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid file (TOML) or the name of a shipped grid: " + ", ".join(shipped_grids()))
    p.add_argument("--out", required=True, help="sweep directory (one run directory per grid point)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (default: 1)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="shorten the paper's schedule to this many epochs, scaling warm-up and fine-tuning alike",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration field in every run, e.g. --set num_importance_samples=1000 (repeatable); "
        "shorten the schedule with --epochs, which scales the warm-up too",
    )
    p.add_argument(
        "--threads-per-worker", type=int, default=None, help="CPU threads per run (default: cores / workers)"
    )
    p.add_argument("--data-root", default=None, help="data folder (default: $PYRO_LVAE_DATA or ./data)")
    p.add_argument("--device", default="cpu", help="cpu or cuda; on cuda the workers share the GPU")


def _add_results_page_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweeps", nargs="+", help="sweep directories (each with its runs' results.json)")
    p.add_argument("--out", required=True, help="the Markdown file to write, e.g. docs/results.md")


def _add_export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `pyro-lvae train`, with its results.json")
    p.add_argument("--name", required=True, help="the model's name, usually its preset")
    p.add_argument("--out", required=True, help="folder of pretrained files (pyro_lvae/pretrained to ship it)")
    p.add_argument("--commit", default="", help="the code version that trained it (git rev-parse HEAD)")
    p.add_argument("--data-root", default=None, help="data folder (default: $PYRO_LVAE_DATA or ./data)")
    _add_weights_option(p)


def _add_presets_parser(p: argparse.ArgumentParser) -> None:
    pass  # no options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-lvae``: one subparser per entry of :data:`COMMANDS`,
    whose handler it stores as ``func``."""
    parser = argparse.ArgumentParser(
        prog="pyro-lvae", description="Ladder VAEs in Pyro (Sønderby et al., 2016).", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options, handler) in COMMANDS.items():
        p = sub.add_parser(name, allow_abbrev=False, help=help_text)
        add_options(p)
        p.set_defaults(func=handler)
    return parser


def _unknown_option_message(command: str, unknown: list[str]) -> str:
    """One sentence naming the first unknown argument and the closest known option."""
    help_text = _command_parser(command).format_help()
    options = sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", help_text)))
    first = next((u for u in unknown if u.startswith("-")), unknown[0])
    close = difflib.get_close_matches(first.split("=")[0], options, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"unknown argument {first!r} for `pyro-lvae {command}`; {hint}`pyro-lvae {command} --help` lists the options."
    )


def _command_parser(command: str) -> argparse.ArgumentParser:
    """A stand-alone parser with the options of ``command``."""
    parser = argparse.ArgumentParser(prog=f"pyro-lvae {command}", allow_abbrev=False)
    COMMANDS[command][1](parser)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in _config_fields() if getattr(args, f.name) is not None}


def _train_config(args: argparse.Namespace) -> ExperimentConfig:
    """The preset with the options applied; on ``--resume`` without ``--preset``, the run's
    stored configuration with them. (``train`` checks that a resumed run's configuration
    differs from the stored one only where a resume may change it.)"""
    from .training.checkpoint import load_checkpoint

    overrides = _overrides(args)
    if args.resume and args.preset is None:
        return ExperimentConfig.from_dict(load_checkpoint(args.out)["config"]).replace(**overrides)
    return get_preset(args.preset or DEFAULT_PRESET).replace(**overrides)


def _report(results: RunResults) -> str:
    return (
        f"test ELBO (L1): {results.test_elbo:.3f} nats\n"
        f"test L_{results.num_importance_samples}: {results.test_log_likelihood:.3f} nats\n"
        f"({results.num_test_examples} test examples, {results.epochs} epochs"
        f"{', moving-average weights' if results.weights == 'ema' else ''})\n"
    )


def _memory_budget_gib(text: str) -> float:
    """``--memory-budget-gib``: a finite number of GiB, at least one byte."""
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib * 2**30 < 1:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of GiB (e.g. 4), got {text!r}")
    return gib


def _budget(args: argparse.Namespace) -> int:
    return int(args.memory_budget_gib * 2**30)


def _train(args: argparse.Namespace) -> int:
    from .training.loop import train

    config = _train_config(args)
    logger.info("Training %s: %s", config.name, json.dumps(config.to_dict()))
    result = train(
        config,
        out_dir=args.out,
        data_root=args.data_root,
        download=not args.no_download,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        final_evaluation=not args.no_final_eval,
        final_eval_subset=args.final_eval_subset,
        memory_budget=_budget(args),
        progress=not args.no_progress,
        tensorboard=args.tensorboard,
    )
    if result.results is None:
        sys.stdout.write(f"Trained {len(result.metrics)} epochs; evaluate with: pyro-lvae evaluate {args.out}\n")
    else:
        sys.stdout.write(_report(result.results))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .training.results import evaluate_run

    results = evaluate_run(
        args.run_dir,
        num_samples=args.num_samples,
        data_root=args.data_root,
        download=not args.no_download,
        device=args.device,
        memory_budget=_budget(args),
        progress=not args.no_progress,
        test_subset=args.test_subset,
        weights=args.weights,
    )
    sys.stdout.write(_report(results))
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .analysis.report import write_report  # matplotlib and arviz: only for this command

    report = write_report(
        args.run_dirs,
        args.out,
        num_samples=args.num_samples,
        data_root=args.data_root,
        download=not args.no_download,
        device=args.device,
        memory_budget=_budget(args),
        test_subset=args.test_subset,
        weights=args.weights,
    )
    sys.stdout.write(report.read_text().split("\n## Comparisons")[0] + f"\nwritten: {report}\n")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, overrides=dict(parse_override(s) for s in args.set), epochs=args.epochs)
    rows = run_sweep(
        grid,
        args.out,
        workers=args.workers,
        device=args.device,
        data_root=args.data_root,
        threads_per_worker=args.threads_per_worker,
    )
    sys.stdout.write((Path(args.out) / SUMMARY_MD).read_text())
    return 0 if all(r["status"] == "done" for r in rows) else 1


def _results_page(args: argparse.Namespace) -> int:
    from .repro.results_page import write_results_page  # matplotlib: only for this command

    page = write_results_page(args.sweeps, args.out)
    sys.stdout.write(f"written: {page}\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .pretrained import export_run

    entry = export_run(
        args.run_dir, args.out, name=args.name, commit=args.commit, data_root=args.data_root, weights=args.weights
    )
    sys.stdout.write(json.dumps(entry, indent=2) + "\n")
    return 0


def _presets(args: argparse.Namespace) -> int:
    for name, cfg in PRESETS.items():
        m, t = cfg.model, cfg.train
        sys.stdout.write(
            f"{name:30s} family={m.family:5s} guide={m.guide:6s} latents={'-'.join(map(str, m.latent_sizes)):14s} "
            f"bn={m.batch_norm!s:5s} warmup={t.warmup_epochs:<3d} data={t.dataset:13s} "
            f"likelihood={m.likelihood:9s} epochs={t.epochs}+{t.finetune_epochs}\n"
        )
    return 0


#: Each subcommand: its help line, the function that adds its options, and its handler.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a preset and report test ELBO and L_K", _add_train_parser, _train),
    "evaluate": ("evaluate a trained run's test ELBO and L_K", _add_evaluate_parser, _evaluate),
    "report": ("figures, PSIS diagnostics and a report.md for one or more runs", _add_report_parser, _report_command),
    "sweep": ("run a grid of presets x depths x seeds as parallel, resumable processes", _add_sweep_parser, _sweep),
    "results-page": (
        "write docs/results.md and its figures from sweep directories",
        _add_results_page_parser,
        _results_page,
    ),
    "export": ("write a trained run as a pretrained file with sha256 and check value", _add_export_parser, _export),
    "presets": ("list the named presets", _add_presets_parser, _presets),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-lvae`` console script.

    :param argv: The arguments, without the program name (default: ``sys.argv[1:]``).
    :returns: The exit status: 0 on success; invalid input exits with status 2 and one line on stderr.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.exit(2, f"pyro-lvae: error: {_unknown_option_message(args.command, unknown)}\n")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        parser.exit(2, f"pyro-lvae: error: {exc}\n")
    except TrainingInterrupted as exc:
        parser.exit(128 + exc.signum, f"pyro-lvae: {exc}\n")
    except (FloatingPointError, TooManySkippedSteps) as exc:  # training stopped, its checkpoint intact
        parser.exit(1, f"pyro-lvae: error: {exc}\n")
    except OSError as exc:  # a full disk, a permission: checkpoints are written atomically, so none is lost
        parser.exit(
            1,
            f"pyro-lvae: error: {exc}; every checkpoint written before it is intact: fix the cause, then run the "
            "command again (with --resume for a training run).\n",
        )


if __name__ == "__main__":
    raise SystemExit(main())
