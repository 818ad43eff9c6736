"""Dataset loaders for the utrc_* lm-eval tasks (referenced by `custom_dataset: !function`)."""
from __future__ import annotations

import sys
from pathlib import Path


def _load(name: str):
    import datasets

    try:
        from utrc_lib.tasks import load_task
    except ImportError:  # lm-eval loads this file by path; make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from utrc_lib.tasks import load_task
    items = load_task(name)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def load_cloze(**kwargs):
    return _load("cloze")


def load_choice4(**kwargs):
    return _load("choice4")


def load_choice2(**kwargs):
    return _load("choice2")
