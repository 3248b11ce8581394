"""A forced retrain with unchanged params writes the same model bytes, so DVC skips what follows it."""

import json

import yaml
from conftest import run


def model_hash(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "data/model.keras")


def test_forced_retrain_keeps_the_model_hash_and_skips_evaluate_and_plot(repro_project):
    project = repro_project  # reproduced once: the forced retrain is what is tested
    before = model_hash(project)

    forced = run(["dvc", "repro", "-f", "-s", "train"], project)
    assert "Running stage 'train'" in forced.stdout
    assert model_hash(project) == before
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert status == {}, status  # evaluate and plot see the same model: nothing to re-run
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout, again.stdout
