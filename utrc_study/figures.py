"""`python -m utrc_study.figures`: regenerate every notebook's figures (the main job). The code lives in `utrc_study.report.figures`;
this module is only the command-line entry point (it keeps the command short and stable)."""
if __name__ == "__main__":
    import sys

    from utrc_study.report.figures import main

    sys.exit(main())
