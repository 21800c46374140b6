"""The batch-norm impact study end to end (tritonbn.perf.impact): the quick run on CPU produces its report,
results and plots, and every claim gets figures, a verdict and a plot. No test asserts that a claim holds."""

import argparse
import json
import re

import pytest

from tritonbn.perf.impact import claims, cli, models, study
from tritonbn.perf.impact.config import StudyConfig

PLOTS = ("curves.png", "lr_sweep.png", "init_sweep.png", "generalisation.png", "timing.png", "ics.png",
         "intervention.png", "landscape.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("impact")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert cli.run(args) == 0
    return out


def _claim_rows(report: str) -> list[list[str]]:
    """The cells of the claim table's body rows."""
    rows = [line for line in report.splitlines() if re.match(r"\| \d+[ab]? \|", line)]
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
    assert [row[0] for row in rows] == list(claims.CLAIMS)
    for number, _claim, figures, verdict, plots in rows:
        for kind in models.MODEL_KINDS:
            assert re.search(rf"{kind.upper()}: .*\d\.\d", figures), (number, figures)
        assert verdict.strip("*") in (claims.HELD, claims.NOT_HELD, claims.MIXED, claims.INCONCLUSIVE)
        assert all((quick_out / p).is_file() for p in re.findall(r"\(([\w.]+\.png)\)", plots))


def test_report_states_bn_path_settings_and_reproduction(quick_out):
    report = (quick_out / "impact.md").read_text()
    # the tests run with TRITON_INTERPRET=1, yet `auto` must train through the reference path on CPU
    assert "**BN path**: PyTorch reference path" in report
    assert "--quick" in report and "--seeds 0" in report and "--noise-dose 1" in report
    assert "U(-0.5, 0.5)" in report and "U(1, 1.25)" in report  # the noise's distribution, stated
    for rule in claims.RULES.values():
        assert rule in report


def test_results_json_matches_the_plan(quick_out):
    payload = json.loads((quick_out / "results.json").read_text())
    config = StudyConfig.quick()
    assert len(payload["runs"]) == len(study.plan_runs(config))
    assert payload["config"]["seeds"] == list(config.seeds)
    probed = [r for r in payload["runs"] if r["measure_landscape"]]
    assert sorted({r["arm"] for r in probed}) == sorted(models.INTERVENTION_ARMS)
    assert len(probed) == len(models.INTERVENTION_ARMS) * len(config.models) * len(config.seeds)
    for run in probed:
        assert run["landscape"]["steps"][0] == 0 and len(run["landscape"]["points"]) == len(run["landscape"]["steps"])


def test_landscape_table_has_a_row_per_model_and_intervention_arm(quick_out):
    report = (quick_out / "impact.md").read_text()
    for kind in models.MODEL_KINDS:
        for arm in models.INTERVENTION_ARMS:
            label = re.escape(models.ARM_LABELS[arm])
            assert re.search(rf"\| {kind.upper()} \| {label} \|( [\d.e+-]+ \|){{3}}", report)
