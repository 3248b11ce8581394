"""The train stage's compiled loop does what `fit` does: same model (MLP, CNN), optimizer, loss, batches."""

from stages.common import ACTIVATIONS, OPTIMIZERS

import numpy as np
import pytest

from stages.train import build_model, make_steps

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

N, BATCH = 300, 64  # four full batches and a last one of 44: both compiled calls run


def data(seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, N).astype("uint8")
    x = rng.integers(0, 60, (N, 28, 28)).astype("uint8")
    x[np.arange(N), y, :] = 255  # the class is the bright row: learnable in a few steps
    return x, y


def model_and_optimizer(optimizer="rmsprop", activation="relu", dropout=0.0, seed=0, kind="mlp"):
    keras.utils.set_random_seed(seed)
    p = {"type": kind, "hidden_units": 32, "hidden_layers": 2, "activation": activation, "dropout": dropout}
    model = build_model({**p, "filters": [4, 8], "kernel_size": 3, "padding": "same", "dense_units": 16})
    opt = keras.optimizers.get(optimizer)
    opt.build(model.trainable_weights)
    return model, opt


@pytest.mark.parametrize(("kind", "jit"), [("mlp", True), ("mlp", False), ("cnn", False)])
def test_one_epoch_matches_fit_on_the_same_batches(kind, jit):
    x, y = data()
    order = np.random.default_rng(1).permutation(N).astype("int32")
    ours, opt = model_and_optimizer(kind=kind)
    train_epoch, evaluate = make_steps(ours, opt, x, y, 255.0, BATCH, jit)
    loss, accuracy = train_epoch(tf.constant(order))

    theirs, _ = model_and_optimizer(kind=kind)  # same seed: same initial weights
    theirs.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    shape = theirs.input_shape[1:]  # (784,) or (28, 28, 1)
    xs = x[order].reshape(N, *shape).astype("float32") / 255
    history = theirs.fit(xs, y[order], batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history

    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(history["loss"][0], rel=1e-4)
    assert accuracy == pytest.approx(history["accuracy"][0], abs=1e-6)
    val_loss, val_accuracy = (
        float(v) for v in evaluate(tf.constant(x.reshape(N, *shape)), tf.constant(y.astype("int32")))
    )
    expected = theirs.evaluate(x.reshape(N, *shape).astype("float32") / 255, y, verbose=0)
    assert val_loss == pytest.approx(expected[0], rel=1e-4)
    assert val_accuracy == pytest.approx(expected[1], abs=1e-6)


# Each activation once, the optimizers in turn beside them: every one of both, a compilation per case.
PAIRS = [(OPTIMIZERS[i % len(OPTIMIZERS)], a) for i, a in enumerate(ACTIVATIONS)]
assert {o for o, _ in PAIRS} == set(OPTIMIZERS), "more optimizers than activations: pair them otherwise"


@pytest.mark.parametrize("optimizer, activation", PAIRS)
def test_every_allowed_optimizer_and_activation_trains_compiled(optimizer, activation):
    # Whole batches only: one XLA compilation per case instead of two (the last, smaller batch's
    # own call is covered once, by test_one_epoch_matches_fit_on_the_same_batches).
    n = (N // BATCH) * BATCH
    x, y = (a[:n] for a in data())
    model, opt = model_and_optimizer(optimizer, activation, dropout=0.2)
    before = [w.copy() for w in model.get_weights()]
    train_epoch, _ = make_steps(model, opt, x, y, 255.0, BATCH, jit_compile=True)
    loss, accuracy = train_epoch(tf.random.experimental.stateless_shuffle(tf.range(n), [0, 0]))
    assert np.isfinite(loss) and 0 <= accuracy <= 1
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_validation_in_slices_matches_one_call(monkeypatch):
    """Big models validate in slices (common.eval_rows) that give the whole split's mean loss and accuracy."""
    from stages import common

    x, y = data()
    model, opt = model_and_optimizer(kind="cnn")
    _, evaluate = make_steps(model, opt, x, y, 255.0, BATCH, False)
    split = tf.constant(x.reshape(N, 28, 28, 1)), tf.constant(y.astype("int32"))
    assert common.eval_rows(model, N) == N  # a tiny CNN's 300 samples fit in one call
    whole = evaluate(*split)
    per_sample = sum(int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    monkeypatch.setattr(common, "EVAL_FLOATS", 70 * per_sample)
    assert common.eval_rows(model, N) == 70  # calls of 70, 70, 70, 70 and 20 samples
    assert evaluate(*split) == pytest.approx(whole, rel=1e-6)


def test_the_studys_models_validate_within_the_memory_budget():
    """Validation in slices under EVAL_FLOATS: the 784-512-512-10 MLP's 12,000 images in a few calls,
    the CNN's (1.9 GB of conv maps in one call) in many."""
    from stages.common import EVAL_FLOATS, eval_rows

    base = {"activation": "relu", "dropout": 0.2, "hidden_layers": 2}
    mlp = build_model({**base, "type": "mlp", "hidden_units": 512})
    assert 1000 < eval_rows(mlp, 12_000) < 12_000
    cnn = build_model(
        {**base, "type": "cnn", "filters": [32, 64], "kernel_size": 3, "padding": "valid", "dense_units": 0}
    )
    rows = eval_rows(cnn, 12_000)
    assert 100 < rows < 12_000
    per_sample = sum(int(np.prod(layer.output.shape[1:])) for layer in cnn.layers)
    assert rows * per_sample <= EVAL_FLOATS
