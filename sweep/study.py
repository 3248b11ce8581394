"""What sweep/ablations.py and sweep/report.py share: the study file and DVC's view of the experiments."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

STUDY = Path("ablations.yaml")
REFERENCE_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy")


def fail(message):
    sys.exit(f"error: {message}")


def load_study(path=STUDY):
    """The experiments of the study file, checked: unique names, dotted overrides, five reference numbers."""
    try:
        entries = yaml.safe_load(Path(path).read_text())["experiments"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        fail(f"{path}: cannot read a list under `experiments:` ({e})")
    seen = set()
    for i, exp in enumerate(entries):
        name = exp.get("name") if isinstance(exp, dict) else None
        if not name or name in seen:
            fail(f"{path}: experiment {i + 1} needs a unique name, got {name!r}")
        seen.add(name)
        exp.setdefault("set", {})
        if not isinstance(exp["set"], dict) or not all("." in k or k == "seed" for k in exp["set"]):
            fail(f"{path}: {name}: `set` must map dotted params to values, e.g. model.dropout: 0")
        missing = [k for k in REFERENCE_KEYS if k not in (exp.get("reference") or {})]
        if missing:
            fail(f"{path}: {name}: reference lacks {', '.join(missing)}")
    return entries


def runs(study, seeds, only=None):
    """[(name, overrides)] for each variant (in study order) x seed: name f"{variant}-s{seed}",
    overrides {**variant["set"], "seed": seed}; `only` an iterable of variant names."""
    only = set(only) if only is not None else None
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
