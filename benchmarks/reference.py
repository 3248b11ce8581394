"""The plain Keras script the train stage is measured against: deliberately naive, tutorial style.

`python benchmarks/reference.py --out FILE` where preprocess has run: params.yaml's MLP trained with
fit, validation_split and ModelCheckpoint, on any Keras backend. Writes FILE: loop and epoch seconds,
the weight count (bench.py checks it against the stage's model), the best epoch's test accuracy.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import keras
import numpy as np
import yaml

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
params = yaml.safe_load(Path("params.yaml").read_text())
m, t = params["model"], params["train"]
keras.utils.set_random_seed(params["seed"])
keras.mixed_precision.set_global_policy(t["precision"])

# The prepared train and validation splits, concatenated so that validation_split=0.2 holds out
# exactly the validation images (Keras takes the last 20%, before any shuffling).
train, val, test = (np.load(f"data/prepared/{name}.npz") for name in ("train", "val", "test"))
scale = float(train["divisor"])  # 255, or 1 for raw pixels
x = np.concatenate([train["x"], val["x"]]).reshape(-1, 784).astype("float32") / scale
y = np.concatenate([train["y"], val["y"]])
x_test = test["x"].reshape(-1, 784).astype("float32") / scale

layers = [keras.Input((784,))]
for _ in range(m["hidden_layers"]):
    layers.append(keras.layers.Dense(m["hidden_units"], activation=m["activation"]))
    if m["dropout"]:
        layers.append(keras.layers.Dropout(m["dropout"]))
layers.append(keras.layers.Dense(10, activation="softmax", dtype="float32"))
model = keras.Sequential(layers)
optimizer = keras.optimizers.get(t["optimizer"])
if t["learning_rate"]:
    optimizer.learning_rate = t["learning_rate"]
model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class EpochTimes(keras.callbacks.Callback):  # the only addition: the benchmark needs epoch times
    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter())


timer = EpochTimes()
checkpoint = keras.callbacks.ModelCheckpoint("reference.keras", monitor="val_loss", save_best_only=True)
fit = {"batch_size": t["batch_size"], "epochs": t["epochs"], "callbacks": [checkpoint, timer], "verbose": 0}
model.fit(x, y, validation_split=0.2, **fit)
test_loss, test_accuracy = keras.models.load_model("reference.keras").evaluate(x_test, test["y"], verbose=0)
seconds = np.diff(timer.times).tolist()  # each epoch: training, validation, checkpoint
result = {  # named as the train stage's metrics
    "train_seconds": round(sum(seconds), 2),
    "epoch_seconds": round(statistics.median(seconds[1:] or seconds), 3),  # after the compiling one
    "params": model.count_params(),
    "test_accuracy": round(test_accuracy, 4),
}
Path(args.out).write_text(json.dumps(result))
