"""The machine's float32 matmul rate (GFLOP/s): 2048x2048 and every matmul of one MLP training step.

Usage: python matmul.py BATCH HIDDEN [BATCH HIDDEN ...]; prints one JSON object.
Each shape runs chained matmuls (about 10 GFLOP) inside one tf.function; the best of 7 timings is kept, so the
figure is what the cores can do at that shape, with TensorFlow's default threading (all cores).
"""

import itertools
import json
import sys
import time

import tensorflow as tf


def rate(m, k, n, transpose_a=False, transpose_b=False):
    reps = max(2, round(1e10 / (2 * m * k * n)))  # about 0.1 s per timing
    a = tf.random.normal((k, m) if transpose_a else (m, k))
    b = tf.random.normal((n, k) if transpose_b else (k, n))

    @tf.function
    def chain(a, b):
        acc = tf.zeros((m, n))
        for _ in tf.range(reps):
            acc += tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
        return acc

    chain(a, b).numpy()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        chain(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n * reps / best / 1e9


def step_matmuls(batch, hidden, inputs=784, classes=10):
    """(m, k, n, transpose_a, transpose_b) of the forward and backward matmuls of one training step."""
    dims = [inputs, hidden, hidden, classes]
    shapes = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        shapes.append((batch, d_in, d_out, False, False))  # forward: x @ W
        shapes.append((d_in, batch, d_out, True, False))  # weight gradient: x^T @ dy
        if i > 0:  # input gradient dy @ W^T; the first layer needs none
            shapes.append((batch, d_out, d_in, False, True))
    return shapes


def main():
    args = [int(v) for v in sys.argv[1:]]
    out = {"square_2048": rate(2048, 2048, 2048), "steps": {}}
    for batch, hidden in zip(args[::2], args[1::2], strict=True):
        rows = [(s, rate(*s)) for s in step_matmuls(batch, hidden)]
        flops = sum(2 * m * k * n for (m, k, n, _, _), _ in rows)
        seconds = sum(2 * m * k * n / (r * 1e9) for (m, k, n, _, _), r in rows)
        out["steps"][f"{batch}x{hidden}"] = {
            "shapes": [{"mnk": s[:3], "transposed": s[3] or s[4], "gflops": round(r, 1)} for s, r in rows],
            "step_matmul_flops": flops,  # FLOPs actually needed per step (no input gradient)
            "step_matmul_seconds": seconds,  # lower bound of one step's time at these rates
            "forward_matmul_seconds": sum(
                2 * m * k * n / (r * 1e9) for (m, k, n, ta, tb), r in rows if not ta | tb
            ),
            "gflops": flops / seconds / 1e9,  # the rate the step's matmuls reach together
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
