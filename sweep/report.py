"""Write reports/ablations.{md,csv} and figures from the study's experiments in DVC.

The runs' numbers come from `dvc exp show --json` (study.experiments) into reports/ablations.csv, one
row per run; the report is then computed from that table alone, and `--from-csv` recomputes it from
the file. Learning curves are read at each run's commit with dvc.api. Exit status 1 if a run is missing.
"""

import argparse
import io
import math
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import dvc.api
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sweep import study
from sweep.stats import direction, summarize
from sweep.study import BASELINE

FIRST = ("name", "variant", "seed")  # the CSV's first columns; then the overridden params, METRICS, rev
# CSV column -> (metrics file, key): the test numbers are of the best epoch, the others of the last
METRICS = {
    "test_accuracy": ("metrics/evaluate.json", "test_accuracy"),
    "test_loss": ("metrics/evaluate.json", "test_loss"),
    "best_epoch": ("metrics/train/metrics.json", "best_epoch"),
    "loss": ("metrics/train/metrics.json", "train.loss"),
    "accuracy": ("metrics/train/metrics.json", "train.accuracy"),
    "val_loss": ("metrics/train/metrics.json", "eval.loss"),
    "val_accuracy": ("metrics/train/metrics.json", "eval.accuracy"),
    "train_seconds": ("metrics/train/metrics.json", "train_seconds"),
    "params": ("metrics/train/metrics.json", "params"),
}
CURVES = {  # per-epoch validation history, read at each run's commit
    "loss": "metrics/train/plots/metrics/eval/loss.tsv",
    "accuracy": "metrics/train/plots/metrics/eval/accuracy.tsv",
}
SEED_NOTE = (
    "Each seed drives the train/validation split, the initial weights, dropout and the batch order, and"
    " every variant runs at every seed, so differences from the baseline are paired by seed. The split"
    " moves with the seed on purpose: which images are held out to pick the best epoch changes for anyone"
    " who reruns with another seed, so the spread includes it."
)


def lookup(metrics, file, dotted):
    value = metrics.get(file, {})
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def collect(wanted, base):
    """The per-run table from DVC: one row per finished run of `wanted` (runs()), with a column for
    every param that any run overrides, between FIRST and METRICS."""
    found, rows, params = study.experiments(), [], []
    for name, _ in wanted:
        run = found.get(name)
        if not run or run["state"] != "success":
            continue
        numbers = {col: lookup(run["metrics"], *source) for col, source in METRICS.items()}
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in numbers.values()):
            print(f"warning: {name} lacks a metric; left out", file=sys.stderr)
            continue
        variant, seed = study.parse_run_name(name)
        rows.append({"name": name, "variant": variant, "seed": seed, **numbers, "rev": run["rev"]})
        params.append(run["params"])
    changed = sorted({k for p in params for k, v in p.items() if k != "seed" and base.get(k) != v})
    for row, p in zip(rows, params, strict=True):
        row.update({k: study.format_value(p.get(k)) for k in changed})
    return pd.DataFrame(rows, columns=[*FIRST, *changed, *METRICS, "rev"])


def param_columns(frame):
    return [col for col in frame.columns if col not in (*FIRST, *METRICS, "rev")]


def read_runs(path):
    """The per-run CSV with param columns as written (false, null: as -S takes them), numbers as numbers."""
    header = pd.read_csv(path, nrows=0).columns
    text = {col: str for col in header if col not in METRICS and col != "seed"}
    return pd.read_csv(path, dtype=text, keep_default_na=False)


def extra_overrides(frame, variants):
    """The param columns that no variant sets, i.e. SET=... on every run: "train.epochs=1" or ""."""
    own = {k for exp in variants for k in exp["set"]}
    return ", ".join(f"{k}={'/'.join(frame[k].unique())}" for k in param_columns(frame) if k not in own)


NONE = "n/a"  # a cell that one seed cannot fill
LEFT = ("variant", "change", "compared with")  # the columns of words; numbers align right


def cell(value, spec):
    return NONE if value is None or math.isnan(value) else f"{value:{spec}}"


def ci(interval, spec):
    return NONE if interval is None else f"{interval[0]:{spec}} to {interval[1]:{spec}}"


def markdown(header, rows, left=LEFT):
    """A Markdown table; the columns named in `left` align left, the others (numbers) right."""
    rule = ["---" if col in left else "---:" for col in header]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in (header, rule, *rows))


FINAL = (("loss", ".4f"), ("accuracy", ".2%"), ("val_loss", ".4f"), ("val_accuracy", ".2%"))


def tables(frame, summary, variants):
    """The Markdown tables of test accuracy, test loss, and the final epoch with the run's cost."""
    pct, acc = "{:.2f}%".format, []
    for s in summary:
        spread = [pct(s["acc_mean"]), ci(s["acc_ci"], ".2f"), cell(s["acc_sd"], ".2f")]
        paired = [s.get("compare_to") or NONE, cell(s.get("diff"), "+.2f"), ci(s.get("diff_ci"), "+.2f")]
        acc.append([s["variant"], s["change"], s["n"], *spread, pct(s["acc_min"]), pct(s["acc_max"])])
        acc[-1] += [*paired, pct(s["published"])]
    loss = [
        [s["variant"], s["n"], *(cell(s[f"loss_{k}"], ".4f") for k in ("mean", "sd", "min", "max"))]
        for s in summary
    ]
    refs, final = {exp["name"]: exp["reference"] for exp in variants}, []
    for variant, group in frame.groupby("variant", sort=False):
        m, epochs = group.mean(numeric_only=True), sorted(set(group["best_epoch"]))
        # "ours (published)": a source may publish only the test accuracy
        pairs = [f"{m[k]:{spec}} ({cell(refs[variant].get(k), spec)})" for k, spec in FINAL]
        span = f"{epochs[0]}{f' to {epochs[-1]}' if len(epochs) > 1 else ''}"
        final.append(
            [variant, *pairs, span, f"{m['train_seconds']:.1f} s", f"{int(group['params'].iloc[0]):,}"]
        )
    acc_header = ["variant", "change", "n", "mean", "95% CI", "sd (pp)", "min", "max", "compared with"]
    acc_header += ["Δ (pp, paired)", "95% CI (pp)", "published"]
    final_header = ["variant", *(f"{k} (published)" for k, _ in FINAL), "best epoch", "train time", "params"]
    return (
        markdown(acc_header, acc),
        markdown(["variant", "n", "mean", "sd", "min", "max"], loss),
        markdown(final_header, final),
    )


def baseline_spread(summary, frame):
    base = next((s for s in summary if s["variant"] == BASELINE), None)
    if base is None:
        return "**Baseline spread:** the baseline has not run, so nothing is compared with it."
    seeds = ", ".join(map(str, sorted(frame.loc[frame["variant"] == BASELINE, "seed"])))
    if base["n"] < 2:
        return (
            f"**Baseline spread:** one seed only ({seeds}): no spread can be measured, no interval computed."
        )
    lo, hi = base["prediction"]
    return (
        f"**Baseline spread, measured:** over {base['n']} seeds ({seeds}) the baseline's test accuracy is "
        f"{base['acc_mean']:.2f}% on average with a standard deviation of {base['acc_sd']:.2f} points, from "
        f"{base['acc_min']:.2f}% to {base['acc_max']:.2f}%; one more baseline run would land between "
        f"{lo:.2f}% and {hi:.2f}% (95% prediction interval)."
    )


def paragraph(s, exp, runs):
    """The text on one variant: its verdict, where the published run falls, its cost, its epochs."""
    text = [f"**{s['variant']}** ({s['change']}):"]
    if "verdict" in s:
        text.append(f"against {s['compare_to']}, {s['verdict']}.")
    text.append(s["placement"])
    if s.get("params") is not None and s.get("other_params") is not None:
        lo, hi = s["diff_ci"] or (None, None)
        if lo is None:
            higher = f"{s['diff']:+.2f} points of accuracy on one seed (no interval)"
        elif lo > 0 or hi < 0:
            higher = f"{'higher' if lo > 0 else 'lower'} accuracy"
        else:
            higher = "no accuracy difference detected"
        text.append(
            f"It has {s['params']:,} parameters against {s['other_params']:,} for {s['compare_to']}"
            f" ({s['params'] / s['other_params']:.2f}x) and trains in {s['train_seconds']:.1f} s against"
            f" {s['other_seconds']:.1f} s (mean per run):"
            f" {'fewer' if s['params'] < s['other_params'] else 'not fewer'} parameters, {higher}."
        )
    epochs, best = exp["set"].get("train.epochs"), runs["best_epoch"]
    if epochs is not None:  # where the best epochs fell: why it trains that long
        text.append(
            f"It trains {epochs} epochs (train.epochs); its best epoch by validation loss was {best.min()}"
            f" to {best.max()}, the last one in {int((best == epochs).sum())} of {len(best)} runs."
        )
    if exp["reference"].get("source"):
        text.append(f"Published: {exp['reference']['source']}.")
    if abs(s["acc_mean"] - s["published"]) > 1 and exp.get("known_difference"):
        text.append(f"Known difference: {exp['known_difference']}")
    return " ".join(text)


def since(summary, variants, rev, change=None):
    """The section that sets this study beside the one committed at `rev` (its reports/ablations.csv):
    what `change`d in between, as its author says, then each variant's mean then and now, its paired
    difference and verdict then and now."""
    what = f"no reports/ablations.csv at {rev}"
    old = pd.read_csv(io.StringIO(study.sh("git", "show", f"{rev}:reports/ablations.csv", what=what)))
    subject = study.sh("git", "log", "-1", "--format=%h (%as)", rev)
    then = {s["variant"]: s for s in summarize(old, variants)}
    rows, moved = [], []
    for s in summary:
        t = then.get(s["variant"], {})
        was, now = (direction(t.get("diff_ci")) or NONE), direction(s.get("diff_ci")) or NONE
        if t and "diff" in s and was != now:
            moved.append(f"{s['variant']} ({was} -> {now})")
        mean = cell(t.get("acc_mean"), ".2f") + "%" if t else NONE
        rows.append([s["variant"], mean, f"{s['acc_mean']:.2f}%", cell(t.get("diff"), "+.2f"),
                     cell(s.get("diff"), "+.2f"), was, now])  # fmt: skip
    header = ["variant", "mean then", "mean now", "Δ then (pp)", "Δ now (pp)", "verdict then", "verdict now"]
    left = ("variant", "verdict then", "verdict now")
    verdicts = f"Verdicts that moved: {', '.join(moved)}." if moved else "No verdict moved."
    said = [f"What changed in between: {change}", ""] if change else []
    return [f"## Since the study at {subject}", "", *said, markdown(header, rows, left), "", verdicts, ""]


def render(frame, variants, missing, figures, rev=None, change=None):
    summary = summarize(frame, variants)
    acc, loss, final = tables(frame, summary, variants)
    lines = [
        "# Ablations: each variant over seeds, against the baseline and the published run",
        "",
        "Generated by `make report` from `reports/ablations.csv` (one row per run, written from"
        " `dvc exp show --json`); every number below is computed from that file. Accuracies are in percent,"
        " differences in percentage points (pp), intervals at 95% from Student's t. Test numbers are of"
        " the best epoch by validation loss; the published numbers are the single runs in `ablations.yaml`.",
        "",
        SEED_NOTE,
        "",
        baseline_spread(summary, frame),
        "",
    ]
    if extra := extra_overrides(frame, variants):
        lines += [f"**Every run had extra overrides: {extra}.** These are not full-size numbers.", ""]
    if missing:
        lines += [f"**Not run yet:** {', '.join(missing)} (`make ablations`).", ""]
    lines += ["## Test accuracy", "", acc, "", "## Test loss", "", loss, ""]
    lines += ["## Final epoch (mean over seeds) and cost", "", final, ""]
    lines += [f"![{alt}]({name})\n" for name, alt in figures.items()]
    lines += since(summary, variants, rev, change) if rev else []
    lines += ["## Per variant", ""]
    by_name = {exp["name"]: exp for exp in variants}
    for s in summary:
        lines.append(paragraph(s, by_name[s["variant"]], frame[frame["variant"] == s["variant"]]) + "\n")
    return "\n".join(lines), summary


def accuracy_figure(frame, summary, path):
    """Per variant: one dot per seed, the mean with its CI, the published run as a star; then paired Δ
    from the variant it is compared with."""
    fig = plt.figure(figsize=(max(9, 1.5 * len(summary)), 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    rng = np.random.default_rng(0)  # jitter only
    for ax, s in zip(top.subplots(1, len(summary), squeeze=False)[0], summary, strict=True):
        acc = 100 * frame.loc[frame["variant"] == s["variant"], "test_accuracy"]
        ax.scatter(rng.uniform(-0.15, 0.15, len(acc)), acc, s=16, alpha=0.7, label="one seed")
        err = (
            None
            if s["acc_ci"] is None
            else [[s["acc_mean"] - s["acc_ci"][0]], [s["acc_ci"][1] - s["acc_mean"]]]
        )
        ax.errorbar(0.5, s["acc_mean"], yerr=err, fmt="o", color="k", capsize=4, label="mean, 95% CI")
        ax.scatter(1, s["published"], marker="*", s=140, color="C3", label="published run")
        ax.set(xlim=(-0.5, 1.5), xticks=[], title=s["variant"])
        ax.grid(axis="y", alpha=0.3)
    top.axes[0].set_ylabel("test accuracy (%)")
    top.legend(*top.axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3)
    top.suptitle("Test accuracy per variant (each panel has its own scale)")
    ax = bottom.subplots()
    others = [s for s in summary if "diff" in s]
    for y, s in enumerate(others):
        base = frame[frame["variant"] == s["compare_to"]].set_index("seed")["test_accuracy"]
        runs = frame[frame["variant"] == s["variant"]].set_index("seed")["test_accuracy"]
        diffs = (100 * (runs - base)).dropna()
        ax.scatter(
            diffs, y + rng.uniform(-0.1, 0.1, len(diffs)), s=16, alpha=0.7, color="C0", label="one seed"
        )
        err = None if s["diff_ci"] is None else [[s["diff"] - s["diff_ci"][0]], [s["diff_ci"][1] - s["diff"]]]
        ax.errorbar(s["diff"], y + 0.25, xerr=err, fmt="o", color="k", capsize=4, label="mean, 95% CI")
        ax.scatter(s["published_diff"], y - 0.25, marker="*", s=140, color="C3", label="published runs' Δ")
    ax.axvline(0, color="grey", lw=1)
    ax.set_xscale("symlog", linthresh=1)  # tenths of a point and tens of points on one axis
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.set_yticks(range(len(others)), [f"{s['variant']}\nvs {s['compare_to']}" for s in others])
    # study order, top down; one empty row when nothing ran beside its compared variant
    ax.set_ylim(max(len(others), 1) - 0.5, -0.5)
    ax.set(
        xlabel="test accuracy minus the compared variant's at the same seed (pp; linear within ±1, log out)",
        title="Difference from the compared variant (the baseline unless `compare_to`), paired by seed",
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per kind, not per variant
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(frame, path):
    """Validation loss and accuracy per epoch: the mean across seeds, with the seeds' range as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
    for (key, tsv), ax in zip(CURVES.items(), axes, strict=True):
        for i, (variant, group) in enumerate(frame.groupby("variant", sort=False)):
            per_seed = [
                pd.read_csv(io.StringIO(dvc.api.read(tsv, repo=".", rev=rev)), sep="\t")
                for rev in group["rev"]
            ]
            table = pd.concat([c.set_index("step")[key] for c in per_seed], axis=1)
            scale = 100 if key == "accuracy" else 1
            epochs = table.index + 1
            ax.plot(epochs, scale * table.mean(axis=1), marker="o", ms=3, color=f"C{i}", label=variant)
            ax.fill_between(
                epochs, scale * table.min(axis=1), scale * table.max(axis=1), color=f"C{i}", alpha=0.2
            )
        ax.set(xlabel="epoch", title=f"Validation {key}: mean over seeds, band from min to max")
        ax.set_xlim(0.5, epochs.max() + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set(yscale="log", ylabel="validation loss (log)")
    axes[0].yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    axes[0].yaxis.set_minor_formatter(lambda v, _: f"{v:g}")
    axes[1].set(ylabel="validation accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def no_runs_here(names):
    """Why the report is empty: DVC lists the experiments of HEAD only, and a study run before the
    last commit (`git commit` after `dvc exp apply`, say) belongs to the commit it ran from."""
    head = study.sh("git", "rev-parse", "HEAD")
    elsewhere = Counter(rev for rev, name in study.exp_refs() if name in names and rev != head)
    if not elsewhere:
        return "no finished run of the study; run `make ablations` first"
    rev, count = elsewhere.most_common(1)[0]
    return (
        f"no finished run of the study at HEAD ({head[:7]}): {count} of its runs belong to commit "
        f"{rev[:7]}; `git checkout {rev[:7]}` and `make report` there, or `make ablations` here"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_selection_args(p, "report")
    p.add_argument("--out", default="reports", help="folder for the report, CSV and figures")
    p.add_argument("--from-csv", type=Path, help="recompute the report from this CSV (curves if --out's own)")
    p.add_argument("--since", metavar="REV", help="add a section comparing with the study committed at REV")
    p.add_argument("--change", metavar="TEXT", help="with --since: what changed between the two studies")
    args = p.parse_args(argv)
    if args.change and not args.since:
        study.fail("--change says what changed since another study: give that study's commit with --since")
    variants, selected = study.selected_runs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"ablations.png": "test accuracy per seed and paired differences from the baseline"}
    curves = "ablations_curves.png"
    if not args.from_csv:
        frame = collect(selected, study.committed_params())
        if frame.empty:
            study.fail(no_runs_here({name for name, _ in selected}))
        frame.to_csv(out / "ablations.csv", index=False)
        curves_figure(frame, out / curves)
    csv = args.from_csv or out / "ablations.csv"
    # The curves come from DVC's experiments, which a CSV does not hold: the CSV a full `make report`
    # wrote keeps the figure drawn beside it, another CSV has none.
    if csv.resolve() == (out / "ablations.csv").resolve() and (out / curves).exists():
        figures[curves] = "validation loss and accuracy per epoch, mean over seeds with range"
    frame = read_runs(csv)  # the report uses the CSV's numbers only
    missing = [name for name, _ in selected if name not in set(frame["name"])]
    text, summary = render(frame, variants, missing, figures, args.since, args.change)
    accuracy_figure(frame, summary, out / "ablations.png")
    (out / "ablations.md").write_text(text)
    print(f"report: {len(frame)} runs in {out / 'ablations.md'}, {out / 'ablations.csv'} and the figures")
    if missing:
        print(f"error: not in DVC's experiments: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
