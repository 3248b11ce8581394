"""Hostile input ends in one `error:` line, a non-zero exit and nothing written: a damaged or
code-carrying model, a batch or a model too large for the data or the machine, a trickling
mirror, an image too large to decode, a tolerance that is not a number.

The refusals that need only params and array shapes come before TensorFlow: those tests run the
stage through `python -c` and read whether `tensorflow` was ever imported.
"""

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from stages.common import save_split

import numpy as np
import pytest
from conftest import ROOT, copy_project, run, run_stage, set_params
from PIL import Image, ImageDraw

from stages import download, train

WAY_BACK = (
    "`dvc checkout --force data/model.keras` restores the last trained one, `dvc repro train` retrains it"
)
# Runs a module as `python -m` does and records, even when it exits, whether TensorFlow was imported.
WITHOUT_TF = (
    "import runpy, sys\n"
    "try:\n"
    "    runpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    open('tensorflow-imported', 'w').write(str('tensorflow' in sys.modules))\n"
)


def error_lines(proc):
    """stderr's lines, TensorFlow's start-up lines (which no setting silences) left out."""
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if "oneDNN" not in line and "absl::" not in line]


def run_module(work, module, env=None):
    """(the finished process, whether it imported TensorFlow)."""
    proc = run([sys.executable, "-c", WITHOUT_TF, module], work, check=False, env=env, timeout=120)
    return proc, (work / "tensorflow-imported").read_text() == "True"


# --- a damaged model, or one that holds code ------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A project copy with a test split and a digit image, and three bad model files: a real .keras
    cut in half, random bytes, and a model with a Lambda layer (built here, as an attacker would)."""
    import keras

    work = copy_project(tmp_path_factory.mktemp("models"), overrides=None, git=False)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 28, 28), "uint8"), np.arange(20) % 10
    save_split(work / "data/prepared/test.npz", x, y, 255)
    image = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(image).ellipse((30, 20, 70, 80), outline=0, width=8)
    image.save(work / "digit.png")
    bad = work / "bad"
    bad.mkdir()
    classifier = keras.layers.Dense(10, activation="softmax")
    keras.Sequential([keras.Input((784,)), classifier]).save(bad / "good.keras")
    whole = (bad / "good.keras").read_bytes()
    (bad / "truncated.keras").write_bytes(whole[: len(whole) // 2])
    (bad / "random.keras").write_bytes(rng.integers(0, 256, 5000, "uint8").tobytes())
    code = keras.layers.Lambda(lambda x: x * 2)
    keras.Sequential([keras.Input((784,)), code, classifier]).save(bad / "lambda.keras")
    return work


COMMANDS = {
    "evaluate": [sys.executable, "-m", "stages.evaluate"],
    "predict": [sys.executable, "-m", "tools.predict", "digit.png"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_damaged_model_is_one_line_with_the_way_back(models, command, kind):
    (models / "data/model.keras").write_bytes((models / "bad" / f"{kind}.keras").read_bytes())
    proc = run(COMMANDS[command], models, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    damaged = "error: data/model.keras is damaged (not a complete .keras archive)"
    assert error_lines(proc) == [f"{damaged}; {WAY_BACK}"]
    assert not (models / "metrics").exists()  # evaluate wrote nothing


@pytest.mark.parametrize("command", COMMANDS)
def test_model_with_code_is_refused_in_one_line(models, command):
    (models / "data/model.keras").write_bytes((models / "bad/lambda.keras").read_bytes())
    proc = run(COMMANDS[command], models, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert error_lines(proc) == [
        "error: data/model.keras holds Python code (a Lambda layer or function), which safe mode does not "
        f"run, so it was not loaded; {WAY_BACK}"
    ]
    assert not (models / "metrics").exists()


# --- a batch larger than the training split, a split that leaves nothing, a model larger than memory


def test_batch_larger_than_the_training_split_is_refused_before_tensorflow(prepared):
    set_params(prepared, {"train.batch_size": 5000})
    proc, tensorflow = run_module(prepared, "stages.train")
    train_images = round(3000 * 0.8)  # SMALL's train_size, less the validation split
    assert proc.returncode == 1 and not tensorflow
    assert error_lines(proc) == [
        f"error: params.yaml: train.batch_size 5000 is more than the {train_images} training images; "
        "lower it, or keep more images for training (preprocess.validation_split, preprocess.train_size)"
    ]
    assert not (prepared / "data/model.keras").exists() and not (prepared / "metrics").exists()


def test_validation_split_that_leaves_three_training_images(prepared):
    set_params(prepared, {"preprocess.validation_split": 0.999})
    run_stage("preprocess", prepared)
    with np.load(prepared / "data/prepared/train.npz") as f:
        assert len(f["y"]) == 3  # 3000 - round(2997)
    proc, tensorflow = run_module(prepared, "stages.train")
    assert proc.returncode == 1 and not tensorflow
    [line] = error_lines(proc)
    assert line.startswith("error: params.yaml: train.batch_size 128 is more than the 3 training images")


@pytest.mark.parametrize(("fraction", "part"), [(0.0001, "validation"), (0.9999, "training")])
def test_validation_split_that_leaves_no_image(prepared, fraction, part):
    before = {p.name: p.read_bytes() for p in (prepared / "data/prepared").iterdir()}
    set_params(prepared, {"preprocess.validation_split": fraction})
    proc = run_stage("preprocess", prepared, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    fix = "raise" if part == "validation" else "lower"
    assert error_lines(proc) == [
        f"error: params.yaml: preprocess.validation_split {fraction} of 3000 images leaves an empty {part} "
        f"split (0 images); {fix} it, or change preprocess.train_size"
    ]
    assert {p.name: p.read_bytes() for p in (prepared / "data/prepared").iterdir()} == before


def test_model_larger_than_memory_is_refused_before_tensorflow(prepared):
    units = 10_000_000
    set_params(prepared, {"model.hidden_units": units})
    start = time.monotonic()
    proc, tensorflow = run_module(prepared, "stages.train")
    assert proc.returncode == 1 and not tensorflow
    assert time.monotonic() - start < 30  # TensorFlow never started; the failure took 18 s and a traceback
    count = 785 * units + (units + 1) * units + (units + 1) * 10  # 784 -> units -> units -> 10, with biases
    [line] = error_lines(proc)
    assert line.startswith(
        f"error: params.yaml: model.hidden_units {units}, model.hidden_layers 2 make {count:,} parameters, "
        f"at least {8 * count / 1e9:,.1f} GB for their float32 weights and gradients, but this machine has "
    )
    assert not (prepared / "data/model.keras").exists()


@pytest.mark.parametrize(
    "model",
    [
        {"type": "mlp", "hidden_units": 64, "hidden_layers": 3},
        {"type": "cnn", "filters": [32, 64], "kernel_size": 3, "padding": "valid", "dense_units": 0},
        {"type": "cnn", "filters": [8, 16, 4], "kernel_size": 5, "padding": "same", "dense_units": 16},
    ],
)
def test_parameter_count_is_what_keras_builds(model):
    """The memory check counts the weights from params alone; Keras, building the model, must agree."""
    p = {"activation": "relu", "dropout": 0.2, **model}
    assert train.parameter_count(p) == train.build_model(p).count_params()


# --- a mirror that trickles ---------------------------------------------------------------------


class Trickle(http.server.BaseHTTPRequestHandler):
    """Announces a whole file, then sends one byte every second: never silent for long enough to trip a
    socket timeout of 3 s (short, so that the test waits seconds, not tens of them)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            while not self.server.stop.wait(1):
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:  # the client hung up
            pass


def test_trickling_mirror_fails_within_the_timeout(tmp_path):
    work = copy_project(tmp_path / "project", git=False)
    sums = tmp_path / "SHA256SUMS"  # any well-formed digests: the download never gets that far
    sums.write_text("".join(f"{'0' * 64}  {name}\n" for name in download.FILES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads, server.stop = True, threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    env = {"MNIST_MIRROR": url, "MNIST_SHA256SUMS": str(sums), "MNIST_TIMEOUT": "3", "MNIST_RETRIES": "0"}
    try:
        start = time.monotonic()
        proc = run_stage("download", work, check=False, env=env, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert proc.returncode == 1
    assert 3 <= elapsed < 9, elapsed  # the timeout, plus the interpreter's start
    assert error_lines(proc) == [
        f"error: could not get train-images-idx3-ubyte.gz; tried {url}train-images-idx3-ubyte.gz: timed out: "
        "the file took more than 3 s. set MNIST_MIRROR to a URL or directory holding the four .gz files"
    ]
    assert list((work / "data").rglob("*")) == []  # not even a temporary file


# --- images too large to decode, or decoded at a smaller size ------------------------------------


def peak_rss_of_load(image):
    """Peak resident memory (MB) of a fresh process that prepares `image` as predict does, and its stderr."""
    code = "import sys; from tools.predict import load; load(sys.argv[1])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(image)],
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, stderr
    return usage.ru_maxrss / 1024, stderr  # kilobytes on Linux


def drawn_ring(mode, size, ink, paper):
    image = Image.new(mode, size, paper)
    w, h = size
    ImageDraw.Draw(image).ellipse((w * 0.4, h * 0.3, w * 0.6, h * 0.7), outline=ink, width=w // 60)
    return image


def test_huge_png_is_refused_before_it_is_decoded(models):
    """13,300 x 13,300 in 70 KB: just under Pillow's own limit, 3 GB to classify before."""
    drawn_ring("1", (13300, 13300), 0, 1).save(models / "huge.png", optimize=True)
    proc = run([sys.executable, "-m", "tools.predict", "huge.png"], models, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert error_lines(proc) == [
        "error: huge.png: 13300x13300 pixels, more than the 64,000,000 this command decodes; scale it down "
        "(to 2048 pixels on its longer side, say)"
    ]
    assert "DecompressionBombWarning" not in proc.stderr


def test_large_photo_is_decoded_at_a_fraction_of_its_size(tmp_path):
    """A 108-megapixel JPEG, above Pillow's warning limit: classified with bounded memory, no warning."""
    drawn_ring("L", (12000, 9000), 0, 255).save(tmp_path / "photo.jpg", quality=85)
    drawn_ring("L", (300, 225), 0, 255).save(tmp_path / "small.jpg", quality=85)
    small, _ = peak_rss_of_load(tmp_path / "small.jpg")
    large, stderr = peak_rss_of_load(tmp_path / "photo.jpg")
    assert stderr == ""  # no DecompressionBombWarning
    assert large - small < 200, (small, large)  # decoded at 1/4: 7 MB of pixels, not 108 MB and its copies


# --- make check-repro with a bad tolerance, or nothing to compare with -------------------------


NOTHING_COMMITTED = (
    "metrics/evaluate.json at HEAD has no test_accuracy: commit the results of `dvc repro` first"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["TOLERANCE=abc"], "error: --tolerance must be a number in [0, 1), got abc"),
        ([], f"error: {NOTHING_COMMITTED}"),
    ],
)
def test_check_repro_refuses_before_any_work(project, args, message):
    venv = Path(sys.executable).parent.parent
    shutil.copy2(ROOT / "Makefile", project / "Makefile")
    # -o: the shared venv is never reinstalled from here. A rerun would fail at once, offline.
    proc = run(
        ["make", "-o", f"{venv}/.installed", f"VENV={venv}", "check-repro", *args],
        project,
        check=False,
        env={"MNIST_MIRROR": str(project / "no-mirror")},
        timeout=300,
    )
    assert proc.returncode == 2  # make's status for a failed recipe
    # make's own "*** Error" line reads make[1] when the suite itself runs under make.
    assert [line for line in error_lines(proc) if not re.match(r"make(\[\d+\])?: \*\*\*", line)] == [message]
    assert "Running stage" not in proc.stdout
    assert not (project / "dvc.lock").exists() and not (project / "data").exists()
