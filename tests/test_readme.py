"""Every shell block of the README, then of docs/data.md, run as printed, in order, in one project copy.

As a newcomer would: a shell whose PATH has no .venv/bin (nor any other dvc), the project's
small config (one epoch) committed, `../shared/mnist` and `~/my-idx` holding the synthetic MNIST, and a
four-variant, one-seed study. Only `make test` is left out (it is this suite). A block the tests
cannot run here carries a `<!-- not run by tests/test_readme.py: why -->` line naming what covers it.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, SMALL, copy_project, git_init, run
from PIL import Image
from synthetic_idx import templates

from sweep import report

MARK = "<!-- not run by tests/test_readme.py: "
BLOCK = re.compile(
    re.escape(MARK) + r"(?P<why>.+?) -->\n```bash\n(?P<code>.*?)```|```bash\n(?P<run>.*?)```", re.S
)
PAGES = ("README.md", "docs/data.md")  # the pages whose blocks run here, in this order
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # no virtualenv, no pyenv shims
STUDY = {"baseline", "no-dropout", "no-relu", "fashion-mlp"}  # the README's, and one on Fashion-MNIST


def blocks(page):
    """[(where, reason it is not run or None, code)] of a page's bash blocks."""
    text, found = (ROOT / page).read_text(), []
    for m in BLOCK.finditer(text):
        line = text[: m.start()].count("\n") + 1
        found.append((f"{page} line {line}", m["why"], m["code"] or m["run"]))
    return found


def glyph(label, path, size=200):
    """A synthetic digit drawn dark on light at `size` px, as a user's scan would be."""
    ink = (templates("mnist")[label] * 255).astype(np.uint8)
    Image.fromarray(255 - ink).resize((size, size), Image.Resampling.BILINEAR).save(path)


@pytest.fixture
def clone(tmp_path, synthetic_env):
    """A project as a fresh clone looks (results committed), with the small config on top."""
    # One epoch, as the README's smoke run sets: its two runs are then the full study's, which skips them.
    work = copy_project(tmp_path / "project", overrides={**SMALL, "train.epochs": 1}, git=False)
    for name in (
        "Makefile",
        "requirements.txt",
        "README.md",
        "ablations.yaml",
        "dvc.lock",
        ".dvc/.gitignore",
    ):
        shutil.copy2(ROOT / name, work / name)
    for name in ("sweep", "metrics"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    study = yaml.safe_load((work / "ablations.yaml").read_text())
    study["experiments"] = [e for e in study["experiments"] if e["name"] in STUDY]
    study["seeds"] = [0]
    (work / "ablations.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    # This checkout's .venv, never a new one: older than the installed marker, so make keeps it.
    installed = (ROOT / ".venv/.installed").stat().st_mtime
    os.utime(work / "requirements.txt", (installed - 60, installed - 60))
    git_init(work)
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / ".git/info/exclude").write_text(".venv\n")

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/mnist").symlink_to(synthetic_env["MNIST_MIRROR"])
    (tmp_path / "shared/fashion-mnist").symlink_to(synthetic_env["FASHION_MNIST_MIRROR"])
    home = tmp_path / "home"
    (home / "my-idx").mkdir(parents=True)
    for gz in sorted(os.listdir(synthetic_env["MNIST_MIRROR"])):
        if gz.endswith(".gz"):
            shutil.copy2(os.path.join(synthetic_env["MNIST_MIRROR"], gz), home / "my-idx" / gz)
    glyph(2, work / "two.png")
    glyph(7, work / "seven.jpg")
    env = {"PATH": PLAIN_PATH, "HOME": str(home), "LANG": "C.UTF-8"}
    for name in ("MNIST_SHA256SUMS", "FASHION_MNIST_SHA256SUMS"):  # the synthetic data's checksums
        env[name] = synthetic_env[name]
    assert shutil.which("dvc", path=PLAIN_PATH) is None and shutil.which("python", path=PLAIN_PATH) is None
    return work, env


@pytest.mark.parametrize("page", PAGES)
def test_every_block_marks_why_it_is_not_run(page):
    found, text = blocks(page), (ROOT / page).read_text()
    assert found and len(found) == text.count("```bash\n"), f"{page}: a bash block the pattern misses"
    for where, why, _ in found:
        assert why is None or "tests/" in why, f"{where}: say which test covers it instead"
    assert text.count(MARK) == sum(why is not None for _, why, _ in found)


def test_readme_blocks_run_as_printed(clone):
    work, env = clone
    ran = []
    for where, why, code in (block for page in PAGES for block in blocks(page)):
        if why:
            continue
        code = "\n".join(c for c in code.splitlines() if not c.startswith("make test "))
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=work, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{where}:\n{code}\n{out[-3000:]}"
        assert not [x for x in out.splitlines() if re.search(r"warning|traceback", x, re.I)], out
        ran.append((code, out))

    text = "\n".join(code for code, _ in ran)
    assert "make repro" in text and "make ablations" in text and "dvc checkout" in text
    predict = next(out for code, out in ran if "make predict" in code)
    assert re.search(r"^two\.png: \d \(", predict, re.M) and re.search(r"^seven\.jpg: \d \(", predict, re.M)
    assert (work / "dvc_plots/index.html").exists()
    assert len((Path(env["HOME"]) / "my-idx/SHA256SUMS").read_text().splitlines()) == 4
    study = next(out for code, out in ran if "make ablations SEEDS" in code)
    assert "study: 2 run, 2 skipped, 0 failed" in study, study
    # The real pipeline's metric files, as the report reads them (tests/test_ablations.py checks the
    # report's arithmetic on a toy stage that writes the same files).
    csv = pd.read_csv(work / "reports/ablations.csv").set_index("name")
    assert set(csv.index) == {f"{name}-s0" for name in STUDY}
    assert csv[list(report.METRICS)].notna().all().all(), csv
    assert "nan" not in (work / "reports/ablations.md").read_text().lower()
    assert (work / "reports/ablations_curves.png").stat().st_size > 10_000
    log = run(["git", "log", "--format=%s", "-1"], work).stdout.strip()
    assert log == "Adopt the no-dropout variant"
    # The README's way back restored the committed state (no-dropout's params, a clean workspace), and
    # docs/data.md's re-download of the same files left it so.
    assert yaml.safe_load((work / "params.yaml").read_text())["model"]["dropout"] == 0
    assert run(["git", "status", "--porcelain", "params.yaml", "metrics"], work).stdout == ""
    adopted = json.loads((work / "metrics/evaluate.json").read_text())
    assert adopted["test_accuracy"] == csv.loc["no-dropout-s0", "test_accuracy"] > 0.5
