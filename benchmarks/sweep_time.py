"""The nine-variant study timed end to end: `make ablations` at JOBS=1 and JOBS=2 against the plain scripts.

Part of `make bench` (run.py calls bench()); SWEEP=0 / --no-sweep skips it. Each mode runs the study's
variants at seed 0 from the same committed params.yaml in a scratch repository: `make ablations`'s two
commands (sweep/ablations.py, then sweep/report.py), or reference.py once per variant in sequence with
the variant's overrides. Modes alternate in order (A B C, C B A, ...) when repeated.
"""

import datetime
import json
import resource
import shutil
import subprocess
import sys
import time

import yaml

from benchmarks.run import HERE, ROOT, WORK, env, loadavg, reference_args, with_overrides

FILES = ("stages", "sweep", "dvc.yaml", "ablations.yaml", ".dvc/config", ".dvcignore", ".gitignore")
MODES = ("plain", "jobs1", "jobs2")


def call(cmd, repo, check=True):
    subprocess.run(cmd, cwd=repo, env=env(), check=check, capture_output=True)


def scratch_repo(base, variants):
    """A committed copy of the project whose run cache already holds every variant's prepared data."""
    repo = WORK / "sweep"
    shutil.rmtree(repo, ignore_errors=True)
    for name in FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            repo / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    (repo / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        call(git + args, repo)
    # Preprocessing is not what is timed: run each variant's once, so every mode restores it from the cache.
    for own in {
        yaml.safe_dump(v["set"]) for v in variants if any(k.startswith("preprocess.") for k in v["set"])
    }:
        (repo / "params.yaml").write_text(yaml.safe_dump(with_overrides(base, yaml.safe_load(own))))
        call(["dvc", "repro", "-q", "preprocess"], repo)
    call(["git", "checkout", "params.yaml"], repo)
    call(["dvc", "repro", "-q", "preprocess"], repo)
    return repo


def cpu_seconds():
    """User and system CPU seconds of every finished child process so far (dvc's stages included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_loops(repo):
    """The experiments' training loops, summed: train_seconds of metrics/train/metrics.json."""
    show = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, env=env(), capture_output=True, check=True
    )
    revs = [r for b in json.loads(show.stdout) for e in b.get("experiments") or [] for r in e["revs"]]
    metrics = [((r.get("data") or {}).get("metrics") or {}).get("metrics/train/metrics.json") for r in revs]
    return sum(((m or {}).get("data") or {}).get("train_seconds", 0) for m in metrics)


def time_mode(mode, repo, base, variants):
    started, load, cpu, loops = time.perf_counter(), loadavg(), cpu_seconds(), 0.0
    if mode == "plain":
        for v in variants:
            params = with_overrides(base, {**v["set"], "seed": 0})
            cmd = [
                sys.executable,
                HERE / "reference.py",
                *reference_args(params, v["set"]),
                "--out",
                "ref.json",
            ]
            call(cmd, repo)
            loops += sum(json.loads((repo / "ref.json").read_text())["epoch_seconds"])
    else:
        call(["dvc", "exp", "remove", "-A"], repo, check=False)  # every mode runs all nine afresh
        jobs = mode.removeprefix("jobs")
        only = ",".join(v["name"] for v in variants)
        call([sys.executable, "-m", "sweep.ablations", "--seeds", "0", "--only", only, "--jobs", jobs], repo)
        call([sys.executable, "-m", "sweep.report", "--seeds", "0", "--only", only], repo)
        loops = train_loops(repo)
    return {
        "mode": mode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds() - cpu, 1),  # all cores: what the mode costs the machine
        "loop_seconds": round(loops, 1),  # the nine training loops' wall time, summed
        "loadavg_before": load,
    }


def bench(base, repeats=1):
    # The nine MLP variants on MNIST: the plain script has no CNN, and the other dataset is another task.
    study = yaml.safe_load((ROOT / "ablations.yaml").read_text())["experiments"]
    variants = [v for v in study if not {"model.type", "data.dataset"} & set(v["set"])]
    repo = scratch_repo(base, variants)
    runs = []
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            print(f"bench: sweep {mode} ({r + 1}/{repeats}), load {loadavg()[0]}", flush=True)
            runs.append(time_mode(mode, repo, base, variants))
    return {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "variants": [v["name"] for v in variants],
        "epochs": base["train"]["epochs"],
        "runs": runs,
    }
