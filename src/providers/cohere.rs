//! Cohere's v2 chat (`POST {base}/chat`, `base_url` `https://api.cohere.com/v2`), both ways.
//!
//! Close to OpenAI's shape (roles, `tool_calls`, `tool` messages, function tools) with its own
//! names: content is a string or `text` blocks, `tool_choice` is `REQUIRED` or `NONE`, `p`
//! for top-p, `stop_sequences`; the answer is one `message` with a `finish_reason` of
//! `COMPLETE`, `MAX_TOKENS`, `STOP_SEQUENCE` or `TOOL_CALL`; usage is `billed_units` (what
//! Cohere charges, used here) and `tokens`. A stream is typed events: `message-start`,
//! `content-delta`, `tool-call-start`/`-delta`/`-end`, `message-end` with the usage (or with
//! `finish_reason` `ERROR` and an `error` when it failed after its 200).

use super::{error_message, event_json, finish_body, function_tool, ProviderAdapter, StreamDecoder, TopLevelNames};
use crate::formats::canonical::{texts, Answer, Event, Part, Request, Role, StopReason, ToolChoice};
use crate::formats::error_kind_for_status;
use crate::sse::SseEvent;
use komilion_sdk::{ApiError, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub struct Cohere;

impl ProviderAdapter for Cohere {
    fn chat_target(&self, base_path: &str, _model: &str, _stream: bool) -> String {
        format!("{base_path}/chat")
    }

    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {api_key}"))]
    }

    fn encode_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ApiError> {
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !request.system.is_empty() {
            messages.push(json!({"role": "system", "content": text_of(&request.system)}));
        }
        for m in &request.messages {
            let mut content = Vec::new();
            let mut calls = Vec::new();
            for part in &m.parts {
                match part {
                    Part::Text { text, .. } => content.push(json!({"type": "text", "text": text})),
                    Part::Image { source, .. } => content.push(json!({
                        "type": "image_url", "image_url": {"url": source.to_url()}
                    })),
                    Part::ToolCall { id, name, arguments } => calls.push(json!({
                        "id": id, "type": "function", "function": {"name": name, "arguments": arguments},
                    })),
                    Part::ToolResult {
                        call_id, content: c, ..
                    } => messages.push(json!({
                        "role": "tool", "tool_call_id": call_id,
                        "content": [{"type": "document", "document": {"data": text_of(c)}}],
                    })),
                }
            }
            match m.role {
                Role::User if !content.is_empty() => messages.push(json!({"role": "user", "content": content})),
                Role::User => {}
                Role::Assistant => {
                    let mut message = json!({"role": "assistant"});
                    if !content.is_empty() {
                        message["content"] = Value::Array(content);
                    }
                    if !calls.is_empty() {
                        message["tool_calls"] = Value::Array(calls);
                    }
                    messages.push(message);
                }
            }
        }
        body.insert("messages".into(), Value::Array(messages));
        if !request.tools.is_empty() && request.tool_choice != Some(ToolChoice::None) {
            let tools: Vec<Value> = request.tools.iter().map(function_tool).collect();
            body.insert("tools".into(), Value::Array(tools));
            // Cohere can require a call but not name one; `Auto` is its default.
            if matches!(request.tool_choice, Some(ToolChoice::Required | ToolChoice::Tool(_))) {
                body.insert("tool_choice".into(), json!("REQUIRED"));
            }
        }
        finish_body(
            body,
            request,
            TopLevelNames {
                top_p: "p",
                stop: "stop_sequences",
                json_output: Some("response_format"),
            },
        )
    }

    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String> {
        let answer: WireAnswer = serde_json::from_slice(body).map_err(|e| format!("not a v2 chat answer: {e}"))?;
        let mut parts = Vec::new();
        if let Some(message) = answer.message {
            for block in message.content.into_iter().flatten() {
                if let Some(text) = block.text {
                    parts.push(Part::text(text));
                }
            }
            for call in message.tool_calls.into_iter().flatten() {
                let function = call.function.unwrap_or_default();
                parts.push(Part::ToolCall {
                    id: call.id.unwrap_or_default(),
                    name: function.name.unwrap_or_default(),
                    arguments: function.arguments.unwrap_or_default(),
                });
            }
        }
        Ok(Answer {
            id: answer.id,
            parts,
            stop: answer.finish_reason.as_deref().map(finish_reason),
            usage: answer.usage.map(WireUsage::into_usage),
        })
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(CohereStream::default())
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError {
        ApiError::new(error_kind_for_status(status), error_message(body, "/message")).with_code("upstream_error")
    }
}

fn text_of(parts: &[Part]) -> String {
    texts(parts).collect::<Vec<_>>().join("\n")
}

fn finish_reason(reason: &str) -> StopReason {
    match reason {
        "MAX_TOKENS" => StopReason::Length,
        "TOOL_CALL" => StopReason::ToolCalls,
        // COMPLETE, STOP_SEQUENCE.
        _ => StopReason::Stop,
    }
}

#[derive(Deserialize)]
struct WireAnswer {
    #[serde(default)]
    id: String,
    finish_reason: Option<String>,
    message: Option<WireMessage>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<Vec<WireBlock>>,
    tool_calls: Option<Vec<WireCall>>,
}

#[derive(Deserialize)]
struct WireBlock {
    text: Option<String>,
}

#[derive(Deserialize)]
struct WireCall {
    id: Option<String>,
    function: Option<WireFunction>,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    name: Option<String>,
    arguments: Option<String>,
}

/// Cohere's usage: what it bills, and what the model processed.
#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    billed_units: Option<Units>,
    tokens: Option<Units>,
}

#[derive(Deserialize, Clone, Copy, Default)]
struct Units {
    #[serde(default)]
    input_tokens: f64,
    #[serde(default)]
    output_tokens: f64,
}

impl WireUsage {
    fn into_usage(self) -> Usage {
        // Billed units are what Cohere charges for (its figures may be decimals).
        let units = self.billed_units.or(self.tokens).unwrap_or_default();
        Usage {
            input_tokens: units.input_tokens.max(0.0).ceil() as u64,
            output_tokens: units.output_tokens.max(0.0).ceil() as u64,
            ..Usage::default()
        }
    }
}

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    delta: Option<Value>,
}

#[derive(Default)]
struct CohereStream {
    /// Tool calls started, for their canonical index.
    calls: usize,
}

impl StreamDecoder for CohereStream {
    fn decode(&mut self, event: &SseEvent<'_>, out: &mut Vec<Event>) -> Result<(), String> {
        let Some(wire) = event_json::<WireEvent>(event)? else {
            return Ok(());
        };
        let delta = wire.delta.unwrap_or(Value::Null);
        let message = &delta["message"];
        match wire.kind.as_str() {
            "message-start" => out.push(Event::Start {
                id: wire.id.unwrap_or_default(),
            }),
            "content-delta" => {
                if let Some(text) = message["content"]["text"].as_str() {
                    out.push(Event::Text(text.to_owned()));
                }
            }
            "tool-call-start" => {
                let call = &message["tool_calls"];
                let index = self.calls;
                self.calls += 1;
                out.push(Event::ToolCallStart {
                    index,
                    id: call["id"].as_str().unwrap_or_default().to_owned(),
                    name: call["function"]["name"].as_str().unwrap_or_default().to_owned(),
                });
                if let Some(args) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                    out.push(Event::ToolCallArguments {
                        index,
                        fragment: args.to_owned(),
                    });
                }
            }
            "tool-call-delta" => {
                if let Some(fragment) = message["tool_calls"]["function"]["arguments"].as_str() {
                    out.push(Event::ToolCallArguments {
                        index: self.calls.saturating_sub(1),
                        fragment: fragment.to_owned(),
                    });
                }
            }
            "message-end" => {
                let reason = delta["finish_reason"].as_str().unwrap_or("COMPLETE");
                if reason == "ERROR" {
                    out.push(Event::Error {
                        status: 500,
                        message: delta["error"].as_str().unwrap_or("The provider failed.").to_owned(),
                    });
                    return Ok(());
                }
                out.push(Event::Stop(finish_reason(reason)));
                if let Ok(usage) = serde_json::from_value::<WireUsage>(delta["usage"].clone()) {
                    out.push(Event::Usage(usage.into_usage()));
                }
                out.push(Event::Done);
            }
            // content-start, content-end, tool-plan-delta, tool-call-end, citations.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{Message, ToolDef};
    use crate::sse::SseSplitter;

    #[test]
    fn requests_are_written_as_v2_chat_reads_them() {
        let request = Request {
            system: vec![Part::text("Be brief.")],
            messages: vec![
                Message {
                    role: Role::User,
                    parts: vec![Part::text("weather?")],
                },
                Message {
                    role: Role::Assistant,
                    parts: vec![Part::ToolCall {
                        id: "c1".into(),
                        name: "look".into(),
                        arguments: "{}".into(),
                    }],
                },
                Message {
                    role: Role::User,
                    parts: vec![Part::ToolResult {
                        call_id: "c1".into(),
                        content: vec![Part::text("18 C")],
                        is_error: false,
                        cache: None,
                    }],
                },
            ],
            tools: vec![ToolDef {
                name: "look".into(),
                description: None,
                parameters: json!({"type": "object"}),
                cache: None,
            }],
            tool_choice: Some(ToolChoice::Required),
            top_p: Some(0.5),
            ..Request::default()
        };
        let body: Value = serde_json::from_slice(&Cohere.encode_request(&request, "command-a").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"model": "command-a", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "document", "document": {"data": "18 C"}}]}
            ], "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
               "tool_choice": "REQUIRED", "p": 0.5})
        );
    }

    #[test]
    fn answers_and_streams_decode() {
        let answer = Cohere
            .decode_answer(br#"{"id":"a1","finish_reason":"TOOL_CALL","message":{"role":"assistant","tool_plan":"I will look.",
                "tool_calls":[{"id":"look_1","type":"function","function":{"name":"look","arguments":"{\"q\":1}"}}]},
                "usage":{"billed_units":{"input_tokens":12,"output_tokens":7},"tokens":{"input_tokens":80,"output_tokens":7}}}"#)
            .unwrap();
        assert_eq!(answer.stop, Some(StopReason::ToolCalls));
        assert!(matches!(&answer.parts[0], Part::ToolCall { name, .. } if name == "look"));
        assert_eq!(answer.usage.map(|u| (u.input_tokens, u.output_tokens)), Some((12, 7)));

        let stream = "event: message-start\ndata: {\"id\":\"a2\",\"type\":\"message-start\",\"delta\":{\"message\":{\"role\":\"assistant\",\"content\":[],\"tool_plan\":\"\",\"tool_calls\":[],\"citations\":[]}}}\n\n\
event: content-start\ndata: {\"type\":\"content-start\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
event: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"text\":\"Hi \\u00e9\"}}}}\n\n\
event: content-end\ndata: {\"type\":\"content-end\",\"index\":0}\n\n\
event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"finish_reason\":\"COMPLETE\",\"usage\":{\"billed_units\":{\"input_tokens\":5,\"output_tokens\":2},\"tokens\":{\"input_tokens\":5,\"output_tokens\":2}}}}\n\n";
        let decode = |cut: usize| {
            let mut splitter = SseSplitter::new();
            let mut decoder = Cohere.stream_decoder();
            let mut out = Vec::new();
            for piece in [&stream.as_bytes()[..cut], &stream.as_bytes()[cut..]] {
                splitter.push(piece);
                while let Some(e) = splitter.next_event() {
                    decoder.decode(&SseEvent::parse(&e), &mut out).unwrap();
                }
            }
            out
        };
        let whole = decode(0);
        assert_eq!(
            whole,
            [
                Event::Start { id: "a2".into() },
                Event::Text("Hi é".into()),
                Event::Stop(StopReason::Stop),
                Event::Usage(Usage {
                    input_tokens: 5,
                    output_tokens: 2,
                    ..Usage::default()
                }),
                Event::Done
            ]
        );
        for cut in 1..stream.len() {
            assert_eq!(decode(cut), whole, "split at {cut}");
        }
        let mut out = Vec::new();
        Cohere
            .stream_decoder()
            .decode(
                &SseEvent::parse(b"event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"error\":\"internal server error\",\"finish_reason\":\"ERROR\"}}\n\n"),
                &mut out,
            )
            .unwrap();
        assert!(matches!(&out[0], Event::Error { status: 500, message } if message == "internal server error"));
        assert_eq!(
            Cohere.decode_error(429, br#"{"id":"x","message":"too many"}"#).status(),
            429
        );
    }
}
