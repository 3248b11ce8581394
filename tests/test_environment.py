"""A stage run by a `python` without the project's packages says which environment to use."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("stage", ["download", "preprocess", "train", "evaluate", "plot"])
def test_stage_outside_the_venv_fails_in_one_line(tmp_path_factory, stage):
    bare = tmp_path_factory.getbasetemp() / "bare-venv"
    if not bare.exists():  # an empty venv: the interpreter DVC finds when .venv is not activated
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    proc = subprocess.run(
        [bare / "bin" / "python", "-m", f"stages.{stage}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and "lacks numpy" in lines[0]
    assert "source .venv/bin/activate" in lines[0]


def test_dvc_parses_yaml_in_c():
    """DVC's YAML(typ="safe") loads use ruamel.yaml's C parser, which ruamel.yaml 0.19 makes an extra
    (docs/decisions/yaml-parser-in-c.md): without it every dvc command parses in pure Python."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser
    assert parse_yaml((ROOT / "dvc.lock").read_text(), "dvc.lock")["schema"] == "2.0"
