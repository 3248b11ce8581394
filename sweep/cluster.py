"""Run the study on a Ray cluster: `RAY_ADDRESS=HOST:PORT python -m sweep.cluster [k=v ...]`.

One Ray task per experiment (variant x seed), each running sweep/worker.py in a fresh clone on
whichever node has the CPUs free; a task whose node dies is retried on another. The workers
publish to the git remote `origin` and the default DVC remote, so this machine only schedules
and, at the end, collects every run with `dvc exp pull origin`. Credentials reach the tasks
through the environment, from the allow-list FORWARD only. Exit status as sweep/local.py's.
"""

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from sweep import study
from sweep.study import fail, sh
from sweep.worker import check_dvc_remote, dvc_remote_url

# Environment variables a task receives: cloud credentials, the git SSH command, the datasets'
# mirrors, TensorFlow's log level. Nothing else of this shell, and never a file of the repository.
FORWARD = re.compile(
    r"AWS_\w+|AZURE_\w+|GOOGLE_APPLICATION_CREDENTIALS|GIT_SSH_COMMAND|(FASHION_)?MNIST_\w+|TF_CPP_\w+"
)
SWEEP = Path(__file__).resolve().parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_selection_args(p, "run")
    study.add_run_args(p)
    study.add_cluster_args(p)
    return p.parse_args(argv)


def check_remotes(*paths):
    """The checks that would otherwise fail every task: `paths` committed, HEAD on origin, a DVC remote."""
    study.check_committed("would not reach the workers; commit and push them first", "sweep", *paths)
    sh("git", "fetch", "-q", "origin", what="git remote origin is missing or unreachable (`git remote add`)")
    if not sh("git", "branch", "-r", "--contains", "HEAD"):
        fail("HEAD is not on origin, so the workers cannot clone it: `git push origin HEAD` first")
    check_dvc_remote()


def plan(args):
    """([(name, overrides)], extra overrides), after check_remotes()."""
    wanted, extra, _ = study.checked_runs(args)
    check_remotes(args.study)
    return [(name, {**own, **extra}) for name, own in wanted], extra


@ray.remote
def run_one(name, argv, events):
    """The task: sweep/worker.py (shipped to the node as a py_module) in a subprocess; its result dict."""
    events.put((name, ray.util.get_node_ip_address()))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "sweep.worker", name, *argv, "--result", str(result)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = json.loads(result.read_text()) if result.exists() else {}
    return {"status": "failed", "error": f"worker exited {proc.returncode}", **found, "log": proc.stdout}


def watch(tasks, events, submit=None, more=None):
    """Wait for every task, showing queued/running/done/failed; {name: result}. `more(name, error)`,
    called as each ends (its experiment pulled here), returns runs to add, `submit(name, overrides)`ted."""
    results, attempts, running = {}, Counter(), set()
    bar = tqdm(total=len(tasks), unit="run", dynamic_ncols=True)

    while len(results) < len(tasks):
        ready, _ = ray.wait([r for r in tasks if tasks[r] not in results], num_returns=1, timeout=1)
        for name, node in events.get_nowait_batch(events.qsize()):
            attempts[name] += 1
            running.add(name)
            again = f", attempt {attempts[name]} (its node died)" if attempts[name] > 1 else ""
            bar.write(f"running {name} on {node}{again}")
        for ref in ready:
            name = tasks[ref]
            try:
                results[name] = ray.get(ref)
            except ray.exceptions.RayError as e:  # out of retries, or the task could not start
                results[name] = {"status": "failed", "error": str(e).strip().splitlines()[0], "log": ""}
            running.discard(name)
            result = results[name]
            took = sum(result.get("seconds", {}).values())
            bar.write(f"{result['status']} {name}" + (f" in {took:.0f} s" if took else ""))
            bar.update()
            lost = result["status"] == "failed"
            if more and not lost:
                sh("dvc", "exp", "pull", "origin", name, check=False)
            for new, overrides in more(name, result.get("error") if lost else None) if more else []:
                tasks[submit(new, overrides)] = new
                bar.total += 1
        ended = Counter(r["status"] for r in results.values())
        queued = len(tasks) - len(results) - len(running)
        ok, failed = ended["done"] + ended["skipped"], ended["failed"]
        bar.set_postfix_str(f"queued {queued}, running {len(running)}, done {ok}, failed {failed}")
    bar.close()
    return results


def join(env, cpus):
    """Connect to the cluster of RAY_ADDRESS, shipping sweep/ and `env` to the tasks, and check that a
    node can take one run at all: Ray would keep a task that asks for more CPUs queued forever."""
    address = os.environ.get("RAY_ADDRESS", "auto")
    host, _, port = address.rpartition(":")
    try:  # HOST:PORT of a head that is not there: ray.init would retry it for minutes
        if port.isdigit():
            socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        fail(f"RAY_ADDRESS={address}: no Ray head answers there ({e}); `ray start --head` prints its address")
    try:
        ray.init(
            runtime_env={"py_modules": [str(SWEEP)], "excludes": ["__pycache__"], "env_vars": env},
            log_to_driver=False,  # the workers' output comes back with their results
            logging_level=logging.WARNING,  # not its connection diary: the study's lines are what counts
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        fail(f"cannot join the Ray cluster at {address}: {e}")
    offered = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    study.check_cpus(offered, cpus, address)


def fan_out(todo, args, argv_of, more=None):
    """Run [(name, overrides)] as Ray tasks, each worker given argv_of(name, overrides) and the
    study's commit and remotes; {name: result}. `more` as watch() takes it."""
    rev, url = sh("git", "rev-parse", "HEAD"), sh("git", "remote", "get-url", "origin")
    join({k: v for k, v in os.environ.items() if FORWARD.fullmatch(k)}, args.cpus)
    # The progress queue lives on this node, so it survives the death of any other.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    common = ["--rev", rev, "--git-remote", url, "--dvc-remote", dvc_remote_url()]
    common += ["--timeout", str(args.timeout), *(["--force"] if args.force else [])]
    task = run_one.options(num_cpus=args.cpus, max_retries=args.retries)

    def submit(name, overrides):
        return task.remote(name, [*argv_of(name, overrides), *common], events)

    results = watch({submit(name, overrides): name for name, overrides in todo}, events, submit, more)
    ray.shutdown()
    return results


def main(argv=None):
    args = parse_args(argv)
    todo, extra = plan(args)
    with study.lock_workspace():
        start = time.monotonic()
        # A worker finds a run's own overrides in the study file from its name; it gets only SET's.
        results = fan_out(todo, args, lambda name, _: [*study.assignments(extra), "--study", args.study])
        failed = {n: r for n, r in results.items() if r["status"] == "failed"}
        counts = Counter(r["status"] for r in results.values())
        print(
            f"\ncluster: {counts['done']} run, {counts['skipped']} skipped, {len(failed)} failed "
            f"in {time.monotonic() - start:.0f} s"
        )
        steps = [r["seconds"] for r in results.values() if r["status"] == "done"]
        if steps:  # what the fan-out costs a run, beside the run itself
            means = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
            print("mean seconds per run: " + ", ".join(f"{k} {v:.1f}" for k, v in means.items()))
        for name, result in failed.items():
            tail = " / ".join(result["log"].strip().splitlines()[-3:])
            print(f"  {name}: {result.get('error')}" + (f" ({tail})" if tail else ""))
        # Every run that made it, from the remotes, so `make report` and `dvc exp show` see them here.
        if subprocess.run(["dvc", "exp", "pull", "origin"]).returncode:
            fail("dvc exp pull origin failed; the published runs stay on the remotes, pull them again")
    return study.RUNS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
