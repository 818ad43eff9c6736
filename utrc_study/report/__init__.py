"""What a reader sees: plotting styles, results.json provenance, token-fate rendering, the sentences
and table cells rendered from the numbers (`prose`; 01's tables and figures: `main_results`), the notebooks'
sources and setup (`notebooks`: .py <-> .ipynb sync, `setup(name, globals())`), the notebook runner
(`python -m utrc_study.figures`)."""
