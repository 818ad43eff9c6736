#!/usr/bin/env python3
"""Train a tiny-family model (tiny-mamba / tiny-mamba2): `scripts/train/trainer.py --family tiny`.

Kept as the command the tiny models' records name (utrc_lib's model table, `make models`); every option
is the trainer's, with the tiny family's preset as defaults. See scripts/train/trainer.py.
  python3 scripts/train_lm.py --backend mamba_ssm --arch mamba2 --d-state 64 --seconds 360 \\
      --out data/models/tiny-mamba2 --verify
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
import trainer  # noqa: E402


def main(argv=None) -> dict:
    return trainer.main(argv, family="tiny")


if __name__ == "__main__":
    main()
