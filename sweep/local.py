"""Run the study of ablations.yaml here, as named DVC experiments: `python -m sweep.local [k=v ...]`.

Each variant runs once per seed, as the experiment `<variant>-s<seed>`: `dvc exp run -n <name>
-S <its overrides> -S seed=<seed> -S <extra k=v>` from the committed params.yaml, --jobs at a time in
this script's own pool (DVC's queue is unreliable with several workers: iterative/dvc #10673, #8417),
each in a git clone of its own that shares the workspace's DVC cache; its experiment is pushed back
when it succeeds. (`dvc exp run --temp` queues into one stash for all runs and takes its newest entry
without a lock, so two runs at once could both run the same one.) The workspace is never modified,
and download and preprocess are restored from DVC's run cache.
An experiment that exists with the same params is skipped, one with other params replaced (--force
replaces all): it is kept as <name>-replaced until its new run succeeds, and restored otherwise.
Ctrl-C stops the runs in flight, publishes none of them and removes their clones, and says which;
running the study again does the rest. One study at a time per workspace. Exit status: 1 for an
`error:` line (nothing ran), 3 when runs failed (each is named).
"""

import argparse
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from configobj import ConfigObj  # DVC's config format, written as its temporary workspaces write it
from dvc.config import Config

from sweep import study

REPLACED_SUFFIX = "-replaced"  # of an experiment being replaced, until its new run succeeds
RUNS = Path(".dvc/tmp/study")  # each run's clone, and its log when several run at once (git-ignored)
GRACE = 10  # seconds a stopped run has to clean up before it is killed
POLL = 0.1  # seconds between looks at the runs in flight: a run's end is noticed at most this late
# Two runs at once, one thread each, finished the nine-variant study sooner than one after another
# with two threads on a 2-core machine (benchmarks/results.md).
JOBS = min(2, len(os.sched_getaffinity(0)))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_selection_args(p, "run")
    study.add_run_args(p)
    p.add_argument("--jobs", type=int, default=JOBS, help=f"runs at once, each with cores/N threads ({JOBS})")
    return p.parse_args(argv)


def plan(todo, extra, base, force):
    """(the (name, overrides) of `todo` to run, {name: commit of its kept copy}), after printing what
    happens to each and why. A kept copy is the previous run of one replaced now, or one left by a
    study that was killed while replacing it; settle_replaced() decides what becomes of each."""
    existing = study.experiments()
    planned, kept = [], {}
    for name, own in todo:
        overrides = {**own, **extra}
        clash = {k: v for k, v in extra.items() if k in own and own[k] != v}
        if clash:
            print(f"warning: {name}: extra {study.describe(clash)} overrides the variant's own setting")
        wanted = {**base, **overrides}
        old, backup = existing.get(name), f"{name}{REPLACED_SUFFIX}"
        if backup in existing:  # left by a study that was killed
            kept[name] = existing[backup]["rev"]
        if old and old["state"] == "success":
            diff = {k: (old["params"].get(k), v) for k, v in wanted.items() if old["params"].get(k) != v}
            if not diff and not force:
                print(f"skip {name}: it exists with the same params ({old['rev'][:7]}; --force re-runs it)")
                continue
            why = "--force" if not diff else ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
            study.sh("dvc", "exp", "remove", backup, check=False)  # the killed study's copy is older
            study.sh("dvc", "exp", "rename", name, backup)
            kept[name] = old["rev"]
            print(f"replace {name}: {old['rev'][:7]} kept as {backup} until the new run succeeds ({why})")
        elif old:
            print(f"run {name}: its previous run is {old['state']}; it is cleared first")
            study.sh("dvc", "exp", "remove", name, check=False)
        else:
            print(f"run {name}: {study.describe(overrides)}")
        planned.append((name, overrides))
    return planned, kept


def data_paths():
    """The datasets' mirror and checksum variables with relative paths made absolute: a run
    works in a clone under .dvc/tmp, where `../shared/mnist` would name nothing."""
    names = [f"{p}_{v}" for p in ("MNIST", "FASHION_MNIST") for v in ("MIRROR", "SHA256SUMS")]
    given = {k: os.environ[k] for k in names if os.environ.get(k, "").strip()}
    return {k: str(Path(v).resolve()) for k, v in given.items() if "://" not in v and Path(v).exists()}


@contextlib.contextmanager
def ctrl_c_held():
    """Ctrl-C held back until the block ends, so that a run started inside is in `running` (where
    stop() finds it) before the KeyboardInterrupt comes; a run left out would finish on its own."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def unblock_ctrl_c():  # in the child, before exec: a blocked signal mask is inherited
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@functools.cache
def workspace():
    """(HEAD's commit, what a run's clone takes from the workspace): the git identity as `git clone
    -c` options, and the local DVC config (relative paths resolved) with the workspace's DVC cache."""
    config = Config(dvc_dir=".dvc", validate=False)
    local = {section: values for section, values in config.read("local").items() if values}
    cache = config.get("cache", {}).get("dir") or os.path.abspath(".dvc/cache")  # as `dvc cache dir`
    local["cache"] = {**local.get("cache", {}), "dir": cache}
    given = {key: value for key, value in study.git_identity().items() if value}
    identity = [arg for key, value in given.items() for arg in ("-c", f"user.{key}={value}")]
    return study.sh("git", "rev-parse", "HEAD"), identity, local


def clone(name):
    """A clone of the workspace's HEAD for one run, with the workspace's DVC cache, local DVC config
    and git identity (DVC's temporary workspaces take the same)."""
    rev, identity, local = workspace()
    path = RUNS / name
    study.sh("git", "clone", "-q", "--no-checkout", *identity, ".", str(path))
    study.sh("git", "checkout", "-q", "--detach", rev, cwd=path)
    config = ConfigObj(local)
    config.filename = str(path / ".dvc/config.local")
    config.write()
    return path


def start(name, overrides, jobs):
    """Start one `dvc exp run` in its own clone and process group; with jobs > 1 its output goes to a log."""
    cmd = ["dvc", "exp", "run", "-n", name, *study.dvc_set_args(overrides)]
    env = {**os.environ, **data_paths()}
    group = {"cwd": clone(name), "start_new_session": True, "preexec_fn": unblock_ctrl_c}
    if jobs == 1:
        return subprocess.Popen(cmd, env=env, **group)
    # Runs share the cores: each trains with its share of threads rather than all of them.
    env["TRAIN_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    with open(RUNS / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **group)


def publish(name):
    """Push a finished run's experiment from its clone into the workspace's repository; "" or why not."""
    ref = study.exp_ref(workspace()[0], name)
    cmd = ["git", "push", "-q", "origin", ref]
    push = subprocess.run(cmd, cwd=RUNS / name, capture_output=True, text=True)
    return study.why(push) if push.returncode else ""


def last_lines(name, jobs):
    """The end of a run's log, to say why it failed (with jobs == 1 it is already on the terminal)."""
    path = RUNS / f"{name}.log"
    if jobs == 1 or not path.exists():
        return ""
    lines = list(
        dict.fromkeys(line for line in path.read_text(errors="replace").splitlines() if line.strip())
    )
    return "; " + " / ".join(lines[-2:]) + f" (log: {path})"  # DVC repeats its last line


def discard(name):
    """A run's clone, with whatever a killed run left in it."""
    shutil.rmtree(RUNS / name, ignore_errors=True)


def stop(procs):
    """Stop {name: dvc process} as Ctrl-C does, so that DVC stops its stage; one still running after
    GRACE seconds is killed. Their clones are removed."""
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.killpg(proc.pid, signal.SIGINT)  # dvc and the stage it runs, not this script
    deadline = time.monotonic() + GRACE
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        discard(name)


def run_all(todo, jobs, timeout, done, problems, more=None):
    """Run `todo`, `jobs` at a time, in order, adding each name to `done` or {name: why} to `problems`;
    `more(name)`, called as each run ends, returns runs to add (a search asks its next trials then).
    On Ctrl-C the runs in flight are stopped (problem "stopped") and KeyboardInterrupt raised again."""
    pending, running, started = list(todo), {}, 0
    for left in RUNS.glob("*/"):  # clones of a study that was killed: under the lock none is running
        shutil.rmtree(left)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, overrides = pending.pop(0)
                started += 1
                print(f"\n=== [{started}/{started + len(pending)}] {name}", flush=True)
                with ctrl_c_held():
                    running[name] = (start(name, overrides, jobs), time.monotonic())
            time.sleep(POLL)
            for name, (proc, began) in list(running.items()):
                code, took = proc.poll(), time.monotonic() - began
                if code is None and took > timeout:
                    stop({name: proc})
                    problems[name] = f"stuck: still running after {timeout:.0f} s, stopped"
                elif code:
                    problems[name] = f"failed: dvc exp run exited {code}{last_lines(name, jobs)}"
                elif code == 0 and (why := publish(name)):
                    problems[name] = f"failed: its experiment was not published: {why}"
                elif code == 0:
                    print(f"=== {name} done in {took:.0f} s", flush=True)
                    done.append(name)
                else:
                    continue
                discard(name)
                del running[name]
                pending += more(name) if more else []
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop({name: proc for name, (proc, _) in running.items()})
        problems.update(dict.fromkeys(running, "stopped"))
        raise


def settle_replaced(kept, finished):
    """Drop each kept copy {name: its commit} whose name holds a finished run (the copy is older);
    restore the others under their name."""
    for name, rev in kept.items():
        backup = f"{name}{REPLACED_SUFFIX}"
        if name in finished:
            study.sh("dvc", "exp", "remove", backup)
        else:
            study.sh("dvc", "exp", "remove", name, check=False)  # a failed run: free the name
            study.sh("dvc", "exp", "rename", backup, name)
            print(f"{name}: no new run; the previous one ({rev[:7]}) is kept")


def kept_copies(names):
    """({name: commit} of the kept copies of `names`, the names that hold a finished run) as DVC
    lists them: after a Ctrl-C, which can land anywhere in plan()."""
    listed = study.experiments()
    kept = {n: listed[n + REPLACED_SUFFIX]["rev"] for n in names if n + REPLACED_SUFFIX in listed}
    return kept, {n for n in names if listed.get(n, {}).get("state") == "success"}


def main(argv=None):
    # Ctrl-C raises KeyboardInterrupt even in a study started in the background (which would ignore
    # it), and the dvc processes start with its default action, so that stop() can use it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    if args.jobs < 1:
        study.fail(f"--jobs must be a positive number of runs at once, got {args.jobs}")
    wanted, extra, base = study.checked_runs(args)
    study.check_committed("would leak into every experiment; commit or stash them first")
    study.check_git_identity()
    names, done, problems = [name for name, _ in wanted], [], {}
    with study.lock_workspace():
        try:
            todo, kept = plan(wanted, extra, base, args.force)
            run_all(todo, args.jobs, args.timeout, done, problems)
        except KeyboardInterrupt:
            settle_replaced(*kept_copies(names))
            stopped = [name for name, problem in problems.items() if problem == "stopped"]
            what = f"stopped {', '.join(stopped)}" if stopped else "no run was in flight"
            print(f"\ninterrupted: {what}; {len(done)} finished and kept; run the study again for the rest")
            return 130
        skipped = set(names) - {name for name, _ in todo}  # they hold a finished run already
        settle_replaced(kept, skipped | set(done))
    print(f"\nstudy: {len(done)} run, {len(skipped)} skipped, {len(problems)} failed")
    for name, problem in problems.items():
        print(f"  {name}: {problem}")
    return study.RUNS_FAILED if problems else 0


if __name__ == "__main__":
    sys.exit(main())
