//! OpenAI's chat completions (and every server that speaks them: Mistral, Groq, DeepSeek,
//! vLLM, Ollama) as a provider format.
//!
//! On the OpenAI surface none of this runs: the client's body is spliced and the answer relayed
//! byte for byte. It serves the other surfaces (Anthropic's Messages): the canonical request
//! written as chat completions, and chat completions answers, chunks and errors read back.

use super::{error_message, finish_body, function_tool, ProviderAdapter, StreamDecoder, TopLevelNames};
use crate::formats::canonical::{Answer, Event, Part, Request, Role, StopReason, ToolChoice};
use crate::formats::error_kind_for_status;
use crate::metering::OpenAiUsage;
use crate::sse::SseEvent;
use komilion_sdk::{ApiError, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub struct OpenAi;

impl ProviderAdapter for OpenAi {
    fn chat_target(&self, base_path: &str, _model: &str, _stream: bool) -> String {
        format!("{base_path}/chat/completions")
    }

    fn speaks_openai_chat(&self) -> bool {
        true
    }

    fn auth_headers(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {api_key}"))]
    }

    fn encode_request(&self, request: &Request, model: &str) -> Result<Vec<u8>, ApiError> {
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !request.system.is_empty() {
            messages.push(json!({"role": "system", "content": content(&request.system)}));
        }
        for m in &request.messages {
            encode_message(m.role, &m.parts, &mut messages);
        }
        body.insert("messages".into(), Value::Array(messages));
        if !request.tools.is_empty() {
            let tools = request
                .tools
                .iter()
                .map(|t| {
                    let mut tool = function_tool(t);
                    if let Some(c) = &t.cache {
                        tool["cache_control"] = c.to_json();
                    }
                    tool
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
            if let Some(choice) = &request.tool_choice {
                let choice = match choice {
                    ToolChoice::Auto => json!("auto"),
                    ToolChoice::Required => json!("required"),
                    ToolChoice::None => json!("none"),
                    ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
                };
                body.insert("tool_choice".into(), choice);
            }
        }
        finish_body(
            body,
            request,
            TopLevelNames {
                top_p: "top_p",
                stop: "stop",
                json_output: Some("response_format"),
            },
        )
    }

    fn decode_answer(&self, body: &[u8]) -> Result<Answer, String> {
        let answer: WireAnswer = serde_json::from_slice(body).map_err(|e| format!("not a chat completion: {e}"))?;
        let mut parts = Vec::new();
        let mut stop = None;
        if let Some(choice) = answer.choices.into_iter().next() {
            if let Some(message) = choice.message {
                if let Some(text) = message.content.filter(|t| !t.is_empty()) {
                    parts.push(Part::text(text));
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
            stop = choice.finish_reason.as_deref().map(finish_reason);
        }
        Ok(Answer {
            id: answer.id,
            parts,
            stop,
            usage: answer.usage.map(Usage::from),
        })
    }

    fn stream_decoder(&self) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiStream::default())
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> ApiError {
        ApiError::new(error_kind_for_status(status), error_message(body, "/error/message")).with_code("upstream_error")
    }
}

/// One canonical message as chat completions messages: tool results become `tool` messages,
/// tool calls an assistant message's `tool_calls`.
fn encode_message(role: Role, parts: &[Part], out: &mut Vec<Value>) {
    let mut rest = Vec::new();
    let mut calls = Vec::new();
    for part in parts {
        match part {
            Part::ToolResult {
                call_id, content: c, ..
            } => out.push(json!({"role": "tool", "tool_call_id": call_id, "content": content(c)})),
            Part::ToolCall { id, name, arguments } => calls.push(json!({
                "id": id, "type": "function", "function": {"name": name, "arguments": arguments},
            })),
            other => rest.push(other.clone()),
        }
    }
    match role {
        Role::User if !rest.is_empty() => out.push(json!({"role": "user", "content": content(&rest)})),
        Role::User => {}
        Role::Assistant => {
            let mut message =
                json!({"role": "assistant", "content": if rest.is_empty() { Value::Null } else { content(&rest) }});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            out.push(message);
        }
    }
}

/// Text and image parts as `content`: a plain string when it is one unmarked text, parts
/// otherwise (cache markers ride along as `cache_control`, which OpenAI-compatible servers in
/// front of Anthropic models read).
fn content(parts: &[Part]) -> Value {
    if let [Part::Text { text, cache: None }] = parts {
        return json!(text);
    }
    let items: Vec<Value> = parts
        .iter()
        .filter_map(|p| {
            let (mut item, cache) = match p {
                Part::Text { text, cache } => (json!({"type": "text", "text": text}), cache),
                Part::Image { source, cache } => (
                    json!({"type": "image_url", "image_url": {"url": source.to_url()}}),
                    cache,
                ),
                _ => return None,
            };
            if let Some(c) = cache {
                item["cache_control"] = c.to_json();
            }
            Some(item)
        })
        .collect();
    Value::Array(items)
}

fn finish_reason(reason: &str) -> StopReason {
    match reason {
        "length" => StopReason::Length,
        "tool_calls" | "function_call" => StopReason::ToolCalls,
        "content_filter" => StopReason::ContentFilter,
        _ => StopReason::Stop,
    }
}

#[derive(Deserialize)]
struct WireAnswer {
    #[serde(default)]
    id: String,
    #[serde(default)]
    choices: Vec<WireChoice>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: Option<WireMessage>,
    delta: Option<WireMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
    tool_calls: Option<Vec<WireCall>>,
}

#[derive(Deserialize)]
struct WireCall {
    index: Option<usize>,
    id: Option<String>,
    function: Option<WireFunction>,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    id: String,
    #[serde(default)]
    choices: Vec<WireChoice>,
    usage: Option<OpenAiUsage>,
    error: Option<Value>,
}

/// A chat completions stream's state: the stop reason waits for the usage chunk, which comes
/// after it, so both go out at `[DONE]`.
#[derive(Default)]
struct OpenAiStream {
    started: bool,
    stop: Option<StopReason>,
    usage: Option<Usage>,
}

impl StreamDecoder for OpenAiStream {
    fn decode(&mut self, event: &SseEvent<'_>, out: &mut Vec<Event>) -> Result<(), String> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            out.push(Event::Stop(self.stop.unwrap_or(StopReason::Stop)));
            if let Some(usage) = self.usage {
                out.push(Event::Usage(usage));
            }
            out.push(Event::Done);
            return Ok(());
        }
        let chunk: WireChunk =
            serde_json::from_str(data).map_err(|e| format!("the provider sent an event that is not a chunk ({e})"))?;
        if let Some(error) = chunk.error {
            out.push(Event::Error {
                status: 500,
                message: error_message(error.to_string().as_bytes(), "/message"),
            });
            return Ok(());
        }
        if !self.started {
            self.started = true;
            out.push(Event::Start { id: chunk.id });
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        // One answer per request on the surfaces that translate (`n` is 1).
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(Event::Text(text));
                }
                for call in delta.tool_calls.into_iter().flatten() {
                    let index = call.index.unwrap_or(0);
                    let function = call.function.unwrap_or_default();
                    if let Some(id) = call.id {
                        out.push(Event::ToolCallStart {
                            index,
                            id,
                            name: function.name.unwrap_or_default(),
                        });
                    }
                    if let Some(fragment) = function.arguments.filter(|a| !a.is_empty()) {
                        out.push(Event::ToolCallArguments { index, fragment });
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.stop = Some(finish_reason(&reason));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::canonical::{CacheMarker, Message};

    #[test]
    fn a_canonical_request_is_written_as_chat_completions() {
        let request = Request {
            system: vec![Part::Text {
                text: "Be brief.".into(),
                cache: Some(CacheMarker::default()),
            }],
            messages: vec![
                Message {
                    role: Role::Assistant,
                    parts: vec![Part::ToolCall {
                        id: "toolu_1".into(),
                        name: "look".into(),
                        arguments: "{}".into(),
                    }],
                },
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::ToolResult {
                            call_id: "toolu_1".into(),
                            content: vec![Part::text("a cat")],
                            is_error: false,
                            cache: None,
                        },
                        Part::text("thanks"),
                    ],
                },
            ],
            max_tokens: Some(50),
            ..Request::default()
        };
        let body: Value = serde_json::from_slice(&OpenAi.encode_request(&request, "gpt-x").unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"model": "gpt-x", "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_1", "type": "function",
                    "function": {"name": "look", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
                {"role": "user", "content": "thanks"}
            ], "max_tokens": 50})
        );
    }

    #[test]
    fn chunks_decode_into_events_with_usage_at_the_end() {
        let stream = [
            r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"look","arguments":""}}]}}]}"#,
            r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
            r#"data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
            "data: [DONE]",
        ];
        let mut decoder = OpenAi.stream_decoder();
        let mut out = Vec::new();
        for e in stream {
            decoder.decode(&SseEvent::parse(e.as_bytes()), &mut out).unwrap();
        }
        assert_eq!(
            out,
            [
                Event::Start {
                    id: "chatcmpl-1".into()
                },
                Event::Text("Hi".into()),
                Event::ToolCallStart {
                    index: 0,
                    id: "call_1".into(),
                    name: "look".into()
                },
                Event::ToolCallArguments {
                    index: 0,
                    fragment: "{}".into()
                },
                Event::Stop(StopReason::ToolCalls),
                Event::Usage(Usage {
                    input_tokens: 9,
                    output_tokens: 4,
                    ..Usage::default()
                }),
                Event::Done
            ]
        );
        let answer = OpenAi
            .decode_answer(br#"{"id":"c","choices":[{"message":{"content":"ok"},"finish_reason":"length"}]}"#)
            .unwrap();
        assert_eq!((answer.text(), answer.stop), ("ok".into(), Some(StopReason::Length)));
    }
}
