#!/usr/bin/env bash
# One-batch benchmark at TP=1, TP=2 and TP=2 with expert parallelism on a deepseek-v3-layers
# checkpoint (real V3 layer shapes, FP8), plus the all-reduce latency of each decode step's
# message size. Needs 2 GPUs.  Usage: benches/tp_bench.sh OUT_DIR [LAYERS] [ENGINE]
set -euo pipefail
out=${1:?usage: tp_bench.sh OUT_DIR [LAYERS] [ENGINE]}
layers=${2:-4}
engine=${3:-engine}
mkdir -p "$out"
ckpt="$out/v3-layers$layers"
[ -f "$ckpt/config.json" ] || "$engine" gen-model --preset deepseek-v3-layers --layers "$layers" --out "$ckpt"
common=(bench --backend cuda --model-path "$ckpt" --batch-size 1,8,32,64 --input-len 128 --output-len 32 --json)
"$engine" "${common[@]}" > "$out/tp1.json"
"$engine" "${common[@]}" --tp 2 > "$out/tp2.json"
"$engine" "${common[@]}" --tp 2 --ep 2 > "$out/tp2_ep2.json"
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
runs = {k: json.load(open(f"{d}/{k}.json")) for k in ["tp1", "tp2", "tp2_ep2"]}
print(f"{'layout':>8} {'batch':>5} {'prefill tok/s':>13} {'step ms':>8} {'decode tok/s':>12} {'all-reduce us':>13} {'AR ms/step':>10}")
for k, r in runs.items():
    for row in r["results"]:
        ar = row.get("all_reduce") or {}
        print(f"{k:>8} {row['batch_size']:>5} {row['prefill_tok_s']:>13.0f} {row['decode_step_median_ms']:>8.3f} {row['decode_tok_s']:>12.1f} "
              f"{ar.get('latency_us', float('nan')):>13.1f} {ar.get('per_decode_step_ms', float('nan')):>10.3f}")
PY
