"""The report's statistics: per-variant spread over seeds, paired differences from the baseline, verdicts.

Everything takes the per-run table of reports/ablations.csv (columns variant, seed, test_accuracy,
test_loss as fractions and losses); accuracies come out in percent, differences in points.
"""

import math

from scipy import special  # stdtrit, Student's t quantiles: scipy.stats would add 0.5 s to every import

from sweep.study import BASELINE, describe

LEVEL = 0.95  # of every interval in the report


def t_interval(mean, scale, n):
    """Student-t interval at LEVEL with n - 1 degrees of freedom; None when n < 2 (no spread to measure)."""
    if n < 2:
        return None
    if scale == 0:  # identical values: scipy would give nan
        return mean, mean
    tails = ((1.0 - LEVEL) / 2, (1.0 + LEVEL) / 2)  # as scipy.stats.t.interval takes them, to the bit
    return tuple(float(special.stdtrit(n - 1, q) * scale + mean) for q in tails)


def spread(values):
    """n, mean, sample standard deviation (nan for n = 1), min and max of a Series."""
    n = len(values)
    return n, values.mean(), values.std(ddof=1) if n > 1 else math.nan, values.min(), values.max()


def direction(ci):
    """better, worse or no difference, as a paired difference's confidence interval says; None without one."""
    if ci is None:
        return None
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference"


def verdict(diff, ci):
    """Words for a paired difference in test accuracy (points) and its confidence interval."""
    if ci is None:
        return f"{diff:+.2f} points on one seed; no interval can be computed from a single pair"
    lo, hi = ci
    if direction(ci) == "better":
        return f"better by {diff:.2f} points (95% CI {lo:.2f} to {hi:.2f})"
    if direction(ci) == "worse":
        return f"worse by {-diff:.2f} points (95% CI {-hi:.2f} to {-lo:.2f})"
    return f"no difference detected; the interval is ±{(hi - lo) / 2:.2f} points ({lo:+.2f} to {hi:+.2f})"


def placement(published, n, low, high, prediction):
    """Where the published single-run accuracy (percent) falls against this variant's seeds."""
    if n < 2:
        return (
            f"The published {published:.2f}% is {published - low:+.2f} points from the one run; "
            "one seed gives no range and no prediction interval."
        )
    inside = "inside" if low <= published <= high else "outside"
    text = (
        f"The published {published:.2f}% lies {inside} the range of the {n} seeds ({low:.2f}% to {high:.2f}%)"
    )
    lo, hi = prediction
    inside = "inside" if lo <= published <= hi else "outside"
    return text + f" and {inside} the 95% prediction interval for one more run ({lo:.2f}% to {hi:.2f}%)."


def summarize(frame, study):
    """One dict per variant that has runs in `frame`, in study order: spread, paired difference from
    its `compare_to` variant, verdicts, and (where the table has them) parameters and training time."""
    frame = frame.assign(acc=100 * frame["test_accuracy"])
    published = {e["name"]: 100 * e["reference"]["test_accuracy"] for e in study}
    cost = {}  # variant -> (parameters, mean training seconds)
    if {"params", "train_seconds"} <= set(frame.columns):
        grouped = frame.groupby("variant")
        cost = {v: (int(g["params"].iloc[0]), g["train_seconds"].mean()) for v, g in grouped}
    out = []
    for exp in study:
        runs = frame[frame["variant"] == exp["name"]].sort_values("seed")
        if runs.empty:
            continue
        n, mean, sd, low, high = spread(runs["acc"])
        row = {"variant": exp["name"], "change": describe(exp["set"]), "n": n, "acc_mean": mean}
        row.update(acc_sd=sd, acc_min=low, acc_max=high)
        _, *loss = spread(runs["test_loss"])
        row.update(zip(("loss_mean", "loss_sd", "loss_min", "loss_max"), loss, strict=True))
        # The estimated mean varies by sd / sqrt(n); one more run by sd around it, too.
        row["acc_ci"] = t_interval(mean, sd / math.sqrt(n), n)
        row["prediction"] = t_interval(mean, sd * math.sqrt(1 + 1 / n), n)
        row["published"] = published[exp["name"]]
        row["placement"] = placement(row["published"], n, low, high, row["prediction"])
        row["params"], row["train_seconds"] = cost.get(exp["name"], (None, None))
        other = exp.get("compare_to", None if exp["name"] == BASELINE else BASELINE)
        base = frame[frame["variant"] == other].set_index("seed")["acc"]
        if other is not None and not base.empty:
            diffs = (runs.set_index("seed")["acc"] - base).dropna()  # the seeds both have run
            k, diff, diff_sd = spread(diffs)[:3]
            row.update(pairs=k, diff=diff, diff_ci=t_interval(diff, diff_sd / math.sqrt(k), k) if k else None)
            row.update(compare_to=other, published_diff=row["published"] - published[other])
            row["verdict"] = verdict(diff, row["diff_ci"]) if k else f"no seed in common with {other}"
            row["other_params"], row["other_seconds"] = cost.get(other, (None, None))
        out.append(row)
    return out
