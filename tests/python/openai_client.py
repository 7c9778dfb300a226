"""Drives greencode serve with the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL GOLDEN_JSON
Exits non-zero (with a traceback) on the first failed check.
"""
import json
import sys

import openai

base, golden_path = sys.argv[1], sys.argv[2]
golden = json.load(open(golden_path))
client = openai.OpenAI(base_url=base + "/v1", api_key="sekret")

# Models.
models = client.models.list()
assert [m.id for m in models.data] == ["tiny-coder"], models

# Plain completion equals the golden greedy continuation.
case = golden["cases"][0]
r = client.completions.create(
    model="tiny-coder", prompt=case["prompt"], max_tokens=32, temperature=0,
    extra_body={"token_healing": False},
)
assert r.choices[0].text == case["greedy32_text"], r
assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 32, r.usage

# Streaming completion with a suffix (fill-in-the-middle).
fim = golden["cases"][3]["prompt"]
prefix = fim[len("<|fim_prefix|>"):].split("<|fim_suffix|>")[0]
suffix = fim.split("<|fim_suffix|>")[1][: -len("<|fim_middle|>")]
stream = client.completions.create(
    model="tiny-coder", prompt=prefix, suffix=suffix, max_tokens=32, temperature=0,
    stream=True, stream_options={"include_usage": True}, extra_body={"token_healing": False},
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == golden["cases"][3]["greedy32_text"], pieces
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == 32, usage

# Chat, whole and streamed.
messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
c = client.chat.completions.create(model="tiny-coder", messages=messages, max_tokens=16, temperature=0)
assert c.choices[0].message.role == "assistant"
whole = c.choices[0].message.content
parts = []
for chunk in client.chat.completions.create(
    model="tiny-coder", messages=messages, max_tokens=16, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == whole, (parts, whole)

# Errors surface as the client's typed exceptions.
try:
    client.completions.create(model="tiny-coder", prompt="x", max_tokens=-1)
    raise SystemExit("negative max_tokens was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "max_tokens", e.body
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).completions.create(
        model="tiny-coder", prompt="x", max_tokens=1
    )
    raise SystemExit("wrong key was accepted")
except openai.AuthenticationError:
    pass
# One model served: any name reaches it, and the answer names the model.
other = client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
assert other.model == "tiny-coder", other.model
print("openai client: all checks passed")
