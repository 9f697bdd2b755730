#!/usr/bin/env python3
"""The official `openai` Python client against `engine serve` (completions and chat, streaming and
not). Starts the server itself on a free port; prints 'N passed, N failed' last.
Usage: python3 tests/openai_client_test.py [path/to/engine]"""
import json
import os
import re
import subprocess
import sys
import traceback

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "engine")
MODEL = os.path.join(ROOT, "tests", "golden", "data", "tiny_v3")


def start():
    p = subprocess.Popen([ENGINE, "serve", "--model-path", MODEL, "--port", "0", "--served-model-name", "tiny",
                          "--api-key", "k3y", "--reasoning-parser", "deepseek-r1"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in p.stderr:
        m = re.match(r"engine is ready: http://(\S+)", line)
        if m:
            return p, m.group(1)
    raise RuntimeError("server did not start")


def main():
    proc, addr = start()
    client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="k3y", max_retries=0)
    results = []

    def test(fn):
        try:
            fn()
            results.append((fn.__name__, None))
        except Exception:  # noqa: BLE001 - report every failure
            results.append((fn.__name__, traceback.format_exc()))

    def models():
        ids = [m.id for m in client.models.list()]
        assert ids == ["tiny"], ids

    def completion():
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.object == "text_completion"
        assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 6, r.usage
        assert r.choices[0].finish_reason == "length"

    def completion_stream_equals_whole():
        kw = dict(model="tiny", prompt=[0, 7, 8, 9], max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**kw).choices[0].text
        parts, finish, usage = [], None, None
        for ch in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if ch.choices:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage
        assert "".join(parts) == whole, (parts, whole)
        assert finish == "length" and usage.completion_tokens == 10

    def chat():
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2, n=2)
        assert len(r.choices) == 2
        c = r.choices[0]
        assert c.message.role == "assistant"
        text = (getattr(c.message, "reasoning_content", None) or "") + (c.message.content or "")
        assert len(c.logprobs.content) == r.usage.completion_tokens // 2
        assert len(c.logprobs.content[0].top_logprobs) == 2
        assert isinstance(text, str)

    def chat_stream():
        kw = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
        whole = client.chat.completions.create(**kw).choices[0].message
        got_r, got_c, finish = [], [], None
        for ch in client.chat.completions.create(stream=True, **kw):
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            got_c.append(d.content or "")
            got_r.append(getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or "")
            finish = ch.choices[0].finish_reason or finish
        assert "".join(got_c) == (whole.content or ""), (got_c, whole)
        want_r = getattr(whole, "reasoning_content", None) or (whole.model_extra or {}).get("reasoning_content") or ""
        assert "".join(got_r) == want_r
        assert finish == "length"

    def errors():
        try:
            client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=-1)
            raise AssertionError("no error")
        except openai.BadRequestError as e:
            assert "temperature" in str(e), e
        bad = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("no error")
        except openai.AuthenticationError:
            pass

    for t in (models, completion, completion_stream_equals_whole, chat, chat_stream, errors):
        test(t)
    proc.terminate()
    proc.wait(timeout=30)
    failed = [r for r in results if r[1]]
    for name, err in results:
        print(f"{'ok  ' if not err else 'FAIL'} {name}")
        if err:
            print(err)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
