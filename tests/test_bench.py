"""The pure pieces of `make bench`: FLOP counting, ratios, the plain script's flags and the report."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import report, run

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
MLP = {"hidden_units": 512, "hidden_layers": 2}


def test_forward_flops_are_two_per_weight():
    # model_summary.txt's 669,706 parameters less the 512 + 512 + 10 biases: one multiply-add per weight
    assert run.forward_flops(MLP) == 2 * (669_706 - 1034)
    assert run.forward_flops({**MLP, "hidden_layers": 1}) == 2 * (784 * 512 + 512 * 10)
    # the Keras convnet: 28 -> conv 26 -> pool 13 -> conv 11 -> pool 5, then 5x5x64 -> 10
    cnn = {"type": "cnn", "filters": [32, 64], "kernel_size": 3, "padding": "valid", "dense_units": 0}
    convs = 26 * 26 * 9 * 1 * 32 + 11 * 11 * 9 * 32 * 64
    assert run.forward_flops(cnn) == 2 * (convs + 1600 * 10)
    assert run.forward_flops({**cnn, "dense_units": 128}) == 2 * (convs + 1600 * 128 + 128 * 10)
    same = 28 * 28 * 9 * 1 * 32 + 14 * 14 * 9 * 32 * 64  # 28 -> 28 -> 14 -> 14 -> 7
    assert run.forward_flops({**cnn, "padding": "same"}) == 2 * (same + 3136 * 10)


def test_epoch_flops_and_rates():
    flops = run.epoch_flops(MLP, 48_000, 12_000)
    assert flops == pytest.approx(0.21e12, rel=0.01)  # the README's 0.21 TFLOP per baseline epoch
    assert run.gflops(flops, 2.0) == pytest.approx(flops / 2e9, abs=0.05)
    assert run.gflops(None, 2.0) is None
    assert run.ratio(3.0, 1.5) == 2.0 and run.ratio(None, 1.5) is None


def test_compare_gives_plain_over_stage_and_percent_of_matmul():
    side = {"loop_seconds": 20.0, "epoch_seconds": 2.0, "wall_seconds": 30.0, "gflops": 100.0}
    stage = {"loop_seconds": 8.0, "epoch_seconds": 0.8, "wall_seconds": 20.0, "gflops": 250.0}
    out = run.compare(side, stage, {"square_2048": 400.0})
    assert (out["loop_ratio"], out["epoch_ratio"], out["wall_ratio"]) == (2.5, 2.5, 1.5)
    assert (out["reference_percent_of_matmul"], out["project_percent_of_matmul"]) == (25.0, 62.5)
    alone = run.compare(None, stage, {"square_2048": 400.0})  # a variant the plain script cannot run
    assert alone["loop_ratio"] is None and alone["reference_percent_of_matmul"] is None


def flags(args):
    return dict(zip(args[::2], args[1::2], strict=False))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, {"--hidden-units": "512", "--batch-size": "128", "--optimizer": "rmsprop", "--dropout": "0.2"}),
        ({"train.optimizer": "sgd", "model.dropout": 0}, {"--optimizer": "sgd", "--dropout": "0"}),
        ({"model.activation": "linear", "train.jit_compile": False}, {"--activation": "linear"}),
    ],
)
def test_reference_args_carry_each_variants_settings(overrides, expected):
    args = run.reference_args(run.with_overrides(PARAMS, overrides), overrides)
    assert expected.items() <= flags(args).items()
    assert "--learning-rate" not in args  # null: the optimizer's Keras default, as in the stage


def test_reference_args_for_raw_pixels_and_for_what_it_cannot_run():
    raw = {"preprocess.normalize": False}
    assert run.reference_args(run.with_overrides(PARAMS, raw), raw)[-1] == "--no-normalize"
    cnn = {"model.type": "cnn", "model.filters": [16, 32], "model.dense_units": 128}
    args = flags(run.reference_args(run.with_overrides(PARAMS, cnn), cnn))
    assert {
        "--model": "cnn",
        "--filters": "16,32",
        "--kernel-size": "3",
        "--dense-units": "128",
    }.items() <= args.items()
    no_flag = {"plot.samples": 4}  # a param the plain script has no flag for: the stage side runs alone
    assert run.reference_args(run.with_overrides(PARAMS, no_flag), no_flag) is None


def variant(plain_loop, stage_loop, rss=800):
    stage = {"loop_seconds": stage_loop, "epoch_seconds": stage_loop / 4, "wall_seconds": stage_loop + 10}
    stage |= {"gflops": 150.0, "peak_rss_mb": rss, "test_accuracy": 0.98, "val_accuracy": 0.979}
    plain = {**stage, "loop_seconds": plain_loop, "epoch_seconds": plain_loop / 4, "peak_rss_mb": 1100}
    plain["wall_seconds"] = plain_loop + 10
    plain = plain if plain_loop else None
    return {"overrides": {}, "epochs": 4, "flops_per_epoch": 2.09e11, "loadavg": [1.0]} | run.compare(
        plain, stage, {"square_2048": 300.0}
    )


def results(sweep=True, rss=800):
    r = {
        "date": "2026-12-01T04:00",
        "machine": "x86_64, 2 cores, Test CPU",
        "mode": "full",
        "loadavg_start": [0.5, 0.4, 0.3],
        "loadavg_end": [2.5, 2.0, 1.0],
        "matmul_runs": [{"loadavg_before": [0.7, 0, 0]}, {"loadavg_before": [2.2, 0, 0]}],
        "matmul": {"square_2048": 300.0, "square_2048_bfloat16": 1200.0},
        "variants": {"baseline": variant(40.0, 16.0, rss=rss), "cnn": variant(0, 30.0)},
        "precision": [
            {"precision": "float32", "jit_compile": True, "first_epoch_seconds": 3.0, "epoch_seconds": 1.0}
            | {"test_accuracy": 0.98}
        ],
        "checks": {
            "noop_repro_seconds": [0.7, 0.6, 0.65],
            "stages": {s: {"imports_tensorflow": False} for s in ("download", "preprocess", "plot")},
        },
    }
    if sweep:
        runs = [("plain", 600.0), ("jobs1", 400.0), ("jobs2", 320.0), ("jobs2", 360.0), ("jobs1", 380.0)]
        runs += [("plain", 640.0)]
        r["sweep"] = {"variants": list("abcdefghi"), "epochs": 10, "runs": []}
        r["sweep"]["runs"] = [{"mode": m, "wall_seconds": t} for m, t in runs]
        r["sweep"]["runs"][2] |= {"cpu_seconds": 600.0, "loop_seconds": 456.0}
        r["sweep"]["runs"][3] |= {"cpu_seconds": 620.0, "loop_seconds": 460.0}  # other modes: older results
    return r


def row(md, first_cell, after):
    """The cells of the first table row starting with `first_cell` after the heading containing `after`."""
    lines = md[md.index(after) :].splitlines()
    line = next(ln for ln in lines if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_tables_from_a_hand_made_results_dict():
    md = report.markdown(results())
    assert "2026-12-01T04:00 on x86_64, 2 cores, Test CPU" in md
    assert "load average (1 min) 0.5-2.5" in md
    loop = row(md, "baseline", "## Training loop")
    assert loop[3:6] == ["40.0", "16.0", "2.5x"]  # plain loop, stage loop, ratio
    assert row(md, "cnn", "## Training loop")[3:6] == ["n/a", "30.0", "n/a"]
    assert row(md, "baseline", "## Whole process")[1:4] == ["50.0", "26.0", "1.92x"]
    assert row(md, "baseline", "## GFLOP/s")[2:] == ["150.0 (50.0%)", "150.0 (50.0%)"]
    # medians: plain 620, JOBS=1 390, JOBS=2 340
    jobs2 = ["340.0", "2", "1.82x", "610.0", "458.0"]  # medians; CPU and loops only where recorded
    assert row(md, "`make ablations JOBS=2` (1 thread each)", "## The study")[1:] == jobs2
    assert row(md, "`make ablations JOBS=1` (2 threads)", "## The study")[-2:] == ["n/a", "n/a"]
    assert "152 of the 610 CPU seconds are spent outside the training loops: 16.9 s per run" in md
    assert "Faster: `make ablations JOBS=2` (1 thread each), by 1.15x." in md
    assert row(md, "float32", "## float32 and mixed_bfloat16")[1:] == ["True", "3.0", "1.0", "0.9800"]
    assert row(md, "train stage peak RSS (largest of the variants)", "## Memory")[1:] == [
        "800 MB",
        "<= 1024 MB",
        "yes",
    ]
    assert row(md, "no-op `dvc repro` (slowest of 3)", "## Memory")[-1] == "yes"


def test_report_without_the_sweep_and_with_a_missed_target():
    md = report.markdown(results(sweep=False, rss=1300))
    assert "## The study" not in md
    assert row(md, "train stage peak RSS (largest of the variants)", "## Memory")[-1] == "no"


def test_report_shows_where_an_epochs_time_goes():
    r = results(sweep=False)
    seconds = {"stage": 12.0, "gradients": 9.0, "forward": 3.0, "no_dropout": 1.5, "dots": 8.4}
    p = {"hidden_units": 2048, "batch_size": 128, "samples": 48_000, "seconds": seconds}
    r["profiles"] = [p | {"flops": 1.8e12, "loadavg_before": [0.4, 0, 0]}]
    md = report.markdown(r)
    assert "its matmuls alone would take 6.00 s" in md  # 1.8 TFLOP at 300 GFLOP/s
    assert row(md, report.PROFILE_ROWS["gradients"], "## Where a hidden-2048")[1:] == ["9.0", "75%"]
    assert row(md, report.PROFILE_ROWS["no_dropout"], "## Where")[1:] == ["1.5", "12%"]
    assert row(md, report.PROFILE_ROWS["dots"], "## Where")[1:] == ["8.4", "70%"]
    assert "## Where" not in report.markdown(results(sweep=False))  # runs without it still render


def test_run_py_finds_its_own_report_module():
    """sweep/ (for study.flatten) also has a report.py: run.py must still import benchmarks/report.py."""
    code = "from benchmarks import run, report; print(report.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == ROOT / "benchmarks" / "report.py"


def test_sweep_only_without_results_says_what_to_run(tmp_path):
    """--sweep-only updates an existing results.json; without one it stops before timing anything."""
    code = (
        "import sys, pathlib; from benchmarks import run; "
        f"run.HERE = pathlib.Path({str(tmp_path)!r}); sys.argv = ['run.py', '--sweep-only']; run.main()"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert (
        out.stderr.strip().splitlines()[-1].startswith("error: --sweep-only updates benchmarks/results.json")
    )
