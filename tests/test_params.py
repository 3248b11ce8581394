"""Bad params end the stage that reads them in one line naming the key, before any work.

Each case runs the real stage script in a subprocess with TensorFlow and Keras made unimportable,
so a check that came after `import tensorflow` would show up as a traceback, not as the message.
What a failed run under DVC leaves behind (and how to get the last good state back) is in
test_recovery.py.
"""

import shutil
import sys
import time

from stages.common import PipelineError, load_params

import pytest
import yaml
from conftest import ROOT, run, set_params

# Runs stages/<stage>.py as __main__ with `import tensorflow` / `import keras` raising ImportError.
NO_TF = (
    "import runpy, sys; sys.modules.update(tensorflow=None, keras=None); "
    "sys.argv = [sys.argv[1]]; runpy.run_module(sys.argv[0], run_name='__main__')"
)
STAGE_OF = {
    "seed": "preprocess",
    "data": "download",
    "preprocess": "preprocess",
    "model": "train",
    "train": "train",
    "plot": "plot",
}


@pytest.fixture
def workdir(tmp_path):
    """stages/ and the baseline params.yaml: enough for a stage to reach its params check."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def fail(workdir, stage):
    """Run a stage that must fail on its params; return its one-line message."""
    start = time.perf_counter()
    proc = run([sys.executable, "-c", NO_TF, f"stages.{stage}"], workdir, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # in particular no ImportError from TensorFlow
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert seconds < 15  # no data was loaded, no model built (generous: the CPUs are shared)
    assert not (workdir / "data").exists()  # nothing was written
    return lines[0]


BAD_VALUES = [  # (key, bad value, what the message must say besides "<key> must be")
    ("model.hidden_units", "many", "a positive integer, got 'many'"),
    ("model.hidden_units", 0, "a positive integer, got 0"),
    ("model.hidden_units", 64.0, "a positive integer, got 64.0"),
    ("model.hidden_units", True, "a positive integer, got True"),
    ("model.hidden_layers", -1, "a positive integer, got -1"),
    ("model.hidden_layers", "2", "a positive integer, got '2'"),
    ("train.batch_size", 0, "a positive integer, got 0"),
    ("train.batch_size", "big", "a positive integer, got 'big'"),
    ("train.epochs", 0, "a positive integer, got 0"),
    ("train.epochs", 2.5, "a positive integer, got 2.5"),
    ("model.dropout", 1, "a number in [0, 1), got 1"),
    ("model.dropout", -0.1, "a number in [0, 1), got -0.1"),
    ("model.dropout", "half", "a number in [0, 1), got 'half'"),
    ("preprocess.validation_split", 0, "a number in (0, 1), got 0"),
    ("preprocess.validation_split", 1.0, "a number in (0, 1), got 1.0"),
    ("preprocess.validation_split", float("nan"), "a number in (0, 1), got nan"),
    (
        "train.optimizer",
        "rmsprob",
        "one of rmsprop, sgd, adam, adamw, nadam, adamax, adagrad, adadelta, lion, "
        "got 'rmsprob' (did you mean rmsprop?)",
    ),
    ("model.activation", "rleu", "got 'rleu' (did you mean relu?)"),
    ("model.activation", "softmax", "got 'softmax'"),
    ("train.learning_rate", 0, "a positive finite number or null, got 0"),
    ("train.learning_rate", -0.001, "a positive finite number or null, got -0.001"),
    ("train.learning_rate", float("inf"), "a positive finite number or null, got inf"),
    ("train.learning_rate", "fast", "a positive finite number or null, got 'fast'"),
    ("seed", -1, "an integer in [0, 2**32), got -1"),
    ("seed", 1.5, "an integer in [0, 2**32), got 1.5"),
    ("seed", "zero", "an integer in [0, 2**32), got 'zero'"),
    ("seed", 2**32, f"an integer in [0, 2**32), got {2**32}"),
    ("train.precision", "float16", "got 'float16' (did you mean float32?)"),
    ("plot.samples", 0, "a positive integer, got 0"),
    ("data.dataset", "fashion", "one of mnist, fashion-mnist, got 'fashion' (did you mean fashion-mnist?)"),
    ("data.dataset", "MNIST", "one of mnist, fashion-mnist, got 'MNIST'"),
    ("model.type", "convnet", "one of mlp, cnn, got 'convnet' (did you mean cnn?)"),
    ("model.type", "CNN", "one of mlp, cnn, got 'CNN'"),
    ("model.filters", [], "a non-empty list of positive integers, e.g. [32, 64], got []"),
    ("model.filters", 32, "a non-empty list of positive integers, e.g. [32, 64], got 32"),
    ("model.filters", [32, 0], "a non-empty list of positive integers, e.g. [32, 64], got [32, 0]"),
    ("model.padding", "full", "one of valid, same, got 'full'"),
    ("model.dense_units", -1, "0 or a positive integer, got -1"),
    ("model.dense_units", 1.5, "0 or a positive integer, got 1.5"),
    ("model.kernel_size", 0, "a positive integer, got 0"),
    ("model.kernel_size", [3, 3], "a positive integer, got [3, 3]"),
    ("train.jit_compile", "yes", "true, false or auto, got 'yes'"),
    ("model.input_dropout", 1, "a number in [0, 1), got 1"),
    ("model.max_norm", 0, "a positive number or null, got 0"),
    ("train.lr_schedule", "cosin", "one of constant, cosine, got 'cosin' (did you mean cosine?)"),
]


@pytest.mark.parametrize(
    ("key", "value", "expected"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES]
)
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, key, value, expected):
    """Every variant, in-process: the exact message."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {key: value})
    with pytest.raises(PipelineError) as e:
        load_params("seed", "data", "preprocess", "model", "train", "plot", path=tmp_path / "params.yaml")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'params.yaml'}: {key} must be "), message
    assert message.endswith(expected), message


ONE_PER_KEY = list({key: (key, value, expected) for key, value, expected in reversed(BAD_VALUES)}.values())


@pytest.mark.parametrize(("key", "value", "expected"), ONE_PER_KEY, ids=[k for k, *_ in ONE_PER_KEY])
def test_stage_fails_in_one_line_before_importing_tensorflow(workdir, key, value, expected):
    """One value per key, through the stage that reads it: exit 1, one line, no TensorFlow."""
    set_params(workdir, {key: value})
    message = fail(workdir, STAGE_OF[key.split(".")[0]])
    assert message.startswith(f"error: params.yaml: {key} must be "), message
    assert message.endswith(expected), message


def edit(workdir, change):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    change(params)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_missing_section(workdir):
    edit(workdir, lambda p: p.pop("train"))
    assert fail(workdir, "train") == (
        "error: params.yaml: missing section train; restore it with git checkout params.yaml"
    )


def test_section_that_is_not_a_mapping(workdir):
    edit(workdir, lambda p: p.update(model=None))
    assert fail(workdir, "train") == "error: params.yaml: model must be a mapping of keys, got None"


def test_missing_key(workdir):
    edit(workdir, lambda p: p["train"].pop("epochs"))
    assert fail(workdir, "train") == "error: params.yaml: missing key train.epochs (a positive integer)"


def test_unknown_key_in_a_section_with_did_you_mean(workdir):
    edit(workdir, lambda p: p["train"].update(batchsize=64))
    assert fail(workdir, "train") == (
        "error: params.yaml: unknown key train.batchsize (did you mean train.batch_size?)"
    )


def test_unknown_top_level_key_with_did_you_mean(workdir):
    edit(workdir, lambda p: p.update(trian=p.pop("train")))
    # Any stage notices, even one that does not read `train`: the typo would otherwise go unseen.
    assert fail(workdir, "preprocess") == "error: params.yaml: unknown key trian (did you mean train?)"


def test_unknown_top_level_key_without_a_close_match(workdir):
    edit(workdir, lambda p: p.update({42: 1}))  # an int key: difflib needs a str
    assert fail(workdir, "preprocess") == "error: params.yaml: unknown key 42"


def test_yaml_syntax_error_names_its_line(workdir):
    path = workdir / "params.yaml"
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("batch_size:"))
    lines[number - 1] = "  batch_size: [128"
    path.write_text("\n".join(lines) + "\n")
    message = fail(workdir, "train")
    assert message.startswith("error: params.yaml: YAML syntax error at line "), message
    # PyYAML points at where the flow sequence turned out unterminated: the line or the next one.
    line = int(message.split(" at line ")[1].split(",")[0])
    assert number <= line <= number + 1, message


def test_empty_params_file(workdir):
    (workdir / "params.yaml").write_text("")
    assert fail(workdir, "train") == "error: params.yaml: expected a mapping of sections, got NoneType"


def test_missing_params_file(workdir):
    (workdir / "params.yaml").unlink()
    assert fail(workdir, "train") == "error: params.yaml not found: run from the repository root"


def test_the_committed_params_are_valid():
    assert load_params("seed", "data", "preprocess", "model", "train", "plot", path=ROOT / "params.yaml")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"model.filters": [32, 64, 128], "model.kernel_size": 5},
            "error: params.yaml: model.filters [32, 64, 128] with model.kernel_size 5 and "
            "model.padding valid shrink the 28x28 image to nothing; use fewer blocks or a smaller kernel",
        ),
        (
            {"model.filters": [8] * 5, "model.padding": "same"},  # 28 -> 14 -> 7 -> 3 -> 1 -> 0
            "error: params.yaml: model.filters [8, 8, 8, 8, 8] with model.kernel_size 3 and "
            "model.padding same shrink the 28x28 image to nothing; use fewer blocks or a smaller kernel",
        ),
        (
            {"train.jit_compile": True},
            "error: params.yaml: train.jit_compile true cannot train the CNN: XLA has no deterministic "
            "MaxPool gradient (and is slower here); use auto or false",
        ),
    ],
)
def test_a_cnn_that_cannot_run_fails_before_tensorflow(workdir, change, expected):
    # 28 -> (28 - 5 + 1) // 2 = 12 -> 4 -> 0: the third block has no pixels left. Three blocks of
    # kernel 3 (28 -> 13 -> 5 -> 1) still fit, and the MLP ignores both keys.
    set_params(workdir, {"model.type": "cnn", **change})
    assert fail(workdir, "train") == expected
