"""The command line: bad input ends with one line on stderr and exit status 2, never a traceback."""

import subprocess
import sys

import pytest

from tritonbn.perf.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["sweep", "--preset", "nope", "--out", "x.csv"], "unknown preset 'nope'"),
    (["sweep", "--preset", "tiny,resnet51", "--out", "x.csv"], "unknown preset 'resnet51'"),
    (["sweep", "--dtype", "fp8", "--out", "x.csv"], "unknown dtype 'fp8'"),
    (["sweep", "--backend", "cudnn", "--out", "x.csv"], "unknown backend 'cudnn'"),
    (["sweep", "--activation", "swish", "--out", "x.csv"], "unknown activation 'swish'"),
    (["sweep", "--shape", "4,x,3", "--out", "x.csv"], "bad shape '4,x,3'"),
    (["sweep", "--preset", "tiny"], "--out"),
    (["sweep", "--bogus", "--out", "x.csv"], "unrecognized arguments: --bogus"),
    (["step", "--batch", "0"], "positive integer"),
    (["traffic", "--layout", "nwhc"], "invalid choice"),
    (["report", "does-not-exist.csv"], "no such results CSV"),
    (["impact", "--quick", "--base-lr", "0.5", "--no-progress"], "base LR must be one of the swept LRs"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_entry_point_reports_unknown_preset():
    proc = subprocess.run([sys.executable, "-m", "tritonbn.perf.cli", "sweep", "--preset", "imagenet", "--out",
                           "x.csv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tritonbn-perf sweep: error: argument --preset: unknown preset 'imagenet'; choose from resnet50, "
        "mobilenetv2, resnet3d, mlp, scaling, tiny (see --help)"]


@pytest.mark.parametrize("command", ["sweep", "report", "traffic", "step", "impact"])
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: tritonbn-perf {command}" in capsys.readouterr().out
