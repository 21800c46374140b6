"""The loss-landscape probe (claim 5b) against a quadratic, where everything along the gradient is known in closed
form, and in a training run, where it must measure without changing what is trained."""

import math

import pytest
import torch
from torch import nn

from tritonbn.perf.impact import study, training
from tritonbn.perf.impact.config import StudyConfig
from tritonbn.perf.impact.data import load_digit_split
from tritonbn.perf.impact.landscape import probe_along_gradient


class Quadratic(nn.Module):
    """L(theta) = 1/2 theta^T A theta - b^T theta, A symmetric positive definite."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.a, self.b, self.theta = a, b, nn.Parameter(theta.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta - self.b @ self.theta


def test_probe_matches_the_quadratic_in_closed_form():
    dim = 6
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 20.0, dim, dtype=torch.float64)) @ q.T
    model = Quadratic(a, torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64))
    theta = model.theta.detach().clone()
    step_sizes = [0.01, 0.02, 0.04, 0.08]

    point = probe_along_gradient(model, model.loss, step_sizes)

    # g = A theta - b; L(theta - eta g) = L(theta) - eta g.g + eta^2/2 g.A g; grad there = g - eta A g.
    g = a @ theta - model.b
    loss0 = float(0.5 * theta @ a @ theta - model.b @ theta)
    losses = [loss0 - eta * float(g @ g) + 0.5 * eta**2 * float(g @ a @ g) for eta in step_sizes]
    changes = [eta * float(torch.linalg.norm(a @ g)) for eta in step_sizes]
    assert point.losses == pytest.approx(losses, rel=1e-10)
    assert point.gradient_changes == pytest.approx(changes, rel=1e-10)
    assert point.gradient_norm == pytest.approx(float(torch.linalg.norm(g)), rel=1e-12)
    assert point.loss_range == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert point.gradient_change_range == pytest.approx((0.08 - 0.01) * float(torch.linalg.norm(a @ g)), rel=1e-9)
    # effective beta-smoothness is ||A g|| / ||g||: the curvature along g, between A's extreme eigenvalues
    beta = float(torch.linalg.norm(a @ g) / torch.linalg.norm(g))
    assert point.effective_beta == pytest.approx(beta, rel=1e-9) and 0.5 <= point.effective_beta <= 20.0
    # the probe puts the parameters back and leaves .grad alone
    assert torch.equal(model.theta.detach(), theta) and model.theta.grad is None


def test_flat_direction_has_zero_ranges():
    """Along a gradient in A's null space the loss falls linearly and the gradient never changes."""
    a = torch.diag(torch.tensor([0.0, 3.0], dtype=torch.float64))
    model = Quadratic(a, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64))
    point = probe_along_gradient(model, model.loss, [0.5, 1.0, 2.0])
    assert point.losses == pytest.approx([-0.5, -1.0, -2.0])  # L(theta - eta g) = -eta along g = (-1, 0)
    assert point.gradient_changes == [0.0, 0.0, 0.0] and point.gradient_change_range == 0.0
    assert point.effective_beta == 0.0 and point.loss_range == pytest.approx(1.5)


@pytest.mark.parametrize("arm", ["bn", "plain"])
def test_probing_a_run_changes_nothing_it_trains(arm):
    """Parameters, BN running statistics and .grad are all put back: a run with the probe trains exactly as one
    without, and records one probe per evaluation interval, from step 0."""
    config = StudyConfig.quick(steps=20, eval_every=5)
    data = load_digit_split("cpu")

    def run(measure_landscape):
        spec = training.RunSpec("cnn", arm, 0.03, 1.0, 0, measure_landscape=measure_landscape)
        return training.train_run(data, spec, config)

    with study.study_environment(torch.device("cpu"), kernels=False):
        probed, plain = run(True), run(False)
    assert probed.train_loss == plain.train_loss and probed.final_test_acc == plain.final_test_acc
    assert probed.landscape.steps == [0, 5, 10, 15] and plain.landscape is None
    for point in probed.landscape.points:
        assert point.step_sizes == pytest.approx([m * 0.03 for m in config.landscape_step_multiples])
        assert all(math.isfinite(v) and v >= 0 for v in (point.loss_range, point.gradient_change_range))
