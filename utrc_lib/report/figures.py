"""Main job: execute every notebook headlessly (papermill) and regenerate figures/ from the embedded default.

    python -m utrc_lib.figures                 # all notebooks, default parameters
    python -m utrc_lib.figures --only 01_main_results --param limit=50
    python -m utrc_lib.figures --quick         # tiny parameters (what the notebook tests use)

Executed notebooks go to notebooks/executed/ (not committed); each notebook writes
figures/<notebook>/*.png|pdf and results.json itself: this runner passes `out_dir=figures/<notebook>`
(a notebook run any other way writes to a scratch folder, see `utrc_lib.report.notebooks.output_folder`).
`--quick` passes no out_dir (each notebook picks a temp folder); `--param out_dir=...` replaces it. The notebooks are edited as notebooks/0X_*.py (jupytext percent) and run as their paired
.ipynb; a pair out of sync is refused (re-sync with `python -m utrc_lib.report.notebooks sync`).

A full run writes figures/run_summary.json (notebooks run, failed, parameters: stable) and the
wall times to figures/run_log.json (not committed), so regenerating unchanged numbers leaves git clean.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from ..environment import REPO
NOTEBOOKS = REPO / "notebooks"

# Parameters that make every notebook finish in seconds (tests and --quick).
QUICK = {"quick": True}

# Arguments of the notebook kernel: ipykernel's own log at ERROR, which silences its once-per-kernel
# "Kernel is running over TCP without encryption" warning (the kernel listens on localhost only).
# Warnings and output of the notebook code are not affected.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


def execute(path: Path, output: Path, parameters: dict, **kwargs):
    """papermill.execute_notebook with the runner's kernel settings (cwd notebooks/, quiet kernel)."""
    import papermill as pm

    kwargs.setdefault("progress_bar", False)
    return pm.execute_notebook(str(path), str(output), parameters=parameters, cwd=str(NOTEBOOKS),
                               kernel_name="python3", extra_arguments=list(KERNEL_ARGUMENTS), **kwargs)


def notebook_paths(only=None) -> list[Path]:
    paths = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = set(only)
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            valid = ", ".join(p.stem for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
            raise SystemExit(f"unknown notebook(s) {sorted(missing)}; valid: {valid}")
    return paths


def run_notebook(path: Path, parameters: dict, out_dir: Path, log=None, engine: str = "papermill") -> float:
    """Execute one notebook into `out_dir/<name>.ipynb` (engine "papermill"), or its jupytext source
    as a plain Python script in a fresh process (engine "script": for hosts without Jupyter, e.g. a GPU
    machine; figures and results.json are the same, no executed notebook is written); returns its
    wall time (s). Sweep progress lines (`sweep.Progress`) are printed while it runs."""
    log = log or (lambda msg: print(msg, flush=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with _progress_printer(path.stem, log):
        if engine == "papermill":
            execute(path, out_dir / path.name, parameters, log_output=False)
        elif engine == "script":
            run_script(path.with_suffix(".py"), parameters)
        else:
            raise ValueError(f"unknown engine {engine!r}; valid: papermill, script")
    dt = time.time() - t
    log(f"{path.stem}: {dt:.0f}s")
    return dt


def run_script(source: Path, parameters: dict) -> None:
    """Run a notebook's percent source as a script (parameters injected after its parameters cell)
    in a subprocess with cwd notebooks/ and the Agg backend; raises with its stderr tail on failure."""
    import subprocess

    from .notebooks import as_script

    code = as_script(source.read_text(encoding="utf-8"), parameters)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT_PRELUDE + code], cwd=str(NOTEBOOKS), env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{source.name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# what a script run needs from IPython when it is not installed: display() prints
_SCRIPT_PRELUDE = """
import sys, types
try:
    import IPython.display  # noqa: F401
except ImportError:
    _m = types.ModuleType("IPython.display")
    _m.display = lambda *a, **k: [print(x) for x in a]
    _m.Markdown = lambda text: text
    _m.HTML = lambda text: text
    _p = types.ModuleType("IPython"); _p.display = _m
    sys.modules["IPython"] = _p; sys.modules["IPython.display"] = _m
"""


class _progress_printer:
    """Sets $UTRC_PROGRESS_FILE for the notebook's kernel and prints each line written to it."""

    def __init__(self, name: str, log):
        self.name, self.log = name, log

    def __enter__(self):
        import tempfile
        import threading

        from ..experiments.sweep import PROGRESS_ENV

        fd, self.path = tempfile.mkstemp(prefix=f"utrc-progress-{self.name}-", suffix=".log")
        os.close(fd)
        self.env, self.old = PROGRESS_ENV, os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = self.path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tail, daemon=True)
        self.thread.start()
        return self

    def _tail(self):
        with open(self.path, encoding="utf-8") as f:
            while True:
                line = f.readline()
                if line:
                    self.log(f"  {self.name} | {line.rstrip()}")
                    continue
                if self.stop.is_set():
                    return
                self.stop.wait(1.0)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        if self.old is None:
            os.environ.pop(self.env, None)
        else:
            os.environ[self.env] = self.old
        try:
            os.unlink(self.path)
        except OSError:
            pass


def notebook_parameters(name: str, params: dict, quick: bool) -> dict:
    """Parameters passed to notebook `name`: figures/<name> as out_dir (not in quick mode, and not when
    `params` already has one), then `params`."""
    from .notebooks import figures_folder

    return ({} if quick else {"out_dir": str(figures_folder(name))}) | params


def _parse_param(text: str):
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m utrc_lib.figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="notebook stems to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny parameters (seconds per notebook)")
    ap.add_argument("--param", action="append", default=[], help="key=value (JSON value) for every notebook")
    ap.add_argument("--engine", choices=["papermill", "script"], default="papermill",
                    help="papermill (executed notebooks) or script (each source run as a Python script: no Jupyter needed)")
    ap.add_argument("--out", default=str(NOTEBOOKS / "executed"),
                    help="folder for the executed notebooks (not committed; default notebooks/executed)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = dict(QUICK) if a.quick else {}
    params.update(dict(_parse_param(p) for p in a.param))
    from .notebooks import out_of_sync

    stale = out_of_sync(NOTEBOOKS, a.only or None) if a.engine == "papermill" else []
    if stale:  # running an .ipynb older than its .py would publish figures of code nobody reads
        print("\n".join(stale), file=sys.stderr)
        return 1
    paths = notebook_paths(a.only)
    if not paths:
        print("no notebooks found in notebooks/", file=sys.stderr)
        return 1
    timings, failed = {}, []
    t0 = time.time()
    for path in paths:
        try:
            print(f"{path.stem}: running ({len(timings) + len(failed) + 1}/{len(paths)})", flush=True)
            timings[path.stem] = run_notebook(path, notebook_parameters(path.stem, params, a.quick), Path(a.out),
                                              engine=a.engine)
        except Exception as exc:  # report and go on: one broken notebook should not hide the others
            failed.append(path.stem)
            print(f"{path.stem}: FAILED: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
    total = time.time() - t0
    if not a.quick and not a.only:
        (REPO / "figures").mkdir(exist_ok=True)
        summary = {"notebooks": [p.stem for p in paths], "failed": failed, "parameters": params}
        (REPO / "figures" / "run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        run_log = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
                   "timings_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(total, 1)}
        (REPO / "figures" / "run_log.json").write_text(json.dumps(run_log, indent=1) + "\n")
    print(f"done in {total:.0f}s; {len(timings)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
