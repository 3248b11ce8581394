"""The ablation sweep and its report on a tiny study, and the README's experiment-comparison commands."""

import json
import re
import shutil
import sys

import pytest
import yaml
from conftest import ROOT, run

VARIANTS = ("baseline", "no-dropout")  # the names the README's commands use


def readme_commands():
    """The command lines of the README's "Comparing experiments" block, `.venv/bin/` dropped."""
    section = ROOT.joinpath("README.md").read_text().split("## Comparing experiments", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.replace(".venv/bin/", "") for line in block.splitlines() if line.strip()]


def sweep(project, *args, env, check=True):
    """Run the sweep; its output and DVC's, as one string (check=False: it must fail)."""
    cmd = [sys.executable, "sweep/ablations.py", *args]
    proc = run(cmd, project, check=check, env=env)
    assert check or proc.returncode == 1
    return proc.stdout + proc.stderr


def exps(project):
    """{name: (params.yaml data, metrics by file)} of the successful experiments, from DVC."""
    found = {}
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], project).stdout):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            if (exp.get("executor") or {}).get("state", "success") == "success":
                data = rev["data"]
                metrics = {f: m["data"] for f, m in data["metrics"].items()}
                found[rev["name"]] = (data["params"]["params.yaml"]["data"], metrics)
    return found


@pytest.fixture
def study_project(project):
    """The project copy with sweep/ and a two-variant ablations.yaml (the real entries) committed."""
    shutil.copytree(ROOT / "sweep", project / "sweep", ignore=shutil.ignore_patterns("__pycache__"))
    study = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    study["experiments"] = [e for e in study["experiments"] if e["name"] in VARIANTS]
    (project / "ablations.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    run(["git", "add", "sweep", "ablations.yaml"], project)
    run(["git", "commit", "-qm", "study"], project)
    return project


def test_sweep_report_rerun_and_readme_commands(study_project, synthetic_env):
    project = study_project
    params_before = (project / "params.yaml").read_text()
    out = sweep(project, "train.epochs=1", env=synthetic_env)
    assert "ablations: 2 run, 0 skipped, 0 failed" in out
    assert "Stage 'preprocess' is cached - skipping run" in out  # the second run restores it
    assert (project / "params.yaml").read_text() == params_before  # runs never touch the workspace

    found = exps(project)
    assert set(found) == set(VARIANTS)
    assert found["baseline"][0]["model"]["dropout"] == 0.2
    assert found["no-dropout"][0]["model"]["dropout"] == 0
    for params, metrics in found.values():
        assert params["train"]["epochs"] == 1
        assert 0 < metrics["metrics/evaluate.json"]["test_accuracy"] <= 1

    run([sys.executable, "sweep/report.py"], project)
    report = (project / "reports/ablations.md").read_text()
    assert (project / "reports/ablations.png").stat().st_size > 10_000
    assert "nan" not in report.lower()
    assert "extra overrides: train.epochs=1" in report
    refs = {"baseline": "98.02%", "no-dropout": "97.57%"}
    for name, (_, metrics) in found.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | "))
        acc = metrics["metrics/evaluate.json"]["test_accuracy"]
        train = metrics["metrics/train/metrics.json"]
        assert f"| {refs[name]} | {100 * acc:.2f}% |" in row
        assert f"| {metrics['metrics/evaluate.json']['test_loss']:.4f} |" in row
        assert f"| {train['params']:,} |" in row
        final = [line for line in report.splitlines() if line.startswith(f"| {name} | ")][1]
        assert f"| {train['train']['loss']:.4f} |" in final and f"| {train['eval']['loss']:.4f} |" in final
        assert f"**{name}**" in report

    # Re-running: same params are skipped, changed ones replaced; never a second experiment.
    again = sweep(project, "train.epochs=1", env=synthetic_env)
    assert "skip baseline" in again and "skip no-dropout" in again
    assert "ablations: 0 run, 2 skipped, 0 failed" in again
    old = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    replaced = sweep(project, "--only", "no-dropout", "train.epochs=2", env=synthetic_env)
    assert "replace no-dropout" in replaced and "train.epochs 1 -> 2" in replaced
    names = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    assert sorted(names) == sorted(old) == sorted(VARIANTS)
    assert exps(project)["no-dropout"][0]["train"]["epochs"] == 2
    # A replacement that fails keeps the previous run under its name.
    failed = sweep(project, "--only", "no-dropout", "train.batch_size=0", env=synthetic_env, check=False)
    assert "train.batch_size must be a positive integer, got 0" in failed
    assert "no-dropout: the new run failed; the previous one" in failed
    assert sorted(run(["dvc", "exp", "list", "--name-only"], project).stdout.split()) == sorted(VARIANTS)
    assert exps(project)["no-dropout"][0]["train"]["epochs"] == 2

    # The README's commands, exactly as written (bar the .venv/bin/ prefix).
    for command in readme_commands():
        proc = run(["bash", "-c", command], project)
        if "--md" in command:
            assert "no-dropout" in proc.stdout and "test_accuracy" in proc.stdout
        if "exp diff" in command:
            assert "model.dropout" in proc.stdout
    assert (project / "dvc_plots/index.html").exists()
    assert "ablation-no-dropout" in run(["git", "branch"], project).stdout
    assert yaml.safe_load((project / "params.yaml").read_text())["model"]["dropout"] == 0
    assert run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], project).stdout == ""
