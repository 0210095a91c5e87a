"""The claims report: paired intervals, Holm's correction, non-inferiority margins and regime guards,
with numbers derived by hand (Student t with 2 degrees of freedom has a closed form:
P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)), so t_0.975 = sqrt(2 * 0.9025 / 0.0975) = 4.30265)."""

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from test_results import make_run

from bench.report import stats
from bench.report.claims import METRICS, Claim, claims_table, evaluate, load_claims
from bench.report.claims_report import main
from bench.report.runs import ResultsError, load_runs

T975_2 = math.sqrt(2 * 0.9025 / 0.0975)


def runs_of(root, optimizer, values, metric="final_test_acc", seeds=None, settings=None, **summary_extra):
    """One completed run per value (seeds 0, 1, ... unless given), the metric set to that value."""
    for seed, value in zip(seeds or range(len(values)), values):
        run = make_run(root, optimizer, seed=seed, acc=value if metric == "final_test_acc" else 0.8, **(settings or {}))
        summary = json.loads((run / "summary.json").read_text())
        summary.update(
            {metric: value, "sample_passes_per_step": 1.0, "num_classes": 10, "final_train_loss": 0.3, **summary_extra}
        )
        (run / "summary.json").write_text(json.dumps(summary))


BEATS = Claim("B2 beats B1", "s", "sam", "sgd", "beats", "final_test_acc")


def test_consistent_per_seed_differences_resolve_only_when_paired(tmp_path):
    """Seeds spread A and B by 20 points, but A - B per seed is 1.0, 1.2, 0.8: mean 1, sd 0.2, se 0.2/sqrt 3,
    t = 8.66 on 2 df, p = 1 - 8.66/sqrt(77) = 0.01307, interval 1 +- 4.30265 * 0.11547 = [0.503, 1.497]."""
    runs_of(tmp_path / "paired", "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "paired", "sam", [0.71, 0.812, 0.908])
    (row,) = evaluate((BEATS,), load_runs([tmp_path / "paired"]))
    d = row["difference"]
    assert d.paired and d.df == 2
    assert d.mean == pytest.approx(1.0) and d.se == pytest.approx(0.2 / math.sqrt(3))
    assert (d.low, d.high) == pytest.approx((1 - T975_2 * 0.2 / math.sqrt(3), 1 + T975_2 * 0.2 / math.sqrt(3)))
    assert row["p"] == pytest.approx(1 - math.sqrt(75) / math.sqrt(77))
    assert (row["finding"], row["verdict"]) == ("A better", "reproduced")

    # the same values, A's seeds shuffled: the per-seed differences are +20.8, -9.0, -8.8 (mean 1, sd 17.15)
    runs_of(tmp_path / "shuffled", "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "shuffled", "sam", [0.908, 0.71, 0.812])
    (row,) = evaluate((BEATS,), load_runs([tmp_path / "shuffled"]))
    assert row["difference"].mean == pytest.approx(1.0) and row["difference"].paired
    assert row["finding"].startswith("not resolved") and row["verdict"] == "inconclusive"

    # and with different seeds on the two sides: Welch, unpaired, sd 10 a side, not resolved either
    runs_of(tmp_path / "welch", "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "welch", "sam", [0.71, 0.812, 0.908], seeds=[3, 4, 5])
    (row,) = evaluate((BEATS,), load_runs([tmp_path / "welch"]))
    assert not row["difference"].paired and row["finding"].startswith("not resolved")


def test_welch_and_holm_by_hand():
    # sides of variance 1 and 4, 3 runs each: se^2 = 1/3 + 4/3; df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 3.24
    d = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {3: 0.0, 4: 2.0, 5: 4.0})
    assert d.se == pytest.approx(math.sqrt(5 / 3)) and d.df == pytest.approx((5 / 3) ** 2 / ((1 / 9 + 16 / 9) / 2))
    # Holm: sorted 0.01, 0.02, 0.04 -> 3 x 0.01, 2 x 0.02, 1 x 0.04, kept non-decreasing
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert stats.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])


def test_holm_can_take_a_finding_away(tmp_path):
    """Alone, p = 0.0131 < 0.05 resolves; beside two claims with larger p-values Holm multiplies it by 3 (0.039)."""
    runs_of(tmp_path, "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path, "sam", [0.71, 0.812, 0.908])
    runs_of(tmp_path, "asam", [0.70, 0.81, 0.89])
    runs = load_runs([tmp_path])
    family = (
        BEATS,
        Claim("ASAM beats SGD", "s", "asam", "sgd", "beats", "final_test_acc"),
        Claim("ASAM beats SAM", "s", "asam", "sam", "beats", "final_test_acc"),
    )
    rows = evaluate(family, runs)
    assert [r["p_holm"] for r in rows] == pytest.approx(stats.holm([r["p"] for r in rows]))
    assert rows[0]["p"] == pytest.approx(1 - math.sqrt(75) / math.sqrt(77))  # the smallest: tripled
    assert rows[0]["p_holm"] == pytest.approx(3 * rows[0]["p"]) and rows[0]["finding"] == "A better"


MATCHES = Claim("ESAM matches SAM", "s", "esam", "sam", "matches_cheaper", "final_test_acc", margin=1.0)


@pytest.mark.parametrize(
    "gains, non_inferior",
    [
        ([0.2, 0.3, 0.1], True),  # mean +0.2, tight: the lower bound is well above -1
        ([3.0, -2.5, 1.0], False),  # mean +0.5 (a point estimate above B), but the interval reaches -6.3
        ([-0.5, -0.6, -0.4], True),  # mean -0.5, tight: worse than B, yet within the margin
        ([-0.9, -1.1, -1.0], False),  # mean -1.0 right at the margin: never non-inferior
    ],
)
def test_non_inferior_only_when_the_lower_bound_clears_the_margin(tmp_path, gains, non_inferior):
    runs_of(tmp_path, "sam", [0.80, 0.85, 0.90])
    runs_of(tmp_path, "esam", [a + g / 100 for a, g in zip([0.80, 0.85, 0.90], gains)])
    (row,) = evaluate((MATCHES,), load_runs([tmp_path]))
    d = row["difference"]
    assert row["margin"] == 1.0
    assert (row["finding"] == "non-inferior") == non_inferior == (d.low > -1.0)
    # no quietly timed runs long enough: the cost half is not resolved, so never "reproduced"
    assert row["verdict"] != "reproduced"


RELATIVE = Claim(
    "ESAM matches SAM", "s", "esam", "sam", "matches_cheaper", "final_test_acc", margin_gain=0.5, margin_reference="sgd"
)


def test_a_relative_margin_is_a_fraction_of_the_lower_bound_of_the_gain_in_that_setting(tmp_path):
    """SAM gains 4.0, 4.2 and 3.8 points over SGD: mean 4, se 0.2/sqrt 3, lower bound 4 - 4.30265 x 0.11547
    = 3.50317; the margin is half of it, 1.75158 (not half of the point estimate, 2)."""
    runs_of(tmp_path, "sgd", [0.80, 0.81, 0.82])
    runs_of(tmp_path, "sam", [0.84, 0.852, 0.858])
    runs_of(tmp_path, "esam", [0.84, 0.85, 0.86])
    (row,) = evaluate((RELATIVE,), load_runs([tmp_path]))
    assert row["margin"] == pytest.approx(0.5 * (4 - T975_2 * 0.2 / math.sqrt(3)))
    assert row["p"] is not None


@pytest.mark.parametrize(
    "gains, reason",
    [
        # mean +0.5, sd sqrt(7.75) = 2.7839, se 1.6073: the interval +0.5 +- 6.9157 reaches below 0
        ([3.0, -2.5, 1.0], "sam has no resolved gain over sgd here (+0.50 [-6.42, +7.42] paired, 3 pairs): no margin"),
        # a gain of 1e-6 points on every seed: no spread, so not resolved (it once set a margin of 5e-7)
        ([1e-6] * 3, "sam has no resolved gain over sgd here (+0.00 [+0.00, +0.00] paired, 3 pairs): no margin"),
    ],
)
def test_an_unresolved_gain_sets_no_margin(tmp_path, gains, reason):
    runs_of(tmp_path, "sgd", [0.80, 0.81, 0.82])
    runs_of(tmp_path, "sam", [v + g / 100 for v, g in zip([0.80, 0.81, 0.82], gains)])
    runs_of(tmp_path, "esam", [0.84, 0.85, 0.86])
    (row,) = evaluate((RELATIVE,), load_runs([tmp_path]))
    assert row["p"] is None and row["margin"] is None and row["verdict"] == "not testable here: " + reason


@pytest.mark.parametrize("ks", [(300, 301, 302), (350, 353, 356)])
def test_one_image_better_on_every_seed_is_no_spread_whatever_k(tmp_path, ks):
    """Accuracies are float32 k/360: A one image better on every seed differs by 100/360 = 0.27778 points, but
    float32 rounding spreads the differences by ~6e-6 at k = 300..302 and not at all at 350, 353, 356. Both must
    read the same: no spread (p 1), not a p of 0.000 at one k and 1.000 at the other."""
    f32 = [float(np.float32(k / 360)) for k in ks]
    runs_of(tmp_path, "sgd", f32)
    runs_of(tmp_path, "sam", [float(np.float32((k + 1) / 360)) for k in ks])
    (row,) = evaluate((BEATS,), load_runs([tmp_path]))
    d = row["difference"]
    assert d.se == 0 and d.mean == pytest.approx(100 / 360, abs=1e-5) and row["p"] == 1.0
    assert (row["finding"], row["verdict"]) == ("not resolved (no spread across seeds)", "inconclusive")


def test_a_run_that_did_not_complete_makes_the_claim_not_testable(tmp_path):
    """SAM's seed 3 diverged: without it SAM beats SGD (p 0.013); with it the claim is not testable, in one line."""
    runs_of(tmp_path, "sgd", [0.70, 0.80, 0.90, 0.85])
    runs_of(tmp_path, "sam", [0.71, 0.812, 0.908])
    make_run(tmp_path, "sam", seed=3, acc=0.1, status="diverged")
    (row,) = evaluate((BEATS,), load_runs([tmp_path]))
    assert row["p"] is None and row["verdict"] == "not testable here: 1 of 4 runs of sam did not complete"
    # completed, with a non-finite accuracy
    runs_of(tmp_path / "nan", "sgd", [0.70, 0.80, 0.90, 0.85])
    runs_of(tmp_path / "nan", "sam", [0.71, 0.812, 0.908, float("nan")])
    (row,) = evaluate((BEATS,), load_runs([tmp_path / "nan"]))
    assert row["verdict"] == "not testable here: 1 of 4 runs of sam have no finite final_test_acc"


def test_the_interval_cell_gives_the_pairs_and_the_seeds_left_out(tmp_path):
    """SAM ran seeds 0-2, SGD 0-1: paired on 2 pairs, SAM's seed 2 left out, and the cell says so."""
    runs_of(tmp_path / "p", "sgd", [0.70, 0.80])
    runs_of(tmp_path / "p", "sam", [0.71, 0.812, 0.5])
    (cell,) = claims_table(load_runs([tmp_path / "p"]), (BEATS,))["gain for A [95% CI]"]
    # differences 1.0 and 1.2: mean 1.1, se 0.1, t_0.975(1) = 12.7062
    assert cell == "+1.10 [-0.17, +2.37] paired, 2 pairs (1 of A unpaired, left out)"
    runs_of(tmp_path / "w", "sgd", [0.70, 0.80])
    runs_of(tmp_path / "w", "sam", [0.71, 0.812], seeds=[5, 6])
    (cell,) = claims_table(load_runs([tmp_path / "w"]), (BEATS,))["gain for A [95% CI]"]
    assert cell.endswith("Welch (unpaired: fewer than two seeds shared; n=2 vs 2)")


def test_holm_family_is_every_test_of_the_report(tmp_path):
    """One setting alone: p = 1 - sqrt(75/77) = 0.01307, reproduced. The same runs as four settings of one
    report: four tests in one family, Holm gives 4 x 0.01307 = 0.0523 >= 0.05, so none is resolved."""
    runs_of(tmp_path / "runs", "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "runs", "sam", [0.71, 0.812, 0.908])
    claims = tmp_path / "claims.toml"
    claims.write_text(
        '[[claim]]\ntext = "SAM beats SGD"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_acc"\n'
    )
    p = 1 - math.sqrt(75 / 77)
    (alone,) = evaluate(load_claims(claims), load_runs([tmp_path / "runs"]))
    assert alone["p_holm"] == pytest.approx(p) and alone["verdict"] == "reproduced"
    out = tmp_path / "claims.md"
    settings = [f"s{i}={tmp_path / 'runs'}" for i in range(4)]
    assert main([*settings, "--out", str(out), "--claims", str(claims)]) == 0
    text = out.read_text()
    assert "Holm's family here: the 4 tests of this report, over its 4 settings." in text
    assert text.count(f"| {p:.3f} ({4 * p:.3f}) |") == 4 and "| reproduced |" not in text


def test_across_settings_is_a_stratified_t_interval():
    """Setting 1: paired differences 1.0, 1.2, 0.8 (mean 1, se 0.2/sqrt 3); setting 2: 2, 3, 4 (mean 3,
    se 1/sqrt 3). Mean 2, SE = sqrt(0.04/3 + 1/3) / 2 = 0.294392, Welch-Satterthwaite df
    = (0.04/3 + 1/3)^2 / ((0.04/3)^2/2 + (1/3)^2/2) = 2.15978."""
    one = ({0: 71.0, 1: 81.2, 2: 90.8}, {0: 70.0, 1: 80.0, 2: 90.0})
    two = ({0: 62.0, 1: 63.0, 2: 64.0}, {0: 60.0, 1: 60.0, 2: 60.0})
    agg = stats.aggregate([one, two])
    variance = 0.04 / 3 + 1 / 3
    df = variance**2 / ((0.04 / 3) ** 2 / 2 + (1 / 3) ** 2 / 2)
    assert agg.mean == pytest.approx(2.0) and agg.se == pytest.approx(math.sqrt(variance) / 2) and agg.df == pytest.approx(df)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(variance) / 2
    assert (agg.mean_low, agg.mean_high) == pytest.approx((2 - half, 2 + half))
    assert (agg.mean_low, agg.mean_high) == pytest.approx((0.819, 3.181), abs=1e-3)  # t_0.975(2.16) = 4.016


def test_a_side_that_did_not_train_makes_a_claim_not_testable(tmp_path):
    """bSAM at 15.7% on 10 classes (chance 10%), training loss 2.28 against ln 10 = 2.30: a near-uniform
    predictor is trivially calibrated, so the calibration claim is not testable, whatever its ECE."""
    runs_of(tmp_path, "sam", [0.040, 0.041, 0.039], metric="final_test_ece")
    runs_of(tmp_path, "bsam", [0.010, 0.011, 0.009], metric="final_test_ece", final_test_acc=0.157, final_train_loss=2.28)
    claim = Claim("bSAM is better calibrated", "s", "bsam", "sam", "beats", "final_test_ece")
    (row,) = evaluate((claim,), load_runs([tmp_path]))
    assert row["p"] is None and row["verdict"].startswith("not testable here: bsam did not train")
    # trained, with a loss near ln 10: still not testable
    runs_of(tmp_path / "loss", "sam", [0.040, 0.041, 0.039], metric="final_test_ece")
    runs_of(tmp_path / "loss", "bsam", [0.010, 0.011, 0.009], metric="final_test_ece", final_train_loss=2.2)
    (row,) = evaluate((claim,), load_runs([tmp_path / "loss"]))
    assert "training loss 2.20" in row["verdict"]


def test_a_claim_on_a_form_of_a_that_leaves_a_setting_unset_is_not_testable(tmp_path):
    """GSAM's claim names rho_min (a_sets): GSAM run without it (a constant radius, its schedule-free form)
    is not the algorithm the paper tests, however the numbers come out; with rho_min set the claim is tested."""
    claim = Claim("GSAM beats SAM", "s", "gsam", "sam", "beats", "final_test_acc", a_sets=("rho_min",))
    runs_of(tmp_path / "free", "sam", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "free", "gsam", [0.72, 0.82, 0.92])
    (row,) = evaluate((claim,), load_runs([tmp_path / "free"]))
    assert row["p"] is None and row["verdict"] == "not testable here: gsam runs without rho_min, which the paper's algorithm sets"
    runs_of(tmp_path / "scheduled", "sam", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "scheduled", "gsam", [0.72, 0.821, 0.919], settings={"hyperparameters": {"rho_min": 0.025}})
    (row,) = evaluate((claim,), load_runs([tmp_path / "scheduled"]))
    assert row["p"] is not None and row["verdict"] == "reproduced"
    assert load_claims()[[c.text for c in load_claims()].index("GSAM beats SAM")].a_sets == ("rho_min",)


def test_contradicted_only_in_the_papers_regime(tmp_path):
    runs_of(tmp_path, "sgd", [0.75, 0.80, 0.85])
    runs_of(tmp_path, "sam", [0.74, 0.788, 0.842])  # 1, 1.2 and 0.8 points worse
    outside = Claim("SAM beats SGD", "s", "sam", "sgd", "beats", "final_test_acc", regime_datasets=("cifar10",))
    inside = Claim("SAM beats SGD", "s", "sam", "sgd", "beats", "final_test_acc", regime_datasets=("digits",))
    assert evaluate((outside,), load_runs([tmp_path]))[0]["verdict"] == "not observed at this scale"
    assert evaluate((inside,), load_runs([tmp_path]))[0]["verdict"] == "contradicted"


def test_two_settings_of_one_optimizer_are_two_rows_never_pooled(tmp_path):
    runs_of(tmp_path, "sgd", [0.80, 0.81, 0.82])
    for seed in range(3):
        for rho, acc in ((0.05, 0.85), (0.1, 0.79)):
            run = make_run(tmp_path, "sam", seed=seed, acc=acc + seed / 100, hyperparameters={"rho": rho})
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, "num_classes": 10, "final_train_loss": 0.3}))
    table = claims_table(load_runs([tmp_path]), (BEATS,))
    assert len(table) == 2
    assert sorted(table.A) == ["sam (rho=0.05): 86.00 ± 1.00 (n=3)", "sam (rho=0.1): 80.00 ± 1.00 (n=3)"]


def test_every_claim_metric_has_its_direction():
    """Higher accuracy is better; lower ECE, loss and lambda_max are better: the direction belongs to the metric."""
    assert {m: higher for m, (_, _, higher) in METRICS.items()} == {
        "final_test_acc": True,
        "final_test_ece": False,
        "final_test_loss": False,
        "hessian_max_eigenvalue": False,
    }
    assert all(c.higher_is_better == METRICS[c.metric][2] for c in load_claims())


def test_a_lambda_max_not_converged_makes_a_claim_on_it_not_testable(tmp_path):
    """A claim on lambda_max compares estimates only where power iteration converged: one run whose residual is above
    the limit makes it not testable, naming the run count and the residual; converged estimates are compared."""
    claim = Claim("SAM finds flatter minima than SGD", "s", "sam", "sgd", "beats", "hessian_max_eigenvalue")
    for residual, testable in ((1e-4, True), (0.3, False)):
        root = tmp_path / str(residual)
        runs_of(root, "sgd", [40.0, 42.0, 45.0], metric="hessian_max_eigenvalue")
        runs_of(root, "sam", [20.0, 21.0, 23.0], metric="hessian_max_eigenvalue")
        for run in root.iterdir():  # the measure moved where a run keeps it; one SAM run's residual as given
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
            value = summary.pop("hessian_max_eigenvalue")
            (run / "summary.json").write_text(json.dumps(summary))
            one = config["optimizer"] == "sam" and config["seed"] == 1
            sharpness = {"hessian_max_eigenvalue": value, "hessian_eigenvalue_residual": residual if one else 1e-4}
            (run / "sharpness.json").write_text(json.dumps(sharpness))
        (row,) = evaluate((claim,), load_runs([root]))
        if testable:
            assert row["p"] is not None and row["finding"] == "A better"
        else:
            assert row["p"] is None
            assert (
                row["verdict"]
                == "not testable here: λ_max not converged on 1 of 3 runs of sam (power-iteration residual up to 0.3, limit 0.05)"
            )


def test_a_lower_ece_favours_a(tmp_path):
    """bSAM's ECE 2, 1.9 and 2 points below SAM's: lower is better, so the gain for bSAM is +1.97."""
    runs_of(tmp_path, "sam", [0.040, 0.045, 0.039], metric="final_test_ece")
    runs_of(tmp_path, "bsam", [0.020, 0.026, 0.019], metric="final_test_ece")
    claim = Claim("bSAM is better calibrated than SAM", "s", "bsam", "sam", "beats", "final_test_ece")
    (row,) = evaluate((claim,), load_runs([tmp_path]))
    assert row["difference"].mean == pytest.approx((2.0 + 1.9 + 2.0) / 3) and row["finding"] == "A better"


def test_the_command_writes_sections_a_summary_and_a_forest_plot(tmp_path):
    runs_of(tmp_path / "a", "sgd", [0.80, 0.81, 0.82])
    runs_of(tmp_path / "a", "sam", [0.79, 0.805, 0.81])
    out = tmp_path / "claims.md"
    assert main([f"small={tmp_path / 'a'}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## small" in text and "| SAM beats SGD |" in text and "## Across settings" in text
    assert (tmp_path / "claims_forest.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "body, message",
    [
        ('text = "x"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_ece"\n', "missing source"),
        (
            'text = "x"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_train_acc"\n',
            "metric 'final_train_acc' is not one of",
        ),
        (
            'text = "x"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "matches_cheaper"\nmetric = "final_test_acc"\n',
            "needs a margin",
        ),
        (
            'text = "x"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_acc"\nmargin = 1\n',
            "takes no margin",
        ),
        (
            'text = "x"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_acc"\nmargn = 1\n',
            "unknown margn",
        ),
        (
            'text = "x"\nsource = "s"\na = "nosuch"\nb = "sgd"\nkind = "beats"\nmetric = "final_test_acc"\n',
            "unknown optimizer 'nosuch'",
        ),
        (
            'text = "x"\nsource = "s"\na = "sam"\nb = "sgd"\nkind = "matches_cheaper"\nmetric = "final_test_acc"\nmargin = -1\n',
            "must be > 0",
        ),
    ],
)
def test_a_bad_claims_file_is_one_line(tmp_path, body, message):
    path = tmp_path / "claims.toml"
    path.write_text("[[claim]]\n" + body)
    with pytest.raises(ResultsError, match=message):
        load_claims(path)


def test_identical_per_seed_differences_resolve_nothing(tmp_path):
    """A - B exactly -1 on every seed: no spread, so a t test has nothing to go on (not "A worse", p 0)."""
    runs_of(tmp_path, "sgd", [0.80, 0.85, 0.90])
    runs_of(tmp_path, "sam", [0.79, 0.84, 0.89])
    (row,) = evaluate((BEATS,), load_runs([tmp_path]))
    assert row["p"] == 1.0 and row["finding"] == "not resolved (no spread across seeds)"


def test_pairing_uses_the_seeds_both_sides_ran():
    """Seeds 0-2 against 0-1: paired on 0 and 1 (differences 1 and 1.2), seed 2 left out."""
    d = stats.compare({0: 71.0, 1: 81.2, 2: 50.0}, {0: 70.0, 1: 80.0})
    assert d.paired and d.n_a == d.n_b == 2 and d.df == 1 and d.mean == pytest.approx(1.1)
    assert d.se == pytest.approx(0.1)  # sd of (1, 1.2) is 0.1414, over sqrt 2


def test_a_compute_matched_claim_compares_against_b_at_its_multiple_of_the_epochs(tmp_path):
    """SAM at 4 epochs against SGD at 8 (equal passes) and at 4 (equal epochs): each claim finds its own B."""
    runs_of(tmp_path, "sam", [0.80, 0.82, 0.84], settings={"epochs": 4})
    runs_of(tmp_path, "sgd", [0.70, 0.72, 0.74], settings={"epochs": 4})
    runs_of(tmp_path, "sgd", [0.79, 0.815, 0.835], settings={"epochs": 8})
    matched = Claim("SAM beats SGD at equal passes", "s", "sam", "sgd", "beats", "final_test_acc", b_epochs=2)
    rows = evaluate((BEATS, matched), load_runs([tmp_path]))
    by_claim = {row["claim"].text: row for row in rows}
    assert len(rows) == 2  # not SAM at 4 against SGD at 8 for the equal-epochs claim, nor the reverse
    assert by_claim["B2 beats B1"]["difference"].mean == pytest.approx(10.0)
    assert by_claim["SAM beats SGD at equal passes"]["difference"].mean == pytest.approx(2 / 3)  # (1 + 0.5 + 0.5) / 3
    assert "epochs=8" in by_claim["SAM beats SGD at equal passes"]["b"].label


def test_the_report_keeps_its_compared_claims_when_rewritten_from_the_same_runs(tmp_path):
    """A claim whose side did not train has an interval but no test: the guard counts both files alike."""
    runs_of(tmp_path / "runs", "sgd", [0.70, 0.80, 0.90])
    runs_of(tmp_path / "runs", "sam", [0.71, 0.812, 0.908])
    runs_of(tmp_path / "runs", "bsam", [0.10, 0.11, 0.12])  # did not train: its claims are compared, not tested
    out = tmp_path / "claims.md"
    assert main([f"one={tmp_path / 'runs'}", "--out", str(out)]) == 0
    assert main([f"one={tmp_path / 'runs'}", "--out", str(out)]) == 0  # the same runs again: not fewer
