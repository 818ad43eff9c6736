"""lm-eval integration: `--model utrc` and the local task YAMLs (utrc_cloze, utrc_choice4, utrc_choice2, utrc_ppl).

    python -m utrc_study.eval --model-name tiny-mamba2 --method utrc --flops-reduction 0.2 \
        --tasks utrc_cloze,utrc_choice4,utrc_choice2,utrc_ppl --limit 100 --output results.json

`register()` imports the adapter, which registers the model name "utrc" with lm-eval's registry.
`TASKS_DIR` is the folder to pass as `include_path` to `lm_eval.tasks.TaskManager`; the YAMLs load
their items through `lm_eval_tasks/utrc_data.py`, which finds data/benchmarks from the package location (or
$UTRC_DATA_DIR), so they work from any working directory.

In sweeps (`utrc_study.experiments.sweep.evaluate_config`, the notebooks' evaluator) a task name that is
not built-in is an lm-eval task: `lm_eval_rows` runs it through lm-eval with per-sample logging and
turns the samples into the built-in evaluator's per-item rows.
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_TASKS = ("utrc_cloze", "utrc_choice4", "utrc_choice2", "utrc_ppl")
PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


def register():
    """Import the adapter (registers `--model utrc`); returns the LM class."""
    from utrc_lib.integrations.lm_eval import UTRCLM

    return UTRCLM
