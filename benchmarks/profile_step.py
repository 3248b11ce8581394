"""Where the time of one compiled training epoch goes: the stage's epoch, then the loop with parts taken out.

`python benchmarks/profile_step.py [--hidden-units 2048] [--repeats 3]`; prints one JSON object, and
`make bench` puts it in benchmarks/results.md. Random uint8 images of MNIST's size stand in for the data
(timing does not depend on the pixels). Each row is the median over --repeats of one epoch after a
compiling one, all in one process with TensorFlow's default threads:
  stage        train.make_steps: the epoch as the train stage runs it (XLA, RMSprop, dropout);
  gradients    the same loop without the optimizer's update (the gradients are summed so that they stay);
  forward      the forward pass and loss only;
  no_dropout   the same with dropout off (training=False): the gap to `forward` is drawing the masks;
  dots         the step's 3 forward and 5 backward matmuls alone, TensorFlow's own (oneDNN) kernels.
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from stages.train import build_model, make_steps


def loop(images, labels, batch, body, jit_compile):
    """One compiled epoch calling body(x, y) -> scalar per full batch of a permutation."""
    full = len(images) // batch

    @tf.function(jit_compile=jit_compile)
    def epoch(order):
        batches = tf.reshape(order[: full * batch], (full, batch))
        total = tf.constant(0.0)
        for i in tf.range(full):
            idx = batches[i]
            total += body(tf.cast(tf.gather(images, idx), "float32") / 255.0, tf.gather(labels, idx))
        return total

    return epoch


def epochs(model, x, y, batch):
    """name -> epoch(order), for each row of the profile."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    weights = model.trainable_weights
    images, labels = tf.constant(x), tf.constant(y)

    def gradients(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        return loss + tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, weights)])

    kernels = [w for w in weights if len(w.shape) == 2]  # the Dense layers' matrices

    def dots(xb, _):
        hs, h = [], xb
        for w in kernels:  # forward: x @ W per layer
            hs.append(h)
            h = tf.matmul(h, w)
        g, total = h, tf.constant(0.0)
        for w, h in zip(kernels[::-1], hs[::-1], strict=True):  # backward: dW = h^T g, then g W^T
            total += tf.matmul(h, g, transpose_a=True)[0, 0]
            if w is not kernels[0]:  # the input's gradient is not needed
                g = tf.matmul(g, w, transpose_b=True)
        return total

    optimizer = keras.optimizers.RMSprop()
    optimizer.build(weights)
    stage, _ = make_steps(model, optimizer, x, y, 255.0, batch, True)
    return {
        "stage": lambda order: stage(order)[0],
        "gradients": loop(images, labels, batch, gradients, True),
        "forward": loop(images, labels, batch, lambda xb, yb: loss_fn(yb, model(xb, training=True)), True),
        "no_dropout": loop(
            images, labels, batch, lambda xb, yb: loss_fn(yb, model(xb, training=False)), True
        ),
        "dots": loop(images, labels, batch, dots, False),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-units", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=48_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.samples, 784), dtype=np.uint8)
    y = rng.integers(0, 10, args.samples).astype("int32")
    model = build_model(
        {
            "type": "mlp",
            "hidden_units": args.hidden_units,
            "hidden_layers": 2,
            "activation": "relu",
            "dropout": 0.2,
        }
    )
    rows = {}
    for name, epoch in epochs(model, x, y, args.batch_size).items():
        order = tf.random.shuffle(tf.range(args.samples), seed=0)
        float(epoch(order))  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            float(epoch(order))
            times.append(time.perf_counter() - start)
        rows[name] = round(statistics.median(times), 3)
    print(
        json.dumps(
            {
                "hidden_units": args.hidden_units,
                "batch_size": args.batch_size,
                "samples": args.samples,
                "seconds": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
