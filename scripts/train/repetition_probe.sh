#!/bin/bash
# Data-repetition probe on the GPU machine: the small Mamba-2 (24 x 384) trained from scratch for the
# same number of steps on nested fractions of the corpus v2 training documents, no weights kept.
#   START=$(date +%s) [SEED=N] bash scripts/train/repetition_probe.sh STEPS FRAC [FRAC ...]
# (SEED, default 0: the training seed -- initialisation and batch order; the document draw is fixed)
# carry [".train/tokens", ".train/mamba_ssm_py"], as for device.sh mamba2. Each fraction writes
# $OUT/fFRAC[_sSEED]/{training_log.json,train.log}; all runs share the call's deadline (START + 590 s), so a
# run that the deadline cut short has fewer steps than STEPS (repetition_report.py rejects it).
set -uo pipefail
START=${START:-$(date +%s)}
steps=${1:?usage: repetition_probe.sh STEPS FRAC [FRAC ...]}; shift
[ $# -ge 1 ] || { echo "repetition_probe.sh: give at least one fraction"; exit 2; }
base=${OUT:-out}
SEED=${SEED:-0}
tag=""; [ "$SEED" = 0 ] || tag="_s$SEED"
rc=0
for f in "$@"; do
  OUT=$base/f$f$tag START=$START bash scripts/train/device.sh mamba2 --max-steps "$steps" --seed "$SEED" \
      --train-docs-frac "$f" --no-weights --eval-every 128 || { echo "fraction $f: exit $?"; rc=1; }
done
exit $rc
