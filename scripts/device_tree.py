#!/usr/bin/env python3
"""Shrink the working tree to what one device job needs (the device tool copies the tracked and untracked
non-ignored files, at most 64 MiB), and put everything back afterwards.

    python scripts/device_tree.py out evidence                 # before scripts/gpu_evidence.py's call
    python scripts/device_tree.py out depth --models depth-mamba2-64
    python scripts/device_tree.py out prefill                  # before scripts/gpu_long_prefill.sh / gpu_bench.sh
    python scripts/device_tree.py status                       # what travels now, and what is moved out
    python scripts/device_tree.py in                           # after the call: everything back where it was

Jobs (what stays in the tree; everything else that would travel is moved to --stash, default
.cache/device_tree, which git ignores):
  evidence  the code, notebooks/ (their parameter cells define the grid), the tiny models, data/benchmarks,
            data/tokenizer and the evidence folders of 01 / 02 / 04 / 09 (read back to resume);
  depth     the code, data/benchmarks_v2 without docs.jsonl, data/tokenizer_v2, the models named by --models
            and figures/08_depth (its evidence is read back to resume); the 64-layer model alone is ~60 MB;
  prefill   the code and tests/ (random-weight shapes: no model, no data).
`out` refuses to run while an earlier `out` is not undone, and says how many MB will travel; `in` moves
every path recorded in the stash's moved.json back (refusing to overwrite a path that exists again).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent   # --repo replaces it (tests run on a clone)
LIMIT_MB = 64 * 1024 * 1024 / 1e6
CODE = ["utrc_lib", "utrc_study", "scripts", "pyproject.toml", "Makefile", "README.md", "LICENSE", ".ci", "conftest.py",
        "pytest.ini", "setup.cfg", ".gitignore"]


def keep_list(job: str, models: list[str]) -> list[str]:
    """Paths kept for `job`; a '!path' entry drops a path inside a kept folder."""
    if job == "depth":
        return CODE + ["data/benchmarks_v2", "!data/benchmarks_v2/docs.jsonl", "data/tokenizer_v2",
                       "figures/08_depth"] + [f"data/models/{m}" for m in models]
    if job == "prefill":
        return CODE + ["tests"]
    if job == "evidence":   # the notebooks' parameter cells define the grid; the evidence folders are read back
        return CODE + ["notebooks", "data/models/tiny-mamba", "data/models/tiny-mamba2", "data/benchmarks",
                       "data/benchmarks_common.py", "data/tokenizer", "data/paper_results.json", "figures/gpu_evidence.log",
                       *(f"figures/{nb}/evidence" for nb in ("01_main_results", "02_design_choices",
                                                             "04_failure_of_transformer_methods", "09_ssm_methods"))]
    raise ValueError(f"unknown job {job!r}; one of evidence, depth, prefill")


def travelling() -> list[str]:
    """The files the device tool would copy: tracked, and untracked that git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    return [p for p in out.split("\0") if p and (REPO / p).exists()]


def size_mb(paths) -> float:
    return sum((REPO / p).stat().st_size for p in paths if (REPO / p).is_file()) / 1e6


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def to_move(files: list[str], job: str, models: list[str]) -> list[str]:
    """The smallest set of paths (folders where a whole folder goes) to move out for `job`."""
    entries = keep_list(job, models)
    keep = [e for e in entries if not e.startswith("!")]
    drop = [e[1:] for e in entries if e.startswith("!")]
    keep_fn = lambda f: any(_under(f, k) for k in keep) and not any(_under(f, d) for d in drop)
    gone = [f for f in files if not keep_fn(f)]
    kept = set(files) - set(gone)
    # collapse to the highest folder none of whose travelling files is kept
    moves: set = set()
    for f in gone:
        parts = f.split("/")
        top = f
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if not any(_under(k, folder) for k in kept):
                top = folder
                break
        moves.add(top)
    return sorted(m for m in moves if not any(m != o and _under(m, o) for o in moves))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("out", "in", "status"))
    ap.add_argument("job", nargs="?", choices=("evidence", "depth", "prefill"))
    ap.add_argument("--models", default="depth-mamba2-64", help="depth job: comma-separated models that travel")
    ap.add_argument("--stash", default=None, help="where moved paths go (default <repo>/.cache/device_tree)")
    ap.add_argument("--repo", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global REPO
    if a.repo:
        REPO = Path(a.repo).resolve()
    a.stash = a.stash or str(REPO / ".cache" / "device_tree")
    stash = Path(a.stash)
    record = stash / "moved.json"
    if a.action == "status":
        files = travelling()
        moved = json.loads(record.read_text())["paths"] if record.is_file() else []
        print(f"{len(files)} files travel, {size_mb(files):.1f} MB (limit {LIMIT_MB:.1f} MB); "
              f"moved out: {', '.join(moved) or 'nothing'}")
        return 0
    if a.action == "out":
        if a.job is None:
            ap.error("out needs a job: evidence, depth or prefill")
        if record.is_file():
            print(f"{record} exists: an earlier `out` is not undone; run `python scripts/device_tree.py in` first",
                  file=sys.stderr)
            return 2
        models = [m for m in a.models.split(",") if m]
        missing = [m for m in models if a.job == "depth" and not (REPO / "data/models" / m / "config.json").is_file()]
        if missing:
            print(f"models not in data/models: {', '.join(missing)}", file=sys.stderr)
            return 2
        files = travelling()
        moves = to_move(files, a.job, models)
        tree = stash / "tree"
        if tree.exists():
            if any(p.is_file() for p in tree.rglob("*")):
                print(f"{tree} holds files but no moved.json: move them back by hand first", file=sys.stderr)
                return 2
            shutil.rmtree(tree)   # empty folders left by an earlier `in`
        stash.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"job": a.job, "models": models, "paths": moves}, indent=1))
        for m in moves:
            dest = stash / "tree" / m
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(REPO / m), str(dest))
        left = travelling()
        mb = size_mb(left)
        print(f"moved {len(moves)} paths to {stash / 'tree'}; {len(left)} files travel, {mb:.1f} MB "
              f"({'fits' if mb < LIMIT_MB else 'TOO LARGE for'} the {LIMIT_MB:.1f} MB limit)")
        return 0 if mb < LIMIT_MB else 1
    if not record.is_file():
        print("nothing is moved out", file=sys.stderr)
        return 0
    moves = json.loads(record.read_text())["paths"]
    clash = [m for m in moves if (REPO / m).exists()]
    if clash:
        print(f"these paths exist again in the tree; move them aside first: {', '.join(clash)}", file=sys.stderr)
        return 2
    for m in moves:
        (REPO / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stash / "tree" / m), str(REPO / m))
    record.unlink()
    left = [p for p in (stash / "tree").rglob("*") if p.is_file()]
    if left:
        print(f"WARNING: files left in {stash / 'tree'}: {', '.join(map(str, left[:5]))}", file=sys.stderr)
    else:
        shutil.rmtree(stash / "tree", ignore_errors=True)
    print(f"moved {len(moves)} paths back; {size_mb(travelling()):.1f} MB travel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
