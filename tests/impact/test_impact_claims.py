"""The impact study's verdicts follow the numbers: synthetic results and timings with a known answer get
that verdict, and models that disagree make a claim mixed. Claim 5b's rule is checked branch by branch."""

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


BN_FAST, PLAIN_SLOW = [30, 30, 45], [90, 105, 90]


@pytest.mark.parametrize("ics_raised, noisy, bn, verdict", [
    (True, [30, 45, 30], BN_FAST, claims.NOT_HELD),  # noisy BN within the noise floor of BN: BN's speed survives
    (True, [90, 90, 105], BN_FAST, claims.HELD),  # noisy BN no faster than no-BN: the noise took the speed away
    (True, [60, 60, 60], BN_FAST, claims.INCONCLUSIVE),  # in between: slower than BN, faster than no-BN
    (False, [30, 30, 45], BN_FAST, claims.INCONCLUSIVE),  # the noise did not raise ICS to no-BN's level
    (True, [30, 30, 45], [90, 90, 90], claims.INCONCLUSIVE),  # BN itself is not faster: no speed to explain
])
def test_intervention_verdict_covers_every_branch(ics_raised, noisy, bn, verdict):
    steps = {"bn": bn, "plain": PLAIN_SLOW, "noisy": noisy}
    assert claims.intervention_verdict(ics_raised, steps, margin=15) == verdict


def test_intervention_verdict_counts_differences_only_beyond_the_noise_floor():
    steps = {"bn": [30, 30, 30], "plain": [90, 90, 90]}
    assert claims.intervention_verdict(True, {**steps, "noisy": [45, 45, 45]}, margin=15) == claims.NOT_HELD
    assert claims.intervention_verdict(True, {**steps, "noisy": [60, 60, 60]}, margin=15) == claims.INCONCLUSIVE
    # seeds that disagree widely widen the floor (2 x standard error) until noisy BN is told from neither arm
    assert claims.intervention_verdict(True, {**steps, "noisy": [15, 30, 135]}, margin=15) == claims.INCONCLUSIVE


@pytest.mark.parametrize("noisy_ics, noisy_steps, verdict", [
    (0.5, 30, claims.NOT_HELD), (0.5, 90, claims.HELD), (0.1, 30, claims.INCONCLUSIVE)])
def test_claim_intervention_reads_ics_per_layer_and_steps_from_the_runs(noisy_ics, noisy_steps, verdict):
    """Runs whose ICS per layer and first evaluation at the target are set per arm: no-BN's ICS is 0.3 in every
    layer, so noisy BN's 0.1 is below it and 0.5 above it."""
    config = StudyConfig.quick(seeds=(0, 1))
    ics = {"bn": 0.01, "plain": 0.3, "noisy": noisy_ics}
    steps = {"bn": 30, "plain": 90, "noisy": noisy_steps}
    evals = list(range(config.eval_every, config.steps + 1, config.eval_every))
    runs = []
    for spec in study.plan_runs(config):
        acc = [0.95 if s >= steps.get(spec.arm, 0) else 0.5 for s in evals]
        drift = {layer: [ics[spec.arm]] * 3 for layer in ("L2 Conv2d", "L3 Conv2d")} if spec.measure_ics else None
        runs.append(RunResult(spec, evals, [0.1] * len(evals), acc, 1.0, acc[-1], False, drift))
    figures, measured = claims.claim_intervention(claims.Results(runs, config))
    assert measured == verdict
    assert f"L2 {noisy_ics:.3f}/0.300/0.010" in figures and "no BN 90" in figures
    assert f"at {100 if noisy_ics > 0.3 else 0}% of captures" in figures


def test_a_seed_that_never_reaches_the_target_counts_one_interval_past_the_end():
    config = StudyConfig.quick(seeds=(0,))
    runs = [RunResult(spec, [config.steps], [0.1], [0.5], 1.0, 0.5, False, None) for spec in study.plan_runs(config)]
    res = claims.Results(runs, config)
    assert claims.steps_per_seed(res, "mlp", "noisy") == [config.steps + config.eval_every]
