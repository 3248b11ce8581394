"""The ablation report's statistics on hand-made tables whose answers are worked out here, and runs()."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT

from sweep.stats import summarize, verdict
from sweep.study import check_cpus, runs

T4 = 2.7764451051977987  # Student's t, 97.5% quantile, 4 degrees of freedom (printed tables: 2.776)
T1 = 12.706204736174704  # the same with 1 degree of freedom (tables: 12.706)
BASE = [98.00, 98.10, 97.90, 98.20, 97.80]  # baseline test accuracy (%) at seeds 0..4
STUDY = [
    {"name": "baseline", "set": {}, "reference": {"test_accuracy": 0.9802}},
    {"name": "wide", "set": {"model.hidden_units": 2048}, "reference": {"test_accuracy": 0.9770}},
]


def frame(diffs, base=BASE):
    """A per-run table: the baseline at `base` and "wide" at base + diffs (points), seed by seed."""
    rows = [("baseline", s, a) for s, a in enumerate(base)]
    rows += [("wide", s, a + d) for s, (a, d) in enumerate(zip(base, diffs, strict=False))]
    return pd.DataFrame(
        [
            {"name": f"{v}-s{s}", "variant": v, "seed": s, "test_accuracy": a / 100, "test_loss": 0.07}
            for v, s, a in rows
        ]
    )


def by_name(summary):
    return {row["variant"]: row for row in summary}


def test_paired_difference_and_its_interval():
    # Differences -0.3, -0.5, -0.4, -0.6, -0.2: mean -0.4, squared deviations sum to 0.10, so the
    # sample variance is 0.10 / 4 and the standard error sqrt(0.025 / 5).
    wide = by_name(summarize(frame([-0.3, -0.5, -0.4, -0.6, -0.2]), STUDY))["wide"]
    half = T4 * math.sqrt(0.025 / 5)
    assert wide["pairs"] == 5
    assert wide["diff"] == pytest.approx(-0.4)
    assert wide["diff_ci"] == pytest.approx((-0.4 - half, -0.4 + half))
    assert wide["verdict"] == "worse by 0.40 points (95% CI 0.20 to 0.60)"
    # Unpaired, the same numbers would drown in the baseline's own spread (sd 0.158 points per seed,
    # and the variant's): pairing is what makes a 0.4 point difference visible.
    assert wide["acc_mean"] == pytest.approx(sum(BASE) / 5 - 0.4)


def test_baseline_spread_and_prediction_interval():
    base = by_name(summarize(frame([]), STUDY))["baseline"]
    sd = math.sqrt(sum((a - 98.0) ** 2 for a in BASE) / 4)  # mean 98.0
    assert (base["n"], base["acc_mean"], base["acc_sd"]) == (5, pytest.approx(98.0), pytest.approx(sd))
    assert (base["acc_min"], base["acc_max"]) == (pytest.approx(97.8), pytest.approx(98.2))
    assert base["acc_ci"] == pytest.approx((98.0 - T4 * sd / math.sqrt(5), 98.0 + T4 * sd / math.sqrt(5)))
    pi = T4 * sd * math.sqrt(1 + 1 / 5)
    assert base["prediction"] == pytest.approx((98.0 - pi, 98.0 + pi))
    assert "verdict" not in base  # the baseline is not compared with itself
    assert base["placement"] == (
        f"The published 98.02% lies inside the range of the 5 seeds (97.80% to 98.20%) and inside the "
        f"95% prediction interval for one more run ({98 - pi:.2f}% to {98 + pi:.2f}%)."
    )
    # "wide" at 98.40 .. 98.80 puts the published 97.70% below its range and its prediction interval.
    wide = by_name(summarize(frame([0.5, 0.6, 0.7, 0.4, 0.9]), STUDY))["wide"]
    assert "lies outside the range of the 5 seeds" in wide["placement"]
    assert "and outside the 95% prediction interval" in wide["placement"]


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        (0.0, "better by 0.20 points (95% CI 0.00 to 0.40)"),  # lower bound +0.0037: just excludes zero
        (-0.004, "no difference detected; the interval is ±0.20 points (-0.00 to +0.39)"),  # -0.0003
    ],
)
def test_verdict_at_the_edge_of_zero(shift, expected):
    # Differences 0.1, 0.3, 0.2, 0.4, 0.0 (+ shift): mean 0.2 + shift, half-width T4 * sqrt(0.025 / 5).
    assert 0.2 - T4 * math.sqrt(0.025 / 5) == pytest.approx(0.0037, abs=1e-4)
    wide = by_name(summarize(frame([d + shift for d in (0.1, 0.3, 0.2, 0.4, 0.0)]), STUDY))["wide"]
    assert wide["verdict"] == expected


def test_verdict_wording():
    assert verdict(0.2, (0.0, 0.4)) == "no difference detected; the interval is ±0.20 points (+0.00 to +0.40)"
    assert verdict(-0.2, (-0.4, 0.0)).startswith("no difference detected; the interval is ±0.20 points")
    assert verdict(-0.41, (-0.60, -0.22)) == "worse by 0.41 points (95% CI 0.22 to 0.60)"
    assert verdict(0.3, None) == "+0.30 points on one seed; no interval can be computed from a single pair"


def test_two_seeds_use_one_degree_of_freedom():
    wide = by_name(summarize(frame([-1.0, -2.0], base=[98.0, 97.0]), STUDY))["wide"]
    half = T1 * math.sqrt(0.5) / math.sqrt(2)  # differences -1, -2: sd sqrt(0.5)
    assert wide["diff_ci"] == pytest.approx((-1.5 - half, -1.5 + half))
    assert wide["verdict"].startswith("no difference detected")


def test_one_seed_gives_a_report_without_intervals(tmp_path):
    """n = 1 end to end: report.py --from-csv writes the report, saying no interval can be computed."""
    study = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    study["experiments"] = [e for e in study["experiments"] if e["name"] in ("baseline", "no-dropout")]
    (tmp_path / "ablations.yaml").write_text(yaml.safe_dump(study))
    numbers = {"best_epoch": 3, "loss": 0.02, "accuracy": 0.99, "val_loss": 0.08, "val_accuracy": 0.98}
    numbers |= {"train_seconds": 40.0, "params": 669706, "rev": "0" * 40}
    pd.DataFrame(
        [
            {"name": "baseline-s0", "variant": "baseline", "seed": 0, "model.dropout": "0.2"}
            | {"test_accuracy": 0.9811, "test_loss": 0.0712, **numbers},
            {"name": "no-dropout-s0", "variant": "no-dropout", "seed": 0, "model.dropout": "0"}
            | {"test_accuracy": 0.9789, "test_loss": 0.0790, **numbers},
        ]
    ).to_csv(tmp_path / "runs.csv", index=False)
    cmd = [sys.executable, "-m", "sweep.report", "--from-csv", "runs.csv", "--seeds", "0", "--out", "out"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out/ablations.md").read_text()
    assert "one seed only (0): no spread can be measured, no interval computed" in text
    assert "| baseline | none | 1 | 98.11% | n/a | n/a | 98.11% | 98.11% | n/a | n/a | n/a | 98.02% |" in text
    assert (
        "| no-dropout | model.dropout=0 | 1 | 97.89% | n/a | n/a | 97.89% | 97.89% | baseline | -0.22 | n/a "
        "| 97.57% |" in text
    )
    assert "-0.22 points on one seed; no interval can be computed from a single pair" in text
    assert "one seed gives no range and no prediction interval" in text
    assert "extra overrides" not in text  # model.dropout is the variant's own
    assert "nan" not in text.lower()
    assert (tmp_path / "out/ablations.png").stat().st_size > 10_000


T2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
FASHION = [
    {
        "name": "fashion-mlp",
        "set": {"data.dataset": "fashion-mnist"},
        "compare_to": None,
        "reference": {"test_accuracy": 0.900, "source": "the MLP row"},
    },
    {
        "name": "fashion-cnn",
        "set": {"data.dataset": "fashion-mnist", "model.type": "cnn", "train.epochs": 9},
        "compare_to": "fashion-mlp",
        "reference": {"test_accuracy": 0.916, "source": "the CNN row"},
    },
]


def fashion_runs(path):
    """Three seeds of each: the CNN 3.0, 2.6 and 3.4 points above the MLP, with far fewer parameters."""
    rows = []
    for seed, (mlp, cnn) in enumerate([(88.0, 91.0), (88.4, 91.0), (87.6, 91.0)]):
        for variant, acc, params, seconds, kind in (
            ("fashion-mlp", mlp, 669_706, 30.0, "mlp"),
            ("fashion-cnn", cnn, 34_826, 60.0 + seed, "cnn"),
        ):
            rows.append(
                {"name": f"{variant}-s{seed}", "variant": variant, "seed": seed}
                | {"data.dataset": "fashion-mnist", "model.type": kind, "test_accuracy": acc / 100}
                | {
                    "test_loss": 0.3,
                    "best_epoch": 9 - (seed == 2),
                    "loss": 0.2,
                    "accuracy": 0.92,
                    "val_loss": 0.3,
                }
                | {"val_accuracy": 0.9, "train_seconds": seconds, "params": params, "rev": "0" * 40}
            )
    pd.DataFrame(rows).to_csv(path, index=False)


def test_a_variant_without_its_compared_one_reports_cleanly(tmp_path):
    """`make report ONLY=no-dropout`: nothing to pair with, said in the report, and no raw warning
    (the figure's empty row of differences once made matplotlib print one)."""
    (tmp_path / "ablations.yaml").write_text((ROOT / "ablations.yaml").read_text())
    row = {"name": "no-dropout-s0", "variant": "no-dropout", "seed": 0, "model.dropout": "0"}
    row |= {"test_accuracy": 0.9789, "test_loss": 0.079, "best_epoch": 3, "loss": 0.02, "accuracy": 0.99}
    row |= {"val_loss": 0.08, "val_accuracy": 0.98, "train_seconds": 40.0, "params": 669706}
    pd.DataFrame([row | {"rev": "0" * 40}]).to_csv(tmp_path / "runs.csv", index=False)
    cmd = [sys.executable, "-m", "sweep.report", "--from-csv", "runs.csv", "--seeds", "0"]
    proc = subprocess.run(
        [*cmd, "--only", "no-dropout", "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    text = (tmp_path / "out/ablations.md").read_text()
    assert "the baseline has not run, so nothing is compared with it" in text


def test_partial_reference_and_compare_to(tmp_path):
    """A variant paired with the one it names (not the baseline), references of test accuracy only."""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"seeds": [0, 1, 2], "experiments": FASHION}))
    fashion_runs(tmp_path / "runs.csv")
    cmd = [sys.executable, "-m", "sweep.report", "--study", "study.yaml", "--from-csv", "runs.csv"]
    proc = subprocess.run(
        [*cmd, "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out/ablations.md").read_text()
    # Differences 3.0, 2.6, 3.4: mean 3.0, squared deviations 0.32 over 2 degrees of freedom.
    half = T2 * math.sqrt(0.16 / 3)
    assert round(3 - half, 2) == 2.01 and round(3 + half, 2) == 3.99
    assert "against fashion-mlp, better by 3.00 points (95% CI 2.01 to 3.99)." in text
    assert "| 91.00% | fashion-mlp | +3.00 | +2.01 to +3.99 | 91.60% |" in text
    assert "| 88.40% | n/a | n/a | n/a | 90.00% |" in text  # fashion-mlp: compared with nothing
    assert "**fashion-mlp** (data.dataset=fashion-mnist): The published 90.00%" in text
    # The final-epoch table shows what the sources did not publish as n/a.
    assert (
        "| fashion-cnn | 0.2000 (n/a) | 92.00% (n/a) | 0.3000 (n/a) | 90.00% (n/a) | 8 to 9 | 61.0 s "
        "| 34,826 |" in text
    )
    assert (
        "It has 34,826 parameters against 669,706 for fashion-mlp (0.05x) and trains in 61.0 s against 30.0 s"
        " (mean per run): fewer parameters, higher accuracy." in text
    )
    assert (
        "It trains 9 epochs (train.epochs); its best epoch by validation loss was 8 to 9, the last one in 2 "
        "of 3 runs." in text
    )
    assert text.count("It trains") == 1  # fashion-mlp keeps params.yaml's epochs: no note
    assert "Published: the CNN row." in text
    assert "nan" not in text.lower()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compare_to": "fashion-mpl"}, "fashion-cnn: compare_to must name another variant of the study"),
        ({"compare_to": "fashion-cnn"}, "fashion-cnn: compare_to must name another variant of the study"),
        ({"reference": {"source": "x"}}, "fashion-cnn: reference needs at least the published test_accuracy"),
        ({"reference": {"test_accuracy": 0.9, "tst_loss": 0.3}}, "fashion-cnn: reference has tst_loss;"),
    ],
)
def test_bad_compare_to_or_reference(tmp_path, change, message):
    study = {"seeds": [0], "experiments": [FASHION[0], {**FASHION[1], **change}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    cmd = [sys.executable, "-m", "sweep.report", "--study", "study.yaml", "--from-csv", "x.csv"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: study.yaml: {message}"), proc.stderr


def test_runs_names_overrides_and_order():
    study = [{"name": "baseline", "set": {}}, {"name": "sgd", "set": {"train.optimizer": "sgd"}}]
    assert runs(study, [0, 1]) == [
        ("baseline-s0", {"seed": 0}),
        ("baseline-s1", {"seed": 1}),
        ("sgd-s0", {"train.optimizer": "sgd", "seed": 0}),
        ("sgd-s1", {"train.optimizer": "sgd", "seed": 1}),
    ]
    assert runs(study, [3], only=["sgd"]) == [("sgd-s3", {"train.optimizer": "sgd", "seed": 3})]
    with pytest.raises(SystemExit, match=r"^error: unknown variant sdg; the study has baseline, sgd$"):
        runs(study, [0], only={"sdg"})


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("", "`seeds:` must list distinct integers"),
        ("seeds: [0, 0]\n", "`seeds:` must list distinct integers"),
        ("seeds: [0, -1]\n", "`seeds:` must list distinct integers"),
    ],
)
def test_study_seeds_are_checked(tmp_path, seeds, message):
    study = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    study.pop("seeds")
    (tmp_path / "a.yaml").write_text(seeds + yaml.safe_dump(study))
    cmd = [sys.executable, "-m", "sweep.local", "--study", "a.yaml"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: a.yaml: " + message) and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("offered", "fix"),
    [
        ([1, 1], "make ablations CPUS=1, or start nodes with --num-cpus=2"),
        ([], "start nodes with --num-cpus=2"),
    ],
)
def test_a_run_no_node_can_take_is_refused_with_the_fix(offered, fix):
    """What the cluster's nodes offer against what a run asks (tests/test_cluster.py: on a real cluster)."""
    check_cpus([1, 2], 2, "h:1")  # one node that can take it is enough
    each = " or ".join(map(str, sorted(set(offered)))) or "none"
    with pytest.raises(SystemExit) as refused:
        check_cpus(offered, 2, "h:1")
    assert (
        str(refused.value)
        == f"error: a run asks for 2 CPUs (CPUS=2) but the nodes of h:1 offer {each} each; {fix}"
    )


def test_since_sets_the_study_beside_a_committed_one(tmp_path):
    """`make report SINCE=REV`: each variant's mean and verdict then and now, and the verdicts that moved."""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"seeds": [0, 1, 2], "experiments": FASHION}))
    fashion_runs(tmp_path / "runs.csv")
    then = pd.read_csv(tmp_path / "runs.csv")
    cnn = then["variant"] == "fashion-cnn"
    then.loc[cnn, "test_accuracy"] = then.loc[~cnn, "test_accuracy"].to_numpy() + np.array(
        [0.002, -0.002, 0.0]
    )
    (tmp_path / "reports").mkdir()
    then.to_csv(tmp_path / "reports/ablations.csv", index=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "reports"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "the old study"], cwd=tmp_path, check=True)
    cmd = [sys.executable, "-m", "sweep.report", "--study", "study.yaml", "--from-csv", "runs.csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    change = ["--change", "the CNN's new padding"]
    proc = subprocess.run(
        [*cmd, "--since", "HEAD", *change, "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out/ablations.md").read_text()
    heading = r"## Since the study at [0-9a-f]{7,} \(\d{4}-\d\d-\d\d\)\n\n"
    heading += r"What changed in between: the CNN's new padding\n"
    assert re.search(heading, text), text
    # Then the CNN was 0.2, -0.2 and 0 points from the MLP: no difference; now 3.0 better.
    assert "| fashion-cnn | 88.00% | 91.00% | +0.00 | +3.00 | no difference | better |" in text
    assert "| fashion-mlp | 88.00% | 88.00% | n/a | n/a | n/a | n/a |" in text
    assert "Verdicts that moved: fashion-cnn (no difference -> better)." in text
    bad = subprocess.run([*cmd, "--since", "nope"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: no reports/ablations.csv at nope: ")
    assert len(bad.stderr.strip().splitlines()) == 1
    alone = subprocess.run([*cmd, *change], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert alone.returncode == 1 and alone.stderr.startswith("error: --change says what changed since")
