"""What a reader sees: plotting styles, results.json provenance, token-fate rendering, the notebook
runner (`python -m utrc_lib.figures`)."""
