"""`make bench`: the plain Keras script against the train stage, interleaved A/B, plus the matmul limit.

Writes benchmarks/results.json and benchmarks/results.md. `--quick` runs fewer epochs and repeats.
FLOP convention (the issue's): a training sample costs 3x the forward FLOPs of the MLP
(2 * sum of in*out over the Dense layers), a validation sample 1x; biases, activations, dropout,
softmax and the optimizer are not counted. Epoch time is the median of epochs 2..N, from epoch
end to epoch end, so it includes validation and checkpointing for both scripts.
"""

import argparse
import datetime
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
WORK = HERE / ".work"  # scratch project copy with its own prepared data (git-ignored)
N_TRAIN, N_VAL = 48000, 12000
# name: (hidden_units, batch_size, epochs, repeats), full run / --quick
VARIANTS = {
    "baseline": ((512, 128, 10, 2), (512, 128, 3, 1)),
    "batch32": ((512, 32, 3, 2), (512, 32, 2, 1)),
    "hidden128": ((128, 128, 4, 2), (128, 128, 2, 1)),
    "hidden2048": ((2048, 128, 3, 1), (2048, 128, 2, 1)),
}


def env():
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def loadavg():
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def measure(cmd, cwd):
    """Run cmd; return its stdout, wall and CPU seconds, peak RSS (MB) and the load average before."""
    load = loadavg()
    with open(WORK / "stdout.txt", "w+") as out, open(WORK / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env())
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    return stdout, {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "loadavg_before": load,
    }


def forward_flops(hidden, inputs=784, classes=10):
    dims = [inputs, hidden, hidden, classes]
    return sum(2 * a * b for a, b in itertools.pairwise(dims))


def epoch_flops(hidden):
    return 3 * forward_flops(hidden) * N_TRAIN + forward_flops(hidden) * N_VAL


def summarize(epoch_seconds, hidden, extra):
    median = statistics.median(epoch_seconds[1:])
    return {
        "epoch_seconds": epoch_seconds,
        "epoch_seconds_median": round(median, 3),
        "samples_per_second": round(N_TRAIN / median),
        "gflops": round(epoch_flops(hidden) / median / 1e9, 1),
        **extra,
    }


def run_reference(hidden, batch, epochs):
    stdout, usage = measure([sys.executable, HERE / "reference.py", *map(str, (hidden, batch, epochs))], WORK)
    r = json.loads(stdout.strip().splitlines()[-1])
    loop = round(sum(r["epoch_seconds"]), 2)  # fit's epochs: training, validation, checkpoints
    return summarize(r.pop("epoch_seconds"), hidden, {**r, "loop_seconds": loop, **usage})


def run_project(base_params, hidden, batch, epochs):
    params = yaml.safe_load(yaml.safe_dump(base_params))
    params["model"]["hidden_units"] = hidden
    params["train"].update(batch_size=batch, epochs=epochs)
    (WORK / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _, usage = measure([sys.executable, "stages/train.py"], WORK)
    metrics = json.loads((WORK / "metrics/train/metrics.json").read_text())
    # the stage's own timings: epoch 1 (tracing and XLA compilation included), then the median of the rest
    epoch_seconds = [metrics["first_epoch_seconds"], metrics["epoch_seconds"]]
    subprocess.run(
        [sys.executable, "stages/evaluate.py"], cwd=WORK, env=env(), check=True, capture_output=True
    )
    test = json.loads((WORK / "metrics/evaluate.json").read_text())["test_accuracy"]
    extra = {"val_accuracy": metrics["eval"]["accuracy"], "test_accuracy": test, **usage}
    extra["loop_seconds"] = metrics["train_seconds"]
    return summarize(epoch_seconds, hidden, extra)


def prepare():
    """A scratch copy of the project whose data/prepared holds the baseline's full-size splits."""
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK / "stages", ignore_errors=True)
    shutil.copytree(ROOT / "stages", WORK / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", WORK / "params.yaml")
    if (ROOT / "data/raw").is_dir() and not (WORK / "data/raw").is_dir():
        shutil.copytree(ROOT / "data/raw", WORK / "data/raw")
    if not (WORK / "data/raw").is_dir():
        mirror = os.environ.get("MNIST_MIRROR") or str(ROOT.parent / "shared" / "mnist")
        subprocess.run(
            [sys.executable, "stages/download.py"],
            cwd=WORK,
            env={**env(), "MNIST_MIRROR": mirror},
            check=True,
        )
    subprocess.run([sys.executable, "stages/preprocess.py"], cwd=WORK, env=env(), check=True)
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def matmul(variants):
    args = [str(v) for name, (hidden, batch, *_) in variants.items() for v in (batch, hidden)]
    stdout, usage = measure([sys.executable, HERE / "matmul.py", *args], WORK)
    return {**json.loads(stdout.strip().splitlines()[-1]), "loadavg_before": usage["loadavg_before"]}


def import_floor():
    """Peak RSS of a process that only imports TensorFlow/Keras, and that also loads the arrays."""
    code = "import keras, numpy as np; [dict(np.load(f'data/prepared/{s}.npz')) for s in ('train', 'val')]"
    return {
        "import_keras_mb": measure([sys.executable, "-c", "import keras"], WORK)[1]["peak_rss_mb"],
        "import_keras_and_load_uint8_data_mb": measure([sys.executable, "-c", code], WORK)[1]["peak_rss_mb"],
    }


def checks():
    """A no-op `dvc repro` and whether the non-training stages import TensorFlow, in a fresh repo."""
    repo = WORK / "dvc"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 1  # the check is about dvc, not training
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    os.environ["MNIST_MIRROR"] = str(WORK / "data/raw")  # the verified .gz files already fetched
    first = measure(["dvc", "repro", "-q"], repo)[1]
    noop = [measure(["dvc", "repro", "-q"], repo)[1]["wall_seconds"] for _ in range(3)]
    probe = "import runpy, sys; sys.path.insert(0, 'stages'); sys.argv = [sys.argv[1]]; "
    probe += "runpy.run_path(sys.argv[0], run_name='__main__'); print('tensorflow' in sys.modules)"
    stages = {}
    for stage in ("download", "preprocess", "plot"):
        stdout, usage = measure([sys.executable, "-c", probe, f"stages/{stage}.py"], repo)
        stages[stage] = {
            "imports_tensorflow": stdout.strip().endswith("True"),
            "wall_seconds": usage["wall_seconds"],
        }
    return {"first_repro_seconds": first["wall_seconds"], "noop_repro_seconds": noop, "stages": stages}


def ratio(a, b):
    return round(a / b, 2)


def report(results):
    lines = [
        f"Benchmark of {results['date']} on {results['machine']} ({results['mode']} run)",
        "",
        "| variant | epochs | plain s/epoch | project s/epoch | speed-up | project samples/s "
        "| project GFLOP/s | % of 2048² matmul | plain / project val acc | plain / project test acc "
        "| plain / project peak RSS MB | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in results["variants"].items():
        ref, proj = v["reference"], v["project"]
        lines.append(
            f"| {name} | {v['epochs']} | {ref['epoch_seconds']} | {proj['epoch_seconds']} | {v['speedup']}x "
            f"| {proj['samples_per_second']} | {proj['gflops']} | {v['percent_of_2048_matmul']} "
            f"| {ref['val_accuracy']:.4f} / {proj['val_accuracy']:.4f} | {ref['test_accuracy']:.4f} / "
            f"{proj['test_accuracy']:.4f} | {ref['peak_rss_mb']} / {proj['peak_rss_mb']} | {v['loadavg']} |"
        )
    mm = results["matmul"]
    lines += [
        "",
        f"fp32 matmul, best of the run: 2048x2048 {mm['square_2048']:.0f} GFLOP/s; "
        "the matmuls of one training step at their own shapes (batch x hidden): "
        + ", ".join(f"{k} {s['gflops']:.0f}" for k, s in mm["steps"].items())
        + " GFLOP/s.",
        "Share of the project's epoch that its matmuls need at those rates: "
        + ", ".join(f"{n} {v['matmul_share_of_epoch']:.0%}" for n, v in results["variants"].items())
        + ".",
        "",
        "| hidden units | FLOPs vs 512 | plain epoch time vs 512 | project epoch time vs 512 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {h} | {s['flops']} | {s['reference']} | {s['project']} |" for h, s in results["scaling"].items()
    ]
    c = results["checks"]
    lines += [
        "",
        f"Memory floor: importing Keras alone peaks at {results['memory_floor']['import_keras_mb']} MB, "
        f"{results['memory_floor']['import_keras_and_load_uint8_data_mb']} MB with the uint8 arrays loaded.",
        f"No-op `dvc repro`: {', '.join(map(str, c['noop_repro_seconds']))} s. Stages importing TensorFlow: "
        + ", ".join(
            f"{k} {'yes' if s['imports_tensorflow'] else 'no'} ({s['wall_seconds']} s)"
            for k, s in c["stages"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (a few minutes)")
    quick = parser.parse_args().quick
    variants = {name: spec[1 if quick else 0] for name, spec in VARIANTS.items()}
    base = prepare()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        + next((ln.split(":")[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?"),
        "mode": "quick" if quick else "full",
        "flop_convention": "3x forward FLOPs per training sample + 1x per validation sample; "
        "forward = 2 * sum(in * out) over the Dense layers",
        "matmul_runs": [matmul(variants)],
        "memory_floor": import_floor(),
        "variants": {},
    }
    for name, (hidden, batch, epochs, repeats) in variants.items():
        runs = {"reference": [], "project": []}
        for r in range(repeats):  # A B, B A, ...: drifting load hits both alike
            for who in ("reference", "project") if r % 2 == 0 else ("project", "reference"):
                print(f"bench: {name} {who} ({r + 1}/{repeats}), load {loadavg()[0]}", flush=True)
                run = (
                    run_reference(hidden, batch, epochs)
                    if who == "reference"
                    else run_project(base, hidden, batch, epochs)
                )
                runs[who].append(run)
        results["variants"][name] = {
            "hidden_units": hidden,
            "batch_size": batch,
            "epochs": epochs,
            "runs": runs,
        }
    results["matmul_runs"].append(matmul(variants))
    results["checks"] = checks()

    best = results["matmul_runs"][0]  # the best rate of the run, shape by shape
    for later in results["matmul_runs"][1:]:
        best["square_2048"] = max(best["square_2048"], later["square_2048"])
        for key, step in later["steps"].items():
            if step["gflops"] > best["steps"][key]["gflops"]:
                best["steps"][key] = step
    results["matmul"] = {"square_2048": best["square_2048"], "steps": best["steps"]}
    for v in results["variants"].values():
        med = {
            who: statistics.median(r["epoch_seconds_median"] for r in runs) for who, runs in v["runs"].items()
        }
        first = {who: runs[0] for who, runs in v["runs"].items()}
        side = {
            who: {
                "epoch_seconds": round(med[who], 3),
                "samples_per_second": round(N_TRAIN / med[who]),
                "gflops": round(epoch_flops(v["hidden_units"]) / med[who] / 1e9, 1),
                "val_accuracy": first[who]["val_accuracy"],
                "test_accuracy": first[who]["test_accuracy"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in v["runs"][who]),
            }
            for who in med
        }
        step = best["steps"][f"{v['batch_size']}x{v['hidden_units']}"]
        steps, val_steps = -(-N_TRAIN // v["batch_size"]), -(-N_VAL // v["batch_size"])
        bound = steps * step["step_matmul_seconds"] + val_steps * step["forward_matmul_seconds"]
        v.update(
            reference=side["reference"],
            project=side["project"],
            speedup=ratio(med["reference"], med["project"]),
            percent_of_2048_matmul=round(100 * side["project"]["gflops"] / best["square_2048"], 1),
            matmul_bound_epoch_seconds=round(bound, 3),
            matmul_share_of_epoch=round(bound / med["project"], 3),
            loadavg=sorted({r["loadavg_before"][0] for runs in v["runs"].values() for r in runs}),
        )
    vs = results["variants"]
    results["scaling"] = {
        h: {
            "flops": ratio(epoch_flops(h), epoch_flops(512)),
            **{
                who: ratio(vs[n][who]["epoch_seconds"], vs["baseline"][who]["epoch_seconds"])
                for who in ("reference", "project")
            },
        }
        for h, n in ((128, "hidden128"), (512, "baseline"), (2048, "hidden2048"))
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
