#!/usr/bin/env python3
"""Compute the committed evidence of notebooks 01 / 02 / 04 / 09 on one GPU: every item of every task, every
configuration the notebooks define (01: dense + 8 methods (utrc_reference included) x 3 cuts x 2 models =
50; 02: 29 on tiny-mamba2; 04: 01's rows plus the same grid of 7 methods scored under the authors'
protocol, 44, in its own folder; 09: the SSM-native methods and the ToP-ViM preset, 5 x 3 cuts x 2 models =
30 in figures/09_ssm_methods/evidence, its dense and UTRC rows read from 01's folder (evidence.SHARED: not
computed again, not copied)), float32, TF32 off, batch 256, two worker processes.

A PILOT (`--pilot --limit N`): the same configurations at N items per task, read from and written to the
notebook's pilot folder (evidence.PILOTS) instead; `make figures` renders it, labelled, while the full
evidence is missing. 09's CPU pilot (figures/09_ssm_methods/cpu_pilot/evidence) was made with

    PYTHONPATH=$PWD python scripts/gpu_evidence.py --notebooks 09_ssm_methods --pilot --limit 40 --workers 2 \
        --batch-size 16 --deadline 30000 --out .

THE DEVICE COMMAND (one H100 / H200, repo root as cwd, no internet, 10-minute limit per call):

    PYTHONPATH=$PWD python3 scripts/gpu_evidence.py --out $OUT --deadline 515; cd $OUT && tar czf evidence.tgz figures && rm -rf figures

(the evidence folders are three levels deep: the device tool does not bring such folders back, the tarball it does)

Needs data/models/tiny-mamba2 and data/models/tiny-mamba, data/benchmarks/, data/tokenizer/,
notebooks/*.py and utrc_lib/; no carry. The tree must travel under 64 MiB: `python scripts/device_tree.py out
evidence` before the call leaves only what it needs (about 41 MB), `python scripts/device_tree.py in` after it.
Measured (H100, 2 workers, batch 256, figures/gpu_evidence.log): leak-free configurations take about 6 s
each with two in flight, authors'-protocol ones longer; `python scripts/device_tree.py status` and the
log's first lines say how many are still to compute. It writes figures/<notebook>/evidence/
{configs.json,items.parquet,manifest.json} for 01, 02, 04 and 09 and $OUT/gpu_evidence.log.

AFTERWARDS, on the development machine, from the repo root (FILES = the folder the files came back to):

    python scripts/device_tree.py in   # first: the tree back as it was
    tar xzf FILES/evidence.tgz     # figures/01_main_results, 02_design_choices, 04_failure_of_transformer_methods, 09_ssm_methods evidence
    cat FILES/gpu_evidence.log >> figures/gpu_evidence.log
    python -m utrc_study.report.evidence show figures/01_main_results/evidence     # sizes, machine, complete?

If the log's last line says "INCOMPLETE" (the deadline came first), run the same device command again
with the copied folders in the working tree (they travel with it: untracked files git does not ignore):
the script reads them back and computes only the configurations still missing, then copy again. When
it says "COMPLETE", commit the evidence folders and the log, then `make figures` renders 01 / 02 / 04 / 09
from them (statistics recomputed on the CPU) and checks a verification subset against them.

How it runs: --workers processes on the one GPU (default 2; the tiny models leave the GPU mostly idle,
the work is launch- and Python-bound) claim configurations one at a time (files under --work, the
models' own configurations first), append each finished row to one shared JSON-lines cache, and stop at
--deadline seconds (a configuration cut off then is lost and computed by the next call). The parent then
writes the evidence folders from the rows already committed / carried in plus the new ones
(`utrc_study.report.evidence.write`). The old full run took 4-9 s per configuration on one H200 in one
process (figures/full_run.log: 44 configurations of 01 in 5m18s, 02's 24 others in about 4 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NOTEBOOKS = ("01_main_results", "02_design_choices", "04_protocols",   # 04: 01's rows + its protocol rows
             "09_ssm_methods")   # 09: 01's dense and UTRC rows (read, not copied) + the SSM-native methods
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       # dense references kept per worker: every task of one model fits (choice4 3.5 GB, all four 4.9 GB)
       "UTRC_REFERENCE_BUDGET_BYTES": "4000000000", "UTRC_REFERENCE_CACHE_BYTES": "6000000000"}


def plan(batch_size: int, notebooks=NOTEBOOKS, limit=None):
    """{notebook: [configurations with the common parameters merged]} at full size."""
    from utrc_study.report import evidence

    out = {}
    for nb in notebooks:
        configs, common = evidence.notebook_configs(nb, limit=limit, batch_size=batch_size)
        out[nb] = [{**common, **c} for c in configs]
    return out


# -- worker --------------------------------------------------------------------------------------------
def worker(args) -> int:
    import torch

    from utrc_lib.environment import code_version
    from utrc_study.experiments import sweep

    torch.backends.cuda.matmul.allow_tf32 = False   # float32 as on the CPU (the verification compares them)
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.workers)))   # the workers share the cores
    work = Path(args.work)
    todo = json.loads((work / "todo.json").read_text())
    home = args.home_model
    order = [i for i, c in enumerate(todo) if c["model"] == home] + [i for i, c in enumerate(todo) if c["model"] != home]
    store = sweep.RowCache(work / "rows.jsonl")
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:0 ({torch.cuda.get_device_name(0)})"
    version = code_version()
    (work / "claims").mkdir(exist_ok=True)
    for i in order:
        if (work / "no_new").exists():   # the parent's --soft-deadline passed: finish, start nothing new
            break
        try:
            fd = os.open(work / "claims" / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(args.worker).encode())
        os.close(fd)
        params = todo[i]
        out = sweep.compute(sweep.evaluate_config, params, items=True)
        out["device"] = device
        row = {"key": sweep.row_key(params, version), "params": sweep._canonical(params), "version": version,
               **out, "worker": args.worker}
        if out.get("transient"):
            print(f"worker {args.worker}: device error on configuration {i} (not recorded): {out['error']}", flush=True)
            continue
        store.append(row)
    return 0


# -- parent --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="where the evidence folders go ($OUT)")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start to stop computing (default 540)")
    ap.add_argument("--soft-deadline", type=float, default=None,
                    help="seconds from start after which no worker starts a new configuration (those running "
                         "finish, up to --deadline); for long CPU runs, where a configuration cut off costs minutes")
    ap.add_argument("--workers", type=int, default=2, help="processes on the GPU (default 2: four at batch 512 ran an "
                                                           "80 GB H100 out of memory)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all; a small value tests the script)")
    ap.add_argument("--notebooks", nargs="*", default=list(NOTEBOOKS))
    ap.add_argument("--work", default=None, help="scratch folder (default .cache/gpu_evidence)")
    ap.add_argument("--pilot", action="store_true",
                    help="a pilot at --limit items per task: read and write the notebooks' pilot folders "
                         "(evidence.PILOTS, e.g. figures/09_ssm_methods/cpu_pilot/evidence) instead of their evidence")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--home-model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    if args.worker is not None:
        return worker(args)

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from utrc_study.experiments.timing import progress_log

    say = progress_log(out / "gpu_evidence.log", "gpu_evidence", start)

    import torch

    from utrc_lib.environment import code_version, git_commit
    from utrc_study.experiments import sweep
    from utrc_study.report import evidence

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    say(f"{gpu}; torch {torch.__version__}; code version {code_version()}; commit {git_commit()}; "
        f"workers {args.workers}, batch {args.batch_size}, limit {args.limit}, deadline {args.deadline:.0f}s")
    if args.limit is None and not torch.cuda.is_available():
        say("WARNING: no GPU: the full run on a CPU takes hours (pass --limit N to test the script)")
    if args.pilot and (args.limit is None or any(nb not in evidence.PILOTS for nb in args.notebooks)):
        ap.error(f"--pilot needs --limit and notebooks with a pilot folder ({', '.join(evidence.PILOTS)})")
    folders = {nb: evidence.PILOTS[nb][0] if args.pilot else evidence.FOLDERS[nb] for nb in args.notebooks}
    wanted = plan(args.batch_size, args.notebooks, args.limit)
    have: dict = {}      # match key -> row, from the evidence already in the working tree
    shared: dict = {}    # notebook -> match keys of its rows held by another notebook's evidence (evidence.SHARED)
    previous: dict = {}
    for nb in args.notebooks:
        for other in evidence.SHARED.get(nb, ()):
            sfolder = REPO / evidence.FOLDERS[other]
            if not evidence.exists(sfolder):
                continue
            sev = evidence.load(sfolder)
            keys = set()
            for c in wanted[nb]:
                r = sev.lookup(c)
                if r is not None and not evidence.stale_reason(sev.manifest, c):
                    have[evidence.match_key(c)] = r
                    keys.add(evidence.match_key(c))
            shared.setdefault(nb, set()).update(keys)
            say(f"{nb}: {len(keys)}/{len(wanted[nb])} configurations held by {evidence.FOLDERS[other]} (read there, "
                f"not copied)")
        folder = REPO / folders[nb]
        if evidence.exists(folder):
            ev = evidence.load(folder)
            previous[nb] = ev.manifest
            n = 0
            for c in wanted[nb]:
                r = ev.lookup(c)
                why = evidence.stale_reason(ev.manifest, c) if r is not None else None
                if why:
                    say(f"{nb}: recomputing {c['model']} {c['method']} cut {c['cut']}: {why}")
                    continue
                if r is not None:
                    have[evidence.match_key(c)] = r
                    n += 1
            say(f"{nb}: {n}/{len(wanted[nb])} configurations already in {folders[nb]} (read back)")
    todo, seen = [], set()
    for nb in args.notebooks:
        for c in wanted[nb]:
            k = evidence.match_key(c)
            if k not in have and k not in seen:
                seen.add(k)
                todo.append(c)
    say(f"{len(todo)} configurations to compute: " + ", ".join(
        f"{nb} {sum(evidence.match_key(c) not in have for c in wanted[nb])}" for nb in args.notebooks))

    work = Path(args.work or REPO / ".cache" / "gpu_evidence")
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "todo.json").write_text(json.dumps(todo))
    computed: dict = {}
    if todo:
        models = sorted({c["model"] for c in todo}, key=lambda m: -sum(c["model"] == m for c in todo))
        n_workers = max(1, min(args.workers, len(todo)))
        procs = []
        for w in range(n_workers):   # worker output (warnings) to its own log; its tail is shown on failure
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(w), "--home-model",
                                           models[w % len(models)], "--work", str(work),
                                           "--workers", str(n_workers)], cwd=REPO,
                                          env=dict(os.environ), stdout=open(work / f"worker{w}.log", "w"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        say(f"{n_workers} workers started (home models: {[models[w % len(models)] for w in range(n_workers)]})")
        store = sweep.RowCache(work / "rows.jsonl")
        reported = 0
        t_work = time.time()
        while True:
            time.sleep(2)
            rows = store.load() if (work / "rows.jsonl").is_file() else {}
            if len(rows) > reported:
                el = time.time() - t_work
                left = el / len(rows) * (len(todo) - len(rows))
                for j, r in enumerate(list(rows.values())[reported:], reported + 1):
                    p = r["params"]
                    extra = {k: v for k, v in p.items() if k in ("metric", "layers", "hidden_rule", "residual_rule",
                                                                  "causal", "protect")}
                    say(f"{j}/{len(todo)} configurations ({p['model']}, {p['method']}, cut {p['cut']}"
                        f"{', ' + str(extra) if extra else ''}; {r.get('status')}, {r.get('seconds', 0):.0f}s, worker "
                        f"{r.get('worker')}), {el:.0f}s elapsed, ~{left:.0f}s left")
                reported = len(rows)
            if all(p.poll() is not None for p in procs):
                break
            if args.soft_deadline is not None and time.time() - start > args.soft_deadline \
                    and not (work / "no_new").exists():
                (work / "no_new").write_text("")
                say(f"soft deadline {args.soft_deadline:.0f}s reached: no new configurations, the running ones finish")
            if time.time() - start > args.deadline:
                say(f"deadline {args.deadline:.0f}s reached: stopping the workers")
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGTERM)
                for p in procs:
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                break
        for r in sweep.RowCache(work / "rows.jsonl").load().values() if (work / "rows.jsonl").is_file() else []:
            if r.get("status") == "ok":
                computed[evidence.match_key(r["params"])] = r
            else:
                say(f"FAILED ({r['params']['model']}, {r['params']['method']}, cut {r['params']['cut']}): {r.get('error')}")
        for w, p in enumerate(procs):
            if p.returncode not in (0, None, -signal.SIGTERM):
                tail = (work / f"worker{w}.log").read_text(errors="replace")[-3000:]
                say(f"WARNING: worker {w} exited with code {p.returncode}; its log ends:\n{tail}")

    machine = evidence.machine_info()
    machine["workers"] = args.workers
    command = "PYTHONPATH=$PWD python3 scripts/gpu_evidence.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    missing_total = 0
    for nb in args.notebooks:
        rows, own = [], [c for c in wanted[nb] if evidence.match_key(c) not in shared.get(nb, set())]
        for c in own:
            k = evidence.match_key(c)
            r = computed.get(k) or have.get(k)
            if r is not None:
                rows.append(r)
        missing = len(own) - len(rows)
        missing_total += missing
        if not rows:
            say(f"{nb}: no rows yet; nothing written")
            continue
        call = {"computed_here": sum(evidence.match_key(c) in computed for c in wanted[nb]), "machine": machine,
                "command": command, "code_version": code_version(), "git_commit": git_commit(),
                "seconds": round(time.time() - start)}
        calls = list((previous.get(nb) or {}).get("calls", [])) + [call]
        versions = sorted({c["code_version"] for c in calls})
        folder = out / folders[nb]
        extra = {"complete": missing == 0, "missing_configurations": missing, "calls": calls,
                 "code_versions_of_calls": versions, "tf32": False}
        if shared.get(nb):
            extra["shared"] = {evidence.FOLDERS[o]: len(shared[nb]) for o in evidence.SHARED[nb]}
        if args.pilot:
            where = "CPU" if machine.get("torch_device") == "cpu" else machine.get("gpu", "GPU")
            extra["pilot"] = (f"{where} pilot: {args.limit} items per task, every configuration of the notebook; "
                              f"the full grid is this script without --pilot on a GPU")
            extra["run_label"] = f"{where} pilot, n={args.limit} items per task"
        man = evidence.write(rows, folder, command=command, machine=machine,
                             notebooks=[n for n, f in evidence.FOLDERS.items() if f == evidence.FOLDERS[nb]],
                             extra=extra)
        if len(versions) > 1:
            say(f"WARNING: {nb}: rows from calls at different code versions {versions}")
        say(f"{nb}: wrote {folder} ({man['configurations']}/{len(own)} configurations, {man['item_rows']} item "
            f"rows, {sum(f['bytes'] for f in man['files'].values()) / 1e6:.2f} MB)")
    status = "COMPLETE" if missing_total == 0 else f"INCOMPLETE: {missing_total} configurations missing; copy the " \
                                                   f"folders into the repo and run the same command again"
    say(f"done in {time.time() - start:.0f}s; {status}")
    return 0 if missing_total == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
