"""Stage preprocess: parse the IDX files, split off validation with the seed, save compact arrays."""

import gzip
import zlib
from pathlib import Path

from stages.common import PREPARED, PipelineError, load_params, run, save_split

import numpy as np

RAW = Path("data/raw")
IMAGES, LABELS = 2051, 2049  # IDX magic numbers: unsigned bytes, 3 and 1 dimensions


def read_idx(path, magic):
    """Parse one gzipped IDX file into a uint8 array, checking its header against its size."""
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt deflate stream
        raise PipelineError(f"{path}: unreadable ({e}); re-download with `dvc repro -f download`") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise PipelineError(f"{path}: not an IDX file with magic number {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise PipelineError(f"{path}: header says shape {shape} but holds {len(data) - header} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_pair(prefix, limit):
    x = read_idx(RAW / f"{prefix}-images-idx3-ubyte.gz", IMAGES)[:limit]
    y = read_idx(RAW / f"{prefix}-labels-idx1-ubyte.gz", LABELS)[:limit]
    if len(x) != len(y) or x.shape[1:] != (28, 28):
        raise PipelineError(f"{RAW}/{prefix}-*: {len(x)} images of {x.shape[1:]} but {len(y)} labels")
    return x, y


def split(x, y, fraction, seed):
    """Hold out a seeded random `fraction` for validation; both parts keep their original order."""
    n_val = round(len(x) * fraction)
    if not 0 < n_val < len(x):
        part, fix = ("validation", "raise it") if n_val == 0 else ("training", "lower it")
        raise PipelineError(
            f"params.yaml: preprocess.validation_split {fraction} of {len(x)} images leaves an empty "
            f"{part} split (0 images); {fix}, or change preprocess.train_size"
        )
    val = np.zeros(len(x), bool)
    val[np.random.default_rng(seed).choice(len(x), n_val, replace=False)] = True
    return (x[~val], y[~val]), (x[val], y[val])


def main():
    params = load_params("seed", "preprocess")
    p = params["preprocess"]
    x, y = load_pair("train", p["train_size"])
    (x_train, y_train), (x_val, y_val) = split(x, y, p["validation_split"], params["seed"])
    x_test, y_test = load_pair("t10k", p["test_size"])
    # Pixels stay uint8 on disk (4x smaller); the division happens in float32 where they are used.
    divisor = 255 if p["normalize"] else 1
    for name, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test)):
        save_split(PREPARED / f"{name}.npz", xs, ys, divisor)
    print(f"preprocess: {len(x_train)} train, {len(x_val)} validation, {len(x_test)} test images")


if __name__ == "__main__":
    run(main)
