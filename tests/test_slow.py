"""Full-size runs (minutes): `pytest -m slow`."""

import json

import pytest
import yaml
from conftest import copy_project, run


@pytest.fixture
def full_project(tmp_path):
    """A copy of the project with the repository's params.yaml unchanged (not the small config)."""
    return copy_project(tmp_path / "project", overrides=None)


@pytest.mark.slow
def test_full_baseline_reaches_975(full_project, mirror):
    params = yaml.safe_load((full_project / "params.yaml").read_text())
    assert params["preprocess"]["train_size"] is None and params["preprocess"]["test_size"] is None
    assert params["model"]["hidden_units"] == 512 and params["train"]["epochs"] == 10

    out = run(
        ["dvc", "repro"], full_project, env={"MNIST_MIRROR": mirror, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ).stdout
    print(out)
    evaluate = json.loads((full_project / "metrics" / "evaluate.json").read_text())
    train = json.loads((full_project / "metrics" / "train" / "metrics.json").read_text())
    print(f"test_accuracy={evaluate['test_accuracy']:.4f} train_seconds={train['train_seconds']}")
    assert "48000 train, 12000 validation, 10000 test images" in out
    assert train["params"] == 669_706
    assert evaluate["test_accuracy"] >= 0.975
    assert len(list((full_project / "metrics" / "figures").glob("*.png"))) == 5
    status = run(["dvc", "status", "--json"], full_project)
    assert json.loads(status.stdout) == {}
