"""Write reports/ablations.md and reports/ablations.png from the experiments DVC knows about.

Numbers come from `dvc exp show --json`; each run's per-epoch validation loss is read at the
experiment's commit with dvc.api. Exit status 1 if an experiment of the study is missing.
"""

import argparse
import io
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import dvc.api
import matplotlib.pyplot as plt
import pandas as pd
from study import STUDY, committed_params, describe, experiments, load_study

VAL_LOSS = "metrics/train/plots/metrics/eval/loss.tsv"
NOISE = 0.3  # percentage points: how far two seeds or machines may differ on test accuracy
# our metric -> (file, key) in the experiment's metrics
SOURCES = {
    "loss": ("metrics/train/metrics.json", "train.loss"),
    "accuracy": ("metrics/train/metrics.json", "train.accuracy"),
    "val_loss": ("metrics/train/metrics.json", "eval.loss"),
    "val_accuracy": ("metrics/train/metrics.json", "eval.accuracy"),
    "test_accuracy": ("metrics/evaluate.json", "test_accuracy"),
    "test_loss": ("metrics/evaluate.json", "test_loss"),
    "train_seconds": ("metrics/train/metrics.json", "train_seconds"),
    "params": ("metrics/train/metrics.json", "params"),
    "best_epoch": ("metrics/train/metrics.json", "best_epoch"),
}


def lookup(metrics, file, dotted):
    value = metrics.get(file, {})
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def collect(study):
    """One dict per experiment that DVC has finished: the study entry, its numbers and its curve."""
    found, rows = experiments(), []
    for exp in study:
        run = found.get(exp["name"])
        if not run or run["state"] != "success":
            continue
        row = {**exp, "rev": run["rev"], "params_yaml": run["params"]}
        for name, (file, key) in SOURCES.items():
            row[name] = lookup(run["metrics"], file, key)
        if any(row[k] is None or (isinstance(row[k], float) and math.isnan(row[k])) for k in SOURCES):
            print(f"warning: {exp['name']} lacks a metric; left out", file=sys.stderr)
            continue
        tsv = dvc.api.read(VAL_LOSS, repo=".", rev=run["rev"])
        row["curve"] = pd.read_csv(io.StringIO(tsv), sep="\t")
        rows.append(row)
    return rows


def extra_overrides(rows, base):
    """Params that differ from the committed ones in every run but are no variant's own: SET=..."""
    common = None
    for row in rows:
        changed = {k: v for k, v in row["params_yaml"].items() if base.get(k) != v and k not in row["set"]}
        common = changed if common is None else {k: v for k, v in common.items() if changed.get(k) == v}
    return common or {}


def pct(x):
    return f"{100 * x:.2f}%"


def pp(x):
    return f"{100 * x:+.2f}"


def tables(rows):
    head = (
        "| name | change | test acc (ref) | test acc | Δ pp | test loss | train time | params | best epoch |"
        "\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    main = "".join(
        f"| {r['name']} | {describe(r['set'])} | {pct(r['reference']['test_accuracy'])} | "
        f"{pct(r['test_accuracy'])} | {pp(r['test_accuracy'] - r['reference']['test_accuracy'])} | "
        f"{r['test_loss']:.4f} | {r['train_seconds']:.1f} s | {r['params']:,} | "
        f"{r['best_epoch']} of {r['params_yaml']['train.epochs']} |\n"
        for r in rows
    )
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    head2 = "| name | " + " | ".join(f"{k} (ref) | {k} | Δ" for k in keys) + " |\n"
    head2 += "| --- |" + " ---: |" * (3 * len(keys)) + "\n"
    final = "".join(
        f"| {r['name']} | "
        + " | ".join(f"{r['reference'][k]:.4f} | {r[k]:.4f} | {r[k] - r['reference'][k]:+.4f}" for k in keys)
        + " |\n"
        for r in rows
    )
    return head + main, head2 + final


def direction(delta):
    """Words for a change in test accuracy (a fraction)."""
    if abs(delta) * 100 < NOISE:
        return f"no real change ({pp(delta)} pp, within the ~{NOISE} pp run-to-run noise)"
    return f"{'a gain' if delta > 0 else 'a loss'} of {abs(100 * delta):.2f} pp"


def agreement(ours, theirs):
    """Do our effect and the reference's (changes in test accuracy vs each baseline) agree?"""
    small = abs(ours) * 100 < NOISE, abs(theirs) * 100 < NOISE
    if all(small):
        return "so both say this choice hardly matters."
    if any(small) or (ours > 0) != (theirs > 0):
        return "so here the two runs disagree."
    scale = abs(ours) / abs(theirs)
    if 0.5 <= scale <= 2:
        return "the same effect."
    return f"the same direction, but {scale:.2g} times {'as large' if scale > 1 else 'the size'}."


def paragraph(row, base):
    """What one run shows, from its numbers and those of the baseline (ours and the reference's)."""
    ref = row["reference"]
    gap = row["test_accuracy"] - ref["test_accuracy"]
    text = [
        f"**{row['name']}** ({describe(row['set'])}): {pct(row['test_accuracy'])} test accuracy against "
        f"the reference's {pct(ref['test_accuracy'])}, "
        + (
            "in agreement."
            if abs(gap) * 100 < NOISE
            else f"{abs(100 * gap):.2f} pp {'above' if gap > 0 else 'below'} it."
        )
    ]
    if base and row is not base:
        ours = row["test_accuracy"] - base["test_accuracy"]
        theirs = ref["test_accuracy"] - base["reference"]["test_accuracy"]
        text.append(f"Against our baseline it is {direction(ours)}; the reference saw {direction(theirs)}, ")
        text[-1] += agreement(ours, theirs)
    ratio = row["val_loss"] / row["loss"] if row["loss"] > 0 else float("inf")
    if ratio > 2:
        overfit = "the network fits the training set far better than it generalises"
    elif ratio > 1.3:
        overfit = "a moderate generalisation gap"
    elif ratio >= 0.9:
        overfit = "training and validation agree"
    else:  # the training loss averages an epoch of a still-improving network, with dropout on
        overfit = "validation is below the epoch-averaged training loss, so the run was still improving"
    text.append(
        f"Final-epoch validation loss {row['val_loss']:.4f} against training loss {row['loss']:.4f} "
        f"({ratio:.1f} times): {overfit}; the reference had {ref['val_loss']:.4f} against {ref['loss']:.4f}."
    )
    epochs = row["params_yaml"]["train.epochs"]
    if row["best_epoch"] < epochs:
        text.append(
            f"Validation loss was lowest at epoch {row['best_epoch']} of {epochs}; the test numbers come "
            "from that checkpoint, the reference's from its last epoch."
        )
    cost = f"{row['params']:,} parameters, {row['train_seconds']:.0f} s of training"
    if base and row is not base:
        cost += f" ({row['train_seconds'] / base['train_seconds']:.1f} times the baseline)"
    text.append(cost + ".")
    if abs(gap) > 0.01 and row.get("known_difference"):
        text.append(f"Known difference: {row['known_difference']}")
    return " ".join(text)


def figure(rows, path):
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(14, 5))
    x = range(len(rows))
    bars.bar(
        [i - 0.2 for i in x], [100 * r["reference"]["test_accuracy"] for r in rows], 0.4, label="reference"
    )
    bars.bar([i + 0.2 for i in x], [100 * r["test_accuracy"] for r in rows], 0.4, label="reproduced")
    low = min(min(100 * r["test_accuracy"], 100 * r["reference"]["test_accuracy"]) for r in rows)
    bars.set(ylim=(max(0, low - 5), 106), ylabel="test accuracy (%)", title="Test accuracy per variant")
    bars.set_xticks(list(x), [r["name"] for r in rows], rotation=30, ha="right")
    bars.legend(ncol=2, loc="upper center")
    bars.grid(axis="y", alpha=0.3)
    for r in rows:
        curves.plot(r["curve"]["step"] + 1, r["curve"]["loss"], marker="o", ms=3, label=r["name"])
    curves.set(
        yscale="log", xlabel="epoch", ylabel="validation loss (log)", title="Validation loss per epoch"
    )
    curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(rows, missing, extra, figure_name):
    base = next((r for r in rows if r["name"] == "baseline"), None)
    main, final = tables(rows)
    lines = [
        "# Ablations: reproduced vs published",
        "",
        "Generated by `make report` from the DVC experiments of this commit (`dvc exp show --json`);"
        " the reference numbers are the published run's, kept in `ablations.yaml`."
        " Test numbers are of the best epoch by validation loss; Δ is reproduced minus reference.",
        "",
    ]
    if extra:
        lines += [
            f"**Every run had extra overrides: {describe(extra)}.** These are not full-size numbers.",
            "",
        ]
    if missing:
        lines += [f"**Not run yet:** {', '.join(missing)} (`make ablations`).", ""]
    lines += ["## Test set", "", main, "## Final epoch, training and validation", "", final]
    lines += [f"![test accuracy and validation loss per variant]({figure_name})", "", "## Per variant", ""]
    lines += [paragraph(r, base) + "\n" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default=str(STUDY))
    p.add_argument("--out", default="reports", help="folder for ablations.md and ablations.png")
    args = p.parse_args(argv)
    study = load_study(args.study)
    rows = collect(study)
    if not rows:
        sys.exit("error: no finished experiment of the study; run `make ablations` first")
    done = {r["name"] for r in rows}
    missing = [e["name"] for e in study if e["name"] not in done]
    out = Path(args.out)
    figure(rows, out / "ablations.png")
    (out / "ablations.md").write_text(
        render(rows, missing, extra_overrides(rows, committed_params()), "ablations.png")
    )
    print(f"report: {len(rows)} experiments in {out / 'ablations.md'} and {out / 'ablations.png'}")
    if missing:
        print(f"error: not in DVC's experiments: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
