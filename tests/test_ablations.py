"""The study and its report, on a TensorFlow-free toy stage that writes the pipeline's metric files:
`make ablations` and `make report` of a two-variant, two-seed study checked against DVC, then what the
runner itself does: parallel runs, skip and replace, Ctrl-C, a second study at once, bad study files.
(tests/test_readme.py runs the README's study on the real pipeline.)"""

import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, ctrl_c, from_a_terminal, git_init, run, wait_while_running

from sweep import study

VARIANTS = ("baseline", "no-dropout")
NAMES = {study.run_name(v, s) for v in VARIANTS for s in (0, 1)}
SMOKE = ("ablations", "SEEDS=0 1", "ONLY=baseline,no-dropout", "SET=train.epochs=2")  # the toy has 1
T1 = 12.706204736174704  # Student's t, 97.5% quantile, 1 degree of freedom (printed tables: 12.706)
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def found(project):
    """{name: DVC's view} of the successful experiments, through the one parser of study.py."""
    return {k: v for k, v in study.experiments(cwd=project, env=ENV).items() if v["state"] == "success"}


def make(project, *args, env=None, check=True):
    """`make` in the project with this checkout's .venv (never a new one); output as one string."""
    cmd = ["make", "--no-print-directory", *args, f"VENV={ROOT / '.venv'}"]
    proc = run(cmd, project, check=check, env=env)
    return proc.stdout + proc.stderr


def with_make_and_study(project, variants=VARIANTS):
    """Add sweep/, the Makefile and a study of `variants` (ablations.yaml's own entries) to a project."""
    shutil.copytree(ROOT / "sweep", project / "sweep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Makefile", "requirements.txt"):
        shutil.copy2(ROOT / name, project / name)
    installed = (ROOT / ".venv/.installed").stat().st_mtime  # older than the venv: make keeps it
    os.utime(project / "requirements.txt", (installed - 60, installed - 60))
    spec = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    spec["experiments"] = [e for e in spec["experiments"] if e["name"] in variants]
    (project / "ablations.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


# The toy's metrics: the pipeline's files and keys (those the report reads), each run's own numbers.
STAGE = """\
import json, os, random, signal, sys, time
from pathlib import Path
import yaml
p = yaml.safe_load(open("params.yaml"))
seed, dropout, epochs = p["seed"], p["model"]["dropout"], p["train"]["epochs"]
if epochs < 1:
    sys.exit("error: params.yaml: train.epochs must be a positive integer, got 0")
start = time.time()
if os.environ.get("HANG_SEED") == str(seed):  # until stopped; no-dropout's ignores Ctrl-C
    if dropout == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    Path(os.environ["MARKS"], str(dropout)).touch()
    time.sleep(600)
if os.environ.get("STARTED"):  # until another run has started too (at most 60 s): two overlap
    Path(os.environ["STARTED"], f"{seed}-{dropout}").touch()
    deadline = time.time() + 60
    while len(os.listdir(os.environ["STARTED"])) < 2 and time.time() < deadline:
        time.sleep(0.05)
record = {"start": start, "end": time.time(), "threads": os.environ.get("TRAIN_THREADS"), "cwd": os.getcwd()}
json.dump(record, open("m.json", "w"))
rng = random.Random(f"{seed}-{dropout}")
curves = [[rng.uniform(0.05, 0.5), rng.uniform(0.85, 0.99)] for _ in range(epochs)]
Path("metrics/train/plots/metrics/eval").mkdir(parents=True, exist_ok=True)
for i, key in enumerate(("loss", "accuracy")):
    rows = "".join(f"{step}\\t{c[i]}\\n" for step, c in enumerate(curves))
    Path(f"metrics/train/plots/metrics/eval/{key}.tsv").write_text(f"step\\t{key}\\n{rows}")
train = {"loss": rng.uniform(0.01, 0.3), "accuracy": rng.uniform(0.9, 1)}
last = dict(zip(("loss", "accuracy"), curves[-1]))
best = min(range(epochs), key=lambda e: curves[e][0])
metrics = {"train": train, "eval": last, "params": 1000 + seed, "best_epoch": best, "train_seconds": 1.5}
json.dump(metrics, open("metrics/train/metrics.json", "w"))
test = {"test_loss": rng.uniform(0.05, 0.5), "test_accuracy": rng.uniform(0.9, 0.99)}
json.dump(test, open("metrics/evaluate.json", "w"))
"""


@pytest.fixture(scope="session")
def toy_made(tmp_path_factory):
    """A DVC project whose one stage records when it ran and writes the pipeline's metric files with
    numbers of its own: the study without TensorFlow. Made once (git and DVC take a second); each
    test gets a copy (`toy`)."""
    project = tmp_path_factory.mktemp("toy-made") / "toy"
    project.mkdir()
    with_make_and_study(project)
    (project / "stage.py").write_text(STAGE)
    (project / "params.yaml").write_text("seed: 0\nmodel:\n  dropout: 0.2\ntrain:\n  epochs: 1\n")
    stage = {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed", "model", "train"]}
    metrics = ("m.json", "metrics/train/metrics.json", "metrics/evaluate.json")
    stage["metrics"] = [{name: {"cache": False}} for name in metrics]
    curves = (f"metrics/train/plots/metrics/eval/{key}.tsv" for key in ("loss", "accuracy"))
    stage["plots"] = [{name: {"cache": False}} for name in curves]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"work": stage}}))
    (project / ".gitignore").write_text("__pycache__/\n")
    git_init(project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "dvc"], project)
    return project


@pytest.fixture
def toy(toy_made, tmp_path):
    return Path(shutil.copytree(toy_made, tmp_path / "toy", symlinks=True))


def report_fails(project):
    """`python -m sweep.report` of the smoke study, which must fail; its one line."""
    cmd = [sys.executable, "-m", "sweep.report", "--seeds", "0 1", "--only", "baseline,no-dropout"]
    proc = run(cmd, project, check=False)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.strip()


def test_make_ablations_and_report_match_dvc(toy):
    project = toy
    assert report_fails(project) == "error: no finished run of the study; run `make ablations` first"
    params_before = (project / "params.yaml").read_text()
    out = make(project, *SMOKE, env=ENV)
    assert "study: 4 run, 0 skipped, 0 failed" in out
    assert (project / "params.yaml").read_text() == params_before  # runs never touch the workspace

    dvc = found(project)
    assert set(dvc) == NAMES
    for name, exp in dvc.items():
        assert exp["params"]["seed"] == int(name[-1])
        assert exp["params"]["model.dropout"] == (0 if name.startswith("no-dropout") else 0.2)
        assert exp["params"]["train.epochs"] == 2

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
    assert "extra overrides: train.epochs=2" in report
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

    # `make report` alone gives the same report from DVC's experiments, and so does its CSV (with the
    # curves figure drawn beside it).
    make(project, "report", "SEEDS=0 1", "ONLY=baseline,no-dropout", env=ENV)
    assert (project / "reports/ablations.md").read_text() == report
    again = [sys.executable, "-m", "sweep.report", "--from-csv", "reports/ablations.csv", "--seeds", "0 1"]
    run([*again, "--only", "baseline,no-dropout"], project)
    assert (project / "reports/ablations.md").read_text() == report

    # After a commit (an adopted run, say) DVC lists the new HEAD's experiments only: the report
    # names the commit the study's runs belong to.
    ran_at = run(["git", "rev-parse", "--short=7", "HEAD"], project).stdout.strip()
    run(["git", "commit", "-q", "--allow-empty", "-m", "adopt"], project)
    head = run(["git", "rev-parse", "--short=7", "HEAD"], project).stdout.strip()
    assert report_fails(project) == (
        f"error: no finished run of the study at HEAD ({head}): 4 of its runs belong to commit {ran_at};"
        f" `git checkout {ran_at}` and `make report` there, or `make ablations` here"
    )


def local(project, *args, code=0):
    """`python -m sweep.local ARGS` in the project; its output, after checking its exit status."""
    proc = run([sys.executable, "-m", "sweep.local", *args], project, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_parallel_runs_skip_and_replace(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("STARTED", str(tmp_path / "started"))  # the toy's runs wait for a second one
    (tmp_path / "started").mkdir()
    left = toy / ".dvc/tmp/study/baseline-s7"  # the clone of a run whose study was killed
    left.mkdir(parents=True)
    out = local(toy, "--seeds", "0,1", "--jobs", "2")
    assert not left.exists()
    assert "study: 4 run, 0 skipped, 0 failed" in out
    dvc = found(toy)
    assert set(dvc) == NAMES
    times = {name: exp["metrics"]["m.json"] for name, exp in dvc.items()}
    # Two at a time: the first two overlap, and no moment has more than two running.
    first, second = times["baseline-s0"], times["baseline-s1"]
    assert first["start"] < second["end"] and second["start"] < first["end"]
    for t in times.values():
        assert sum(o["start"] <= t["start"] < o["end"] for o in times.values()) <= 2
    assert {t["threads"] for t in times.values()} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
    assert {name: exp["params"]["seed"] for name, exp in dvc.items()} == {n: int(n[-1]) for n in dvc}
    # Each in a clone of its own: runs that share DVC's stash (`--temp`) can run each other's entry.
    assert {name: t["cwd"] for name, t in times.items()} == {n: str(toy / ".dvc/tmp/study" / n) for n in dvc}

    # A study killed while replacing leaves <name>-replaced (here made with git): beside a finished
    # run of the name it is dropped, not restored over it; alone (the name renamed away), it is kept
    # until the name's new run succeeds.
    revs = {name: exp["rev"] for name, exp in dvc.items()}
    ref = {name: study.exp_ref(run(["git", "rev-parse", "HEAD"], toy).stdout.strip(), name) for name in NAMES}
    run(["git", "update-ref", ref["baseline-s0"] + "-replaced", revs["no-dropout-s0"]], toy)
    run(["git", "update-ref", ref["baseline-s1"] + "-replaced", revs["baseline-s1"]], toy)
    run(["git", "update-ref", "-d", ref["baseline-s1"]], toy)
    again = local(toy, "--seeds", "0 1", "--jobs", "2")
    assert "study: 1 run, 3 skipped, 0 failed" in again and "skip no-dropout-s1" in again
    after = {name: exp["rev"] for name, exp in found(toy).items()}
    assert set(after) == NAMES and after["baseline-s1"] != revs["baseline-s1"]
    assert {n: after[n] for n in NAMES - {"baseline-s1"}} == {n: revs[n] for n in NAMES - {"baseline-s1"}}
    replaced = local(toy, "--only", "no-dropout", "--seeds", "1", "--jobs", "1", "train.epochs=2")
    assert "replace no-dropout-s1" in replaced and "train.epochs 1 -> 2" in replaced
    dvc = found(toy)
    assert set(dvc) == NAMES  # renamed back, not a second experiment
    assert dvc["no-dropout-s1"]["params"]["train.epochs"] == 2
    assert "threads" not in dvc["no-dropout-s1"]["metrics"]["m.json"]  # --jobs 1: unset (null)
    # A replacement that fails keeps the previous run under its name, and says why it failed.
    failed = local(toy, "--only", "no-dropout", "--seeds", "1", "--jobs", "2", "train.epochs=0", code=3)
    assert "train.epochs must be a positive integer, got 0" in failed
    assert "no-dropout-s1: no new run; the previous one" in failed
    assert {name: exp["rev"] for name, exp in found(toy).items()} == {n: e["rev"] for n, e in dvc.items()}

    bad = local(toy, "--only", "baseline,sdg", code=1)
    assert bad.strip() == "error: unknown variant sdg; the study has baseline, no-dropout"
    assert local(toy, "seed=3", code=1).startswith("error: seed is not an override")


def test_a_study_without_a_git_identity_ends_in_one_line(toy, tmp_path):
    """DVC signs each experiment's commit: with no git user name and email (a fresh machine's HOME),
    the study says so before any run, instead of every run failing with DVC's "unexpected error"."""
    for key in ("user.name", "user.email"):
        run(["git", "config", "--unset", key], toy)
    env = {"HOME": str(tmp_path), "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    env.update({k: "" for k in os.environ if k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))})
    proc = run([sys.executable, "-m", "sweep.local", "--seeds", "0"], toy, check=False, env=env)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: git has no user name and email, which DVC needs") and (
        proc.stderr.count("\n") == 1
    ), proc.stderr
    assert exp_show(toy) == []


def test_a_run_whose_experiment_cannot_be_pushed_back_fails_and_leaves_nothing(toy):
    """The workspace's repository refuses the finished run's experiment (here a hook; a full disk
    alike): the run fails with git's reason, nothing is published and its clone is removed."""
    hook = toy / ".git/hooks/pre-receive"
    hook.write_text("#!/bin/sh\necho 'refs/exps is read-only here' >&2\nexit 1\n")
    hook.chmod(0o755)
    out = local(toy, "--seeds", "0", "--only", "baseline", code=3)
    assert "study: 0 run, 0 skipped, 1 failed" in out, out
    failed = next(line for line in out.splitlines() if line.startswith("  baseline-s0: "))
    assert failed.startswith("  baseline-s0: failed: its experiment was not published: ! [remote rejected]")
    assert failed.endswith("(pre-receive hook declined)"), out
    assert exp_show(toy) == []
    assert not [p for p in (toy / ".dvc/tmp/study").iterdir() if p.is_dir()]
    hook.unlink()
    assert "study: 1 run, 0 skipped, 0 failed" in local(toy, "--seeds", "0", "--only", "baseline")


def exp_show(project):
    """[(name, state)] of every experiment as `dvc exp show --json` lists it, duplicates included."""
    show = json.loads(run(["dvc", "exp", "show", "--json", "--hide-workspace"], project).stdout)
    return sorted(
        (exp["name"], (exp.get("executor") or {}).get("state") or "done")
        for baseline in show
        for exp in baseline.get("experiments") or []
    )


def processes_in(directory):
    """Pids of the processes whose working directory is in `directory`."""
    pids = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if str(cwd.readlink()).startswith(str(directory)):
                pids.append(int(cwd.parent.name))
        except OSError:  # ended meanwhile, or not ours
            continue
    return pids


def test_ctrl_c_and_a_second_study(toy, tmp_path):
    """Seed 1 trains until stopped (no-dropout's ignoring Ctrl-C): while both of its runs train, a
    second study is refused; Ctrl-C then stops them, leaving nothing behind, and a rerun does the rest."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**ENV, "HANG_SEED": "1", "MARKS": str(marks)}
    log = tmp_path / "make.log"
    cmd = ["make", "--no-print-directory", "ablations", "JOBS=2", "SEEDS=0 1", f"VENV={ROOT / '.venv'}"]
    with from_a_terminal(cmd, toy, env, log) as first:
        wait_while_running(first, lambda: len(list(marks.iterdir())) == 2, 300, log.read_text)

        second = local(toy, "--seeds", "0 1", code=1)
        owner = json.loads((toy / ".dvc/tmp/study.lock").read_text())
        assert second == f"error: a study is already running in this workspace (pid {owner['pid']}: " + (
            f"{owner['command']}); wait for it to end, or stop it with Ctrl-C there\n"
        )
        assert "sweep/local.py --jobs 2 --seeds 0 1" in owner["command"]
        code = ctrl_c(first)
    out = log.read_text()
    assert code != 0 and "Traceback" not in out and "make ablations` first" not in out, out
    stopped = [line for line in out.splitlines() if line.startswith("interrupted:")]
    assert stopped == [
        "interrupted: stopped baseline-s1, no-dropout-s1; 2 finished and kept;"
        " run the study again for the rest"
    ], out
    assert exp_show(toy) == [("baseline-s0", "done"), ("no-dropout-s0", "done")]
    assert not [p for p in (toy / ".dvc/tmp/study").iterdir() if p.is_dir()]  # the runs' clones
    assert processes_in(toy) == []  # no-dropout-s1's stage too

    # The lock file still names the stopped study's pid: taken over, since no process holds it.
    assert json.loads((toy / ".dvc/tmp/study.lock").read_text())["pid"] == owner["pid"]
    again = local(toy, "--seeds", "0 1")
    assert "study: 2 run, 2 skipped, 0 failed" in again
    assert exp_show(toy) == [(name, "done") for name in sorted(NAMES)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"set": {"model.dropuot": 0}},
            "error: no-dropout-s0: model.dropuot is not in params.yaml; did you mean model.dropout?",
        ),
        ({"experiments": []}, "error: ablations.yaml: the study is empty (`experiments: []`); add a variant"),
    ],
)
def test_a_bad_study_file_ends_in_one_line(toy, change, message):
    """Through make: the report that make writes after failed runs does not add a line of its own."""
    spec = yaml.safe_load((toy / "ablations.yaml").read_text())
    if "set" in change:
        spec["experiments"][1]["set"] = change["set"]
    else:
        spec.update(change)
    (toy / "ablations.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = make(toy, "ablations", env=ENV, check=False)
    errors = [line for line in out.splitlines() if "error" in line.lower() and not line.startswith("make")]
    assert len(errors) == 1 and errors[0].startswith(message), out
    assert exp_show(toy) == []
