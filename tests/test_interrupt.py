"""Ctrl-C (SIGINT) in the middle of training: one line, non-zero exit, nothing half-written.

SIGTERM takes the same path (common.run maps it to KeyboardInterrupt); test_download.py sends
it to a stalled download. SIGKILL, which no handler sees, and the `dvc repro` that recovers
from it are in test_recovery.py.
"""

import os
import signal
import subprocess
import sys
import time
import zipfile

from stages.common import save_model

import pytest
from conftest import logged_an_epoch, set_params

EPOCHS = 100_000  # far more than the test waits for: the kill always lands mid-training


def start_training(work):
    """Start stages/train.py and return it once it has logged at least one epoch."""
    set_params(work, {"train.epochs": EPOCHS})
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=work,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even
    )  # when this suite was started in the background, where SIGINT is inherited ignored
    deadline = time.monotonic() + 120
    while not logged_an_epoch(work):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"training never logged an epoch:\n{proc.communicate()[1]}")
        time.sleep(0.1)
    return proc


def test_ctrl_c_mid_training_ends_in_one_line_and_leaves_no_output(prepared):
    proc = start_training(prepared)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: train stopped; no partial output kept, `dvc repro` redoes it"
    )
    assert "train: best epoch" not in stdout
    # No output at all, under its own name or a temporary one: the run left what was there before.
    assert not (prepared / "data/model.keras").exists()
    assert not (prepared / "metrics/model_summary.txt").exists()
    assert sorted(p.name for p in (prepared / "data").iterdir()) == ["prepared", "raw"]
    assert not (prepared / "metrics").exists() or not any((prepared / "metrics").iterdir())


class SwallowingSave:
    """A model whose save catches everything, as Keras's does around its weights file (a bare
    `except:` in saving_lib), and receives Ctrl-C right there."""

    def save(self, path):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, inside the try
        except:  # noqa: E722
            pass
        zipfile.ZipFile(path, "w").close()


def test_ctrl_c_during_a_checkpoint_save_is_not_lost(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        save_model(SwallowingSave(), tmp_path / "model.keras")
    assert signal.getsignal(signal.SIGINT) == before  # restored afterwards
