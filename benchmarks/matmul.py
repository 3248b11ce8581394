"""The machine's float32 matmul rate: `python benchmarks/matmul.py --out FILE` writes {"gflops": ...}.

Four chained 2048x2048 matmuls (69 GFLOP) in one tf.function, TensorFlow's own kernels (oneDNN on
x86) with its default threads (all cores); the best of 8 timings: what the cores can do.
"""

import argparse
import json
import timeit

import tensorflow as tf

N, REPS = 2048, 4


@tf.function
def chain(a, b):
    acc = tf.zeros((N, N))
    for _ in tf.range(REPS):
        acc += tf.matmul(a, b)
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    a, b = (tf.random.normal((N, N)) for _ in range(2))
    best = min(timeit.repeat(lambda: chain(a, b).numpy(), number=1, repeat=8))  # the first one traces
    with open(parser.parse_args().out, "w") as f:
        json.dump({"gflops": round(2 * N**3 * REPS / best / 1e9, 1)}, f)
