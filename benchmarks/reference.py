"""The plain Keras script the train stage is measured against: deliberately naive, tutorial style.

Usage (from a directory holding data/prepared/): python reference.py HIDDEN_UNITS BATCH_SIZE EPOCHS
Prints one JSON line: per-epoch wall times, final validation accuracy, test accuracy of the best epoch.
"""

import json
import sys
import time

import keras
import numpy as np

hidden, batch_size, epochs = (int(v) for v in sys.argv[1:4])
keras.utils.set_random_seed(0)

# The prepared train and validation splits, concatenated so that validation_split=0.2 holds out
# exactly the validation images (Keras takes the last 20%, before any shuffling).
train, val, test = (np.load(f"data/prepared/{name}.npz") for name in ("train", "val", "test"))
x = np.concatenate([train["x"], val["x"]]).reshape(-1, 784).astype("float32") / 255
y = np.concatenate([train["y"], val["y"]])
x_test = test["x"].reshape(-1, 784).astype("float32") / 255

model = keras.Sequential(
    [
        keras.Input((784,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class EpochTimes(keras.callbacks.Callback):  # the only addition: the benchmark needs epoch times
    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter())


timer = EpochTimes()
checkpoint = keras.callbacks.ModelCheckpoint("reference.keras", monitor="val_loss", save_best_only=True)
history = model.fit(
    x,
    y,
    batch_size=batch_size,
    epochs=epochs,
    validation_split=0.2,
    callbacks=[checkpoint, timer],
    verbose=0,
)
best = keras.models.load_model("reference.keras")
test_loss, test_accuracy = best.evaluate(x_test, test["y"], verbose=0)
result = {
    "epoch_seconds": np.diff(timer.times).round(3).tolist(),
    "val_accuracy": history.history["val_accuracy"][-1],
    "test_accuracy": test_accuracy,
}
print(json.dumps(result))
