"""Each stage's outputs on the small config, from the session's one `dvc repro` (conftest.reproduced)."""

import json
import shutil
import struct
import sys

from stages.common import CLASS_NAMES, read_model

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SMALL, copy_reproduced, run, run_stage, set_params, stage_outputs

from stages import plot

EPOCHS = SMALL["train.epochs"]
UNITS = SMALL["model.hidden_units"]
SMALL_PARAMS = (784 * UNITS + UNITS) + (UNITS * UNITS + UNITS) + (UNITS * 10 + 10)  # 2 hidden layers
N_TEST = SMALL["preprocess.test_size"]
FIGURES = ("learning_curves.png", "confusion_matrix.png", "samples.png", "digit.png", "misclassified.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def done(tmp_path_factory, reproduced):
    """A project copy (small config) after every stage, with what each stage printed: the session's
    `dvc repro` (its stages are the commands `python3 -m stages.<name>`), copied once for this module."""
    work = copy_reproduced(reproduced, tmp_path_factory.mktemp("stages") / "project")
    return work, stage_outputs(reproduced[1])


def read_json(path):
    return json.loads(path.read_text())


# --- train ----------------------------------------------------------------------------------------


def test_train_writes_the_model(done):
    work, out = done
    assert (work / "data" / "model.keras").stat().st_size > 10_000
    assert f"{SMALL_PARAMS:,} parameters" in out["train"]
    assert not list((work / "data").glob(".tmp-*")), "temporary outputs left behind"
    assert not list((work / "metrics").glob(".tmp-*")), "temporary outputs left behind"


def test_train_metrics_json(done):
    work, _ = done
    m = read_json(work / "metrics" / "train" / "metrics.json")
    assert m["params"] == SMALL_PARAMS
    assert 1 <= m["best_epoch"] <= EPOCHS
    assert m["train_seconds"] > 0
    assert 0 < m["best_val_loss"] < 2.3  # better than chance, ln(10)
    history = pd.read_csv(work / "metrics/train/plots/metrics/eval/loss.tsv", sep="\t")
    assert m["best_val_loss"] == pytest.approx(history.loss.min())
    assert m["best_epoch"] == history.loss.idxmin() + 1


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_train_history_has_one_row_per_epoch(done, split, metric):
    work, _ = done
    h = pd.read_csv(work / f"metrics/train/plots/metrics/{split}/{metric}.tsv", sep="\t")
    assert list(h.columns[:2]) == ["step", metric]
    assert list(h.step) == list(range(EPOCHS))
    assert h[metric].notna().all()
    if metric == "accuracy":
        assert h[metric].between(0, 1).all()
        assert h[metric].iloc[-1] > 0.5  # it learned something in 2 epochs of 2,400 images
    else:
        assert (h[metric] > 0).all()


def test_train_model_summary(done):
    work, _ = done
    summary = (work / "metrics" / "model_summary.txt").read_text()
    assert "Dense" in summary and "Dropout" in summary
    assert f"Trainable params: {SMALL_PARAMS:,}" in summary


def keras_predict(work, split):
    """The saved model's probabilities on a prepared split, and Keras's own cross-entropy of them."""
    keras = pytest.importorskip("keras")
    model = read_model(work / "data" / "model.keras")
    with np.load(work / f"data/prepared/{split}.npz") as f:
        x, y, divisor = f["x"], f["y"], float(f["divisor"])
    probs = np.asarray(model.predict(x.reshape(len(x), -1).astype("float32") / divisor, verbose=0))
    return probs, float(np.mean(keras.losses.sparse_categorical_crossentropy(y, probs)))


def test_checkpoint_is_the_best_epoch_by_val_loss(done):
    """The saved model scores on the validation set what DVCLive logged for the best epoch."""
    work, _ = done
    _, loss = keras_predict(work, "val")
    best = read_json(work / "metrics" / "train" / "metrics.json")["best_val_loss"]
    assert loss == pytest.approx(best, rel=1e-3)


# --- evaluate -------------------------------------------------------------------------------------


def test_evaluate_metrics_are_fractions_consistent_with_predictions(done):
    work, out = done
    m = read_json(work / "metrics" / "evaluate.json")
    assert set(m) >= {"test_accuracy", "test_loss", "test_macro_f1"}
    assert 0.5 < m["test_accuracy"] <= 1  # a fraction, not a percentage, and better than chance
    assert 0 < m["test_loss"] < 2.3
    predictions = pd.read_csv(work / "metrics" / "predictions.csv")
    assert list(predictions.columns) == ["actual", "predicted"]
    assert len(predictions) == N_TEST
    assert m["test_accuracy"] == pytest.approx((predictions.actual == predictions.predicted).mean())
    with np.load(work / "data/prepared/test.npz") as f:
        np.testing.assert_array_equal(predictions.actual, f["y"])
    assert f"test accuracy {m['test_accuracy']:.4f}" in out["evaluate"]


def test_evaluate_loss_matches_keras(done):
    work, _ = done
    probs, expected = keras_predict(work, "test")
    assert read_json(work / "metrics" / "evaluate.json")["test_loss"] == pytest.approx(expected, rel=1e-4)
    predictions = pd.read_csv(work / "metrics" / "predictions.csv")
    np.testing.assert_array_equal(predictions.predicted, probs.argmax(axis=1))


def test_evaluate_per_class(done):
    work, _ = done
    predictions = pd.read_csv(work / "metrics" / "predictions.csv")
    per_class = pd.read_csv(work / "metrics" / "per_class.csv")
    assert list(per_class.columns) == ["digit", "name", "precision", "recall", "f1", "support"]
    assert len(per_class) == 10
    assert list(per_class.digit) == list(range(10))
    assert list(per_class["name"].astype(str)) == list(CLASS_NAMES["mnist"])
    assert list(per_class.support) == [int((predictions.actual == d).sum()) for d in range(10)]
    for d, row in per_class.iterrows():
        hits = int(((predictions.actual == d) & (predictions.predicted == d)).sum())
        assert row.recall == pytest.approx(hits / row.support, abs=1e-5)
        predicted_d = int((predictions.predicted == d).sum())
        assert row.precision == pytest.approx(hits / predicted_d if predicted_d else 0, abs=1e-5)
        assert 0 <= row.f1 <= 1
    macro_f1 = read_json(work / "metrics" / "evaluate.json")["test_macro_f1"]
    assert macro_f1 == pytest.approx(per_class.f1.mean(), abs=1e-5)


def test_evaluate_confusion_matrix(done):
    work, _ = done
    predictions = pd.read_csv(work / "metrics" / "predictions.csv")
    matrix = pd.read_csv(work / "metrics" / "confusion_matrix.csv").to_numpy()
    assert matrix.shape == (10, 10)
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (predictions.actual, predictions.predicted), 1)
    np.testing.assert_array_equal(matrix, expected)


def test_evaluate_misclassified_matches_predictions(done):
    work, out = done
    predictions = pd.read_csv(work / "metrics" / "predictions.csv")
    wrong = pd.read_csv(work / "metrics" / "misclassified.csv")
    assert list(wrong.columns) == ["index", "actual", "predicted", "confidence"]
    expected = predictions.index[predictions.actual != predictions.predicted]
    assert list(wrong["index"]) == list(expected)
    assert list(wrong.actual) == list(predictions.actual[expected])
    assert list(wrong.predicted) == list(predictions.predicted[expected])
    assert (wrong.actual != wrong.predicted).all()
    assert wrong.confidence.between(0.1, 1).all()  # the top probability of 10 classes
    assert f"{len(wrong)} of {N_TEST} misclassified" in out["evaluate"]


# --- plot -----------------------------------------------------------------------------------------


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", FIGURES)
def test_plot_writes_valid_pngs(done, name):
    work, _ = done
    path = work / "metrics" / "figures" / name
    assert path.stat().st_size > 10_000, f"{name} looks empty"
    width, height = png_size(path)
    assert width >= 300 and height >= 300
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.02, f"{name} is (nearly) uniform"


def test_plot_writes_exactly_the_five_figures(done):
    work, out = done
    assert sorted(p.name for p in (work / "metrics" / "figures").iterdir()) == sorted(FIGURES)
    assert "5 figures" in out["plot"]


def test_fashion_mnist_class_names_in_the_table_and_every_figure(done, tmp_path, monkeypatch):
    """With data.dataset: fashion-mnist, per_class.csv and the figures' text name clothes, not digits."""
    work, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    set_params(copy, {"data.dataset": "fashion-mnist"})
    names = CLASS_NAMES["fashion-mnist"]
    run_stage("evaluate", copy)
    assert list(pd.read_csv(copy / "metrics" / "per_class.csv")["name"]) == list(names)

    texts = {}  # figure file name -> every text drawn on it (titles, tick labels)

    def record(fig, path):
        texts[path.name] = {t.get_text() for t in fig.findobj(matplotlib.text.Text)}
        matplotlib.pyplot.close(fig)

    monkeypatch.chdir(copy)
    monkeypatch.setattr(plot, "save", record)
    plot.main()
    with np.load(copy / "data/prepared/train.npz") as f:
        y = f["y"]
    wrong = pd.read_csv(copy / "metrics" / "misclassified.csv").head(36)
    assert len(wrong) > 0
    assert set(names) <= texts["confusion_matrix.png"]
    assert {f"label {names[v]}" for v in y[:25]} <= texts["samples.png"]
    titles = {f"true {names[a]}\npred {names[b]}" for a, b in zip(wrong.actual, wrong.predicted, strict=True)}
    assert titles <= texts["misclassified.png"]
    assert f"training image, label {names[y[0]]}: raw pixel values" in texts["digit.png"]


def test_digit_figure_writes_every_pixel_value_on_its_pixel(tmp_path, monkeypatch):
    """In-process: one number per pixel, centred on it, its digits' outline, white on dark pixels."""
    from matplotlib.textpath import TextPath

    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, path: figures.append(fig))
    image = np.arange(784, dtype=np.uint16).reshape(28, 28) % 256
    plot.digit_values(tmp_path / "digit.png", image, "3")
    (numbers,) = figures[0].axes[0].collections
    offsets = numbers.get_offsets()
    assert len(numbers.get_paths()) == len(offsets) == 784
    for (i, j), v in np.ndenumerate(image):
        path = numbers.get_paths()[28 * i + j]
        glyphs = TextPath((0, 0), str(v), size=7)
        assert tuple(offsets[28 * i + j]) == (j, i) and len(path.vertices) == len(glyphs.vertices)
        assert np.allclose((path.vertices.min(axis=0) + path.vertices.max(axis=0)) / 2, 0)
    white = (numbers.get_facecolors()[:, :3] == 1).all(axis=1)
    assert (white == (image.ravel() < 255 / 2.5)).all()
    matplotlib.pyplot.close(figures[0])


def test_digit_figure_is_large(done):
    work, _ = done
    width, height = png_size(work / "metrics" / "figures" / "digit.png")
    assert width >= 1000 and height >= 1000  # big enough to read 784 pixel values


# --- no TensorFlow where it is not needed ---------------------------------------------------------


def imported_modules(stderr):
    """Top-level module names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def run_with_importtime(stage, cwd, env=None):
    proc = run([sys.executable, "-X", "importtime", "-m", f"stages.{stage}"], cwd, env=env)
    names = imported_modules(proc.stderr)
    assert "numpy" in names, "importtime output not parsed"  # the check itself works
    return names


@pytest.mark.parametrize("stage", ["preprocess", "plot"])
def test_stage_imports_no_tensorflow(done, stage):
    work, _ = done
    names = run_with_importtime(stage, work)
    assert not names & {"tensorflow", "keras", "jax", "torch"}, f"{stage} imports a deep-learning library"


def test_download_imports_no_tensorflow(tmp_path, synthetic_env):
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    names = run_with_importtime("download", tmp_path, env=synthetic_env)
    assert len(list((tmp_path / "data" / "raw").glob("*.gz"))) == 4  # it really ran
    assert "tqdm" in names
    assert not names & {"tensorflow", "keras", "jax", "torch"}


def test_keras_and_dvclive_come_without_what_no_stage_uses_through_them():
    """import_keras, and train's import of DVCLive, keep out the JAX, pandas and matplotlib that
    TensorFlow, Keras and DVCLive would import (memory and start-up: stages/common.py), and each can
    still be imported after them."""
    code = (
        "import sys\n"
        "from stages.common import import_keras, without_optional_imports\n"
        "import_keras()\n"
        "with without_optional_imports():\n"
        "    from dvclive import Live\n"
        "print(sorted(m for m in ('jax', 'pandas', 'matplotlib') if m in sys.modules))\n"
        "import pandas, matplotlib\n"
        "print('imported')\n"
    )
    assert run([sys.executable, "-c", code], ROOT).stdout.splitlines() == ["[]", "imported"]


def test_keras_is_imported_with_the_collector_paused_then_frozen_out_of_its_passes():
    """import_keras runs no collector pass while TensorFlow's objects pile up, leaves them frozen
    (stages/common.py collector_paused) and the collector on; called again, it freezes nothing."""
    code = (
        "import gc, json\n"
        "from stages.common import import_keras\n"
        "before = [s['collections'] for s in gc.get_stats()]\n"
        "import_keras()\n"
        "passes = [s['collections'] - b for s, b in zip(gc.get_stats(), before)]\n"
        "frozen, enabled = gc.get_freeze_count(), gc.isenabled()\n"
        "gc.disable()  # a cycle that is garbage when Keras is asked for again (read_model does)\n"
        "class Cycle: pass\n"
        "a, b = Cycle(), Cycle()\n"
        "a.b, b.a = b, a\n"
        "del a, b\n"
        "import_keras()\n"
        "print(json.dumps([passes, frozen, enabled, gc.collect()]))\n"
    )
    passes, frozen, enabled, collected = json.loads(run([sys.executable, "-c", code], ROOT).stdout)
    assert passes == [0, 0, 0] and frozen > 200_000 and enabled
    assert collected >= 2  # the second import_keras froze nothing: the cycle was still freed


# --- failures are one line ------------------------------------------------------------------------


def test_evaluate_without_model_fails_in_one_line(prepared):
    proc = run_stage("evaluate", prepared, check=False)
    assert proc.returncode != 0
    assert "data/model.keras is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plot_without_training_history_fails_in_one_line(prepared):
    proc = run_stage("plot", prepared, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "dvc repro" in proc.stderr
    assert not (prepared / "metrics" / "figures").exists()


def test_plot_bad_digit_index_fails_in_one_line(done):
    work, _ = done
    set_params(work, {"plot.digit_index": 10**6})
    try:
        proc = run_stage("plot", work, check=False)
    finally:
        set_params(work, {"plot.digit_index": 0})
    assert proc.returncode != 0
    assert "plot.digit_index must be below" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list((work / "metrics" / "figures").glob("*.png"))) == 5  # previous figures kept


def test_plot_with_no_misclassified_digit(done, tmp_path):
    """A perfect score leaves misclassified.csv with a header only; plot must still draw its figures."""
    work, _ = done
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("model.keras", "raw"))
    wrong = pd.read_csv(copy / "metrics" / "misclassified.csv")
    wrong.head(0).to_csv(copy / "metrics" / "misclassified.csv", index=False)
    run_stage("plot", copy)
    assert len(list((copy / "metrics" / "figures").glob("*.png"))) == 5
