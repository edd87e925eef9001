#!/usr/bin/env bash
# The GPU probe of the dynts fast path: one run on a fresh GPU machine, <= 8 minutes, nothing from the network,
# every step time-boxed against one global deadline, one summary line per check.
#
# Through the device tool (from the repository root; the machine gets a copy of the working tree):
#   run(command="bash benchmarks/gpu_probe.sh", timeout_s=540)
# The summary comes back in $OUT/summary.txt (and on stdout), every step's full output in $OUT/full.log, the bench
# JSONs in $OUT/qwen-b20.json and $OUT/qwen-max.json.
# Needs only a CUDA torch (triton ships with it; flash-attn optional) and transformers (the image had 5.17; the
# project runs on 5.0-5.24). The CUDA tests also need pytest: if the image lacks it, carry its wheels first
#   here:   pip download --no-deps -d .probe-wheels pytest pluggy iniconfig pygments
#   device: run(command="bash benchmarks/gpu_probe.sh", carry=[".probe-wheels"], timeout_s=540)
# (.probe-wheels/ is git-ignored). Without them the tests step says SKIPPED and the other checks still run.
#
# Checks, in order (each limited to its share and to the time left):
#   env        versions, GPU, the kernel "auto" picks           install   pip install --no-deps -e . (else src/)
#   tests      pytest -k cuda: graphs vs eager fp32, bf16 near-ties, capture safety through refills, releases
#   equality   fast (CUDA graphs, capture guard on) vs eager greedy, 9 requests on 3 rows: refills after capture;
#              then where a steady run with refills syncs (torch's sync debug mode)
#   qwen-b20   R1-Qwen-7B shape, random weights, bf16, batch 20, B=5000 W=2000 r=0.4, 5000 new tokens (one
#              compaction per row): TPS against the roofline (target >= 80 %, H200 ~3650 TPS), evict+score <= 3 %
#   qwen-max   the same at --batch max (the largest batch that fits), 1000 new tokens (a short-context figure)
#   contbatch  continuous vs static batching on the fast path (target: continuous >= static)
#   kernels    the engine's kernel self-check at 20 and 320 rows of the 7B shape (if time is left)
#
# Dry run without a GPU (tiny shapes, a couple of minutes): PROBE_DEVICE=cpu bash benchmarks/gpu_probe.sh
# PROBE_BUDGET_S sets the global deadline (default 470 s), PROBE_LIMIT_SCALE multiplies each step's limit (default
# 1), OUT the output folder (default ./probe-out), PYTHON the interpreter (default python3).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/probe-out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt FULL=$OUT/full.log
TMPDIR_PROBE=$(mktemp -d)
TMPLOG=$TMPDIR_PROBE/step.log
: > "$SUMMARY"; : > "$FULL"
PY=$ROOT/benchmarks/gpu_probe.py
DEVICE=${PROBE_DEVICE:-cuda}
BUDGET=${PROBE_BUDGET_S:-470}
SCALE=${PROBE_LIMIT_SCALE:-1}   # multiplies every step's limit (a loaded machine's dry run)
T0=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}   # works even where the editable install fails
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[[ $DEVICE == cpu ]] && export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python3}

say() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT CMD...: run under min(LIMIT, time left), keep the log, print its summary lines
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - (SECONDS - T0) - 3 ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then say "[$name] SKIPPED: ${left}s left of the ${BUDGET}s budget"; return; fi
  local t=$SECONDS rc
  echo "===== $name (limit ${limit}s, at $((SECONDS - T0))s) =====" >> "$FULL"
  timeout -k 5 "$limit" "$@" > "$TMPLOG" 2>&1; rc=$?
  cat "$TMPLOG" >> "$FULL"
  if grep -q '^\[' "$TMPLOG"; then grep '^\[' "$TMPLOG" | tee -a "$SUMMARY"
  else tail -n 3 "$TMPLOG" | sed "s/^/[$name] /" | tee -a "$SUMMARY"; fi
  (( rc == 124 || rc == 137 )) && say "[$name] TIMEOUT after ${limit}s (the lines above are what finished)"
  echo "   ($name: rc=$rc, $((SECONDS - t))s, total $((SECONDS - T0))s)"
}

# 0. carried wheels (pytest, if the image lacks it), the environment
if compgen -G "$ROOT/.probe-wheels/*.whl" > /dev/null && ! $PYTHON -c "import pytest" 2> /dev/null; then
  SITE=$TMPDIR_PROBE/site
  $PYTHON -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/.probe-wheels/*.whl >> "$FULL" 2>&1 \
    && export PYTHONPATH=$PYTHONPATH:$SITE && say "[wheels] PASS installed $(ls "$ROOT"/.probe-wheels | tr '\n' ' ')"
fi
step env 40 $PYTHON "$PY" env
if [[ $DEVICE != cpu ]] && ! grep -q '^\[env\] PASS' "$SUMMARY"; then say "[probe] STOP: no CUDA torch or no dynts here"; exit 1; fi
(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader) >> "$FULL" 2>&1

# 1. the project, without dependencies and without the network (PYTHONPATH=src covers a failure)
step install 40 bash -c "$PYTHON -m pip install -q --no-deps --no-index --no-build-isolation -e . > $TMPDIR_PROBE/pip.log 2>&1 \
  && echo '[install] PASS pip install --no-deps -e .' || { cat $TMPDIR_PROBE/pip.log; echo '[install] INFO pip install -e . \
failed (it needs setuptools>=68 and wheel in the image); using PYTHONPATH=src instead'; }"

# 2. the CUDA tests
step tests 120 $PYTHON "$PY" tests $((115 * SCALE))

# 3. fast vs eager with refills after the capture
step equality 70 $PYTHON "$PY" equality

# 4. throughput at the R1-Qwen-7B shape (a tiny shape in the dry run)
if [[ $DEVICE == cpu ]]; then
  SHAPE=$TMPDIR_PROBE/tiny-shape
  $PYTHON -c "from transformers import LlamaConfig as C; C(vocab_size=256, hidden_size=64, intermediate_size=128, \
num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained('$SHAPE')" >> "$FULL" 2>&1
  BENCH=(--shape "$SHAPE" --random-weights --budget 48 --window 16 --ratio 0.4 --prompt-len 8 --policy dynts
         --head-layers 16,8 --device cpu --bandwidth 10)
  step qwen-b20 60 $PYTHON "$PY" cli-bench "tiny-b4 (dry run)" "$OUT/qwen-b20.json" $((55 * SCALE)) -- "${BENCH[@]}" --batch 4 --new-tokens 60
  step qwen-max 20 $PYTHON "$PY" cli-bench "tiny-max (dry run: needs CUDA)" "$OUT/qwen-max.json" $((15 * SCALE)) -- "${BENCH[@]}" --batch max --new-tokens 8
else
  BENCH=(--shape r1-qwen-7b --random-weights --budget 5000 --window 2000 --ratio 0.4 --prompt-len 128 --policy dynts)
  step qwen-b20 110 $PYTHON "$PY" cli-bench qwen-b20 "$OUT/qwen-b20.json" $((105 * SCALE)) -- "${BENCH[@]}" --batch 20 --new-tokens 5000
  step qwen-max 110 $PYTHON "$PY" cli-bench qwen-max "$OUT/qwen-max.json" $((105 * SCALE)) -- "${BENCH[@]}" --batch max --new-tokens 1000
fi

# 5. continuous vs static batching
step contbatch 60 $PYTHON "$PY" contbatch

# 6. if time is left: the kernel self-check at the real shapes
step kernels 30 $PYTHON "$PY" kernels

say "[probe] done in $((SECONDS - T0))s of ${BUDGET}s on $DEVICE"
rm -rf "$TMPDIR_PROBE"
