"""`python -m utrc_lib.integrations.lm_eval_cli ARGS`: lm-eval's own command line with `--model utrc` registered.

    python -m utrc_lib.integrations.lm_eval_cli --model utrc \
        --model_args pretrained=tiny-mamba2,method=utrc,flops_reduction=0.2 \
        --tasks utrc_cloze,utrc_choice2 --include_path utrc_study/eval/lm_eval_tasks --limit 100

The arguments go to lm-eval's CLI (`lm_eval.__main__.cli_evaluate`) unchanged; the only thing this
adds is the import that registers the model name (`utrc_lib.integrations.lm_eval`). The same command
is installed as the console script `utrc-lm-eval`, and the package declares the `lm_eval.models`
entry point, so lm-eval releases that read it find `--model utrc` without this wrapper.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from . import lm_eval  # noqa: F401  (importing the adapter registers "utrc" with lm-eval's model registry)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
