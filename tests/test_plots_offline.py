"""`dvc plots show` and `dvc plots diff` draw their charts with no network (.dvc/offline-plots/).

The pages are opened in headless Chromium inside a network namespace with no interfaces, so a
chart exists only if vega, vega-lite and vega-embed came from the page itself, not from a CDN.
"""

import re
import shutil
import subprocess

import pytest
from conftest import ROOT, copy_project, run
from PIL import Image

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    not CHROMIUM, reason="chromium not installed: apt-get update && apt-get install -y chromium"
)
# The <div> ids dvc-render gives the data-series plots of dvc.yaml (the figures are plain <img>s).
PLOTS = {"Loss", "Accuracy", "Confusion_matrix__test_"}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Belt and braces where `unshare -n` is not allowed: every connection goes to a closed port.
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=10000",  # lets the page's scripts run to the end before the dump
]


def write_plot_inputs(work, shift=0.0):
    """DVCLive-style histories, test predictions and one figure: what the plots of dvc.yaml read."""
    for split, offset in (("train", 0.0), ("eval", 0.05)):
        for name in ("loss", "accuracy"):
            path = work / f"metrics/train/plots/metrics/{split}/{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [f"{step}\t{1 / (step + 2) + offset + shift:.4f}" for step in range(3)]
            path.write_text(f"step\t{name}\n" + "\n".join(rows) + "\n")
    pairs = [(d, d) for d in range(10)] + [(3, 5), (4, 9), (7, 1)]
    (work / "metrics/predictions.csv").write_text(
        "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs)
    )
    (work / "metrics/figures").mkdir(exist_ok=True)
    Image.new("L", (28, 28), 255).save(work / "metrics/figures/blank.png")


def offline_dom(page, tmp_path):
    """The DOM of `page` after its scripts ran, in Chromium with networking disabled."""
    # A network namespace of its own (root only) leaves Chromium no interface but loopback.
    unshared = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0
    isolate = ["unshare", "-n"] if unshared else []
    profile = tmp_path / f"chromium-{page.parent.name}"
    proc = subprocess.run(
        [*isolate, CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def drawn(dom):
    """{div id: whether vega drew a chart in it}: vega's renderer adds a canvas or svg of class "marks"."""
    parts = re.split(r'<div id="([^"]+)"', dom)[1:]
    ids, bodies = parts[::2], parts[1::2]
    return {
        div: bool(re.search(r'<(canvas|svg)[^>]*class="marks"', body))
        for div, body in zip(ids, bodies, strict=True)
    }


@pytest.fixture
def plotted(tmp_path):
    """A project copy whose plot inputs are committed (HEAD) and then changed in the workspace."""
    work = copy_project(tmp_path / "project")
    write_plot_inputs(work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "plots"], work)
    write_plot_inputs(work, shift=0.1)
    return work


@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]])
def test_plots_draw_offline(plotted, tmp_path, command):
    run(["dvc", "plots", *command, "-o", "page"], plotted)
    page = plotted / "page/index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    charts = drawn(offline_dom(page, tmp_path))
    assert {div for div, ok in charts.items() if ok} == PLOTS
    assert any("blank_png" in div for div in charts)  # the figures are on the page as well


def test_default_page_draws_nothing_offline(plotted, tmp_path):
    """Without the template DVC's page loads vega from a CDN: offline no chart draws (the test can fail)."""
    run(["dvc", "config", "--unset", "plots.html_template"], plotted)
    run(["dvc", "plots", "show", "-o", "page"], plotted)
    charts = drawn(offline_dom(plotted / "page/index.html", tmp_path))
    assert set(charts) >= PLOTS
    assert not any(charts.values())


def test_template_is_complete():
    """The committed template has DVC's placeholder, no remote script, and each package's licence."""
    folder = ROOT / ".dvc/offline-plots"
    page = (folder / "template.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<script[^>]+src=", page)
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"/* {name}@" in page
        assert "Redistribution and use in source and binary forms" in (folder / f"LICENSE.{name}").read_text()
    assert (ROOT / ".dvc/config").read_text().count("offline-plots/template.html") == 1
