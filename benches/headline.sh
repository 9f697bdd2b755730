#!/usr/bin/env bash
# The headline run (8 GPUs, full-size DeepSeek-V3, TP8): one-batch benchmarks at SGLang's published
# shape (128 in / 256 out, batch 1/8/32), DP attention at batch 64-256, and the serving benchmark at
# AMD's published shape (3200 in / 800 out, concurrency 1-128), with the load time. With the
# default `--load-format dummy` no 690 GB checkpoint is needed: weights are made from config.json.
#   benches/headline.sh OUT_DIR
# Environment (defaults for 8×H200): ENGINE=engine MODEL=configs/models/deepseek-v3 LOAD_FORMAT=dummy
#   BACKEND=cuda TP=8 BS_TP=1,8,32 BS_DP=64,128,256 IN=128 OUT_LEN=256 SERVE_IN=3200 SERVE_OUT=800
#   CONC="1 2 4 8 16 32 64 128" PORT=30000 EXTRA="" (more flags for every engine command)
set -euo pipefail
out=${1:?usage: headline.sh OUT_DIR}
ENGINE=${ENGINE:-engine}; MODEL=${MODEL:-configs/models/deepseek-v3}; LOAD_FORMAT=${LOAD_FORMAT:-dummy}
BACKEND=${BACKEND:-cuda}; TP=${TP:-8}; BS_TP=${BS_TP:-1,8,32}; BS_DP=${BS_DP:-64,128,256}
IN=${IN:-128}; OUT_LEN=${OUT_LEN:-256}; SERVE_IN=${SERVE_IN:-3200}; SERVE_OUT=${SERVE_OUT:-800}
CONC=${CONC:-1 2 4 8 16 32 64 128}; PORT=${PORT:-30000}; EXTRA=${EXTRA:-}
mkdir -p "$out"
common=(--backend "$BACKEND" --model-path "$MODEL" --load-format "$LOAD_FORMAT" --tp "$TP")
# shellcheck disable=SC2086
"$ENGINE" bench "${common[@]}" --batch-size "$BS_TP" --input-len "$IN" --output-len "$OUT_LEN" --json $EXTRA > "$out/bench_tp.json"
# shellcheck disable=SC2086
"$ENGINE" bench "${common[@]}" --dp "$TP" --enable-dp-attention --batch-size "$BS_DP" --input-len "$IN" --output-len "$OUT_LEN" --json $EXTRA > "$out/bench_dp.json"
# shellcheck disable=SC2086
"$ENGINE" serve "${common[@]}" --port "$PORT" --context-length $((SERVE_IN + SERVE_OUT + 64)) $EXTRA > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 3600); do
  grep -q "engine is ready" "$out/serve.log" && break
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -5 "$out/serve.log"; exit 1; }
  sleep 1
done
for c in $CONC; do
  n=$(( c * 4 > 16 ? c * 4 : 16 ))
  "$ENGINE" bench serve --base-url "http://127.0.0.1:$PORT" --num-prompts $n --max-concurrency "$c" \
    --random-input-len "$SERVE_IN" --random-output-len "$SERVE_OUT" --json > "$out/serve_c$c.json"
done
python3 - "$out" "$CONC" <<'PY'
import json, sys
d, conc = sys.argv[1], sys.argv[2].split()
sglang = {1: 30.3, 8: 206, 32: 760}  # SGLang v0.4.1, DeepSeek-V3 TP8, 128 in / 256 out (decode tok/s)
tp = json.load(open(f"{d}/bench_tp.json"))
print(f"load: {tp['checkpoint_bytes'] / 1e9:.1f} GB in {tp['load_s']:.1f}s ({tp['checkpoint_bytes'] / 1e9 / max(tp['load_s'], 1e-9):.2f} GB/s)")
print(f"{'layout':>10} {'batch':>5} {'prefill tok/s':>13} {'step ms':>9} {'decode tok/s':>12} {'SGLang tok/s':>12}")
for name, f in [("TP", "bench_tp"), ("DP attn", "bench_dp")]:
    for r in json.load(open(f"{d}/{f}.json"))["results"]:
        ref = sglang.get(r["batch_size"], float("nan")) if name == "TP" else float("nan")
        print(f"{name:>10} {r['batch_size']:>5} {r['prefill_tok_s']:>13.0f} {r['decode_step_median_ms']:>9.2f} {r['decode_tok_s']:>12.1f} {ref:>12}")
print(f"{'concurrency':>11} {'out tok/s':>10} {'TTFT med ms':>12} {'ITL med ms':>11}")
for c in conc:
    s = json.load(open(f"{d}/serve_c{c}.json"))
    print(f"{c:>11} {s['output_throughput']:>10.1f} {s['ttft']['median_ms']:>12.1f} {s['itl']['median_ms']:>11.2f}")
PY
