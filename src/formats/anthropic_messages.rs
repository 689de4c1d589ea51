//! Anthropic's Messages API as a surface (`POST /v1/messages`): its request decoded into the
//! canonical one, canonical answers and stream events encoded as its `message` JSON and typed
//! SSE events, so the official Anthropic SDKs work against any upstream.

use super::canonical::{
    Answer, CacheMarker, Event, ImageSource, Message, Part, Request, Role, StopReason, ToolChoice, ToolDef,
};
use komilion_sdk::{ApiError, ErrorKind, Usage};
use serde_json::{json, Value};

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message).with_code("invalid_request")
}

/// A decoded Messages request.
#[derive(Debug)]
pub struct Decoded {
    pub model: String,
    pub request: Request,
    /// `metadata.user_id`, Anthropic's end-user id.
    pub user: Option<String>,
}

/// Decode a Messages request body. `max_tokens` is required, as Anthropic requires it, except
/// when only the prompt's tokens are counted (`count_tokens`).
pub fn decode_request(body: &[u8], require_max_tokens: bool) -> Result<Decoded, ApiError> {
    let top: serde_json::Map<String, Value> = match serde_json::from_slice(body) {
        Ok(top) => top,
        Err(e) if e.is_data() => return Err(invalid("The request body must be a JSON object.")),
        Err(e) => return Err(ApiError::malformed_json(e)),
    };
    let model = top
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("model: Field required").with_param("model"))?
        .to_owned();
    let max_tokens = top.get("max_tokens").and_then(Value::as_u64);
    if require_max_tokens && max_tokens.is_none() {
        return Err(invalid("max_tokens: Field required").with_param("max_tokens"));
    }
    let mut request = Request {
        max_tokens,
        ..Request::default()
    };
    let mut user = None;
    for (key, value) in &top {
        match key.as_str() {
            "system" => request.system = decode_blocks(value)?,
            "messages" => {
                let messages = value
                    .as_array()
                    .ok_or_else(|| invalid("messages: Input should be a valid list"))?;
                for m in messages {
                    let role = match m.get("role").and_then(Value::as_str) {
                        Some("user") => Role::User,
                        Some("assistant") => Role::Assistant,
                        _ => return Err(invalid("messages: each role must be `user` or `assistant`")),
                    };
                    let parts = decode_blocks(m.get("content").unwrap_or(&Value::Null))?;
                    request.messages.push(Message { role, parts });
                }
            }
            "tools" => {
                for tool in value.as_array().into_iter().flatten() {
                    request.tools.push(ToolDef {
                        name: str_of(tool, "name"),
                        description: tool.get("description").and_then(Value::as_str).map(str::to_owned),
                        parameters: tool
                            .get("input_schema")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object"})),
                        cache: tool.get("cache_control").and_then(CacheMarker::from_json),
                    });
                }
            }
            "tool_choice" => {
                request.tool_choice = match value.get("type").and_then(Value::as_str) {
                    Some("auto") => Some(ToolChoice::Auto),
                    Some("any") => Some(ToolChoice::Required),
                    Some("none") => Some(ToolChoice::None),
                    Some("tool") => Some(ToolChoice::Tool(str_of(value, "name"))),
                    _ => None,
                }
            }
            "temperature" => request.temperature = value.as_f64(),
            "top_p" => request.top_p = value.as_f64(),
            "stop_sequences" => {
                request.stop = value
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }
            "stream" => request.stream = value.as_bool().unwrap_or(false),
            "metadata" => user = value.get("user_id").and_then(Value::as_str).map(str::to_owned),
            _ => {}
        }
    }
    if request.messages.is_empty() {
        return Err(invalid("messages: at least one message is required"));
    }
    Ok(Decoded { model, request, user })
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// `content` (or `system`): a string, or an array of blocks.
fn decode_blocks(value: &Value) -> Result<Vec<Part>, ApiError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::text(s.clone())]),
        Value::Array(blocks) => blocks.iter().filter_map(|b| decode_block(b).transpose()).collect(),
        _ => Err(invalid("content: Input should be a valid string or list of blocks")),
    }
}

fn decode_block(block: &Value) -> Result<Option<Part>, ApiError> {
    let cache = block.get("cache_control").and_then(CacheMarker::from_json);
    Ok(Some(match block.get("type").and_then(Value::as_str) {
        Some("text") => Part::Text {
            text: str_of(block, "text"),
            cache,
        },
        Some("image") => {
            let source = block.get("source").unwrap_or(&Value::Null);
            let source = match source.get("type").and_then(Value::as_str) {
                Some("base64") => ImageSource::Base64 {
                    media_type: str_of(source, "media_type"),
                    data: str_of(source, "data"),
                },
                Some("url") => ImageSource::Url(str_of(source, "url")),
                _ => return Err(invalid("image: source must be base64 or url")),
            };
            Part::Image { source, cache }
        }
        Some("tool_use") => Part::ToolCall {
            id: str_of(block, "id"),
            name: str_of(block, "name"),
            arguments: block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
        },
        Some("tool_result") => Part::ToolResult {
            call_id: str_of(block, "tool_use_id"),
            content: decode_blocks(block.get("content").unwrap_or(&Value::Null))?,
            is_error: block.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            cache,
        },
        // Thinking blocks of earlier turns and other types no other provider reads.
        Some("thinking" | "redacted_thinking") => return Ok(None),
        Some(other) => {
            return Err(invalid(format!(
                "content: blocks of type `{}` are not supported",
                other.chars().take(32).collect::<String>()
            )))
        }
        None => return Err(invalid("content: every block needs a `type`")),
    }))
}

fn stop_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Stop => "end_turn",
        StopReason::Length => "max_tokens",
        StopReason::ToolCalls => "tool_use",
        StopReason::ContentFilter => "refusal",
    }
}

/// Anthropic's `usage`: `input_tokens` without the cache reads and writes, which have their
/// own fields.
fn usage_json(usage: &Usage) -> Value {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let written = usage.cache_write_input_tokens.min(usage.input_tokens - cached);
    json!({
        "input_tokens": usage.input_tokens - cached - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.output_tokens,
    })
}

fn message_id(provider_id: &str) -> String {
    if provider_id.starts_with("msg_") {
        provider_id.to_owned()
    } else {
        format!("msg_{}", provider_id.trim_start_matches("chatcmpl-"))
    }
}

fn content_block(part: &Part) -> Option<Value> {
    match part {
        Part::Text { text, .. } => Some(json!({"type": "text", "text": text})),
        Part::ToolCall { id, name, arguments } => {
            let input = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({}));
            Some(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
        }
        _ => None,
    }
}

/// A whole answer as a Messages `message`.
pub fn encode_answer(answer: &Answer, model: &str) -> Vec<u8> {
    let body = json!({
        "id": message_id(&answer.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": answer.parts.iter().filter_map(content_block).collect::<Vec<_>>(),
        "stop_reason": answer.stop.map(stop_reason),
        "stop_sequence": null,
        "usage": usage_json(&answer.usage.unwrap_or_default()),
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Which content block is open in the client's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    None,
    Text,
    /// The canonical index of the tool call it holds.
    Tool(usize),
}

/// Writes canonical stream events as Messages stream events, opening and closing content
/// blocks as the text and tool calls come.
pub struct StreamEncoder {
    model: String,
    started: bool,
    open: OpenBlock,
    /// Index of the next content block.
    next_block: usize,
    stop: Option<StopReason>,
    usage: Usage,
    done: bool,
}

impl StreamEncoder {
    pub fn new(model: &str) -> StreamEncoder {
        StreamEncoder {
            model: model.to_owned(),
            started: false,
            open: OpenBlock::None,
            next_block: 0,
            stop: None,
            usage: Usage::default(),
            done: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": message_id(id), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
            out,
        );
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if self.open != OpenBlock::None {
            let index = self.next_block - 1;
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
                out,
            );
            self.open = OpenBlock::None;
        }
    }

    fn open_block(&mut self, kind: OpenBlock, block: Value, out: &mut Vec<u8>) {
        self.close_block(out);
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next_block, "content_block": block}),
            out,
        );
        self.next_block += 1;
        self.open = kind;
    }

    /// Append the client's bytes for `e` to `out`.
    pub fn encode(&mut self, e: &Event, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        if !matches!(e, Event::Error { .. }) {
            self.start(
                match e {
                    Event::Start { id } => id,
                    _ => "komilion",
                },
                out,
            );
        }
        match e {
            Event::Start { .. } => {}
            Event::Text(text) => {
                if self.open != OpenBlock::Text {
                    self.open_block(OpenBlock::Text, json!({"type": "text", "text": ""}), out);
                }
                let index = self.next_block - 1;
                event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": text}}),
                    out,
                );
            }
            Event::ToolCallStart { index, id, name } => self.open_block(
                OpenBlock::Tool(*index),
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                out,
            ),
            Event::ToolCallArguments { index, fragment } => {
                if self.open == OpenBlock::Tool(*index) {
                    let block = self.next_block - 1;
                    event(
                        "content_block_delta",
                        &json!({"type": "content_block_delta", "index": block,
                                "delta": {"type": "input_json_delta", "partial_json": fragment}}),
                        out,
                    );
                }
            }
            Event::Stop(reason) => self.stop = Some(*reason),
            Event::Usage(usage) => self.usage = *usage,
            Event::Error { status, message } => {
                let error = ApiError::new(super::error_kind_for_status(*status), message.clone());
                out.extend_from_slice(b"event: error\ndata: ");
                out.extend_from_slice(&error.render(komilion_sdk::Surface::Anthropic));
                out.extend_from_slice(b"\n\n");
            }
            Event::Done => {
                self.close_block(out);
                let mut usage = usage_json(&self.usage);
                // message_delta's usage is cumulative: the input figures again, and the output.
                usage["output_tokens"] = json!(self.usage.output_tokens);
                event(
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(self.stop.unwrap_or(StopReason::Stop)),
                                      "stop_sequence": null},
                            "usage": usage}),
                    out,
                );
                event("message_stop", &json!({"type": "message_stop"}), out);
                self.done = true;
            }
        }
    }
}

fn event(name: &str, data: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut *out, data);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_decodes_with_its_blocks_and_cache_markers() {
        let body = json!({
            "model": "claude-x", "max_tokens": 100, "stream": true, "stop_sequences": ["END"],
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "metadata": {"user_id": "u-1"},
            "tools": [{"name": "look", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "…"},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a cat", "is_error": true}]}
            ]
        });
        let d = decode_request(&serde_json::to_vec(&body).unwrap(), true).unwrap();
        assert_eq!((d.model.as_str(), d.user.as_deref()), ("claude-x", Some("u-1")));
        let r = d.request;
        assert_eq!(
            (r.max_tokens, r.stream, r.stop.as_slice()),
            (Some(100), true, &["END".to_owned()][..])
        );
        assert_eq!(
            r.system,
            [Part::Text {
                text: "Be brief.".into(),
                cache: Some(CacheMarker { ttl: Some("1h".into()) })
            }]
        );
        assert_eq!(r.tool_choice, Some(ToolChoice::Required));
        assert_eq!(r.messages[1].parts.len(), 1, "thinking is dropped");
        assert_eq!(
            r.messages[2].parts[0],
            Part::ToolResult {
                call_id: "toolu_1".into(),
                content: vec![Part::text("a cat")],
                is_error: true,
                cache: None
            }
        );
        for bad in [
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
            json!({"model": "m", "max_tokens": 1, "messages": []}),
            json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
        ] {
            assert_eq!(
                decode_request(&serde_json::to_vec(&bad).unwrap(), true)
                    .unwrap_err()
                    .status(),
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_stream_encodes_in_the_documented_order() {
        let mut enc = StreamEncoder::new("claude-x");
        let mut out = Vec::new();
        for e in [
            Event::Start {
                id: "chatcmpl-1".into(),
            },
            Event::Text("Hi".into()),
            Event::ToolCallStart {
                index: 0,
                id: "call_1".into(),
                name: "look".into(),
            },
            Event::ToolCallArguments {
                index: 0,
                fragment: "{}".into(),
            },
            Event::Stop(StopReason::ToolCalls),
            Event::Usage(Usage {
                input_tokens: 10,
                cached_input_tokens: 4,
                output_tokens: 3,
                ..Usage::default()
            }),
            Event::Done,
        ] {
            enc.encode(&e, &mut out);
        }
        let text = String::from_utf8(out).unwrap();
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(text.contains(r#""id":"msg_1""#), "{text}");
        assert!(text.contains(r#""stop_reason":"tool_use""#), "{text}");
        assert!(
            text.contains(r#""usage":{"input_tokens":6,"cache_creation_input_tokens":0,"cache_read_input_tokens":4,"output_tokens":3}"#),
            "{text}"
        );
    }
}
