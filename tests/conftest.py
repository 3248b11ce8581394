"""Fixtures: throw-away copies of the project, each with its own git and DVC state.

The data comes from small synthetic MNIST and Fashion-MNIST mirrors in the same IDX format
(tests/synthetic_idx.py), verified through the code's own override of the pinned checksums
(MNIST_SHA256SUMS, FASHION_MNIST_SHA256SUMS), so the suite needs no copy of the real data.
Only the tests that need the real digits use `mirror`: MNIST_MIRROR, ../shared/mnist beside the
repo (as on CI and the team's machines), or the repo's own data/raw after `make repro`.
Tests never contact a public host.
"""

import contextlib
import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from synthetic_idx import write_mirror

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = (
    "stages",
    "tools",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvc/offline-plots",  # the HTML template .dvc/config names for `dvc plots`
    ".dvcignore",
    ".gitignore",
)
SMALL = {  # a shrunk config: seconds per stage instead of a minute
    "preprocess.train_size": 3000,
    "preprocess.test_size": 1000,
    "train.epochs": 2,
    "model.hidden_units": 64,
}


REAL_MNIST_HELP = (
    "needs the real MNIST digits: set MNIST_MIRROR to a directory or URL holding its four .gz files, "
    "put a copy at ../shared/mnist beside the repository, or run `make repro` once (it fills data/raw)"
)


# `make test` runs the suite on two workers, file by file, each taking the next file as it runs
# out: the files that take longest (`pytest --durations=0`, summed per file) start first, so that
# none of them starts last and finishes alone. The README's one long test leads.
LONGEST_FIRST = (
    "test_readme.py",
    "test_ablations.py",
    "test_tune.py",
    "test_train_loop.py",
    "test_pipeline.py",
    "test_recovery.py",
    "test_check_repro.py",
    "test_study_stats.py",
    "test_cnn.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pinned(dataset):
    """{file name: SHA-256} pinned in stages/checksums for `dataset`."""
    text = (ROOT / "stages" / "checksums" / f"{dataset}.sha256").read_text()
    return dict(line.split()[::-1] for line in text.splitlines())


def is_mnist(directory):
    """Whether `directory` holds the real MNIST, judged by its smallest file (t10k-labels)."""
    labels = Path(directory) / "t10k-labels-idx1-ubyte.gz"
    try:
        digest = hashlib.sha256(gzip.decompress(labels.read_bytes())).hexdigest()
        return digest == pinned("mnist")["t10k-labels-idx1-ubyte"]
    except (OSError, EOFError, gzip.BadGzipFile):
        return False


# Tests never contact a public host: DVC sends usage analytics from every command in a project that
# `dvc init` made (the toy projects), unless told not to; the project's own .dvc/config turns them off.
os.environ["DVC_NO_ANALYTICS"] = "1"

# Read once at start-up: a test's monkeypatch.delenv must not decide whether the real-data tests run.
GIVEN_MIRROR = os.environ.get("MNIST_MIRROR", "").strip()


def find_mirror():
    """The first real MNIST copy of: MNIST_MIRROR, ../shared/mnist, the repo's data/raw; else None."""
    given = GIVEN_MIRROR
    if "://" in given:
        return given
    for candidate in (given, ROOT.parent / "shared" / "mnist", ROOT / "data" / "raw"):
        if candidate and is_mnist(candidate):
            return str(Path(candidate).resolve())
    return None


@pytest.fixture(scope="session")
def mirror():
    """A real MNIST mirror (a directory or URL), for the few tests whose assertions need the real digits."""
    found = find_mirror()
    if not found:
        pytest.skip(REAL_MNIST_HELP)
    return found


@pytest.fixture(scope="session")
def synthetic_env(tmp_path_factory):
    """The environment that points download at small synthetic MNIST and Fashion-MNIST mirrors,
    with each mirror's SHA256SUMS in place of the pinned checksums: the real code path, no real data."""
    env = {}
    for seed, (dataset, prefix) in enumerate((("mnist", "MNIST"), ("fashion-mnist", "FASHION_MNIST"))):
        directory = write_mirror(tmp_path_factory.mktemp(dataset), dataset, seed=10 * seed)
        env[f"{prefix}_MIRROR"] = str(directory)
        env[f"{prefix}_SHA256SUMS"] = str(directory / "SHA256SUMS")
    return env


@contextlib.contextmanager
def from_a_terminal(cmd, cwd, env, log):
    """cmd, its output to the file `log`, in a session of its own with Ctrl-C's default action, as a
    shell started from a terminal runs it (ctrl_c() below); killed at the end if still running."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ctrl_c(proc, timeout=120):
    """What Ctrl-C does to a command started from a terminal: SIGINT to its whole session; its exit status."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(timeout=timeout)


def wait_while_running(proc, ready, timeout, why):
    """Poll until ready(); fail with why() if proc ends or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, why()
        time.sleep(0.2)


def logged_an_epoch(project):
    """Whether the train stage running in `project` has logged an epoch (under DVC's temporary name)."""
    tsvs = project.glob("metrics/.tmp-*-train/plots/metrics/train/loss.tsv")
    return any(len(p.read_text().splitlines()) > 1 for p in tsvs)


def run(args, cwd, check=True, env=None, **kwargs):
    """Run a command with the venv's python and dvc first on PATH; return the CompletedProcess."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_stage(name, cwd, check=True, env=None, **kwargs):
    return run([sys.executable, "-m", f"stages.{name}"], cwd, check=check, env=env, **kwargs)


def set_params(workdir, overrides):
    """Apply {"section.key": value} overrides to workdir/params.yaml."""
    path = Path(workdir) / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def git_init(workdir):
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.name", "test"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "project"],
    ):
        run(args, workdir)


def copy_project(work, overrides=SMALL, git=True):
    """Copy the project's source files to `work`, apply `overrides` to params.yaml, commit in a new repo."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    if overrides:
        set_params(work, overrides)
    if git:
        git_init(work)
    return work


@pytest.fixture
def project(tmp_path):
    """A copy of the project's source files in a fresh git repo, with the small config applied."""
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def raw_data(synthetic_env, tmp_path_factory):
    """Synthetic MNIST's data/raw, downloaded once per session through the real download stage."""
    work = tmp_path_factory.mktemp("download")
    shutil.copytree(ROOT / "stages", work / "stages")
    shutil.copy2(ROOT / "params.yaml", work / "params.yaml")
    set_params(work, {"data.dataset": "mnist"})
    run_stage("download", work, env=synthetic_env)
    return work / "data" / "raw"


@pytest.fixture
def prepared(project, raw_data):
    """A project copy whose data/raw and data/prepared are in place (small config)."""
    shutil.copytree(raw_data, project / "data" / "raw")
    run_stage("preprocess", project)
    return project


def session_dir(tmp_path_factory):
    """The session's directory: under `make test`'s workers (pytest-xdist), the one that holds each
    worker's own, so that what is kept there serves them all."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def xla_cache(tmp_path_factory):
    """One XLA cache for the session's training runs (stages/train.py use_xla_cache), not the user's:
    a shape is compiled once per session. Workers share it; TensorFlow writes each entry atomically."""
    os.environ.setdefault("XLA_CACHE", str(session_dir(tmp_path_factory) / "xla-cache"))
    return os.environ["XLA_CACHE"]


@pytest.fixture(scope="session")
def reproduced(synthetic_env, tmp_path_factory):
    """(project, stdout of its `dvc repro`): one whole pipeline run on synthetic MNIST per session,
    small config, shared by the tests that start from a finished run. Copy it with `repro_project`.

    Under `make test`'s workers one run serves them all: the first worker to get here runs it in the
    session's directory and the others wait for it. (The workers' synthetic mirrors are
    byte-identical, and no output records the mirror's path.)"""
    shared = session_dir(tmp_path_factory)
    work, log = shared / "reproduced" / "project", shared / "reproduced" / "stdout.txt"
    with FileLock(shared / "reproduced.lock"):
        if not log.exists():
            copy_project(work)
            proc = run(["dvc", "repro"], work, env={**synthetic_env, "TF_CPP_MIN_LOG_LEVEL": "2"})
            log.write_text(proc.stdout)
    return work, log.read_text()


def copy_reproduced(reproduced, work):
    """A private copy of the session's finished project (git, .dvc/cache, dvc.lock, outputs) at `work`."""
    return Path(shutil.copytree(reproduced[0], work, symlinks=True))


def stage_outputs(repro_stdout):
    """{stage: what it printed} from `dvc repro`'s output, split at DVC's "Running stage" lines."""
    outputs, stage = {}, None
    for line in repro_stdout.splitlines():
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
            outputs[stage] = ""
        elif stage:
            outputs[stage] += line + "\n"
    return outputs


@pytest.fixture
def repro_project(reproduced, tmp_path):
    """A copy of the session's finished project: a test that changes things starts where `dvc repro`
    ended, without running the stages again."""
    return copy_reproduced(reproduced, tmp_path / "project")
