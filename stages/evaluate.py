"""Stage evaluate: score the best checkpoint on the test set, per class and overall."""

import csv
from pathlib import Path

from stages.common import (
    CLASS_NAMES,
    atomic_path,
    eval_rows,
    load_params,
    load_split,
    model_inputs,
    read_model,
    run,
    write_json,
)

import numpy as np

METRICS = Path("metrics/evaluate.json")
PER_CLASS = Path("metrics/per_class.csv")
PREDICTIONS = Path("metrics/predictions.csv")  # one row per test image: DVC's confusion plot
MISCLASSIFIED = Path("metrics/misclassified.csv")
CONFUSION = Path("metrics/confusion_matrix.csv")


def predict(x, divisor):
    model = read_model()
    x = model_inputs(model, x).astype("float32") / np.float32(divisor)
    # The model called on a few large batches: model.predict's numbers without the tf.data pipeline
    # it builds around them, which took longer than the test set's inference.
    rows = eval_rows(model, len(x))
    return np.concatenate(
        [np.asarray(model(x[i : i + rows], training=False)) for i in range(0, len(x), rows)]
    )


def per_class(confusion):
    """Precision, recall and F1 of each class from a confusion matrix (rows: true, columns: predicted)."""
    tp = np.diag(confusion).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / confusion.sum(axis=0))
        recall = np.nan_to_num(tp / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return precision, recall, f1


def write_csv(path, columns):
    """{header: column} as a table, floats to six places. The csv module, not pandas: importing pandas
    took longer than everything the stage writes."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        table = csv.writer(f, lineterminator="\n")
        table.writerow(columns)
        for row in zip(*(np.asarray(c).tolist() for c in columns.values()), strict=True):
            table.writerow(f"{v:.6f}" if isinstance(v, float) else v for v in row)


def main():
    names = CLASS_NAMES[load_params("data")["data"]["dataset"]]
    x, y, divisor = load_split("test")
    probs = predict(x, divisor)
    predicted = probs.argmax(axis=1)
    # Keras's own loss formula, clipping included, so test_loss compares with val_loss.
    eps = 1e-7
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1 - eps)).mean())
    classes = probs.shape[1]
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (y, predicted), 1)
    precision, recall, f1 = per_class(confusion)
    write_json(
        METRICS,
        {
            "test_accuracy": float((predicted == y).mean()),
            "test_loss": loss,
            "test_macro_f1": float(f1.mean()),
        },
    )
    write_csv(
        PER_CLASS,
        {
            "digit": range(classes),  # the class index, whatever the dataset
            "name": names,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": confusion.sum(axis=1),
        },
    )
    write_csv(CONFUSION, {str(c): confusion[:, c] for c in range(classes)})
    write_csv(PREDICTIONS, {"actual": y, "predicted": predicted})
    wrong = np.flatnonzero(predicted != y)
    confidence = probs.max(axis=1)[wrong]
    write_csv(
        MISCLASSIFIED,
        {"index": wrong, "actual": y[wrong], "predicted": predicted[wrong], "confidence": confidence},
    )
    print(
        f"evaluate: test accuracy {(predicted == y).mean():.4f}, loss {loss:.4f}, "
        f"{(predicted != y).sum()} of {len(y)} misclassified"
    )


if __name__ == "__main__":
    run(main)
