"""`tritonbn-perf`: sweep, report, traffic, step and impact subcommands.

Parsing imports nothing heavy, and on a CPU TRITON_INTERPRET=1 is set before triton is first imported,
so the kernels run under the interpreter. A bad flag or value ends with one line on stderr and exit
status 2, never a traceback.
"""

import argparse
import dataclasses
import os
import sys

MODES = ("fwd", "bwd", "fwd_bwd", "eval")
DTYPES = ("fp32", "fp16", "bf16", "fp64")
LAYOUTS = ("nchw", "nhwc")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _choices(allowed, what):
    """An argparse type for a comma-separated list whose items must be in `allowed`."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(allowed)}")
        return items

    return parse


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected N,C[,spatial...] positive integers")
    return shape


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _activations():
    # The pinned list of tritonbn.ACTIVATIONS, read from the package when it provides it.
    import tritonbn

    return tuple(getattr(tritonbn, "ACTIVATIONS", (
        "identity", "relu", "leaky_relu", "relu6", "elu", "silu", "gelu", "hardswish")))


def _flatten(lists):
    return [item for items in lists for item in items]


def _add_device(parser):
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (kernels under the Triton interpreter)")


def _add_sweep(sub):
    from .backends import ALL as BACKENDS
    from .shapes import PRESETS

    p = sub.add_parser("sweep", help="time every backend over shapes, dtypes, layouts, activations and modes")
    p.add_argument("--preset", type=_choices(PRESETS, "preset"), action="append", default=[],
                   help=f"shape presets, comma-separated or repeated: {', '.join(PRESETS)} "
                        "(default: resnet50 on CUDA, tiny on CPU)")
    p.add_argument("--shape", type=_shape, action="append", default=[], help="extra shape N,C[,H,W[,D]]")
    p.add_argument("--batch", type=_positive, default=None, help="batch size for network presets "
                   "(resnet50 and mobilenetv2: 64, resnet3d: 8, mlp: 4096)")
    p.add_argument("--dtype", type=_choices(DTYPES, "dtype"), default=["fp32"])
    p.add_argument("--layout", type=_choices(LAYOUTS, "layout"), default=["nchw"],
                   help="nhwc = channels_last (4-D and 5-D shapes only)")
    p.add_argument("--activation", type=_choices(_activations(), "activation"), default=["relu"])
    p.add_argument("--residual", choices=("off", "on", "both"), nargs="?", const="on", default="off",
                   help="sweep with a residual add (--residual = on)")
    p.add_argument("--mode", type=_choices(MODES, "mode"), default=list(MODES))
    p.add_argument("--backend", type=_choices(BACKENDS, "backend"), default=list(BACKENDS),
                   help="backends not importable here are recorded as skipped, with the reason")
    _add_device(p)
    p.add_argument("--out", required=True, help="results CSV (rows of re-run configurations are replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_report(sub):
    p = sub.add_parser("report", help="plots and report.md from a sweep CSV")
    p.add_argument("csv", help="results CSV written by `sweep`")
    p.add_argument("--out", default=None, help="output directory (default: <csv name>_report next to the CSV)")


def _add_traffic(sub):
    p = sub.add_parser("traffic", help="bytes each mode moves, counted under the Triton interpreter (CPU)")
    p.add_argument("--shape", type=_shape, default=(8, 4, 32, 32),
                   help="activation shape; per-channel traffic is a larger share of small or wide shapes")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--layout", choices=LAYOUTS, default="nchw")
    p.add_argument("--activation", type=_choices(_activations(), "activation"), default=["relu"])
    p.add_argument("--out", default=None, help="also write the table as CSV here")
    p.add_argument("--check", action="store_true", help="exit 1 when a mode exceeds its traffic budget")


def _add_step(sub):
    from .step import BACKENDS

    p = sub.add_parser("step", help="share of a training step that BN+activation costs, per backend")
    # Shape defaults: a realistic network on CUDA, a toy one on a CPU (see step.CPU_STEP_CONFIG).
    p.add_argument("--batch", type=_positive, help="default: 64 on CUDA, 2 on a CPU")
    p.add_argument("--width", type=_positive, help="channels of every conv and BN (default: 128 on CUDA, 8 on a CPU)")
    p.add_argument("--size", type=_positive, help="height and width of the feature maps (default: 56 / 8)")
    p.add_argument("--blocks", type=_positive, help="residual blocks, two BN layers each (default: 4 / 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16 run under autocast, BN parameters in fp32")
    p.add_argument("--layout", choices=LAYOUTS, default="nchw")
    p.add_argument("--backend", type=_choices(BACKENDS, "backend"), default=list(BACKENDS))
    _add_device(p)
    p.add_argument("--out", default=None, help="also write the rows as CSV here")


def build_parser(command: str | None) -> Parser:
    parser = Parser(prog="tritonbn-perf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sweep,report,traffic,step,impact}")
    _add_sweep(sub)
    _add_report(sub)
    _add_traffic(sub)
    _add_step(sub)
    impact = sub.add_parser("impact", help="the impact study (see tritonbn.perf.impact)")
    if command == "impact":  # imported only when asked for: it is heavier than the rest of the CLI
        from . import impact as impact_study

        impact_study.add_arguments(impact)
    return parser


def _device(parser, name):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")
    if name == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device(name)


def _sweep(parser, args):
    from . import sweep
    from .backends import resolve
    from .shapes import ShapeCase, preset_shapes

    device = _device(parser, args.device)
    presets = _flatten(args.preset) or ([] if args.shape else ["resnet50" if device.type == "cuda" else "tiny"])
    cases = [(name, case) for name in presets for case in preset_shapes(name, args.batch)]
    cases += [("custom", ShapeCase(shape)) for shape in args.shape]
    residuals = {"off": [False], "on": [True], "both": [False, True]}[args.residual]
    cfgs = sweep.configs(cases, args.dtype, args.layout, args.activation, residuals, args.mode)
    backends, skipped = resolve(args.backend)
    for name, reason in skipped.items():
        print(f"skipping backend {name}: {reason}", file=sys.stderr)
    rows = sweep.run(cfgs, backends, skipped, device, args.out, progress=not args.no_progress, seed=args.seed)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


def _report(parser, args):
    from pathlib import Path

    from .report import make_report

    if not os.path.isfile(args.csv):
        parser.error(f"no such results CSV: {args.csv}")
    out = args.out or str(Path(args.csv).with_suffix("")) + "_report"
    print(f"wrote {make_report(args.csv, out)}")
    return 0


def _traffic(parser, args):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the audit counts interpreted loads and stores
    from . import traffic
    from .results import write_table
    from .sweep import DTYPES as TORCH_DTYPES

    rows = traffic.audit(args.shape, TORCH_DTYPES[args.dtype], args.activation[0], args.layout)
    print(traffic.format_table(rows))
    if args.out:
        write_table(rows, args.out)
        print(f"wrote {args.out}")
    over = [r for r in rows if not r["within_budget"]]
    for r in over:
        print(f"over budget: {r['mode']} residual={r['residual']}: {r['passes']} > {r['budget']} passes",
              file=sys.stderr)
    return 1 if args.check and over else 0


def _step(parser, args):
    from . import step

    device = _device(parser, args.device)
    defaults = step.StepConfig() if device.type == "cuda" else step.CPU_STEP_CONFIG
    chosen = {name: getattr(args, name) for name in ("batch", "width", "size", "blocks")}
    cfg = dataclasses.replace(defaults, dtype=args.dtype, layout=args.layout,
                              **{name: value for name, value in chosen.items() if value is not None})
    rows = step.run(cfg, args.backend, device)
    print(step.format_table(rows))
    if args.out:
        from .results import write_table

        write_table(rows, args.out)
        print(f"wrote {args.out}")
    return 0


def _impact(parser, args):
    from . import impact

    return impact.run(args) or 0


COMMANDS = {"sweep": _sweep, "report": _report, "traffic": _traffic, "step": _step, "impact": _impact}


def main(argv=None) -> int:
    """Run one subcommand and return its exit status (2 for a usage error, with a one-line message)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    try:
        parser = build_parser(command)
    except ImportError as exc:
        print(f"tritonbn-perf: error: cannot load the {command} command: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        return COMMANDS[args.command](parser, args)
    except SystemExit as exc:  # argparse's exits (usage errors, --help) become a return value
        return exc.code if isinstance(exc.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
