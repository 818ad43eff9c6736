#!/bin/bash
# Long single-stream prefill benchmark of issue 28 (docs/prefill_speed.md), one architecture per call.
#
# THE COMMAND (one GPU call each, under 8 minutes; the lead runs ARCH=mamba2 first, then ARCH=mamba1):
#   here, before: python scripts/device_tree.py out prefill   (only code + tests travel; `... in` afterwards)
#   here, once:   mkdir -p .gpu && cp ../shared/gpu/setup.sh ../shared/gpu/*.whl.part* .gpu/ \
#                   && grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#   device call:  run(command="bash .gpu/setup.sh && ARCH=mamba2 bash scripts/gpu_long_prefill.sh",
#                     carry=[".gpu"], timeout_s=600)
#                 run(command="bash .gpu/setup.sh && ARCH=mamba1 bash scripts/gpu_long_prefill.sh",
#                     carry=[".gpu"], timeout_s=600)
#   then copy $OUT/gpu_long_prefill_<arch>.json (+ .log) from files_at into figures/03_efficiency/.
#
# What one call does (DEADLINE=450 s from start; each stage has a hard timeout, the bench stops starting
# new configurations before it; records are saved as they complete):
#   1. the gpu tier of the new kernel (tests/test_tiled_match.py -m gpu: compiled Triton kernel against
#      the float64 rule at real sizes, bf16/fp16/fp32, windowed, and its memory at 32k x 32k);
#   2. prefill records, fp16, random weights, shape mamba2-2.7b (ARCH=mamba2) or mamba-2.8b (ARCH=mamba1):
#      1 x 8192 and 1 x 32768: dense, slice, utrc, evit, tome at cuts 0.1 / 0.2 / 0.3, 5 repeats;
#      16 x 2048: the same (the committed gpu_bench.json has its full-logits memory; not repeated here);
#      1 x 131072: dense, slice, utrc, evit, tome at 0.3 (3 repeats), then slice / utrc at 0.1 / 0.2
#      if time is left. All with --no-full-logits (131072 x V logits alone take 13 GB).
#   3. a table: ms, speed-up, % of slice, ms per anchor, anchors' share of dense, peak memory vs dense,
#      the reduction step's extra memory vs the dense peak.
set -uo pipefail
ARCH=${ARCH:-mamba2}
case "$ARCH" in
  mamba2) SHAPE=mamba2-2.7b ;;
  mamba1) SHAPE=mamba-2.8b ;;
  *) echo "ARCH must be mamba2 or mamba1, got $ARCH" >&2; exit 2 ;;
esac
OUT=${OUT:-figures/03_efficiency}
mkdir -p "$OUT"
JSON=$OUT/gpu_long_prefill_$ARCH.json
LOG=$OUT/gpu_long_prefill_$ARCH.log
DEADLINE=${DEADLINE:-450}
START=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) + START )); }
say() { echo "[long_prefill +$(elapsed)s] $*" | tee -a "$LOG"; }
: > "$LOG"
say "host $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), arch $ARCH ($SHAPE)"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"

say "GPU tests of the tiled matching kernel"
timeout 90 python3 -m pytest -q -m gpu tests/test_tiled_match.py -p no:cacheprovider -rs 2>&1 | tail -15 | tee -a "$LOG"
say "GPU tests done (rc=${PIPESTATUS[0]})"

bench() {  # bench HARD_SECONDS ARGS...: one bench call into $JSON
  local hard=$1; shift
  local soft=$(( hard - 30 ))
  [ "$hard" -lt 45 ] && { say "no time left for: $*"; return; }
  say "bench $* (hard ${hard}s, new configurations until ${soft}s)"
  timeout --signal=TERM --kill-after=5 "$hard" python3 -m utrc_lib.bench --backend mamba_ssm --shapes "$SHAPE" \
    --no-full-logits --time-budget-s "$soft" --out "$JSON" --no-progress "$@" 2>&1 | grep -v "^\s*$" | tee -a "$LOG"
  say "bench done (rc=${PIPESTATUS[0]})"
}
ALL="--methods dense,slice,utrc,evit,tome"
REM=$(left); bench $(( REM * 15 / 100 )) $ALL --cuts 0.1,0.2,0.3 --batch 1 --seq-len 8192 --repeats 5
REM=$(left); bench $(( REM * 35 / 100 )) $ALL --cuts 0.1,0.2,0.3 --batch 1 --seq-len 32768 --repeats 5
REM=$(left); bench $(( REM * 30 / 100 )) $ALL --cuts 0.1,0.2,0.3 --batch 16 --seq-len 2048 --repeats 5
REM=$(left); bench $(( REM * 75 / 100 )) $ALL --cuts 0.3 --batch 1 --seq-len 131072 --repeats 3
REM=$(left); bench $(( REM - 5 )) --methods dense,slice,utrc --cuts 0.1,0.2 --batch 1 --seq-len 131072 --repeats 3

python3 - "$JSON" <<'PY' 2>&1 | tee -a "$LOG"
import sys
from utrc_study.experiments.bench import load_records
try:
    recs = load_records(sys.argv[1])
except Exception as e:
    sys.exit(f"no records: {e}")
if not recs:
    sys.exit(f"no records in {sys.argv[1]}")
print(f"{'shape':11s} {'BxN':>9s} {'method':6s} {'cut':>4s} {'ms':>8s} {'±%':>4s} {'speedup':>7s} {'%slice':>6s} "
      f"{'ms/anc':>6s} {'anc%dn':>6s} {'peak GB':>7s} {'pk/dn':>5s} {'xtraGB':>6s} {'xt%pk':>5s}")
for r in sorted(recs, key=lambda r: (r["seq_len"], r["batch"], r["method"] != "dense", r["method"], r["flops_cut"])):
    bn = f"{r['batch']}x{r['seq_len']}"
    if "error" in r:
        print(f"{r['model_shape']:11s} {bn:>9s} {r['method']:6s} {r['flops_cut']:4.2f} ERROR {r['error'][:80]}")
        continue
    f = lambda k, fmt, s=1: (fmt % (r[k] * s)) if r.get(k) is not None else "-"
    sp = r.get("prefill_ms_spread") or {}
    print(f"{r['model_shape']:11s} {bn:>9s} {r['method']:6s} {r['flops_cut']:4.2f} {f('prefill_ms', '%8.1f')} "
          f"{(100 * sp['rel_half_range']) if sp.get('rel_half_range') is not None else float('nan'):4.1f} "
          f"{f('speedup_vs_dense', '%7.3f')} {f('speedup_fraction_of_slice', '%6.1f', 100)} "
          f"{f('reduction_ms_per_anchor', '%6.2f')} {f('reduction_overhead_vs_dense', '%6.2f', 100)} "
          f"{f('peak_mem_gb_last_token', '%7.2f')} {f('peak_mem_vs_dense_last_token', '%5.3f')} "
          f"{f('reduction_extra_mem_gb_max', '%6.3f')} {f('reduction_extra_mem_vs_dense_peak', '%5.2f', 100)}")
PY
say "finished; $JSON and $LOG"
