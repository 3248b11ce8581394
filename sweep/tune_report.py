"""Write reports/tuning.md and its figures from the search's journal: `python -m sweep.tune_report`.

Every trial of sweep/tune.py with its params, validation figure, state and time; the best trial;
the lines that make it the study's `tuned-mlp` variant, so that ablations.yaml's seeds confirm it
against the baseline. No test figure: the test set is for that confirmation only.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optuna
from optuna.trial import TrialState

from sweep import study, tune
from sweep.report import markdown

# The published MLP of this family closest to what the search may find, for the variant's `reference:`
REFERENCE = "{test_accuracy: 0.9894, source: 'Srivastava et al. 2014 (JMLR) Table 2, 3x1024 max-norm'}"


def state(trial, retries):
    if trial.state == TrialState.COMPLETE:
        return "done"
    if trial.state == TrialState.FAIL:
        error = trial.user_attrs.get("error")
        again = retries.get(tune.trial_name(trial.number), "later")
        return f"failed: {error}".replace("|", "/") if error else f"stopped; runs again as {again}"
    return trial.state.name.lower()  # running, or waiting to be asked again


def short(value):
    return float(f"{value:.3g}") if isinstance(value, float) else value


def table(search, keys):
    retries = {t.user_attrs.get("retry_of"): tune.trial_name(t.number) for t in search.trials}
    header, rows = ["trial", tune.OBJECTIVE[1], "minutes", *keys, "state"], []
    for t in search.trials:
        minutes = f"{t.duration.total_seconds() / 60:.1f}" if t.duration else ""
        value = f"{t.value:.4f}" if t.value is not None else ""
        params = [study.format_value(short(t.params[k])) if k in t.params else "" for k in keys]
        rows.append([tune.trial_name(t.number), value, minutes, *params, state(t, retries)])
    return markdown(header, rows, left=header)


def variant(best):
    """The ablations.yaml entry that runs the best trial's params over the study's seeds."""
    overrides = ", ".join(f"{k}: {study.format_value(v)}" for k, v in best.params.items())
    return f"  - name: tuned-mlp\n    set: {{{overrides}}}\n    reference: {REFERENCE}"


def most_important(search, keys, n=3):
    """The `n` params that move the objective most (Optuna's default importance, no scikit-learn);
    the space's first ones while there are too few trials to tell."""
    try:
        return list(optuna.importance.get_param_importances(search))[:n]
    except (RuntimeError, ValueError):
        return keys[:n]


def figures(search, keys, out):
    vis = optuna.visualization.matplotlib
    ax = vis.plot_optimization_history(search, target_name=tune.OBJECTIVE[1])
    ax.figure.set_size_inches(8, 4.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.figure.savefig(out / "tuning_history.png", dpi=100, bbox_inches="tight")
    axes = np.atleast_1d(vis.plot_slice(search, params=keys, target_name=tune.OBJECTIVE[1]))
    axes[0].figure.set_size_inches(4 * len(axes), 4)
    axes[0].figure.savefig(out / "tuning_params.png", dpi=100, bbox_inches="tight")
    plt.close("all")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(tune.SPACE), help="the search space (default %(default)s)")
    p.add_argument("--out", default="reports", help="folder for the report and figures")
    args = p.parse_args(argv)
    space, seed = tune.load_space(args.space)
    search = tune.open_search(seed)
    done = search.get_trials(states=(TrialState.COMPLETE,))
    if not done:
        study.fail(f"no finished trial in {tune.JOURNAL}; run `make tune` first")
    keys, best, out = list(space), search.best_trial, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    top = most_important(search, keys)
    figures(search, top, out)
    extra = ", ".join(sorted({t.user_attrs.get("set") for t in search.trials} - {"none", None}))
    span = max(t.datetime_complete for t in done) - min(
        t.datetime_start for t in search.trials if t.datetime_start
    )
    took = (
        f"The search took {span.total_seconds() / 60:.0f} minutes from the first trial's start to the last"
        " one's end (a search stopped and resumed counts its pause too)."
    )
    smoke = [f"\n**Not full-size:** trials ran with the extra overrides {extra}."] if extra else []
    lines = [
        "# Tuning the MLP",
        "",
        f"{len(search.trials)} trials of `make tune` ({len(done)} done), each the DVC experiment of its"
        f" name, over the space of `{args.space}`; the objective, maximised, is `{tune.OBJECTIVE[1]}` of"
        f" `{tune.OBJECTIVE[0]}`: the validation accuracy of the checkpoint kept by validation loss. The"
        " test set chose nothing, so no test figure is shown here: the study confirms the winner (below).",
        "",
        took,
        *smoke,
        "",
        f"**Best: {tune.trial_name(best.number)}**, {tune.OBJECTIVE[1]} {best.value:.4f}"
        f" in {best.duration.total_seconds() / 60:.1f} minutes, with",
        "",
        *[f"- `{k}`: {study.format_value(v)}" for k, v in best.params.items()],
        "",
        "To confirm it over the study's seeds against the baseline, add it to `ablations.yaml`'s",
        "`experiments:` and run `make ablations ONLY=baseline,tuned-mlp` ([how](../docs/tuning.md)):",
        "",
        "```yaml",
        variant(best),
        "```",
        "",
        "![The objective of each trial and the best so far](tuning_history.png)",
        "",
        f"![The objective against the params that move it most: {', '.join(top)}](tuning_params.png)",
        "",
        "## Trials",
        "",
        table(search, keys),
        "",
    ]
    (out / "tuning.md").write_text("\n".join(lines))
    print(f"report: {len(search.trials)} trials in {out / 'tuning.md'} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
