"""`python -m utrc_study.bench`: the benchmark (timing and memory of prefill and generation). The code lives in `utrc_study.experiments.bench`;
this module is only the command-line entry point (it keeps the command short and stable)."""
if __name__ == "__main__":
    import sys

    from utrc_study.experiments.bench import main

    sys.exit(main())
