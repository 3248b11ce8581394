"""Stage plot: figures of the run that a person would rather look at than read."""

import warnings
from pathlib import Path

from stages.common import CLASS_NAMES, PipelineError, atomic_path, load_params, load_split, require, run

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

OUT = Path("metrics/figures")
HISTORY = Path("metrics/train/plots/metrics")  # DVCLive: {train,eval}/{loss,accuracy}.tsv


# The tables are read with NumPy: importing pandas took longer than drawing a figure.
def read_history(split, metric):
    """(epochs from 1, values) of DVCLive's step/value table."""
    table = np.loadtxt(
        require(HISTORY / split / f"{metric}.tsv", "train"), delimiter="\t", skiprows=1, ndmin=2
    )
    return table[:, 0] + 1, table[:, 1]


def read_evaluation(name, **kwargs):
    """A table of evaluate's, its header row skipped; no rows (nothing misclassified) is no error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "loadtxt: input contained no data")
        return np.loadtxt(
            require(Path("metrics") / name, "evaluate"), delimiter=",", skiprows=1, ndmin=2, **kwargs
        )


def learning_curves(path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, label in (("train", "train"), ("eval", "validation")):
            ax.plot(*read_history(split, metric), marker="o", label=label)
        ax.set(title=metric, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    save(fig, path)


def confusion_heatmap(path, names):
    matrix = read_evaluation("confusion_matrix.csv", dtype=int)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(matrix.max(), 2)))
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(
                j,
                i,
                n,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if n > matrix.max() / 3 else "black",
            )
    ax.set(
        xlabel="predicted",
        ylabel="true",
        xticks=range(len(matrix)),
        yticks=range(len(matrix)),
        xticklabels=names,
        yticklabels=names,
        title=f"test confusion matrix ({np.trace(matrix)} of {matrix.sum()} right)",
    )
    margins = dict(left=0.1, right=0.98, bottom=0.1, top=0.94)
    if max(map(len, names)) > 2:  # names, not digits: slanted so that they do not overlap
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
        margins.update(left=0.18, bottom=0.2)
    fig.subplots_adjust(**margins)
    fig.colorbar(im, ax=ax)
    save(fig, path)


def digit_grid(path, images, titles, suptitle):
    """The digits in a square-ish grid, each with its title: one image of all the tiles on one axes
    (an axes per digit took most of the stage's time), each tile scaled to its own range as imshow does."""
    n, (h, w) = len(images), images.shape[1:]
    cols = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, int(np.ceil(n / cols)))
    pitch_x, pitch_y = w + 4, h + 8  # gaps between tiles; the title goes in the one above each
    canvas = np.full((rows * pitch_y, cols * pitch_x), np.nan)  # NaN: drawn as the white background
    ax_height = 1.4 * cols * canvas.shape[0] / canvas.shape[1]  # inches, for square pixels
    fig = plt.figure(figsize=(1.4 * cols, ax_height + 0.5))
    ax = fig.add_axes((0, 0, 1, ax_height / (ax_height + 0.5)))
    for k, (image, title) in enumerate(zip(images, titles, strict=True)):
        top, left = (k // cols) * pitch_y + pitch_y - h, (k % cols) * pitch_x + 2
        low, high = float(image.min()), float(image.max())
        canvas[top : top + h, left : left + w] = (image - low) / (high - low) if high > low else 0
        ax.text(left + w / 2, top - 1, title, ha="center", va="bottom", fontsize=8)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(suptitle, y=1 - 0.15 / (ax_height + 0.5))
    save(fig, path)


def digit_values(path, image, label):
    """One image drawn large with each pixel's value written on it. The 784 numbers are one collection
    of glyph outlines, each value's outline made once: a Text artist per pixel took most of the stage."""
    fig, ax = plt.subplots(figsize=(12, 12))
    ax.imshow(image, cmap="gray")
    outlines = {}  # value -> its digits' outline in points, centred on (0, 0)
    for v in np.unique(image):
        outline = TextPath((0, 0), str(v), prop=FontProperties(size=7))
        middle = (outline.vertices.min(axis=0) + outline.vertices.max(axis=0)) / 2
        outlines[v] = outline.transformed(Affine2D().translate(*-middle))
    rows, cols = np.indices(image.shape)
    threshold = image.max() / 2.5  # dark pixels get white text, light ones black
    numbers = PathCollection(
        [outlines[v] for v in image.ravel()],
        offsets=np.column_stack([cols.ravel(), rows.ravel()]),  # each at its pixel's centre
        offset_transform=ax.transData,
        transform=Affine2D().scale(1 / 72) + fig.dpi_scale_trans,  # points to pixels at any dpi
        facecolors=["white" if v < threshold else "black" for v in image.ravel()],
        edgecolors="none",
    )
    ax.add_collection(numbers, autolim=False)
    ax.set_title(f"training image, label {label}: raw pixel values")
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.96)
    save(fig, path)


def save(fig, path):
    """Write the figure. Each sets its margins itself: tight_layout would draw every text once more."""
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    params = load_params("data", "plot")
    names, p = CLASS_NAMES[params["data"]["dataset"]], params["plot"]
    x, y, _ = load_split("train")
    x_test, _, _ = load_split("test")
    if p["digit_index"] >= len(x):
        raise PipelineError(f"params.yaml: plot.digit_index must be below {len(x)}, got {p['digit_index']}")
    # index, actual, predicted (and confidence, unused) of the first misclassified test images
    wrong = read_evaluation("misclassified.csv", usecols=(0, 1, 2), dtype=int)[: p["misclassified"]]
    with atomic_path(OUT) as out:
        out.mkdir()
        learning_curves(out / "learning_curves.png")
        confusion_heatmap(out / "confusion_matrix.png", names)
        n = min(p["samples"], len(x))
        digit_grid(out / "samples.png", x[:n], [f"label {names[v]}" for v in y[:n]], "training images")
        digit_values(out / "digit.png", x[p["digit_index"]], names[y[p["digit_index"]]])
        digit_grid(
            out / "misclassified.png",
            x_test[wrong[:, 0]],
            [f"true {names[a]}\npred {names[b]}" for _, a, b in wrong],
            f"misclassified test images (first {len(wrong)})",
        )
    print(f"plot: 5 figures in {OUT}")


if __name__ == "__main__":
    run(main)
