from conftest import run_stage


def test_stages_run_in_order_on_small_config(prepared):
    for stage in ("train", "evaluate", "plot"):
        run_stage(stage, prepared)
    assert (prepared / "data/model.keras").exists()
    assert len(list((prepared / "metrics/figures").glob("*.png"))) == 5
