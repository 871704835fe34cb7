"""Write ``plots/offline.html``: the page that ``dvc plots show`` fills, with the vega
libraries inline instead of DVC's ``<script src="https://cdn.jsdelivr.net/...">`` tags, so
that the training-curve plots render on a machine without internet.

The libraries come from ``plots/node_modules`` (``npm ci --prefix plots``: the versions
pinned in ``plots/package-lock.json``, those DVC's renderer targets). ``make`` runs this
and points DVC at the page in ``.dvc/config.local`` (``plots.html_template``), so a clone
that has not built it keeps DVC's default page.

Usage: ``python plots/build_template.py`` (from the repository root).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARIES = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
OUT = HERE / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inline (plots/build_template.py): no network needed -->
    SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> int:
    scripts = []
    for name in LIBRARIES:
        path = HERE / "node_modules" / name
        try:
            code = path.read_text(encoding="utf8")
        except FileNotFoundError:
            print(f"{path}: missing (run `npm ci --prefix plots` first)", file=sys.stderr)
            return 2
        if "</script" in code or "{plot_divs}" in code:
            print(f"{path}: cannot be inlined (it contains '</script' or '{{plot_divs}}')", file=sys.stderr)
            return 2
        scripts.append(f"<script>{code}</script>")
    OUT.write_text(PAGE.replace("SCRIPTS", "\n    ".join(scripts)), encoding="utf8")
    print(f"{OUT}: dvc plots page with vega inline ({OUT.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
