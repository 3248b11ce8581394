"""End to end under DVC, in a throw-away copy of the project with its own git and DVC state."""

import gzip
import hashlib
import json
from pathlib import Path

from stages.common import CLASS_NAMES

import pandas as pd
from conftest import SMALL, run, set_params

STAGES = ("download", "preprocess", "train", "evaluate", "plot")
FIGURES = {"learning_curves.png", "confusion_matrix.png", "samples.png", "digit.png", "misclassified.png"}


def ran(output):
    """The stages `dvc repro` / `dvc exp run` actually ran, in order."""
    return [s for line in output.splitlines() for s in STAGES if line.startswith(f"Running stage '{s}'")]


def not_run(output):
    """The stages DVC skipped as unchanged or restored from its run-cache."""
    skipped = ("didn't change, skipping", "is cached - skipping run", "Restored stage")
    return {
        s
        for line in output.splitlines()
        for s in STAGES
        if f"'{s}'" in line and any(w in line for w in skipped)
    }


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def experiments(show):
    """(name, params.yaml data, metrics by file) of every experiment in `dvc exp show --json`."""
    found = []
    for commit in show:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                metrics = {path: m["data"] for path, m in data["metrics"].items()}
                found.append((rev["name"], data["params"]["params.yaml"]["data"], metrics))
    return found


def test_repro_then_experiment(reproduced, repro_project, synthetic_env):
    env = {**synthetic_env, "TF_CPP_MIN_LOG_LEVEL": "2"}
    project = repro_project

    # 1. the whole pipeline, in order (the session's one run from scratch, in a copy of it)
    first = reproduced[1]
    assert ran(first) == list(STAGES), first
    evaluate = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert 0.5 < evaluate["test_accuracy"] <= 1 and evaluate["test_loss"] > 0
    train = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    assert {"params", "best_epoch", "train_seconds"} <= set(train)
    assert {p.name for p in (project / "metrics" / "figures").iterdir()} == FIGURES
    assert len(list((project / "data" / "raw").glob("*.gz"))) == 4
    assert (project / "data" / "model.keras").exists()
    lock = (project / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in STAGES)

    # 2. a second repro does nothing, and the pipeline is clean
    second = run(["dvc", "repro"], project, env=env)
    assert ran(second.stdout) == [], second.stdout
    assert "Data and pipelines are up to date" in second.stdout
    status = run(["dvc", "status", "--json"], project, env=env)
    assert json.loads(status.stdout) == {}, status.stdout

    # the mirror is no param: pointing it elsewhere (here a file:// URL) changes nothing
    url = Path(env["MNIST_MIRROR"]).as_uri()
    third = run(["dvc", "repro"], project, env={**env, "MNIST_MIRROR": url})
    assert ran(third.stdout) == [], third.stdout

    # metrics and plots as DVC sees them
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "test_accuracy" in json.dumps(metrics)
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    for name in ("Loss", "Accuracy"):
        values = plots[name][0]["content"]["data"]["values"]
        assert len(values) == 2 * SMALL["train.epochs"], name  # train and validation, per epoch
    confusion = plots["Confusion matrix (test)"][0]["content"]["data"]["values"]
    assert len(confusion) == SMALL["preprocess.test_size"]
    assert {f"metrics/figures/{f}" for f in FIGURES} <= set(plots)

    # a plot param re-runs plot alone
    set_params(project, {"plot.samples": 16})
    replot = run(["dvc", "repro"], project, env=env)
    assert ran(replot.stdout) == ["plot"], replot.stdout

    # 3. commit the baseline as a user would, then one experiment
    run(["git", "add", "dvc.lock", "params.yaml", "metrics", ".dvc"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    # One more epoch: the same compiled epoch (the session's XLA cache has it), so no compile here.
    prepared = {p.name: digest(p) for p in (project / "data" / "prepared").glob("*.npz")}
    epochs = SMALL["train.epochs"] + 1
    exp = run(["dvc", "exp", "run", "-S", f"train.epochs={epochs}"], project, env=env)
    assert ran(exp.stdout) == ["train", "evaluate", "plot"], exp.stdout
    assert not_run(exp.stdout) == {"download", "preprocess"}, exp.stdout
    assert {p.name: digest(p) for p in (project / "data" / "prepared").glob("*.npz")} == prepared
    longer = json.loads((project / "metrics" / "train" / "metrics.json").read_text())
    loss = (project / "metrics" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(loss.splitlines()) == 1 + epochs and longer["params"] == train["params"]

    # 4. dvc exp show lists it with its changed param and its metrics
    show = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = experiments(show)
    assert len(found) == 1, found
    name, params, metrics = found[0]
    assert name and name in exp.stdout
    assert params["train"]["epochs"] == epochs
    assert params["model"]["hidden_units"] == SMALL["model.hidden_units"]  # the rest as committed
    result = metrics["metrics/evaluate.json"]
    assert 0 < result["test_accuracy"] <= 1
    assert (
        result["test_accuracy"]
        == json.loads((project / "metrics" / "evaluate.json").read_text())["test_accuracy"]
    )
    assert metrics["metrics/train/metrics.json"]["best_epoch"] == longer["best_epoch"]
    baseline = next(c for c in show if c.get("name") == "main")
    assert (
        baseline["data"]["params"]["params.yaml"]["data"]["model"]["hidden_units"]
        == SMALL["model.hidden_units"]
    )
    base_metrics = baseline["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert base_metrics["test_accuracy"] == evaluate["test_accuracy"]


def raw_payloads(project):
    """{file name: SHA-256 of its decompressed payload} of data/raw."""
    return {
        p.name.removesuffix(".gz"): hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest()
        for p in (project / "data" / "raw").glob("*.gz")
    }


def listed(sums_file):
    return dict(line.split()[::-1] for line in Path(sums_file).read_text().splitlines())


def test_switching_dataset_reruns_from_download_and_switching_back_restores(repro_project, synthetic_env):
    env = {**synthetic_env, "TF_CPP_MIN_LOG_LEVEL": "2"}
    project = repro_project  # MNIST reproduced: test_repro_then_experiment checks that run itself
    assert raw_payloads(project) == listed(env["MNIST_SHA256SUMS"])
    mnist_metrics = (project / "metrics" / "evaluate.json").read_text()

    set_params(project, {"data.dataset": "fashion-mnist"})
    fashion = run(["dvc", "repro"], project, env=env)
    assert ran(fashion.stdout) == list(STAGES), fashion.stdout
    assert raw_payloads(project) == listed(env["FASHION_MNIST_SHA256SUMS"])
    per_class = pd.read_csv(project / "metrics" / "per_class.csv")
    assert list(per_class["name"]) == list(CLASS_NAMES["fashion-mnist"])
    assert 0.5 < json.loads((project / "metrics" / "evaluate.json").read_text())["test_accuracy"] <= 1

    # Back to MNIST: download and preprocess come from DVC's run-cache (the mirror now points
    # nowhere, so a download that ran would fail). DVC keeps no run-cache for stages with
    # `cache: false` outputs other than metrics and plots, so train, evaluate and plot run again,
    # and being deterministic they give the first run's metrics to the last digit.
    set_params(project, {"data.dataset": "mnist"})
    back = run(["dvc", "repro"], project, env={**env, "MNIST_MIRROR": str(project / "no-mirror")})
    assert ran(back.stdout) == ["train", "evaluate", "plot"], back.stdout
    assert not_run(back.stdout) == {"download", "preprocess"}, back.stdout
    assert raw_payloads(project) == listed(env["MNIST_SHA256SUMS"])
    assert (project / "metrics" / "evaluate.json").read_text() == mnist_metrics
    per_class = pd.read_csv(project / "metrics" / "per_class.csv")
    assert list(per_class["name"].astype(str)) == list(CLASS_NAMES["mnist"])
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
