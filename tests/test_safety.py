"""Safe by default, checked in the source: no pickle, safe YAML and model loading, no shell strings,
HTTPS mirrors first. A new call that breaks a rule fails here until it is written the safe way."""

import ast
import re

import yaml
from conftest import ROOT

from stages import download

SOURCES = {path.name: path.read_text() for path in sorted((ROOT / "stages").glob("*.py"))}


def calls(name):
    """(file, source text) of every call whose function is spelled `...name(...)` in stages/."""
    found = []
    for file, text in SOURCES.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == name:
                found.append((file, ast.unparse(node)))
    return found


def test_np_load_never_allows_pickle():
    loads = calls("load")
    numpy_loads = [(f, c) for f, c in loads if c.startswith(("np.load(", "numpy.load("))]
    assert numpy_loads, "expected np.load in stages/"
    for file, call in numpy_loads:
        assert "allow_pickle=False" in call, f"{file}: {call}"


def test_yaml_is_only_safe_loaded():
    for file, call in calls("load") + calls("load_all") + calls("unsafe_load") + calls("full_load"):
        assert not call.startswith("yaml."), f"{file}: {call}: use yaml.safe_load"
    assert calls("safe_load")


def test_keras_models_load_in_safe_mode():
    loads = calls("load_model")
    assert loads
    for file, call in loads:
        assert "safe_mode=True" in call, f"{file}: {call}"


def test_no_pickle_shell_or_eval():
    for file, text in SOURCES.items():
        for pattern in (
            r"\bimport pickle\b",
            r"\bsubprocess\b",
            r"\bos\.system\b",
            r"\bos\.popen\b",
            r"shell\s*=\s*True",
            r"\beval\(",
            r"\bexec\(",
            r"\bjoblib\b",
            r"\bdill\b",
        ):
            assert not re.search(pattern, text), f"{file}: {pattern}"


def test_stage_commands_take_no_params():
    """dvc.yaml's commands are fixed strings: params reach the stages through params.yaml, never a shell."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python3 -m stages.{name}"


def test_public_mirrors_are_https_first_and_every_file_is_pinned(monkeypatch):
    for dataset, mirrors in download.PUBLIC_MIRRORS.items():
        schemes = [url.split("://")[0] for url in mirrors]
        assert schemes[0] == "https" and schemes == sorted(schemes, key=lambda s: s != "https")
        monkeypatch.delenv(f"{download.prefix(dataset)}_SHA256SUMS", raising=False)
        pins = download.expected(dataset)
        assert list(pins) == list(download.FILES)
        for digest, size in pins.values():
            assert re.fullmatch(r"[0-9a-f]{64}", digest) and size > 0
    assert "verify(" in SOURCES["download.py"].split("def download(")[1]  # whatever the transport
