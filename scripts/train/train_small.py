#!/usr/bin/env python3
"""Train a small-family model (small-mamba2 / small-mamba): `scripts/train/trainer.py --family small`.

Kept as the command the model cards name ("Trained by scripts/train/train_small.py"); every option is
the trainer's, with the small family's preset as defaults (the depth family's recorded commands, which
give every recipe value, run unchanged too). See scripts/train/trainer.py and README.md here.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer  # noqa: E402


def main(argv=None) -> dict:
    return trainer.main(argv, family="small")


if __name__ == "__main__":
    main()
