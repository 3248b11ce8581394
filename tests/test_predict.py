"""stages/predict.py: MNIST-style preparation of made images with known answers, and the command itself."""

import json
import sys

from stages.common import PipelineError, read_model, save_split

import numpy as np
import pytest
from conftest import copy_project, run, run_stage, set_params
from PIL import Image

from tools.predict import load, prepare

RING, BAR = 0, 1  # the tiny model below learns a ring as a 0 and an upright bar as a 1


def canvas(height, width, background=0):
    return np.full((height, width), background, "uint8")


def ring(size=101, centre=(50, 50), radius=30, width=8):
    """Light-on-dark ring: a made 0."""
    ys, xs = np.indices((size, size))
    r = np.hypot(ys - centre[0], xs - centre[1])
    return np.where(abs(r - radius) <= width / 2, 255, 0).astype("uint8")


def bar(height=120, width=90, thickness=14, left=30):
    """Light-on-dark upright bar: a made 1."""
    a = canvas(height, width)
    a[10:-10, left : left + thickness] = 255
    return a


def centre_of_mass(a):
    ys, xs = np.indices(a.shape)
    return (ys * a).sum() / a.sum(), (xs * a).sum() / a.sum()


def extent(a):
    """(height, width) of the box holding the non-zero pixels."""
    rows, cols = np.nonzero(a)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


# --- preparation, on arrays with known answers ------------------------------------------------------


def test_centred_blob_stays_centred():
    digit = prepare(ring())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert extent(digit) == (20, 20)
    assert centre_of_mass(digit) == pytest.approx((14, 14), abs=0.5)  # MNIST's own centre


def test_offset_blob_ends_up_centred():
    corner = ring(size=200, centre=(40, 150), radius=30)
    assert np.array_equal(prepare(corner), prepare(ring()))


def test_centred_by_mass_not_by_box():
    # A thick L, 160 px square: its centre of mass is far from the centre of its box.
    a = canvas(200, 200)
    a[20:150, 20:60] = 255
    a[150:180, 20:180] = 255
    box_minus_mass = (np.array([99.5, 99.5]) - centre_of_mass(a)) * 20 / 160  # in 20 px units: (-3.0, 3.8)
    digit = prepare(a)
    rows, cols = np.nonzero(digit)
    assert extent(digit) == (20, 20)
    assert centre_of_mass(digit) == pytest.approx((14, 14), abs=0.5)
    box = np.array([rows.min() + rows.max(), cols.min() + cols.max()]) / 2
    assert box - 14 == pytest.approx(box_minus_mass, abs=0.6)


def test_dark_on_light_equals_light_on_dark():
    a = ring()
    a[30:40, 30:40] = 128  # some grey, so that inversion is not just a swap of two values
    assert np.array_equal(prepare(255 - a), prepare(a))


@pytest.mark.parametrize(("ink", "expected"), [((300, 600), (10, 20)), ((600, 150), (20, 5))])
def test_large_image_ink_scaled_to_20px(ink, expected):
    a = canvas(1200, 900)
    a[100 : 100 + ink[0], 200 : 200 + ink[1]] = 255
    assert extent(prepare(a)) == expected


def test_faint_grey_paper_and_thin_strokes():
    # Grey paper (a photo) becomes black; a faint thin stroke becomes full-bright ink, as in MNIST.
    a = canvas(400, 400, background=180)
    a[50:350, 195:198] = 140
    digit = prepare(a)
    assert digit.max() == 255 and extent(digit)[0] == 20
    assert (digit[:, :10] == 0).all() and (digit[:, -10:] == 0).all()


def test_blank_image_has_no_ink():
    with pytest.raises(PipelineError, match="no ink"):
        prepare(canvas(50, 50, background=200))


@pytest.mark.parametrize("kind", ["rgb.png", "rgba.png", "palette.png", "grey16.png", "grey.jpg"])
def test_colour_16_bit_and_jpeg_files(tmp_path, kind):
    dark_on_light = 255 - ring()
    expected = prepare(dark_on_light)
    path = tmp_path / kind
    if kind == "rgba.png":  # black ink on a transparent background whose hidden colour is black too
        rgba = np.zeros((*dark_on_light.shape, 4), "uint8")
        rgba[..., 3] = 255 - dark_on_light
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "grey16.png":
        Image.fromarray(dark_on_light.astype("uint16") * 257).save(path)
    elif kind == "grey.jpg":
        Image.fromarray(dark_on_light).save(path, quality=90)
    else:
        Image.fromarray(dark_on_light).convert({"rgb.png": "RGB", "palette.png": "P"}[kind]).save(path)
    digit = load(path)
    if kind.endswith(".png"):
        assert np.array_equal(digit, expected)
    else:  # JPEG is lossy: the same digit, give or take its compression noise
        assert np.abs(digit.astype(int) - expected).mean() < 8
        assert centre_of_mass(digit) == pytest.approx(centre_of_mass(expected), abs=0.3)


# --- the command, with a tiny model trained here -----------------------------------------------------


def made_digits(rng, n):
    """n rings and n bars of random size, position, stroke and polarity, prepared like user images."""
    x, y = [], []
    for _ in range(n):
        size = int(rng.integers(60, 200))
        r = int(rng.integers(size // 6, size // 3))
        c = (int(rng.integers(r + 5, size - r - 5)), int(rng.integers(r + 5, size - r - 5)))
        x.append(prepare(ring(size, c, r, width=int(rng.integers(3, 12)))))
        h, t = int(rng.integers(60, 200)), int(rng.integers(4, 20))
        x.append(prepare(bar(h, h, t, left=int(rng.integers(0, h - t)))))
        y += [RING, BAR]
    return np.stack(x), np.array(y)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A project copy with data/model.keras (784 -> 10 softmax fitted on made digits), a test split,
    the same model behind a (28, 28, 1) input, and two images with the model's answers on them.
    """
    import keras

    work = copy_project(tmp_path_factory.mktemp("predict"), overrides=None, git=False)
    keras.utils.set_random_seed(0)
    x, y = made_digits(np.random.default_rng(0), 100)
    save_split(work / "data/prepared/test.npz", x, y, 255)
    dense = keras.layers.Dense(10, activation="softmax")
    model = keras.Sequential([keras.Input((784,)), dense])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.reshape(len(x), -1) / 255, y, epochs=30, verbose=0)
    model.save(work / "data/model.keras")
    # The same weights behind an image-shaped input, as a CNN has: predict must reshape to it.
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Reshape((784,)), dense]).save(
        work / "image_input.keras"
    )
    Image.fromarray(255 - ring(300, (140, 160), 100, width=25)).save(work / "ring.png")
    Image.fromarray(bar(250, 200, 30, left=60)).convert("RGB").save(work / "bar.jpg")
    good = np.stack([load(work / "ring.png"), load(work / "bar.jpg")]).reshape(2, -1) / 255
    np.save(work / "expected.npy", model.predict(good, verbose=0))
    return work


@pytest.fixture(scope="module")
def images(tiny):
    """The two good images among five bad files."""
    (tiny / "empty.png").write_bytes(b"")
    (tiny / "text.png").write_text("not an image, just text with a .png name\n")
    (tiny / "truncated.png").write_bytes((tiny / "ring.png").read_bytes()[:300])
    Image.fromarray(canvas(40, 40, background=255)).save(tiny / "blank.png")
    return ["ring.png", "missing.png", "empty.png", "bar.jpg", "text.png", "truncated.png", "blank.png"]


def predict(work, *args, check=False):
    return run([sys.executable, "-m", "tools.predict", *args], work, check=check)


def test_json_output_and_bad_files(tiny, images):
    proc = predict(tiny, "--json", *images)
    assert proc.returncode == 1
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in results] == ["ring.png", "bar.jpg"]  # the good files, still classified
    assert [r["class"] for r in results] == [RING, BAR]
    for r in results:
        assert set(r) == {"file", "class", "name", "confidence", "top3"}
        assert r["name"] == str(r["class"])
        top3 = r["top3"]
        assert [set(t) for t in top3] == [{"class", "name", "confidence"}] * 3
        assert top3[0] == {k: r[k] for k in ("class", "name", "confidence")}
        confidences = [t["confidence"] for t in top3]
        assert confidences == sorted(confidences, reverse=True) and sum(confidences) <= 1 + 1e-6
    expected = np.load(tiny / "expected.npy")  # the model's answers, computed in this process
    assert [r["confidence"] for r in results] == pytest.approx(expected.max(axis=1).tolist(), abs=1e-5)
    assert min(r["confidence"] for r in results) > 0.5
    # TensorFlow's start-up lines ("oneDNN custom operations are on") cannot be silenced; skip them.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert "Traceback" not in proc.stderr
    bad = ["missing.png", "empty.png", "text.png", "truncated.png", "blank.png"]
    assert [line.split(":")[1].strip() for line in errors] == bad, proc.stderr
    assert "no such file" in errors[0] and "not a PNG or JPEG" in errors[1] and "not a PNG" in errors[2]
    assert "unreadable" in errors[3] and "no ink" in errors[4]


def test_image_shaped_model_and_text_output(tiny, images, tmp_path):
    work = copy_project(tmp_path / "cnn", overrides={"data.dataset": "fashion-mnist"}, git=False)
    (work / "data/prepared").mkdir(parents=True)
    (work / "data/prepared/test.npz").write_bytes((tiny / "data/prepared/test.npz").read_bytes())
    (work / "data/model.keras").write_bytes((tiny / "image_input.keras").read_bytes())
    (work / "ring.png").write_bytes((tiny / "ring.png").read_bytes())
    proc = predict(work, "ring.png", check=True)
    line = proc.stdout.strip()
    confidence = f"{np.load(tiny / 'expected.npy')[0].max():.1%}"  # the flat model's answer
    assert line.startswith(f"ring.png: 0 T-shirt/top ({confidence}); top 3: 0 T-shirt/top {confidence}, ")
    assert "error:" not in proc.stderr and "Traceback" not in proc.stderr


def test_only_bad_files(tiny):
    proc = predict(tiny, "missing.png")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "error: missing.png: no such file\n"


def test_missing_model_says_to_run_dvc_repro(tmp_path, images, tiny):
    work = copy_project(tmp_path / "nomodel", overrides=None, git=False)
    proc = predict(work, str(tiny / "ring.png"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "run `dvc repro" in proc.stderr


def test_bad_dataset_param(tmp_path, tiny):
    work = copy_project(tmp_path / "badparam", overrides=None, git=False)
    set_params(work, {"data.dataset": "fashion"})
    proc = predict(work, str(tiny / "ring.png"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: params.yaml: data.dataset must be one of mnist, fashion-mnist")


# --- the target of the issue: real test digits, rendered as a person would draw them -----------------


@pytest.mark.slow
def test_rendered_test_digits_match_the_arrays(tmp_path, mirror):

    work = copy_project(tmp_path / "project", overrides={"train.epochs": 3}, git=False)
    run_stage("download", work, env={"MNIST_MIRROR": mirror})
    for stage in ("preprocess", "train"):
        run_stage(stage, work, env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    with np.load(work / "data/prepared/test.npz") as f:
        x, y, divisor = f["x"], f["y"], float(f["divisor"])
    pick = np.random.default_rng(0).choice(len(x), 300, replace=False)
    model = read_model(work / "data/model.keras")
    from_arrays = model.predict(x[pick].reshape(300, -1) / divisor, verbose=0).argmax(axis=1)
    files = []
    for i in pick:  # dark ink on white paper, 200x200 px, as a scan or a drawing program gives
        files.append(f"digits/{i}.png")
        (work / "digits").mkdir(exist_ok=True)
        Image.fromarray(255 - x[i]).resize((200, 200), Image.Resampling.BICUBIC).save(work / files[-1])
    out = predict(work, "--json", *files, check=True).stdout
    from_files = np.array([json.loads(line)["class"] for line in out.splitlines()])
    acc_arrays, acc_files = (from_arrays == y[pick]).mean(), (from_files == y[pick]).mean()
    print(f"accuracy on 300 test digits: arrays {acc_arrays:.4f}, rendered PNGs {acc_files:.4f}")
    print(f"same prediction on {(from_files == from_arrays).mean():.4f} of them")
    assert abs(acc_files - acc_arrays) <= 0.01
