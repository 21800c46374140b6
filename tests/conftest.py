"""Shared pytest setup: pick the device and make CPU runs exercise the Triton kernels.

Without CUDA the kernels run under Triton's interpreter, which is switched on by TRITON_INTERPRET=1.
Triton reads that variable when a kernel is decorated, so it must be set before `tritonbn.kernels` (or
triton itself) is imported; conftest.py is imported before any test module, and importing torch does
not import triton.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_addoption(parser):
    parser.addoption("--reference-path", action="store_true",
                     help="run CPU tensors through tritonbn.cpu_reference(), the PyTorch path every CPU user without "
                          "TRITON_INTERPRET gets (tests marked `kernels` are about the kernels: deselect them with "
                          "-m 'not kernels')")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: about the Triton kernels themselves (not the reference path)")


@pytest.fixture(autouse=True)
def reference_path(request):
    """Under --reference-path, every test runs inside tritonbn.cpu_reference()."""
    if not request.config.getoption("--reference-path"):
        yield
        return
    import tritonbn

    with tritonbn.cpu_reference():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed each test from fresh entropy and print the seed, which pytest shows when a test fails.

    Set TRITONBN_TEST_SEED to replay a failing draw.
    """
    seed = int(os.environ.get("TRITONBN_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"seed={seed} (replay with TRITONBN_TEST_SEED={seed})")
    return seed
