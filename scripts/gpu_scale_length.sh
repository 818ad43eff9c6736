#!/bin/bash
# Scale x length run of issue 13 on one GPU (notebooks/07_scale_and_length renders it):
#   bash scripts/gpu_scale_length.sh          (on the GPU machine, from the repo root; OUT defaults to out/)
# Runs scripts/scale_length_eval.py (dense on every v2 task for the four models; UTRC / EViT / PuMer /
# ToMe at 30 %, then 20 / 10 % on every v2 task for the Mamba-2 models; Mamba-1 dense last) until
# DEADLINE seconds (default 400: no configuration starts later; one running then may take up to ~1 min).
# Extra arguments go to the script (e.g. --limit-long 200 --mamba1-methods utrc evit pumer tome).
# The device tool carries at most 64 MiB: with figures/ and the other checkpoints moved out of the tree,
# one small model (~50 MiB) fits per call, so the committed run went one model per call, carrying each
# call's scale_length.tar.gz into the next as .carry/scale_length.tar.gz (figures/07_scale_and_length/gpu_run.log
# lists the four calls; Mamba-1 reduced rows need mamba-ssm's selective-scan kernel on the machine:
# scripts/train/device.sh builds it). cloze_v2 was then scored on CPU: make scale-length-cloze-cpu.
# Resumable: a cache tarball found at $OUT/../scale_length.tar.gz or .carry/scale_length.tar.gz is
# unpacked first, so a rerun computes only what is missing. Writes $OUT/scale_length.tar.gz (the cache
# .cache/sweeps/scale_length.jsonl with item arrays, its .log.jsonl and scale_length_run.log).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-400}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export UTRC_REFERENCE_CACHE_BYTES=${UTRC_REFERENCE_CACHE_BYTES:-32000000000}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CACHE=.cache/sweeps/scale_length.jsonl
LOG=.cache/sweeps/scale_length_run.log
mkdir -p .cache/sweeps
for t in "$OUT/../scale_length.tar.gz" .carry/scale_length.tar.gz; do [ -f "$t" ] && tar xzf "$t"; done
PY=${PY:-python3}
{ echo "host $(hostname); $(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -1)";
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'; } 2>&1 | tee -a "$LOG"
# the python deadline stops new configurations; the outer timeout is a last resort (rows are on disk)
timeout --signal=INT --kill-after=15 $(( DEADLINE + 120 )) \
  $PY scripts/scale_length_eval.py --cache "$CACHE" --deadline-s "$DEADLINE" "$@" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
tar czf "$OUT/scale_length.tar.gz" "$CACHE" "$CACHE.log.jsonl" "$LOG" 2>/dev/null || tar czf "$OUT/scale_length.tar.gz" "$CACHE" "$LOG"
ls -la "$OUT"
