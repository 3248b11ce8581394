"""Fixtures: throw-away copies of the project, each with its own git and DVC state.

The data comes from a local MNIST mirror (MNIST_MIRROR, or ../shared/mnist beside the repo as
on CI and the team's machines); tests never contact a public host.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = (
    "stages",
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


def find_mirror():
    mirror = os.environ.get("MNIST_MIRROR") or str(ROOT.parent / "shared" / "mnist")
    return mirror if "://" in mirror or Path(mirror).is_dir() else None


@pytest.fixture(scope="session")
def mirror():
    found = find_mirror()
    if not found:
        pytest.skip("no local MNIST mirror: set MNIST_MIRROR to a directory holding the four .gz files")
    return found if "://" in found else str(Path(found).resolve())


def run(args, cwd, check=True, env=None, **kwargs):
    """Run a command with the venv's python and dvc first on PATH; return the CompletedProcess."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_stage(name, cwd, check=True, env=None, **kwargs):
    return run([sys.executable, f"stages/{name}.py"], cwd, check=check, env=env, **kwargs)


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
def raw_data(mirror, tmp_path_factory):
    """data/raw downloaded once per session through the real download stage."""
    work = tmp_path_factory.mktemp("download")
    shutil.copytree(ROOT / "stages", work / "stages")
    shutil.copy2(ROOT / "params.yaml", work / "params.yaml")
    run_stage("download", work, env={"MNIST_MIRROR": mirror})
    return work / "data" / "raw"


@pytest.fixture
def prepared(project, raw_data):
    """A project copy whose data/raw and data/prepared are in place (small config)."""
    shutil.copytree(raw_data, project / "data" / "raw")
    run_stage("preprocess", project)
    return project
