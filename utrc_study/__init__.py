"""utrc_study: the study harness around `utrc_lib` (the library).

It measures what the library does and renders it: the offline task suite and the built-in evaluator
(`eval`: classic and fast paths, the leak-free and authors' protocols, the lm-eval task YAMLs), sweeps
with their caches, scale-out, timing, the benchmark and paired statistics (`experiments`), and figures,
provenance, committed evidence, teaching helpers and the notebook runner (`report`).

Imports point one way: `utrc_study` imports `utrc_lib`; `utrc_lib` never imports `utrc_study`
(tests/test_layers.py checks both). Installed with the `study` extra (`pip install -e ".[study]"`).

Entry points:
    python -m utrc_study.figures      regenerate every notebook's figures (the main job, `make figures`)
    python -m utrc_study.eval         the offline evaluation CLI (built-in evaluator or lm-eval)
    python -m utrc_study.bench        timing and memory of prefill and generation
    python -m utrc_study.scaleout     a sweep over several processes / devices
"""
