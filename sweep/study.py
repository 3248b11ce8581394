"""The study as every command over it sees it: the study file, its runs and their names, overrides
as DVC's -S takes them, DVC's view of the experiments (and of one, read from git), and the lock of
the workspace's study."""

import difflib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

STUDY = Path("ablations.yaml")
BASELINE = "baseline"  # the variant the others are compared with, seed by seed, unless they say `compare_to`
# What a published run may report (fractions and losses); test_accuracy is the one every variant needs.
REFERENCE_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy")
TIMEOUT = 3600  # seconds one `dvc exp run` may take before it counts as stuck
RUNS_FAILED = 3  # exit status when runs failed (1 is an `error:` line: nothing ran), so make still reports
LOCK = Path(".dvc/tmp/study.lock")  # held while a study runs from this workspace (DVC ignores .dvc/tmp)
ERRORS = ("ERROR: ", "fatal: ", "error: ")  # how git and DVC start the line that says what went wrong
REJECTED = "! ["  # how git push starts (after a space) the line naming a refused ref and git's reason


def fail(message):
    sys.exit(f"error: {message}")


def read_study(path):
    """The study file: a mapping with a non-empty list under `experiments:`."""
    try:
        study = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: cannot read it ({e})")
    if not isinstance(study, dict) or not isinstance(study.get("experiments"), list):
        fail(f"{path}: needs a list under `experiments:`")
    if not study["experiments"]:
        fail(f"{path}: the study is empty (`experiments: []`); add a variant, e.g. - name: baseline")
    return study


def load_study(path=STUDY):
    """The experiments of the study file, checked: unique names, dotted overrides, a published test
    accuracy, and `compare_to` (default the baseline) naming another variant."""
    entries = read_study(path)["experiments"]
    names = {exp.get("name") for exp in entries if isinstance(exp, dict)}
    seen = set()
    for i, exp in enumerate(entries):
        name = exp.get("name") if isinstance(exp, dict) else None
        if not name or name in seen:
            fail(f"{path}: experiment {i + 1} needs a unique name, got {name!r}")
        seen.add(name)
        exp.setdefault("set", {})
        if isinstance(exp["set"], dict) and "seed" in exp["set"]:
            fail(f"{path}: {name}: `set` cannot hold seed; every variant runs at each of `seeds:`")
        if not isinstance(exp["set"], dict) or not all("." in k for k in exp["set"]):
            fail(f"{path}: {name}: `set` must map dotted params to values, e.g. model.dropout: 0")
        reference = exp.get("reference")
        if not isinstance(reference, dict) or "test_accuracy" not in reference:
            fail(f"{path}: {name}: reference needs at least the published test_accuracy (a fraction)")
        unknown = sorted(set(reference) - {*REFERENCE_KEYS, "source"})
        if unknown:
            allowed = ", ".join((*REFERENCE_KEYS, "source"))
            fail(f"{path}: {name}: reference has {', '.join(unknown)}; it may hold {allowed}")
        exp.setdefault("compare_to", None if name == BASELINE else BASELINE)
        other = exp["compare_to"]
        if other is not None and (other == name or other not in names):
            fail(f"{path}: {name}: compare_to must name another variant of the study, got {other!r}")
    return entries


def valid_seeds(seeds):
    """Is `seeds` a non-empty list of distinct integers in [0, 2**32), as params.yaml's seed allows?"""
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
        return False
    return all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)


def load_seeds(path=STUDY):
    seeds = read_study(path).get("seeds")
    if not valid_seeds(seeds):
        fail(f"{path}: `seeds:` must list distinct integers in [0, 2**32), e.g. seeds: [0, 1, 2, 3, 4]")
    return seeds


def parse_seeds(text):
    """Seeds given on the command line, '0 1' or 0,1; checked as the study file's are."""
    seeds = [int(s) if s.isdigit() else s for s in text.replace(",", " ").split()]
    if not valid_seeds(seeds):
        fail(f'--seeds {text!r}: give distinct integers in [0, 2**32), e.g. SEEDS="0 1"')
    return seeds


def add_selection_args(parser, verb=None):
    """--study, and with a `verb` --seeds and --only, as every command over the study takes them."""
    parser.add_argument("--study", default=str(STUDY), help="the study file (default %(default)s)")
    if verb:
        parser.add_argument("--seeds", help=f"seeds to {verb} instead of the study's `seeds:`, e.g. '0 1'")
        parser.add_argument("--only", help=f"comma-separated variant names: {verb} only these")


def add_run_args(parser):
    """KEY=VALUE ..., --force and --timeout, as every command that runs experiments takes them."""
    parser.add_argument("set", nargs="*", metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--force", action="store_true", help="re-run experiments that already exist")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds a run may take (%(default)s)")


def add_cluster_args(parser):
    """--cpus and --retries, as every command that runs experiments on Ray takes them."""
    parser.add_argument("--cpus", type=float, default=2, help="with Ray: CPUs one run asks for (%(default)s)")
    parser.add_argument("--retries", type=int, default=3, help="with Ray: tries of a run whose node dies")


def check_cpus(offered, cpus, address):
    """Fail unless one of the nodes offering `offered` CPUs each can take a run of `cpus`: Ray would
    keep such a task queued for as long as one waits, with no message."""
    offered = sorted(set(offered))
    most = max(offered, default=0)
    if most < cpus:
        fix = f"make ablations CPUS={most:g}, or start" if most else "start"
        fail(
            f"a run asks for {cpus:g} CPUs (CPUS={cpus:g}) but the nodes of {address} offer "
            f"{' or '.join(f'{c:g}' for c in offered) or 'none'} each; {fix} nodes with --num-cpus={cpus:g}"
        )


def selected_runs(args):
    """(the study, its runs()) for the --study, --seeds and --only that add_selection_args parsed."""
    study = load_study(args.study)
    seeds = parse_seeds(args.seeds) if args.seeds else load_seeds(args.study)
    return study, runs(study, seeds, args.only.split(",") if args.only else None)


def run_name(variant, seed):
    """The experiment of one variant at one seed: no-dropout-s3."""
    return f"{variant}-s{seed}"


def parse_run_name(name):
    """(variant, seed) of a run_name(), or None."""
    variant, sep, seed = name.rpartition("-s")
    return (variant, int(seed)) if sep and variant and seed.isdigit() else None


def exp_ref(rev, name):
    """The git ref of DVC's experiment `name` of the commit `rev`."""
    return f"refs/exps/{rev[:2]}/{rev[2:]}/{name}"


def exp_refs():
    """[(commit, name)] of every experiment git holds, of any commit (exp_ref's refs read back)."""
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/").splitlines()
    parts = [ref.split("/") for ref in refs]
    return [(p[2] + p[3], p[4]) for p in parts if len(p) == 5 and len(p[2] + p[3]) == 40]


def runs(study, seeds, only=None):
    """[(run_name, overrides)] for each variant (in study order) x seed, overrides
    {**variant["set"], "seed": seed}; `only` an iterable of variant names."""
    if only is not None:
        only = set(only)
        unknown = only - {exp["name"] for exp in study}
        if unknown:
            names = ", ".join(exp["name"] for exp in study)
            fail(f"unknown variant {', '.join(sorted(unknown))}; the study has {names}")
    return [
        (run_name(exp["name"], seed), {**exp["set"], "seed": seed})
        for exp in study
        if only is None or exp["name"] in only
        for seed in seeds
    ]


def format_value(value):
    """A param value as DVC's -S and a reader expect it: false, null, 0.2, linear."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def assignments(overrides):
    """{"model.dropout": 0} -> ["model.dropout=0"]; parse_overrides() reads them back."""
    return [f"{k}={format_value(v)}" for k, v in overrides.items()]


def dvc_set_args(overrides):
    """The `-S KEY=VALUE` arguments of `dvc exp run` for the overrides."""
    return [arg for pair in assignments(overrides) for arg in ("-S", pair)]


def describe(overrides):
    return ", ".join(assignments(overrides)) or "none"


def parse_overrides(items):
    """Extra KEY=VALUE overrides for every run (make ablations SET=...), values as YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"extra override {item!r} is not KEY=VALUE, e.g. train.epochs=1")
        if key == "seed":
            fail('seed is not an override: each run takes one of the seeds; use SEEDS="0 1" (--seeds 0 1)')
        overrides[key] = yaml.safe_load(value)
    return overrides


def check_known(todo, base):
    """Fail, before anything runs, on an override of [(name, overrides)] that is not in `base`."""
    for name, overrides in todo:
        for key in overrides:
            if key not in base:
                close = difflib.get_close_matches(key, base, n=1)
                hint = f"; did you mean {close[0]}?" if close else " (check the study file and SET)"
                fail(f"{name}: {key} is not in params.yaml{hint}")


def flatten(tree, prefix=""):
    """{"model": {"dropout": 0.2}} -> {"model.dropout": 0.2}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def sh(*args, what=None, check=True, timeout=None, **kwargs):
    """Run a command quietly; its stdout, or `error: <what>: <the line where git or DVC says why>`."""
    what = what or " ".join(args)
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        fail(f"{what}: no answer in {timeout:.0f} s")
    if check and proc.returncode != 0:
        fail(f"{what}: {why(proc)}")
    return proc.stdout.strip()


def why(proc):
    """The line of a failed command's output where git or DVC says why (their prefix dropped; a push's
    refused ref with git's reason, whole), else its last line."""
    lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
    said = (x.strip() for x in lines if x.startswith(ERRORS) or x.lstrip().startswith(REJECTED))
    line = next(said, lines[-1])
    return line.split(": ", 1)[-1] if line.startswith(ERRORS) else line


def committed_params():
    what = "no committed params.yaml at HEAD (the study runs from the committed baseline)"
    return flatten(yaml.safe_load(sh("git", "show", "HEAD:params.yaml", what=what)))


def checked_runs(args):
    """(runs(), SET's overrides, the committed params) for the arguments of add_selection_args and
    add_run_args, after checking every override against params.yaml: nothing runs with a typo."""
    _, wanted = selected_runs(args)
    extra, base = parse_overrides(args.set), committed_params()
    check_known([(name, {**own, **extra}) for name, own in wanted], base)
    return wanted, extra, base


def check_committed(why, *paths):
    """Fail if params.yaml, dvc.yaml, stages/ or `paths` have uncommitted changes, saying `why` it matters."""
    dirty = sh("git", "status", "--porcelain", "--", "params.yaml", "dvc.yaml", "stages", *paths)
    if dirty:
        fail(f"uncommitted changes {why}:\n{dirty}")


def git_identity():
    """{"name": user.name, "email": user.email} as git config gives them here ("" where unset)."""
    return {key: sh("git", "config", f"user.{key}", check=False) for key in ("name", "email")}


def check_git_identity():
    """Fail unless git has the name and email DVC signs each experiment's commit with (git config,
    or GIT_AUTHOR_* and GIT_COMMITTER_*): without them every run fails at once with DVC's
    "unexpected error"."""
    config = git_identity()
    for who in ("GIT_AUTHOR", "GIT_COMMITTER"):
        if not all(os.environ.get(f"{who}_{key.upper()}") or value for key, value in config.items()):
            fail(
                "git has no user name and email, which DVC needs to commit each experiment: "
                'git config --global user.name "Your Name"; git config --global user.email you@example.com'
            )


def experiments(cwd=None, env=None):
    """Experiments of HEAD as DVC lists them (`dvc exp show --json`), by name; in `cwd` with `env`.

    Each: rev (commit), state (success, failed, queued, running), params (flat) and metrics
    ({file: data}). A name that is both done and queued or failed keeps its finished run.
    """
    found = {}
    for baseline in json.loads(sh("dvc", "exp", "show", "--json", "--hide-workspace", cwd=cwd, env=env)):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            name, data = rev.get("name") or exp.get("name"), rev.get("data") or {}
            state = (exp.get("executor") or {}).get("state") or ("failed" if rev.get("error") else "success")
            if name in found and found[name]["state"] == "success":
                continue
            found[name] = {
                "rev": rev["rev"],
                "state": state,
                "params": flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {}),
                "metrics": {f: m.get("data") or {} for f, m in (data.get("metrics") or {}).items()},
            }
    return found


def published(name, files):
    """Experiment `name` of HEAD as experiments() gives it, with the metrics of `files` only, read
    from git without starting DVC (a second per call): DVC keeps each experiment as a commit of its
    own, and params.yaml and the pipeline's metrics are files in git. None if there is no such one."""
    ref = exp_ref(sh("git", "rev-parse", "HEAD"), name)
    rev = sh("git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if not rev:
        return None
    shown = {f: sh("git", "show", f"{rev}:{f}", check=False) for f in files}
    metrics = {f: json.loads(text) for f, text in shown.items() if text}
    params = flatten(yaml.safe_load(sh("git", "show", f"{rev}:params.yaml")))
    return {"rev": rev, "state": "success", "params": params, "metrics": metrics}


def lock_workspace():
    """The study's lock, held while the returned file stays open; fails naming the study that holds it.
    flock: the kernel drops a dead process's lock, so a lock file left by one is simply taken over."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    held = LOCK.open("a+")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        owner = json.loads(held.read() or "{}")
        fail(
            f"a study is already running in this workspace (pid {owner.get('pid')}: {owner.get('command')});"
            " wait for it to end, or stop it with Ctrl-C there"
        )
    held.truncate(0)
    held.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}) + "\n")
    held.flush()
    return held
