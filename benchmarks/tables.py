"""benchmarks/results.md from the results that bench.py writes to results.json: one table per concern."""

SIDES = {"stage": "train stage", "tensorflow": "plain script, TensorFlow", "jax": "plain script, JAX"}
MISSING = "not run: JAX is not installed (`make bench` installs requirements-bench.txt)"


def table(title, header, rows):
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return [*lines, *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def side_rows(r, *keys):
    """One row per variant and side: its figures under `keys` (a ratio as 1.60x), or why it did not run."""
    return [
        [name, label, *([f"{s[k]:.2f}x" if k.endswith("ratio") else s[k] for k in keys] if s else [MISSING])]
        for name, v in r["variants"].items()
        for side, label in SIDES.items()
        for s in [v["sides"].get(side)]
    ]


def markdown(r):
    matmul, rounds = max(r["matmul_gflops"]), len(next(iter(r["variants"].values()))["runs"]["stage"])
    load = {k: ", ".join(f"{x:.2f}" for x in v) for k, v in r["loadavg"].items()}
    sets = [
        ", ".join([f"{v['epochs']} epochs", *(f"{k}={x}" for k, x in v["overrides"].items())])
        for v in r["variants"].values()
    ]
    out = [
        "# `make bench`" + ": QUICK run (small data: checks the code, not figures to quote)" * r["quick"],
        "",
        f"{r['date']} on {r['machine']}; load average {load['start']} at the start, {load['end']} at the "
        "end; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".",
        "",
        "Variants (params.yaml with): "
        + "; ".join(f"{n} ({x})" for n, x in zip(r["variants"], sets, strict=True))
        + f". Each ran {rounds} round(s) of its sides back to back, in rotating order. Figures are medians "
        "over the rounds; **÷ stage** is the median of the rounds' own ratios of the side's time to the "
        "stage's: above 1, the stage is faster. The stage's XLA cache is empty before its first round.",
        "",
        *table(
            "Training loop: the epochs, with validation and the best-epoch checkpoint",
            ["variant", "side", "loop s", "÷ stage", "s/epoch after the first", "test accuracy"],
            side_rows(r, "loop_seconds", "loop_ratio", "epoch_seconds", "test_accuracy"),
        ),
        *table(
            "Whole process: start to exit (imports, data, training; the plain script's test evaluation)",
            ["variant", "side", "wall s", "÷ stage", "peak RSS MB"],
            side_rows(r, "wall_seconds", "wall_ratio", "peak_rss_mb"),
        ),
        *table(
            "Arithmetic rate against the 2048² float32 matmul of the same run",
            ["variant", "side", "GFLOP/s", "% of the matmul rate", "s/epoch after the first"],
            side_rows(r, "gflops", "percent_of_matmul", "epoch_seconds"),
        ),
        f"Matmul rate: {matmul} GFLOP/s, the better of {r['matmul_gflops']} (before and after the variants).",
        "An epoch's FLOPs: 3x the forward FLOPs per training sample, 1x per validation sample.",
    ]
    if "profiles" in r:
        header = ["hidden units", "stage s", "no dropout s", "matmuls alone s", "FLOPs at the matmul rate s"]
        keys = ("hidden_units", "stage", "no_dropout", "matmuls")
        rows = [[*(p[k] for k in keys), round(p["flops"] / matmul / 1e9, 3)] for p in r["profiles"]]
        out += ["", *table("Where an MLP epoch's time goes (benchmarks/profile_step.py)", header, rows)]
        out += [f"An epoch of {r['profiles'][0]['samples']:,} random images, batch 128, no validation."]
    return "\n".join(out) + "\n"
