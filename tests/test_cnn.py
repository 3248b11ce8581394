"""model.type: cnn through the real stages on synthetic digits: train, evaluate, plot and predict."""

import json
import sys

from stages.common import read_model

import numpy as np
import pandas as pd
import pytest
from conftest import run, run_stage, set_params
from PIL import Image

KERAS_EXAMPLE_PARAMS = 34_826  # Conv2D 32 + Conv2D 64 (3x3, 2x2 pooling) + Dense 10: keras.io's count


@pytest.fixture
def cnn(prepared):
    """A small project after train, evaluate and plot with the default CNN (one epoch)."""
    set_params(prepared, {"model.type": "cnn", "train.epochs": 1})
    out = {name: run_stage(name, prepared).stdout for name in ("train", "evaluate", "plot")}
    return prepared, out


def test_the_cnn_trains_evaluates_and_plots(cnn):
    pytest.importorskip("keras")
    work, out = cnn
    metrics = json.loads((work / "metrics/train/metrics.json").read_text())
    assert metrics["params"] == KERAS_EXAMPLE_PARAMS
    assert metrics["jit_compile"] is False  # `auto`: no XLA for the CNN
    assert f"{KERAS_EXAMPLE_PARAMS:,} parameters" in out["train"]
    assert "Conv2D" in (work / "metrics/model_summary.txt").read_text()

    # evaluate fed the checkpoint images of shape (28, 28, 1): its accuracy is the model's own on them
    model = read_model(work / "data/model.keras")
    assert model.input_shape == (None, 28, 28, 1)
    with np.load(work / "data/prepared/test.npz") as f:
        x, y, divisor = f["x"], f["y"], float(f["divisor"])
    probs = model.predict(x[..., None].astype("float32") / divisor, verbose=0)
    metrics = json.loads((work / "metrics/evaluate.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx((probs.argmax(axis=1) == y).mean())
    # evaluate calls the model on its batches itself: model.predict's probabilities, to the bit
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1 - 1e-7)).mean()
    assert metrics["test_loss"] == float(loss)
    predicted = pd.read_csv(work / "metrics/predictions.csv")["predicted"]
    np.testing.assert_array_equal(predicted, probs.argmax(axis=1))
    figures = {p.name for p in (work / "metrics/figures").glob("*.png")}
    assert {"learning_curves.png", "confusion_matrix.png", "misclassified.png"} <= figures

    # predict reshapes to the CNN's input too (its preprocessing has tests of its own in test_predict.py)
    Image.fromarray(255 - x[0]).resize((112, 112), Image.NEAREST).save(work / "digit.png")
    result = json.loads(run([sys.executable, "-m", "tools.predict", "--json", "digit.png"], work).stdout)
    assert result["class"] in range(10) and len(result["top3"]) == 3


def test_padding_and_the_dense_layer_reach_the_train_stage(prepared):
    """fashion-cnn's settings: "same" convolutions keep 28 and 14 before pooling; 7x7x64 reach the Dense."""
    set_params(
        prepared, {"model.type": "cnn", "model.padding": "same", "model.dense_units": 128, "train.epochs": 1}
    )
    out = run_stage("train", prepared).stdout
    assert "421,642 parameters" in out  # 320 + 18,496 + 3136 * 128 + 128 + 1,290
    assert json.loads((prepared / "metrics/train/metrics.json").read_text())["params"] == 421_642
