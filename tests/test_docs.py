"""README.md and docs/: every relative link resolves, every page is reachable, the README stays short.

Fast: it reads Markdown and asks git which files a clone would have; nothing runs.
"""

import re
import subprocess
from urllib.parse import unquote

import pytest
import yaml
from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def prose(path):
    """The page without its code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", path.read_text()))


def links(path):
    text = prose(path)
    return [t for t in LINK.findall(text) + REFERENCE.findall(text) if not EXTERNAL.match(t)]


def anchors(path):
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to hyphens."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.fixture(scope="module")
def in_a_clone():
    """The paths a fresh clone holds: tracked files, and new ones not yet added but not git-ignored.

    A link to a generated, git-ignored file (data/model.keras, dvc_plots/) would work here and be
    dead on every clone.
    """
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        return None  # not a git checkout (an unpacked archive): existence on disk is all there is
    files = {ROOT / f for f in out.stdout.split("\0") if f}
    return files | {parent for f in files for parent in f.parents}


def resolve(page, target):
    path, _, anchor = unquote(target).partition("#")
    return (page.parent / path).resolve() if path else page, anchor


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page, in_a_clone):
    broken = []
    for target in links(page):
        path, anchor = resolve(page, target)
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif in_a_clone is not None and path not in in_a_clone:
            broken.append(f"{target}: git-ignored, so missing from every clone")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolve(README, target)[0] for target in links(README)}
    unlinked = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md links none of: {', '.join(unlinked)}"


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move detail to docs/ (at most 200)"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_dates_or_issue_numbers(page):
    """Pages speak in the present tense: what the project does, not when or in which issue it changed."""
    text = page.read_text()
    found = re.findall(r"\b\d{4}-\d{2}-\d{2}\b", text) + re.findall(r"\bissues? #?\d+", text, re.I)
    assert not found, f"{page.relative_to(ROOT)}: {found}"


def test_every_param_has_a_comment():
    """params.yaml's comments are the parameters' reference: no key without one."""
    text = (ROOT / "params.yaml").read_text()

    def leaves(tree):
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in tree.values())

    commented, bare = 0, []
    for line in text.splitlines():
        key = re.match(r"\s*([\w-]+):(.*)$", line)
        value, _, comment = key[2].partition(" #") if key else ("", "", "")
        if value.strip():  # a key with a value, not a section
            commented += len(comment.strip()) >= 10
            bare += [] if len(comment.strip()) >= 10 else [key[1]]
    assert not bare, f"params.yaml: no comment for {', '.join(bare)}"
    assert commented == leaves(yaml.safe_load(text)), "params.yaml: one key per line, each with its comment"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers above on a page made to fail: a dead link, a bad anchor, a link in code, a date."""
    (tmp_path / "here.md").write_text("# Here\n\n## Run `make x`, then (y)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](here.md#run-make-x-then-y) [dead](gone.md) [anchor](here.md#nowhere) [web](https://x.org)\n"
        "```\n[in code](nothing.md)\n```\n`[inline](nothing.md)` ![figure](here.md)\n[ref]: gone.png\n"
    )
    assert links(page) == ["here.md#run-make-x-then-y", "gone.md", "here.md#nowhere", "here.md", "gone.png"]
    assert anchors(tmp_path / "here.md") == {"here", "run-make-x-then-y"}
    assert resolve(page, "here.md#nowhere") == (tmp_path / "here.md", "nowhere")
