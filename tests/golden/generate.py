#!/usr/bin/env python3
"""Golden data for the engine: tiny random DeepSeek checkpoints in the official layout and the
float32 outputs of Hugging Face transformers on them.

Writes, per case, into tests/golden/data/<case>/:
  config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json (official names,
  one tensor per expert, FP8 blocks with weight_scale_inv where quantised, an MTP layer for V3),
  tokenizer files (the engine's byte-level tokenizer, copied from a `engine gen-model` output),
  expected.safetensors: per prompt p, `p{i}.logprobs` [positions, vocab] float32 log-softmax of
  transformers' float32 logits over prompt + greedy continuation (teacher forced),
  expected.json: prompts, greedy continuations and the reference top-1/top-2 margin per step.

Requires torch and transformers >= 5. Run from the repository root:
  python3 tests/golden/generate.py [--engine target/release/engine]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.abspath(__file__))
BLOCK = 128


def yarn(factor, original):
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
            v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2, moe_layer_freq=1,
            first_k_dense_replace=1, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, max_position_embeddings=1024,
            rope_scaling=yarn(4.0, 256))

CASES = {
    # V3: q LoRA, noaux_tc sigmoid routing with groups, YaRN, an MTP layer.
    "tiny_v3": dict(BASE, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                    num_hidden_layers=3, num_nextn_predict_layers=1, q_lora_rank=48, n_routed_experts=8,
                    n_shared_experts=1, routed_scaling_factor=2.5, topk_method="noaux_tc", n_group=4,
                    topk_group=2, norm_topk_prob=True, scoring_func="sigmoid"),
    # V2-Lite: plain q_proj, softmax greedy routing, two shared experts, no normalisation.
    "tiny_v2_lite": dict(BASE, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                         num_hidden_layers=3, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                         routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
                         norm_topk_prob=False, scoring_func="softmax"),
    # V3 FP8: dims that are not multiples of 128, so edge blocks are partial.
    "tiny_v3_fp8": dict(BASE, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                        hidden_size=192, intermediate_size=320, moe_intermediate_size=96, q_lora_rank=160,
                        kv_lora_rank=144, num_hidden_layers=2, num_nextn_predict_layers=1, n_routed_experts=8,
                        n_shared_experts=1, routed_scaling_factor=2.5, topk_method="noaux_tc", n_group=2,
                        topk_group=1, norm_topk_prob=True, scoring_func="sigmoid",
                        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [BLOCK, BLOCK]}),
}


def official_weights(cfg, gen):
    """Random weights under official names, as float32 (bf16-representable)."""
    hs, h = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    w = {}

    def lin(name, out, inp):
        w[name] = torch.randn(out, inp, generator=gen) / math.sqrt(inp)

    def norm(name, n):
        w[name] = 1.0 + 0.1 * torch.randn(n, generator=gen)

    def mlp(prefix, inter):
        lin(f"{prefix}.gate_proj.weight", inter, hs)
        lin(f"{prefix}.up_proj.weight", inter, hs)
        lin(f"{prefix}.down_proj.weight", hs, inter)

    def layer(i):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm.weight", hs)
        norm(f"{p}.post_attention_layernorm.weight", hs)
        a = f"{p}.self_attn"
        if cfg["q_lora_rank"]:
            lin(f"{a}.q_a_proj.weight", cfg["q_lora_rank"], hs)
            norm(f"{a}.q_a_layernorm.weight", cfg["q_lora_rank"])
            lin(f"{a}.q_b_proj.weight", h * qk, cfg["q_lora_rank"])
        else:
            lin(f"{a}.q_proj.weight", h * qk, hs)
        lin(f"{a}.kv_a_proj_with_mqa.weight", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], hs)
        norm(f"{a}.kv_a_layernorm.weight", cfg["kv_lora_rank"])
        lin(f"{a}.kv_b_proj.weight", h * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
        lin(f"{a}.o_proj.weight", hs, h * cfg["v_head_dim"])
        if i >= cfg["first_k_dense_replace"]:
            n = cfg["n_routed_experts"]
            # router weights scaled up so routing decisions have clear margins
            w[f"{p}.mlp.gate.weight"] = 4.0 * torch.randn(n, hs, generator=gen) / math.sqrt(hs)
            if cfg["topk_method"] == "noaux_tc":
                w[f"{p}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(n, generator=gen)
            for e in range(n):
                mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
            mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        else:
            mlp(f"{p}.mlp", cfg["intermediate_size"])

    w["model.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], hs, generator=gen)
    for i in range(cfg["num_hidden_layers"]):
        layer(i)
    norm("model.norm.weight", hs)
    # a sharper head than 1/sqrt(hs) so that greedy choices have real margins
    w["lm_head.weight"] = 3.0 * torch.randn(cfg["vocab_size"], hs, generator=gen) / math.sqrt(hs)
    for k in range(cfg.get("num_nextn_predict_layers", 0) or 0):
        i = cfg["num_hidden_layers"] + k
        layer(i)
        p = f"model.layers.{i}"
        norm(f"{p}.enorm.weight", hs)
        norm(f"{p}.hnorm.weight", hs)
        lin(f"{p}.eh_proj.weight", hs, 2 * hs)
        norm(f"{p}.shared_head.norm.weight", hs)
        lin(f"{p}.shared_head.head.weight", cfg["vocab_size"], hs)
        w[f"{p}.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], hs, generator=gen)
    # Everything the checkpoint stores in bf16 is made bf16-exact, so the f32 reference sees the same values.
    return {k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).float()) for k, v in w.items()}


def is_fp8_linear(name):
    if not name.endswith(".weight") or "norm" in name:
        return False
    if name.startswith("model.embed_tokens") or name.startswith("lm_head") or name.endswith("mlp.gate.weight"):
        return False
    if "embed_tokens" in name or "shared_head.head" in name:
        return False
    return ".self_attn." in name or ".mlp." in name or "eh_proj" in name


def quantize_block_fp8(w):
    """Per 128x128 block: scale_inv = amax / 448, q = fp8(w / scale_inv). Returns (q, scale_inv, dequantised)."""
    out, inp = w.shape
    nb, kb = -(-out // BLOCK), -(-inp // BLOCK)
    scale = torch.empty(nb, kb)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    deq = torch.empty(out, inp)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = qb
            deq[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = qb.float() * s
    return q, scale, deq


def write_sharded(dirpath, tensors, nshards=3):
    names = sorted(tensors)
    per = -(-len(names) // nshards)
    weight_map = {}
    total = 0
    for k in range(nshards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{nshards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(dirpath, fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="target/release/engine", help="engine binary (for its tokenizer files)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokdir = tempfile.mkdtemp()
    subprocess.run([args.engine, "gen-model", "--preset", "tiny-v3", "--out", tokdir], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for ci, (case, cfg) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(args.seed + ci)
        out = os.path.join(ROOT, "data", case)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        weights = official_weights(cfg, gen)
        fp8 = "quantization_config" in cfg
        stored, reference = {}, {}
        for name, t in weights.items():
            if fp8 and is_fp8_linear(name):
                q, s, deq = quantize_block_fp8(t)
                stored[name] = q
                stored[name.replace(".weight", ".weight_scale_inv")] = s
                reference[name] = deq
            else:
                stored[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
                reference[name] = t
        write_sharded(out, stored)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        for name in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tokdir, name), os.path.join(out, name))

        # The reference loads the same official layout through from_pretrained (FP8: an unquantised
        # twin holding the dequantised weights, since transformers' FP8 path needs a GPU).
        refdir = tempfile.mkdtemp()
        write_sharded(refdir, {n: t for n, t in reference.items()})
        refcfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        with open(os.path.join(refdir, "config.json"), "w") as f:
            json.dump(refcfg, f)
        model = AutoModelForCausalLM.from_pretrained(refdir, dtype=torch.float32)
        model.eval()
        # Check that transformers mapped the official names onto its modules as we intend.
        sd = model.state_dict()
        for name, t in reference.items():
            if name in sd:
                assert torch.equal(sd[name].float(), t), name
        e0 = "model.layers.1.mlp.experts"
        gu = sd[f"{e0}.gate_up_proj"][3]
        assert torch.equal(gu, torch.cat([reference[f"{e0}.3.gate_proj.weight"], reference[f"{e0}.3.up_proj.weight"]])), "expert mapping"

        g = torch.Generator().manual_seed(args.seed + 100 + ci)
        lengths = [1, 7, 40, 300]  # the last exceeds original_max_position_embeddings (256)
        prompts = [[0] + torch.randint(3, 263, (n - 1,), generator=g).tolist() if n > 1 else [0] for n in lengths]
        expected = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
        tensors = {}
        for i, prompt in enumerate(prompts):
            new = 24
            with torch.no_grad():
                ids = torch.tensor([prompt])
                seq = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                                     pad_token_id=1, eos_token_id=None)[0].tolist()
                logits = model(torch.tensor([seq])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            top2 = torch.topk(logits, 2, dim=-1).values
            cont = seq[len(prompt):]
            # the greedy choice at step s is the argmax at position len(prompt)-1+s
            margins = (top2[:, 0] - top2[:, 1])[len(prompt) - 1:len(seq) - 1].tolist()
            tensors[f"p{i}.logprobs"] = lp.contiguous()
            expected["cases"].append({"prompt": prompt, "continuation": cont, "margins": margins})
        save_file(tensors, os.path.join(out, "expected.safetensors"))
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump(expected, f)
        shutil.rmtree(refdir)
        print(case, "ok:", [len(p) for p in prompts], "min margin", min(min(c["margins"]) for c in expected["cases"]))
    shutil.rmtree(tokdir)


if __name__ == "__main__":
    main()
