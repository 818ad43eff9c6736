"""`python -m utrc_lib.flops`: analytic FLOPs next to the paper's token-layer fraction. The code lives in `utrc_lib.core.flops`;
this module is only the command-line entry point (it keeps the command short and stable)."""
if __name__ == "__main__":
    import sys

    from utrc_lib.core.flops import main

    sys.exit(main())
