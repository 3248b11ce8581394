"""The GitHub Actions workflows: valid against GitHub's schema, and ci.yml's summary works."""

import json
import sys

import pytest
import yaml
from conftest import ROOT, run

WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.y*ml"))
SCHEMA = ["--builtin-schema", "vendor.github-workflows"]  # shipped inside check-jsonschema: no network


def check_jsonschema(path):
    return run([sys.executable, "-m", "check_jsonschema", *SCHEMA, str(path)], ROOT, check=False)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_github_schema(path):
    proc = check_jsonschema(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_workflow_exists():
    assert "ci.yml" in [p.name for p in WORKFLOWS]


def test_broken_workflow_is_rejected(tmp_path):
    ci = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    del ci["jobs"]["reproduce"]["runs-on"]  # every job needs a runner
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(ci))
    proc = check_jsonschema(broken)
    assert proc.returncode == 1
    assert "'runs-on' is a required property" in proc.stdout


def test_ci_summary(project, tmp_path):
    """ci.yml's summary step, run as GitHub would after `make repro`: metrics against the base branch."""
    (project / "metrics/figures").mkdir(parents=True)
    (project / "metrics/figures/learning_curves.png").write_bytes(b"")
    evaluate = project / "metrics/evaluate.json"
    evaluate.write_text(json.dumps({"test_accuracy": 0.9827, "test_loss": 0.0621, "test_macro_f1": 0.9826}))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    run(["git", "update-ref", "refs/remotes/origin/main", "HEAD"], project)  # what checkout's fetch gives
    evaluate.write_text(json.dumps({"test_accuracy": 0.9811, "test_loss": 0.0633, "test_macro_f1": 0.9809}))

    steps = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())["jobs"]["reproduce"]["steps"]
    (script,) = [step["run"] for step in steps if step.get("name") == "Job summary"]
    summary = tmp_path / "summary.md"
    run(["bash", "-e", "-c", script], project, env={"BASE": "main", "GITHUB_STEP_SUMMARY": str(summary)})

    lines = summary.read_text().splitlines()
    assert "## Metrics: this run against origin/main" in lines
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert ["metrics/evaluate.json", "test_accuracy", "0.9827", "0.9811", "-0.0016"] in rows
    assert "- `metrics/figures/learning_curves.png`" in lines
    assert (project / "dvc_plots/index.html").exists()
