"""`make bench`'s pieces: FLOP counting, the paired ratios and medians, results.md, the plain script,
and how a child process is measured. The whole run is `QUICK=1 make bench` (minutes)."""

import json
import sys
from pathlib import Path

import yaml
from conftest import run, set_params

from benchmarks import bench, tables
from stages.train import build_model

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CNN = {"type": "cnn", "filters": [32, 64], "kernel_size": 3, "padding": "valid", "dense_units": 0}
CNN |= {"activation": "relu", "dropout": 0.5}


def test_forward_flops_are_two_per_weight_and_output_pixel():
    mlp = build_model(PARAMS["model"])
    assert mlp.count_params() == 669_706  # metrics/model_summary.txt
    assert bench.forward_flops(mlp) == 2 * (669_706 - (512 + 512 + 10))  # one multiply-add per weight
    # The Keras convnet: 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5, then 5x5x64 -> 10.
    convs = 26 * 26 * (3 * 3 * 1 * 32) + 11 * 11 * (3 * 3 * 32 * 64)
    assert bench.forward_flops(build_model(CNN)) == 2 * (convs + 1600 * 10)
    same = 28 * 28 * (3 * 3 * 1 * 32) + 14 * 14 * (3 * 3 * 32 * 64)  # 28 -> 28 -> 14 -> 14 -> 7
    assert bench.forward_flops(build_model(CNN | {"padding": "same"})) == 2 * (same + 7 * 7 * 64 * 10)


def test_with_overrides_copies():
    params = bench.with_overrides(PARAMS, {"train.batch_size": 32, "model.hidden_units": 2048})
    assert (params["train"]["batch_size"], params["model"]["hidden_units"]) == (32, 2048)
    assert params["train"]["epochs"] == PARAMS["train"]["epochs"] and PARAMS["train"]["batch_size"] == 128


def side(loops, walls, rss=900, accuracy=0.98, epoch=1.0):
    return [
        {"loop_seconds": lo, "wall_seconds": w, "epoch_seconds": epoch, "peak_rss_mb": rss}
        | {"test_accuracy": accuracy}
        for lo, w in zip(loops, walls, strict=True)
    ]


def test_summarize_pairs_each_round_with_the_stage():
    runs = {"stage": side([10, 20, 11], [15, 25, 16]), "tensorflow": side([30, 30, 22], [30, 50, 32], 1100)}
    runs["tensorflow"][1]["epoch_seconds"] = 9.0  # one slow epoch moves the median not at all
    s = bench.summarize(runs, flops=2e11, matmul=400.0)
    # rounds' ratios 3, 1.5 and 2: median 2; the ratio of the medians would be 30 / 11
    assert s["tensorflow"]["loop_ratio"] == 2.0
    assert s["tensorflow"]["wall_ratio"] == 2.0  # 2, 2, 2
    assert (s["stage"]["loop_ratio"], s["stage"]["wall_ratio"]) == (1.0, 1.0)
    assert (s["stage"]["loop_seconds"], s["tensorflow"]["peak_rss_mb"]) == (11, 1100)
    assert (s["tensorflow"]["gflops"], s["tensorflow"]["percent_of_matmul"]) == (200.0, 50.0)  # 2e11 / 1 s


def results(jax=True, profile=False):
    runs = {"stage": side([16.0], [21.0], epoch=1.6), "tensorflow": side([40.0], [50.0], 1100, 0.9796)}
    if jax:
        runs["jax"] = side([20.0], [21.0], 670, 0.9802, epoch=1.9)
    variant = {"overrides": {"train.batch_size": 32}, "epochs": 3, "flops_per_epoch": 3.2e11, "runs": runs}
    r = {
        "date": "2026-12-01T04:00",
        "machine": "x86_64, 2 cores, Test CPU",
        "quick": False,
        "versions": {"tensorflow-cpu": "2.21.0", "keras": "3.15.1", "jax": "0.10.2" if jax else None},
        "loadavg": {"start": [0.5, 0.4, 0.3], "end": [1.25, 1.0, 0.75]},
        "matmul_gflops": [380.0, 400.0],
        "variants": {"batch32": variant | {"sides": bench.summarize(runs, 3.2e11, 400.0)}},
    }
    if profile:
        r["profiles"] = [{"hidden_units": 512, "samples": 48_000, "flops": 2e11} | {"stage": 1.5}]
        r["profiles"][0] |= {"no_dropout": 1.0, "matmuls": 0.9}
    return r


def rows(md, heading):
    """The cells of each table row under the heading that starts with `heading`."""
    lines = md[md.index(f"## {heading}") :].split("\n\n")[1].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_markdown_tables_from_a_results_dict():
    md = tables.markdown(results())
    assert md.startswith("# `make bench`\n")
    assert "2026-12-01T04:00 on x86_64, 2 cores, Test CPU; load average 0.50, 0.40, 0.30 at the start" in md
    assert "batch32 (3 epochs, train.batch_size=32)" in md and "jax 0.10.2" in md
    loop = rows(md, "Training loop")
    assert loop[0] == ["batch32", "train stage", "16.0", "1.00x", "1.6", "0.98"]
    assert loop[1] == ["batch32", "plain script, TensorFlow", "40.0", "2.50x", "1.0", "0.9796"]
    assert loop[2][2:4] == ["20.0", "1.25x"]
    assert rows(md, "Whole process")[2][2:] == ["21.0", "1.00x", "670"]
    # 3.2e11 FLOP in 1.6 s: 200 GFLOP/s, 50% of the better matmul rate (400)
    assert rows(md, "Arithmetic rate")[0][2:] == ["200.0", "50.0", "1.6"]
    assert "## Where" not in md


def test_markdown_says_why_jax_did_not_run_and_shows_a_profile():
    md = tables.markdown(results(jax=False, profile=True) | {"quick": True})
    assert md.startswith("# `make bench`: QUICK run")
    for heading in ("Training loop", "Whole process", "Arithmetic rate"):
        assert rows(md, heading)[2] == ["batch32", "plain script, JAX", tables.MISSING]
    assert rows(md, "Where an MLP epoch")[0] == ["512", "1.5", "1.0", "0.9", "0.5"]  # 2e11 / 400 GFLOP/s


def test_reference_trains_params_yaml_s_model(prepared):
    set_params(prepared, {"model.hidden_layers": 1, "train.epochs": 2})
    run([sys.executable, ROOT / "benchmarks/reference.py", "--out", "plain.json"], prepared)
    out = json.loads((prepared / "plain.json").read_text())
    assert out["params"] == 784 * 64 + 64 + 64 * 10 + 10  # SMALL's 64 units, one hidden layer
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    assert out["params"] == build_model(params["model"]).count_params()  # what bench.py checks
    assert 0 < out["epoch_seconds"] <= out["train_seconds"] and 0.5 < out["test_accuracy"] <= 1


PROBE = """
import json, sys
from pathlib import Path
from benchmarks import bench
bench.WORK = work = Path(sys.argv[1])
small = bench.child([sys.executable, "-c", "pass"], work)
big = bench.child([sys.executable, "-c", "b = b'x' * (300 * 2**20)"], work)
(work / "out.json").write_text(json.dumps({"tf": "tensorflow" in sys.modules, "small": small, "big": big}))
bench.child([sys.executable, "-c", "print('why'); raise SystemExit(3)"], work)
"""


def test_child_gives_its_own_peak_rss_and_fails_in_one_line(tmp_path):
    """exec keeps a parent's peak RSS in its child's: bench.py must stay small while it measures."""
    proc = run([sys.executable, "-c", PROBE, tmp_path], ROOT, check=False)
    out = json.loads((tmp_path / "out.json").read_text())
    assert not out["tf"], "bench.py imports TensorFlow before the end: every side's peak RSS would include it"
    assert out["small"]["peak_rss_mb"] < 150 and 300 <= out["big"]["peak_rss_mb"] < 450
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {sys.executable} -c print('why'); raise SystemExit(3) failed in {tmp_path}; "
        f"its output is in {tmp_path / 'child.log'}"
    ]
    assert (tmp_path / "child.log").read_text() == "why\n"
