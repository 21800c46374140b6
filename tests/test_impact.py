"""The batch-norm impact study (tritonbn.perf.impact): the quick run on CPU produces its report and plots,
every claim gets figures and a verdict, verdicts follow the numbers, the BN nets really hold tritonbn
modules, and a run is reproducible for its seed. No test asserts that a claim holds."""

import argparse
import math
import re

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tritonbn
from tritonbn.perf import impact

PLOTS = ("curves.png", "lr_sweep.png", "init_sweep.png", "generalisation.png", "timing.png", "ics.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("impact")
    parser = argparse.ArgumentParser()
    impact.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert impact.run(args) == 0
    return out


def _claim_rows(report: str) -> list[list[str]]:
    """The cells of the claim table's body rows."""
    rows = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_quick_run_writes_report_results_and_plots(quick_out):
    written = {p.name for p in quick_out.iterdir()}
    assert {"impact.md", "results.json", *PLOTS} <= written


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_valid_pngs_with_content(quick_out, name):
    import matplotlib.image

    path = quick_out / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_every_claim_has_figures_a_verdict_and_a_plot(quick_out):
    report = (quick_out / "impact.md").read_text()
    rows = _claim_rows(report)
    assert [row[0] for row in rows] == [str(n) for n in impact.CLAIMS]
    for number, _claim, figures, verdict, plots in rows:
        for kind in impact.MODEL_KINDS:
            assert re.search(rf"{kind.upper()}: .*\d\.\d", figures), (number, figures)
        assert verdict.strip("*") in (impact.HELD, impact.NOT_HELD, impact.MIXED)
        assert all((quick_out / p).is_file() for p in re.findall(r"\(([\w.]+\.png)\)", plots))


def test_report_states_bn_path_settings_and_reproduction(quick_out):
    report = (quick_out / "impact.md").read_text()
    # the tests run with TRITON_INTERPRET=1, yet `auto` must train through the reference path on CPU
    assert "**BN path**: PyTorch reference path" in report
    assert "--quick" in report and "--seeds 0" in report
    for rule in impact.RULES.values():
        assert rule in report


def test_results_json_matches_the_plan(quick_out):
    import json

    payload = json.loads((quick_out / "results.json").read_text())
    config = impact.StudyConfig.quick()
    assert len(payload["runs"]) == len(impact.plan_runs(config))
    assert payload["config"]["seeds"] == list(config.seeds)


@pytest.mark.parametrize("kind, norm", [("cnn", tritonbn.BatchNormAct2d), ("mlp", tritonbn.BatchNormAct1d)])
def test_bn_model_holds_tritonbn_modules_and_plain_models_none(kind, norm):
    bn = impact.build_model(kind, "bn")
    fused = [m for m in bn.modules() if isinstance(m, norm)]
    assert len(fused) == 3 and all(m.activation == "relu" for m in fused)
    assert not any(isinstance(m, nn.ReLU) for m in bn.modules())  # the activation is fused, not separate
    for arm in ("plain", "dropout"):
        model = impact.build_model(kind, arm)
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.Dropout) for m in model.modules()) == (arm == "dropout")


def test_init_scale_multiplies_weights_only():
    torch.manual_seed(0)
    reference = impact.build_model("cnn", "plain")
    torch.manual_seed(0)
    scaled = impact.build_model("cnn", "plain")
    impact.scale_init(scaled, 7.0)
    for (name, a), b in zip(reference.named_parameters(), scaled.parameters()):
        expected = a * 7.0 if name.endswith("weight") else a
        torch.testing.assert_close(b, expected)


def test_same_seed_reproduces_a_run_and_another_seed_differs():
    config = impact.StudyConfig.quick(steps=20, eval_every=5)
    data = impact.load_digit_split("cpu")

    def run(seed):
        return impact.train_run(data, impact.RunSpec("cnn", "bn", 0.03, 1.0, seed, measure_ics=True), config)

    with impact.study_environment(torch.device("cpu"), kernels=False):
        first, again, other = run(3), run(3), run(4)
    assert first.train_loss == again.train_loss and first.test_acc == again.test_acc
    assert first.ics == again.ics and first.final_train_acc == again.final_train_acc
    assert first.train_loss != other.train_loss


def test_worker_processes_give_the_same_runs_as_one_process():
    config = impact.StudyConfig.quick(steps=10, eval_every=5)
    specs = [impact.RunSpec("mlp", arm, 0.03, 1.0, 0) for arm in ("bn", "plain")]
    data = impact.load_digit_split("cpu")

    class Bar:
        def update(self):
            pass

        def set_postfix_str(self, _text):
            pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the thread count changes float summation order
    try:
        with impact.study_environment(torch.device("cpu"), kernels=False):
            alone = impact.train_all(specs, data, config, Bar(), kernels=False, workers=1, threads=1)
            pooled = impact.train_all(specs, data, config, Bar(), kernels=False, workers=2, threads=1)
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
    drift = impact.layer_drift(impact._per_unit_sorted(before), impact._per_unit_sorted(after))
    assert math.isclose(drift, expected, rel_tol=1e-9)
    assert impact.layer_drift(impact._per_unit_sorted(before), impact._per_unit_sorted(before)) == 0.0


def _synthetic_results(accuracy, config):
    """Results whose every run ends at accuracy(arm, init_scale)."""
    runs = [impact.RunResult(spec, [config.steps], [0.1], [accuracy(spec.arm, spec.init_scale)], 1.0,
                             accuracy(spec.arm, spec.init_scale), False, None)
            for spec in impact.plan_runs(config)]
    return impact.Results(runs, config)


@pytest.mark.parametrize("bn_varies, verdict", [(False, impact.HELD), (True, impact.NOT_HELD)])
def test_init_verdict_follows_the_measured_spread(bn_varies, verdict):
    config = impact.StudyConfig.quick(seeds=(0, 1))

    def accuracy(arm, scale):
        varies = (arm == "bn") == bn_varies
        return 0.1 if varies and scale != 1.0 else 0.95

    _figures, measured = impact.claim_init_sensitivity(_synthetic_results(accuracy, config))
    assert measured == verdict


@pytest.mark.parametrize("bn_ms, verdict", [(2.0, impact.HELD), (1.0, impact.NOT_HELD), (1.02, impact.NOT_HELD)])
def test_overhead_verdict_follows_the_timings(bn_ms, verdict):
    config = impact.StudyConfig.quick()
    timings = {k: {"bn": [bn_ms * 1e-3] * 3, "plain": [1e-3] * 3} for k in config.models}
    assert impact.claim_overhead(timings, config)[1] == verdict


def test_models_that_disagree_give_mixed():
    assert impact.combine_verdicts([impact.HELD, impact.HELD]) == impact.HELD
    assert impact.combine_verdicts([impact.HELD, impact.NOT_HELD]) == impact.MIXED
