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
