"""`python -m utrc_study.scaleout`: the sweep over several processes / devices. The code lives in `utrc_study.experiments.scaleout`;
this module is only the command-line entry point (it keeps the command short and stable)."""
if __name__ == "__main__":
    import sys

    from utrc_study.experiments.scaleout import main

    sys.exit(main())
