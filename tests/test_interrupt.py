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

from conftest import set_params

EPOCHS = 100_000  # far more than the test waits for: the kill always lands mid-training


def history_rows(work):
    """Epochs DVCLive has logged so far, in the train stage's temporary output directory."""
    logs = list(work.glob("metrics/.tmp-*-train/plots/metrics/train/loss.tsv"))
    return len(logs[0].read_text().splitlines()) - 1 if logs else 0


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
    )
    deadline = time.monotonic() + 120
    while history_rows(work) < 1:
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
