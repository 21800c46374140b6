"""The impact study's nets and runs: the BN nets really hold tritonbn modules, the init scale touches
weights only, a run is reproducible for its seed (in worker processes too), and the ICS measure is the
per-unit Wasserstein distance it claims to be."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tritonbn
from tritonbn.perf.impact import covariate_shift, models, study, training
from tritonbn.perf.impact.config import StudyConfig
from tritonbn.perf.impact.data import load_digit_split


@pytest.mark.parametrize("kind, norm", [("cnn", tritonbn.BatchNormAct2d), ("mlp", tritonbn.BatchNormAct1d)])
def test_bn_model_holds_tritonbn_modules_and_plain_models_none(kind, norm):
    bn = models.build_model(kind, "bn")
    fused = [m for m in bn.modules() if isinstance(m, norm)]
    assert len(fused) == 3 and all(m.activation == "relu" for m in fused)
    assert not any(isinstance(m, nn.ReLU) for m in bn.modules())  # the activation is fused, not separate
    for arm in ("plain", "dropout"):
        model = models.build_model(kind, arm)
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.Dropout) for m in model.modules()) == (arm == "dropout")


def test_init_scale_multiplies_weights_only():
    torch.manual_seed(0)
    reference = models.build_model("cnn", "plain")
    torch.manual_seed(0)
    scaled = models.build_model("cnn", "plain")
    models.scale_init(scaled, 7.0)
    for (name, a), b in zip(reference.named_parameters(), scaled.parameters()):
        expected = a * 7.0 if name.endswith("weight") else a
        torch.testing.assert_close(b, expected)


@pytest.mark.parametrize("arm", ["bn", "noisy"])
def test_same_seed_reproduces_a_run_and_another_seed_differs(arm):
    config = StudyConfig.quick(steps=20, eval_every=5)
    data = load_digit_split("cpu")

    def run(seed):
        return training.train_run(data, training.RunSpec("cnn", arm, 0.03, 1.0, seed, measure_ics=True), config)

    with study.study_environment(torch.device("cpu"), kernels=False):
        first, again, other = run(3), run(3), run(4)
    assert first.train_loss == again.train_loss and first.test_acc == again.test_acc
    assert first.ics == again.ics and first.final_train_acc == again.final_train_acc
    assert first.train_loss != other.train_loss


def test_worker_processes_give_the_same_runs_as_one_process():
    config = StudyConfig.quick(steps=10, eval_every=5)
    specs = [training.RunSpec("mlp", arm, 0.03, 1.0, 0) for arm in ("bn", "plain")]
    data = load_digit_split("cpu")

    class Bar:
        def update(self):
            pass

        def set_postfix_str(self, _text):
            pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the thread count changes float summation order
    try:
        with study.study_environment(torch.device("cpu"), kernels=False):
            alone = study.train_all(specs, data, config, Bar(), kernels=False, workers=1, threads=1)
            pooled = study.train_all(specs, data, config, Bar(), kernels=False, workers=2, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert [r.train_loss for r in pooled] == [r.train_loss for r in alone]
    assert [r.spec for r in pooled] == specs


def test_layer_drift_is_per_unit_wasserstein_over_spread():
    generator = torch.Generator().manual_seed(1)
    before = torch.randn(64, 5, 3, 3, generator=generator, dtype=torch.float64)
    after = 1.7 * torch.randn(64, 5, 3, 3, generator=generator, dtype=torch.float64) + 0.4
    per_unit = [(before[:, c].flatten().numpy(), after[:, c].flatten().numpy()) for c in range(5)]
    expected = np.mean([wasserstein_distance(b, a) for b, a in per_unit]) / np.mean(
        [b.std(ddof=1) for b, _ in per_unit])
    sort = covariate_shift.per_unit_sorted
    drift = covariate_shift.layer_drift(sort(before), sort(after))
    assert math.isclose(drift, expected, rel_tol=1e-9)
    assert covariate_shift.layer_drift(sort(before), sort(before)) == 0.0
