"""What a reader sees: plotting styles, results.json provenance, token-fate rendering, the notebooks'
sources and setup (`notebooks`: .py <-> .ipynb sync, `setup(name, globals())`), the notebook runner
(`python -m utrc_study.figures`)."""
