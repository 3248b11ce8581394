"""Small datasets in MNIST's IDX format, for tests that need the pipeline's data but not the real digits.

Each class is a seven-segment glyph (the digit itself for "mnist", the same glyphs turned a quarter
for "fashion-mnist", so the two datasets differ), drawn with random brightness, noise and shifts of
one pixel; a few labels are wrong on purpose, so that no model scores 100% and the
misclassified figure has something to show. The small test config's MLP (two epochs, 2,400
images) reaches about 70% train and 93% test accuracy on it. Deterministic: seeded NumPy.
"""

import gzip
import hashlib
import struct

import numpy as np

SEGMENTS = {  # (top, left, bottom, right) of each segment of a seven-segment display in a 28x28 frame
    "a": (4, 9, 7, 19),
    "b": (5, 17, 14, 20),
    "c": (14, 17, 23, 20),
    "d": (21, 9, 24, 19),
    "e": (14, 8, 23, 11),
    "f": (5, 8, 14, 11),
    "g": (12, 9, 15, 19),
}
GLYPHS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd")
NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def templates(dataset):
    """(10, 28, 28) float images in [0, 1], one per class."""
    out = np.zeros((10, 28, 28))
    for label, glyph in enumerate(GLYPHS):
        for top, left, bottom, right in (SEGMENTS[s] for s in glyph):
            out[label, top:bottom, left:right] = 1
    return out if dataset == "mnist" else np.rot90(out, axes=(1, 2))


def make(dataset, n, seed):
    """n images (uint8, n x 28 x 28) and labels (uint8) of `dataset`'s synthetic classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    shifts = rng.integers(-1, 2, (n, 2))
    glyphs = templates(dataset)
    images = np.stack(
        [np.roll(glyphs[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts, strict=True)]
    )
    images = images * rng.uniform(0.7, 1.0, (n, 1, 1)) + rng.normal(0, 0.15, images.shape)
    wrong = rng.random(n) < 0.03
    labels[wrong] = (labels[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def idx_bytes(array):
    """An unsigned-byte array as an IDX payload: magic (0, 0, 8, ndim), each dimension, the bytes."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mirror(directory, dataset, n_train=4000, n_test=1200, seed=0):
    """The four .gz files in `directory`, and SHA256SUMS of their payloads (sha256sum format)."""
    directory.mkdir(parents=True, exist_ok=True)
    (x, y), (x_test, y_test) = make(dataset, n_train, seed), make(dataset, n_test, seed + 1)
    lines = []
    for name, array in zip(NAMES, (x, y, x_test, y_test), strict=True):
        payload = idx_bytes(array)
        (directory / f"{name}.gz").write_bytes(gzip.compress(payload, compresslevel=1, mtime=0))
        lines.append(f"{hashlib.sha256(payload).hexdigest()}  {name}\n")
    (directory / "SHA256SUMS").write_text("".join(lines))
    return directory
