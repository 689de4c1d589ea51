"""The official Anthropic SDK against the gateway, unchanged but for its base URL and key.

Run by tests/sdk_clients.rs: python3 anthropic_sdk.py GATEWAY_URL KEY MODEL FAILING_MODEL
(FAILING_MODEL is served by a provider that answers 429.)
Prints one line per check and exits non-zero on the first failure.
"""
import sys

import anthropic

url, key, model, failing = sys.argv[1:5]
client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}")


message = client.messages.create(
    model=model, max_tokens=200, messages=[{"role": "user", "content": "hello"}]
)
text = message.content[0].text
check("create: text", message.content[0].type == "text" and text.startswith("Echo: hello"), message)
check("create: stop reason", message.stop_reason == "end_turn", message.stop_reason)
check("create: usage", message.usage.input_tokens > 0 and message.usage.output_tokens > 0, message.usage)

with client.messages.stream(
    model=model, max_tokens=200, messages=[{"role": "user", "content": "hello"}]
) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check("stream: same text", streamed == text, (streamed, text))
check("stream: stop reason", final.stop_reason == "end_turn", final.stop_reason)
check("stream: usage", final.usage.output_tokens == message.usage.output_tokens, (final.usage, message.usage))

tools = [{
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
ask = [{"role": "user", "content": "weather in Paris?"}]
called = client.messages.create(model=model, max_tokens=200, tools=tools, messages=ask)
use = [b for b in called.content if b.type == "tool_use"]
check("tools: tool_use", called.stop_reason == "tool_use" and use and use[0].name == "get_weather", called)
check("tools: input", isinstance(use[0].input.get("city"), str), use[0].input)
with client.messages.stream(model=model, max_tokens=200, tools=tools, messages=ask) as stream:
    final = stream.get_final_message()
streamed_use = [b for b in final.content if b.type == "tool_use"]
check("tools: streamed input", streamed_use and streamed_use[0].input == use[0].input, final)
answer = client.messages.create(
    model=model, max_tokens=200, tools=tools,
    messages=ask + [
        {"role": "assistant", "content": [b.model_dump() for b in called.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "18 C"}]},
    ],
)
check("tools: result accepted", answer.stop_reason in ("end_turn", "tool_use"), answer)

counted = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hello"}])
check("count_tokens", counted.input_tokens > 0, counted)

try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=ask)
    check("unknown model", False, "no error")
except anthropic.NotFoundError as e:
    check("unknown model", e.status_code == 404 and e.body["error"]["type"] == "not_found_error", e.body)

try:
    anthropic.Anthropic(base_url=url, api_key="sk-wrong-key-0000000000", max_retries=0).messages.create(
        model=model, max_tokens=10, messages=ask)
    check("bad key", False, "no error")
except anthropic.AuthenticationError as e:
    check("bad key", e.status_code == 401, e.body)

try:
    client.messages.create(model=failing, max_tokens=10, messages=ask)
    check("rate limit", False, "no error")
except anthropic.RateLimitError as e:
    check("rate limit", e.body["error"]["type"] == "rate_limit_error", e.body)
print("all ok")
