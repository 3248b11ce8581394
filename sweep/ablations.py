"""Run the study of ablations.yaml as named DVC experiments: `python sweep/ablations.py [k=v ...]`.

Each experiment is `dvc exp run -n <name> -S <its overrides> -S <extra k=v>` from the committed
params.yaml, in a temporary directory (sequential, the default) or through DVC's queue
(--jobs N). The workspace is never modified, and download and preprocess are restored from
DVC's run cache rather than run again. An experiment that already exists with the same params
is skipped, one with other params is replaced (--force replaces all); each is announced. A
replaced experiment is kept as <name>-replaced until its new run succeeds, and restored if it fails.
Exit status 1 names every experiment that failed or got stuck.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import yaml
from study import STUDY, committed_params, describe, dvc, experiments, fail, format_value, load_study

POLL = 5  # seconds between looks at the queue
KEPT = "-replaced"  # suffix of an experiment being replaced, until its new run succeeds


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set", nargs="*", metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--study", default=str(STUDY), help="the study file (default %(default)s)")
    p.add_argument("--only", help="comma-separated names: run only these")
    p.add_argument("--jobs", type=int, default=0, help="use DVC's queue with N workers (0: sequential)")
    p.add_argument("--force", action="store_true", help="re-run experiments that already exist")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (%(default)s)")
    p.add_argument("--stall", type=float, default=180, help="seconds the queue may idle with work left")
    return p.parse_args(argv)


def parse_overrides(items):
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"extra override {item!r} is not KEY=VALUE, e.g. train.epochs=1")
        overrides[key] = yaml.safe_load(value)
    return overrides


def plan(study, extra, base, force):
    """[(name, overrides)] to run, after printing what happens to each experiment and why."""
    existing = experiments()
    todo = []
    for exp in study:
        name, overrides = exp["name"], {**exp["set"], **extra}
        clash = {k: v for k, v in extra.items() if k in exp["set"] and exp["set"][k] != v}
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
            dvc("queue", "remove", name, check=False)
        else:
            print(f"run {name}: {describe(overrides)}")
        todo.append((name, overrides))
    return todo


def run_args(name, overrides):
    sets = [a for k, v in overrides.items() for a in ("-S", f"{k}={format_value(v)}")]
    return ["dvc", "exp", "run", "-n", name, *sets]


def run_sequential(todo, timeout):
    """One `dvc exp run --temp` after another; returns {name: problem} for the ones that failed."""
    problems = {}
    for i, (name, overrides) in enumerate(todo, 1):
        print(f"\n=== [{i}/{len(todo)}] {name}", flush=True)
        start = time.monotonic()
        proc = subprocess.Popen([*run_args(name, overrides), "--temp"], start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # dvc and the stage it runs
            proc.wait()
            problems[name] = f"stuck: still running after {timeout:.0f} s, killed"
            continue
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        if code:
            problems[name] = f"failed: dvc exp run exited {code}"
        else:
            print(f"=== {name} done in {time.monotonic() - start:.0f} s", flush=True)
    return problems


def queue_status():
    """({name: status}, active workers) parsed from `dvc queue status`."""
    out = dvc("queue", "status", check=False).stdout
    tasks = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            tasks[fields[1]] = fields[-1]
    active = re.search(r"(\d+) active", out)
    return tasks, int(active.group(1)) if active else 0


def run_queue(todo, jobs, timeout, stall):
    """Queue every run, start N workers, and watch until each ends; never wait forever.

    Stuck: a run going for more than `timeout` s, no task starting or ending for `timeout` s,
    or work left but no active worker for `stall` s (DVC's known hangs all look like one of these).
    """
    for name, overrides in todo:
        dvc("queue", "remove", name, check=False)  # an old task of that name would answer for it
        dvc(*run_args(name, overrides)[1:], "--queue")
    # The workers it spawns inherit its output: captured, that pipe would stay open until they exit.
    subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], stdout=subprocess.DEVNULL, check=True)
    pending = {name for name, _ in todo}
    problems, running_since = {}, {}
    last, changed, idle_since = None, time.monotonic(), None
    while pending:
        time.sleep(POLL)
        tasks, active = queue_status()
        now = time.monotonic()
        if tasks != last:
            last, changed = tasks, now
        for name in sorted(pending):
            status = tasks.get(name, "missing")
            if status == "Success":
                print(f"=== {name} done", flush=True)
            elif status in ("Failed", "missing"):
                log = dvc("queue", "logs", name, check=False).stdout.strip().splitlines()[-3:]
                problems[name] = f"failed ({status.lower()} in the queue): " + " / ".join(log)
            elif status == "Running" and now - running_since.setdefault(name, now) > timeout:
                dvc("queue", "kill", name, check=False)
                problems[name] = f"stuck: running for more than {timeout:.0f} s, killed"
            else:
                continue
            pending.discard(name)
        idle_since = (idle_since or now) if pending and not active else None
        if idle_since and now - idle_since > stall:
            stuck = f"no active worker for {stall:.0f} s"
        elif pending and now - changed > timeout:
            stuck = f"no task started or ended for {timeout:.0f} s"
        else:
            continue
        for name in pending:
            problems[name] = f"stuck: {tasks.get(name, 'missing').lower()}, {stuck}; queue stopped"
        dvc("queue", "stop", "--kill", check=False)
        break
    return problems


def settle_replaced(todo, problems):
    """Drop the kept copy of each replaced experiment whose new run succeeded; restore the others."""
    kept = experiments()
    for name, _ in todo:
        backup = f"{name}{KEPT}"
        if backup not in kept:
            continue
        if name in problems:
            dvc("queue", "remove", name, check=False)  # the failed run, so the name is free again
            dvc("exp", "remove", name, check=False)
            dvc("exp", "rename", backup, name)
            print(f"{name}: the new run failed; the previous one ({kept[backup]['rev'][:7]}) is kept")
        else:
            dvc("exp", "remove", backup)


def main(argv=None):
    args = parse_args(argv)
    study = load_study(args.study)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {e["name"] for e in study}
        if unknown:
            fail(f"--only: {', '.join(sorted(unknown))} not in {args.study}")
        study = [e for e in study if e["name"] in names]
    git = ["git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml", "stages"]
    dirty = subprocess.run(git, capture_output=True, text=True).stdout
    if dirty.strip():
        fail(f"uncommitted changes would leak into every experiment; commit or stash them first:\n{dirty}")
    todo = plan(study, parse_overrides(args.set), committed_params(), args.force)
    if args.jobs > 0:
        # The first run alone fills the run cache, so the queued ones restore download and
        # preprocess instead of each running them in parallel.
        problems = run_sequential(todo[:1], args.timeout)
        problems.update(run_queue(todo[1:], args.jobs, args.timeout, args.stall) if todo[1:] else {})
    else:
        problems = run_sequential(todo, args.timeout)
    settle_replaced(todo, problems)
    ran, skipped = len(todo) - len(problems), len(study) - len(todo)
    print(f"\nablations: {ran} run, {skipped} skipped, {len(problems)} failed")
    for name, problem in problems.items():
        print(f"  {name}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
