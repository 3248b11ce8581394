"""stages.common.threefry_dropout: keras.layers.Dropout's semantics, with masks drawn by ThreeFry."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from stages.common import read_model, threefry_dropout  # noqa: E402

import tensorflow as tf  # noqa: E402

from stages.train import build_model  # noqa: E402

ThreeFryDropout = threefry_dropout()
X = np.ones((400, 500), "float32")


def drop(rate, x=X, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return np.asarray(ThreeFryDropout(rate, **kwargs)(x, training=True))


def test_it_is_a_dropout_layer_scaling_what_it_keeps():
    assert issubclass(ThreeFryDropout, keras.layers.Dropout)
    y = drop(0.2)
    assert set(np.unique(y)) == {0, np.float32(1 / 0.8)}  # scaled by 1 / (1 - rate)
    assert abs((y == 0).mean() - 0.2) < 0.005  # 200,000 draws: 5 standard deviations
    assert abs(drop(0.7).astype(bool).mean() - 0.3) < 0.005


def test_rate_zero_and_inference_are_the_identity():
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    assert np.array_equal(drop(0, x), x)
    assert np.array_equal(ThreeFryDropout(0.5)(x, training=False), x)
    assert np.array_equal(ThreeFryDropout(0.5)(x), x)  # training defaults to False
    assert not drop(1, x).any()


def test_noise_shape_broadcasts_one_mask():
    y = drop(0.5, noise_shape=(None, 1))  # one decision per row
    assert (y == y[:, :1]).all() and 0.4 < (y[:, 0] == 0).mean() < 0.6
    y = drop(0.5, noise_shape=(1, X.shape[1]))  # one decision per column
    assert (y == y[:1]).all()


def test_the_seed_drives_the_masks_on_every_path():
    first = drop(0.2, seed=3)
    assert np.array_equal(drop(0.2, seed=3), first)  # keras.utils.set_random_seed reproduces it
    assert not np.array_equal(drop(0.2, seed=4), first)
    keras.utils.set_random_seed(3)
    layer = ThreeFryDropout(0.2)
    calls = [np.asarray(layer(X, training=True)) for _ in range(2)]
    assert np.array_equal(calls[0], first) and not np.array_equal(calls[1], first)  # a new mask per call
    for jit in (True, False):  # ThreeFry is always drawn in XLA, so its masks do not depend on it
        keras.utils.set_random_seed(3)
        call = tf.function(ThreeFryDropout(0.2).call, jit_compile=jit)
        assert np.array_equal(call(X, training=True), first)
    keras.utils.set_random_seed(3)
    half = ThreeFryDropout(0.2, dtype="mixed_bfloat16")(X, training=True)  # the same mask in bfloat16
    assert half.dtype == "bfloat16" and np.array_equal(np.asarray(tf.cast(half, "float32")), first)


def test_a_model_holding_it_round_trips_in_safe_mode(tmp_path):
    model = build_model(
        {"type": "mlp", "hidden_units": 8, "hidden_layers": 2, "activation": "relu", "dropout": 0.3}
    )
    assert [type(layer) for layer in model.layers].count(ThreeFryDropout) == 2
    model.save(tmp_path / "m.keras")
    loaded = read_model(tmp_path / "m.keras")  # the loader of evaluate and predict: safe mode
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    assert [layer.rate for layer in loaded.layers if isinstance(layer, ThreeFryDropout)] == [0.3, 0.3]
    x = X[:4, : 784 - 500].repeat(3, axis=1)[:, :784]
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_model_saved_with_keras_own_dropout_still_loads(tmp_path):
    old = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(8), keras.layers.Dropout(0.2), keras.layers.Dense(10)]
    )
    old.save(tmp_path / "old.keras")
    loaded = read_model(tmp_path / "old.keras")
    assert type(loaded.layers[1]) is keras.layers.Dropout and loaded.layers[1].rate == 0.2
