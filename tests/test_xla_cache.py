"""train's XLA cache (stages/train.py use_xla_cache): a run that loads its compiled epoch from the
cache trains the same model to the bit as the run that compiled it, prints nothing of the loading,
and a damaged entry ends in one line that names the cache, with the last model left in place."""

import json

import pytest
from conftest import run_stage

from stages import train as train_stage


def train(project, cache):
    proc = run_stage("train", project, check=False, env={"XLA_CACHE": str(cache)})
    model = (project / "data/model.keras").read_bytes() if proc.returncode == 0 else None
    return proc, model


def test_a_cached_epoch_trains_the_same_model_and_a_damaged_cache_fails_clearly(prepared, tmp_path):
    cache = tmp_path / "cache"
    cold, compiled = train(prepared, cache)
    assert cold.returncode == 0, cold.stderr
    (directory,) = cache.iterdir()  # one directory for this TensorFlow and this CPU
    entries = sorted(directory.glob("*.pb"))
    assert len(entries) >= 2  # the full batches' epoch, the last batch, validation

    warm, loaded = train(prepared, cache)
    assert warm.returncode == 0, warm.stderr
    assert loaded == compiled
    assert sorted(directory.glob("*.pb")) == entries  # loaded, not compiled and added again
    assert warm.stderr == ""  # neither the loading's log lines nor absl's preamble to them
    metrics = json.loads((prepared / "metrics/train/metrics.json").read_text())
    assert metrics["jit_compile"] is True

    for entry in entries:  # cut short, as a full disk or a copy interrupted would leave it
        entry.write_bytes(entry.read_bytes()[:1000])
    damaged, _ = train(prepared, cache)
    assert damaged.returncode == 1
    assert damaged.stderr.startswith("error: the first epoch failed: ")
    assert f"XLA cache {directory} is damaged" in damaged.stderr and "XLA_CACHE=off" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    assert (prepared / "data/model.keras").read_bytes() == loaded  # the last good model, untouched


@pytest.mark.parametrize("setting", ["default", "off", "own flag", "unwritable"])
def test_where_the_cache_goes(setting, tmp_path, monkeypatch, capsys):
    """In-process (no TensorFlow): TF_XLA_FLAGS is all use_xla_cache hands over."""
    own = "--tf_xla_persistent_cache_directory=/mine"
    monkeypatch.setenv("TF_XLA_FLAGS", own if setting == "own flag" else "")
    monkeypatch.setattr(train_stage, "XLA_CACHE", tmp_path / "home-cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    values = {"default": "", "off": "off", "own flag": "", "unwritable": str(blocker)}
    monkeypatch.setenv("XLA_CACHE", values[setting])
    directory = train_stage.use_xla_cache()
    flags = train_stage.os.environ["TF_XLA_FLAGS"]
    if setting == "default":
        assert directory.parent == tmp_path / "home-cache" and directory.is_dir()
        assert flags == f"--tf_xla_persistent_cache_directory={directory}"
    else:
        assert directory is None
        assert flags == (own if setting == "own flag" else "")
    printed = capsys.readouterr().out
    assert ("train: XLA cache off" in printed and str(blocker) in printed) == (setting == "unwritable")
