"""make tune: the search's trials are the study's experiments. One tiny search of the real pipeline
through `make tune`; then a TensorFlow-free toy stage (as tests/test_ablations.py's) for the search
itself: the objective, a finished search not re-run, a failing trial, Ctrl-C and resume."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, ctrl_c, from_a_terminal, git_init, run, wait_while_running
from test_ablations import ENV, exp_show, found, make, processes_in, with_make_and_study

optuna = pytest.importorskip("optuna")
from sweep import study, tune  # noqa: E402

# The new params in the real pipeline: every one of them drawn, one epoch or two of the small model.
PIPELINE_SPACE = {
    "model.input_dropout": {"low": 0.0, "high": 0.3},
    "model.max_norm": {"choices": [None, 3.0]},
    "train.lr_schedule": {"choices": ["constant", "cosine"]},
    "train.epochs": {"low": 1, "high": 2},
}
# The toy's validation figure rises with dropout and its test accuracy falls: a search that read the
# test set would pick the other end.
STAGE = """\
import json, os, sys, time
from pathlib import Path
import yaml
p = yaml.safe_load(open("params.yaml"))
name = os.environ.get("DVC_EXP_NAME")
if name == os.environ.get("FAIL_TRIAL"):
    sys.exit("error: this trial fails")
if name == os.environ.get("HANG_TRIAL"):
    Path(os.environ["MARKS"], name).touch()
    time.sleep(600)
d = p["model"]["dropout"]
Path("metrics/train").mkdir(parents=True, exist_ok=True)
json.dump({"best_val_accuracy": 0.5 + d}, open("metrics/train/metrics.json", "w"))
json.dump({"test_accuracy": 1 - d}, open("metrics/evaluate.json", "w"))
"""
# A search killed after asking for two trials: both stay marked running in the journal.
ASK_TWO = """\
import json
from sweep import tune
space, seed = tune.load_space("tune.yaml")
search = tune.open_search(seed)
print(json.dumps([tune.suggest(search.ask(), space) for _ in range(2)][0]))
"""
TOY_SPACE = {"model.dropout": {"low": 0.0, "high": 0.5}, "train.epochs": {"choices": [1, 2]}}


def write_space(project, space):
    (project / "tune.yaml").write_text(yaml.safe_dump({"sampler_seed": 0, "space": space}))


def journal(project):
    """The search's trials, as Optuna reads them from the project's journal."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(project / tune.JOURNAL))
    )
    return optuna.load_study(study_name=tune.NAME, storage=storage).trials


def trials_by_state(project):
    states = {}
    for t in journal(project):
        states.setdefault(t.state.name, []).append(tune.trial_name(t.number))
    return states


def test_make_tune_on_the_pipeline(tmp_path, synthetic_env):
    project = copy_project(tmp_path / "project", git=False)
    with_make_and_study(project, variants=("baseline",))
    write_space(project, PIPELINE_SPACE)
    git_init(project)
    # Each trial's draws make a model of its own: without XLA there is no epoch to compile for it.
    out = make(project, "tune", "TRIALS=2", "JOBS=1", "SET=train.jit_compile=false", env=synthetic_env)
    assert "tune: 2 of 2 trials ended, 0 failed now" in out, out
    dvc = found(project)
    assert set(dvc) == {"tune-000", "tune-001"}
    for t in journal(project):
        exp = dvc[tune.trial_name(t.number)]
        assert {k: exp["params"][k] for k in t.params} == t.params  # the run had the trial's params
        assert t.value == exp["metrics"]["metrics/train/metrics.json"]["best_val_accuracy"]
    report = (project / "reports/tuning.md").read_text()
    best = max(journal(project), key=lambda t: t.value)
    assert f"**Best: {tune.trial_name(best.number)}**" in report and "  - name: tuned-mlp" in report
    assert "trials ran with the extra overrides train.jit_compile=false" in report
    assert "test_accuracy: 0.98" not in report.split("```")[0]  # no test figure outside the variant
    trials = journal(project)
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    assert f"The search took {span.total_seconds() / 60:.0f} minutes from the first trial's start" in report
    # The printed variant is one the study takes as it is, with the best trial's params.
    entry = yaml.safe_load(report.split("```yaml\n")[1].split("```")[0])[0]
    assert entry["name"] == "tuned-mlp" and entry["set"] == best.params
    spec = yaml.safe_load((project / "ablations.yaml").read_text())
    spec["experiments"].append(entry)
    (project / "with-tuned.yaml").write_text(yaml.safe_dump(spec))
    assert study.load_study(project / "with-tuned.yaml")[-1]["compare_to"] == "baseline"
    for name in ("tuning_history.png", "tuning_params.png"):
        assert (project / "reports" / name).stat().st_size > 10_000


@pytest.fixture(scope="session")
def toy_made(tmp_path_factory):
    """A DVC project whose one stage writes a validation and a test figure from model.dropout; made
    once, each test gets a copy (`toy`)."""
    project = tmp_path_factory.mktemp("tune-toy-made") / "toy"
    project.mkdir()
    with_make_and_study(project, variants=("baseline",))
    (project / "stage.py").write_text(STAGE)
    (project / "params.yaml").write_text("seed: 0\nmodel:\n  dropout: 0.2\ntrain:\n  epochs: 1\n")
    metrics = [{f: {"cache": False}} for f in ("metrics/train/metrics.json", "metrics/evaluate.json")]
    stage = {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed", "model", "train"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"work": {**stage, "metrics": metrics}}}))
    (project / ".gitignore").write_text("__pycache__/\n/reports/tuning.journal\n")
    write_space(project, TOY_SPACE)
    git_init(project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "dvc"], project)
    return project


@pytest.fixture
def toy(toy_made, tmp_path):
    return Path(shutil.copytree(toy_made, tmp_path / "toy", symlinks=True))


def search(project, *args, code=0, env=None):
    proc = run([sys.executable, "-m", "sweep.tune", *args], project, check=False, env=env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_objective_is_the_validation_figure_and_a_finished_search_is_not_rerun(toy, monkeypatch):
    search(toy, "--trials", "3", "--jobs", "2")
    dvc = found(toy)
    assert set(dvc) == {"tune-000", "tune-001", "tune-002"}
    trials = journal(toy)
    for t in trials:
        metrics = dvc[tune.trial_name(t.number)]["metrics"]
        assert t.value == metrics["metrics/train/metrics.json"]["best_val_accuracy"]
        assert t.value != metrics["metrics/evaluate.json"]["test_accuracy"]
    monkeypatch.chdir(toy)  # what the search reads of a trial from git is DVC's view of it
    assert {name: study.published(name, list(exp["metrics"])) for name, exp in dvc.items()} == dvc
    assert study.published("tune-003", list(metrics)) is None
    revs = {name: exp["rev"] for name, exp in dvc.items()}

    again = search(toy, "--trials", "3")
    assert "tune: 3 of 3 trials ended, 0 failed now" in again and "===" not in again  # nothing ran
    assert {name: exp["rev"] for name, exp in found(toy).items()} == revs
    assert len(journal(toy)) == 3


def test_a_failing_trial_is_told_failed_and_leaves_no_experiment(toy):
    out = search(toy, "--trials", "3", "--jobs", "1", env={"FAIL_TRIAL": "tune-001"}, code=3)
    assert "failed tune-001: failed: dvc exp run exited" in out
    assert trials_by_state(toy) == {"COMPLETE": ["tune-000", "tune-002"], "FAIL": ["tune-001"]}
    show = json.loads(run(["dvc", "exp", "show", "--json", "--hide-workspace"], toy).stdout)
    assert sorted(e["name"] for b in show for e in b.get("experiments") or []) == ["tune-000", "tune-002"]
    # A failed trial counts: the search has its three and runs nothing more.
    assert "3 of 3 trials ended" in search(toy, "--trials", "3", code=0)


def test_ctrl_c_then_again_finishes_the_planned_trials(toy, tmp_path):
    """tune-001 trains until stopped: Ctrl-C stops it, it is told as stopped and leaves nothing; the
    next search runs its params again under a new name, and the planned count ends complete."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**ENV, "HANG_TRIAL": "tune-001", "MARKS": str(marks)}
    cmd = [sys.executable, "-m", "sweep.tune", "--trials", "4", "--jobs", "2"]
    log = tmp_path / "tune.log"
    # tune-001 hangs, and tune-000 has ended: the interrupted search has one trial of each kind
    both = lambda: (marks / "tune-001").exists() and "tune-000: best_val_accuracy" in log.read_text()  # noqa: E731
    with from_a_terminal(cmd, toy, env, log) as first:
        wait_while_running(first, both, 300, log.read_text)
        code = ctrl_c(first)
    text = log.read_text()
    assert code == 130 and "Traceback" not in text and "interrupted:" in text, text
    before = {name: exp["rev"] for name, exp in found(toy).items()}
    assert "tune-001" not in before and "tune-000" in before
    assert exp_show(toy) == [(name, "done") for name in sorted(before)]  # nothing half-made
    # tune-001, and tune-002 if it had started: told as stopped (no error), so not counted, and queued again
    states = [t.state.name for t in journal(toy)]
    stopped = {tune.trial_name(t.number): t for t in journal(toy) if t.state.name == "FAIL"}
    assert "tune-001" in stopped and all("error" not in t.user_attrs for t in stopped.values())
    assert sorted(states) == sorted(["COMPLETE"] * len(before) + ["FAIL", "WAITING"] * len(stopped))

    again = search(toy, "--trials", "4", "--jobs", "2")
    trials = journal(toy)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and len(trials) == len(done) + len(stopped), again  # nothing else extra
    retries = {t.user_attrs["retry_of"]: t.params for t in done if "retry_of" in t.user_attrs}
    assert set(retries) == set(stopped)  # each once
    # with the params it had drawn: Ctrl-C can land while tune-002's are being drawn, after tune-000's
    # line, and then its retry draws them itself
    assert all(t.params.items() <= retries[name].items() for name, t in stopped.items())
    assert stopped["tune-001"].params == retries["tune-001"]
    dvc = found(toy)
    assert set(dvc) == {tune.trial_name(t.number) for t in done}
    assert all(dvc[name]["rev"] == rev for name, rev in before.items())  # finished ones not run again
    assert exp_show(toy) == [(name, "done") for name in sorted(dvc)]  # none running, none failed
    assert processes_in(toy) == []


def test_ctrl_c_while_a_trial_is_being_asked_leaves_no_trial_running(tmp_path, monkeypatch):
    """Ctrl-C landing after Optuna has started a trial but before its params are drawn: the trial is
    still told as stopped and queued again, not left running in the journal (seen under load)."""
    monkeypatch.chdir(tmp_path)  # give_up's `dvc exp remove` finds no repository here: nothing to remove
    monkeypatch.setenv("PATH", ENV["PATH"])  # with this checkout's dvc, as the search runs it
    search = tune.open_search(0)

    def interrupted(trial, space):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "suggest", interrupted)
    args = tune.parse_args(["--trials", "1", "--jobs", "1"])
    with pytest.raises(KeyboardInterrupt):
        tune.run_trials(search, TOY_SPACE, {}, args, {})
    assert [t.state.name for t in journal(tmp_path)] == ["FAIL", "WAITING"]


def test_default_params_train_the_model_they_trained_before(prepared, tmp_path, monkeypatch):
    """The new params at their defaults train the same model, to the byte, as params without them."""
    from stages.common import load_params, load_split

    import keras

    from stages.train import train

    monkeypatch.chdir(prepared)
    params = load_params("seed", "model", "train")
    old = {
        "seed": params["seed"],
        "model": {k: v for k, v in params["model"].items() if k not in ("input_dropout", "max_norm")},
        "train": {k: v for k, v in params["train"].items() if k != "lr_schedule"},
    }
    assert (params["model"]["input_dropout"], params["model"]["max_norm"]) == (0, None)
    assert params["train"]["lr_schedule"] == "constant"
    models = []
    for name, p in (("new", params), ("old", old)):
        keras.backend.clear_session()  # layer names restart, as in a process of its own
        splits = [load_split("train"), load_split("val")]  # train() releases them
        train(p, splits, tmp_path / f"{name}.keras", tmp_path / f"{name}-live")
        models.append((tmp_path / f"{name}.keras").read_bytes())
    assert models[0] == models[1]


def test_the_new_params_do_what_params_yaml_says(prepared, tmp_path, monkeypatch):
    """Input dropout is a layer before the first Dense, max-norm caps every hidden unit's incoming
    weights after training, and the cosine schedule ends the run at a learning rate of zero."""
    from stages.common import load_params, load_split

    import keras
    import numpy as np

    from stages.train import build_model, train

    monkeypatch.chdir(prepared)
    made = []  # the optimizer train() makes, to read its learning rate after the last step
    get = keras.optimizers.get
    monkeypatch.setattr(keras.optimizers, "get", lambda spec: made.append(get(spec)) or made[-1])
    params = load_params("seed", "model", "train")
    params["model"].update(input_dropout=0.2, max_norm=0.5)
    params["train"].update(optimizer="adam", learning_rate=0.01, lr_schedule="cosine")
    kinds = [type(layer).__name__ for layer in build_model(params["model"]).layers]
    assert kinds == ["ThreeFryDropout", "Dense", "ThreeFryDropout", "Dense", "ThreeFryDropout", "Dense"]
    splits = [load_split("train"), load_split("val")]
    steps = -(-len(splits[0][1]) // params["train"]["batch_size"])  # batches per epoch, the last one short
    model, _ = train(params, splits, tmp_path / "m.keras", tmp_path / "live")
    hidden = [layer.kernel.numpy() for layer in model.layers if isinstance(layer, keras.layers.Dense)][:-1]
    assert all(np.linalg.norm(kernel, axis=0).max() <= 0.5 + 1e-6 for kernel in hidden)
    assert float(made[-1].learning_rate) == pytest.approx(0, abs=1e-9)
    assert int(made[-1].iterations) == params["train"]["epochs"] * steps


def test_a_killed_search_is_recovered_from_its_journal(toy):
    """A search killed outright leaves its trials marked running: the next one tells the trial whose
    experiment had finished its result, and runs the other's params again."""
    asked = run([sys.executable, "-c", ASK_TWO], toy).stdout.split("\n")[0]
    params = json.loads(asked)  # tune-000's, which "finished" before the kill: run it as tune.py would
    run(["dvc", "exp", "run", "--temp", "-n", "tune-000", *study.dvc_set_args(params)], toy)
    out = search(toy, "--trials", "2")
    assert "tune-000 had finished before the stop" in out and "stopped tune-001: it runs again" in out
    assert trials_by_state(toy) == {"COMPLETE": ["tune-000", "tune-002"], "FAIL": ["tune-001"]}
    trials = journal(toy)
    assert trials[0].value == 0.5 + params["model.dropout"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == "tune-001"
    assert set(found(toy)) == {"tune-000", "tune-002"}


def test_a_trial_through_the_ray_worker_is_published_whole(toy, tmp_path):
    """What a Ray task runs for a trial (`sweep.worker NAME --trial k=v`): every override comes from
    the command line, none from the study file, and the experiment reaches the machine that asked."""
    origin, store = tmp_path / "origin.git", tmp_path / "store"
    store.mkdir()
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    for args in (
        ["git", "remote", "add", "origin", str(origin)],
        ["git", "push", "-q", "origin", "main"],
        ["dvc", "remote", "add", "--local", "-d", "store", str(store)],
    ):
        run(args, toy)
    cmd = [sys.executable, "-m", "sweep.worker", "tune-005", "--trial", "model.dropout=0.3", "train.epochs=2"]
    run(cmd, toy, env=ENV)
    run(["dvc", "exp", "pull", "origin", "tune-005"], toy)  # as cluster.watch does before telling
    exp = found(toy)["tune-005"]
    assert (exp["params"]["model.dropout"], exp["params"]["train.epochs"]) == (0.3, 2)
    assert tune.objective(exp, {"model.dropout": 0.3}) == 0.8


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model.dropuot": {"low": 0, "high": 1}}, "error: tune.yaml: model.dropuot is not in params.yaml;"),
        ({"model.dropout": [0, 1]}, "error: tune.yaml: not a search space ("),
    ],
)
def test_a_bad_space_ends_in_one_line_before_any_trial(toy, space, message):
    write_space(toy, space)
    out = search(toy, "--trials", "2", code=1)
    assert out.startswith(message) and out.count("\n") == 1, out
    assert exp_show(toy) == [] and not (toy / tune.JOURNAL).exists()
