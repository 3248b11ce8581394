"""Where an MLP epoch's time goes: the stage's epoch, the same without dropout, its matmuls alone.

`make bench PROFILE=1`: the median of --repeats epochs after a compiling one, on random images: stage
(train.make_steps: XLA, RMSprop, dropout), no_dropout (the gap is drawing dropout's masks), matmuls
(the step's 3 forward and 5 backward matmuls alone, TensorFlow's kernels).
"""

import argparse
import json
import statistics
import timeit

import keras
import numpy as np
import tensorflow as tf

from benchmarks.bench import forward_flops
from stages.train import build_model, make_steps


def stage_epoch(model, x, y):
    optimizer = keras.optimizers.RMSprop()
    optimizer.build(model.trainable_weights)
    return make_steps(model, optimizer, x, y, 255.0, 128, True)[0]


def matmuls_epoch(model, x):
    kernels, images = [w for w in model.trainable_weights if len(w.shape) == 2], tf.constant(x)

    @tf.function
    def epoch(order):
        total = tf.constant(0.0)
        for i in tf.range(len(x) // 128):
            h, inputs = tf.cast(tf.gather(images, order[i * 128 : (i + 1) * 128]), "float32"), []
            for w in kernels:  # forward: h @ W
                inputs.append(h)
                h = tf.matmul(h, w)
            for w, x_in in zip(kernels[::-1], inputs[::-1], strict=True):  # backward: h^T g, g W^T
                total += tf.matmul(x_in, h, transpose_a=True)[0, 0]  # h: the gradient's stand-in
                h = tf.matmul(h, w, transpose_b=True) if w is not kernels[0] else h  # no image gradient
        return total

    return lambda order: float(epoch(order))


def profile(units, x, y, order, repeats):
    """Seconds per epoch of each row for the MLP with `units`-wide hidden layers, and its FLOPs."""
    mlp = {"type": "mlp", "hidden_units": units, "hidden_layers": 2, "activation": "relu"}
    model, plain = (build_model({**mlp, "dropout": d}) for d in (0.2, 0))
    epochs = {"stage": stage_epoch(model, x, y), "no_dropout": stage_epoch(plain, x, y)}
    row = {"hidden_units": units, "samples": len(x), "flops": 3 * len(x) * forward_flops(model)}
    for name, epoch in {**epochs, "matmuls": matmuls_epoch(model, x)}.items():
        times = timeit.repeat(lambda epoch=epoch: epoch(order), number=1, repeat=repeats + 1)
        row[name] = round(statistics.median(times[1:]), 3)  # the first traces and compiles
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-units", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--samples", type=int, default=48_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (args.samples, 784), "uint8"), rng.integers(0, 10, args.samples, "int32")
    order = tf.random.shuffle(tf.range(args.samples), seed=0)
    rows = [profile(units, x, y, order, args.repeats) for units in args.hidden_units]
    with open(args.out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
