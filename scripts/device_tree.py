#!/usr/bin/env python3
"""Shrink the working tree to what one device job needs (the device tool copies the tracked and untracked
non-ignored files, at most 64 MiB), and put everything back afterwards.

    python scripts/device_tree.py out evidence                 # before scripts/gpu_evidence.py's call
    python scripts/device_tree.py out depth --models depth-mamba2-64
    python scripts/device_tree.py out depth --models depth-mamba2-12 --carry .train/mamba_ssm_py
    python scripts/device_tree.py out prefill                  # before scripts/gpu_long_prefill.sh / gpu_bench.sh
    python scripts/device_tree.py status                       # what travels now, and what is moved out
    python scripts/device_tree.py in                           # after the call: everything back where it was

Which job for which device script: gpu_evidence.py -> evidence; gpu_depth_eval.py -> depth; gpu_long_prefill.sh,
gpu_bench.sh, gpu_generate.sh, gpu_kernel_microbench.py -> prefill (random-weight shapes). The limit is the
device tool's 64 MiB (67.1 MB) for the tree and the carried paths together.

Jobs (what stays in the tree; everything else that would travel is moved to --stash, default
.cache/device_tree, which git ignores):
  evidence  the code, notebooks/ (their parameter cells define the grid), the tiny models, data/benchmarks,
            data/tokenizer and the evidence folders of 01 / 02 / 04 / 09 (read back to resume);
  depth     the code, data/benchmarks_v2 without docs.jsonl, data/tokenizer_v2, the models named by --models
            and figures/08_depth/evidence (read back to resume); the 64-layer model alone is ~60 MB. Only
            its weights are committed: the weights of the other depths are git-ignored and must be carried
            (`out` lists them under "carry"; about 15 / 25 / 45 MB for 12 / 24 / 48 layers, one per call);
  prefill   the code and tests/ (random-weight shapes: no model, no data).
`out` refuses to run while an earlier `out` is not undone and says how many MB will travel, the carried
paths (--carry, and model weights that must be carried) included; over the limit it exits 1 and leaves
the tree shrunk for `in` to undo. `in` moves every path recorded in the stash's moved.json back; where the
call's results recreated a folder (say figures/09_ssm_methods/evidence), it merges the moved files into it
and leaves in the stash, listed, only files whose path exists again.
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
CODE = ["utrc_lib", "utrc_study", "scripts", "pyproject.toml", "conftest.py", "pytest.ini", "setup.cfg", ".gitignore"]


def keep_list(job: str, models: list[str]) -> list[str]:
    """Paths kept for `job`; a '!path' entry drops a path inside a kept folder."""
    if job == "depth":
        return CODE + ["data/benchmarks_v2", "!data/benchmarks_v2/docs.jsonl", "data/tokenizer_v2",
                       "figures/08_depth/evidence"] + [f"data/models/{m}" for m in models]
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
    """MB of `paths` (files, or folders counted whole)."""
    total = 0
    for p in paths:
        f = REPO / p
        total += f.stat().st_size if f.is_file() else sum(x.stat().st_size for x in f.rglob("*") if x.is_file())
    return total / 1e6


def weights_to_carry(files: list[str], models: list[str]) -> list[str]:
    """Model folders among `models` whose weights exist here but do not travel with the tree (git-ignored)."""
    out = []
    for m in models:
        w = f"data/models/{m}/model.safetensors"
        if w not in files and (REPO / w).is_file():
            out.append(w)
    return out


def _merge_back(src: Path, dest: Path, left: list) -> None:
    """Move `src` to `dest`; where `dest` exists as a folder, merge file by file (a file whose path exists
    again stays in the stash and is listed in `left`)."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dest))
    elif src.is_dir() and dest.is_dir():
        for child in sorted(src.iterdir()):
            _merge_back(child, dest / child.name, left)
    else:
        left.append(str(dest))


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("out", "in", "status"), help="shrink the tree, restore it, or say what travels")
    ap.add_argument("job", nargs="?", choices=("evidence", "depth", "prefill"), help="with out: the device job")
    ap.add_argument("--carry", nargs="*", default=[], help="paths the call carries (counted in the size)")
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
        rec = json.loads(record.read_text()) if record.is_file() else {}
        carry = rec.get("carry") or []
        print(f"{len(files)} files travel{f' + {len(carry)} carried' if carry else ''}, "
              f"{size_mb(files) + size_mb(carry):.1f} MB (limit {LIMIT_MB:.1f} MB = 64 MiB); "
              + (f"job {rec.get('job')}: {len(rec.get('paths', []))} paths moved out" if rec else "nothing moved out"))
        return 0
    if a.action == "out":
        if a.job is None:
            ap.error("out needs a job: evidence, depth or prefill")
        if record.is_file():
            print(f"{record} exists: an earlier `out` is not undone; run `python scripts/device_tree.py in` first",
                  file=sys.stderr)
            return 2
        models = [m for m in a.models.split(",") if m]
        if a.job == "depth" and not models:
            ap.error("the depth job needs --models (the models to evaluate)")
        missing = [m for m in models if a.job == "depth" and not (REPO / "data/models" / m / "model.safetensors").is_file()]
        if missing:
            print(f"no weights for {', '.join(missing)} in data/models (rebuild them from their cards: "
                  f"docs/models-and-data.md)", file=sys.stderr)
            return 2
        files = travelling()
        moves = to_move(files, a.job, models)
        carry = list(a.carry) + weights_to_carry(files, models if a.job == "depth" else [])
        tree = stash / "tree"
        if tree.exists():
            if any(p.is_file() for p in tree.rglob("*")):
                print(f"{tree} holds files but no moved.json: move them back by hand first", file=sys.stderr)
                return 2
            shutil.rmtree(tree)   # empty folders left by an earlier `in`
        stash.mkdir(parents=True, exist_ok=True)
        done: list = []
        for m in moves:
            dest = tree / m
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(REPO / m), str(dest))
            done.append(m)   # recorded as it goes: an interrupted `out` is still undone by `in`
            record.write_text(json.dumps({"job": a.job, "models": models, "carry": carry, "paths": done}, indent=1))
        record.write_text(json.dumps({"job": a.job, "models": models, "carry": carry, "paths": done}, indent=1))
        left = travelling()
        mb = size_mb(left) + size_mb(carry)
        print(f"job {a.job}: moved {len(moves)} paths to {tree}; {len(left)} files travel"
              f"{f' and {len(carry)} carried path(s)' if carry else ''}, {mb:.1f} MB "
              f"({'fits' if mb < LIMIT_MB else 'TOO LARGE for'} the {LIMIT_MB:.1f} MB limit)")
        if carry:
            print(f"carry: {json.dumps(carry)}")
        if mb >= LIMIT_MB:
            print("the tree stays shrunk: run `python scripts/device_tree.py in` to undo", file=sys.stderr)
        return 0 if mb < LIMIT_MB else 1
    if not record.is_file():
        print("nothing is moved out", file=sys.stderr)
        return 0
    moves = json.loads(record.read_text())["paths"]
    clashes: list = []
    for m in moves:
        _merge_back(stash / "tree" / m, REPO / m, clashes)
    record.unlink()
    if clashes:
        print(f"these files exist again in the tree and stay in {stash / 'tree'}: {', '.join(clashes)}", file=sys.stderr)
    else:
        shutil.rmtree(stash / "tree", ignore_errors=True)
    print(f"moved {len(moves)} paths back{f' ({len(clashes)} files left in the stash)' if clashes else ''}; "
          f"{size_mb(travelling()):.1f} MB travel")
    return 0 if not clashes else 1


if __name__ == "__main__":
    sys.exit(main())
