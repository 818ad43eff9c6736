#!/bin/bash
# SUPERSEDED by scripts/gpu_evidence.py (issue 25), which writes the rows as committed evidence
# (figures/<notebook>/evidence/) instead of a git-ignored sweep cache; kept as the record of issue 12's run.
# The full evaluation run behind the committed figures of 01 / 02 / 04 (issue 12), on one GPU:
# every item of every task, all methods, all cuts, both embedded models, float32 transformers path.
#   bash scripts/gpu_full_run.sh            (on the GPU machine, from the repo root; OUT defaults to out/)
# Runs the three notebooks as scripts (no Jupyter needed) with limit=null (all items) and
# batch_size=$BATCH (512: one request is too short to reduce costs O(log B) extra forwards), then the
# GPU-tier evaluator test with what is left of DEADLINE; the sweep cache is resumable: a rerun with the cache
# carried back computes only what is missing. Writes $OUT/full_run.log (also inside the cache tarball), $OUT/figures_full.tar.gz (the
# notebooks' figures/<name>/ folders) and $OUT/sweeps_full.tar.gz (the sweep cache with item arrays).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
LOG=$OUT/full_run.log
DEADLINE=${DEADLINE:-560}
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export UTRC_REFERENCE_BUDGET_BYTES=8000000000 UTRC_REFERENCE_CACHE_BYTES=32000000000
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CACHE=${CACHE:-.cache/sweeps_full}
mkdir -p "$CACHE"
[ -f "$OUT/../sweeps_full.tar.gz" ] && tar xzf "$OUT/../sweeps_full.tar.gz"
[ -f .carry/sweeps_full.tar.gz ] && tar xzf .carry/sweeps_full.tar.gz
say() { echo "[full_run +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
say "host $(hostname); $(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -1); $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
BATCH=${BATCH:-512}
TEST_S=${TEST_S:-120}   # kept for the GPU-tier test at the end
left=$(( DEADLINE - $(date +%s) + START - 25 - TEST_S ))
say "notebooks 01 02 04, limit=null, batch_size=$BATCH, until +$(( DEADLINE - 25 - TEST_S ))s"
timeout --signal=INT --kill-after=10 $left python3 -m utrc_lib.figures --engine script \
  --only ${NOTEBOOKS:-01_main_results 02_design_choices 04_failure_of_transformer_methods} \
  --param limit=null --param batch_size=$BATCH --param cache_dir="$PWD/$CACHE" 2>&1 | tee -a "$LOG"
say "figures exit ${PIPESTATUS[0]}"
left=$(( DEADLINE - $(date +%s) + START - 20 ))
[ "$left" -gt 40 ] && timeout $left python3 -m pytest -q -m gpu tests/test_gpu_eval.py -p no:cacheprovider 2>&1 | tail -5 | tee -a "$LOG"
cp "$LOG" "$CACHE/full_run.log"; tar czf "$OUT/sweeps_full.tar.gz" "$CACHE"
tar czf "$OUT/figures_full.tar.gz" figures/01_main_results figures/02_design_choices figures/04_failure_of_transformer_methods
say "done"; rm -f "$LOG"
