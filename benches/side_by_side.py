#!/usr/bin/env python3
"""The side-by-side run of the H200 performance issue, in one process on one GPU:

1. the ceilings: device copy bandwidth, bf16 and FP8 (per-tensor scaled) GEMM rates (torch);
2. a `deepseek-v3-layers` checkpoint (real V3 shapes, FP8 128x128 blocks), unless --model-path;
3. `engine bench` on it (decode at each batch size over --context tokens, and one prefill);
4. transformers (bf16, the same weights dequantised, eager, torch.cuda.Event timing) on the same
   batches; `--compile` also tries its static cache + torch.compile;
5. one table: per batch size, engine and transformers step time, the roofline time (bytes the
   step must read / copy bandwidth for decode; FLOPs / FP8 rate for prefill) and the ratios; then
   per layer and batch size: the engine's layer time (its op-by-op re-run with events at the layer
   boundaries: `engine bench --profile`'s `decode_layer_ms_per_step`), transformers' (events recorded by forward hooks on
   each decoder layer), the layer's roofline and the ratios.

Usage: benches/side_by_side.py --engine target/release/engine --out OUT [--layers 4]
       [--batch-sizes 1,32,128] [--context 512] [--decode-steps 12] [--prefill 4096] [--compile]
       [--engine-args '--fp8-activations f32']
Results go to OUT/side_by_side.json and stdout.
"""
import argparse
import json
import shlex
import math
import os
import subprocess
import sys
import time

import torch

# where transformers runs (a CPU dry run of the loader: SIDE_BY_SIDE_DEVICE=cpu)
DEV = os.environ.get("SIDE_BY_SIDE_DEVICE", "cuda")


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def ceilings():
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), 20)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    bf16_s = timed(lambda: a @ b, 20)
    out = {"copy_GB_s": 2 * n / copy_s / 1e9, "bf16_TFLOPS": 2 * m**3 / bf16_s / 1e12}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device="cuda")
        fp8_s = timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 20)
        out["fp8_TFLOPS"] = 2 * m**3 / fp8_s / 1e12
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["fp8_error"] = str(e)
    del x, y, a, b
    torch.cuda.empty_cache()
    return out


def checkpoint_bytes(path):
    """Bytes of every tensor as stored, from the safetensors headers."""
    sizes = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with open(os.path.join(path, f), "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    sizes[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return sizes


def roofline(cfg, sizes, batch, context, copy_bw, measured=None):
    """Bytes a decode step must read (weights as stored, the experts the step touches: `measured`
    distinct experts a MoE layer (the engine's routing, read back in its profiled steps), else as
    uniform routing would touch; a bf16 latent KV of `context` tokens per sequence) and its time
    at `copy_bw`."""
    L, E, k = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    distinct = measured if measured is not None else E * (1 - (1 - k / E) ** batch)
    per_layer = []
    for i in range(L):
        p = f"model.layers.{i}."
        mine = {n: s for n, s in sizes.items() if n.startswith(p)}
        attn = sum(s for n, s in mine.items() if ".self_attn." in n or "layernorm" in n)
        experts = sum(s for n, s in mine.items() if ".mlp.experts." in n)
        other = sum(s for n, s in mine.items() if ".mlp." in n and ".mlp.experts." not in n)
        moe = experts > 0
        touched = experts / E * min(distinct, E) if moe else 0
        kv = batch * context * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2
        per_layer.append({"layer": i, "moe": moe, "attn_bytes": attn, "mlp_bytes": other + touched, "kv_bytes": kv, "bytes": attn + other + touched + kv})
    head = sizes.get("lm_head.weight", sizes.get("model.embed_tokens.weight", 0))
    total = sum(x["bytes"] for x in per_layer) + head
    return {"distinct_experts": distinct, "distinct_measured": measured is not None, "bytes": total, "ms": total / copy_bw * 1e3, "per_layer_ms": [x["bytes"] / copy_bw * 1e3 for x in per_layer]}


def prefill_flops(cfg, tokens):
    h, H = cfg["num_attention_heads"], cfg["hidden_size"]
    qk, v = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r, c = cfg["q_lora_rank"] or 0, cfg["kv_lora_rank"]
    attn_w = H * r + r * h * qk + H * (c + cfg["qk_rope_head_dim"]) + c * h * (cfg["qk_nope_head_dim"] + v) + h * v * H
    flops = 0
    for i in range(cfg["num_hidden_layers"]):
        moe = i >= cfg["first_k_dense_replace"]
        inter = (cfg["num_experts_per_tok"] + cfg["n_shared_experts"]) * cfg["moe_intermediate_size"] if moe else cfg["intermediate_size"]
        flops += 2 * tokens * (attn_w + 3 * H * inter + (H * cfg["n_routed_experts"] if moe else 0))
        flops += 2 * h * (qk + v) * tokens * tokens / 2  # causal scores and values
    return flops + 2 * H * cfg["vocab_size"]  # lm_head for the last token


def run_engine(engine, path, batches, context, steps, prefill, extra=()):
    def bench(bs, inp, out, *more):
        cmd = [engine, "bench", "--backend", "cuda", "--model-path", path, "--batch-size", ",".join(map(str, bs)), "--input-len", str(inp), "--output-len", str(out), "--json", *more, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out = json.loads(r.stdout)
        return out["results"], out.get("kernels", {}).get("fp8_activations", "?")
    # (--profile: after the timed steps, a re-run that also reads back each routing call's experts)
    rows, mode = bench(batches, context, steps, "--profile")
    decode = {r["batch_size"]: r["decode_step_median_ms"] for r in rows}
    distinct = {r["batch_size"]: r.get("moe_distinct_experts") for r in rows}
    # each layer's ms a step in the re-run with the layers timed (op by op, events at the layer
    # boundaries only: a little above the graph's share)
    layers = {r["batch_size"]: r.get("decode_layer_ms_per_step") for r in rows}
    pre = bench([1], prefill, 2)[0][0]
    return decode, pre["prefill_s"] * 1e3, mode, distinct, layers


def load_transformers(path, dtype=torch.bfloat16):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.load(open(os.path.join(path, "config.json")))
    block = (raw.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    raw.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**raw)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    L = raw["num_hidden_layers"]
    inter = raw["moe_intermediate_size"]

    def deq(f, name):
        w = f.get_tensor(name)
        if w.dtype == torch.float8_e4m3fn:
            s = f.get_tensor(name + "_scale_inv").float()
            o, i = w.shape
            s = s.repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
            return (w.float() * s).to(dtype)
        return w.to(dtype)

    loaded = 0
    for fn in sorted(os.listdir(path)):
        if not fn.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, fn), framework="pt", device=DEV) as f:
            for name in f.keys():
                if name.endswith("_scale_inv"):
                    continue
                parts = name.split(".")
                if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= L:
                    continue  # the MTP layer
                if ".mlp.experts." in name:
                    e, proj = int(parts[5]), parts[6]
                    base = ".".join(parts[:5])
                    w = deq(f, name)
                    if proj == "gate_proj":
                        params[base + ".gate_up_proj"].data[e, :inter].copy_(w)
                    elif proj == "up_proj":
                        params[base + ".gate_up_proj"].data[e, inter:].copy_(w)
                    else:
                        params[base + ".down_proj"].data[e].copy_(w)
                elif name in params:
                    params[name].data.copy_(deq(f, name))
                else:
                    continue  # not a model tensor
                loaded += 1
    if raw.get("tie_word_embeddings"):
        model.tie_weights()
    return model, loaded


def run_transformers(model, vocab, batches, context, steps, prefill, compile_=False):
    from transformers import DynamicCache

    # a batch transformers cannot fit (its grouped experts at batch 256 want 28 GiB more on an
    # H200) is reported as out of memory and the run goes on: the engine's numbers and the
    # roofline do not depend on it
    res = {"decode_ms": {}, "layer_ms": {}, "compile": None, "errors": {}}
    layers = model.model.layers

    def layer_ms(step, n):
        """each decoder layer's median ms over n calls of step(), timed by events its forward hooks record"""
        cur, times = {}, [[] for _ in layers]
        pre = lambda i: lambda m, a: cur.__setitem__(i, [torch.cuda.Event(enable_timing=True)]) or cur[i][0].record()  # noqa: E731
        post = lambda i: lambda m, a, o: cur[i].append(torch.cuda.Event(enable_timing=True)) or cur[i][1].record()  # noqa: E731
        hooks = [l.register_forward_pre_hook(pre(i)) for i, l in enumerate(layers)] + [l.register_forward_hook(post(i)) for i, l in enumerate(layers)]
        try:
            for _ in range(n):
                step()
                torch.cuda.synchronize()
                for i in range(len(layers)):
                    times[i].append(cur[i][0].elapsed_time(cur[i][1]))
        finally:
            for h in hooks:
                h.remove()
        return [sorted(t)[len(t) // 2] for t in times]

    def decode(b):
        ids = torch.randint(3, vocab, (b, context), device="cuda")
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            e.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(e))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = sorted(times[2:])

        def more():
            nonlocal out, nxt
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        # then per layer, in further steps with the hooks on (the steps above ran without them)
        res["layer_ms"][b] = layer_ms(more, max(3, steps // 2))
        return times[len(times) // 2]

    def guarded(key, fn):
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as e:
            res["errors"][key] = f"out of memory: {str(e).splitlines()[0][:200]}"
            print(f"transformers, {key}: {res['errors'][key]}", flush=True)
            return None
        finally:
            torch.cuda.empty_cache()

    with torch.no_grad():
        for b in batches:
            res["decode_ms"][b] = guarded(f"batch {b}", lambda: decode(b))
        ids = torch.randint(3, vocab, (1, prefill), device="cuda")
        res["prefill_ms"] = guarded(f"prefill {prefill}", lambda: timed(lambda: model(input_ids=ids, use_cache=False), 1) * 1e3)
    if compile_:
        try:
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
            ids = torch.randint(3, vocab, (1, context), device="cuda")
            t = time.time()
            model.generate(ids, max_new_tokens=steps, do_sample=False)
            t = time.time() - t
            res["compile"] = f"static cache + torch.compile generate of {steps} tokens at batch 1: {t:.2f}s (includes compilation)"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res["compile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="engine")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-path")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=12)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--engine-args", default="", help="extra `engine bench` flags, e.g. '--fp8-activations f32'")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    batches = [int(x) for x in a.batch_sizes.split(",")]
    report = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "args": vars(a)}
    save = lambda: json.dump(report, open(os.path.join(a.out, "side_by_side.json"), "w"), indent=1)  # noqa: E731

    report["ceilings"] = ceil = ceilings()
    print("ceilings:", json.dumps(ceil), flush=True)
    save()
    path = a.model_path or os.path.join(a.out, f"v3-layers{a.layers}")
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([a.engine, "gen-model", "--preset", "deepseek-v3-layers", "--layers", str(a.layers), "--out", path], check=True)
    cfg = json.load(open(os.path.join(path, "config.json")))
    sizes = checkpoint_bytes(path)

    eng_decode, eng_prefill, mode, eng_distinct, eng_layers = run_engine(a.engine, path, batches, a.context, a.decode_steps, a.prefill, shlex.split(a.engine_args))
    report["engine"] = {"decode_ms": eng_decode, "prefill_ms": eng_prefill, "args": a.engine_args, "fp8_activations": mode, "moe_distinct_experts": eng_distinct,
                        "layer_ms": eng_layers}
    print("engine:", json.dumps(report["engine"]), flush=True)
    save()

    t = time.time()
    model, n = load_transformers(path)
    print(f"transformers: loaded {n} tensors in {time.time() - t:.1f}s", flush=True)
    tf = run_transformers(model, cfg["vocab_size"], batches, a.context, a.decode_steps, a.prefill, a.compile)
    report["transformers"] = tf
    save()

    bw = ceil["copy_GB_s"] * 1e9
    rows = []
    print(f"\n{cfg['num_hidden_layers']} layers ({cfg['first_k_dense_replace']} dense), context {a.context}; roofline = bytes / {ceil['copy_GB_s']:.0f} GB/s;"
          " distinct experts a MoE layer: m = measured (the engine's routing), u = uniform routing's expectation")
    print(f"{'batch':>5} {'engine ms':>10} {'hf ms':>8} {'roofline ms':>11} {'distinct exp':>12} {'engine/roof':>11} {'hf/engine':>9}  per-layer roofline ms")
    for b in batches:
        r = roofline(cfg, sizes, b, a.context, bw, eng_distinct.get(b))
        e, h = eng_decode.get(b), tf["decode_ms"].get(b)
        rows.append({"batch": b, "engine_ms": e, "transformers_ms": h, **r})
        hs, ratio = (f"{h:>8.3f}", f"{h / e:>9.2f}") if h is not None else (f"{'oom':>8}", f"{'-':>9}")
        print(f"{b:>5} {e:>10.3f} {hs} {r['ms']:>11.3f} {r['distinct_experts']:>11.1f}{'m' if r['distinct_measured'] else 'u'} {e / r['ms']:>11.2f} {ratio}  " + " ".join(f"{x:.3f}" for x in r["per_layer_ms"]))
    # per layer: the engine's layer spans (its op-by-op re-run), transformers' decoder layers
    # timed by forward hooks, each layer's roofline
    print("\nper layer (ms a decode step; engine: its op-by-op re-run with events at the layer boundaries, a layer from its"
          " input norm's add to its MLP; transformers: events from forward hooks on each decoder layer, eager)")
    print(f"{'batch':>5} {'layer':>5} {'engine ms':>10} {'hf ms':>8} {'roofline ms':>11} {'engine/roof':>11} {'hf/engine':>9}")
    for row in rows:
        b = row["batch"]
        el, hl = eng_layers.get(b) or [], tf["layer_ms"].get(b) or []
        row["engine_layer_ms"], row["transformers_layer_ms"] = el, hl
        for i, roof in enumerate(row["per_layer_ms"]):
            e = el[i] if i < len(el) else None
            h = hl[i] if i < len(hl) else None
            es = f"{e:>10.3f}" if e is not None else f"{'-':>10}"
            hs = f"{h:>8.3f}" if h is not None else f"{'-':>8}"
            er = f"{e / roof:>11.2f}" if e is not None else f"{'-':>11}"
            hr = f"{h / e:>9.2f}" if e is not None and h is not None else f"{'-':>9}"
            print(f"{b:>5} {i:>5} {es} {hs} {roof:>11.3f} {er} {hr}")
    fl = prefill_flops(cfg, a.prefill)
    roof_pre = fl / (ceil.get("fp8_TFLOPS", ceil["bf16_TFLOPS"]) * 1e12) * 1e3
    tp = tf["prefill_ms"]
    tps = f"{tp:.1f} ms" if tp is not None else "out of memory"
    tratio = f"{tp / eng_prefill:.2f}" if tp is not None else "-"
    print(f"prefill {a.prefill} tokens: engine {eng_prefill:.1f} ms, transformers {tps}, roofline {roof_pre:.2f} ms "
          f"({fl / 1e12:.1f} TFLOP at the FP8 rate); engine/roofline {eng_prefill / roof_pre:.1f}, transformers/engine {tratio}")
    if tf["compile"]:
        print("transformers compile:", tf["compile"])
    report["table"] = rows
    report["prefill"] = {"tokens": a.prefill, "engine_ms": eng_prefill, "transformers_ms": tf["prefill_ms"], "roofline_ms": roof_pre, "flops": fl}
    save()


if __name__ == "__main__":
    sys.exit(main())
