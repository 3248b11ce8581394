"""Rebuild template.html, the page `dvc plots show` and `dvc plots diff` fill (plots.html_template).

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so without network its charts stay
blank. This page carries pinned builds of the three inline instead (a relative <script src> would
break for `dvc plots show -o elsewhere`), fetched with `npm pack`, and keeps their licences beside it.
The versions are the newest of the majors dvc-render 1.0.2 asks the CDN for (vega@5, vega-lite@5,
vega-embed@6), which its vega-lite v5 specs need. Run `make plots-template` after changing one.
"""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "template.html"
# In load order: vega-lite needs vega, vega-embed needs both.
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
# vega's npm tarball has no LICENSE since 5.31; vega-view, its dependency from the same repository
# (vega/vega), ships the identical BSD-3-Clause text.
LICENCE_FROM = {"vega": ("vega-view", "5.16.1")}

# dvc-render's PAGE_HTML with its {scripts} placeholder (the CDN tags) replaced by the inline builds.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {provenance}; BSD-3-Clause, licences in .dvc/offline-plots/. Rebuild: make plots-template -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def pack(name, version, workdir):
    """The tarball of name@version from the npm registry (npm checks its integrity) and npm's record of it."""
    try:
        proc = subprocess.run(
            ["npm", "pack", "--json", f"{name}@{version}"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except FileNotFoundError:
        sys.exit("error: npm not found: install Node.js and npm (Debian: apt-get install npm)")
    except subprocess.TimeoutExpired:
        sys.exit(f"error: npm pack {name}@{version} timed out after 300 s: check the npm registry")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: npm pack {name}@{version} failed: {last}")
    info = json.loads(proc.stdout)[0]
    return tarfile.open(Path(workdir) / info["filename"]), info


def read(tgz, member):
    return tgz.extractfile(f"package/{member}").read().decode()


def main():
    scripts, provenance, files = [], [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, version in PACKAGES.items():
            tgz, info = pack(name, version, workdir)
            with tgz:
                build = read(tgz, f"build/{name}.min.js")
            with pack(*LICENCE_FROM.get(name, (name, version)), workdir)[0] as tgz:
                files[HERE / f"LICENSE.{name}"] = read(tgz, "LICENSE")
            # Inside an inline <script>, "</script" would end the element; "<\/" means the same in JS.
            build = build.replace("</script", "<\\/script")
            scripts.append(f"    <script>/* {name}@{version} */\n{build}\n</script>")
            provenance.append(f"{name}@{version} ({info['integrity']})")
        files[TEMPLATE] = PAGE.format(provenance=", ".join(provenance), scripts="\n".join(scripts))
    # Every file under a temporary name first: a failure leaves the old files, never half of the new ones.
    staged = {path: path.with_name(f".tmp-{os.getpid()}-{path.name}") for path in files}
    try:
        for path, text in files.items():
            staged[path].write_text(text, encoding="utf-8")
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    print(f"wrote {TEMPLATE.relative_to(HERE.parent.parent)}: {', '.join(provenance)}")


if __name__ == "__main__":
    main()
