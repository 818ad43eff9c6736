#!/bin/bash
# The depth-controlled family (issue 27) on the GPU machine: one recipe, depth the only change.
#   START=$(date +%s) QUEUE="depth-mamba2-64 depth-mamba2-48" bash scripts/train/depth_family.sh
# Names: depth-<arch>-<layers>[-s<seed>], arch mamba2 | mamba (seed 0 unless -sN).
# Recipe (the same for every model): d_model 256, expand 2, headdim 64, d_state 64 (Mamba-2) / 16 (Mamba-1),
# chunk 256, tied embeddings, tokenizer v2, corpus v2, sequence 1024, batch 64, 60M tokens (916 steps),
# AdamW (0.9, 0.95) lr 1.5e-3, 90 warm-up steps, cosine to 0.1x, weight decay 0.1, clip 1.0, bf16
# autocast with fp32 weights (trainer.py --family depth: the fixed-token recipe, schedule by steps, final weights).
#
# Each model trains under a deadline (START + LIMIT): when the call ends first, trainer.py saves the
# full state in /tmp/depth/ckpt/NAME and exits 75; the same command in the next call, on the still-warm
# machine (it is given back 30 s after a call), resumes it exactly. The queue stops at a suspension.
# A finished model waits in /tmp/depth/done/NAME until it is returned: each call returns as many
# finished models as fit the return limits (8 files, 60 MiB), the rest in later calls.
# carry: .train/tokens (pack.py), .train/mamba_ssm_py (prepare_kernels.py; Mamba-2), and
#        .train/mamba_ssm-2.3.2.post1.tar.gz (Mamba-1: its CUDA scan is built first, ~3 min);
#        .train/triton_cache.tar.gz when a previous call returned it (skips ~2 min of Triton compilation).
# Writes $OUT/NAME/{weights.safetensors.NN, training_log.json}, $OUT/depth.log, and
# $OUT/triton_cache.tar.gz when none was carried. Back here: scripts/train/join.py FILES_AT/NAME --name NAME.
set -uo pipefail
START=${START:-$(date +%s)}
LIMIT=${LIMIT:-585}
QUEUE=${QUEUE:?QUEUE="depth-mamba2-64 ..."}
TOTAL_TOKENS=${TOTAL_TOKENS:-6e7}
OUT=${OUT:-out}; mkdir -p "$OUT"
W=/tmp/depth; mkdir -p $W/ckpt $W/done $W/returned
LOG=$OUT/depth.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TRITON_CACHE_DIR=$W/triton TRITON_CACHE_AUTOTUNING=1
say() { echo "[depth +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
say "host $(hostname); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1); queue: $QUEUE"
[ -f .train/tokens/manifest.json ] || { say "no .train/tokens: run scripts/train/pack.py and carry .train/tokens"; exit 2; }
carried_cache=0
if [ -f .train/triton_cache.tar.gz ] && [ ! -d $W/triton ]; then
  mkdir -p $W/triton && tar xzf .train/triton_cache.tar.gz -C $W/triton && carried_cache=1
  say "Triton cache unpacked ($(du -sh $W/triton | cut -f1))"
fi
[ -d $W/triton ] && [ "$carried_cache" = 0 ] && [ -f $W/triton_was_carried ] && carried_cache=1
[ "$carried_cache" = 1 ] && touch $W/triton_was_carried
export PYTHONPATH=$PWD/.train/mamba_ssm_py:$PWD${PYTHONPATH:+:$PYTHONPATH}

train_one() {   # NAME -> 0 finished (in $W/done), 75 suspended, other: failed
  local name=$1 arch layers seed=0 rest
  rest=${name#depth-}; arch=${rest%%-*}; rest=${rest#*-}; layers=${rest%%-*}
  [[ "$rest" == *-s* ]] && seed=${rest##*-s}
  case "$arch" in mamba2|mamba) ;; *) say "bad name $name"; return 2;; esac
  if [ "$arch" = mamba ] && ! python3 -c 'import selective_scan_cuda' 2>/dev/null; then
    OUT=$W/build START=$START bash scripts/train/device.sh build-mamba1 || { say "Mamba-1 kernel build failed"; return 3; }
  fi
  local reserve=$(( 20 + layers / 2 ))
  say "$name: $arch, $layers layers, seed $seed, final reserve ${reserve}s"
  # the recipe is trainer.py's depth preset (FAMILIES["depth"]); only the depth, arch and seed change
  python3 scripts/train/trainer.py --family depth --arch "$arch" --layers "$layers" \
    --total-tokens "$TOTAL_TOKENS" --seed "$seed" \
    --ckpt-dir $W/ckpt/$name --out $W/done/$name.partial --end-by $(( START + LIMIT )) --final-reserve $reserve \
    2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    rm -f $W/done/$name.partial/suspended.json
    rm -rf $W/done/$name && mv $W/done/$name.partial $W/done/$name && rm -rf $W/ckpt/$name
    say "$name finished"
  else
    say "$name exit $rc"
  fi
  return $rc
}

for name in $QUEUE; do
  [ -d $W/done/$name ] && { say "$name: already finished on this machine"; continue; }
  left=$(( START + LIMIT - $(date +%s) ))
  [ $left -lt 90 ] && { say "$name: ${left}s left, not started"; break; }
  train_one "$name"; rc=$?
  [ "$rc" = 0 ] || break
done

# return finished models (oldest first) within the limits: 8 files, 60 MiB, including the logs
files=1; bytes=0   # depth.log
if [ "$carried_cache" = 0 ] && [ -d $W/triton ]; then
  tar czf "$OUT/triton_cache.tar.gz" -C $W/triton . && files=$(( files + 1 ))
  bytes=$(( bytes + $(stat -c %s "$OUT/triton_cache.tar.gz") ))
  say "Triton cache $(( $(stat -c %s "$OUT/triton_cache.tar.gz") / 1024 )) KiB returned"
fi
for d in $(ls -tr $W/done 2>/dev/null | grep -v '\.partial$'); do
  [ -f $W/returned/$d ] && continue
  n=$(ls $W/done/$d | wc -l); b=$(du -cb $W/done/$d/* | tail -1 | cut -f1)
  if [ $(( files + n )) -le 8 ] && [ $(( bytes + b )) -le $(( 60 * 1048576 )) ]; then
    mkdir -p "$OUT/$d" && cp $W/done/$d/* "$OUT/$d/" && touch $W/returned/$d
    files=$(( files + n )); bytes=$(( bytes + b )); say "returned $d ($n files, $(( b / 1048576 )) MiB)"
  else
    say "$d waits for the next call (return limits)"
  fi
done
say "done: finished $(ls $W/done | grep -v partial | tr '\n' ' '); returned $(ls $W/returned | tr '\n' ' ')"
