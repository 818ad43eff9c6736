"""Where things are: the repository (a source checkout), its data folder and the scratch cache.

One definition for every layer. `UTRC_DATA_DIR` overrides the data folder (models, tokenizer,
benchmarks) for installs outside a checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"


def data_dir() -> Path:
    """Folder holding models/, tokenizer/ and benchmarks/ (UTRC_DATA_DIR, else the checkout's data/)."""
    env = os.environ.get("UTRC_DATA_DIR")
    return Path(env).expanduser() if env else REPO / "data"
