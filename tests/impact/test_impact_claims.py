"""The impact study's verdicts follow the numbers: synthetic results and timings with a known answer get
that verdict, and models that disagree make a claim mixed."""

import pytest

from tritonbn.perf.impact import claims, study
from tritonbn.perf.impact.config import StudyConfig
from tritonbn.perf.impact.training import RunResult


def _synthetic_results(accuracy, config):
    """Results whose every run ends at accuracy(arm, init_scale)."""
    runs = [RunResult(spec, [config.steps], [0.1], [accuracy(spec.arm, spec.init_scale)], 1.0,
                      accuracy(spec.arm, spec.init_scale), False, None)
            for spec in study.plan_runs(config)]
    return claims.Results(runs, config)


@pytest.mark.parametrize("bn_varies, verdict", [(False, claims.HELD), (True, claims.NOT_HELD)])
def test_init_verdict_follows_the_measured_spread(bn_varies, verdict):
    config = StudyConfig.quick(seeds=(0, 1))

    def accuracy(arm, scale):
        varies = (arm == "bn") == bn_varies
        return 0.1 if varies and scale != 1.0 else 0.95

    _figures, measured = claims.claim_init_sensitivity(_synthetic_results(accuracy, config))
    assert measured == verdict


@pytest.mark.parametrize("bn_ms, verdict", [(2.0, claims.HELD), (1.0, claims.NOT_HELD), (1.02, claims.NOT_HELD)])
def test_overhead_verdict_follows_the_timings(bn_ms, verdict):
    config = StudyConfig.quick()
    timings = {k: {"bn": [bn_ms * 1e-3] * 3, "plain": [1e-3] * 3} for k in config.models}
    assert claims.claim_overhead(timings, config)[1] == verdict


def test_models_that_disagree_give_mixed():
    assert claims.combine_verdicts([claims.HELD, claims.HELD]) == claims.HELD
    assert claims.combine_verdicts([claims.HELD, claims.NOT_HELD]) == claims.MIXED
