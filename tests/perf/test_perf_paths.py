"""`--device cpu` runs and labels the path tritonbn.backend decided, however TRITON_INTERPRET was set.

Triton fixes interpreted-or-compiled when it is imported and when a kernel is defined, and tritonbn.backend
follows it for the whole process; a CPU run of the CLI asks for the interpreter while Triton is not loaded.
Each case runs in a fresh process, without the test session's TRITON_INTERPRET, so that it decides for
itself. Setting the variable after Triton or the kernels were loaded used to send CPU tensors to compiled
kernels on a GPU machine; now they take the reference path, and the rows say so. The launch counts are
independent evidence of the path: the interpreter's launches are counted, the reference path has none.
"""

import json
import math
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, os, sys
{before}
import torch
from tritonbn import backend
from tritonbn.perf.cli import main
from tritonbn.perf.results import read_rows

torch.set_num_threads(1)
code = main(["sweep", "--shape", "4,3,2,2", "--mode", "fwd_bwd", "--backend", "tritonbn,eager", "--device", "cpu",
             "--out", sys.argv[1], "--no-progress"])
columns = ("backend", "status", "timing", "device_method", "launches")
rows = [{{k: r[k] for k in columns}} for r in read_rows(sys.argv[1])]
print(json.dumps({{"code": code, "interpreted": backend.kernels_interpreted(), "rows": rows}}))
"""


def run_fresh(before: str, out) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before), str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_labels(result: dict, interpreted: bool) -> None:
    assert result["code"] == 0 and result["interpreted"] == interpreted
    rows = {r["backend"]: r for r in result["rows"]}
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    assert rows["tritonbn"]["timing"] == ("interpreter" if interpreted else "cpu-reference")
    assert rows["eager"]["timing"] == "cpu-pytorch"  # PyTorch's own CPU code, whatever tritonbn's path
    assert rows["eager"]["device_method"] == "reference" and math.isnan(rows["eager"]["launches"])
    if interpreted:
        assert rows["tritonbn"]["device_method"] == "interpreter" and rows["tritonbn"]["launches"] >= 1
    else:
        assert rows["tritonbn"]["device_method"] == "reference" and math.isnan(rows["tritonbn"]["launches"])


@pytest.mark.parametrize(("before", "interpreted"), [
    ("", True),  # the CLI asks for the interpreter itself, as Triton is not loaded yet
    ("import triton", False),  # Triton loaded compiled first: a GPU machine's `--device cpu` after other work
    ("os.environ['TRITON_INTERPRET'] = '1'", True),  # asked before anything was loaded
    ("import triton\nos.environ['TRITON_INTERPRET'] = '1'", False),  # asked after Triton was imported
    ("import tritonbn.kernels\nos.environ['TRITON_INTERPRET'] = '1'", False),  # after the kernels were defined
], ids=["unset", "triton-loaded", "set-first", "set-after-triton", "set-after-kernels"])
def test_cpu_runs_the_path_its_label_names(before, interpreted, tmp_path):
    check_labels(run_fresh(before, tmp_path / "r.csv"), interpreted)
