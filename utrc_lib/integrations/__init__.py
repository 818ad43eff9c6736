"""Thin integrations with other tools: `lm_eval` (`--model utrc` for lm-evaluation-harness 0.4.x) and
`lm_eval_cli` (lm-eval's command line with that model registered). Imported on demand only: importing
`utrc_lib` never imports lm-eval."""
