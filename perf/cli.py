"""`tritonbn-perf`: sweep, report, traffic, step, impact, readme, tune, compile-check, host-floor and sync
subcommands.

A bad flag or value, an output that cannot be written or an input CSV that cannot be used ends with one
line on stderr and exit status 2, never a traceback. Outputs are checked before anything is measured, so
a long run is never lost to an unwritable path.

Which code runs CPU tensors is tritonbn.backend's decision, made once per process as Triton makes it:
Triton's interpreter when TRITON_INTERPRET=1 is set before Triton is imported, the PyTorch reference path
otherwise (a GPU machine's compiled kernels cannot read CPU memory). A CPU run of sweep, step or traffic
asks for the interpreter while Triton is not loaded yet (importing tritonbn does not load it); every row
names the path that ran.
"""

import argparse
import os
import sys
from pathlib import Path

from .constants import BACKENDS, DTYPES, LAYOUTS, MODES, OPTIONAL_BACKENDS, activations


class UsageError(Exception):
    """What the command was asked to do cannot be done (an unwritable output, a foreign CSV): exit status 2."""


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


def _positives(text):
    return tuple(_positive(item) for item in text.split(","))


def _flatten(lists):
    return [item for items in lists for item in items]


def _add_device(parser):
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (the kernels under Triton's interpreter, "
                             "unless Triton was already loaded compiled: then the PyTorch reference path)")


def _add_sweep(sub):
    from .shapes import NETWORK_PRESETS, PRESETS

    p = sub.add_parser("sweep", help="time every backend over shapes, dtypes, layouts, activations and modes")
    p.add_argument("--preset", type=_choices(PRESETS, "preset"), action="append", default=[],
                   help=f"shape presets, comma-separated or repeated: {', '.join(PRESETS)} "
                        "(default: resnet50 on CUDA, tiny on CPU)")
    p.add_argument("--shape", type=_shape, action="append", default=[], help="extra shape N,C[,H,W[,D]]")
    p.add_argument("--batch", type=_positive, default=None, help="batch size for network presets ("
                   + ", ".join(f"{name}: {batch}" for name, (_, batch) in NETWORK_PRESETS.items()) + ")")
    p.add_argument("--dtype", type=_choices(tuple(DTYPES), "dtype"), default=["fp32"])
    p.add_argument("--layout", type=_choices(LAYOUTS, "layout"), default=["nchw"],
                   help="nhwc = channels_last (4-D and 5-D shapes only)")
    p.add_argument("--activation", type=_choices(activations(), "activation"), default=["relu"])
    p.add_argument("--residual", choices=("off", "on", "both"), nargs="?", const="on", default="off",
                   help="sweep with a residual add (--residual = on)")
    p.add_argument("--mode", type=_choices(MODES, "mode"), default=list(MODES))
    p.add_argument("--backend", type=_choices(BACKENDS, "backend"), default=list(BACKENDS),
                   help="backends not importable here are recorded as skipped, with the reason")
    _add_device(p)
    p.add_argument("--out", required=True, help="results CSV (rows of re-run configurations are replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new configuration after this many seconds; the rows measured are written")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_report(sub):
    p = sub.add_parser("report", help="plots and report.md from a sweep CSV")
    p.add_argument("csv", help="results CSV written by `sweep`")
    p.add_argument("--out", default=None, help="output directory (default: <csv name>_report next to the CSV)")


def _add_traffic(sub):
    p = sub.add_parser("traffic", help="bytes each mode moves, counted under the Triton interpreter "
                                       "(TRITON_INTERPRET=1 in the environment)")
    p.add_argument("--shape", type=_shape, default=(8, 4, 32, 32),
                   help="activation shape; per-channel traffic is a larger share of small or wide shapes")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--layout", choices=LAYOUTS, default="nchw")
    p.add_argument("--activation", type=_choices(activations(), "activation"), default=["relu"])
    p.add_argument("--out", default=None, help="also write the table as CSV here")
    p.add_argument("--check", action="store_true", help="exit 1 when a mode exceeds its traffic budget")


def _add_step(sub):
    from .models import NETWORKS
    from .step import PRECISIONS, VARIANTS

    p = sub.add_parser("step", help="a network's training step per variant, and BN+activation's share of it")
    p.add_argument("--network", choices=tuple(NETWORKS),
                   help="default: resnet50 on CUDA (torchvision's when importable), toy on a CPU")
    p.add_argument("--batch", type=_positives, help="comma-separated batch sizes (default: 64,256 on CUDA, 2 on a CPU)")
    p.add_argument("--precision", type=_choices(PRECISIONS, "precision"), default=list(PRECISIONS),
                   help="bf16-nhwc: bf16 autocast, channels_last; fp32-nchw: fp32, contiguous")
    p.add_argument("--variant", type=_choices(VARIANTS, "variant"), default=list(VARIANTS),
                   help="cudagraphs = torch.compile(mode='reduce-overhead'); -fused = after tritonbn.fuse")
    _add_device(p)
    p.add_argument("--out", default=None, help="also write the rows as CSV here, and their plot as <out>.png")


def _add_readme(sub):
    p = sub.add_parser("readme", help="rewrite the results blocks of README.md (each device's latest run) and "
                                      "docs/results.md (every run) from the GPU results in perf/results")
    p.add_argument("--results", default="perf/results", help="folder of per-device result folders")
    p.add_argument("--readme", default="README.md", help="the file holding the headline block")
    p.add_argument("--history", default=None, help="the file holding every run (default: docs/results.md beside "
                                                   "the README)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is out of date")


def _add_tune(sub):
    p = sub.add_parser("tune", help="time every kernel configuration per shape on a GPU and write the tuning table "
                                    "(on a CPU: check every candidate's correctness under the interpreter)")
    p.add_argument("--preset", type=_choices(("resnet50", "tiny"), "preset"), default=None,
                   help="shapes (default: resnet50 on CUDA, tiny on a CPU)")
    p.add_argument("--batch", type=_positive, default=None, help="batch size for resnet50 (default 64)")
    p.add_argument("--dtype", type=_choices(tuple(DTYPES), "dtype"), default=["bf16", "fp32"])
    p.add_argument("--layout", type=_choices(LAYOUTS, "layout"), default=list(LAYOUTS))
    p.add_argument("--direction", type=_choices(("fwd", "bwd", "eval"), "direction"), default=["fwd", "bwd", "eval"])
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--compile-workers", type=int, default=0,
                   help="on a GPU, compile every candidate first in this many processes (0: compile as they run)")
    _add_device(p)
    p.add_argument("--out", required=True, help="CSV of every candidate's check and device time")
    p.add_argument("--table", default=None, help="the tuning table to update on a GPU (default: the package's own, "
                                                 "tritonbn/kernels/tuning.json)")


def _add_compile_check(sub):
    p = sub.add_parser("compile-check", help="compile every kernel variant for a GPU without one (needs compiled "
                                             "kernels: run without TRITON_INTERPRET)")
    p.add_argument("--arch", type=_positive, default=90, help="compute capability, as 90 for sm_90")
    p.add_argument("--multiprocessors", type=_positive, default=132, help="SMs of the GPU the plans are for")
    p.add_argument("--dtype", type=_choices(tuple(DTYPES), "dtype"), default=list(DTYPES))
    p.add_argument("--layout", type=_choices(LAYOUTS, "layout"), default=list(LAYOUTS))
    p.add_argument("--resources", default=None, metavar="CSV",
                   help="also run ptxas -v on every distinct kernel and write its registers and spills here")


def _add_host_floor(sub):
    p = sub.add_parser("host-floor", help="host time per training call: eager, the floor of any autograd.Function "
                                          "design, and tritonbn (on a CPU with every launch skipped)")
    _add_device(p)
    p.add_argument("--calls", type=_positive, default=2000, help="calls per timed batch")
    p.add_argument("--batches", type=_positive, default=9, help="interleaved batches per way")


def _add_sync(sub):
    p = sub.add_parser("sync", help="SyncBatchNormAct against nn.SyncBatchNorm + ReLU: collectives and host syncs "
                                    "per call, and on GPUs device and host time, in a group of processes")
    p.add_argument("--shape", type=_shape, action="append", default=[],
                   help="per-rank shape N,C[,spatial...] (default: ResNet-50's on CUDA, 2,4,4,4 on a CPU)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--world-size", type=_positive, default=None,
                   help="processes in the group (default: every GPU, one each; 2 gloo processes on a CPU)")
    p.add_argument("--calls", type=_positive, default=50, help="calls per timed batch on CUDA")
    _add_device(p)
    p.add_argument("--out", default=None, help="also write the rows as CSV here")


def build_parser(command: str | None) -> Parser:
    parser = Parser(prog="tritonbn-perf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{sweep,report,traffic,step,impact,readme,tune,compile-check,host-floor,"
                                        "sync}")
    _add_sweep(sub)
    _add_report(sub)
    _add_traffic(sub)
    _add_step(sub)
    impact = sub.add_parser("impact", help="the impact study (see tritonbn.perf.impact)")
    if command == "impact":  # imported only when asked for: it is heavier than the rest of the CLI
        from .impact import cli as impact_cli

        impact_cli.add_arguments(impact)
    _add_readme(sub)
    _add_tune(sub)
    _add_compile_check(sub)
    _add_host_floor(sub)
    _add_sync(sub)
    return parser


def _device(name):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here")
    if name == "cpu":
        _interpret_kernels_on_cpu()
    return torch.device(name)


def _interpret_kernels_on_cpu():
    """Ask for Triton's interpreter while Triton is not loaded yet: it decides when it is first imported."""
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _writable_file(path, flag="--out") -> None:
    from .results import check_writable_file

    try:
        check_writable_file(path)
    except OSError as exc:
        raise UsageError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None


def _writable_dir(path, flag="--out") -> None:
    from .results import check_writable_dir

    try:
        check_writable_dir(path)
    except OSError as exc:
        raise UsageError(f"cannot write in {flag} {path}: {exc.strerror or exc}") from None


def _sweep_rows(path) -> list:
    from .results import ResultsError, read_rows

    try:
        return read_rows(path)
    except (ResultsError, OSError) as exc:
        raise UsageError(str(exc)) from None


def _sweep(args):
    from . import sweep
    from .backends import resolve
    from .shapes import ShapeCase, preset_shapes

    device = _device(args.device)
    _writable_file(args.out)
    if os.path.isfile(args.out) and os.path.getsize(args.out):
        _sweep_rows(args.out)  # rows are merged into it at the end: it must be a sweep CSV
    presets = _flatten(args.preset) or ([] if args.shape else [_default_preset(device)])
    cases = [(name, case) for name in presets for case in preset_shapes(name, args.batch)]
    cases += [("custom", ShapeCase(shape)) for shape in args.shape]
    residuals = {"off": [False], "on": [True], "both": [False, True]}[args.residual]
    cfgs = sweep.configs(cases, args.dtype, args.layout, args.activation, residuals, args.mode)
    backends, skipped = resolve(args.backend)
    for name, reason in skipped.items():
        optional = ", an optional comparison with another library, run only where it is installed" \
            if name in OPTIONAL_BACKENDS else ""
        print(f"skipping backend {name}{optional}: {reason}", file=sys.stderr)
    rows = sweep.run(cfgs, backends, skipped, device, args.out, progress=not args.no_progress, seed=args.seed,
                     budget_s=args.budget_s)
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


def _default_preset(device) -> str:
    """resnet50 on a GPU; on a CPU tiny, said so, with why."""
    import torch

    if device.type == "cuda":
        return "resnet50"
    where = "a CPU" if torch.cuda.is_available() else "a CPU (no GPU here)"
    print(f"sweep: preset tiny, the default on {where}: its shapes take seconds there, ResNet-50's would take "
          "hours; --preset chooses others", file=sys.stderr)
    return "tiny"


def _report(args):
    from .report import make_report

    if not os.path.isfile(args.csv):
        raise UsageError(f"no such results CSV: {args.csv}")
    _sweep_rows(args.csv)
    out = args.out or str(Path(args.csv).with_suffix("")) + "_report"
    _writable_dir(out)
    print(f"wrote {make_report(args.csv, out)}")
    return 0


def _traffic(args):
    if args.out:
        _writable_file(args.out)
    _interpret_kernels_on_cpu()
    from tritonbn import backend

    if not backend.kernels_interpreted():
        raise UsageError("the audit counts the Triton interpreter's loads and stores, and Triton was loaded "
                         "compiled: run it with TRITON_INTERPRET=1 in the environment")
    from . import traffic
    from .results import write_table
    from .sweep import TORCH_DTYPES

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


def _step(args):
    import dataclasses

    from . import step

    device = _device(args.device)
    plot = Path(args.out).with_suffix(".png") if args.out else None
    if args.out:
        _writable_file(args.out)
        _writable_file(plot)
    defaults = step.StepConfig() if device.type == "cuda" else step.CPU_STEP_CONFIG
    chosen = {"network": args.network, "batches": args.batch, "precisions": tuple(args.precision),
              "variants": tuple(args.variant)}
    cfg = dataclasses.replace(defaults, **{name: value for name, value in chosen.items() if value is not None})
    rows = step.run(cfg, device, progress=lambda message: print(message, file=sys.stderr))
    print(step.format_table(rows))
    if args.out:
        from .plots import plot_step
        from .results import write_table

        write_table(rows, args.out)
        print(f"wrote {args.out}" + (f" and {plot}" if plot_step(rows, plot) else ""))
    return 0


def _impact(args):
    from .impact import cli as impact_cli

    _writable_dir(args.out)
    return impact_cli.run(args) or 0


def _readme(args):
    from . import readme

    path = Path(args.readme)
    history = Path(args.history) if args.history else path.parent / readme.HISTORY
    blocks = {path: readme.results_block(Path(args.results), path.parent, history_page=history),
              history: readme.results_block(Path(args.results), history.parent)}
    texts = {}
    for file in blocks:
        if not file.is_file():
            raise UsageError(f"no such file: {file}")
        if not args.check:
            _writable_file(file, "--readme" if file == path else "--history")
        try:
            texts[file] = readme.split(file.read_text())
        except ValueError as exc:
            raise UsageError(f"{file}: {exc}") from None
    stale = [file for file, block in blocks.items() if texts[file][1] != block]
    if args.check:
        for file in blocks:
            print(f"{file}: results block " + ("out of date: run tritonbn-perf readme" if file in stale
                                                else "up to date"))
        return 1 if stale else 0
    for file, block in blocks.items():
        before, _, after = texts[file]
        file.write_text(before + block + after)
        print(f"rewrote the results block of {file}")
    return 0


def _tune(args):
    from . import tune
    from .results import write_table

    device = _device(args.device)
    _writable_file(args.out)
    preset = args.preset[0] if args.preset else ("resnet50" if device.type == "cuda" else "tiny")
    table = Path(args.table) if args.table else None
    if device.type == "cuda":
        from tritonbn.kernels import configs

        table = table or configs.TABLE_PATH
        _writable_file(table, "--table")
    cases = tune.cases([preset], args.batch or 64, args.dtype, args.layout, args.direction)
    rows = tune.run(cases, device, args.budget_s, progress=lambda message: print(message, file=sys.stderr),
                    compile_workers=args.compile_workers)
    write_table(rows, args.out)
    wrong = [r for r in rows if not r["ok"]]
    print(f"wrote {args.out}: {len(rows)} candidates over {len({tune.case_key(r) for r in rows})} cases, "
          f"{len(wrong)} not correct")
    if device.type == "cuda":
        entries = tune.table_entries(rows)
        tune.write_table(entries, table)
        print(f"updated {table}: {len(entries)} entries")
    return 1 if wrong else 0


def _compile_check(args):
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise UsageError("compile-check compiles the kernels: run it without TRITON_INTERPRET")
    if args.resources:
        _writable_file(args.resources, "--resources")
    from . import compile_check
    from .sweep import TORCH_DTYPES

    report = compile_check.check(args.arch, args.multiprocessors, tuple(TORCH_DTYPES[d] for d in args.dtype),
                                 tuple(args.layout), progress=lambda message: print(message, file=sys.stderr),
                                 with_resources=bool(args.resources))
    for failure in report["failures"]:
        print(f"FAILED {failure}")
    print(f"sm_{args.arch}, {args.multiprocessors} SMs: {report['runs']} plan runs, {report['launches']} launches, "
          f"{report['kernels']} distinct kernels compiled ({report['with_vector_loads']} with vector loads), "
          f"{len(report['failures'])} failures, {report['seconds']:.0f} s")
    if args.resources:
        from .results import write_table

        rows = report["resources"]
        write_table(rows, args.resources)
        spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
        print(f"ptxas: {len(rows)} kernels, at most {max((r['registers'] for r in rows), default=0)} registers a "
              f"thread, {len(spilling)} spilling; wrote {args.resources}")
    return 1 if report["failures"] else 0


def _host_floor(args):
    device = _device(args.device)
    from . import host_floor

    try:
        rows = host_floor.measure(device, args.calls, args.batches)
    except host_floor.NoKernelPath as exc:
        raise UsageError(str(exc)) from None
    print(host_floor.format_table(rows, device))
    return 0


def _sync(args):
    import torch

    from . import sync
    from .results import write_table
    from .sweep import TORCH_DTYPES

    device = _device(args.device)
    if args.out:
        _writable_file(args.out)
    world_size = args.world_size or (torch.cuda.device_count() if device.type == "cuda" else 2)
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise UsageError(f"--world-size {world_size}: NCCL needs a GPU per process, and {torch.cuda.device_count()} "
                         "are here")
    shapes = args.shape or (sync.GPU_SHAPES if device.type == "cuda" else sync.CPU_SHAPES)
    rows = sync.run(device, shapes, TORCH_DTYPES[args.dtype], world_size, args.calls)
    print(sync.format_table(rows))
    if args.out:
        write_table(rows, args.out)
        print(f"wrote {args.out}")
    return 0


COMMANDS = {"sweep": _sweep, "report": _report, "traffic": _traffic, "step": _step, "impact": _impact,
            "readme": _readme, "tune": _tune, "compile-check": _compile_check, "host-floor": _host_floor,
            "sync": _sync}


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
        return COMMANDS[args.command](args)
    except SystemExit as exc:  # argparse's exits (usage errors, --help) become a return value
        return exc.code if isinstance(exc.code, int) else 2
    except UsageError as exc:
        print(f"tritonbn-perf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
