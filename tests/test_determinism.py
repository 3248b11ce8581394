"""Same params, same seed, same machine: the same weights, metrics and model file, to the bit, so a
forced retrain keeps the model's hash and DVC skips what follows it.

The default path (one XLA-compiled call per epoch) is what runs here; README "Reproducibility"
says what holds across machines.
"""

import json
import shutil

from stages.common import load_split, read_model

import numpy as np
import yaml
from conftest import run

# wall-clock figures, the only expected difference
TIMINGS = {"train_seconds", "first_epoch_seconds", "epoch_seconds", "samples_per_second"}


def keep(work, where):
    where.mkdir()
    shutil.copy2(work / "data/model.keras", where / "model.keras")
    shutil.copytree(work / "metrics", where / "metrics")


def model_hash(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "data/model.keras")


def test_two_forced_runs_give_identical_weights_and_metrics(repro_project, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    keep(repro_project, first)  # the first training is the session's `dvc repro`
    before = model_hash(repro_project)
    forced = run(["dvc", "repro", "-f", "-s", "train"], repro_project)
    assert "Running stage 'train'" in forced.stdout
    keep(repro_project, second)

    # DVC sees the same model: evaluate and plot have nothing to re-run.
    assert model_hash(repro_project) == before
    status = json.loads(run(["dvc", "status", "--json"], repro_project).stdout)
    assert status == {}, status
    assert "Running stage" not in run(["dvc", "repro"], repro_project).stdout

    # The archive itself: no save date, fixed timestamps, no memory addresses.
    assert (first / "model.keras").read_bytes() == (second / "model.keras").read_bytes()

    models = [read_model(run / "model.keras") for run in (first, second)]
    a, b = (model.get_weights() for model in models)
    assert len(a) == len(b) == 6  # 2 hidden layers + output: kernel and bias each
    for wa, wb in zip(a, b, strict=True):
        assert wa.dtype == wb.dtype and np.array_equal(wa, wb)  # bit-identical, not merely close

    # test_accuracy as stages/evaluate.py computes it (in-process: one TensorFlow start-up less).
    monkeypatch.chdir(repro_project)
    x, y, divisor = load_split("test")
    x = x.reshape(len(x), -1).astype("float32") / np.float32(divisor)
    probs = [model.predict(x, batch_size=1000, verbose=0) for model in models]
    assert np.array_equal(probs[0], probs[1])
    accuracy = [float((p.argmax(axis=1) == y).mean()) for p in probs]
    assert accuracy[0] == accuracy[1] > 0.5
    trained = [json.loads((run / "metrics/train/metrics.json").read_text()) for run in (first, second)]
    assert trained[0]["jit_compile"] is True  # the default, fast path is the one proven here
    assert {k: v for k, v in trained[0].items() if k not in TIMINGS} == {
        k: v for k, v in trained[1].items() if k not in TIMINGS
    }
    for tsv in sorted((first / "metrics/train/plots").rglob("*.tsv")):  # every epoch's loss and accuracy
        assert tsv.read_text() == (second / tsv.relative_to(first)).read_text()
