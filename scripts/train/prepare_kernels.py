#!/usr/bin/env python3
"""Put the mamba-ssm pieces the training calls need into .train/ (gitignored), small enough to travel
with all the packed tokens:

  .train/mamba_ssm_py/   mamba-ssm 2.3.2.post1's Python and Triton code, taken from the sm_90 wheel in
                         ../shared/gpu (parts joined, sha256 checked) WITHOUT selective_scan_cuda*.so,
                         the Mamba-1 CUDA extension that is 39.7 of the wheel's 39.9 MB. Mamba-2's
                         kernels are Triton, so the Mamba-2 call runs from this folder on PYTHONPATH
                         (train_small.py registers a stand-in for the missing extension that fails if
                         it is ever called).
  .train/mamba_ssm-2.3.2.post1.tar.gz
                         the PyPI sdist (216 KB) that the Mamba-1 call builds on the device (sm_90
                         only, about 3 minutes on 16 cores), since the wheel and all tokens together
                         exceed what one call can carry.

Usage: .venv/bin/python scripts/train/prepare_kernels.py [--gpu-dir ../shared/gpu] [--out .train]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
WHEEL_SHA256 = "af7d5fe245a01cbdda6d80f3541ffbf545e159053875a795a5f9f10e8cbe6c28"   # as in shared/gpu/setup.sh
SDIST = "mamba_ssm-2.3.2.post1.tar.gz"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-dir", default=None, help="default: ../shared/gpu, else shared/gpu, else .gpu")
    ap.add_argument("--out", default=str(REPO / ".train"))
    a = ap.parse_args(argv)
    cands = [Path(a.gpu_dir)] if a.gpu_dir else [REPO.parent / "shared/gpu", REPO / "shared/gpu", REPO / ".gpu"]
    gpu = next((c for c in cands if sorted(c.glob("mamba_ssm-*-sm90.whl.part*"))), None)
    if gpu is None:
        sys.exit(f"prepare_kernels: no mamba-ssm wheel parts in {', '.join(map(str, cands))}")
    blob = b"".join(p.read_bytes() for p in sorted(gpu.glob("mamba_ssm-*-sm90.whl.part*")))
    if hashlib.sha256(blob).hexdigest() != WHEEL_SHA256:
        sys.exit("prepare_kernels: the joined wheel's sha256 differs from setup.sh's")
    out = Path(a.out)
    dest = out / "mamba_ssm_py"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    n = size = 0
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for info in z.infolist():
            if info.is_dir() or info.filename.endswith(".so"):
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            n += 1
            size += info.file_size
    shutil.copy2(gpu / SDIST, out / SDIST)
    print(f"{dest}: {n} files, {size / 2**20:.2f} MiB (no .so); {out / SDIST}: "
          f"{(out / SDIST).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
