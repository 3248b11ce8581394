"""Search the MLP's hyperparameters with Optuna: `python -m sweep.tune --trials N [k=v ...]`.

Each trial is the DVC experiment tune-<number>, the committed params plus the values Optuna's seeded
TPE sampler asks for (tune.yaml's space) and the extra k=v, run by the study's runner (sweep/local.py's
pool, or Ray with --ray). As one ends, the sampler is told its validation figure (OBJECTIVE, from the
experiment's commit) and asked for the next. The search lives in JOURNAL: --trials N counts the trials that
ended; one stopped midway (Ctrl-C, a kill) is told as failed and queued again with the same params;
one whose run fails is told as failed, its experiment removed (exit status 3, as sweep/local.py's).
"""

import argparse
import signal
import sys
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sweep import local, study

SPACE = Path("tune.yaml")
JOURNAL = Path("reports/tuning.journal")  # git-ignored: runs in flight would carry it into their commits
NAME = "mlp"  # of the Optuna study in the journal
OBJECTIVE = ("metrics/train/metrics.json", "best_val_accuracy")  # of the checkpoint kept by val_loss


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="trials the search has when done (%(default)s)")
    p.add_argument("--space", default=str(SPACE), help="the search space (default %(default)s)")
    study.add_run_args(p)
    p.add_argument("--jobs", type=int, default=local.JOBS, help="trials at once (%(default)s)")
    p.add_argument("--ray", action="store_true", help="on the Ray cluster of RAY_ADDRESS (docs/cluster.md)")
    study.add_cluster_args(p)
    return p.parse_args(argv)


def load_space(path):
    """({dotted param: {choices} or {low, high[, log, step]}}, the sampler's seed) of the space file."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
        space, seed = spec["space"], spec.get("sampler_seed", 0)
        if not all({"choices"} <= set(r) or {"low", "high"} <= set(r) for r in space.values()):
            raise ValueError("each param needs {choices: [...]} or {low: ..., high: ...}")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as e:
        study.fail(f"{path}: not a search space ({e})")
    return space, seed


def suggest(trial, space):
    """The trial's value of every param of the space."""
    values = {}
    for key, r in space.items():
        log, step = r.get("log", False), r.get("step")
        if "choices" in r:
            values[key] = trial.suggest_categorical(key, r["choices"])
        elif all(isinstance(r[k], int) for k in ("low", "high")):
            values[key] = trial.suggest_int(key, r["low"], r["high"], step=step or 1, log=log)
        else:
            values[key] = trial.suggest_float(key, float(r["low"]), float(r["high"]), step=step, log=log)
    return values


def trial_name(number):
    return f"tune-{number:03d}"


def open_search(seed, journal=JOURNAL):
    """The search of the journal (a new one if there is none). The sampler's seed moves on with the
    trials already there, so a resumed search does not redraw the first proposals."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    search = optuna.create_study(study_name=NAME, storage=storage, direction="maximize", load_if_exists=True)
    # constant_liar: trials in flight count as bad guesses, so parallel trials do not propose the same
    search.sampler = optuna.samplers.TPESampler(seed=seed + len(search.trials), constant_liar=True)
    return search


def ended(trials):
    """Trials that count: finished, or failed by themselves (with an error; a stopped one runs again)."""
    return [t for t in trials if t.state == TrialState.COMPLETE or "error" in t.user_attrs]


def objective(exp, params):
    """The experiment's OBJECTIVE, or None if it did not finish or does not have the trial's params."""
    file, key = OBJECTIVE
    if not exp or exp["state"] != "success" or any(exp["params"].get(k) != v for k, v in params.items()):
        return None
    return exp["metrics"].get(file, {}).get(key)


def give_up(search, trial, error=None):
    """Tell `trial` failed, with its `error`, and remove what DVC has of it; without an error it was
    stopped (Ctrl-C, a kill), and is queued again with the params it has drawn (Ctrl-C can land while
    they are drawn: the retry draws the rest)."""
    name = trial_name(trial.number)
    study.sh("dvc", "exp", "remove", name, check=False)
    if error:
        trial.set_user_attr("error", error)
    search.tell(trial.number, state=TrialState.FAIL)
    if not error:
        search.enqueue_trial(trial.params, user_attrs={"retry_of": name})
    print(f"failed {name}: {error}" if error else f"stopped {name}: it runs again", flush=True)


def recover(search, existing, extra):
    """Trials a killed search left running: told from their experiment if it finished, else stopped."""
    for trial in search.get_trials(states=(TrialState.RUNNING,)):
        value = objective(existing.get(trial_name(trial.number)), {**trial.params, **extra})
        if value is None:
            give_up(search, trial)
        else:
            search.tell(trial.number, value)
            print(f"{trial_name(trial.number)} had finished before the stop: {OBJECTIVE[1]} {value:.4f}")


def run_trials(search, space, extra, args, existing):
    """Ask, run and tell until --trials have ended; [names of failed trials]. KeyboardInterrupt: the
    trials in flight are stopped, told so and queued again before it is raised on."""
    flight, failed = {}, []  # name -> (its Optuna trial, the overrides it runs with); names

    def ask():
        trial = search.ask()
        name, values = trial_name(trial.number), suggest(trial, space)
        if name in existing:  # from a search whose journal was moved away
            print(f"remove {name}: an experiment of an earlier search")
            study.sh("dvc", "exp", "remove", name)
        flight[name] = trial, {**values, **extra}
        trial.set_user_attr("set", study.describe(extra))
        return name, flight[name][1]

    def tell(name, error):
        trial, overrides = flight[name]  # still in flight: Ctrl-C while reading its metrics stops it
        value = None if error else objective(study.published(name, OBJECTIVE[:1]), overrides)
        if value is None:
            failed.append(name)
            give_up(search, trial, error or f"no {OBJECTIVE[1]} in its metrics")
        else:
            search.tell(trial, value)
        del flight[name]
        if value is not None:
            best = search.best_trial
            print(f"{name}: {OBJECTIVE[1]} {value:.4f}; best {trial_name(best.number)} {best.value:.4f}")
        return [ask()] if args.trials - len(ended(search.trials)) - len(flight) > 0 else []

    done, problems = [], {}
    try:
        todo = [ask() for _ in range(max(0, min(args.jobs, args.trials - len(ended(search.trials)))))]
        if args.ray:
            from sweep import cluster

            cluster.fan_out(todo, args, lambda _, overrides: [*study.assignments(overrides), "--trial"], tell)
        else:
            local.run_all(todo, args.jobs, args.timeout, done, problems, lambda n: tell(n, problems.get(n)))
    except KeyboardInterrupt:
        # Every running trial is this search's (the workspace is locked), in flight or not yet: Ctrl-C
        # can land after Optuna has started a trial and before ask() has it in `flight`.
        for trial in search.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            give_up(search, trial)
        raise
    return failed


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as sweep/local.py does, for its stop()
    args = parse_args(argv)
    if args.jobs < 1 or args.trials < 0:
        study.fail(f"--jobs must be positive and --trials not negative, got {args.jobs} and {args.trials}")
    space, seed = load_space(args.space)
    extra, base = study.parse_overrides(args.set), study.committed_params()
    study.check_known([(args.space, dict.fromkeys(space)), ("SET", extra)], base)
    for key in set(space) & set(extra):
        print(f"warning: SET's {key} overrides the space's: every trial runs with {extra[key]}")
    study.check_committed("would leak into every trial; commit or stash them first")
    study.check_git_identity()
    if args.ray:
        from sweep import cluster  # Ray only when asked for: `make setup-cluster` installs it

        cluster.check_remotes()
    with study.lock_workspace():
        search = open_search(seed)
        existing = study.experiments()
        recover(search, existing, extra)
        try:
            failed = run_trials(search, space, extra, args, existing)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(ended(search.trials))} of {args.trials} trials ended and kept; "
                  "run the search again for the rest (stopped ones run again)")  # fmt: skip
            return 130
    print(f"\ntune: {len(ended(search.trials))} of {args.trials} trials ended, {len(failed)} failed now")
    return study.RUNS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
