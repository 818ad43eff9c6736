"""Structure metrics of one reduction: which files and functions of utrc_lib run between
`utrc_lib.apply(model, cfg)` and the first row gather of the first anchor's plan, and how often the
layer schedule is solved while patching and running three forwards.

    .venv/bin/python scripts/layering_metrics.py [--repo DIR] [--out metrics.json]

--repo points at another checkout (e.g. a `git worktree` of an older commit) whose utrc_lib is
measured instead; only public names (utrc_lib.apply, utrc_lib.ReductionConfig) are used, so the
same script measures any layout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent),
                    help="checkout whose utrc_lib to measure (default: this one)")
    ap.add_argument("--out", default=None, help="write the metrics JSON here (default: print only)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, a.repo)
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM

    import utrc_lib

    pkg = str(Path(utrc_lib.__file__).resolve().parent)
    torch.manual_seed(0)
    model = Mamba2ForCausalLM(Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=12, state_size=16,
                                           head_dim=16, n_groups=1, expand=2, chunk_size=8, num_heads=4)).eval()
    ids = torch.randint(0, 64, (2, 64))
    cfg = utrc_lib.ReductionConfig("utrc", flops_reduction=0.2)

    seen: dict = {}
    solves = {"n": 0}
    state = {"done": False}

    def prof(frame, event, arg):
        if event != "call" or state["done"]:
            return
        code = frame.f_code
        if code.co_filename.startswith(pkg) and not code.co_name.startswith("<"):  # no comprehensions, lambdas
            rel = os.path.relpath(code.co_filename, pkg)
            seen.setdefault((rel, code.co_name), code.co_firstlineno)
            if code.co_name == "gather_rows" and frame.f_back and frame.f_back.f_code.co_name == "apply" \
                    and frame.f_back.f_code.co_filename.endswith("plan.py"):
                state["done"] = True

    def count_solves(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "keep_ratio_for_flops" \
                and frame.f_code.co_filename.startswith(pkg):
            solves["n"] += 1

    with torch.no_grad():
        with utrc_lib.apply(model, cfg):  # warm-up: imports and class bodies are not part of the path
            model(ids)
        sys.setprofile(prof)
        try:
            handle = utrc_lib.apply(model, cfg)
            model(ids)
        finally:
            sys.setprofile(None)
        handle.remove()
        sys.setprofile(count_solves)
        try:
            with utrc_lib.apply(model, cfg):
                for _ in range(3):
                    model(ids)
        finally:
            sys.setprofile(None)
    files = sorted({f for f, _ in seen})
    out = {"repo": a.repo, "files_apply_to_gather": len(files), "functions_apply_to_gather": len(seen),
           "files": files, "functions": sorted(f"{f}:{n}" for f, n in seen),
           "schedule_solves_apply_plus_3_forwards": solves["n"]}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
