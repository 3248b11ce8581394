"""Stage preprocess: the IDX parser, the seeded validation split, and the arrays it writes."""

import gzip
import shutil
import time

from stages.common import PipelineError

import numpy as np
import pytest
from conftest import SMALL, run_stage, set_params

from stages.preprocess import IMAGES, LABELS, read_idx, split


def idx_bytes(array, magic):
    """The IDX encoding of a uint8 array: magic, one big-endian uint32 per dimension, the bytes."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, payload, level=9):
    path.write_bytes(gzip.compress(payload, compresslevel=level))
    return path


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)


# --- read_idx -------------------------------------------------------------------------------------


def test_read_idx_parses_images(tmp_path, images):
    path = write_gz(tmp_path / "images.gz", idx_bytes(images, IMAGES))
    parsed = read_idx(path, IMAGES)
    assert parsed.dtype == np.uint8
    assert parsed.shape == (5, 28, 28)
    np.testing.assert_array_equal(parsed, images)


def test_read_idx_parses_labels(tmp_path):
    labels = np.array([7, 2, 1, 0, 4, 1, 9], np.uint8)
    path = write_gz(tmp_path / "labels.gz", idx_bytes(labels, LABELS))
    parsed = read_idx(path, LABELS)
    assert parsed.dtype == np.uint8
    assert parsed.shape == (7,)
    np.testing.assert_array_equal(parsed, labels)


def test_read_idx_accepts_any_gzip_level(tmp_path, images):
    path = write_gz(tmp_path / "images.gz", idx_bytes(images, IMAGES), level=1)
    np.testing.assert_array_equal(read_idx(path, IMAGES), images)


def test_read_idx_rejects_wrong_magic(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = write_gz(tmp_path / "labels.gz", idx_bytes(labels, LABELS))
    with pytest.raises(PipelineError, match="magic number 2051") as e:
        read_idx(path, IMAGES)  # a labels file where images were expected
    assert str(path) in str(e.value)


def test_read_idx_rejects_garbage(tmp_path):
    path = write_gz(tmp_path / "images.gz", b"<html>not found</html>" * 10)
    with pytest.raises(PipelineError, match="not an IDX file") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


def test_read_idx_rejects_payload_shorter_than_header(tmp_path):
    path = write_gz(tmp_path / "images.gz", IMAGES.to_bytes(4, "big") + b"\0\0")
    with pytest.raises(PipelineError, match="not an IDX file") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("delta", [-1, +1, -28 * 28])
def test_read_idx_rejects_header_size_mismatch(tmp_path, images, delta):
    payload = idx_bytes(images, IMAGES)
    payload = payload[:delta] if delta < 0 else payload + b"\0" * delta
    path = write_gz(tmp_path / "images.gz", payload)
    with pytest.raises(PipelineError, match=r"header says shape \(5, 28, 28\)") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)
    assert f"holds {5 * 28 * 28 + delta} bytes" in str(e.value)


def test_read_idx_rejects_truncated_gzip(tmp_path, images):
    compressed = gzip.compress(idx_bytes(images, IMAGES))
    path = tmp_path / "images.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(PipelineError, match="unreadable") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c: c[:10] + b"\xff" + c[11:], id="invalid-deflate-block"),  # zlib.error
        pytest.param(lambda c: c[:-8] + bytes(b ^ 0xFF for b in c[-8:-4]) + c[-4:], id="crc-mismatch"),
    ],
)
def test_read_idx_rejects_corrupt_gzip(tmp_path, images, damage):
    path = tmp_path / "images.gz"
    path.write_bytes(damage(gzip.compress(idx_bytes(images, IMAGES))))
    with pytest.raises(PipelineError, match="unreadable") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


def test_read_idx_rejects_plain_uncompressed_file(tmp_path, images):
    path = tmp_path / "images.gz"
    path.write_bytes(idx_bytes(images, IMAGES))  # forgot to gzip
    with pytest.raises(PipelineError, match="unreadable") as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


def test_read_idx_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.gz"
    with pytest.raises(PipelineError) as e:
        read_idx(path, IMAGES)
    assert str(path) in str(e.value)


# --- split ----------------------------------------------------------------------------------------


def dataset(n=1000):
    x = np.arange(n, dtype=np.int64)[:, None].repeat(3, axis=1)  # row i identifies image i
    y = (np.arange(n) % 10).astype(np.uint8)
    return x, y


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(1000, 0.2, 200), (3000, 0.2, 600), (10, 0.5, 5)])
def test_split_sizes(n, fraction, n_val):
    x, y = dataset(n)
    (x_train, y_train), (x_val, y_val) = split(x, y, fraction, seed=0)
    assert len(x_val) == len(y_val) == n_val
    assert len(x_train) == len(y_train) == n - n_val


def test_split_is_disjoint_and_complete_and_keeps_pairs():
    x, y = dataset()
    (x_train, y_train), (x_val, y_val) = split(x, y, 0.2, seed=0)
    train_ids, val_ids = set(x_train[:, 0]), set(x_val[:, 0])
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(len(x)))
    # images keep their labels, and both parts keep the original order
    np.testing.assert_array_equal(y_train, x_train[:, 0] % 10)
    np.testing.assert_array_equal(y_val, x_val[:, 0] % 10)
    assert np.all(np.diff(x_train[:, 0]) > 0)
    assert np.all(np.diff(x_val[:, 0]) > 0)


def test_split_is_random_not_the_tail():
    x, y = dataset()
    _, (x_val, _) = split(x, y, 0.2, seed=0)
    assert not np.array_equal(x_val[:, 0], np.arange(800, 1000))
    assert x_val[:, 0].min() < 100 and x_val[:, 0].max() > 900  # spread over the whole range


def test_split_same_seed_same_split():
    x, y = dataset()
    (a_train, _), (a_val, _) = split(x, y, 0.2, seed=7)
    (b_train, _), (b_val, _) = split(x, y, 0.2, seed=7)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_val, b_val)


def test_split_different_seed_different_split():
    x, y = dataset()
    _, (a_val, _) = split(x, y, 0.2, seed=0)
    _, (b_val, _) = split(x, y, 0.2, seed=1)
    assert set(a_val[:, 0]) != set(b_val[:, 0])


@pytest.mark.parametrize("fraction", [0.0001, 0.9999])
def test_split_refuses_an_empty_part(fraction):
    x, y = dataset(100)
    with pytest.raises(PipelineError, match=r"empty (validation|training) split"):
        split(x, y, fraction, seed=0)


# --- the stage's outputs --------------------------------------------------------------------------


def load(workdir, name):
    with np.load(workdir / "data" / "prepared" / f"{name}.npz", allow_pickle=False) as f:
        return f["x"], f["y"], float(f["divisor"])


@pytest.mark.parametrize(("normalize", "divisor"), [(True, 255.0), (False, 1.0)])
def test_stage_writes_uint8_and_divisor(project, raw_data, normalize, divisor):
    shutil.copytree(raw_data, project / "data" / "raw")
    set_params(project, {"preprocess.normalize": normalize})
    out = run_stage("preprocess", project).stdout
    n_train, n_test = SMALL["preprocess.train_size"], SMALL["preprocess.test_size"]
    n_val = round(n_train * 0.2)
    assert f"{n_train - n_val} train, {n_val} validation, {n_test} test" in out
    sizes = {"train": n_train - n_val, "val": n_val, "test": n_test}
    for name, size in sizes.items():
        x, y, d = load(project, name)
        assert x.dtype == np.uint8 and y.dtype == np.uint8, name
        assert x.shape == (size, 28, 28) and y.shape == (size,), name
        assert d == divisor, name
        assert x.max() == 255 and x.min() == 0, name  # raw pixels on disk whatever the divisor
        assert set(np.unique(y)) == set(range(10)), name


def test_stage_split_partitions_the_first_images(prepared, raw_data):
    """train + val are exactly the first train_size images (as a multiset), test the first test_size."""
    n_train, n_test = SMALL["preprocess.train_size"], SMALL["preprocess.test_size"]
    first = read_idx(raw_data / "train-images-idx3-ubyte.gz", IMAGES)[:n_train]
    first_labels = read_idx(raw_data / "train-labels-idx1-ubyte.gz", LABELS)[:n_train]
    x_train, y_train, _ = load(prepared, "train")
    x_val, y_val, _ = load(prepared, "val")

    def rows(x, y):
        return sorted(xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y, strict=True))

    assert rows(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])) == rows(
        first, first_labels
    )
    assert not {xi.tobytes() for xi in x_train} & {xi.tobytes() for xi in x_val}
    x_test, y_test, _ = load(prepared, "test")
    np.testing.assert_array_equal(x_test, read_idx(raw_data / "t10k-images-idx3-ubyte.gz", IMAGES)[:n_test])
    np.testing.assert_array_equal(y_test, read_idx(raw_data / "t10k-labels-idx1-ubyte.gz", LABELS)[:n_test])


def test_stage_seed_changes_the_split(prepared):
    x_val0, _, _ = load(prepared, "val")
    before = {p.name: p.read_bytes() for p in (prepared / "data/prepared").glob("*.npz")}
    time.sleep(2)  # zip timestamps have a resolution of two seconds
    run_stage("preprocess", prepared)
    # Same seed: the same split, byte for byte (so DVC keeps the hashes and does not retrain).
    assert {p.name: p.read_bytes() for p in (prepared / "data/prepared").glob("*.npz")} == before
    np.testing.assert_array_equal(load(prepared, "val")[0], x_val0)
    set_params(prepared, {"seed": 1})
    run_stage("preprocess", prepared)
    x_val1, _, _ = load(prepared, "val")
    assert x_val1.shape == x_val0.shape
    assert not np.array_equal(x_val1, x_val0)


def test_stage_missing_raw_file_fails_in_one_line(prepared):
    (prepared / "data" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    proc = run_stage("preprocess", prepared, check=False)
    assert proc.returncode != 0
    assert "t10k-labels-idx1-ubyte.gz" in proc.stderr
    assert "Traceback" not in proc.stderr
