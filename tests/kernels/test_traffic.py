"""Memory traffic of one call, in passes over the activation tensor, counted under the Triton interpreter.

A pass is x.nbytes moved: (bytes loaded + bytes stored) / x.nbytes over every launch of the call. The
issue's budget: training forward 3 (read x for the statistics; read x, write y), backward 5 (read dy and x
to reduce; read dy and x, write dx), eval forward 2; a residual adds its own traffic: one read in the
forward, one read and the write of its gradient in the backward. Per-channel vectors (parameters,
statistics, partial sums) are counted as well and allowed a tenth of a pass in total.
"""

import os

import pytest
import torch

import tritonbn

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="traffic is counted by wrapping the Triton interpreter's loads and stores; on CUDA the "
    "interpreter is off, and the CPU suite runs this test",
)

SHAPE = (8, 4, 32, 32)
PER_CHANNEL_SLACK = 0.1
# mode -> (budget without residual, budget with residual)
BUDGET = {"train_forward": (3, 4), "backward": (5, 7), "eval_forward": (2, 3)}
# The least any correct implementation must move: read x and write y; read dy and x and write dx.
FLOOR = {"train_forward": 2, "backward": 3, "eval_forward": 2}


def measure(activation, with_residual):
    from tritonbn.perf.traffic import count_traffic

    x = torch.randn(SHAPE).mul_(2).add_(1).requires_grad_()
    weight = torch.rand(4).add_(0.5).requires_grad_()
    bias = torch.randn(4, requires_grad=True)
    residual = torch.randn(SHAPE, requires_grad=True) if with_residual else None
    running_mean, running_var = torch.zeros(4), torch.ones(4)

    def call(training):
        return tritonbn.batch_norm_act(
            x, running_mean, running_var, weight, bias, training, activation=activation, residual=residual
        )

    with count_traffic() as train_forward:
        y = call(True)
    leaves = [t for t in (x, weight, bias, residual) if t is not None]
    dy = torch.randn_like(y)
    with count_traffic() as backward:
        torch.autograd.grad(y, leaves, dy)
    with torch.no_grad(), count_traffic() as eval_forward:
        call(False)
    return x.nbytes, {"train_forward": train_forward, "backward": backward, "eval_forward": eval_forward}


# The identity needs no pre-activation in the backward, so its residual path differs from the others'.
CASES = [
    pytest.param("relu", False, id="relu-no_residual"),
    pytest.param("relu", True, id="relu-residual"),
    pytest.param("identity", True, id="identity-residual"),
]


@pytest.mark.parametrize(("activation", "with_residual"), CASES)
def test_passes_within_budget(activation, with_residual):
    nbytes, counts = measure(activation, with_residual)
    for mode, traffic in counts.items():
        passes = (traffic.bytes_loaded + traffic.bytes_stored) / nbytes
        budget = BUDGET[mode][int(with_residual)]
        assert traffic.launches >= 1, f"{mode}: no Triton launch counted"
        assert passes >= FLOOR[mode], f"{mode}: {passes:.3f} passes is below what any kernel must move"
        assert passes <= budget + PER_CHANNEL_SLACK, f"{mode}: {passes:.3f} passes, budget {budget}"
