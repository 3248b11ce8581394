"""Stage train: the MLP that build_model makes from the model params."""

from common import ACTIVATIONS, OPTIMIZERS, load_params

import numpy as np
import pytest
from conftest import ROOT

keras = pytest.importorskip("keras")
from train import build_model  # noqa: E402


@pytest.fixture(scope="module")
def baseline():
    """The model section of the repository's params.yaml, validated."""
    return load_params("model", path=ROOT / "params.yaml")["model"]


def layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_baseline_is_the_classic_mlp(baseline):
    assert baseline == {"hidden_units": 512, "hidden_layers": 2, "activation": "relu", "dropout": 0.2}
    model = build_model(baseline)
    assert model.count_params() == 669_706
    assert model.input_shape == (None, 784)
    assert model.output_shape == (None, 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Dense", "Dropout", "Dense", "Dropout", "Dense"]
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
    assert kinds == ["Dense", "Dropout"] * 3 + ["Dense"]


def test_input_dim_and_classes_are_arguments(baseline):
    model = build_model(baseline, input_dim=100, classes=3)
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
