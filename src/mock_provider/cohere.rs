//! Cohere's v2 API on the wire: chat (`POST /v2/chat`) and embed (`POST /v2/embed`), with the
//! key as `Authorization: Bearer <key>`.
//!
//! A chat request (`messages` with `system`/`user`/`assistant`/`tool` roles, content as a string
//! or text blocks, `tool_calls`, `tool_call_id`; `tools`, `tool_choice: REQUIRED | NONE`,
//! `max_tokens`, `stop_sequences`, `response_format`) is read into the OpenAI-shaped request
//! [`answer::plan`] reads. The answer is a `{"id", "finish_reason", "message", "usage"}` object
//! (`finish_reason` `COMPLETE`, `MAX_TOKENS`, `STOP_SEQUENCE` or `TOOL_CALL`; usage as
//! `billed_units` and `tokens`, here the same counts), or with `stream: true` SSE events, each
//! `event: <type>` then `data: <json>`: `message-start`, `content-start`, one `content-delta` a
//! piece, `content-end` (or `tool-call-start`, one `tool-call-delta` a piece of the arguments,
//! `tool-call-end`), `message-end` with the finish reason and usage. A failure after the 200
//! (`stream_error_after`) ends the stream with a `message-end` whose `finish_reason` is `ERROR`
//! and whose `error` says why. Errors are `{"id", "message"}` with the status.
//!
//! Embed takes `texts`, `input_type` and `embedding_types` and answers `embeddings` by type
//! (`float`, `int8`, `uint8`, `binary`, `ubinary`, `base64`), the vectors of
//! [`super::embeddings::vector`].

use super::answer::{self, Choice, Output};
use super::embeddings::{base64_floats, serialize, vector};
use super::openai::{sse_data, to_json};
use super::{behavior_for, write_events, write_simple, Event, Faults, Head, Keep, ReplyHeaders, State};
use crate::metering::tokens::{count_chat_prompt, count_text};
use komilion_sdk::ChatMessage;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use std::io;
use std::time::Duration;
use tokio::net::TcpStream;

const STREAM_HEAD: &str = "content-type: text/event-stream\r\ncache-control: no-cache\r\n";

/// The stream faults as Cohere would send them: an event cut off mid-JSON, and the end of a
/// message that failed after its 200.
const FAULTS: Faults = Faults {
    malformed: b"event: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":\n\n",
    error: b"event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"error\":\"internal server error\",\"finish_reason\":\"ERROR\"}}\n\n",
};

/// The most texts Cohere embeds in one request.
const MAX_TEXTS: usize = 96;

/// `POST /v2/chat` and `POST /v2/embed`.
pub(super) async fn serve(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    mut headers: ReplyHeaders,
) -> io::Result<Keep> {
    let path = head.path.split('?').next().unwrap_or("");
    // Until the body is read, only the instance default and the header say how to print.
    let pretty = behavior_for(state, head, &Value::Null).map_or(state.config.behavior.pretty, |b| b.pretty);
    if let Some(key) = &state.config.api_key {
        let message = match head.header("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
            None => Some("no api key supplied"),
            Some(presented) if presented != key => Some("invalid api token"),
            Some(_) => None,
        };
        if let Some(message) = message {
            let body = to_json(&json!({"message": message}), pretty);
            return write_simple(stream, 401, "application/json", &body, &headers).await;
        }
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        let message = "invalid request: the request body is not valid JSON.";
        return refuse(stream, 400, Some(message), &headers, pretty).await;
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(message) => {
            let message = format!("invalid request: {message}");
            return refuse(stream, 400, Some(&message), &headers, pretty).await;
        }
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        return refuse(stream, status, None, &headers, behavior.pretty).await;
    }
    if path == "/v2/embed" {
        let (answer, tokens) = match embed(&request, &headers.request_id, !behavior.omit_usage) {
            Ok(answer) => answer,
            Err(message) => return refuse(stream, 400, Some(&message), &headers, behavior.pretty).await,
        };
        headers.tokens = tokens;
        let body = serialize(&answer, behavior.pretty);
        return write_simple(stream, 200, "application/json", &body, &headers).await;
    }

    let prompt = match Prompt::read(&request) {
        Ok(p) => p,
        Err(message) => return refuse(stream, 400, Some(&message), &headers, behavior.pretty).await,
    };
    let plan = match answer::plan(&prompt.plan, &prompt.model, behavior.chunks) {
        Ok(plan) => plan,
        Err(e) => {
            let message = format!("invalid request: {e}");
            return refuse(stream, 400, Some(&message), &headers, behavior.pretty).await;
        }
    };
    // `n` is never set, so there is exactly one choice.
    let Some(choice) = plan.choices.first() else {
        return refuse(stream, 500, None, &headers, behavior.pretty).await;
    };
    headers.tokens = prompt.tokens + plan.completion_tokens;
    let reply = Reply {
        id: &headers.request_id,
        tool_id: choice_tool_id(choice),
        choice,
        usage: (!behavior.omit_usage).then_some((prompt.tokens, plan.completion_tokens)),
        pretty: behavior.pretty,
    };
    if request["stream"].as_bool().unwrap_or(false) {
        let events = reply.events();
        write_events(stream, &headers, STREAM_HEAD, &events, &behavior, &FAULTS).await
    } else {
        let body = reply.body();
        write_simple(stream, 200, "application/json", &body, &headers).await
    }
}

/// Answer with Cohere's error for `status` (its standard message unless given one).
async fn refuse(
    stream: &mut TcpStream,
    status: u16,
    message: Option<&str>,
    headers: &ReplyHeaders,
    pretty: bool,
) -> io::Result<Keep> {
    let body = error_body(status, message, &headers.request_id, pretty);
    write_simple(stream, status, "application/json", &body, headers).await
}

/// Cohere's error body: the request's id and a message.
pub fn error_body(status: u16, message: Option<&str>, id: &str, pretty: bool) -> Vec<u8> {
    let standard = match status {
        400 => "invalid request: the request could not be processed.",
        401 => "invalid api token",
        402 => {
            "Please add or update your payment method at https://dashboard.cohere.com/billing?tab=payment to continue"
        }
        403 => "You do not have access to this resource.",
        404 => "model not found, make sure the correct model ID was used and that you have access to the model.",
        422 => "invalid request: the request could not be processed.",
        429 => "You are past the per minute request limit, please wait and try again later.",
        499 => "request cancelled",
        503 => "service unavailable",
        504 => "gateway timeout",
        _ => "internal server error",
    };
    to_json(&json!({"id": id, "message": message.unwrap_or(standard)}), pretty)
}

/// The headers Cohere sends with every answer: a trace id and the time upstream (no rate limits).
pub(super) fn headers(request_id: &str, processing_ms: u128) -> String {
    let trace: String = request_id.chars().filter(|c| *c != '-').collect();
    format!("x-debug-trace-id: {trace}\r\nx-envoy-upstream-service-time: {processing_ms}\r\n")
}

/// A tool call's id as Cohere writes them: the tool's name and 12 letters and digits
/// (`get_weather_1byjy32y4hvq`).
fn choice_tool_id(choice: &Choice) -> String {
    let Output::ToolCall { name, .. } = &choice.output else {
        return String::new();
    };
    let tail: String = (0..12)
        .map(|_| {
            let i = rand::thread_rng().gen_range(0..36u32);
            char::from_digit(i, 36).unwrap_or('0')
        })
        .collect();
    format!("{name}_{tail}")
}

/// A chat request, read for the plan and the meter.
struct Prompt {
    model: String,
    /// The same request in OpenAI's shape, for [`answer::plan`].
    plan: Value,
    tokens: u64,
}

impl Prompt {
    /// Read `request`, or say why Cohere would refuse it.
    fn read(request: &Value) -> Result<Prompt, String> {
        let model = match request["model"].as_str() {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ => return Err("invalid request: model must be specified.".into()),
        };
        let list = match request["messages"].as_array() {
            Some(list) if !list.is_empty() => list,
            _ => return Err("invalid request: messages must contain at least one message.".into()),
        };
        let mut messages = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let role = match m["role"].as_str() {
                Some(role @ ("system" | "user" | "assistant" | "tool")) => role,
                _ => {
                    return Err(format!(
                        "invalid request: messages[{i}].role must be one of 'system', 'user', 'assistant', 'tool'."
                    ))
                }
            };
            let mut texts: Vec<String> = Vec::new();
            if let Some(plan) = m["tool_plan"].as_str().filter(|p| !p.is_empty()) {
                texts.push(plan.to_owned());
            }
            match &m["content"] {
                Value::String(s) => texts.push(s.clone()),
                Value::Array(blocks) => texts.extend(blocks.iter().filter_map(block_text)),
                _ => {}
            }
            messages.push(ChatMessage {
                role: role.to_owned(),
                text: texts.join("\n"),
            });
        }

        let chat: Vec<Value> = messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.text}))
            .collect();
        let mut plan = json!({"model": model, "messages": chat});
        match &request["max_tokens"] {
            Value::Null => {}
            v => match v.as_u64() {
                Some(max) if max > 0 => plan["max_tokens"] = json!(max),
                _ => return Err(format!("invalid request: max_tokens must be positive, got {v}.")),
            },
        }
        if let Some(stops) = request.get("stop_sequences") {
            plan["stop"] = stops.clone();
        }
        if let Some(tools) = request["tools"].as_array().filter(|t| !t.is_empty()) {
            plan["tools"] = Value::Array(tools.clone());
        }
        match request["tool_choice"].as_str() {
            Some("REQUIRED") => plan["tool_choice"] = json!("required"),
            Some("NONE") => plan["tool_choice"] = json!("none"),
            None => {}
            Some(other) => {
                return Err(format!(
                    "invalid request: tool_choice must be one of 'REQUIRED', 'NONE', got '{other}'."
                ))
            }
        }
        let format = &request["response_format"];
        if format["type"] == "json_object" {
            plan["response_format"] = match format.get("json_schema").or_else(|| format.get("schema")) {
                Some(schema) => json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}),
                None => json!({"type": "json_object"}),
            };
        }
        let tokens = count_chat_prompt(&model, &messages);
        Ok(Prompt { model, plan, tokens })
    }
}

/// The text a content block adds to its message: a text block's text, a document's data (as
/// JSON, unless it is a string). Images add none, as the OpenAI route counts none.
fn block_text(block: &Value) -> Option<String> {
    match block["type"].as_str() {
        Some("text") => block["text"].as_str().map(str::to_owned),
        Some("document") => match &block["document"]["data"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            data => Some(data.to_string()),
        },
        _ => None,
    }
}

/// One answer being produced.
struct Reply<'a> {
    id: &'a str,
    /// The id of the tool call, if the answer is one (the plan's is in OpenAI's shape).
    tool_id: String,
    choice: &'a Choice,
    /// Input and output tokens, unless the behaviour omits usage.
    usage: Option<(u64, u64)>,
    pretty: bool,
}

impl Reply<'_> {
    fn finish_reason(&self) -> &'static str {
        match self.choice.finish_reason {
            "length" => "MAX_TOKENS",
            "tool_calls" => "TOOL_CALL",
            _ if self.choice.stop.is_some() => "STOP_SEQUENCE",
            _ => "COMPLETE",
        }
    }

    fn usage(&self) -> Option<Value> {
        let (input, output) = self.usage?;
        let counts = json!({"input_tokens": input, "output_tokens": output});
        Some(json!({"billed_units": counts, "tokens": counts}))
    }

    /// The non-streamed answer.
    fn body(&self) -> Vec<u8> {
        let message = match &self.choice.output {
            Output::Text(pieces) => {
                json!({"role": "assistant", "content": [{"type": "text", "text": pieces.concat()}]})
            }
            Output::ToolCall { name, arguments, .. } => json!({
                "role": "assistant",
                "tool_calls": [{
                    "id": self.tool_id, "type": "function",
                    "function": {"name": name, "arguments": arguments.concat()}
                }]
            }),
        };
        let mut v = json!({"id": self.id, "finish_reason": self.finish_reason(), "message": message});
        if let Some(usage) = self.usage() {
            v["usage"] = usage;
        }
        to_json(&v, self.pretty)
    }

    /// Every SSE event of the streamed answer, in order.
    fn events(&self) -> Vec<Event> {
        let event = |v: Value, content: bool| {
            let mut bytes = format!("event: {}\n", v["type"].as_str().unwrap_or_default()).into_bytes();
            bytes.extend(sse_data(&v, self.pretty));
            Event { bytes, content }
        };
        let empty = json!({"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []});
        let mut out = vec![event(
            json!({"id": self.id, "type": "message-start", "delta": {"message": empty}}),
            false,
        )];
        match &self.choice.output {
            Output::Text(pieces) => {
                out.push(event(
                    json!({"type": "content-start", "index": 0,
                        "delta": {"message": {"content": {"type": "text", "text": ""}}}}),
                    false,
                ));
                out.extend(pieces.iter().map(|p| {
                    event(
                        json!({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": p}}}}),
                        true,
                    )
                }));
                out.push(event(json!({"type": "content-end", "index": 0}), false));
            }
            Output::ToolCall { name, arguments, .. } => {
                let call = json!({"id": self.tool_id, "type": "function", "function": {"name": name, "arguments": ""}});
                out.push(event(
                    json!({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": call}}}),
                    false,
                ));
                out.extend(arguments.iter().map(|p| {
                    let call = json!({"function": {"arguments": p}});
                    event(
                        json!({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": call}}}),
                        true,
                    )
                }));
                out.push(event(json!({"type": "tool-call-end", "index": 0}), false));
            }
        }
        let mut delta = json!({"finish_reason": self.finish_reason()});
        if let Some(usage) = self.usage() {
            delta["usage"] = usage;
        }
        out.push(event(json!({"type": "message-end", "delta": delta}), false));
        out
    }
}

/// Embeddings by type, in Cohere's order.
#[derive(Serialize, Default)]
struct ByType {
    #[serde(skip_serializing_if = "Option::is_none")]
    float: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    int8: Option<Vec<Vec<i8>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uint8: Option<Vec<Vec<u8>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    binary: Option<Vec<Vec<i16>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ubinary: Option<Vec<Vec<u8>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base64: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Embedded {
    id: String,
    embeddings: ByType,
    texts: Vec<String>,
    meta: Value,
    response_type: &'static str,
}

/// The length of a Cohere embedding model's vectors.
fn embedding_dimensions(model: &str) -> usize {
    if model.starts_with("embed-v4") {
        1536
    } else if model.contains("light") {
        384
    } else {
        1024
    }
}

/// `int8` values: the vector scaled so its largest value is 127.
fn int8(values: &[f32]) -> Vec<i8> {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    values
        .iter()
        .map(|v| if max > 0.0 { (v / max * 127.0).round() as i8 } else { 0 })
        .collect()
}

/// `ubinary` values: one bit a dimension (set when positive), eight to a byte, first bit highest.
fn ubinary(values: &[f32]) -> Vec<u8> {
    values
        .chunks(8)
        .map(|bits| {
            bits.iter()
                .enumerate()
                .fold(0u8, |byte, (i, v)| if *v > 0.0 { byte | (0x80 >> i) } else { byte })
        })
        .collect()
}

/// `POST /v2/embed`: the answer and the tokens embedded, or why Cohere would refuse it.
fn embed(request: &Value, id: &str, with_usage: bool) -> Result<(Embedded, u64), String> {
    let model = match request["model"].as_str() {
        Some(m) if !m.is_empty() => m,
        _ => return Err("invalid request: model must be specified.".into()),
    };
    let texts: Vec<String> = match request["texts"].as_array() {
        Some(texts) if !texts.is_empty() && texts.len() <= MAX_TEXTS => texts
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or("invalid request: texts must be a list of strings.")?,
        _ => {
            return Err(format!(
                "invalid request: texts must contain between 1 and {MAX_TEXTS} texts."
            ))
        }
    };
    match request["input_type"].as_str() {
        Some("search_document" | "search_query" | "classification" | "clustering") => {}
        _ => {
            return Err(
                "invalid request: valid input_type must be provided with the provided model (one of \
                 'search_document', 'search_query', 'classification', 'clustering')."
                    .into(),
            )
        }
    }
    let native = embedding_dimensions(model);
    let dims = match &request["output_dimension"] {
        Value::Null => native,
        v => match v.as_u64() {
            Some(d) if model.starts_with("embed-v4") && [256, 512, 1024, 1536].contains(&d) => d as usize,
            _ => {
                return Err(format!(
                    "invalid request: output_dimension {v} is not supported for model {model}."
                ))
            }
        },
    };
    let types: Vec<&str> = match &request["embedding_types"] {
        Value::Null => vec!["float"],
        Value::Array(types) => types.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.is_empty() {
        return Err("invalid request: embedding_types must be a non-empty list.".into());
    }
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| vector(t, dims)).collect();
    let mut by_type = ByType::default();
    for kind in types {
        match kind {
            "float" => by_type.float = Some(vectors.clone()),
            "int8" => by_type.int8 = Some(vectors.iter().map(|v| int8(v)).collect()),
            "uint8" => {
                by_type.uint8 = Some(
                    vectors
                        .iter()
                        .map(|v| int8(v).into_iter().map(|x| (i16::from(x) + 128) as u8).collect())
                        .collect(),
                );
            }
            "binary" => {
                by_type.binary = Some(
                    vectors
                        .iter()
                        .map(|v| ubinary(v).into_iter().map(|b| i16::from(b) - 128).collect())
                        .collect(),
                );
            }
            "ubinary" => by_type.ubinary = Some(vectors.iter().map(|v| ubinary(v)).collect()),
            "base64" => by_type.base64 = Some(vectors.iter().map(|v| base64_floats(v)).collect()),
            other => {
                return Err(format!(
                    "invalid request: embedding_types contains '{other}'; valid types are 'float', 'int8', \
                     'uint8', 'binary', 'ubinary', 'base64'."
                ))
            }
        }
    }
    let tokens = texts.iter().map(|t| count_text(model, t)).sum();
    let mut meta = json!({"api_version": {"version": "2"}});
    if with_usage {
        meta["billed_units"] = json!({"input_tokens": tokens});
    }
    Ok((
        Embedded {
            id: id.to_owned(),
            embeddings: by_type,
            texts,
            meta,
            response_type: "embeddings_by_type",
        },
        tokens,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_provider::{Behavior, MockConfig, MockProvider};
    use base64::Engine;
    use std::net::SocketAddr;

    const MODEL: &str = "command-a-03-2025";
    const KEY: &str = "co-test";

    async fn start(api_key: Option<&str>) -> MockProvider {
        let config = MockConfig {
            api_key: api_key.map(str::to_owned),
            behavior: Behavior::default(),
            ..MockConfig::default()
        };
        MockProvider::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap()
    }

    async fn post(mock: &MockProvider, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}{path}", mock.addr()))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn ask(extra: Value) -> Value {
        let mut request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    }

    /// Each SSE event of a body: its `event:` name and its `data:` lines joined, parsed.
    fn parse_events(body: &str) -> Vec<(String, Value)> {
        body.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default();
                let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                let data: Value = serde_json::from_str(&data.join("\n")).unwrap();
                assert_eq!(data["type"], name, "the event's name is its data's type");
                (name.to_owned(), data)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_text_answer_with_usage() {
        let mock = start(Some(KEY)).await;
        let resp = post(
            &mock,
            "/v2/chat",
            ask(json!({"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let trace = resp.headers()["x-debug-trace-id"].to_str().unwrap().to_owned();
        assert_eq!(trace.len(), 32);
        assert!(resp.headers().get("x-ratelimit-remaining-requests").is_none());
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with("{\"id\":\""), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["id"].as_str().unwrap().replace('-', ""), trace);
        let text = v["message"]["content"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("Echo: hi The quick"), "{text}");
        let input = count_chat_prompt(
            MODEL,
            &[
                ChatMessage {
                    role: "system".into(),
                    text: "Be brief.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    text: "hi".into(),
                },
            ],
        );
        let output = count_text(MODEL, text);
        let counts = json!({"input_tokens": input, "output_tokens": output});
        assert_eq!(
            v,
            json!({"id": v["id"], "finish_reason": "COMPLETE",
                "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
                "usage": {"billed_units": counts, "tokens": counts}})
        );

        let v: Value = post(&mock, "/v2/chat", ask(json!({"stop_sequences": [" fox"]})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["finish_reason"], "STOP_SEQUENCE");
        assert_eq!(v["message"]["content"][0]["text"], "Echo: hi The quick brown");
        let v: Value = post(&mock, "/v2/chat", ask(json!({"max_tokens": 2})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["finish_reason"], "MAX_TOKENS");
        assert_eq!(v["usage"]["billed_units"]["output_tokens"], 2);
    }

    #[tokio::test]
    async fn a_streamed_answer_reassembles() {
        let mock = start(Some(KEY)).await;
        let resp = post(&mock, "/v2/chat", ask(json!({"stream": true}))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.text().await.unwrap();
        assert!(body.starts_with("event: message-start\ndata: {\"id\":\""), "{body}");
        let events = parse_events(&body);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec!["message-start", "content-start"];
        expected.extend(std::iter::repeat_n("content-delta", 8));
        expected.extend(["content-end", "message-end"]);
        assert_eq!(names, expected);
        assert_eq!(
            events[0].1["delta"]["message"],
            json!({"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []})
        );
        let text: String = events[2..10]
            .iter()
            .map(|(_, e)| e["delta"]["message"]["content"]["text"].as_str().unwrap())
            .collect();
        let whole: Value = post(&mock, "/v2/chat", ask(json!({}))).await.json().await.unwrap();
        assert_eq!(text, whole["message"]["content"][0]["text"].as_str().unwrap());
        assert_eq!(
            events[11].1,
            json!({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": whole["usage"]}})
        );
    }

    #[tokio::test]
    async fn a_tool_call_streams_in_tool_call_events() {
        let mock = start(None).await;
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "The forecast.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"]}}}]);
        let v: Value = post(
            &mock,
            "/v2/chat",
            ask(json!({"tools": tools, "tool_choice": "REQUIRED"})),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(v["finish_reason"], "TOOL_CALL");
        let call = &v["message"]["tool_calls"][0];
        let id = call["id"].as_str().unwrap();
        assert!(id.starts_with("get_weather_") && id.len() == 24, "{id}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris", "days": 1}));

        let body = post(&mock, "/v2/chat", ask(json!({"tools": tools, "stream": true})))
            .await
            .text()
            .await
            .unwrap();
        let events = parse_events(&body);
        let n = events.len();
        assert_eq!(events[1].0, "tool-call-start");
        let start = &events[1].1["delta"]["message"]["tool_calls"];
        assert_eq!(start["function"], json!({"name": "get_weather", "arguments": ""}));
        assert!(start["id"].as_str().unwrap().starts_with("get_weather_"));
        let arguments: String = events[2..n - 2]
            .iter()
            .map(|(name, e)| {
                assert_eq!(name, "tool-call-delta");
                e["delta"]["message"]["tool_calls"]["function"]["arguments"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), args);
        assert_eq!(events[n - 2].1, json!({"type": "tool-call-end", "index": 0}));
        assert_eq!(events[n - 1].1["delta"]["finish_reason"], "TOOL_CALL");

        // NONE answers in text.
        let v: Value = post(&mock, "/v2/chat", ask(json!({"tools": tools, "tool_choice": "NONE"})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["finish_reason"], "COMPLETE");
    }

    #[tokio::test]
    async fn the_key_is_a_bearer_token() {
        let mock = start(Some(KEY)).await;
        let client = reqwest::Client::new();
        let url = format!("http://{}/v2/chat", mock.addr());
        let resp = client.post(&url).json(&ask(json!({}))).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"message": "no api key supplied"})
        );
        let resp = client
            .post(&url)
            .bearer_auth("wrong")
            .json(&ask(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"message": "invalid api token"})
        );
        assert_eq!(post(&mock, "/v2/chat", ask(json!({}))).await.status(), 200);
    }

    #[tokio::test]
    async fn failures_have_cohere_bodies() {
        let mock = start(None).await;
        for status in [400, 429, 500, 503] {
            let resp = post(&mock, "/v2/chat", ask(json!({"mock": {"fail_status": status}}))).await;
            assert_eq!(resp.status(), status);
            let trace = resp.headers()["x-debug-trace-id"].to_str().unwrap().to_owned();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["id"].as_str().unwrap().replace('-', ""), trace);
            assert!(v["message"].as_str().unwrap().len() > 5, "{v}");
        }
        let resp = post(&mock, "/v2/chat", json!({"model": MODEL, "messages": []})).await;
        assert_eq!(resp.status(), 400);
        let resp = post(&mock, "/v2/chat", ask(json!({"tool_choice": "REQUIRED"}))).await;
        assert_eq!(resp.status(), 400, "no tools to require");

        let body = post(
            &mock,
            "/v2/chat",
            ask(json!({"stream": true, "mock": {"stream_error_after": 1}})),
        )
        .await
        .text()
        .await
        .unwrap();
        let events = parse_events(&body);
        assert_eq!(events.len(), 4, "{body}");
        assert_eq!(
            events[3].1,
            json!({"type": "message-end", "delta": {"error": "internal server error", "finish_reason": "ERROR"}})
        );
    }

    #[tokio::test]
    async fn embed_answers_each_type() {
        let mock = start(Some(KEY)).await;
        let resp = post(
            &mock,
            "/v2/embed",
            json!({"model": "embed-english-v3.0", "texts": ["hello", "goodbye"], "input_type": "search_document",
                "embedding_types": ["float", "int8", "ubinary", "base64"]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let floats = v["embeddings"]["float"].as_array().unwrap();
        assert_eq!(floats.len(), 2);
        let first: Vec<f32> = floats[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(first, vector("hello", 1024));
        assert_eq!(v["embeddings"]["int8"][0].as_array().unwrap().len(), 1024);
        assert_eq!(v["embeddings"]["ubinary"][0].as_array().unwrap().len(), 128);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["embeddings"]["base64"][1].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(decoded, vector("goodbye", 1024));
        assert_eq!(v["texts"], json!(["hello", "goodbye"]));
        let tokens = count_text("embed-english-v3.0", "hello") + count_text("embed-english-v3.0", "goodbye");
        assert_eq!(v["meta"]["billed_units"]["input_tokens"], tokens);

        let resp = post(
            &mock,
            "/v2/embed",
            json!({"model": "embed-english-v3.0", "texts": ["hello"]}),
        )
        .await;
        assert_eq!(resp.status(), 400, "input_type is required");
    }
}
