"""Main job: execute every notebook headlessly (papermill) and regenerate figures/ from the embedded default.

    python -m utrc_study.figures                 # all notebooks, default parameters
    python -m utrc_study.figures --only 01_main_results --param limit=50
    python -m utrc_study.figures --quick         # tiny parameters (what the notebook tests use)

Executed notebooks go to notebooks/executed/ (not committed); each notebook writes
figures/<notebook>/*.png|pdf and results.json itself: this runner passes `out_dir=figures/<notebook>`
(a notebook run any other way writes to a scratch folder, see `utrc_study.report.notebooks.output_folder`).
`--quick` passes no out_dir (each notebook picks a temp folder); `--param out_dir=...` replaces it. The notebooks are edited as notebooks/0X_*.py (jupytext percent) and run as their paired
.ipynb; a pair out of sync is refused (re-sync with `python -m utrc_study.report.notebooks sync`).

A full run writes figures/run_summary.json (notebooks run, failed, parameters: stable) and the
wall times to figures/run_log.json (not committed), so regenerating unchanged numbers leaves git clean.

Never degrade (issue 25). 01 / 02 / 04 are rendered from their committed per-item rows
(`utrc_study.report.evidence`, `figures/<notebook>/evidence/`, computed on a GPU by
scripts/gpu_evidence.py) with every statistic recomputed; only configurations the evidence lacks are
computed. Without evidence they run at the CPU default sizes into the separate, git-ignored folder
figures/fresh/<notebook>/ (labelled "CPU subset, n=..."), never over figures/<notebook>/; a run with
fewer items than the committed results.json records goes there too (`smaller`). 03_efficiency's CPU
timings are per-machine: by default it runs into figures/fresh/ as well (--per-machine writes it to
figures/). On a CPU the runner then recomputes the first --verify-items items of every configuration
of 01's evidence and checks them against the committed rows (`evidence.verify`); a disagreement fails
the command. --fresh recomputes everything at the sizes this device allows (all items on a GPU, the
CPU defaults otherwise) into figures/fresh/, every figure and results.json labelled "fresh run, n=...";
on a GPU its 01 / 02 rows are also written as evidence folders there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from utrc_lib.environment import REPO
NOTEBOOKS = REPO / "notebooks"

# Parameters that make every notebook finish in seconds (tests and --quick).
QUICK = {"quick": True}

FRESH = REPO / "figures" / "fresh"          # runs that are not the committed ones (git-ignored)
from .notebooks import RUN_LABEL_ENV as LABEL_ENV   # a run's label, stamped on its figures and results.json
PER_MACHINE = ("03_efficiency",)            # CPU timings: figures/<name> is rewritten only with --per-machine
# default verification subset: dense and every method at the 30% cut of both models (18 of 01's 50
# configurations), 5 items per task and 5 ppl windows (its cost grows with the requests: measured on 2
# cores shared with other jobs, load 4-5, ~20 s per configuration at 8 items, ~8 s at 4); --verify-cuts
# all: every configuration
VERIFY_ITEMS, VERIFY_PPL, VERIFY_CUTS = 5, 5, "0.3"
# rough wall seconds of each notebook on 2 CPU cores in the default mode (for the remaining-time estimate)
EXPECTED_S = {"00_walkthrough": 40, "01_main_results": 120, "02_design_choices": 60, "03_efficiency": 90,
              "04_failure_of_transformer_methods": 60, "05_algorithm_step_by_step": 40,
              "06_add_your_own_method": 60, "07_scale_and_length": 60, "09_ssm_methods": 90}

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


def run_size(doc: dict) -> tuple:
    """(all_items, n) of a results.json document: all_items when its run scored every item (limit None),
    else n = items per configuration summed over tasks (0 when unknown)."""
    run = doc.get("run") or {}
    per_task = run.get("items_per_task") or (doc.get("data") or {}).get("items_per_task") or {}
    params = doc.get("parameters") or {}
    if "limit" in params and params["limit"] is None and not doc.get("run", {}).get("subset"):
        return (True, sum(per_task.values()) if per_task else 0)
    if per_task:
        return (False, int(sum(per_task.values())))
    limit = params.get("limit")
    return (False, int(limit or 0) * len(params.get("tasks") or [1]))


def smaller(new: tuple, old: tuple) -> bool:
    """True when a run of size `new` has fewer items than the committed `old` (`run_size` pairs)."""
    if old[0]:
        return not new[0]
    return not new[0] and new[1] < old[1]


def committed_size(name: str):
    """`run_size` of figures/<name>/results.json, None when there is none."""
    from .notebooks import figures_folder

    path = figures_folder(name) / "results.json"
    if not path.is_file():
        return None
    return run_size(json.loads(path.read_text()))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:   # pragma: no cover
        return False


def plan(name: str, params: dict, *, fresh: bool, per_machine: bool, quick: bool, cuda: bool, log=print) -> tuple:
    """(parameters, label, note) of notebook `name` in this run (see the module docstring); the
    parameters hold out_dir (figures/<name> or figures/fresh/<name>) unless quick; None (the notebook is
    not run) for an evidence notebook whose evidence is not committed, outside fresh mode."""
    from . import evidence
    from .notebooks import figures_folder

    if quick:
        return dict(params), "", ""
    params = dict(params)
    fresh_dir = str(FRESH / name)
    device = "GPU" if cuda else "CPU"
    if fresh:
        label = f"fresh run ({device})"
        if name in evidence.FOLDERS:
            params.setdefault("evidence", "")
            if cuda:
                params.setdefault("limit", None)
                params.setdefault("batch_size", 512)
            lim = params.get("limit", evidence.notebook_defaults(name).get("limit"))
            label = f"fresh run, n={'all' if lim is None else lim} items per task ({device})"
        elif name == "07_scale_and_length":
            params.setdefault("cache", "")
            label = f"fresh run, n={evidence.notebook_defaults(name).get('cpu_limit')} items per task ({device})"
        return {"out_dir": fresh_dir, **params}, label, f"fresh run into {fresh_dir}"
    if name in PER_MACHINE and not per_machine:   # a recorded measurement: nothing to re-derive by default
        return (None, "", f"SKIPPED: its CPU timings are per-machine; the committed figures/{name} stays "
                          f"(`make figures FRESH=1` measures this machine into {fresh_dir}, --per-machine rewrites it)")
    label, note = "", ""
    pilot = evidence.PILOTS.get(name)
    if pilot and "evidence" not in params and not evidence.exists(REPO / evidence.FOLDERS[name]) \
            and evidence.exists(REPO / pilot[0]):
        man = json.loads((REPO / pilot[0] / evidence.MANIFEST).read_text())
        dev = man.get("machine", {}).get("gpu") or man.get("machine", {}).get("torch_device", "?")
        n = sorted(set(man.get("items_per_task", {}).values()))
        label = man.get("run_label") or f"pilot ({dev}), n={'/'.join(map(str, n))} items per task"
        sized = {}   # a notebook that reads its rows by configuration (evidence.run) renders at the pilot's size
        if name in evidence.SIZED_PILOTS and len(man.get("limit", [])) == 1:
            lim = man["limit"][0]
            sized = {"limit": None if lim == "None" else int(lim)}
        log(f"{name}: no full evidence ({evidence.FOLDERS[name]}): rendering the pilot {pilot[0]} into {pilot[1]}")
        return ({**sized, **params, "out_dir": str(REPO / pilot[1]), "evidence": str(REPO / pilot[0])}, label,
                f"rendered from the pilot evidence {pilot[0]} into {pilot[1]} (labelled {label!r})")
    if name in evidence.FOLDERS and "evidence" not in params:
        folder = REPO / evidence.FOLDERS[name]
        if evidence.exists(folder):
            man = json.loads((folder / evidence.MANIFEST).read_text())
            params["evidence"] = str(folder)
            if man.get("limit") == ["None"]:
                params.setdefault("limit", None)
            note = f"rendered from the committed evidence {evidence.FOLDERS[name]} ({man.get('configurations')} " \
                   f"configurations, items per task {man.get('items_per_task')})"
            if not man.get("complete", True):
                log(f"WARNING: {evidence.FOLDERS[name]} is incomplete ({man.get('missing_configurations')} "
                    f"configurations missing): they are computed here at the evidence's size (slow on a CPU)")
        elif params.get("limit", "default") is None:   # asked for every item: the full run itself
            params["evidence"] = ""
            note = "no committed evidence: computing every item here (the full run; hours on a CPU)"
        else:
            params["evidence"] = ""
            lim = params.get("limit", evidence.notebook_defaults(name).get("limit"))
            log("!" * 100 + f"\n!!! {name}: NO COMMITTED EVIDENCE ({evidence.FOLDERS[name]} is missing): the committed "
                f"figures/{name} (the full GPU run) are LEFT UNTOUCHED and not re-derived.\n!!! Compute the evidence "
                f"with scripts/gpu_evidence.py; `make figures FRESH=1` runs a CPU subset (n={lim} items per task) into "
                f"{fresh_dir}.\n" + "!" * 100)
            return None, "", f"SKIPPED: no committed evidence ({evidence.FOLDERS[name]}); figures/{name} left untouched"
    out = {"out_dir": str(figures_folder(name)), **params}
    old = committed_size(name)
    if old is not None and name in evidence.FOLDERS and out["out_dir"] == str(figures_folder(name)):
        lim = out.get("limit", evidence.notebook_defaults(name).get("limit"))
        new = (lim is None, 0 if lim is None else int(lim) * len(evidence.notebook_defaults(name).get("tasks", [1])))
        if smaller(new, old):
            log(f"!!! {name}: this run (limit {lim}) has fewer items than the committed figures/{name} "
                f"({'all items' if old[0] else old[1]}): it goes to {fresh_dir}, the committed figures stay")
            return {**out, "out_dir": fresh_dir}, f"subset, n={lim} items per task", f"smaller run into {fresh_dir}"
    return out, label, note


def export_fresh_evidence(name: str, params: dict, log=print) -> None:
    """After a fresh full-size run on a GPU: the rows of notebook `name` from its sweep cache as an
    evidence folder figures/fresh/<name>/evidence (what scripts/gpu_evidence.py writes)."""
    from ..experiments import sweep
    from . import evidence

    if name not in ("01_main_results", "02_design_choices"):
        return
    over = {k: params[k] for k in ("limit", "batch_size") if k in params}
    configs, common = evidence.notebook_configs(name, **over)
    cache_dir = Path(params.get("cache_dir") or REPO / ".cache" / "sweeps")
    rows = {evidence.match_key(r["params"]): r for r in sweep.RowCache(cache_dir / "eval.jsonl").load().values()
            if r.get("status") == "ok" and isinstance(r.get("items"), dict)}
    got = [rows[evidence.match_key({**common, **c})] for c in configs if evidence.match_key({**common, **c}) in rows]
    folder = FRESH / name / "evidence"
    man = evidence.write(got, folder, command="python -m utrc_study.figures --fresh", notebooks=[name],
                         extra={"complete": len(got) == len(configs), "missing_configurations": len(configs) - len(got)})
    log(f"{name}: fresh evidence {folder} ({man['configurations']}/{len(configs)} configurations)")


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m utrc_study.figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="notebook stems to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="tiny parameters (seconds per notebook)")
    ap.add_argument("--param", action="append", default=[], help="key=value (JSON value) for every notebook")
    ap.add_argument("--engine", choices=["papermill", "script"], default="papermill",
                    help="papermill (executed notebooks) or script (each source run as a Python script: no Jupyter needed)")
    ap.add_argument("--out", default=str(NOTEBOOKS / "executed"),
                    help="folder for the executed notebooks (not committed; default notebooks/executed)")
    ap.add_argument("--fresh", action="store_true", default=os.environ.get("FRESH", "") not in ("", "0"),
                    help="recompute everything at the sizes this device allows, into figures/fresh/ (also FRESH=1)")
    ap.add_argument("--per-machine", action="store_true",
                    help="write 03_efficiency's per-machine CPU timings into figures/03_efficiency")
    ap.add_argument("--verify-items", type=int, default=VERIFY_ITEMS,
                    help=f"items per task of the CPU verification of 01's evidence (default {VERIFY_ITEMS}; 0: skip)")
    ap.add_argument("--verify-ppl", type=int, default=VERIFY_PPL, help=f"ppl windows of the verification ({VERIFY_PPL})")
    ap.add_argument("--verify-cuts", default=VERIFY_CUTS,
                    help=f"cuts verified besides dense, comma list or 'all' (default {VERIFY_CUTS})")
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
    cuda = _cuda()
    timings, failed, notes = {}, [], {}
    t0 = time.time()
    expected = {p.stem: EXPECTED_S.get(p.stem, 60) for p in paths}
    for k, path in enumerate(paths, 1):
        el = time.time() - t0
        done_expected = sum(expected[p.stem] for p in paths[:k - 1])
        scale = el / done_expected if done_expected and el > 0 else 1.0
        left = scale * sum(expected[p.stem] for p in paths[k - 1:])
        print(f"[figures] notebook {k} of {len(paths)}: {path.stem}, {_fmt(el)} elapsed, ~{_fmt(left)} left",
              flush=True)
        nb_params, label, note = plan(path.stem, notebook_parameters(path.stem, params, True), fresh=a.fresh,
                                      per_machine=a.per_machine, quick=a.quick, cuda=cuda)
        if note:
            print(f"{path.stem}: {note}", flush=True)
            notes[path.stem] = note
        if nb_params is None:
            expected[path.stem] = 0     # skipped: out of the remaining-time estimate
            continue
        old_label = os.environ.get(LABEL_ENV)
        os.environ[LABEL_ENV] = label
        try:
            print(f"{path.stem}: running ({len(timings) + len(failed) + 1}/{len(paths)})", flush=True)
            timings[path.stem] = run_notebook(path, nb_params, Path(a.out), engine=a.engine)
            if a.fresh and cuda and nb_params.get("limit", "x") is None:
                export_fresh_evidence(path.stem, nb_params)
        except Exception as exc:  # report and go on: one broken notebook should not hide the others
            failed.append(path.stem)
            print(f"{path.stem}: FAILED: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
        finally:
            if old_label is None:
                os.environ.pop(LABEL_ENV, None)
            else:
                os.environ[LABEL_ENV] = old_label
    verified = None
    if not a.quick and not a.fresh and a.verify_items > 0 and not cuda and \
            (not a.only or "01_main_results" in a.only):
        verified = verify_evidence(a.verify_items, a.verify_ppl, t0,
                                   None if a.verify_cuts == "all" else [float(c) for c in a.verify_cuts.split(",")])
    total = time.time() - t0
    if not a.quick and not a.only and not a.fresh:
        (REPO / "figures").mkdir(exist_ok=True)
        summary = {"notebooks": [p.stem for p in paths], "failed": failed, "parameters": params}
        (REPO / "figures" / "run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        run_log = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
                   "timings_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(total, 1),
                   "notes": notes, "verification": verified}
        (REPO / "figures" / "run_log.json").write_text(json.dumps(run_log, indent=1, default=str) + "\n")
    print(f"done in {total:.0f}s; {len(timings)} ok, {len(failed)} failed")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    if verified is not None and not verified.get("ok", True):
        return 1
    return 1 if failed else 0


def verify_evidence(items: int, ppl: int, t0: float, cuts=None, log=print) -> dict:
    """The CPU verification of 01's committed evidence (`evidence.verify`); {"skipped": why} without it."""
    from . import evidence

    folder = REPO / evidence.FOLDERS["01_main_results"]
    if not evidence.exists(folder):
        log(f"verification: skipped ({evidence.FOLDERS['01_main_results']} is not committed yet)")
        return {"skipped": "no evidence", "ok": True}
    log(f"[figures] verification: first {items} items per task ({ppl} ppl windows) of the dense configurations and "
        f"those at cuts {'all' if cuts is None else cuts} of {evidence.FOLDERS['01_main_results']}, recomputed here, "
        f"{_fmt(time.time() - t0)} elapsed")
    stats = evidence.verify(folder, items=items, ppl_items=ppl, cuts=cuts, log=log)
    report = evidence.verify_report(stats, evidence.FOLDERS["01_main_results"])
    log(report if stats["ok"] else "!" * 100 + "\n" + report + "\n" + "!" * 100)
    return {k: v for k, v in stats.items() if k not in ("flips", "outside")} | {
        "flips": stats["flips"][:50], "outside": stats["outside"][:50]}

if __name__ == "__main__":
    sys.exit(main())
