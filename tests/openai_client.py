"""Drives a tpserve server with the official OpenAI Python client and prints what it got as
one JSON object (tests/server.rs checks it against `tpserve generate`)."""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")
model = client.models.list().data[0].id
prompt = "The capital of France is"
question = "Name three colours."
out = {"prompt": prompt, "question": question, "model": model}

r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
assert r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 16, r.usage
out["completion"] = r.choices[0].text

chunks = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
text, usage = "", None
for c in chunks:
    if c.choices:
        text += c.choices[0].text
    if c.usage:
        usage = c.usage
assert usage is not None and usage.completion_tokens == 16, usage
out["completion_stream"] = text

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0)
out["chat"] = r.choices[0].message.content
assert r.choices[0].finish_reason in ("stop", "length")

stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True)
out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
out["echo_text"] = r.choices[0].text
out["echo_token_logprobs"] = r.choices[0].logprobs.token_logprobs

print(json.dumps(out))
