"""The noisy BN arm's injected noise (claim 5b) has the statistics of the paper's Algorithm 1: per unit and step a
shift centre ~ U(-0.5, 0.5) and a scale centre ~ U(1, 1.25), per activation a spread of U(-0.1, 0.1) and
N(0, 0.1) around them, drawn anew at every step, per channel in a conv net, and only in training. The noise is
seeded from the test's fresh seed (conftest), and every tolerance is several standard errors wide."""

import pytest
import torch

from tritonbn.perf.impact import models
from tritonbn.perf.impact.noise import PAPER_NOISE, BatchNormNoise, noise_held

UNITS = 16


def _scale_and_shift(module: BatchNormNoise, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and shift one training forward applied, read back through the forward itself: with the draw
    held, f(0) = shift and f(1) = scale + shift."""
    with noise_held(module):
        shift = module(torch.zeros(shape, dtype=torch.float64))
        scale = module(torch.ones(shape, dtype=torch.float64)) - shift
    return scale, shift


def _per_step_draws(steps: int, shape, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    module = BatchNormNoise(seed).train()
    return [_scale_and_shift(module, shape) for _ in range(steps)]


def test_unit_centres_have_the_papers_distribution_over_steps(fresh_seed):
    # Each step's per-unit centre is estimated by the mean over 256 samples (its spread adds ~1e-5 variance).
    draws = _per_step_draws(400, (256, UNITS), fresh_seed)
    shift_centres = torch.cat([shift.mean(dim=0) for _, shift in draws])
    scale_centres = torch.cat([scale.mean(dim=0) for scale, _ in draws])
    n = PAPER_NOISE
    assert abs(shift_centres.mean()) < 0.02  # U(-0.5, 0.5): mean 0
    assert shift_centres.var() == pytest.approx((2 * n.n_mu) ** 2 / 12, rel=0.1)
    assert scale_centres.mean() == pytest.approx(n.mean_scale, abs=0.01)  # U(1, 1.25): mean 1.125, not 1
    assert scale_centres.var() == pytest.approx((n.n_sigma - 1) ** 2 / 12, rel=0.15)
    assert shift_centres.abs().max() <= n.n_mu + 0.02 and 1 - 0.03 <= scale_centres.min() <= scale_centres.max() <= 1.28


def test_each_step_shifts_and_scales_every_unit_away_from_the_identity(fresh_seed):
    """Non-zero mean and non-unit variance within one step: the units' centres are spread over the ranges."""
    for scale, shift in _per_step_draws(5, (256, UNITS), fresh_seed):
        assert shift.mean(dim=0).abs().mean() > 0.1  # E|U(-0.5, 0.5)| = 0.25
        assert (scale.mean(dim=0) > 1.0).float().mean() > 0.75  # sigma >= 1 always; sample means jitter


def test_activations_spread_around_their_units_centre(fresh_seed):
    scale, shift = _per_step_draws(1, (4096, UNITS), fresh_seed)[0]
    shift_spread, scale_spread = shift - shift.mean(dim=0), scale - scale.mean(dim=0)
    assert shift_spread.std() == pytest.approx(PAPER_NOISE.r_mu / 3**0.5, rel=0.05)  # U(-r, r)
    assert shift_spread.abs().max() <= 2 * PAPER_NOISE.r_mu
    assert scale_spread.std() == pytest.approx(PAPER_NOISE.r_sigma, rel=0.05)  # N(0, r_sigma)


def test_noise_is_drawn_anew_at_every_step(fresh_seed):
    draws = _per_step_draws(200, (256, UNITS), fresh_seed)
    centres = torch.stack([shift.mean(dim=0) for _, shift in draws])  # (step, unit)
    consecutive = torch.corrcoef(torch.stack([centres[:-1].flatten(), centres[1:].flatten()]))[0, 1]
    assert abs(consecutive) < 0.1
    assert not torch.equal(draws[0][1], draws[1][1])


def test_conv_units_are_channels_with_positions_as_batch(fresh_seed):
    scale, shift = _per_step_draws(1, (32, UNITS, 5, 5), fresh_seed)[0]
    per_channel = shift.transpose(0, 1).reshape(UNITS, -1)
    assert (per_channel.max(dim=1).values - per_channel.min(dim=1).values).max() <= 2 * PAPER_NOISE.r_mu
    assert per_channel.mean(dim=1).std() > 0.1  # the channels' centres differ (std of U(-0.5, 0.5) is 0.29)
    assert scale.shape == shift.shape == (32, UNITS, 5, 5)


def test_evaluation_applies_the_expectation_and_draws_nothing():
    module = BatchNormNoise(seed=5).eval()
    x = torch.randn(64, UNITS)
    rng = torch.get_rng_state()
    first, second = module(x), module(x)
    torch.testing.assert_close(first, x * PAPER_NOISE.mean_scale, rtol=0, atol=0)
    assert torch.equal(first, second)
    assert torch.equal(rng, torch.get_rng_state())


def test_training_draws_leave_the_global_rng_alone_and_follow_the_seed():
    x = torch.randn(64, UNITS)
    rng = torch.get_rng_state()
    a, b = BatchNormNoise(seed=7).train()(x), BatchNormNoise(seed=7).train()(x)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.equal(a, b) and not torch.equal(a, BatchNormNoise(seed=8).train()(x))


def test_dose_widens_the_step_distribution_only():
    dosed = PAPER_NOISE.dosed(3.0)
    assert (dosed.n_mu, dosed.n_sigma) == (1.5, 1.75)
    assert (dosed.r_mu, dosed.r_sigma) == (PAPER_NOISE.r_mu, PAPER_NOISE.r_sigma)
    assert PAPER_NOISE.dosed(0.0).mean_scale == 1.0


@pytest.mark.parametrize("kind, norm_name", [("cnn", "BatchNormAct2d"), ("mlp", "BatchNormAct1d")])
def test_noisy_model_puts_noise_between_each_bn_and_its_relu(kind, norm_name):
    layers = list(models.build_model(kind, "noisy"))
    noise_at = [i for i, m in enumerate(layers) if isinstance(m, BatchNormNoise)]
    assert len(noise_at) == 3
    for i in noise_at:
        assert type(layers[i - 1]).__name__ == norm_name and layers[i - 1].activation == "identity"
        assert isinstance(layers[i + 1], torch.nn.ReLU)
    assert len({layers[i].seed for i in noise_at}) == 3  # each layer draws its own noise
