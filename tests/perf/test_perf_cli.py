"""The command line: bad input ends with one line on stderr and exit status 2, never a traceback."""

import csv
import subprocess
import sys

import pytest

from tritonbn.perf import results
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
    (["step", "--precision", "fp8-nhwc"], "unknown precision 'fp8-nhwc'"),
    (["step", "--variant", "jit"], "unknown variant 'jit'"),
    (["readme", "--readme", "does-not-exist.md"], "no such file"),
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


@pytest.mark.parametrize("command", ["sweep", "report", "traffic", "step", "impact", "readme"])
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: tritonbn-perf {command}" in capsys.readouterr().out


# --------------------------------------------------------------------------- outputs and inputs checked first
def forbidden(*args, **kwargs):
    raise AssertionError("the work started although the command could not have written its results")


@pytest.fixture
def no_work(monkeypatch):
    """Every subcommand's work fails the test if it starts: the checks must come before it."""
    for target in ("tritonbn.perf.sweep.run", "tritonbn.perf.step.run", "tritonbn.perf.traffic.audit",
                   "tritonbn.perf.impact.cli.run", "tritonbn.perf.report.make_report"):
        monkeypatch.setattr(target, forbidden)


def sweep_csv(path):
    """A one-row sweep CSV, enough for the report's input checks (the values do not matter to them)."""
    row = dict.fromkeys(results.COLUMNS, "")
    row.update(shape="2x3", dtype="fp32", layout="nchw", activation="relu", residual="False", mode="fwd",
               backend="eager", status="ok", ok="True", timing="interpreter", device="cpu")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results.COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    return path


@pytest.mark.parametrize("argv", [
    ["sweep", "--shape", "2,3", "--device", "cpu", "--no-progress", "--out", "{blocked}/r.csv"],
    ["traffic", "--out", "{blocked}/t.csv"],
    ["step", "--device", "cpu", "--out", "{blocked}/s.csv"],
    ["impact", "--quick", "--no-progress", "--out", "{blocked}/impact"],
    ["report", "{csv}", "--out", "{blocked}/report"],
    ["report", "{csv}", "--out", "{csv}"],  # a file where the report's folder would go
    ["sweep", "--shape", "2,3", "--device", "cpu", "--no-progress", "--out", "{tmp}"],  # a folder, not a file
], ids=["sweep", "traffic", "step", "impact", "report", "report-into-a-file", "sweep-into-a-folder"])
def test_unwritable_output_exits_2_before_the_work(argv, tmp_path, no_work, capsys):
    # Nothing can be created under a regular file, whoever runs the tests (root included).
    (tmp_path / "file").write_text("")
    fill = {"blocked": tmp_path / "file", "csv": sweep_csv(tmp_path / "in.csv"), "tmp": tmp_path}
    assert main([arg.format(**fill) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tritonbn-perf {argv[0]}: error: cannot write")
    assert err.count("\n") == 1 and "Traceback" not in err


UNUSABLE = {"empty": (b"", "is empty"),
            "foreign": (b"mode,residual,passes\nfwd,False,2.0\n", "is not a tritonbn-perf sweep CSV: no column shape"),
            "header-only": (",".join(results.COLUMNS).encode() + b"\n", "holds no rows"),
            "binary": (b"\xff\xfe\x00garbage", "is not a CSV file")}


# An empty --out of `sweep` is simply a new file (test_sweep_into_an_empty_file); the rest cannot be merged into.
@pytest.mark.parametrize(("command", "case"), [(command, case) for command in ("report", "sweep") for case in UNUSABLE
                                               if (command, case) != ("sweep", "empty")])
def test_unusable_csv_exits_2(command, case, tmp_path, no_work, capsys):
    content, message = UNUSABLE[case]
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    argv = {"report": ["report", str(path)],
            "sweep": ["sweep", "--shape", "2,3", "--device", "cpu", "--no-progress", "--out", str(path)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tritonbn-perf {command}: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert path.read_bytes() == content  # the file is left as it was


def test_sweep_into_an_empty_file(tmp_path, monkeypatch):
    path = tmp_path / "new.csv"
    path.write_text("")
    monkeypatch.setattr("tritonbn.perf.sweep.run", lambda *args, **kwargs: [])
    assert main(["sweep", "--shape", "2,3", "--device", "cpu", "--no-progress", "--out", str(path)]) == 0


def test_sweep_says_which_preset_it_chose_and_why_a_backend_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tritonbn.perf.sweep.run", lambda *args, **kwargs: [])
    monkeypatch.setattr("tritonbn.perf.backends._importable", lambda module: f"{module} is not importable (test)")
    assert main(["sweep", "--device", "cpu", "--backend", "eager,apex", "--no-progress",
                 "--out", str(tmp_path / "r.csv")]) == 0
    err = capsys.readouterr().err
    assert "sweep: preset tiny, the default on a CPU" in err and "ResNet-50's would take hours" in err
    assert ("skipping backend apex, an optional comparison with another library, run only where it is installed: "
            "apex.contrib.groupbn.batch_norm is not importable (test)") in err
