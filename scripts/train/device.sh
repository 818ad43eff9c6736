#!/bin/bash
# One training call on the GPU machine: install the mamba-ssm pieces, train, write $OUT.
#   START=$(date +%s) bash scripts/train/device.sh mamba2|mamba|build-mamba1 [trainer.py options]
#   (continuing a model: ... --init-from DIR --max-tokens N --lr ... ; BUILD_MAMBA1=1 with mamba2 builds
#   Mamba-1's kernel in the background for a following mamba call on the same warm machine)
# carry: .train/tokens (pack.py) and .train/mamba_ssm_py (mamba2) or .train/mamba_ssm-2.3.2.post1.tar.gz (mamba),
#        both from prepare_kernels.py; the tokenizer is data/tokenizer_v2 (committed)
# mamba2: mamba-ssm's Python/Triton code from .train/mamba_ssm_py on PYTHONPATH (no CUDA extension needed).
# mamba:  builds mamba-ssm's selective-scan extension from the sdist for sm_90 (~3 min on 16 cores).
# Everything must be written by START + LIMIT seconds (default 590, inside the 600 s call limit).
set -uo pipefail
START=${START:-$(date +%s)}
LIMIT=${LIMIT:-590}
arch=${1:?usage: device.sh mamba2|mamba [options]}; shift
OUT=${OUT:-out}; mkdir -p "$OUT"
LOG=$OUT/train.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
say() { echo "[device +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
say "host $(hostname); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1)"
[ -f .train/tokens/manifest.json ] || { say "no .train/tokens: run scripts/train/pack.py and carry .train"; exit 2; }
if [ "$arch" = mamba2 ]; then
  [ -d .train/mamba_ssm_py/mamba_ssm ] || { say "no .train/mamba_ssm_py: run scripts/train/prepare_kernels.py and carry it"; exit 2; }
  export PYTHONPATH=$PWD/.train/mamba_ssm_py:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
build_mamba1() {   # mamba-ssm's selective-scan extension (Mamba-1's CUDA scan) from the sdist, for sm_90
  if ! python3 -c 'import torch, selective_scan_cuda' 2>/dev/null; then
    say "building mamba-ssm (selective_scan_cuda) from the sdist for sm_90"
    [ -f .train/mamba_ssm-2.3.2.post1.tar.gz ] || { say "no .train/mamba_ssm-2.3.2.post1.tar.gz: run prepare_kernels.py and carry it"; exit 2; }
    build=$(mktemp -d)
    tar xzf .train/mamba_ssm-2.3.2.post1.tar.gz -C "$build" || exit 2
    python3 - "$build"/mamba_ssm-2.3.2.post1/setup.py <<'PY'
import re, sys
f = sys.argv[1]; s = open(f).read()
s = re.sub(r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_(?!90)\d+,code=sm_\d+"\)', 'pass', s)
open(f, 'w').write(s)
PY
    (cd "$build"/mamba_ssm-2.3.2.post1 && MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=9.0 MAMBA_FORCE_BUILD=TRUE \
      python3 -m pip install -q --no-deps --no-build-isolation . ) 2>&1 | tail -5 | tee -a "$LOG"
    python3 -c 'import torch, selective_scan_cuda, mamba_ssm' 2>&1 | tee -a "$LOG" || { say "mamba-ssm build failed"; exit 3; }
    say "mamba-ssm built"
  fi
}
if [ "$arch" = build-mamba1 ]; then    # only the kernel (scripts/train/depth_family.sh before a Mamba-1 model)
  build_mamba1; exit $?
elif [ "$arch" = mamba ]; then
  build_mamba1 || exit $?
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
elif [ "$arch" = mamba2 ] && [ "${BUILD_MAMBA1:-0}" = 1 ]; then
  # build Mamba-1's kernel on the CPU cores while Mamba-2 trains on the GPU; a warm machine keeps it
  # for the next call (device.sh mamba then skips the build)
  MAX_JOBS=$(( $(nproc) - 2 )) build_mamba1 > "$OUT/build_mamba1.log" 2>&1 &
  BUILD_PID=$!
elif [ "$arch" != mamba2 ]; then
  say "unknown arch $arch"; exit 2
fi
say "training $arch until $(( LIMIT ))s"
python3 scripts/train/trainer.py --family small --arch "$arch" --end-by $(( START + LIMIT )) --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${BUILD_PID:-}" ]; then
  wait "$BUILD_PID"; say "background Mamba-1 kernel build exit $? ($(tail -1 "$OUT/build_mamba1.log"))"
fi
say "trainer.py exit $rc; files: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
