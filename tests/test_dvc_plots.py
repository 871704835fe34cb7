"""`dvc plots show` renders offline: the page ``make`` builds (``plots/offline.html``) holds
the vega libraries inline, so the training-curve plots need no CDN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, run

TEMPLATE = ROOT / "plots" / "offline.html"


@pytest.mark.skipif(shutil.which("npm") is None, reason="the offline page is built with npm (make plots-offline)")
def test_dvc_plots_show_needs_no_network(tmp_path):
    if not TEMPLATE.is_file():  # `make` builds it; a test run outside make builds it here
        run(["make", "--no-print-directory", "plots-offline"], ROOT)
    out = tmp_path / "plots"
    run([str(VENV_BIN / "dvc"), "plots", "show", "metrics/history", "-o", str(out), "--html-template", str(TEMPLATE)],
        ROOT)
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "<script src=" not in html  # nothing loaded from elsewhere
    versions = {name: json.loads((ROOT / "plots" / "node_modules" / name / "package.json").read_text())["version"]
                for name in ("vega", "vega-lite", "vega-embed")}
    assert versions == {"vega": "5.21.0", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # as plots/package.json pins
    assert all(f'"{v}"' in html for v in versions.values()), "each library's code is inline (it carries its version)"
    curves = sorted(p.stem for p in (ROOT / "metrics" / "history").glob("*.csv"))
    assert curves and [f"vegaEmbed('#metrics_history_{c}_csv'" in html for c in curves] == [True] * len(curves)
