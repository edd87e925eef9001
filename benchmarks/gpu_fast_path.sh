#!/usr/bin/env bash
# The GPU fast path's targets, measured on one H100 with random weights: prompt 128, 8192 new tokens,
# B=5000, W=2000, DynTS (r=0.4 for R1-Qwen, 0.3 for R1-Llama, the paper's settings).
#   R1-Qwen-7B shape, batch 20: >= 2300 TPS;  largest batch that fits: >= 6000 TPS
#   R1-Llama-8B shape, batch 20: >= 1650 TPS;  eviction + scoring <= 3 % of decode time
#
#   bash benchmarks/gpu_fast_path.sh [correctness|kernels|targets|all]   (default: all; results in $OUT)
#
# Each bench prints one JSON object (also saved under $OUT) and a summary line. A run takes 2-6 minutes (the
# --compare-eager ones longest: the transformers loop decodes at the paper's ~600 TPS). Needs CUDA torch; triton
# ships with it, flash-attn is optional (the flash kernel is skipped without it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
WHAT=${1:-all}
COMMON=(--random-weights --budget 5000 --window 2000 --prompt-len 128 --policy dynts --json)
QWEN=(--shape r1-qwen-7b --ratio 0.4)
LLAMA=(--shape r1-llama-8b --ratio 0.3)

bench() {  # bench NAME ARGS...: run dynts bench, keep its JSON, print one line
  local name=$1; shift
  if dynts bench "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; then
    python - "$OUT/$name.json" "$name" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); o = r["ours"]; e = r["eager"] or {}
line = (f"{sys.argv[2]:24} batch {r['batch']:4} kernel {o.get('kernel', '-'):6} graphs {o.get('graphs')} | "
        f"TPS {o['tps']:8.1f} (forward-only {o['tps_forward']:8.1f}) {o['ms_per_step']:7.2f} ms/step | "
        f"bound {r['roofline']['tps_bound']:7.1f} ({r['fraction']:.1%}); at B {r['roofline']['tps_bound_at_max']:7.1f} "
        f"({r['fraction_at_max']:.1%}) | evict+score {o.get('eviction_scoring_share', float('nan')):.2%} | "
        f"peak {o['peak_memory_bytes'] / 2**30:.1f} GiB")
if "tps" in e:
    line += f" | eager {e['tps']:.1f} TPS, ratio {r['ratio_vs_eager']['tps']:.2f}x"
elif e:
    line += f" | eager: {e['error']}"
print(line)
EOF
  else
    echo "$name: failed: $(tail -n 1 "$OUT/$name.err")"
  fi
}

if [[ $WHAT == correctness || $WHAT == all ]]; then
  # CUDA-graph path against the eager engine (fp32 tokens and caches equal; bf16 first tokens), kernels included.
  python -m pytest -q tests/test_fast_engine.py -k "cuda or triton or read_nothing" 2>&1 | tail -n 5
fi

if [[ $WHAT == kernels || $WHAT == all ]]; then
  # Which decode attention kernel, graphs on/off and torch.compile: R1-Qwen batch 20, 2048 new tokens.
  for kernel in sdpa triton flash; do
    bench "kernel-$kernel" "${QWEN[@]}" "${COMMON[@]}" --batch 20 --new-tokens 2048 --kernel "$kernel"
  done
  bench "kernel-auto-nographs" "${QWEN[@]}" "${COMMON[@]}" --batch 20 --new-tokens 2048 --no-graphs
  bench "kernel-auto-compile" "${QWEN[@]}" "${COMMON[@]}" --batch 20 --new-tokens 2048 --compile
  bench "kernel-triton-compile" "${QWEN[@]}" "${COMMON[@]}" --batch 20 --new-tokens 2048 --kernel triton --compile
fi

if [[ $WHAT == targets || $WHAT == all ]]; then
  # Add --compile / --kernel K here if the kernels section found them faster.
  bench "qwen-b20" "${QWEN[@]}" "${COMMON[@]}" --batch 20 --new-tokens 8192 --compare-eager
  bench "qwen-max" "${QWEN[@]}" "${COMMON[@]}" --batch max --new-tokens 8192
  bench "llama-b20" "${LLAMA[@]}" "${COMMON[@]}" --batch 20 --new-tokens 8192 --compare-eager
fi
