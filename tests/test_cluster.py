"""The study through a real two-node Ray cluster on this machine (`make test-cluster`).

Each node is a `ray start --block` in its own session, so killing a node's session is that node
dying: raylet, workers and the training they run all go at once. The nodes use loopback addresses
other than 127.0.0.1, which Ray would replace by the machine's network address.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, run

pytestmark = pytest.mark.cluster
pytest.importorskip("ray", reason="Ray is not installed: `make setup-cluster`")
from sweep.study import experiments  # noqa: E402  (the one parser of `dvc exp show --json`)

VARIANTS, SEEDS = ("baseline", "no-dropout"), (0, 1)
NAMES = {f"{v}-s{s}" for v in VARIANTS for s in SEEDS}
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
BIN = str(Path(sys.executable).parent)
ENV = {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session(sid):
    """Process ids of every process in session `sid`: a node and everything it started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is gone already, awaiting its parent
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid, sig=signal.SIGKILL):
    for pid in session(sid):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, sig)


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def wait_for(what, check, timeout, every=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (2 CPUs) and a second node (2 CPUs, custom resource `second`); {name: session id}."""
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    common = ["--block", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
    common += [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    head = ["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--include-dashboard=false"]
    head += [f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp}"]
    second = [f"--address={HEAD_IP}:{port}", f"--node-ip-address={SECOND_IP}", '--resources={"second": 1}']
    nodes = {"head": head, "second": second}
    procs, logs = {}, []
    try:
        for name, args in nodes.items():
            logs.append(open(tmp / f"{name}.log", "w"))  # noqa: SIM115  (closed below)
            env = {**os.environ, **ENV}
            proc = subprocess.Popen(
                [f"{BIN}/ray", "start", *args, *common], env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            procs[name] = proc
            if name == "head":
                wait_for("the head's GCS", lambda: socket_open(HEAD_IP, port), 120)
        probe = [sys.executable, "-c", "import ray; ray.init(); print('second' in ray.cluster_resources())"]
        env = {"RAY_ADDRESS": f"{HEAD_IP}:{port}", **ENV}

        def joined():
            return run(probe, tmp, check=False, env=env, timeout=60).stdout.strip() == "True"

        wait_for("the second node joining", joined, 120, every=3)
        yield {"address": f"{HEAD_IP}:{port}", "sids": {name: proc.pid for name, proc in procs.items()}}
    finally:
        for proc in procs.values():
            kill_session(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes
        for proc in procs.values():
            with contextlib.suppress(AssertionError):
                wait_for("the node stopping", lambda pid=proc.pid: not session(pid), 20)
            kill_session(proc.pid)  # whatever is left
            proc.wait(timeout=30)
        for log in logs:
            log.close()


def socket_open(host, port):
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A project with a 2-variant x 2-seed study, pushed to a bare git remote; a DVC remote directory."""
    tmp = tmp_path_factory.mktemp("study")
    project = copy_project(tmp / "project", git=False)
    shutil.copytree(ROOT / "sweep", project / "sweep", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((ROOT / "ablations.yaml").read_text())
    spec["experiments"] = [e for e in spec["experiments"] if e["name"] in VARIANTS]
    spec["seeds"] = list(SEEDS)
    (project / "ablations.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (project / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    for args in (
        ["git", "init", "-q", "--bare", "-b", "main", str(tmp / "origin.git")],
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "study"],
        ["git", "remote", "add", "origin", str(tmp / "origin.git")],
        ["git", "push", "-q", "origin", "main"],
        # The DVC remote in config.local, as credentials would be: the workers get its URL only.
        ["dvc", "remote", "add", "--local", "-d", "store", str(tmp / "store")],
    ):
        run(args, project)
    (tmp / "store").mkdir()
    return {"project": project, "origin": tmp / "origin.git", "store": tmp / "store", "tmp": tmp}


def remote_refs(origin):
    """{ref: commit} of the git remote."""
    out = run(["git", "ls-remote", str(origin)], origin).stdout
    return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines())}


def published_objects(origin, store, refs):
    """md5s of every output the published experiments name in their dvc.lock (directories' files too)."""
    found = set()
    for ref, sha in refs.items():
        if not ref.startswith("refs/exps/"):
            continue
        run(["git", "fetch", "-q", str(origin), ref], origin)
        lock = yaml.safe_load(run(["git", "show", f"{sha}:dvc.lock"], origin).stdout)
        spec = yaml.safe_load(run(["git", "show", f"{sha}:dvc.yaml"], origin).stdout)
        git_kept = {  # `cache: false` outputs live in git, not in the DVC remote
            path
            for stage in spec["stages"].values()
            for out in stage.get("outs", []) + stage.get("metrics", [])
            if isinstance(out, dict)
            for path, opts in out.items()
            if opts and opts.get("cache") is False
        }
        for stage in lock["stages"].values():
            for out in stage.get("outs", []):
                if out["path"] in git_kept:
                    continue
                found.add(out["md5"])
                if out["md5"].endswith(".dir"):
                    listing = store / "files/md5" / out["md5"][:2] / out["md5"][2:]
                    found.update(entry["md5"] for entry in json.loads(listing.read_text()))
    return found


def stored_objects(store):
    return {f"{p.parent.name}{p.name}" for p in (store / "files/md5").glob("*/*")}


def test_unreachable_or_missing_remote_fails_in_one_line_before_training(study, tmp_path):
    project, before = study["project"], remote_refs(study["origin"])
    bare = tmp_path / "no-dvc-remote"
    run(["git", "clone", "-q", str(study["origin"]), str(bare)], tmp_path)
    cases = {
        "error: git remote ": (project, ["--git-remote", str(tmp_path / "nowhere.git")]),
        "error: DVC remote study unreachable: ": (project, ["--dvc-remote", str(tmp_path / "not-mounted")]),
        "error: no DVC remote: ": (bare, []),
    }
    for expected, (cwd, args) in cases.items():
        cmd = [sys.executable, "-m", "sweep.worker", "baseline-s0", "train.epochs=1", *args]
        proc = run(cmd, cwd, check=False, env=ENV, timeout=300)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
        assert "Running stage" not in proc.stdout
    assert not (tmp_path / "not-mounted").exists()  # DVC was not left to create it
    assert remote_refs(study["origin"]) == before and stored_objects(study["store"]) == set()


def test_a_run_no_node_can_take_fails_at_once(cluster, study):
    """Each node offers 2 CPUs: a run that asks for 3 would stay queued for as long as one waits."""
    env = {**os.environ, **ENV, "RAY_ADDRESS": cluster["address"]}
    cmd = [sys.executable, "-m", "sweep.cluster", "train.epochs=1", "--cpus", "3"]
    proc = run(cmd, study["project"], check=False, env=env, timeout=120)
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    assert proc.stderr == (
        f"error: a run asks for 3 CPUs (CPUS=3) but the nodes of {cluster['address']} offer 2 each; "
        "make ablations CPUS=2, or start nodes with --num-cpus=3\n"
    )


def test_study_survives_a_node_death_and_is_collected_in_a_third_clone(
    cluster, study, synthetic_env, monkeypatch
):
    project, origin, store = study["project"], study["origin"], study["store"]
    env = {**os.environ, **ENV, "RAY_ADDRESS": cluster["address"], **synthetic_env}
    cmd = [sys.executable, "-m", "sweep.cluster", "train.epochs=1", "--seeds", "0 1", "--cpus", "1"]
    log = study["tmp"] / "cluster.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Kill the second node while one of its runs is training; note which runs it had.
            def training():
                assert proc.poll() is None, log.read_text()  # the study ended before any training there
                cmds = [cmdline(pid) for pid in session(cluster["sids"]["second"])]
                names = [cmd[3] for cmd in cmds if cmd[1:3] == ["-m", "sweep.worker"]]
                return names if any("stages.train" in " ".join(cmd) for cmd in cmds) else None

            victims = wait_for("a run training on the second node", training, 600, every=0.2)
            kill_session(cluster["sids"]["second"])
            code = proc.wait(timeout=900)
        finally:
            proc.kill()
    output = log.read_text()
    print(f"study with a node death: {time.monotonic() - start:.0f} s")
    assert code == 0, output
    assert "cluster: 4 run, 0 skipped, 0 failed" in output
    for name in victims:  # retried on the head
        assert f"running {name} on {HEAD_IP}, attempt 2 (its node died)" in output, output

    # The remotes hold the four published runs and nothing else: no ref, no object of the killed attempts.
    refs = remote_refs(origin)
    exp_refs = {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("refs/exps/")}
    assert exp_refs == NAMES
    assert {ref for ref in refs if not ref.startswith("refs/exps/")} == {"HEAD", "refs/heads/main"}
    assert stored_objects(store) == published_objects(origin, store, refs)

    # A fresh third clone sees all four with their metrics, and restores one's model from the DVC remote.
    clone = study["tmp"] / "third"
    run(["git", "clone", "-q", str(origin), str(clone)], study["tmp"])
    run(["dvc", "remote", "add", "--local", "-d", "store", str(store)], clone)
    run(["dvc", "exp", "pull", "origin"], clone, timeout=300)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("PATH", ENV["PATH"])
    found = experiments()
    assert set(found) == NAMES
    for name, exp in found.items():
        assert exp["state"] == "success"
        assert exp["params"]["seed"] == int(name[-1])
        assert exp["params"]["model.dropout"] == (0 if name.startswith("no-dropout") else 0.2)
        assert exp["params"]["train.epochs"] == 1
        assert 0.5 < exp["metrics"]["metrics/evaluate.json"]["test_accuracy"] <= 1
    run(["dvc", "exp", "apply", "no-dropout-s1"], clone, timeout=300)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    model = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "data/model.keras")
    assert hashlib.md5((clone / "data/model.keras").read_bytes()).hexdigest() == model["md5"]
    # The restored model and test split give back the published accuracy.
    run([sys.executable, "-m", "stages.evaluate"], clone, timeout=300)
    evaluated = json.loads((clone / "metrics/evaluate.json").read_text())
    published = found["no-dropout-s1"]["metrics"]["metrics/evaluate.json"]
    assert evaluated["test_accuracy"] == published["test_accuracy"]

    # The same study again: everything is on the remotes with the same params, so nothing runs.
    again = run(cmd, project, env=env, timeout=600).stdout
    assert "cluster: 0 run, 4 skipped, 0 failed" in again
    assert remote_refs(origin) == refs
