"""The machine's 2048x2048 matmul rate (GFLOP/s) in float32 and in bfloat16; prints one JSON object.

Chained matmuls (about 10 GFLOP) run inside one tf.function (no XLA: TensorFlow's own kernels, oneDNN
on x86, which uses AMX for bfloat16 where the CPU has it); the best of 7 timings is kept, so the
figure is what the cores can do, with TensorFlow's default threading (all cores).
"""

import json
import time

import tensorflow as tf


def rate(n=2048, dtype="float32"):
    reps = max(2, round(1e10 / (2 * n**3)))  # about 0.1 s per timing
    a, b = (tf.random.normal((n, n), dtype=dtype) for _ in range(2))

    @tf.function
    def chain(a, b):
        acc = tf.zeros((n, n), dtype)
        for _ in tf.range(reps):
            acc += tf.matmul(a, b)
        return acc

    chain(a, b).numpy()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return round(2 * n**3 * reps / best / 1e9, 1)


if __name__ == "__main__":
    print(json.dumps({"square_2048": rate(), "square_2048_bfloat16": rate(dtype="bfloat16")}))
