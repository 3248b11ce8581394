"""benchmarks/results.md from the results dict of run.py: one table per concern."""

import statistics

RSS_TARGET_MB, NOOP_TARGET_S = 1024, 2.0


def cell(value, fmt="{}", none="n/a"):
    return none if value is None else fmt.format(value)


def plain(x, key):
    """A variant's plain-script figure; None where reference.py has no flag for one of its params."""
    return x["reference"][key] if x["reference"] else None


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def sweep_medians(sweep, key):
    """Median of `key` over each mode's runs; None where a run lacks it (results from before it)."""
    modes = {}
    for run in sweep["runs"]:
        modes.setdefault(run["mode"], []).append(run.get(key))
    return {m: None if None in v else statistics.median(v) for m, v in modes.items()}


PROFILE_ROWS = {
    "stage": "the stage's epoch: forward, gradients, RMSprop update, dropout (XLA)",
    "gradients": "the same without the optimizer's update (gradients summed instead; XLA)",
    "forward": "forward pass and loss only (XLA)",
    "no_dropout": "the same with dropout off: the gap to the row above is drawing dropout's masks (XLA)",
    "dots": "the step's 3 forward and 5 backward matmuls alone (TensorFlow's oneDNN kernels)",
}


def profile_section(p, matmul_rate):
    """benchmarks/profile_step.py's rows: where one training epoch's time goes."""
    s, ideal = p["seconds"], p["flops"] / matmul_rate / 1e9
    return [
        "",
        f"## Where a hidden-{p['hidden_units']} epoch's time goes (benchmarks/profile_step.py)",
        "",
        f"One training epoch of {p['samples']:,} random images at batch {p['batch_size']}, no validation, "
        f"median of the repeats, load before {p['loadavg_before'][0]}. At the 2048² fp32 matmul rate "
        f"of this run, its matmuls alone would take {ideal:.2f} s.",
        "",
        *table(
            ["part of the step", "s/epoch", "share of the stage's epoch"],
            [
                [label, s[key], f"{100 * s[key] / s['stage']:.0f}%"]
                for key, label in PROFILE_ROWS.items()
                if key in s
            ],
        ),
    ]


def markdown(r):
    v = r["variants"]
    mm = r["matmul"]
    loads = [x["loadavg_before"][0] for x in r["matmul_runs"]] + [r["loadavg_start"][0], r["loadavg_end"][0]]
    out = [
        f"# `make bench`, {r['mode']} run",
        "",
        f"{r['date']} on {r['machine']}; load average (1 min) {min(loads)}-{max(loads)} during the run "
        f"(start {r['loadavg_start']}, end {r['loadavg_end']}). Ratios are plain script / train stage: "
        "above 1, the stage is faster. Times are medians over the A/B repeats.",
        "",
        "## Training loop (epochs with validation and checkpointing)",
        "",
        *table(
            [
                "variant",
                "overrides",
                "epochs",
                "plain loop s",
                "stage loop s",
                "loop ratio",
                "plain s/epoch",
                "stage s/epoch",
                "epoch ratio",
                "test acc plain / stage",
                "load before runs",
            ],
            [
                [
                    name,
                    ", ".join(f"{k}={v}" for k, v in x["overrides"].items()) or "params.yaml",
                    x["epochs"],
                    cell(plain(x, "loop_seconds")),
                    x["project"]["loop_seconds"],
                    cell(x["loop_ratio"], "{}x"),
                    cell(plain(x, "epoch_seconds")),
                    x["project"]["epoch_seconds"],
                    cell(x["epoch_ratio"], "{}x"),
                    f"{cell(plain(x, 'test_accuracy'), '{:.4f}')} / {x['project']['test_accuracy']:.4f}",
                    x["loadavg"],
                ]
                for name, x in v.items()
            ],
        ),
        "",
        "## Whole process (start to exit: imports, data, training; the plain script's test evaluation too)",
        "",
        *table(
            ["variant", "plain s", "stage s", "ratio", "peak RSS plain / stage MB"],
            [
                [
                    name,
                    cell(plain(x, "wall_seconds")),
                    x["project"]["wall_seconds"],
                    cell(x["wall_ratio"], "{}x"),
                    f"{cell(plain(x, 'peak_rss_mb'))} / {x['project']['peak_rss_mb']}",
                ]
                for name, x in v.items()
            ],
        ),
        "",
        "## GFLOP/s against the 2048² matmul of the same run",
        "",
        f"2048x2048 matmul, best of the run: float32 {mm['square_2048']} GFLOP/s, bfloat16 "
        f"{mm['square_2048_bfloat16']} GFLOP/s. FLOPs: 3x the forward FLOPs per training sample, 1x per "
        "validation sample.",
        "",
        *table(
            [
                "variant",
                "GFLOP per epoch",
                "plain GFLOP/s (% of fp32 matmul)",
                "stage GFLOP/s (% of fp32 matmul)",
            ],
            [
                [
                    name,
                    cell(x["flops_per_epoch"] and round(x["flops_per_epoch"] / 1e9, 1)),
                    f"{cell(plain(x, 'gflops'))} ({cell(x['reference_percent_of_matmul'])}%)",
                    f"{cell(x['project']['gflops'])} ({cell(x['project_percent_of_matmul'])}%)",
                ]
                for name, x in v.items()
            ],
        ),
    ]
    if "sweep" in r:
        s = r["sweep"]
        median, cpu, loops = (sweep_medians(s, k) for k in ("wall_seconds", "cpu_seconds", "loop_seconds"))
        faster = min(("jobs1", "jobs2"), key=median.get)
        labels = {
            "plain": "nine plain scripts in sequence",
            "jobs1": "`make ablations JOBS=1` (2 threads)",
            "jobs2": "`make ablations JOBS=2` (1 thread each)",
        }
        out += [
            "",
            f"## The study: {len(s['variants'])} variants, seed 0, {s['epochs']} epochs"
            + (f" (timed {s['date']})" if s.get("date") else ""),
            "",
            *table(
                ["mode", "wall s (median)", "runs", "plain / this", "CPU s, all cores", "training loops s"],
                [
                    [
                        labels[m],
                        round(t, 1),
                        sum(x["mode"] == m for x in s["runs"]),
                        f"{median['plain'] / t:.2f}x",
                        cell(cpu[m]),
                        cell(loops[m]),
                    ]
                    for m, t in median.items()
                ],
            ),
            "",
            f"Faster: {labels[faster]}, by {max(median['jobs1'], median['jobs2']) / median[faster]:.2f}x.",
        ]
        if cpu.get("jobs2") is not None:  # one thread each: a loop's wall time is its CPU time
            rest = (cpu["jobs2"] - loops["jobs2"]) / len(s["variants"])
            out.append(
                f"With JOBS=2, {cpu['jobs2'] - loops['jobs2']:.0f} of the {cpu['jobs2']:.0f} CPU seconds are "
                f"spent outside the training loops: {rest:.1f} s per run (DVC, two TensorFlow start-ups, "
                "compilation, evaluate, plot, the report)."
            )
    for p in r.get("profiles", []):
        out += profile_section(p, mm["square_2048"])
    out += [
        "",
        "## float32 and mixed_bfloat16, XLA on and off (the stage, once each, in sequence)",
        "",
        *table(
            ["precision", "jit_compile", "first epoch s", "s/epoch (median of 2..N)", "test accuracy"],
            [
                [
                    p["precision"],
                    p["jit_compile"],
                    p["first_epoch_seconds"],
                    p["epoch_seconds"],
                    f"{p['test_accuracy']:.4f}",
                ]
                for p in r["precision"]
            ],
        ),
    ]
    c = r["checks"]
    peak = max(x["project"]["peak_rss_mb"] for x in v.values())
    noop = max(c["noop_repro_seconds"])
    out += [
        "",
        "## Memory, no-op `dvc repro`, TensorFlow-free stages",
        "",
        *table(
            ["check", "measured", "target", "met"],
            [
                [
                    "train stage peak RSS (largest of the variants)",
                    f"{peak} MB",
                    f"<= {RSS_TARGET_MB} MB",
                    "yes" if peak <= RSS_TARGET_MB else "no",
                ],
                [
                    "no-op `dvc repro` (slowest of 3)",
                    f"{noop} s",
                    f"< {NOOP_TARGET_S} s",
                    "yes" if noop < NOOP_TARGET_S else "no",
                ],
                *[
                    [
                        f"{stage} imports TensorFlow",
                        "yes" if s["imports_tensorflow"] else "no",
                        "no",
                        "no" if s["imports_tensorflow"] else "yes",
                    ]
                    for stage, s in c["stages"].items()
                ],
            ],
        ),
    ]
    return "\n".join(out) + "\n"
