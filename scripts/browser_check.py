"""Run the notebooks in a real JupyterLab, driven by headless Chromium, and check what a user sees.

    .venv/bin/python scripts/browser_check.py                      # every notebook, quick parameters
    .venv/bin/python scripts/browser_check.py --only 05_algorithm_step_by_step --full

Starts `jupyter lab` from this environment on 127.0.0.1 (random port, a fresh token, its own settings
and workspace folders) over a temporary copy of notebooks/ (beside a link to data/) (with `quick=True` injected as papermill
would, unless --full), opens each notebook in Debian's `chromium` through `chromedriver` and
selenium, runs all cells with JupyterLab's own command `notebook:run-all-cells`, waits for the kernel,
and checks: no cell has an error output or a Traceback on stderr; every widget output renders as
widgets (ipywidgets' `.jupyter-widgets` nodes, no "Error displaying widget"); where the explorer of
05 is shown, choosing another method in its dropdown re-draws it. A PNG screenshot of each notebook
(scrolled to the explorer's controls, else to its last figure) goes to --shots (default .cache/browser/).
Exit 1 with one line per failure naming the notebook and the cell. Needs: apt-get install chromium
chromium-driver; pip install selenium (the `browser` extra). See `make test-browser`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"

# JupyterLab settings for a deterministic session: every cell stays in the DOM (no windowing), no news.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}

STATE_JS = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!w || !w.sessionContext || !w.content) return {ready: false, why: 'no notebook panel'};
const s = w.sessionContext;
const kernel = s.session && s.session.kernel;
const cells = w.content.widgets.map((c, i) => {
  const out = {index: i, type: c.model.type};
  if (c.model.type !== 'code') return out;
  out.count = c.model.executionCount;
  out.errors = c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue);
  out.stderr_tracebacks = Array.from(c.node.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
      .map(n => n.textContent).filter(t => t.includes('Traceback')).map(t => t.slice(0, 300));
  out.widget_outputs = c.model.outputs.toJSON().filter(o => o.data && o.data['application/vnd.jupyter.widget-view+json']).length;
  out.widget_nodes = c.node.querySelectorAll('.jupyter-widgets').length;
  out.dropdowns = c.node.querySelectorAll('.widget-dropdown select').length;
  out.images = c.node.querySelectorAll('.jp-OutputArea-output img').length;
  out.widget_errors = Array.from(c.node.querySelectorAll('.jp-OutputArea-output'))
      .map(n => n.textContent).filter(t => t.includes('Error displaying widget')).length;
  out.source = c.model.sharedModel.getSource().slice(0, 80);
  return out;
});
return {ready: s.isReady, kernel: kernel ? kernel.status : 'none', busy: s.hasNoKernel ? false : undefined, cells: cells};
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_requirements() -> list[str]:
    """What this check needs and does not find (empty: it can run)."""
    missing = []
    if not any(shutil.which(b) for b in CHROMIUM):
        missing.append("chromium (apt-get install chromium)")
    if not shutil.which(DRIVER):
        missing.append("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[browser]')")
    return missing


def prepare(root: Path, names: list[str], quick: bool) -> None:
    """Copy the notebooks into `root`, with quick=True injected (papermill's parameter cell) unless full."""
    import nbformat
    from papermill.parameterize import parameterize_notebook

    (root / "notebooks").mkdir()
    (root / "data").symlink_to(REPO / "data")  # the notebooks read ../data/... as they do from notebooks/
    for name in names:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        if quick:
            for cell in nb.cells:  # papermill reads every cell's tags
                cell.metadata.setdefault("tags", [])
            nb.metadata.setdefault("papermill", {})
            nb = parameterize_notebook(nb, {"quick": True})
        nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
    for rel, value in SETTINGS.items():
        p = root / ".settings" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(value))


def start_lab(root: Path, port: int, token: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabServerApp.user_settings_dir={root / '.settings'}",
           f"--LabServerApp.workspaces_dir={root / '.workspaces'}", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("jupyter lab did not answer on 127.0.0.1 within 120 s")


def make_driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = next(shutil.which(b) for b in CHROMIUM if shutil.which(b))
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=opts)


def wait_for(driver, predicate, timeout: float, what: str, poll: float = 1.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = driver.execute_script(STATE_JS)
        if predicate(last):
            return last
        time.sleep(poll)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f} s (last state: kernel "
                       f"{(last or {}).get('kernel')})")


def run_notebook(driver, base: str, token: str, name: str, shots: Path, timeout: float) -> dict:
    """Open, run all, check, screenshot one notebook. Returns its report (failures listed, not raised)."""
    t0 = time.time()
    report = {"notebook": name, "failures": [], "widgets": 0, "screenshot": None}
    driver.get(f"{base}/lab/tree/notebooks/{name}.ipynb?token={token}")
    wait_for(driver, lambda s: s.get("ready") and s.get("kernel") == "idle", 180, f"{name}: kernel start")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    code = None

    def finished(s):
        nonlocal code
        code = [c for c in s["cells"] if c["type"] == "code"]
        failed = any(c["errors"] for c in code)
        done = all(c["count"] is not None for c in code)
        if s["kernel"] in ("dead", "unknown"):
            raise RuntimeError(f"the kernel is {s['kernel']} (out of memory?)")
        return s["kernel"] == "idle" and (done or failed)

    wait_for(driver, finished, timeout, f"{name}: run all cells", poll=2.0)
    time.sleep(2.0)  # let widget views attach
    state = driver.execute_script(STATE_JS)
    first_widget = controls = None
    for c in state["cells"]:
        if c["type"] != "code":
            continue
        where = f"{name}: cell {c['index']} ({c['source'].splitlines()[0] if c['source'] else ''!r})"
        for e in c["errors"]:
            report["failures"].append(f"{where}: error output {e}")
        for tb in c["stderr_tracebacks"]:
            report["failures"].append(f"{where}: Traceback on stderr: {tb}")
        if c["count"] is None and not report["failures"]:
            report["failures"].append(f"{where}: not executed")
        if c["widget_outputs"]:
            report["widgets"] += c["widget_nodes"]
            first_widget = c["index"] if first_widget is None else first_widget
            if c["dropdowns"] and controls is None:
                controls = c["index"]
            if not c["widget_nodes"] or c["widget_errors"]:
                report["failures"].append(f"{where}: {c['widget_outputs']} widget output(s) did not render "
                                          f"({c['widget_nodes']} widget nodes, {c['widget_errors']} errors)")
    if controls is not None and not report["failures"]:
        report["redraw"] = check_redraw(driver, controls, report, name)
    figures = [c["index"] for c in state["cells"] if c.get("images")]
    target = controls if controls is not None else figures[-1] if figures else len(state["cells"]) - 1
    driver.execute_script(
        "const w = window.jupyterapp.shell.currentWidget; w.content.widgets[arguments[0]].node.scrollIntoView();",
        target)
    time.sleep(1.0)
    shots.mkdir(parents=True, exist_ok=True)
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    report["screenshot"] = str(path)
    # free the kernel (and its model) before the next notebook, then close the tab
    driver.execute_script("const w = window.jupyterapp.shell.currentWidget; "
                          "w.sessionContext.shutdown().then(() => w.dispose());")
    report["seconds"] = round(time.time() - t0, 1)
    report["code_cells"] = len(code or [])
    return report


def check_redraw(driver, index: int, report: dict, name: str) -> str:
    """Pick another method in the first dropdown of the widget cell; the status line must name it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cell = driver.execute_script("return window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]].node;", index)
    selects = cell.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
    if not selects:
        return "no dropdown"
    sel = Select(selects[0])
    options = [o.text for o in sel.options]
    if "tome" not in options:
        return "no 'tome' option"
    driver.execute_script("arguments[0].scrollIntoView();", selects[0])
    sel.select_by_visible_text("tome")
    end = time.time() + 180
    while time.time() < end:
        html = " ".join(e.text for e in cell.find_elements(By.CSS_SELECTOR, ".widget-html"))
        imgs = cell.find_elements(By.CSS_SELECTOR, ".widget-output img")
        if "tome /" in html and imgs:
            return f"re-drawn: {html.strip()[:120]}"
        if "cannot run" in html:
            break
        time.sleep(1.0)
    report["failures"].append(f"{name}: cell {index}: choosing method 'tome' in the explorer did not re-draw it")
    return "failed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="notebook stems (default: every notebooks/0X_*.ipynb)")
    ap.add_argument("--full", action="store_true", help="default parameters instead of quick=True")
    ap.add_argument("--shots", default=str(REPO / ".cache" / "browser"), help="folder for the screenshots")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per notebook run")
    ap.add_argument("--size", default="1280x1000", help="browser window WIDTHxHEIGHT (screenshot size)")
    ap.add_argument("--report", default="", help="write the JSON report here")
    a = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print("browser check cannot run; missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    names = a.only or sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    unknown = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").is_file()]
    if unknown:
        print(f"unknown notebook(s) {unknown}", file=sys.stderr)
        return 2
    width, height = (int(v) for v in a.size.lower().split("x"))
    shots = Path(a.shots).resolve()
    reports = []
    with tempfile.TemporaryDirectory(prefix="utrc-browser-") as tmp:
        root = Path(tmp)
        prepare(root, names, quick=not a.full)
        port, token = free_port(), secrets.token_hex(16)
        log = open(root / "jupyter.log", "w")
        lab = start_lab(root, port, token, log)
        driver = None
        try:
            driver = make_driver(width, height)
            for name in names:
                try:
                    rep = run_notebook(driver, f"http://127.0.0.1:{port}", token, name, shots, a.timeout)
                except Exception as e:  # a hang or a broken page fails this notebook, not the whole run
                    rep = {"notebook": name, "failures": [f"{name}: {type(e).__name__}: {e}"], "screenshot": None}
                reports.append(rep)
                print(f"{name}: {'ok' if not rep['failures'] else 'FAILED'}; widgets {rep.get('widgets', 0)}; "
                      f"{rep.get('redraw', '')} screenshot {rep['screenshot']} ({rep.get('seconds', '-')} s)", flush=True)
        finally:
            if driver is not None:
                driver.quit()
            lab.terminate()
            try:
                lab.wait(timeout=20)
            except subprocess.TimeoutExpired:
                lab.kill()
            log.close()
    failures = [f for r in reports for f in r["failures"]]
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    if a.report:
        Path(a.report).write_text(json.dumps(reports, indent=1) + "\n")
    print(f"{len(reports) - sum(bool(r['failures']) for r in reports)} of {len(reports)} notebooks ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
