#!/usr/bin/env python3
"""Expected token ids and rendered chat strings for the real DeepSeek tokenizers, produced with
Python's `tokenizers` and `jinja2` (configured as transformers' apply_chat_template configures it).
Run tests/tokenizer/fetch.sh first; writes tests/tokenizer/expected.json (committed)."""
import json
import os

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces",
    "DeepSeek-V3 has 671B parameters; 37B are activated per token.",
    "数字 12345678 和中文混合：深度求索。",
    "日本語のテキストとカタカナ、ひらがな。",
    "emoji 🤖🚀 and accents: café naïve Ωμέγα",
    "def f(x):\n    return x ** 2  # square\n\n\ttabbed",
    "line1\r\nline2\n\n\nline5   \n",
    "<｜begin▁of▁sentence｜>special<｜User｜>tokens<｜Assistant｜>inline<｜end▁of▁sentence｜>",
    "<think>\nreasoning here\n</think>\n\nanswer",
    "",
    "   ",
    "a" * 50 + "!!!???..." + "0" * 17,
]

CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x"},
      {"role": "assistant", "content": "<think>\nhmm\n</think>\n\ny"}, {"role": "user", "content": "z"}], True),
    ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}], False),
    ([{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "{\"wind\": 3}"}], True),
]


def render(template, bos, eos, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos)


def token(v):
    return v["content"] if isinstance(v, dict) else v


def main():
    out = {}
    for name in ("deepseek_r1", "deepseek_v3"):
        d = os.path.join(HERE, "vendor", name)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        bos, eos = token(cfg["bos_token"]), token(cfg["eos_token"])
        chats = []
        for messages, agp in CONVERSATIONS:
            # V3's template has no tool_calls branch for content=None without tool_calls; all above are valid for both.
            text = render(cfg["chat_template"], bos, eos, messages, agp)
            chats.append({"messages": messages, "add_generation_prompt": agp, "text": text,
                          "ids": tok.encode(text, add_special_tokens=False).ids})
        out[name] = {
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "encodings": [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TEXTS],
            "chats": chats,
        }
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote expected.json:", {k: len(v["encodings"]) + len(v["chats"]) for k, v in out.items()})


if __name__ == "__main__":
    main()
