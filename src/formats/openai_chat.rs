//! OpenAI chat completions as a surface: its request decoded into the canonical one, canonical
//! answers and stream events encoded as its JSON and `chat.completion.chunk` events.
//!
//! Only used when the upstream speaks another format; OpenAI to OpenAI is a byte splice.

use super::canonical::{Answer, CacheMarker, Event, ImageSource, Message, Part, Request, Role, ToolChoice, ToolDef};
use komilion_sdk::{ApiError, ErrorKind, Usage};
use serde_json::{json, Map, Value};

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message)
        .with_code("invalid_request")
        .with_param(param)
}

/// Decode an OpenAI chat completions body (already checked by `ChatRequest::parse`) into the
/// canonical request. What other formats cannot express (`n` above 1, logprobs) is refused
/// with a clear 400 rather than silently dropped.
pub fn decode_request(body: &[u8]) -> Result<Request, ApiError> {
    let top: Map<String, Value> = serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    let mut req = Request::default();
    for (key, value) in &top {
        match key.as_str() {
            "messages" => decode_messages(value, &mut req)?,
            "tools" => req.tools = decode_tools(value)?,
            "tool_choice" => req.tool_choice = decode_tool_choice(value)?,
            "max_tokens" | "max_completion_tokens" => {
                if let Some(n) = value.as_u64() {
                    req.max_tokens = Some(req.max_tokens.map_or(n, |m| m.max(n)));
                }
            }
            "temperature" => req.temperature = value.as_f64(),
            "top_p" => req.top_p = value.as_f64(),
            "stop" => {
                req.stop = match value {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                    _ => Vec::new(),
                }
            }
            "stream" => req.stream = value.as_bool().unwrap_or(false),
            "response_format" => {
                req.json_output = matches!(
                    value.get("type").and_then(Value::as_str),
                    Some("json_object" | "json_schema")
                )
            }
            "n" if value.as_u64().is_some_and(|n| n > 1) => {
                return Err(invalid(
                    "n",
                    "This model's provider gives one answer per request: `n` must be 1.",
                ))
            }
            "logprobs" if value.as_bool() == Some(true) => {
                return Err(invalid("logprobs", "This model's provider does not return logprobs."))
            }
            _ => {}
        }
    }
    Ok(req)
}

fn decode_messages(value: &Value, req: &mut Request) -> Result<(), ApiError> {
    let messages = value
        .as_array()
        .ok_or_else(|| invalid("messages", "`messages` must be an array"))?;
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => req.system.extend(decode_content(content)?),
            "user" => push(req, Role::User, decode_content(content)?),
            "assistant" => {
                let mut parts = decode_content(content)?;
                for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    let function = call.get("function").unwrap_or(&Value::Null);
                    parts.push(Part::ToolCall {
                        id: str_of(call, "id"),
                        name: str_of(function, "name"),
                        arguments: match function.get("arguments") {
                            Some(Value::String(s)) if !s.is_empty() => s.clone(),
                            _ => "{}".to_owned(),
                        },
                    });
                }
                push(req, Role::Assistant, parts)
            }
            "tool" | "function" => {
                let call_id = str_of(m, "tool_call_id");
                let content = decode_content(content)?;
                push(
                    req,
                    Role::User,
                    vec![Part::ToolResult {
                        call_id,
                        content,
                        is_error: false,
                        cache: None,
                    }],
                )
            }
            other => {
                return Err(invalid(
                    "messages",
                    format!("Unknown message role `{}`.", other.chars().take(32).collect::<String>()),
                ))
            }
        }
    }
    Ok(())
}

/// Consecutive messages of one role become one (providers that alternate roles strictly, like
/// Anthropic, refuse two user turns in a row; tool results follow each other as user turns).
fn push(req: &mut Request, role: Role, parts: Vec<Part>) {
    if parts.is_empty() {
        return;
    }
    match req.messages.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => req.messages.push(Message { role, parts }),
    }
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// A message's `content`: a string, or an array of parts (`text`, `image_url`); a part may
/// carry `cache_control` as Anthropic-minded clients send it through OpenAI's shape.
fn decode_content(content: &Value) -> Result<Vec<Part>, ApiError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::text(s.clone())]),
        Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                let cache = item.get("cache_control").and_then(CacheMarker::from_json);
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(Part::Text {
                        text: str_of(item, "text"),
                        cache,
                    }),
                    Some("image_url") => {
                        let url = item
                            .get("image_url")
                            .and_then(|i| i.get("url").or(Some(i)))
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        parts.push(Part::Image {
                            source: ImageSource::from_url(url),
                            cache,
                        })
                    }
                    Some(other) => {
                        return Err(invalid(
                            "messages",
                            format!(
                                "Content parts of type `{}` cannot be sent to this model's provider.",
                                other.chars().take(32).collect::<String>()
                            ),
                        ))
                    }
                    None => return Err(invalid("messages", "Every content part needs a `type`.")),
                }
            }
            Ok(parts)
        }
        _ => Err(invalid("messages", "`content` must be a string or an array of parts")),
    }
}

fn decode_tools(value: &Value) -> Result<Vec<ToolDef>, ApiError> {
    let Some(tools) = value.as_array() else {
        return Ok(Vec::new());
    };
    tools
        .iter()
        .map(|tool| {
            let function = tool
                .get("function")
                .ok_or_else(|| invalid("tools", "Only `function` tools can be sent to this model's provider."))?;
            Ok(ToolDef {
                name: str_of(function, "name"),
                description: function.get("description").and_then(Value::as_str).map(str::to_owned),
                parameters: function
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                cache: tool.get("cache_control").and_then(CacheMarker::from_json),
            })
        })
        .collect()
}

fn decode_tool_choice(value: &Value) -> Result<Option<ToolChoice>, ApiError> {
    Ok(match value {
        Value::Null => None,
        Value::String(s) => Some(match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => return Err(invalid("tool_choice", "`tool_choice` must be auto, none or required")),
        }),
        _ => Some(ToolChoice::Tool(
            value
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
    })
}

/// OpenAI's `usage` for canonical usage: `prompt_tokens` is all input, cache reads included
/// (OpenAI's own convention), cache reads in `prompt_tokens_details`.
fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens.saturating_add(usage.output_tokens),
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    })
}

/// The `chatcmpl-` id of an answer: the provider's own id after the prefix.
fn completion_id(provider_id: &str) -> String {
    format!("chatcmpl-{provider_id}")
}

/// A whole answer as an OpenAI `chat.completion` body.
pub fn encode_answer(answer: &Answer, model: &str, created: u64) -> Vec<u8> {
    let text = answer.text();
    let tool_calls: Vec<Value> = answer
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::ToolCall { id, name, arguments } => Some(json!({
                "id": id, "type": "function", "function": {"name": name, "arguments": arguments},
            })),
            _ => None,
        })
        .collect();
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    let mut body = json!({
        "id": completion_id(&answer.id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": answer.stop.map(|s| s.openai()),
        }],
    });
    if let Some(usage) = &answer.usage {
        body["usage"] = usage_json(usage);
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Writes canonical stream events as OpenAI `chat.completion.chunk` events. Usage goes out as
/// OpenAI's last chunk (empty `choices`), always: the relay drops it when the client did not
/// ask, as it does for an OpenAI upstream.
pub struct StreamEncoder {
    id: String,
    model: String,
    created: u64,
    /// The first chunk (with the assistant role) was written.
    started: bool,
    done: bool,
}

impl StreamEncoder {
    pub fn new(model: &str, created: u64) -> StreamEncoder {
        StreamEncoder {
            id: completion_id("komilion"),
            model: model.to_owned(),
            created,
            started: false,
            done: false,
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>, out: &mut Vec<u8>) {
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        data_event(&chunk, out);
    }

    /// Append the client's bytes for `event` to `out`.
    pub fn encode(&mut self, event: &Event, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        if !self.started && !matches!(event, Event::Error { .. }) {
            self.started = true;
            if let Event::Start { id } = event {
                self.id = completion_id(id);
            }
            self.chunk(json!({"role": "assistant", "content": ""}), None, out);
        }
        match event {
            Event::Start { .. } => {}
            Event::Text(text) => self.chunk(json!({"content": text}), None, out),
            Event::ToolCallStart { index, id, name } => self.chunk(
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
                out,
            ),
            Event::ToolCallArguments { index, fragment } => self.chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                None,
                out,
            ),
            Event::Stop(reason) => self.chunk(json!({}), Some(reason.openai()), out),
            Event::Usage(usage) => {
                let chunk = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": usage_json(usage),
                });
                data_event(&chunk, out);
            }
            Event::Error { status, message } => {
                let kind = super::error_kind_for_status(*status);
                let error = ApiError::new(kind, message.clone()).with_code("upstream_error");
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&error.render(komilion_sdk::Surface::OpenAi));
                out.extend_from_slice(b"\n\n");
            }
            Event::Done => {
                self.done = true;
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        }
    }
}

fn data_event(value: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    // Writing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::super::canonical::StopReason;
    use super::*;

    #[test]
    fn a_conversation_with_tools_and_images_decodes_whole() {
        let body = json!({
            "model": "m", "max_tokens": 10, "max_completion_tokens": 20, "stream": true, "stop": "END",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "user", "content": "thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "look"}}
        });
        let req = decode_request(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(req.max_tokens, Some(20));
        assert!(req.stream);
        assert_eq!(req.stop, ["END"]);
        assert_eq!(req.system.len(), 2);
        assert_eq!(
            req.system[1],
            Part::Text {
                text: "Use tools.".into(),
                cache: Some(CacheMarker { ttl: Some("1h".into()) })
            }
        );
        assert_eq!(req.messages.len(), 3, "the tool result and the next user turn join");
        assert_eq!(
            req.messages[0].parts[1],
            Part::Image {
                source: ImageSource::Base64 {
                    media_type: "image/png".into(),
                    data: "iVBOR".into()
                },
                cache: None
            }
        );
        assert_eq!(
            req.messages[1].parts,
            [Part::ToolCall {
                id: "call_1".into(),
                name: "look".into(),
                arguments: "{\"q\":1}".into()
            }]
        );
        assert!(matches!(&req.messages[2].parts[0], Part::ToolResult { call_id, .. } if call_id == "call_1"));
        assert_eq!(req.messages[2].parts[1], Part::text("thanks"));
        assert_eq!(req.tool_choice, Some(ToolChoice::Tool("look".into())));
        assert_eq!(req.tools[0].name, "look");
    }

    #[test]
    fn what_other_providers_cannot_do_is_refused() {
        for body in [
            json!({"model": "m", "messages": [], "n": 2}),
            json!({"model": "m", "messages": [], "logprobs": true}),
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
        ] {
            let e = decode_request(&serde_json::to_vec(&body).unwrap()).unwrap_err();
            assert_eq!(e.status(), 400, "{body}");
        }
    }

    #[test]
    fn answers_and_streams_encode_as_openai_does() {
        let answer = Answer {
            id: "msg_1".into(),
            parts: vec![Part::ToolCall {
                id: "toolu_1".into(),
                name: "look".into(),
                arguments: "{}".into(),
            }],
            stop: Some(StopReason::ToolCalls),
            usage: Some(Usage {
                input_tokens: 30,
                cached_input_tokens: 20,
                output_tokens: 5,
                ..Default::default()
            }),
        };
        let v: Value = serde_json::from_slice(&encode_answer(&answer, "claude", 7)).unwrap();
        assert_eq!(v["id"], "chatcmpl-msg_1");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "look");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["usage"]["prompt_tokens"], 30);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 20);

        let mut enc = StreamEncoder::new("claude", 7);
        let mut out = Vec::new();
        for e in [
            Event::Start { id: "msg_1".into() },
            Event::Text("Hi".into()),
            Event::Stop(StopReason::Stop),
            Event::Usage(Usage::default()),
            Event::Done,
            Event::Text("after the end".into()),
        ] {
            enc.encode(&e, &mut out);
        }
        let text = String::from_utf8(out).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{text}");
        assert!(
            events[0].contains(r#""delta":{"role":"assistant","content":""}"#),
            "{text}"
        );
        assert!(events[0].contains(r#""id":"chatcmpl-msg_1""#), "{text}");
        assert!(events[1].contains(r#""content":"Hi""#));
        assert!(events[2].contains(r#""finish_reason":"stop""#));
        assert!(events[3].contains(r#""choices":[]"#));
        assert_eq!(events[4], "data: [DONE]");
    }
}
