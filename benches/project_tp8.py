#!/usr/bin/env python3
"""Projects a full 61-layer DeepSeek-V3 on 8 GPUs (TP8) from one GPU, as the H200 performance issue
asks: one rank's share of each layer is timed on `gen-model --tp-rank-shapes 8` checkpoints (heads,
intermediate sizes and vocabulary / 8; 256 experts of 2048/8 each), then

    step(61 layers) = T(1 dense + 1 MoE) + 2 * d + 57 * m + (2 * 61 + 1) * all-reduce

with m = T(1 dense + 2 MoE) - T(1 dense + 1 MoE) (one MoE layer) and d, one dense layer, bounded by
0 <= d <= T(1 dense) (that run also holds the embedding, lm_head and sampling), so the projection is
a range. The all-reduce of a decode step's [batch, 7168] f32 is measured with `engine bench --tp 2`
when two GPUs are present (a lower bound for eight: NVLink rings grow with the rank count), else
taken from --allreduce-us.

Usage: benches/project_tp8.py --engine ENGINE --out OUT [--batch-sizes 1,32] [--context 512]
       [--allreduce-us 1:13.4,32:14.5] [--engine-args '--fp8-activations f32']
"""
import argparse
import json
import os
import shlex
import subprocess


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def bench(engine, path, bs, ctx, steps, extra=()):
    out = run([engine, "bench", "--backend", "cuda", "--model-path", path, "--batch-size", ",".join(map(str, bs)), "--input-len", str(ctx), "--output-len", str(steps), "--json", *extra])
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="engine")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--allreduce-us", default="")
    ap.add_argument("--engine-args", default="", help="extra `engine bench` flags, e.g. '--fp8-activations f32'")
    a = ap.parse_args()
    extra = shlex.split(a.engine_args)
    os.makedirs(a.out, exist_ok=True)
    bs = [int(b) for b in a.batch_sizes.split(",")]
    step_ms = {}
    for layers in (1, 2, 3):
        path = os.path.join(a.out, f"tp8rank_l{layers}")
        if not os.path.exists(os.path.join(path, "config.json")):
            run([a.engine, "gen-model", "--preset", "deepseek-v3-layers", "--layers", str(layers), "--tp-rank-shapes", "8", "--out", path])
        r = bench(a.engine, path, bs, a.context, a.steps, extra)
        step_ms[layers] = {x["batch_size"]: x["decode_step_median_ms"] for x in r["results"]}
    ar_us = {}
    if a.allreduce_us:
        ar_us = {int(k): float(v) for k, v in (p.split(":") for p in a.allreduce_us.split(","))}
    else:
        gpus = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).strip().splitlines()
        if len(gpus) >= 2:
            r = bench(a.engine, os.path.join(a.out, "tp8rank_l1"), bs, a.context, 4, ["--tp", "2", *extra])
            ar_us = {x["batch_size"]: x["all_reduce"]["latency_us"] for x in r["results"]}
    rows = []
    for b in bs:
        t1, t2, t3 = step_ms[1][b], step_ms[2][b], step_ms[3][b]
        m = t3 - t2
        ar = ar_us.get(b)
        comm = (2 * 61 + 1) * ar / 1e3 if ar is not None else None
        lo = t2 + 57 * m + (comm or 0.0)
        hi = lo + 2 * t1
        rows.append({"batch": b, "t_1dense_ms": t1, "t_1dense_1moe_ms": t2, "t_1dense_2moe_ms": t3, "moe_layer_ms": m, "allreduce_us": ar,
                     "comm_ms": comm, "step_ms": [lo, hi], "tok_s": [b * 1e3 / hi, b * 1e3 / lo]})
    res = {"batch_sizes": bs, "context": a.context, "rows": rows, "sglang_tp8_published_tok_s": {"1": 30.3, "32": 760}}
    with open(os.path.join(a.out, "project_tp8.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nDeepSeek-V3, 61 layers, TP8 on 8 GPUs, projected from one rank's shapes on one GPU (context {a.context})")
    print(f"{'batch':>5} {'MoE layer ms':>12} {'all-reduce us':>13} {'step ms':>17} {'tok/s':>17} {'SGLang TP8 tok/s':>16}")
    for r in rows:
        sg = res["sglang_tp8_published_tok_s"].get(str(r["batch"]), "-")
        ar = f"{r['allreduce_us']:.1f}" if r["allreduce_us"] is not None else "n/a"
        print(f"{r['batch']:>5} {r['moe_layer_ms']:>12.3f} {ar:>13} {r['step_ms'][0]:>8.2f}-{r['step_ms'][1]:<8.2f} {r['tok_s'][0]:>8.1f}-{r['tok_s'][1]:<8.1f} {sg:>16}")


if __name__ == "__main__":
    main()
