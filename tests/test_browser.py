"""The notebooks in a real JupyterLab, driven by headless Chromium (scripts/browser_check.py).

Opt-in (`make test-browser`, which sets UTRC_BROWSER=1): needs Debian's chromium + chromium-driver and
selenium (the `browser` extra); skipped otherwise, with the reason. Each notebook runs with quick=True
injected; a failure names the notebook and the cell. Screenshots: .cache/browser/<notebook>.png (or
UTRC_BROWSER_SHOTS).
"""
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import browser_check  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(3600)]


def test_notebooks_run_in_jupyterlab(tmp_path):
    if os.environ.get("UTRC_BROWSER") != "1":
        pytest.skip("browser test is opt-in: run `make test-browser` (sets UTRC_BROWSER=1)")
    missing = browser_check.missing_requirements()
    if missing:
        pytest.skip("browser test needs " + ", ".join(missing) + "; then `make test-browser`")
    shots = Path(os.environ.get("UTRC_BROWSER_SHOTS", REPO / ".cache" / "browser"))
    only = os.environ.get("UTRC_BROWSER_NOTEBOOKS", "").split()
    report = tmp_path / "report.json"
    rc = browser_check.main([*(["--only", *only] if only else []), "--shots", str(shots), "--report", str(report)])
    reports = json.loads(report.read_text())
    failures = [f for r in reports for f in r["failures"]]
    assert rc == 0 and not failures, "\n".join(failures)
    for r in reports:
        png = Path(r["screenshot"])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r["notebook"]
    teaching = [r for r in reports if r["notebook"].startswith("05_")]
    for r in teaching:  # the explorer's widgets rendered and re-drew on a change in the browser
        assert r["widgets"] > 0 and r.get("redraw", "").startswith("re-drawn"), r
