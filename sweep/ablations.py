"""Run the study of ablations.yaml as named DVC experiments: `python -m sweep.ablations [k=v ...]`.

Each variant runs once per seed, as the experiment `<variant>-s<seed>`: `dvc exp run --temp -n <name>
-S <its overrides> -S seed=<seed> -S <extra k=v>` from the committed params.yaml, --jobs of them at a
time. The workspace is never modified, and download and preprocess are restored from DVC's run
cache rather than run again. An experiment that already exists with the same params is skipped, one
with other params is replaced (--force replaces all); each is announced. A replaced experiment is
kept as <name>-replaced until its new run succeeds, and restored if it fails.
Exit status 1 names every experiment that failed or got stuck.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sweep.study import (
    add_selection_args,
    committed_params,
    describe,
    dvc,
    experiments,
    fail,
    format_value,
    selected_runs,
)

KEPT = "-replaced"  # suffix of an experiment being replaced, until its new run succeeds
LOGS = Path(".dvc/tmp/ablations")  # one log per run when several run at once (git-ignored by DVC)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set", nargs="*", metavar="KEY=VALUE", help="extra override for every run")
    add_selection_args(p, "run")
    # Two runs at once, one thread each, finished the nine-variant study 1.22x sooner than one after
    # another with two threads on a 2-core machine (`make bench`, README "Performance").
    jobs = min(2, len(os.sched_getaffinity(0)))
    p.add_argument("--jobs", type=int, default=jobs, help=f"runs at once, each with cores/N threads ({jobs})")
    p.add_argument("--force", action="store_true", help="re-run experiments that already exist")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (%(default)s)")
    return p.parse_args(argv)


def parse_overrides(items):
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"extra override {item!r} is not KEY=VALUE, e.g. train.epochs=1")
        if key == "seed":
            fail('seed is not an override: each run takes one of the seeds; use SEEDS="0 1" (--seeds 0 1)')
        overrides[key] = yaml.safe_load(value)
    return overrides


def plan(todo, extra, base, force):
    """The (name, overrides) of `todo` to run, after printing what happens to each and why."""
    existing = experiments()
    planned = []
    for name, own in todo:
        overrides = {**own, **extra}
        clash = {k: v for k, v in extra.items() if k in own and own[k] != v}
        if clash:
            print(f"warning: {name}: extra {describe(clash)} overrides the variant's own setting")
        unknown = [k for k in overrides if k not in base]
        if unknown:
            fail(f"{name}: {', '.join(unknown)} not in params.yaml")
        wanted = {**base, **overrides}
        old = existing.get(name)
        if old and old["state"] == "success":
            diff = {k: (old["params"].get(k), v) for k, v in wanted.items() if old["params"].get(k) != v}
            if not diff and not force:
                print(f"skip {name}: it exists with the same params ({old['rev'][:7]}; --force re-runs it)")
                continue
            why = "--force" if not diff else ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
            backup = f"{name}{KEPT}"
            dvc("exp", "remove", backup, check=False)  # left by an interrupted sweep
            dvc("exp", "rename", name, backup)
            print(f"replace {name}: {old['rev'][:7]} kept as {backup} until the new run succeeds ({why})")
        elif old:
            print(f"run {name}: its previous run is {old['state']}; it is cleared first")
            dvc("exp", "remove", name, check=False)
        else:
            print(f"run {name}: {describe(overrides)}")
        planned.append((name, overrides))
    return planned


def data_paths():
    """The datasets' mirror and checksum variables with relative paths made absolute: a --temp run
    works in a copy under .dvc/tmp, where `../shared/mnist` would name nothing."""
    names = [f"{p}_{v}" for p in ("MNIST", "FASHION_MNIST") for v in ("MIRROR", "SHA256SUMS")]
    given = {k: os.environ[k] for k in names if os.environ.get(k, "").strip()}
    return {k: str(Path(v).resolve()) for k, v in given.items() if "://" not in v and Path(v).exists()}


def start(name, overrides, jobs):
    """Start one `dvc exp run --temp` in its own process group; with jobs > 1 its output goes to a log."""
    sets = [a for k, v in overrides.items() for a in ("-S", f"{k}={format_value(v)}")]
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *sets]
    env = {**os.environ, **data_paths()}
    if jobs == 1:
        return subprocess.Popen(cmd, env=env, start_new_session=True)
    # Runs share the cores: each trains with its share of threads rather than all of them.
    env["TRAIN_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def last_lines(name, jobs):
    """The end of a run's log, to say why it failed (with jobs == 1 it is already on the terminal)."""
    path = LOGS / f"{name}.log"
    if jobs == 1 or not path.exists():
        return ""
    lines = list(
        dict.fromkeys(line for line in path.read_text(errors="replace").splitlines() if line.strip())
    )
    return "; " + " / ".join(lines[-2:]) + f" (log: {path})"  # DVC repeats its last line


def run_all(todo, jobs, timeout):
    """Run `todo`, `jobs` runs at a time, in order; returns {name: problem} for those that failed."""
    pending, running, problems = list(todo), {}, {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, overrides = pending.pop(0)
                print(f"\n=== [{len(todo) - len(pending)}/{len(todo)}] {name}", flush=True)
                running[name] = (start(name, overrides, jobs), time.monotonic())
            time.sleep(0.5)
            for name, (proc, began) in list(running.items()):
                code, took = proc.poll(), time.monotonic() - began
                if code is None and took > timeout:
                    os.killpg(proc.pid, signal.SIGTERM)  # dvc and the stage it runs
                    proc.wait()
                    problems[name] = f"stuck: still running after {timeout:.0f} s, killed"
                elif code:
                    problems[name] = f"failed: dvc exp run exited {code}{last_lines(name, jobs)}"
                elif code == 0:
                    print(f"=== {name} done in {took:.0f} s", flush=True)
                else:
                    continue
                del running[name]
    except KeyboardInterrupt:
        for proc, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        raise
    return problems


def settle_replaced(todo, problems):
    """Drop the kept copy of each replaced experiment whose new run succeeded; restore the others."""
    kept = experiments()
    for name, _ in todo:
        backup = f"{name}{KEPT}"
        if backup not in kept:
            continue
        if name in problems:
            dvc("exp", "remove", name, check=False)  # the failed run, so the name is free again
            dvc("exp", "rename", backup, name)
            print(f"{name}: the new run failed; the previous one ({kept[backup]['rev'][:7]}) is kept")
        else:
            dvc("exp", "remove", backup)


def main(argv=None):
    args = parse_args(argv)
    _, wanted = selected_runs(args)
    if args.jobs < 1:
        fail(f"--jobs must be a positive number of runs at once, got {args.jobs}")
    git = ["git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml", "stages"]
    dirty = subprocess.run(git, capture_output=True, text=True).stdout
    if dirty.strip():
        fail(f"uncommitted changes would leak into every experiment; commit or stash them first:\n{dirty}")
    todo = plan(wanted, parse_overrides(args.set), committed_params(), args.force)
    problems = run_all(todo, args.jobs, args.timeout)
    settle_replaced(todo, problems)
    ran, skipped = len(todo) - len(problems), len(wanted) - len(todo)
    print(f"\nablations: {ran} run, {skipped} skipped, {len(problems)} failed")
    for name, problem in problems.items():
        print(f"  {name}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
