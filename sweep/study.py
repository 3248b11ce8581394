"""What sweep/ablations.py and sweep/report.py share: the study file and DVC's view of the experiments."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

STUDY = Path("ablations.yaml")
BASELINE = "baseline"  # the variant the others are compared with, seed by seed, unless they say `compare_to`
# What a published run may report (fractions and losses); test_accuracy is the one every variant needs.
REFERENCE_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy")


def fail(message):
    sys.exit(f"error: {message}")


def read_study(path):
    """The study file: a mapping with a list under `experiments:`."""
    try:
        study = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: cannot read it ({e})")
    if not isinstance(study, dict) or not isinstance(study.get("experiments"), list):
        fail(f"{path}: needs a list under `experiments:`")
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


def load_seeds(path=STUDY):
    """The study's `seeds:` list: distinct integers in [0, 2**32), as params.yaml's seed allows."""
    seeds = read_study(path).get("seeds")
    if not valid_seeds(seeds):
        fail(f"{path}: `seeds:` must list distinct integers in [0, 2**32), e.g. seeds: [0, 1, 2, 3, 4]")
    return seeds


def valid_seeds(seeds):
    """Is `seeds` a non-empty list of distinct integers in [0, 2**32)?"""
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
        return False
    return all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)


def parse_seeds(text):
    """Seeds given on the command line, '0 1' or 0,1; checked as the study file's are."""
    seeds = [int(s) if s.isdigit() else s for s in text.replace(",", " ").split()]
    if not valid_seeds(seeds):
        fail(f'--seeds {text!r}: give distinct integers in [0, 2**32), e.g. SEEDS="0 1"')
    return seeds


def add_selection_args(parser, verb):
    """--study, --seeds and --only, as every command over the study takes them."""
    parser.add_argument("--study", default=str(STUDY), help="the study file (default %(default)s)")
    parser.add_argument("--seeds", help=f"seeds to {verb} instead of the study's `seeds:`, e.g. '0 1' or 0,1")
    parser.add_argument("--only", help=f"comma-separated variant names: {verb} only these")


def selected_runs(args):
    """(the study, its runs()) for the --study, --seeds and --only that add_selection_args parsed."""
    study = load_study(args.study)
    seeds = parse_seeds(args.seeds) if args.seeds else load_seeds(args.study)
    return study, runs(study, seeds, args.only.split(",") if args.only else None)


def runs(study, seeds, only=None):
    """[(name, overrides)] for each variant (in study order) x seed: name f"{variant}-s{seed}",
    overrides {**variant["set"], "seed": seed}; `only` an iterable of variant names."""
    if only is not None:
        only = set(only)
        unknown = only - {exp["name"] for exp in study}
        if unknown:
            names = ", ".join(exp["name"] for exp in study)
            fail(f"unknown variant {', '.join(sorted(unknown))}; the study has {names}")
    return [
        (f"{exp['name']}-s{seed}", {**exp["set"], "seed": seed})
        for exp in study
        if only is None or exp["name"] in only
        for seed in seeds
    ]


def format_value(value):
    """A param value as DVC's -S and a reader expect it: false, null, 0.2, linear."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe(overrides):
    return ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "none"


def flatten(tree, prefix=""):
    """{"model": {"dropout": 0.2}} -> {"model.dropout": 0.2}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dvc(*args, check=True):
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        fail(f"dvc {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def committed_params():
    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True)
    if proc.returncode != 0:
        fail("no committed params.yaml at HEAD: the study runs from the committed baseline")
    return flatten(yaml.safe_load(proc.stdout))


def experiments():
    """Experiments of HEAD as DVC lists them (`dvc exp show --json`), by name.

    Each: rev (commit), state (success, failed, queued, running), params (flat) and metrics
    ({file: data}). A name that is both done and queued or failed keeps its finished run.
    """
    found = {}
    for baseline in json.loads(dvc("exp", "show", "--json", "--hide-workspace").stdout):
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
