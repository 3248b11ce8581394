"""Run one experiment of the study in a fresh clone and publish it: `python -m sweep.worker NAME [k=v ...]`.

NAME is `<variant>-s<seed>` of ablations.yaml. In a temporary clone of the git remote at the
study's commit (DVC locks a repository, so workers never share one): check both remotes, skip
the run if `origin` has it with the same params, `dvc exp run --pull -n NAME -S ...`, then push
the data and run cache to the DVC remote and, last, the experiment's git ref (`dvc exp push`
alone pushes the ref first). A worker killed before that last step publishes no ref, so nobody
sees its run, and running it again completes it.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sweep import study
from sweep.study import fail, sh

CHECK_TIMEOUT = 60  # seconds a remote may take to answer before it counts as unreachable


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="<variant>-s<seed>, e.g. baseline-s0")
    study.add_run_args(p)
    study.add_selection_args(p)
    p.add_argument("--rev", help="the study's commit (default: HEAD of the repository here)")
    p.add_argument("--git-remote", help="URL to clone and push to (default: origin of the repository here)")
    p.add_argument("--dvc-remote", help="DVC remote URL (default: the default one here, else the commit's)")
    p.add_argument("--result", help="write {name, status, seconds of each step, error} here as JSON")
    p.add_argument("--trial", action="store_true", help="NAME is a trial of `make tune`: KEY=VALUE are all")
    return p.parse_intermixed_args(argv)


def wanted_run(name, study_file, extra, trial=False):
    """(overrides, full flat params) of NAME, from the clone's study file (unless a `trial`'s, whose
    overrides are `extra`) and params.yaml."""
    overrides = {}
    if not trial:
        variants, run = study.load_study(study_file), study.parse_run_name(name)
        if run is None or run[0] not in {e["name"] for e in variants}:
            fail(f"{name}: not <variant>-s<seed> with a variant of {study_file}")
        [(_, overrides)] = study.runs(variants, [run[1]], only=[run[0]])
    overrides.update(extra)
    base = study.committed_params()
    study.check_known([(name, overrides)], base)
    return overrides, {**base, **overrides}


def dvc_config(key):
    return sh("dvc", "config", key, check=False)


def dvc_remote_url():
    """URL of the default DVC remote of the repository here (config.local included), or ''."""
    name = dvc_config("core.remote")
    url = name and dvc_config(f"remote.{name}.url")
    return url if not url or "://" in url else str((Path(".dvc") / url).resolve())  # a path: from .dvc/


def check_dvc_remote(url=None):
    """The default DVC remote here, after checking that it answers; fails in one line."""
    if url:  # into the clone's config.local: git-ignored, never committed
        sh("dvc", "remote", "add", "--local", "--force", "--default", "study", url)
    remote = dvc_config("core.remote")
    if not remote:
        fail("no DVC remote: `dvc remote add -d NAME URL` (add --local to keep it out of git)")
    # Its top level, with its config and credentials: a missing path, bucket or host fails, and so
    # does a shared path not mounted on this node (which DVC would otherwise create here).
    sh("dvc", "ls-url", f"remote://{remote}/", what=f"DVC remote {remote} unreachable", timeout=CHECK_TIMEOUT)
    return remote


def published(ref, wanted):
    """(commit, same params) of the experiment on origin, or (None, False)."""
    listing = sh("git", "ls-remote", "origin", ref, timeout=CHECK_TIMEOUT).split()
    if not listing:
        return None, False
    sh("git", "fetch", "-q", "origin", ref, timeout=CHECK_TIMEOUT)
    params = study.flatten(yaml.safe_load(sh("git", "show", f"{listing[0]}:params.yaml")))
    return listing[0], params == wanted


def publish(args, seconds):
    """Everything after the argument checks; returns "done" or "skipped"."""
    url = args.git_remote or sh("git", "remote", "get-url", "origin", what="no origin: pass --git-remote")
    rev = args.rev or sh("git", "rev-parse", "HEAD", what="not in a git repository: pass --rev")
    dvc_url = args.dvc_remote or dvc_remote_url()
    extra = study.parse_overrides(args.set)
    sh("git", "ls-remote", "--heads", url, what=f"git remote {url} unreachable", timeout=CHECK_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix=f"worker-{args.name}-") as tmp:
        start = time.monotonic()
        sh("git", "clone", "-q", "--no-checkout", url, tmp, timeout=CHECK_TIMEOUT * 5)
        os.chdir(tmp)
        if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True).returncode:
            fail(f"commit {rev} is not on {url}: push it first")
        sh("git", "checkout", "-q", "--detach", rev)
        rev = sh("git", "rev-parse", "HEAD")
        seconds["clone"] = time.monotonic() - start
        start = time.monotonic()
        remote = check_dvc_remote(dvc_url)
        overrides, wanted = wanted_run(args.name, args.study, extra, args.trial)
        ref = study.exp_ref(rev, args.name)
        commit, same = published(ref, wanted)
        seconds["check"] = time.monotonic() - start
        if same and not args.force:
            print(f"skip {args.name}: on {url} with the same params ({commit[:7]})", flush=True)
            return "skipped"
        print(f"{'replace' if commit else 'run'} {args.name}: {study.describe(overrides)}", flush=True)
        start = time.monotonic()
        # --pull: a stage in the remote's run cache (download; preprocess for the same seed and
        # preprocess params) is restored with its data; whatever is missing just runs.
        cmd = ["dvc", "exp", "run", "--pull", "-n", args.name, *study.dvc_set_args(overrides)]
        proc = subprocess.Popen(cmd, process_group=0)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # dvc and the stage it runs, not this worker
            proc.wait()
            fail(f"{args.name}: dvc exp run still running after {args.timeout:.0f} s, stopped")
        if code:
            fail(f"{args.name}: dvc exp run exited {code}")
        seconds["run"] = time.monotonic() - start
        start = time.monotonic()
        sh("dvc", "push", "--run-cache", "-r", remote)
        force = ["--force"] if commit else []  # over the run with other params, or --force's
        sh("dvc", "exp", "push", "--no-cache", *force, "origin", args.name)
        seconds["push"] = time.monotonic() - start
        print(f"done {args.name}: published to {url} and DVC remote {remote}", flush=True)
        return "done"


def main(argv=None):
    args = parse_args(argv)
    # Stage commands call `python` and `dvc`: this interpreter's, whoever started the worker.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ["GIT_TERMINAL_PROMPT"] = "0"  # an unreachable remote fails instead of asking for a password
    result = {"name": args.name, "status": "failed", "seconds": {}}
    try:
        result["status"] = publish(args, result["seconds"])
    except SystemExit as e:
        result["error"] = str(e.code)
        raise
    finally:
        if args.result:
            Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
