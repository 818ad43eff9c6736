#!/bin/bash
# Generation as users run it (issue 15): mamba-ssm CUDA-graph decoding after a reduced prefill,
# end-to-end throughput at 100 / 500 / 2000 new tokens (dense vs UTRC vs free slicing), transformers'
# generate on the same weights, reduce once / ask many; random-weight Mamba-2-2.7B and Mamba-2.8B
# shapes, fp16, batch 16 x 2048-token prompts. Needs no checkpoint of the repository.
#
# Run from the repo root on the GPU machine:  bash scripts/gpu_generate.sh
# (installs mamba-ssm from .gpu/ when it is missing). Writes $OUT/gpu_generate.json (records,
# resumable: a rerun skips what is there) and $OUT/gpu_generate.log. Sized for one call of ~9 minutes
# on an H200: every stage has a hard timeout and the bench stops starting configurations before it.
set -uo pipefail
OUT=${OUT:-figures/03_efficiency}
mkdir -p "$OUT"
LOG=$OUT/gpu_generate.log
JSON=$OUT/gpu_generate.json
DEADLINE=${DEADLINE:-540}          # seconds from start by which everything must be finished
START=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) + START )); }
say() { echo "[gpu_generate +$(elapsed)s] $*" | tee -a "$LOG"; }
: > "$LOG"

say "host $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! python3 -c 'import mamba_ssm' 2>/dev/null && [ -f .gpu/setup.sh ]; then
  say "mamba-ssm missing: running .gpu/setup.sh"
  timeout 300 bash .gpu/setup.sh 2>&1 | tail -5 | tee -a "$LOG"
fi
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformers", "triton", "einops", "mamba_ssm", "causal_conv1d", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {name} MISSING ({type(e).__name__}: {e})")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$LOG"

bench() {  # bench HARD_SECONDS ARGS...
  local hard=$1; shift
  local soft=$(( hard - 40 ))
  [ "$hard" -lt 60 ] && { say "no time left for: $*"; return; }
  say "bench $* (hard limit ${hard}s, new configurations until ${soft}s)"
  timeout --signal=TERM --kill-after=5 "$hard" python3 -m utrc_lib.bench --backend mamba_ssm --no-prefill \
    --generate --gen-batch 16 --gen-prompt 2048 --gen-repeats 3 --time-budget-s "$soft" --out "$JSON" \
    --no-progress "$@" 2>&1 | grep -v "^\s*$" | tee -a "$LOG"
  say "bench done (rc=${PIPESTATUS[0]})"
}
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
# 1. Mamba-2-2.7B (the paper's 1.10 / 1.22 / 1.37x): dense, UTRC and free slicing at 30% go to 2000
#    new tokens (timed at 100 and 500 on the way); reduce once / ask many (8 questions of 32 tokens
#    over one 2048-token context, 32-token answers); then 10% / 20% to 500
REM=$(left); bench $(min 250 $(( REM * 48 / 100 ))) --shapes mamba2-2.7b \
  --gen-methods dense,utrc,slice --gen-cuts 0.3,0.1,0.2 --new-tokens 100,500,2000 --short-new-tokens 500 \
  --long-methods dense,utrc,slice --long-cuts 0.3 \
  --ask-many --ask-methods dense,utrc,slice --ask-cuts 0.3 --ask-questions 8 --ask-question-tokens 32 \
  --ask-answer-tokens 32 --ask-context 2048
# 2. Mamba-2.8B (paper 1.07 / 1.17 / 1.29x): dense and UTRC 30% to 2000 tokens, the rest to 100
REM=$(left); bench $(min 160 $(( REM - 150 ))) --shapes mamba-2.8b \
  --gen-methods dense,utrc,slice --gen-cuts 0.3,0.1,0.2 --new-tokens 100,500,2000 --short-new-tokens 100 \
  --long-methods dense,utrc --long-cuts 0.3
# 3. the hand-over's GPU tests (mamba-ssm CUDA graphs against the unpatched path and the definition)
REM=$(left); T=$(min 100 $(( REM - 70 )))
if [ "$T" -ge 30 ]; then
  say "GPU tests of the hand-over (tests/test_generation.py -m gpu, ${T}s)"
  timeout "$T" python3 -m pytest -q -m gpu tests/test_generation.py -p no:cacheprovider -rs 2>&1 | tail -25 | tee -a "$LOG"
  say "GPU tests done (rc=${PIPESTATUS[0]})"
else
  say "no time left for the GPU tests"
fi
# 4. transformers' generate on the same Mamba-2-2.7B weights (dense and UTRC 30%, 100 new tokens)
REM=$(left); bench $(( REM - 5 )) --shapes mamba2-2.7b --gen-methods "" \
  --gen-hf-methods dense,utrc --gen-hf-cuts 0.3 --gen-hf-new-tokens 100 --new-tokens 100

python3 - "$JSON" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from utrc_lib.experiments.bench import generation_table
try:
    recs = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no records: {e}")
for r in recs:
    if "error" in r:
        print(f"ERROR {r['kind']} {r['model_shape']} {r['backend']} {r['method']} {r['flops_cut']}: {r['error'][:200]}")
f = lambda v, fmt: (fmt % v) if isinstance(v, (int, float)) else "-"
print(f"{'shape':12s} {'backend':9s} {'method':6s} {'cut':>4s} {'new':>5s} {'prefill':>8s} {'ms/tok':>6s} {'bound':>5s} "
      f"{'tok/s':>7s} {'e2e x':>6s} {'share':>5s} {'amdahl':>6s} {'pred':>6s}")
for r in generation_table(recs):
    print(f"{r['model_shape']:12s} {r['backend']:9s} {r['method']:6s} {r['flops_cut']:4.2f} {r['new_tokens']:5d} "
          f"{f(r['prefill_ms'], '%8.1f')} {f(r['decode_ms_per_token'], '%6.2f')} {f(r['decode_bound_ms'], '%5.2f')} "
          f"{f(r['tokens_per_s'], '%7.0f')} {f(r['e2e_speedup_vs_dense'], '%6.3f')} {f(r['prefill_share_dense'], '%5.2f')} "
          f"{f(r['amdahl_bound'], '%6.3f')} {f(r['amdahl_from_prefill'], '%6.3f')}")
for r in recs:
    if r.get("kind") == "ask_many" and "error" not in r:
        print(f"ask-many {r['model_shape']} {r['method']} {r['flops_cut']}: {r['questions']} questions, once "
              f"{r['once_ms']:.1f} ms (context prefill {r['once_prefill_ms']:.1f}) vs separate {r['separate_ms']:.1f} ms: "
              f"x{r['speedup_once_vs_separate']:.2f}; answers agree {100 * r['answers_agree']:.0f}%")
    if r.get("kind") == "generate" and "tokens_match_mamba_ssm" in r:
        print(f"check {r['model_shape']} {r['method']} {r['flops_cut']}: tokens == mamba-ssm generate(cg=True): "
              f"{r['tokens_match_mamba_ssm']}; capture {r['capture_ms']:.0f} ms, warm-up {r['warmup_ms']:.0f} ms")
PY
say "finished; $JSON and $LOG"
