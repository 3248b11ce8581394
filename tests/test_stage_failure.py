"""A stage that fails under DVC names the one command that brings back what DVC deleted, and that
command works; a shell with no `python` still reaches the stages' environment check.

DVC deletes a stage's outputs before running it. Each test here breaks one stage of a project copy
whose results are committed (git and the DVC cache), reads the command from the failure's line,
runs it as a user would, and checks that DVC and git then see exactly the committed state.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_project, copy_reproduced, logged_an_epoch, run, set_params, wait_while_running

DVC = str(Path(sys.executable).parent / "dvc")
BROUGHT_BACK = re.compile(
    r"DVC deleted (\w+)'s previous outputs: `([^`]+)` brings back the last committed ones$"
)


def dvc(args, work, check=True, env=None):
    return run([DVC, *args], work, check=check, env=env)


@pytest.fixture(scope="module")
def committed(tmp_path_factory, reproduced):
    """A project copy (small config) after one good `dvc repro` (the session's), results committed."""
    work = copy_reproduced(reproduced, tmp_path_factory.mktemp("failure") / "project")
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "results"], work)
    return work


def restore(work, line, stage):
    """Run the command the failure named; the outputs are back as committed. Then undo the params."""
    found = BROUGHT_BACK.search(line)
    assert found and found[1] == stage, line
    run(["sh", "-c", found[2]], work)  # the venv's dvc first on PATH, as after `source .venv/bin/activate`
    run(["git", "checkout", "--", "params.yaml"], work)
    assert "up to date" in dvc(["status"], work).stdout  # every output has the hash dvc.lock holds
    assert run(["git", "status", "--porcelain"], work).stdout == ""  # and git's files are the committed ones


def failure_line(proc, prefix):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    return line


@pytest.mark.parametrize(
    ("stage", "change", "env", "outputs", "command"),
    [
        (
            "download",
            {},
            {"MNIST_MIRROR": "/nonexistent"},  # a bad mirror
            ["data/raw"],
            "dvc checkout --force download",
        ),
        ("preprocess", {"seed": -1}, {}, ["data/prepared/train.npz"], "dvc checkout --force preprocess"),
        ("plot", {"plot.digit_index": 10**6}, {}, ["metrics/figures"], "git checkout -- metrics/figures"),
    ],
    ids=["bad mirror", "bad seed", "digit_index out of range"],
)
def test_failed_stage_names_the_command_that_restores_its_outputs(
    committed, stage, change, env, outputs, command
):
    set_params(committed, change)
    proc = dvc(["repro", "--force", "--single-item", stage], committed, check=False, env=env)
    line = failure_line(proc, "error: ")
    assert line.endswith(
        f"; DVC deleted {stage}'s previous outputs: `{command}` brings back the last committed ones"
    )
    for out in outputs:
        assert not (committed / out).exists()
    restore(committed, line, stage)


def test_ctrl_c_in_train_names_the_command_that_restores_its_outputs(committed):
    set_params(committed, {"train.epochs": 100_000})  # the interrupt always lands mid-training
    env = {**os.environ, "PATH": f"{Path(DVC).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(  # as from a terminal: a session of its own, Ctrl-C's default action
        [DVC, "repro"], cwd=committed, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        trained = lambda: logged_an_epoch(committed)  # noqa: E731
        wait_while_running(proc, trained, 120, lambda: "training never logged an epoch")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: DVC and the stage, one process group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.stderr = stderr
    line = failure_line(proc, "interrupted: ")
    git_outs = "metrics/model_summary.txt metrics/train/plots metrics/train/metrics.json"
    assert line == (
        "interrupted: train stopped; no partial output kept, `dvc repro` redoes it; DVC deleted train's "
        f"previous outputs: `dvc checkout --force train && git checkout -- {git_outs}` brings back the "
        "last committed ones"
    )
    assert not (committed / "data/model.keras").exists()
    restore(committed, line, "train")


def test_damaged_model_comes_back_with_the_command_evaluate_names(committed):
    model = committed / "data/model.keras"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 3])
    proc = run([sys.executable, "-m", "stages.evaluate"], committed, check=False)
    line = failure_line(proc, "error: ")
    command = re.search(r"`(dvc checkout [^`]+)` restores the last trained one", line)[1]
    run(["sh", "-c", command], committed)
    assert model.read_bytes() == good
    assert "up to date" in dvc(["status"], committed).stdout


def test_stage_command_in_a_shell_with_only_python3_reaches_the_environment_check(tmp_path):
    """`.venv/bin/dvc exp run` without activating, where PATH has a bare `python3` and no `python`
    (stock Debian, macOS): the stage command starts, and common's check says which environment to use."""
    work = copy_project(tmp_path / "project")
    bare = tmp_path / "bare"  # a venv without the project's packages, and without a `python` command
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    (bare / "bin" / "python").unlink()
    env = {"PATH": str(bare / "bin"), "HOME": str(tmp_path), "SHELL": "/bin/sh"}
    proc = subprocess.run([DVC, "exp", "run"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    line = failure_line(proc, "error: ")
    assert line == (
        f"error: {bare}/bin/python3 lacks numpy, yaml, pandas, matplotlib, keras, dvclive, tqdm: run "
        "`make setup`, then `source .venv/bin/activate` (or use the make targets, which do both)"
    )
    assert "not found" not in proc.stderr  # the shell found the stage's interpreter
    assert "failed to reproduce 'download'" in proc.stderr
    assert not (work / "data/raw").exists()
