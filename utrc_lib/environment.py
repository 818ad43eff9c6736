"""Where things are and what produced a result: the repository (a source checkout), its data folder,
the scratch cache, the software versions and the code version.

One definition for every layer (this module imports nothing of the package at import time).
`UTRC_DATA_DIR` overrides the data folder (models, tokenizer, benchmarks) for installs outside a
checkout.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"


def data_dir() -> Path:
    """Folder holding models/, tokenizer/ and benchmarks/ (UTRC_DATA_DIR, else the checkout's data/)."""
    env = os.environ.get("UTRC_DATA_DIR")
    return Path(env).expanduser() if env else REPO / "data"


# -- writable outputs -----------------------------------------------------------------------------
def ensure_writable(path, what: str = "output", *, replace: bool = False) -> Path:
    """Check that `path` can be written before any work is spent on it; returns it as a Path.

    Creates the parent folders. An existing file is opened for appending (nothing is written); with
    `replace` (the file is rewritten through a temporary file and os.replace) the folder must also
    take a new file. Raises OSError naming `what` and the path, with the reason.
    """
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            with p.open("ab"):
                pass
        if replace or not p.exists():
            with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
                pass
    except OSError as exc:
        raise OSError(f"{what} {str(p)!r} is not writable ({type(exc).__name__}: {exc}); "
                      f"pass a writable path") from exc
    return p


# -- provenance -----------------------------------------------------------------------------------
# files (relative to the repository) that cannot change a computed number: presentation, CLIs, conversion
PACKAGES = ("utrc_lib", "utrc_study")     # the library and the study harness (its scorer, sweeps, analyses)
NOT_NUMERIC = {"utrc_lib/flops.py", "utrc_lib/environment.py", "utrc_lib/hosts/convert.py", "utrc_study/bench.py",
               "utrc_study/figures.py", "utrc_study/scaleout.py", "utrc_study/experiments/bench.py",
               "utrc_study/experiments/scaleout.py"}
NOT_NUMERIC_DIRS = ("utrc_study/report/",)


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """Hash of the library's and the harness's sources that affect computed numbers, and of the
    benchmark manifest."""
    h = hashlib.sha256()
    for p in sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py")):
        rel = p.relative_to(REPO).as_posix()
        if rel in NOT_NUMERIC or rel.startswith(NOT_NUMERIC_DIRS):
            continue
        h.update(rel.encode())
        h.update(p.read_bytes())
    manifest = REPO / "data" / "benchmarks" / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> Optional[str]:
    """HEAD of the checkout ("+dirty" when utrc_lib or utrc_study has uncommitted changes), None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *PACKAGES], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _distribution_version(name: str) -> Optional[str]:
    from importlib import metadata

    for dist in (name.replace("_", "-"), name):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Versions of the software (and the machine) that produced a result.

    python, platform, torch (its own version string, e.g. "2.13.0+cpu"), torch_threads, cuda (the
    CUDA torch was built with, None for CPU builds), numpy, transformers, tokenizers, mamba_ssm,
    triton (None when not installed), utrc_lib (package version), utrc_code_version
    (`code_version()`: the hash that keys cached sweep rows) and git_commit.
    """
    import torch

    from . import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    for pkg in ("numpy", "transformers", "tokenizers", "mamba_ssm", "triton"):
        out[pkg] = _distribution_version(pkg)
    out.update(utrc_lib=__version__, utrc_code_version=code_version(), git_commit=git_commit())
    return out


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no hub access (any value but "", "0", "false", "no")."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
