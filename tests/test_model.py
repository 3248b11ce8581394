"""Stage train: the MLP that build_model makes from the model params."""

from stages.common import ACTIVATIONS, OPTIMIZERS, load_params

import numpy as np
import pytest
from conftest import ROOT

keras = pytest.importorskip("keras")
from stages.common import threefry_dropout  # noqa: E402

from stages.train import build_model  # noqa: E402


@pytest.fixture(scope="module")
def baseline():
    """The model section of the repository's params.yaml, validated."""
    return load_params("model", path=ROOT / "params.yaml")["model"]


def layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_baseline_is_the_classic_mlp(baseline):
    assert baseline == {
        "type": "mlp",
        "hidden_units": 512,
        "hidden_layers": 2,
        "activation": "relu",
        "dropout": 0.2,
        "input_dropout": 0,  # none: no layer
        "max_norm": None,  # no constraint
        "filters": [32, 64],  # the CNN's own, unused by the MLP
        "kernel_size": 3,
        "padding": "valid",
        "dense_units": 0,
    }
    model = build_model(baseline)
    assert model.count_params() == 669_706
    assert model.input_shape == (None, 784)
    assert model.output_shape == (None, 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Dense", "ThreeFryDropout", "Dense", "ThreeFryDropout", "Dense"]
    dense = layers_of(model, keras.layers.Dense)
    assert [d.units for d in dense] == [512, 512, 10]
    assert [d.activation.__name__ for d in dense] == ["relu", "relu", "softmax"]
    assert [d.rate for d in layers_of(model, keras.layers.Dropout)] == [0.2, 0.2]


@pytest.mark.parametrize(
    ("units", "layers", "expected_params"),
    [
        (64, 1, 784 * 64 + 64 + 64 * 10 + 10),
        (32, 3, (784 * 32 + 32) + 2 * (32 * 32 + 32) + (32 * 10 + 10)),
        (128, 2, (784 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)),
    ],
)
def test_layer_count_units_and_parameters_follow_params(baseline, units, layers, expected_params):
    model = build_model({**baseline, "hidden_units": units, "hidden_layers": layers})
    dense = layers_of(model, keras.layers.Dense)
    assert len(dense) == layers + 1
    assert [d.units for d in dense] == [units] * layers + [10]
    assert len(layers_of(model, keras.layers.Dropout)) == layers
    assert model.count_params() == expected_params


@pytest.mark.parametrize("activation", ["linear", "tanh", "gelu"])
def test_activation_applies_to_hidden_layers_only(baseline, activation):
    model = build_model({**baseline, "activation": activation})
    dense = layers_of(model, keras.layers.Dense)
    assert [d.activation.__name__ for d in dense[:-1]] == [activation, activation]
    assert dense[-1].activation.__name__ == "softmax"


def test_dropout_zero_removes_the_dropout_layers(baseline):
    model = build_model({**baseline, "dropout": 0})
    assert layers_of(model, keras.layers.Dropout) == []
    assert [type(layer).__name__ for layer in model.layers] == ["Dense", "Dense", "Dense"]
    assert model.count_params() == 669_706  # dropout has no weights


def test_dropout_rate_follows_params(baseline):
    model = build_model({**baseline, "dropout": 0.5, "hidden_layers": 3})
    assert [d.rate for d in layers_of(model, keras.layers.Dropout)] == [0.5, 0.5, 0.5]
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Dense", "ThreeFryDropout"] * 3 + ["Dense"]


def test_image_shape_and_classes_are_arguments(baseline):
    model = build_model(baseline, image_shape=(10, 10), classes=3)
    assert model.input_shape == (None, 100)
    assert model.output_shape == (None, 3)


def test_output_is_a_probability_distribution(baseline):
    model = build_model({**baseline, "hidden_units": 16})
    probs = np.asarray(model(np.random.default_rng(0).random((4, 784), dtype=np.float32)))
    assert probs.shape == (4, 10)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert (probs >= 0).all()


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_allowed_activation_is_a_keras_activation(baseline, name):
    fn = keras.activations.get(name)
    assert callable(fn)
    model = build_model({**baseline, "hidden_units": 8, "activation": name})
    assert layers_of(model, keras.layers.Dense)[0].activation is fn


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_allowed_optimizer_is_a_keras_optimizer(name):
    optimizer = keras.optimizers.get(name)
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    # the form train.py uses, with and without an explicit learning rate
    assert isinstance(keras.optimizers.get({"class_name": name, "config": {}}), keras.optimizers.Optimizer)
    custom = keras.optimizers.get({"class_name": name, "config": {"learning_rate": 0.0123}})
    assert float(custom.learning_rate) == pytest.approx(0.0123)


def test_the_mlp_is_the_one_main_built_before_the_cnn(baseline):
    """Adding the CNN changed nothing of the MLP: same config, layer names and initial weights as
    the builder of main before model.type existed (written out here, with its Dropout now ThreeFry's)."""
    keras.backend.clear_session()  # layer names count up per session: start both from "dense"
    keras.utils.set_random_seed(0)
    old = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            threefry_dropout()(0.2),
            keras.layers.Dense(512, activation="relu"),
            threefry_dropout()(0.2),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ],
        name="mlp",
    )
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    new = build_model(baseline)
    assert new.get_config() == old.get_config()
    for a, b in zip(new.get_weights(), old.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_cnn_is_the_keras_simple_mnist_convnet(baseline):
    model = build_model({**baseline, "type": "cnn", "dropout": 0.5})
    kinds = [type(layer).__name__ for layer in model.layers]
    conv = ["Conv2D", "MaxPooling2D"] * 2
    assert kinds == [*conv, "Flatten", "ThreeFryDropout", "Dense"]
    assert model.input_shape == (None, 28, 28, 1)
    # conv 3x3x1x32 + 32, conv 3x3x32x64 + 64, then 28 -> 26 -> 13 -> 11 -> 5: 5x5x64 inputs to 10 classes
    assert model.count_params() == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (5 * 5 * 64 * 10 + 10) == 34_826
    conv = layers_of(model, keras.layers.Conv2D)
    assert [c.filters for c in conv] == [32, 64] and [c.kernel_size for c in conv] == [(3, 3)] * 2
    assert [c.activation.__name__ for c in conv] == ["relu", "relu"]
    assert layers_of(model, keras.layers.Dropout)[0].rate == 0.5
    assert model.name == "cnn"


def test_cnn_blocks_kernel_and_dropout_follow_params(baseline):
    model = build_model({**baseline, "type": "cnn", "filters": [8], "kernel_size": 5, "dropout": 0})
    assert [type(layer).__name__ for layer in model.layers] == ["Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    # 28 -> 24 -> 12: 12x12x8 inputs to the classifier
    assert model.count_params() == (25 * 8 + 8) + (12 * 12 * 8 * 10 + 10)


def test_cnn_dense_units_add_one_dense_layer_before_dropout(baseline):
    model = build_model({**baseline, "type": "cnn", "dropout": 0.5, "dense_units": 128, "activation": "gelu"})
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[4:] == ["Flatten", "Dense", "ThreeFryDropout", "Dense"]
    hidden = model.layers[5]
    assert hidden.units == 128 and hidden.activation.__name__ == "gelu"
    # the Keras example's convs, then 5x5x64 -> 128 -> 10
    assert model.count_params() == 320 + 18_496 + (1600 * 128 + 128) + (128 * 10 + 10) == 225_034


def test_cnn_same_padding_keeps_each_convs_size():
    model = build_model(
        {"type": "cnn", "filters": [32, 64], "kernel_size": 3, "padding": "same"}
        | {"activation": "relu", "dropout": 0.5, "dense_units": 128}
    )
    assert model.layers[0].padding == "same" and model.layers[4].output.shape == (None, 3136)  # 28 -> 14 -> 7
    assert model.count_params() == 320 + 18_496 + (3136 * 128 + 128) + (128 * 10 + 10) == 421_642
