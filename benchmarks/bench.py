"""`make bench`: the train stage against the plain Keras script on TensorFlow and on JAX, interleaved.

Each variant runs ROUNDS rounds of three fresh processes in rotating order, in one scratch copy of the
project with prepared data: the stage (`python -m stages.train`, then evaluate), benchmarks/reference.py
(Keras fit) under KERAS_BACKEND=tensorflow, and the same under jax. Each hands its result over as a
JSON file; os.wait4 gives its wall time and peak RSS. docs/performance.md says what each figure means.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from stages.common import import_keras

import numpy as np
import yaml

from benchmarks.tables import markdown
from stages.train import build_model

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / ".tmp-bench"  # the scratch project (git-ignored)
# name: params.yaml overrides (dotted, as `dvc exp run -S`) of the MLP's model.* and train.* (one data
# set). No CNN: JAX's convolutions on this CPU would take a third of the run.
VARIANTS = {
    "baseline": {},
    "batch32": {"train.batch_size": 32, "train.epochs": 3},
    "hidden2048": {"model.hidden_units": 2048, "train.epochs": 3},
}
ROUNDS = 3  # each side once in each place of the order
QUICK = {"preprocess.train_size": 6000, "preprocess.test_size": 2000, "train.epochs": 2}


def with_overrides(params, overrides):
    """A copy of params with {"section.key": value} overrides applied."""
    params = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    return params


def forward_flops(model):
    """FLOPs of one sample's forward pass: 2 per multiply-add of each kernel, at each output pixel."""
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel")]
    return sum(2 * math.prod(k.kernel.shape) * math.prod(k.output.shape[1:-1]) for k in kernels)


def summarize(runs, flops, matmul):
    """Per side: medians over the rounds, GFLOP/s, its share of the matmul rate, and the median over
    the rounds of its time over the stage's in the same round."""
    sides = {}
    for side, rs in runs.items():
        s = sides[side] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        s["gflops"] = round(flops / s["epoch_seconds"] / 1e9, 1)
        s["percent_of_matmul"] = round(100 * s["gflops"] / matmul, 1)
        for key in ("loop_seconds", "wall_seconds"):
            ratios = [a[key] / b[key] for a, b in zip(rs, runs["stage"], strict=True)]
            s[key.replace("seconds", "ratio")] = round(statistics.median(ratios), 2)
    return sides


def child(cmd, cwd=WORK, **env):
    """Run cmd to its end; its wall seconds and peak RSS (its own rusage, from os.wait4)."""
    log = WORK / "child.log"  # the last child's output, kept for when it fails
    with open(log, "w") as out:
        start, cmd = time.perf_counter(), list(map(str, cmd))
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=out, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: {' '.join(cmd)} failed in {cwd}; its output is in {log}")
    return {"wall_seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": usage.ru_maxrss // 1024}


def read(name):
    return json.loads((WORK / name).read_text())


def prepare(params):
    """The scratch project: stages/ and params.yaml, with its data downloaded and prepared."""
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.copytree(HERE.parent / "stages", WORK / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (WORK / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("download", "preprocess"):
        child([sys.executable, "-m", f"stages.{stage}"])
    return [len(np.load(WORK / f"data/prepared/{s}.npz")["y"]) for s in ("train", "val")]


def run_side(side):
    """One side's run: its process's wall time and peak RSS, its loop, epoch, test accuracy, weights."""
    if side == "stage":
        # Its XLA cache starts empty with the scratch copy: the first round compiles, the others load.
        usage = child([sys.executable, "-m", "stages.train"], XLA_CACHE=str(WORK / "xla-cache"))
        child([sys.executable, "-m", "stages.evaluate"])  # not timed: the test accuracy
        m = read("metrics/train/metrics.json") | read("metrics/evaluate.json")
    else:
        usage = child([sys.executable, HERE / "reference.py", "--out", "plain.json"], KERAS_BACKEND=side)
        m = read("plain.json")
    seconds = {"loop_seconds": m["train_seconds"], "epoch_seconds": m["epoch_seconds"]}
    return usage | seconds | {"test_accuracy": m["test_accuracy"], "params": m["params"]}


def matmul():
    child([sys.executable, HERE / "matmul.py", "--out", "matmul.json"])
    return read("matmul.json")["gflops"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, 2 epochs, 1 round: checks the code")
    parser.add_argument("--profile", action="store_true", help="also where an MLP epoch's time goes")
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    base = with_overrides(yaml.safe_load((HERE.parent / "params.yaml").read_text()), quick)
    cpu = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln)
    installed = {d.name.lower().replace("_", "-"): d.version for d in metadata.distributions()}
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M"),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores, {cpu.split(': ')[1]}",
        "quick": args.quick,
        "versions": {p: installed.get(p) for p in ("tensorflow-cpu", "keras", "jax", "jaxlib")},
        "loadavg": {"start": os.getloadavg()},
        "variants": {},
    }
    n_train, n_val = prepare(base)
    results["matmul_gflops"] = [matmul()]
    sides = ["stage", "tensorflow", "jax"][: 3 if results["versions"]["jax"] else 2]
    for name, overrides in VARIANTS.items():
        params = with_overrides(base, overrides | quick)
        (WORK / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        runs = {side: [] for side in sides}
        for r in range(1 if args.quick else ROUNDS):
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # A B C, B C A, C A B
                print(f"bench: {name} {side} (round {r + 1}), load {os.getloadavg()[0]:.2f}", flush=True)
                runs[side].append(run_side(side))
        if len({r["params"] for rs in runs.values() for r in rs}) > 1:
            sys.exit(f"error: {name}: the sides trained models of different sizes; align reference.py's")
        results["variants"][name] = dict(overrides=overrides, epochs=params["train"]["epochs"], runs=runs)
    if args.profile:  # the 512- and 2048-unit MLPs
        flags = ["--out", WORK / "p.json", *(["--samples", 6000, "--repeats", 1] if args.quick else [])]
        child([sys.executable, "-m", "benchmarks.profile_step", *flags], HERE.parent)
        results["profiles"] = read("p.json")
    results["matmul_gflops"].append(matmul())
    results["loadavg"]["end"] = os.getloadavg()
    import_keras()  # only now: exec keeps a parent's peak RSS in each child's, so keep this one small
    for v in results["variants"].values():
        model = build_model(with_overrides(base, v["overrides"] | quick)["model"])  # the stage's model
        v["flops_per_epoch"] = forward_flops(model) * (3 * n_train + n_val)
        v["sides"] = summarize(v["runs"], v["flops_per_epoch"], max(results["matmul_gflops"]))
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    print(f"bench: wrote {HERE / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
