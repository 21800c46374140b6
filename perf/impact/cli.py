"""The flags of `tritonbn-perf impact` and the run they start (tritonbn.perf.cli adds them to its parser)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .config import StudyConfig
from .models import MODEL_KINDS
from .study import run_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `tritonbn-perf impact`."""
    default = StudyConfig()
    parser.add_argument("--quick", action="store_true", help="a small sweep that runs in well under a minute")
    parser.add_argument("--out", type=Path, default=Path("report/impact"), help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {default.seeds})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--kernels", action="store_true",
                        help="on a CPU, train through the Triton kernels under the interpreter (needs "
                             "TRITON_INTERPRET=1; very slow) instead of the reference path; CUDA always runs "
                             "the kernels")
    parser.add_argument("--models", nargs="+", choices=MODEL_KINDS, help="which nets to study")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {default.steps})")
    parser.add_argument("--base-lr", type=float, help=f"LR of the init sweep and baseline (default "
                                                      f"{default.base_lr:g})")
    parser.add_argument("--dropout", type=float, help=f"dropout arm's p, 0 to skip it (default {default.dropout:g})")
    parser.add_argument("--noise-dose", type=float,
                        help="noisy BN arm (claim 5b): multiply the paper's per-unit shift and scale ranges by this "
                             f"(default {default.noise_dose:g}, the paper's noise)")
    parser.add_argument("--workers", type=int,
                        help="CPU runs train in this many processes at once (default: 2 if the machine has "
                             "2 cores; 1 with --quick, whose runs are too few to repay starting processes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: these nets are too small to gain from more)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    overrides = {name: value for name, value in (
        ("seeds", tuple(args.seeds) if args.seeds else None), ("models", tuple(args.models) if args.models else None),
        ("steps", args.steps), ("base_lr", args.base_lr), ("dropout", args.dropout),
        ("noise_dose", args.noise_dose)) if value is not None}
    return StudyConfig.quick(**overrides) if args.quick else StudyConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    """Run the study from parsed `add_arguments` flags; prints the verdicts and the report's path."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        config = config_from_args(args)
    except ValueError as error:  # settings that contradict each other are a usage error, not a crash
        print(f"tritonbn-perf impact: error: {error}", file=sys.stderr)
        return 2
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    rows, report = run_study(config, device, args.out, kernels=args.kernels, workers=workers,
                             threads=args.threads, progress=not args.no_progress)
    for row in rows:
        print(f"claim {row.number} ({row.claim}): {row.verdict}")
    print(f"report: {report}")
    return 0
