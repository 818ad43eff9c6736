#!/bin/bash
# GPU efficiency run (docs/method.md §4): GPU tests, then prefill / memory / generation benchmarks of the
# mamba-ssm backend on random-weight Mamba-2-2.7B and Mamba-2.8B shapes, fp16, batch 16 x 2048.
#
# Run from the repo root on the GPU machine, after `bash .gpu/setup.sh` (mamba-ssm installed):
#   bash scripts/gpu_bench.sh
# Writes $OUT/gpu_bench.json (records, resumable) and $OUT/gpu_bench.log. Sized for ~8 minutes on
# one H100: each stage has a hard timeout and the bench stops starting new configurations before it.
set -uo pipefail
OUT=${OUT:-figures/03_efficiency}
mkdir -p "$OUT"
LOG=$OUT/gpu_bench.log
JSON=$OUT/gpu_bench.json
DEADLINE=${DEADLINE:-500}          # seconds from start by which everything must be finished
START=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) + START )); }
say() { echo "[gpu_bench +$(elapsed)s] $*" | tee -a "$LOG"; }
: > "$LOG"

say "host $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! python3 -c 'import mamba_ssm' 2>/dev/null && [ -f .gpu/setup.sh ]; then
  say "mamba-ssm missing: running .gpu/setup.sh"
  timeout 300 bash .gpu/setup.sh 2>&1 | tee -a "$LOG"
fi
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformers", "triton", "einops", "mamba_ssm", "causal_conv1d", "tqdm", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {name} MISSING ({type(e).__name__}: {e})")
PY
nvidia-smi 2>&1 | tee -a "$LOG"

say "GPU tests"
timeout 170 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x -rs 2>&1 | tail -40 | tee -a "$LOG"
say "GPU tests done (rc=${PIPESTATUS[0]})"

bench() {  # bench SHAPE HARD_SECONDS
  local shape=$1 hard=$2
  local soft=$(( hard - 35 ))
  [ "$hard" -lt 40 ] && { say "no time left for $shape"; return; }
  say "bench $shape (hard limit ${hard}s, new configurations until ${soft}s)"
  timeout --signal=TERM --kill-after=5 "$hard" python3 -m utrc_lib.bench --backend mamba_ssm --shapes "$shape" \
    --methods dense,slice,utrc,utrc_reference,evit --cuts 0.1,0.2,0.3 --batch 16 --seq-len 2048 \
    --repeats 3 --generate --gen-methods dense,utrc --gen-cuts 0.3 --new-tokens 100 --gen-repeats 2 \
    --time-budget-s "$soft" --out "$JSON" --no-progress 2>&1 | grep -v "^\s*$" | tee -a "$LOG"
  say "bench $shape done (rc=${PIPESTATUS[0]})"
}
# the Mamba-2 shape first (the issue's target); the Mamba-1 shape gets what is left
REM=$(left); bench mamba2-2.7b $(( REM * 55 / 100 ))
REM=$(left); bench mamba-2.8b $(( REM - 10 ))

python3 - "$JSON" <<'PY' 2>&1 | tee -a "$LOG"
import sys
from utrc_study.experiments.bench import load_records
try:
    recs = load_records(sys.argv[1])
except Exception as e:
    sys.exit(f"no records: {e}")
if not recs:
    sys.exit(f"no records in {sys.argv[1]}")
print(f"{'kind':8s} {'shape':12s} {'method':15s} {'cut':>4s} {'ms':>8s} {'speedup':>7s} {'%slice':>6s} "
      f"{'red/anc':>7s} {'ovh%':>5s} {'e2e%':>5s} {'memL':>6s} {'memF':>6s}")
for r in recs:
    if "error" in r:
        print(f"{r['kind']:8s} {r['model_shape']:12s} {r['method']:15s} {r['flops_cut']:4.2f} ERROR {r['error'][:90]}")
        continue
    f = lambda k, fmt, s=1: (fmt % (r[k] * s)) if r.get(k) is not None else "-"
    print(f"{r['kind']:8s} {r['model_shape']:12s} {r['method']:15s} {r['flops_cut']:4.2f} {f('prefill_ms', '%8.1f')} "
          f"{f('speedup_vs_dense', '%7.3f')} {f('speedup_fraction_of_slice', '%6.1f', 100)} "
          f"{f('reduction_ms_per_anchor', '%7.2f')} {f('reduction_overhead_vs_dense', '%5.2f', 100)} "
          f"{f('overhead_vs_slice_of_dense', '%5.2f', 100)} "
          f"{f('peak_mem_gb_last_token', '%6.2f')} {f('peak_mem_gb_full_logits', '%6.2f')}"
          + (f"  decode {r['generation']['decode_ms_per_token']:.2f} ms/tok, {r['generation']['throughput_tok_s']:.0f} tok/s"
             if r.get("generation") else ""))
PY
say "finished; $JSON and $LOG"
