//! Anthropic's Messages API (`POST {base}/messages`), both ways.
//!
//! What differs from OpenAI's chat completions: the key goes in `x-api-key` with a required
//! `anthropic-version`; the system prompt is a top-level field; `max_tokens` is required;
//! content is blocks (`text`, `image`, `tool_use`, `tool_result`) and roles strictly alternate;
//! tool results are user turns; prompt-cache breakpoints are `cache_control` on blocks; usage
//! splits input into fresh, cache-read and cache-written tokens; a stream is typed events
//! (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `ping`, `error`).

use super::{error_message, event_json, ProviderAdapter, StreamDecoder};
use crate::formats::canonical::{Answer, Event, ImageSource, Part, Request, Role, StopReason, ToolChoice};
use crate::formats::error_kind_for_status;
use crate::sse::SseEvent;
use komilion_sdk::{ApiError, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The API version the adapter speaks (Anthropic's only stable version to date).
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the client set none: Anthropic requires it. Large enough not to cut
/// ordinary answers; the wallet hold still assumes the model's whole output limit.
pub const DEFAULT_MAX_TOKENS: u64 = 8192;

pub struct Anthropic;

impl ProviderAdapter for Anthropic {
    fn chat_target(&self, base_path: &str, _model: &str, _stream: bool) -> String {
        format!("{base_path}/messages")
    }

    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![
            ("x-api-key", api_key.to_owned()),
            ("anthropic-version", API_VERSION.to_owned()),
        ]
    }

    fn encode_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ApiError> {
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert(
            "max_tokens".into(),
            json!(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        );
        if !request.system.is_empty() {
            body.insert(
                "system".into(),
                Value::Array(request.system.iter().map(block).collect()),
            );
        }
        let messages: Vec<Value> = request
            .messages
            .iter()
            .map(|m| {
                json!({
                    "role": match m.role { Role::User => "user", Role::Assistant => "assistant" },
                    "content": m.parts.iter().map(block).collect::<Vec<_>>(),
                })
            })
            .collect();
        body.insert("messages".into(), Value::Array(messages));
        if !request.tools.is_empty() && request.tool_choice != Some(ToolChoice::None) {
            let tools = request
                .tools
                .iter()
                .map(|t| {
                    let mut tool = json!({"name": t.name, "input_schema": t.parameters});
                    if let Some(d) = &t.description {
                        tool["description"] = json!(d);
                    }
                    if let Some(c) = &t.cache {
                        tool["cache_control"] = c.to_json();
                    }
                    tool
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
            if let Some(choice) = &request.tool_choice {
                let choice = match choice {
                    ToolChoice::Auto | ToolChoice::None => json!({"type": "auto"}),
                    ToolChoice::Required => json!({"type": "any"}),
                    ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
                };
                body.insert("tool_choice".into(), choice);
            }
        }
        if let Some(t) = request.temperature {
            // OpenAI's range is 0 to 2, Anthropic's 0 to 1.
            body.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
        }
        if let Some(p) = request.top_p {
            body.insert("top_p".into(), json!(p));
        }
        if !request.stop.is_empty() {
            body.insert("stop_sequences".into(), json!(request.stop));
        }
        if request.stream {
            body.insert("stream".into(), json!(true));
        }
        super::body_bytes(&body)
    }

    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String> {
        let message: WireMessage = serde_json::from_slice(body).map_err(|e| format!("not a Messages answer: {e}"))?;
        let mut parts = Vec::with_capacity(message.content.len());
        for block in message.content {
            match block.kind.as_str() {
                "text" => parts.push(Part::text(block.text.unwrap_or_default())),
                "tool_use" => parts.push(Part::ToolCall {
                    id: block.id.unwrap_or_default(),
                    name: block.name.unwrap_or_default(),
                    arguments: block.input.map_or_else(|| "{}".to_owned(), |i| i.to_string()),
                }),
                // Thinking and server-tool blocks have no place in the other surfaces; their
                // tokens are in `output_tokens` and billed.
                _ => {}
            }
        }
        Ok(Answer {
            id: message.id,
            parts,
            stop: message.stop_reason.as_deref().map(stop_reason),
            usage: message.usage.map(|u| u.into_usage()),
        })
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(AnthropicStream::default())
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError {
        let message = error_message(body, "/error/message");
        ApiError::new(error_kind_for_status(status), message).with_code("upstream_error")
    }
}

/// One canonical part as a content block.
fn block(part: &Part) -> Value {
    let (mut block, cache) = match part {
        Part::Text { text, cache } => (json!({"type": "text", "text": text}), cache),
        Part::Image { source, cache } => (json!({"type": "image", "source": image_source(source)}), cache),
        Part::ToolCall { id, name, arguments } => {
            // A call's arguments are a JSON object as text; a client that sent something else
            // still gets its call through, as an object holding the text.
            let input = serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({"arguments": arguments}));
            (
                json!({"type": "tool_use", "id": id, "name": name, "input": input}),
                &None,
            )
        }
        Part::ToolResult {
            call_id,
            content,
            is_error,
            cache,
        } => {
            let mut result = json!({
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": content.iter().map(block).collect::<Vec<_>>(),
            });
            if *is_error {
                result["is_error"] = json!(true);
            }
            (result, cache)
        }
    };
    if let Some(cache) = cache {
        block["cache_control"] = cache.to_json();
    }
    block
}

fn image_source(source: &ImageSource) -> Value {
    match source {
        ImageSource::Url(url) => json!({"type": "url", "url": url}),
        ImageSource::Base64 { media_type, data } => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
    }
}

fn stop_reason(reason: &str) -> StopReason {
    match reason {
        "max_tokens" | "model_context_window_exceeded" => StopReason::Length,
        "tool_use" => StopReason::ToolCalls,
        "refusal" => StopReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn.
        _ => StopReason::Stop,
    }
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    content: Vec<WireBlock>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    id: Option<String>,
    name: Option<String>,
    input: Option<Value>,
}

/// Anthropic's usage. `input_tokens` counts only the input that was neither read from nor
/// written to the cache; the three together are the prompt.
#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: u64,
}

impl WireUsage {
    /// Later figures replace earlier ones field by field (a stream's `message_delta` repeats
    /// some of `message_start`'s and adds the output).
    fn update(&mut self, newer: WireUsage) {
        self.input_tokens = newer.input_tokens.or(self.input_tokens);
        self.output_tokens = newer.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = newer.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = newer.cache_read_input_tokens.or(self.cache_read_input_tokens);
        self.cache_creation = newer.cache_creation.or(self.cache_creation);
    }

    fn into_usage(self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            // A provider's numbers are not trusted not to overflow.
            input_tokens: self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(written),
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: read,
            cache_write_input_tokens: written,
            cache_write_1h_input_tokens: self
                .cache_creation
                .map_or(0, |c| c.ephemeral_1h_input_tokens.min(written)),
            reasoning_tokens: 0,
            estimated: false,
        }
    }
}

/// A stream's state between events.
#[derive(Default)]
struct AnthropicStream {
    usage: WireUsage,
    /// The content block index of each tool call, in order (their canonical index is the
    /// position here).
    tool_blocks: Vec<u64>,
    stop: Option<StopReason>,
}

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    message: Option<WireMessage>,
    index: Option<u64>,
    content_block: Option<WireBlock>,
    delta: Option<WireDelta>,
    usage: Option<WireUsage>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
    partial_json: Option<String>,
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

/// The HTTP status an in-stream error type stands for.
fn error_status(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        _ => 500,
    }
}

impl StreamDecoder for AnthropicStream {
    fn decode(&mut self, event: &SseEvent<'_>, out: &mut Vec<Event>) -> Result<(), String> {
        let Some(wire) = event_json::<WireEvent>(event)? else {
            return Ok(());
        };
        match wire.kind.as_str() {
            "message_start" => {
                let message = wire.message.ok_or("`message_start` without its message")?;
                if let Some(u) = message.usage {
                    self.usage.update(u);
                }
                out.push(Event::Start { id: message.id });
            }
            "content_block_start" => {
                let block = wire.content_block.ok_or("`content_block_start` without its block")?;
                match block.kind.as_str() {
                    "tool_use" => {
                        out.push(Event::ToolCallStart {
                            index: self.tool_blocks.len(),
                            id: block.id.unwrap_or_default(),
                            name: block.name.unwrap_or_default(),
                        });
                        self.tool_blocks.push(wire.index.unwrap_or(0));
                    }
                    "text" => {
                        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                            out.push(Event::Text(text));
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = wire.delta.ok_or("`content_block_delta` without its delta")?;
                match delta.kind.as_deref() {
                    Some("text_delta") => out.push(Event::Text(delta.text.unwrap_or_default())),
                    Some("input_json_delta") => {
                        let block = wire.index.unwrap_or(0);
                        let index = self
                            .tool_blocks
                            .iter()
                            .position(|&b| b == block)
                            .ok_or("tool input for a block that is not a tool call")?;
                        out.push(Event::ToolCallArguments {
                            index,
                            fragment: delta.partial_json.unwrap_or_default(),
                        });
                    }
                    // thinking_delta, signature_delta, citations_delta: nothing the other
                    // surfaces carry.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = wire.usage {
                    self.usage.update(u);
                }
                if let Some(reason) = wire.delta.and_then(|d| d.stop_reason) {
                    self.stop = Some(stop_reason(&reason));
                }
            }
            "message_stop" => {
                out.push(Event::Stop(self.stop.unwrap_or(StopReason::Stop)));
                out.push(Event::Usage(self.usage.into_usage()));
                out.push(Event::Done);
            }
            "error" => {
                let error = wire.error.unwrap_or(WireError {
                    kind: None,
                    message: None,
                });
                out.push(Event::Error {
                    status: error_status(error.kind.as_deref().unwrap_or("")),
                    message: error
                        .message
                        .unwrap_or_else(|| "The provider reported an error.".into()),
                });
            }
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{CacheMarker, Message, ToolDef};
    use crate::sse::SseSplitter;

    fn request() -> Request {
        Request {
            system: vec![Part::Text {
                text: "Be brief.".into(),
                cache: Some(CacheMarker::default()),
            }],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::text("Look:"),
                        Part::Image {
                            source: ImageSource::from_url("data:image/png;base64,iVBOR"),
                            cache: None,
                        },
                    ],
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![Part::ToolCall {
                        id: "toolu_1".into(),
                        name: "look".into(),
                        arguments: r#"{"q":1}"#.into(),
                    }],
                },
                Message {
                    role: Role::User,
                    parts: vec![Part::ToolResult {
                        call_id: "toolu_1".into(),
                        content: vec![Part::text("a cat")],
                        is_error: false,
                        cache: Some(CacheMarker { ttl: Some("1h".into()) }),
                    }],
                },
            ],
            tools: vec![ToolDef {
                name: "look".into(),
                description: Some("Looks.".into()),
                parameters: json!({"type": "object"}),
                cache: None,
            }],
            tool_choice: Some(ToolChoice::Required),
            temperature: Some(1.5),
            stop: vec!["END".into()],
            stream: true,
            ..Request::default()
        }
    }

    #[test]
    fn requests_are_written_as_the_messages_api_reads_them() {
        let body: Value = serde_json::from_slice(&Anthropic.encode_request(&request(), "claude-x").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-x",
                "max_tokens": DEFAULT_MAX_TOKENS,
                "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Look:"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1",
                         "content": [{"type": "text", "text": "a cat"}],
                         "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
                ],
                "tools": [{"name": "look", "input_schema": {"type": "object"}, "description": "Looks."}],
                "tool_choice": {"type": "any"},
                "temperature": 1.0,
                "stop_sequences": ["END"],
                "stream": true
            })
        );
        assert_eq!(
            Anthropic.auth_headers("sk-ant-1"),
            [
                ("x-api-key", "sk-ant-1".to_owned()),
                ("anthropic-version", API_VERSION.to_owned())
            ]
        );
        assert_eq!(Anthropic.chat_target("/v1", "claude-x", true), "/v1/messages");
    }

    #[test]
    fn a_whole_answer_decodes_with_its_cache_usage() {
        let body = br#"{
          "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
          "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01", "name": "look", "input": {"q": "cat"}}
          ],
          "stop_reason": "tool_use", "stop_sequence": null,
          "usage": {"input_tokens": 10, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 2000,
                    "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
                    "output_tokens": 42}
        }"#;
        let answer = Anthropic.decode_answer(body).unwrap();
        assert_eq!(answer.text(), "Let me look.");
        assert_eq!(
            answer.parts[1],
            Part::ToolCall {
                id: "toolu_01".into(),
                name: "look".into(),
                arguments: r#"{"q":"cat"}"#.into()
            }
        );
        assert_eq!(answer.stop, Some(StopReason::ToolCalls));
        assert_eq!(
            answer.usage,
            Some(Usage {
                input_tokens: 2310,
                output_tokens: 42,
                cached_input_tokens: 2000,
                cache_write_input_tokens: 300,
                cache_write_1h_input_tokens: 100,
                ..Usage::default()
            })
        );
        assert!(Anthropic.decode_answer(b"[1]").is_err());
    }

    /// A stream as Anthropic documents it: text, then a tool call, pings between.
    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-x\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello \\u00e9\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01\",\"name\":\"look\",\"input\":{}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\": \"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"cat\\\"}\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":1}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    fn decode_split(bytes: &[u8], at: &[usize]) -> Vec<Event> {
        let mut splitter = SseSplitter::new();
        let mut decoder = Anthropic.stream_decoder();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in at.iter().chain(std::iter::once(&bytes.len())) {
            splitter.push(&bytes[start..cut]);
            start = cut;
            while let Some(event) = splitter.next_event() {
                decoder.decode(&SseEvent::parse(&event), &mut out).unwrap();
            }
        }
        out
    }

    #[test]
    fn a_stream_decodes_the_same_split_at_every_byte() {
        let whole = decode_split(STREAM.as_bytes(), &[]);
        assert_eq!(
            whole,
            [
                Event::Start { id: "msg_01".into() },
                Event::Text("Hello é".into()),
                Event::ToolCallStart {
                    index: 0,
                    id: "toolu_01".into(),
                    name: "look".into()
                },
                Event::ToolCallArguments {
                    index: 0,
                    fragment: "{\"q\": ".into()
                },
                Event::ToolCallArguments {
                    index: 0,
                    fragment: "\"cat\"}".into()
                },
                Event::Stop(StopReason::ToolCalls),
                Event::Usage(Usage {
                    input_tokens: 1025,
                    output_tokens: 15,
                    cached_input_tokens: 1000,
                    ..Usage::default()
                }),
                Event::Done,
            ]
        );
        for cut in 1..STREAM.len() {
            assert_eq!(decode_split(STREAM.as_bytes(), &[cut]), whole, "split at {cut}");
        }
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(decode_split(crlf.as_bytes(), &[7, 500]), whole);
    }

    #[test]
    fn errors_keep_their_meaning() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        let e = Anthropic.decode_error(429, body);
        assert_eq!(e.status(), 429);
        assert!(e.message.starts_with("Number of request tokens"));
        assert_eq!(Anthropic.decode_error(529, b"{}").status(), 503);
        assert_eq!(Anthropic.decode_error(400, b"not json").message, "not json");

        let mut decoder = Anthropic.stream_decoder();
        let mut out = Vec::new();
        let raw = b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        decoder.decode(&SseEvent::parse(raw), &mut out).unwrap();
        assert_eq!(
            out,
            [Event::Error {
                status: 529,
                message: "Overloaded".into()
            }]
        );
        assert!(decoder
            .decode(
                &SseEvent::parse(b"data: {\"type\": \"content_block_delta\", \"index\": 0,\n\n"),
                &mut out
            )
            .is_err());
    }
}
