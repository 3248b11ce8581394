"""The plain Keras script the train stage is measured against: deliberately naive, tutorial style.

Usage: python reference.py [--hidden-units 512 --batch-size 128 --epochs 10 ...] [--dataset data/prepared]
`--model cnn`: the Keras example "Simple MNIST convnet" instead (--filters 32,64 --padding ...).
`--dataset` is a directory of prepared train/val/test .npz files (the preprocess stage's output).
Writes --out (JSON): per-epoch wall times, final validation accuracy, test accuracy of the best epoch.
"""

import argparse
import json
import time

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
parser.add_argument("--hidden-units", type=int, default=512)
parser.add_argument("--hidden-layers", type=int, default=2)
parser.add_argument("--activation", default="relu")
parser.add_argument("--dropout", type=float, default=0.2)
parser.add_argument("--filters", type=lambda s: [int(f) for f in s.split(",")], default=[32, 64])
parser.add_argument("--kernel-size", type=int, default=3)
parser.add_argument("--padding", default="valid")
parser.add_argument("--dense-units", type=int, default=0)
parser.add_argument("--optimizer", default="rmsprop")
parser.add_argument("--learning-rate", type=float)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--no-normalize", action="store_true", help="raw 0..255 pixels")
parser.add_argument("--precision", default="float32", help="Keras dtype policy, e.g. mixed_bfloat16")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--dataset", default="data/prepared")
parser.add_argument("--out", default="reference.json")
args = parser.parse_args()
keras.utils.set_random_seed(args.seed)
keras.mixed_precision.set_global_policy(args.precision)

# The prepared train and validation splits, concatenated so that validation_split=0.2 holds out
# exactly the validation images (Keras takes the last 20%, before any shuffling).
train, val, test = (np.load(f"{args.dataset}/{name}.npz") for name in ("train", "val", "test"))
scale = 1 if args.no_normalize else 255
shape = (28, 28, 1) if args.model == "cnn" else (784,)
x = np.concatenate([train["x"], val["x"]]).reshape(-1, *shape).astype("float32") / scale
y = np.concatenate([train["y"], val["y"]])
x_test = test["x"].reshape(-1, *shape).astype("float32") / scale

layers = [keras.Input(shape)]
if args.model == "cnn":
    for filters in args.filters:
        layers.append(
            keras.layers.Conv2D(filters, args.kernel_size, activation=args.activation, padding=args.padding)
        )
        layers.append(keras.layers.MaxPooling2D(2))
    layers.append(keras.layers.Flatten())
    if args.dense_units:
        layers.append(keras.layers.Dense(args.dense_units, activation=args.activation))
    if args.dropout:
        layers.append(keras.layers.Dropout(args.dropout))
for _ in range(args.hidden_layers if args.model == "mlp" else 0):
    layers.append(keras.layers.Dense(args.hidden_units, activation=args.activation))
    if args.dropout:
        layers.append(keras.layers.Dropout(args.dropout))
layers.append(keras.layers.Dense(10, activation="softmax", dtype="float32"))
model = keras.Sequential(layers)
optimizer = keras.optimizers.get(args.optimizer)
if args.learning_rate:
    optimizer.learning_rate = args.learning_rate
model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


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
    batch_size=args.batch_size,
    epochs=args.epochs,
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
with open(args.out, "w") as f:
    json.dump(result, f)
