"""`make bench`: the train stage against a plain Keras script, interleaved A/B, with the matmul limit.

Writes benchmarks/results.json and benchmarks/results.md. `--quick` shrinks data and epochs (minutes),
`--no-sweep` skips timing the nine-variant study (the expensive part), `--sweep-only` times only it.
FLOP convention (the issue's): a training sample costs 3x the forward FLOPs of the model
(2 per multiply-add of the Dense and Conv2D layers), a validation sample 1x; biases, activations,
pooling, dropout, softmax and the optimizer are not counted. Epoch time is the median of epochs 2..N,
from epoch end to epoch end, so it includes validation and checkpointing for both scripts.
"""

import argparse
import datetime
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from sweep.study import flatten

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
WORK = HERE / ".work"  # scratch project copies, one per data configuration (git-ignored)
# name: params.yaml overrides (dotted keys, as `dvc exp run -S`); a row is one line.
VARIANTS = {
    "baseline": {},
    "batch32": {"train.batch_size": 32, "train.epochs": 3},
    "hidden128": {"model.hidden_units": 128, "train.epochs": 4},
    "hidden2048": {"model.hidden_units": 2048, "train.epochs": 3},
    "bfloat16": {"train.precision": "mixed_bfloat16", "train.epochs": 4},
    "cnn": {"model.type": "cnn", "model.dropout": 0.5, "train.optimizer": "adam", "train.epochs": 3},
    "fashion-mlp": {"data.dataset": "fashion-mnist", "train.optimizer": "adam", "train.epochs": 3},
    "fashion-cnn": {
        "data.dataset": "fashion-mnist",
        "model.type": "cnn",
        "model.padding": "same",
        "model.dense_units": 128,
        "model.dropout": 0.5,
        "train.optimizer": "adam",
        "train.epochs": 3,
    },
}
REPEATS = {"baseline": 4}  # A B, B A, ...: 2 unless named; the headline row gets more (its plain side varies)
QUICK = {"preprocess.train_size": 6000, "preprocess.test_size": 2000, "train.epochs": 2}
PRECISION_EPOCHS = 3  # the float32 / mixed_bfloat16 x XLA on / off table: one sequential run each
# params the plain script takes, as its command-line flags; the stage's own implementation choices
# (jit_compile) have no counterpart. A variant setting any other key runs the stage side only.
REFERENCE_FLAGS = {
    "seed": "--seed",
    "model.type": "--model",
    "model.hidden_units": "--hidden-units",
    "model.hidden_layers": "--hidden-layers",
    "model.activation": "--activation",
    "model.dropout": "--dropout",
    "model.filters": "--filters",
    "model.kernel_size": "--kernel-size",
    "model.padding": "--padding",
    "model.dense_units": "--dense-units",
    "train.optimizer": "--optimizer",
    "train.learning_rate": "--learning-rate",
    "train.batch_size": "--batch-size",
    "train.epochs": "--epochs",
    "train.precision": "--precision",
}
REFERENCE_SAME = ("data.", "preprocess.", "train.jit_compile")  # the data it reads; fit has no XLA knob


def with_overrides(params, overrides):
    params = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    return params


def reference_args(params, overrides):
    """reference.py's flags for these params, or None if a variant changes what it cannot do."""
    if [k for k in overrides if k not in REFERENCE_FLAGS and not k.startswith(REFERENCE_SAME)]:
        return None
    flat = flatten(params)
    values = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in flat.items()}
    args = [a for k, f in REFERENCE_FLAGS.items() if flat.get(k) is not None for a in (f, values[k])]
    return args + ([] if flat["preprocess.normalize"] else ["--no-normalize"])


def forward_flops(model, side=28, classes=10):
    """FLOPs of one sample's forward pass through the Conv2D and Dense layers (2 per multiply-add)."""
    flops, channels, dims = 0, 1, [side * side]
    if model.get("type", "mlp") == "cnn":
        k = model["kernel_size"]
        for filters in model["filters"]:  # each convolution is followed by 2x2 pooling
            out = side if model["padding"] == "same" else side - k + 1
            flops += 2 * out * out * k * k * channels * filters
            side, channels = out // 2, filters
        dims = [side * side * channels] + ([model["dense_units"]] if model["dense_units"] else [])
    else:
        dims += [model["hidden_units"]] * model["hidden_layers"]
    return flops + sum(2 * a * b for a, b in itertools.pairwise([*dims, classes]))


def epoch_flops(model, n_train, n_val):
    forward = forward_flops(model)
    return 3 * forward * n_train + forward * n_val


def ratio(a, b):
    return None if a is None or b is None else round(a / b, 2)


def gflops(flops, seconds):
    return None if flops is None else round(flops / seconds / 1e9, 1)


def env(**extra):
    mirrors = {"MNIST_MIRROR": "mnist", "FASHION_MNIST_MIRROR": "fashion-mnist"}
    shared = {
        k: str(ROOT.parent / "shared" / d)
        for k, d in mirrors.items()
        if (ROOT.parent / "shared" / d).is_dir()
    }
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**shared, **os.environ, "PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def loadavg():
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def measure(cmd, cwd, **extra_env):
    """Run cmd; return its stdout and wall and CPU seconds, peak RSS (MB) and the load average before."""
    load = loadavg()
    with open(WORK / "stdout.txt", "w+") as out, open(WORK / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env(**extra_env))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: {' '.join(map(str, cmd))} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return stdout, {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "loadavg_before": load,
    }


def prepare(params):
    """A scratch project copy holding `params`' prepared data; one per data configuration, reused."""
    key = json.dumps([params["seed"], params["data"], params["preprocess"]], sort_keys=True)
    work = WORK / f"data-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    shutil.rmtree(work / "stages", ignore_errors=True)
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (work / "data/prepared/test.npz").exists():
        for stage in ("download", "preprocess"):
            subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env(), check=True)
    return work


def run_reference(work, args):
    _, usage = measure([sys.executable, HERE / "reference.py", *args, "--out", "reference.json"], work)
    r = json.loads((work / "reference.json").read_text())
    seconds = r.pop("epoch_seconds")
    return {
        **r,
        **usage,
        "loop_seconds": round(sum(seconds), 2),  # fit's epochs: training, validation, checkpoints
        "first_epoch_seconds": seconds[0],
        "epoch_seconds": statistics.median(seconds[1:] or seconds),
    }


def run_project(work, params, **extra_env):
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _, usage = measure([sys.executable, "-m", "stages.train"], work, **extra_env)
    m = json.loads((work / "metrics/train/metrics.json").read_text())
    subprocess.run(
        [sys.executable, "-m", "stages.evaluate"], cwd=work, env=env(), check=True, capture_output=True
    )
    test = json.loads((work / "metrics/evaluate.json").read_text())["test_accuracy"]
    return {
        **usage,
        "loop_seconds": m["train_seconds"],  # the stage's epoch loop: training, validation, checkpoints
        "first_epoch_seconds": m["first_epoch_seconds"],  # includes tracing and XLA compilation
        "epoch_seconds": m["epoch_seconds"],  # median of epochs 2..N
        "val_accuracy": m["eval"]["accuracy"],
        "test_accuracy": test,
    }


def split_sizes(work):
    return [len(np.load(work / f"data/prepared/{s}.npz")["y"]) for s in ("train", "val")]


def side_summary(runs, flops):
    """Medians over the repeats of one side (plain script or stage) of a variant."""
    med = {
        k: statistics.median(r[k] for r in runs) for k in ("loop_seconds", "epoch_seconds", "wall_seconds")
    }
    return {
        **{k: round(v, 3) for k, v in med.items()},
        "gflops": gflops(flops, med["epoch_seconds"]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "test_accuracy": runs[0]["test_accuracy"],
        "val_accuracy": runs[0]["val_accuracy"],
    }


def compare(ref, proj, matmul):
    """The plain script's time over the stage's (>1: the stage is faster), and GFLOP/s as % of matmul."""
    out = {"project": proj, "reference": ref}
    for key in ("loop_seconds", "epoch_seconds", "wall_seconds"):
        out[f"{key.split('_')[0]}_ratio"] = ratio(ref and ref[key], proj[key])
    for who, side in (("reference", ref), ("project", proj)):
        out[f"{who}_percent_of_matmul"] = (
            None
            if not side or side["gflops"] is None
            else round(100 * side["gflops"] / matmul["square_2048"], 1)
        )
    return out


def bench_variant(name, own, base, quick, matmul, repeats):
    overrides = {**own, **quick}  # --quick's epochs win over the variant's
    params = with_overrides(base, overrides)
    work = prepare(params)
    n_train, n_val = split_sizes(work)
    args = reference_args(params, overrides)
    runs = {"reference": [], "project": []}
    for r in range(repeats):  # A B, B A, ...: drifting load hits both alike
        for who in ("reference", "project") if r % 2 == 0 else ("project", "reference"):
            if who == "reference" and args is None:
                continue
            print(f"bench: {name} {who} ({r + 1}/{repeats}), load {loadavg()[0]}", flush=True)
            runs[who].append(run_reference(work, args) if who == "reference" else run_project(work, params))
    flops = epoch_flops(params["model"], n_train, n_val)
    sides = {who: side_summary(rs, flops) if rs else None for who, rs in runs.items()}
    return {
        "overrides": own,
        "epochs": params["train"]["epochs"],
        "flops_per_epoch": flops,
        "loadavg": sorted({r["loadavg_before"][0] for rs in runs.values() for r in rs}),
        "runs": runs,
        **compare(sides["reference"], sides["project"], matmul),
    }


def precision_table(base, epochs):
    """float32 / mixed_bfloat16 with XLA on and off: the stage once each, one after another."""
    rows = []
    for precision, jit in itertools.product(("float32", "mixed_bfloat16"), (True, False)):
        params = with_overrides(
            base, {"train.precision": precision, "train.jit_compile": jit, "train.epochs": epochs}
        )
        print(f"bench: {precision} jit_compile={jit}, load {loadavg()[0]}", flush=True)
        rows.append({"precision": precision, "jit_compile": jit, **run_project(prepare(params), params)})
    return rows


def matmul():
    stdout, usage = measure([sys.executable, HERE / "matmul.py"], WORK)
    return {**json.loads(stdout.strip().splitlines()[-1]), "loadavg_before": usage["loadavg_before"]}


def profile(hidden_units, samples, repeats):
    """profile_step.py: one epoch of the hidden-`hidden_units` MLP with parts of the step taken out."""
    cmd = [sys.executable, "-m", "benchmarks.profile_step", "--hidden-units", str(hidden_units)]
    stdout, usage = measure([*cmd, "--samples", str(samples), "--repeats", str(repeats)], ROOT)
    flops = epoch_flops({"hidden_units": hidden_units, "hidden_layers": 2}, samples, 0)
    return {
        **json.loads(stdout.strip().splitlines()[-1]),
        "flops": flops,
        "loadavg_before": usage["loadavg_before"],
    }


def checks(work):
    """A no-op `dvc repro` and whether the non-training stages import TensorFlow, in a fresh repo."""
    repo = WORK / "dvc"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, repo / name)
    shutil.copy2(work / "params.yaml", repo / "params.yaml")  # the benchmark's data (--quick: small)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    first = measure(["dvc", "repro", "-q"], repo, MNIST_MIRROR=str(work / "data/raw"))[1]
    noop = [measure(["dvc", "repro", "-q"], repo)[1]["wall_seconds"] for _ in range(3)]
    probe = "import runpy, sys; sys.argv = [sys.argv[1]]; "
    probe += "runpy.run_module(sys.argv[0], run_name='__main__'); print('tensorflow' in sys.modules)"
    stages = {}
    for stage in ("download", "preprocess", "plot"):
        stdout, usage = measure([sys.executable, "-c", probe, f"stages.{stage}"], repo)
        stages[stage] = {
            "imports_tensorflow": stdout.strip().endswith("True"),
            "wall_seconds": usage["wall_seconds"],
        }
    return {
        "first_repro_seconds": first["wall_seconds"],
        "first_repro_peak_rss_mb": first["peak_rss_mb"],
        "noop_repro_seconds": noop,
        "stages": stages,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 2 epochs, one repeat (minutes)")
    parser.add_argument("--no-sweep", action="store_true", help="skip timing the nine-variant study")
    parser.add_argument("--sweep-repeats", type=int, default=1, help="passes over the study's three modes")
    parser.add_argument(
        "--sweep-only", action="store_true", help="time only the study; the rest of results.json is kept"
    )
    args = parser.parse_args()
    from benchmarks import report, sweep_time  # here, not at the top: sweep_time imports this module

    WORK.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    quick = QUICK if args.quick else {}
    if args.sweep_only:
        if not (HERE / "results.json").exists():
            sys.exit(
                "error: --sweep-only updates benchmarks/results.json, which is missing; run `make bench`"
            )
        results = json.loads((HERE / "results.json").read_text())
        results["sweep"] = sweep_time.bench(with_overrides(base, quick), args.sweep_repeats)
        return write(results, report)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    results = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + next((ln.split(":")[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?"),
        "mode": "quick" if args.quick else "full",
        "loadavg_start": loadavg(),
        "matmul_runs": [matmul()],
        "variants": {},
    }
    mm = results["matmul_runs"][0]
    for name, overrides in VARIANTS.items():
        results["variants"][name] = bench_variant(
            name, overrides, base, quick, mm, 1 if args.quick else REPEATS.get(name, 2)
        )
    samples, repeats = (6000, 1) if args.quick else (48_000, 3)
    results["profiles"] = [profile(units, samples, repeats) for units in (512, 2048)]
    results["matmul_runs"].append(matmul())
    results["matmul"] = {
        k: max(r[k] for r in results["matmul_runs"]) for k in ("square_2048", "square_2048_bfloat16")
    }
    for v in results["variants"].values():  # % of the best matmul rate of the run
        v.update(compare(v["reference"], v["project"], results["matmul"]))
    results["precision"] = precision_table(
        with_overrides(base, quick), quick.get("train.epochs", PRECISION_EPOCHS)
    )
    results["checks"] = checks(prepare(with_overrides(base, quick)))
    if not args.no_sweep:
        results["sweep"] = sweep_time.bench(with_overrides(base, quick), args.sweep_repeats)
    results["loadavg_end"] = loadavg()
    write(results, report)


def write(results, report):
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(report.markdown(results))
    print(report.markdown(results))


if __name__ == "__main__":
    main()
