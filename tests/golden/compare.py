#!/usr/bin/env python3
"""Compares `engine generate` with transformers (float32) on any DeepSeek V2/V3 checkpoint folder,
by the golden rule: max |Δ logprob| <= TOL over the prompt (teacher forced, via
--return-logprob --logprob-start-len 0) and identical greedy ids while the reference's top-1/top-2
margin exceeds MARGIN.
Usage: python3 tests/golden/compare.py CHECKPOINT [--engine target/release/engine] [--tokens 40]
FP8 checkpoints are dequantised for the reference (weight x weight_scale_inv per 128x128 block)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def load_reference(path):
    cfg = json.load(open(os.path.join(path, "config.json")))
    q = cfg.get("quantization_config")
    if not q:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bn, bk = q["weight_block_size"]
    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
    out = {}
    for k, t in tensors.items():
        if k.endswith("weight_scale_inv"):
            continue
        s = tensors.get(k.replace(".weight", ".weight_scale_inv"))
        if t.dtype == torch.float8_e4m3fn and s is not None:
            t = t.float() * s.float().repeat_interleave(bn, 0)[: t.shape[0]].repeat_interleave(bk, 1)[:, : t.shape[1]]
        out[k] = t.float().contiguous()
    d = tempfile.mkdtemp()
    save_file(out, os.path.join(d, "model.safetensors"))
    json.dump({k: v for k, v in cfg.items() if k != "quantization_config"}, open(os.path.join(d, "config.json"), "w"))
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--engine", default="target/release/engine")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--tokens", type=int, default=40, help="prompt length")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--margin", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = load_reference(a.checkpoint).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    prompt = [0] + torch.randint(2, vocab, (a.tokens - 1,), generator=g).tolist()
    with torch.no_grad():
        ids_t = torch.tensor([prompt])
        seq = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0].tolist()
        logits = model(torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    top2 = torch.topk(logits, 2, -1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    out = subprocess.run([a.engine, "generate", "--backend", a.backend, "--model-path", a.checkpoint, "--input-ids", ",".join(map(str, prompt)),
                          "--max-new-tokens", str(a.new), "--ignore-eos", "--json", "--return-logprob",
                          "--logprob-start-len", "0"], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr)
        sys.exit(1)
    v = json.loads(out.stdout)
    inp = v["meta_info"]["input_token_logprobs"]
    worst = max(abs(inp[j][0] - lp[j - 1, prompt[j]].item()) for j in range(1, len(prompt)))
    print(f"max |dlogprob| over the prompt: {worst:.2e}")
    ids = v["output_ids"]
    cont = seq[len(prompt):]
    agree = 0
    for s, (x, y) in enumerate(zip(ids, cont)):
        if margins[len(prompt) - 1 + s] <= a.margin:
            break
        if x != y:
            print(f"FAIL greedy id differs at step {s}: engine {x}, transformers {y} (margin {margins[len(prompt) - 1 + s]:.4f})")
            sys.exit(1)
        agree += 1
    ok = worst <= a.tol
    print(f"{'PASS' if ok else 'FAIL'} {a.checkpoint}: max |dlogprob| {worst:.2e} over {len(prompt) - 1} positions; "
          f"{agree} greedy steps equal before the first margin <= {a.margin}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
