"""The official OpenAI SDK against the gateway, for a model of another provider format.

Run by tests/sdk_clients.rs: python3 openai_sdk.py GATEWAY_URL KEY MODEL FAILING_MODEL
(FAILING_MODEL is served by a provider that answers 429.)
"""
import json
import sys

import openai

url, key, model, failing = sys.argv[1:5]
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}")


reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
text = reply.choices[0].message.content
check("create", text.startswith("Echo: hello") and reply.usage.prompt_tokens > 0, reply)
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello"}], stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("stream: same text", streamed == text, (streamed, text))
check("stream: usage", chunks[-1].usage.completion_tokens == reply.usage.completion_tokens, chunks[-1])
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
called = client.chat.completions.create(model=model, tools=tools, messages=[{"role": "user", "content": "weather?"}])
call = called.choices[0].message.tool_calls[0]
check("tools", called.choices[0].finish_reason == "tool_calls" and "city" in json.loads(call.function.arguments), called)
try:
    client.chat.completions.create(model=failing, messages=[{"role": "user", "content": "x"}])
    check("rate limit", False, "no error")
except openai.RateLimitError as e:
    check("rate limit", e.status_code == 429, e.body)
print("all ok")
