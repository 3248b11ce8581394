"""Under DVC, a failed or killed run loses nothing: the cache only ever holds good outputs, and the
last good state comes back with git and `dvc checkout`.

DVC deletes a stage's outputs before running it, so a failed run does leave them missing. Outputs
with `cache: false` (the small files in metrics/) live in git rather than in the DVC cache, so
the way back is `git checkout -- params.yaml metrics && dvc checkout`: git restores params and
metrics, `dvc checkout` the cached data. Exactly that is tested here, in one project copy that
ran `dvc repro` once (a module-scoped copy of the session's run; each test restores it).
"""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_reproduced, logged_an_epoch, run, set_params, wait_while_running


def dvc(args, work, check=True):
    return run([str(Path(sys.executable).parent / "dvc"), *args], work, check=check)


def snapshot(work):
    """sha256 of every file DVC or git tracks under data/ and metrics/ (temporary files excluded)."""
    files = sorted(p for top in ("data", "metrics") for p in (work / top).rglob("*") if p.is_file())
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def is_temporary(name):
    return any(part.startswith(".tmp-") for part in Path(name).parts)  # atomic_path's names


def cache(work):
    """The DVC cache's content files; each must hash to its own name, or a bad output got in."""
    entries = {}
    for path in (work / ".dvc/cache/files/md5").rglob("*"):
        if path.is_file():
            name = path.parent.name + path.name.removesuffix(".dir")
            assert hashlib.md5(path.read_bytes()).hexdigest() == name, f"corrupt cache entry {path}"
            entries[str(path.relative_to(work))] = name
    return entries


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reproduced):
    """A git + DVC project (small config) after one good `dvc repro` (the session's), committed."""
    work = copy_reproduced(reproduced, tmp_path_factory.mktemp("recovery") / "project")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "good run"], work)
    assert "up to date" in dvc(["status"], work).stdout  # so a byte-identical state is an up-to-date one
    good = snapshot(work)
    assert "data/model.keras" in good and "metrics/evaluate.json" in good
    return work, good, cache(work)


def restore_and_check(work, good, good_cache):
    """The cache took nothing in; the documented recovery brings back the last good state exactly."""
    assert cache(work) == good_cache
    run(["git", "checkout", "--", "params.yaml", "metrics"], work)
    dvc(["checkout"], work)
    assert snapshot(work) == good  # byte for byte, data/ and metrics/
    assert run(["git", "status", "--porcelain"], work).stdout == ""


# One per class of bad input (key, bad value, the stage that fails, the message after "params.yaml: ").
# The rule is the same for every key of a class (units, layers, batch size, epochs; optimizer,
# activation): test_params.py runs each key through its stage.
BAD = [
    ("model.hidden_units", "many", "train", "model.hidden_units must be a positive integer, got 'many'"),
    ("train.batch_size", 0, "train", "train.batch_size must be a positive integer, got 0"),
    ("model.dropout", 1, "train", "model.dropout must be a number in [0, 1), got 1"),
    (
        "preprocess.validation_split",
        1.5,
        "preprocess",
        "preprocess.validation_split must be a number in (0, 1), got 1.5",
    ),
    ("train.optimizer", "rmsprob", "train", "train.optimizer must be one of rmsprop, "),
    (
        "train.learning_rate",
        0,
        "train",
        "train.learning_rate must be a positive finite number or null, got 0",
    ),
    ("seed", 1.5, "preprocess", "seed must be an integer in [0, 2**32), got 1.5"),  # preprocess runs first
    ("train.batchsize", 64, "train", "unknown key train.batchsize (did you mean train.batch_size?)"),
]


@pytest.mark.parametrize(("key", "value", "stage", "message"), BAD, ids=[f"{k}={v!r}" for k, v, *_ in BAD])
def test_failed_repro_keeps_the_cache_clean_and_checkout_restores(repo, key, value, stage, message):
    work, good, good_cache = repo
    set_params(work, {key: value})
    proc = dvc(["repro"], work, check=False)
    assert proc.returncode != 0
    assert f"error: params.yaml: {message}" in proc.stderr, proc.stderr
    assert f"failed to reproduce '{stage}'" in proc.stderr
    assert "Traceback" not in proc.stderr
    restore_and_check(work, good, good_cache)


def test_missing_section_is_caught_by_dvc_itself(repo):
    work, good, good_cache = repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    del params["train"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(["repro"], work, check=False)
    assert proc.returncode != 0
    assert "Parameters 'train' are missing from 'params.yaml'" in proc.stderr  # the stage's own check is
    restore_and_check(work, good, good_cache)  # in test_params.py: DVC stops first here


def test_yaml_syntax_error_stops_dvc_before_any_stage(repo):
    work, good, good_cache = repo
    path = work / "params.yaml"
    path.write_text(path.read_text().replace("batch_size: 128", "batch_size: [128"))
    # The parser stops on the line after the open bracket; the stages name it too (test_params.py).
    stop = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "[128" in line) + 1
    proc = dvc(["repro"], work, check=False)
    assert proc.returncode != 0
    assert "unable to read: 'params.yaml', YAML file structure is corrupted" in proc.stderr
    assert f"line {stop}, column " in proc.stderr, proc.stderr
    assert snapshot(work) == good  # DVC refused to start: nothing was even removed
    restore_and_check(work, good, good_cache)


def test_exp_run_set_param_gives_the_same_error(repo):
    work, good, good_cache = repo
    proc = dvc(["exp", "run", "-S", "train.batch_size=0"], work, check=False)
    assert proc.returncode != 0
    assert "error: params.yaml: train.batch_size must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert dvc(["exp", "list"], work).stdout.strip() == ""  # no experiment was recorded
    restore_and_check(work, good, good_cache)


def test_sigkill_mid_training_leaves_no_partial_output_and_repro_recovers(repo):
    """`kill -9` of dvc and the train stage together, after one epoch: DVC gets no say either."""
    work, good, good_cache = repo
    set_params(work, {"train.epochs": 100_000})  # the kill always lands mid-training
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dvc"), "repro"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, killed as a whole below
    )
    try:
        wait_while_running(proc, lambda: logged_an_epoch(work), 120, lambda: "training never logged an epoch")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # Every output is the last good one or absent (DVC removed train's before running it); none is
    # truncated. What the killed process was writing sits under a temporary name, ignored by git.
    after = snapshot(work)
    leftovers = [name for name in after if is_temporary(name)]
    assert leftovers, "expected the killed run's temporary files"
    assert all(after[name] == good[name] for name in after if name not in leftovers)
    for out in ("data/model.keras", "metrics/model_summary.txt", "metrics/train/metrics.json"):
        assert out not in after
    assert cache(work) == good_cache

    # The next run needs no manual cleaning: DVC drops the dead process's locks, train its temp files.
    run(["git", "checkout", "--", "params.yaml"], work)
    dvc(["repro"], work)
    assert "up to date" in dvc(["status"], work).stdout
    recovered = snapshot(work)
    assert not [name for name in recovered if is_temporary(name)]
    # Same params, same seed: the same epochs and test metrics as the good run (test_determinism.py
    # compares the weights themselves).
    same = [name for name in good if name.endswith((".tsv", ".csv", "evaluate.json"))]
    assert same and all(recovered[name] == good[name] for name in same)
    assert cache(work).items() >= good_cache.items()  # the new model added; nothing lost or corrupt
