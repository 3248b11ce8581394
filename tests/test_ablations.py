"""The ablation sweep and its report: a two-variant, two-seed study through `make ablations` and
`make report`, and parallel runs on a TensorFlow-free stage. (tests/test_readme.py runs the README's
commands.)"""

import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, git_init, run

from sweep.study import experiments

VARIANTS = ("baseline", "no-dropout")
# JOBS=1: the runs' output comes to the terminal, where the test reads DVC's lines.
SMOKE = ("ablations", "JOBS=1", "SEEDS=0 1", "ONLY=baseline,no-dropout", "SET=train.epochs=1")
T1 = 12.706204736174704  # Student's t, 97.5% quantile, 1 degree of freedom (printed tables: 12.706)


@pytest.fixture(autouse=True)
def venv_on_path(monkeypatch):
    """study.experiments() runs `dvc` in this process: the venv's, as `run` does for commands."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def found(project):
    """{name: DVC's view} of the successful experiments, through the one parser of study.py."""
    old = os.getcwd()
    os.chdir(project)
    try:
        return {k: v for k, v in experiments().items() if v["state"] == "success"}
    finally:
        os.chdir(old)


def make(project, *args, env, check=True):
    """`make` in the project with this checkout's .venv (never a new one); output as one string."""
    cmd = ["make", "--no-print-directory", *args, f"VENV={ROOT / '.venv'}"]
    proc = run(cmd, project, check=check, env=env)
    return proc.stdout + proc.stderr


def two_variant_study(project):
    study = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    study["experiments"] = [e for e in study["experiments"] if e["name"] in VARIANTS]
    (project / "ablations.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


@pytest.fixture
def study_project(project):
    """The project copy (small config) with sweep/, the Makefile and a two-variant ablations.yaml."""
    shutil.copytree(ROOT / "sweep", project / "sweep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Makefile", "requirements.txt"):
        shutil.copy2(ROOT / name, project / name)  # copy2: the .venv stays newer than requirements.txt
    two_variant_study(project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "study"], project)
    return project


def test_make_ablations_and_report_match_dvc(study_project, synthetic_env):
    project = study_project
    params_before = (project / "params.yaml").read_text()
    out = make(project, *SMOKE, env=synthetic_env)
    assert "ablations: 4 run, 0 skipped, 0 failed" in out
    assert "Stage 'preprocess' is cached - skipping run" in out  # each seed's split is made once
    assert (project / "params.yaml").read_text() == params_before  # runs never touch the workspace

    dvc = found(project)
    assert set(dvc) == {f"{v}-s{s}" for v in VARIANTS for s in (0, 1)}
    for name, exp in dvc.items():
        assert exp["params"]["seed"] == int(name[-1])
        assert exp["params"]["model.dropout"] == (0 if name.startswith("no-dropout") else 0.2)
        assert exp["params"]["train.epochs"] == 1

    # The CSV: one row per run, exactly DVC's numbers.
    csv = pd.read_csv(project / "reports/ablations.csv").set_index("name")
    assert sorted(csv.index) == sorted(dvc)
    assert list(csv.columns[:4]) == ["variant", "seed", "model.dropout", "train.epochs"]
    for name, exp in dvc.items():
        evaluate, train = (
            exp["metrics"]["metrics/evaluate.json"],
            exp["metrics"]["metrics/train/metrics.json"],
        )
        row = csv.loc[name]
        assert (row["variant"], row["seed"], row["rev"]) == (name[:-3], int(name[-1]), exp["rev"])
        assert row["test_accuracy"] == evaluate["test_accuracy"] and row["test_loss"] == evaluate["test_loss"]
        assert row["loss"] == train["train"]["loss"] and row["val_accuracy"] == train["eval"]["accuracy"]
        assert (row["best_epoch"], row["params"]) == (train["best_epoch"], train["params"])

    # The report: its numbers recomputed here from DVC's, with the t quantile for one degree of freedom.
    report = (project / "reports/ablations.md").read_text()
    assert "nan" not in report.lower()
    assert "extra overrides: train.epochs=1" in report
    acc = {n: 100 * e["metrics"]["metrics/evaluate.json"]["test_accuracy"] for n, e in dvc.items()}
    base = [acc["baseline-s0"], acc["baseline-s1"]]
    assert f"over 2 seeds (0, 1) the baseline's test accuracy is {statistics.mean(base):.2f}%" in report
    assert f"a standard deviation of {statistics.stdev(base):.2f} points" in report
    diffs = [acc["no-dropout-s0"] - acc["baseline-s0"], acc["no-dropout-s1"] - acc["baseline-s1"]]
    mean, half = statistics.mean(diffs), T1 * statistics.stdev(diffs) / math.sqrt(2)
    row = next(
        line for line in report.splitlines() if line.startswith("| no-dropout | model.dropout=0 | 2 |")
    )
    assert f"| {mean:+.2f} | {mean - half:+.2f} to {mean + half:+.2f} | 97.57% |" in row
    nodrop = [acc["no-dropout-s0"], acc["no-dropout-s1"]]
    assert (
        f"| {statistics.mean(nodrop):.2f}% |" in row and f"| {min(nodrop):.2f}% | {max(nodrop):.2f}% |" in row
    )
    for name in ("ablations.png", "ablations_curves.png"):
        assert (project / "reports" / name).stat().st_size > 10_000

    # Re-running skips what exists; `make report` alone gives the same report.
    again = make(project, *SMOKE, env=synthetic_env)
    assert "ablations: 0 run, 4 skipped, 0 failed" in again
    make(project, "report", "SEEDS=0 1", "ONLY=baseline,no-dropout", env=synthetic_env)
    assert (project / "reports/ablations.md").read_text() == report


STAGE = """\
import json, os, sys, time
import yaml
p = yaml.safe_load(open("params.yaml"))
if p["train"]["epochs"] < 1:
    sys.exit("error: params.yaml: train.epochs must be a positive integer, got 0")
start = time.time()
time.sleep(3)
record = {"start": start, "end": time.time(), "threads": os.environ.get("TRAIN_THREADS")}
json.dump(record, open("m.json", "w"))
"""


@pytest.fixture
def toy_project(tmp_path):
    """A DVC project whose one stage sleeps and records when it ran: the sweep without TensorFlow."""
    project = tmp_path / "toy"
    shutil.copytree(ROOT / "sweep", project / "sweep", ignore=shutil.ignore_patterns("__pycache__"))
    two_variant_study(project)
    (project / "stage.py").write_text(STAGE)
    (project / "params.yaml").write_text("seed: 0\nmodel:\n  dropout: 0.2\ntrain:\n  epochs: 1\n")
    stage = {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed", "model", "train"]}
    stage["metrics"] = [{"m.json": {"cache": False}}]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"work": stage}}))
    git_init(project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "dvc"], project)
    return project


def sweep(project, *args, check=True):
    proc = run([sys.executable, "-m", "sweep.ablations", *args], project, check=check)
    assert check or proc.returncode == 1
    return proc.stdout + proc.stderr


def test_parallel_runs_skip_and_replace(toy_project):
    project = toy_project
    out = sweep(project, "--seeds", "0,1", "--jobs", "2")
    assert "ablations: 4 run, 0 skipped, 0 failed" in out
    dvc = found(project)
    assert sorted(dvc) == sorted(f"{v}-s{s}" for v in VARIANTS for s in (0, 1))
    times = {name: exp["metrics"]["m.json"] for name, exp in dvc.items()}
    # Two at a time: the first two overlap, and no moment has more than two running.
    first, second = times["baseline-s0"], times["baseline-s1"]
    assert first["start"] < second["end"] and second["start"] < first["end"]
    for t in times.values():
        assert sum(o["start"] <= t["start"] < o["end"] for o in times.values()) <= 2
    assert {t["threads"] for t in times.values()} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
    assert {name: exp["params"]["seed"] for name, exp in dvc.items()} == {n: int(n[-1]) for n in dvc}

    again = sweep(project, "--seeds", "0 1", "--jobs", "2")
    assert "ablations: 0 run, 4 skipped, 0 failed" in again and "skip no-dropout-s1" in again
    replaced = sweep(project, "--only", "no-dropout", "--seeds", "1", "--jobs", "1", "train.epochs=2")
    assert "replace no-dropout-s1" in replaced and "train.epochs 1 -> 2" in replaced
    assert sorted(found(project)) == sorted(dvc)  # renamed back, not a second experiment
    assert found(project)["no-dropout-s1"]["params"]["train.epochs"] == 2
    assert "threads" not in found(project)["no-dropout-s1"]["metrics"]["m.json"]  # --jobs 1: unset (null)
    # A replacement that fails keeps the previous run under its name, and says why it failed.
    failed = sweep(
        project, "--only", "no-dropout", "--seeds", "1", "--jobs", "2", "train.epochs=0", check=False
    )
    assert "train.epochs must be a positive integer, got 0" in failed
    assert "no-dropout-s1: the new run failed; the previous one" in failed
    assert sorted(found(project)) == sorted(dvc)
    assert found(project)["no-dropout-s1"]["params"]["train.epochs"] == 2

    bad = sweep(project, "--only", "baseline,sdg", check=False)
    assert bad.strip() == "error: unknown variant sdg; the study has baseline, no-dropout"
    bad = sweep(project, "seed=3", check=False)
    assert bad.startswith("error: seed is not an override")
