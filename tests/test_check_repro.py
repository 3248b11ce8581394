"""`stages/check_repro.py`: the committed test accuracy against a rerun's, within a tolerance."""

import json
import sys

import pytest
from conftest import run

TEST_DIGITS = 10_000  # accuracies below are counts of correctly classified test digits out of these


def commit_accuracy(work, correct):
    write_accuracy(work, correct)
    run(["git", "add", "metrics/evaluate.json"], work)
    run(["git", "commit", "-qm", "results"], work)


def write_accuracy(work, correct):
    (work / "metrics").mkdir(exist_ok=True)
    metrics = {"test_accuracy": correct / TEST_DIGITS, "test_loss": 0.06, "test_macro_f1": 0.98}
    (work / "metrics/evaluate.json").write_text(json.dumps(metrics))


def check(work, *args):
    return run([sys.executable, "-m", "tools.check_repro", *args], work, check=False)


@pytest.mark.parametrize(
    ("committed", "rerun", "tolerance_digits"),
    [
        (9827, 9827, 50),  # bit-identical rerun
        (9827, 9790, 50),  # 37 digits fewer
        (9827, 9777, 50),  # exactly at the tolerance still passes
        (9827, 9776, 50),
        (9827, 9878, 50),  # better is a change too
        (9827, 9790, 30),
    ],
)
def test_move_against_tolerance(project, committed, rerun, tolerance_digits):
    commit_accuracy(project, committed)
    write_accuracy(project, rerun)
    args = [] if tolerance_digits == 50 else ["--tolerance", str(tolerance_digits / TEST_DIGITS)]
    proc = check(project, *args)
    tolerance = tolerance_digits / TEST_DIGITS
    if abs(rerun - committed) <= tolerance_digits:  # worked out in whole digits, free of float rounding
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("ok: test_accuracy")
    else:
        assert proc.returncode == 1
        new, old, moved = rerun / TEST_DIGITS, committed / TEST_DIGITS, abs(rerun - committed) / TEST_DIGITS
        assert proc.stderr.splitlines() == [
            f"error: test_accuracy {new:.4f} (this run) vs {old:.4f} (HEAD): moved {moved:.4f},"
            f" more than the tolerance {tolerance}"
        ]


def test_nothing_committed(project):
    write_accuracy(project, 9827)
    proc = check(project)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: metrics/evaluate.json at HEAD has no test_accuracy: commit the results of `dvc repro` first"
    ]


def test_bad_tolerance(project):
    proc = check(project, "--tolerance", "-0.1")
    assert (proc.returncode, proc.stderr) == (1, "error: --tolerance must be a number in [0, 1), got -0.1\n")


def test_forced_rerun_reproduces(repro_project, synthetic_env):
    """What `make check-repro` does, small: commit a run's results, rerun every stage, compare."""
    env, project = synthetic_env, repro_project  # the first run is the session's
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    run(["dvc", "repro", "--force"], project, env=env)
    proc = check(project, "--tolerance", "0")  # same machine: bit-identical, so no move at all
    assert proc.returncode == 0, proc.stderr
    assert "moved 0.0000" in proc.stdout
