//! OpenAI chat completions on the wire: the JSON bodies and SSE chunks the real API sends.
//!
//! Shapes follow the API reference (chat completion object, chat completion chunk object): every
//! chunk repeats `id`, `object`, `created`, `model`, `system_fingerprint`; the first delta carries
//! the role, the last one `finish_reason`; with `stream_options.include_usage` every chunk has
//! `"usage":null` and one extra chunk with empty `choices` carries the usage; `data: [DONE]` ends.

use super::answer::{token_bytes, Choice, Output};
use super::{Event, Faults, Limits, LIMIT_REQUESTS, LIMIT_TOKENS};
use serde_json::{json, Value};

/// One completion being produced.
pub struct Completion<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [Choice],
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `Some(top_logprobs)` when the request asked for `logprobs`.
    pub logprobs: Option<usize>,
    /// Pretty-print bodies and events (multi-line `data:`), as some providers do.
    pub pretty: bool,
}

const FINGERPRINT: &str = "fp_k0m1l10n";

/// Alternatives offered in `top_logprobs` after the chosen token.
const ALTERNATIVES: [&str; 21] = [
    " the", " a", ",", ".", " and", " of", " to", " in", " is", " that", " it", " for", " on", " with", " as", " was",
    " at", " by", " an", " be", " this",
];

impl Completion<'_> {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    }

    /// The non-streamed `chat.completion` object (without `usage` when `with_usage` is false).
    pub fn body(&self, with_usage: bool) -> Vec<u8> {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| {
                let message = match &choice.output {
                    Output::Text(pieces) => {
                        json!({"role": "assistant", "content": pieces.concat(), "refusal": null, "annotations": []})
                    }
                    Output::ToolCall { id, name, arguments } => json!({
                        "role": "assistant",
                        "content": null,
                        "tool_calls": [{
                            "id": id, "type": "function",
                            "function": {"name": name, "arguments": arguments.concat()}
                        }],
                        "refusal": null,
                        "annotations": []
                    }),
                };
                let logprobs = match &choice.output {
                    Output::Text(pieces) => self.logprobs(&pieces.concat(), 0),
                    Output::ToolCall { .. } => Value::Null,
                };
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason})
            })
            .collect();
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        });
        if !with_usage {
            if let Some(o) = v.as_object_mut() {
                o.shift_remove("usage");
            }
        }
        to_json(&v, self.pretty)
    }

    /// `logprobs` of a choice for `text`, its tokens numbered from `first` (the tokens of the
    /// choice before it), or null when the request did not ask.
    fn logprobs(&self, text: &str, first: usize) -> Value {
        let Some(top) = self.logprobs else {
            return Value::Null;
        };
        let content: Vec<Value> = token_bytes(self.model, text)
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| {
                let token = String::from_utf8_lossy(&bytes).into_owned();
                // Made up, but shaped like the real thing: negative, and varying by position.
                let logprob = -0.125 * ((first + i) % 8 + 1) as f64;
                let alternatives = ALTERNATIVES.iter().filter(|a| **a != token).take(top.saturating_sub(1));
                let mut top_logprobs = Vec::with_capacity(top);
                if top > 0 {
                    top_logprobs.push(json!({"token": token, "logprob": logprob, "bytes": bytes}));
                }
                for (j, alt) in alternatives.enumerate() {
                    top_logprobs
                        .push(json!({"token": alt, "logprob": logprob - 1.0 - j as f64, "bytes": alt.as_bytes()}));
                }
                json!({"token": token, "logprob": logprob, "bytes": bytes, "top_logprobs": top_logprobs})
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    fn chunk(&self, choices: Value, with_usage_field: bool) -> Vec<u8> {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if with_usage_field {
            v["usage"] = Value::Null;
        }
        sse_data(&v, self.pretty)
    }

    /// One choice's events: the role (and a tool call's id and name), each piece of output,
    /// the finish reason.
    fn choice_events(&self, index: usize, choice: &Choice, include_usage: bool) -> Vec<Event> {
        let event = |delta: Value, logprobs: Value, finish: Value, content: bool| Event {
            bytes: self.chunk(
                json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]),
                include_usage,
            ),
            content,
        };
        let mut out = Vec::new();
        match &choice.output {
            Output::Text(pieces) => {
                out.push(event(
                    json!({"role": "assistant", "content": "", "refusal": null}),
                    Value::Null,
                    Value::Null,
                    false,
                ));
                let mut tokens_before = 0;
                for piece in pieces {
                    let logprobs = self.logprobs(piece, tokens_before);
                    tokens_before += logprobs["content"].as_array().map_or(0, Vec::len);
                    out.push(event(json!({"content": piece}), logprobs, Value::Null, true));
                }
            }
            Output::ToolCall { id, name, arguments } => {
                let call =
                    json!([{"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]);
                out.push(event(
                    json!({"role": "assistant", "content": null, "tool_calls": call, "refusal": null}),
                    Value::Null,
                    Value::Null,
                    false,
                ));
                for piece in arguments {
                    let call = json!([{"index": 0, "function": {"arguments": piece}}]);
                    out.push(event(json!({"tool_calls": call}), Value::Null, Value::Null, true));
                }
            }
        }
        out.push(event(json!({}), Value::Null, json!(choice.finish_reason), false));
        out
    }

    /// Every SSE event of the streamed answer, in order, `[DONE]` included. With several
    /// choices, their events take turns, each in its own chunk, as OpenAI interleaves them.
    pub fn events(&self, include_usage: bool) -> Vec<Event> {
        let mut per_choice: Vec<std::vec::IntoIter<Event>> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| self.choice_events(i, c, include_usage).into_iter())
            .collect();
        let mut out = Vec::new();
        loop {
            let before = out.len();
            out.extend(per_choice.iter_mut().filter_map(Iterator::next));
            if out.len() == before {
                break;
            }
        }
        if include_usage {
            let v = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "service_tier": "default",
                "system_fingerprint": FINGERPRINT,
                "choices": [],
                "usage": self.usage(),
            });
            out.push(Event {
                bytes: sse_data(&v, self.pretty),
                content: false,
            });
        }
        out.push(Event {
            bytes: b"data: [DONE]\n\n".to_vec(),
            content: false,
        });
        out
    }
}

pub(super) fn to_json(v: &Value, pretty: bool) -> Vec<u8> {
    let out = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    };
    out.unwrap_or_default()
}

/// An SSE event carrying `v`; pretty JSON spans lines, and each line gets its own `data: `, as
/// the SSE spec requires (a client joins them with newlines).
pub(super) fn sse_data(v: &Value, pretty: bool) -> Vec<u8> {
    let json = to_json(v, pretty);
    let mut out = Vec::with_capacity(json.len() + 16);
    for line in json.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// The stream faults as OpenAI would send them: a chunk cut off mid-JSON, and the error object
/// it sends in the stream when it fails after its 200.
pub(super) const FAULTS: Faults = Faults {
    malformed: b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [\n\n",
    error: b"data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\",\"code\":null}}\n\n",
};

/// The headers OpenAI sends with every answer: the request's id, the time spent, and the rate
/// limits left (and when to retry, on a 429).
pub(super) fn headers(request_id: &str, processing_ms: u128, limits: &Limits) -> String {
    let mut out = format!(
        "x-request-id: {request_id}\r\nopenai-processing-ms: {processing_ms}\r\n\
         x-ratelimit-limit-requests: {LIMIT_REQUESTS}\r\nx-ratelimit-limit-tokens: {LIMIT_TOKENS}\r\n\
         x-ratelimit-remaining-requests: {}\r\nx-ratelimit-remaining-tokens: {}\r\n\
         x-ratelimit-reset-requests: {}\r\nx-ratelimit-reset-tokens: {}\r\n",
        limits.remaining_requests,
        limits.remaining_tokens,
        duration_text(limits.reset_requests_ms),
        duration_text(limits.reset_tokens_ms),
    );
    if limits.limited {
        out.push_str("retry-after: 1\r\nretry-after-ms: 1000\r\n");
    }
    out
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `6ms`, `1s`, `1.5s`.
fn duration_text(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms as f64 / 1_000.0)
    }
}

/// An error body as OpenAI sends it for this status.
pub fn error_body(status: u16, pretty: bool) -> Vec<u8> {
    let (message, kind, code) = match status {
        400 => ("Invalid request.", "invalid_request_error", Value::Null),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            json!("invalid_api_key"),
        ),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            json!("model_not_found"),
        ),
        429 => (
            "Rate limit reached for requests. Please try again in 1s.",
            "requests",
            json!("rate_limit_exceeded"),
        ),
        503 => (
            "The engine is currently overloaded, please try again later.",
            "server_error",
            Value::Null,
        ),
        _ => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            Value::Null,
        ),
    };
    to_json(
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        pretty,
    )
}

/// OpenAI's 400 for a request it refuses: which field (`param`) and why.
pub fn invalid_request(message: &str, param: &str, pretty: bool) -> Vec<u8> {
    to_json(
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
        pretty,
    )
}

/// `GET /v1/models`.
pub fn models_body(models: &[String], created: u64, pretty: bool) -> Vec<u8> {
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "system"}))
        .collect();
    to_json(&json!({"object": "list", "data": data}), pretty)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(pieces: &[&str]) -> Choice {
        Choice {
            output: Output::Text(pieces.iter().map(|p| p.to_string()).collect()),
            finish_reason: "stop",
            stop: None,
        }
    }

    fn completion(choices: &[Choice]) -> Completion<'_> {
        Completion {
            id: "chatcmpl-1",
            created: 1,
            model: "gpt-4o-mini",
            choices,
            prompt_tokens: 5,
            completion_tokens: 2,
            logprobs: None,
            pretty: false,
        }
    }

    /// The JSON of an event (its `data:` lines joined, as a client joins them).
    fn parse(e: &Event) -> Value {
        let text = String::from_utf8(e.bytes.clone()).unwrap();
        assert!(text.ends_with("\n\n"), "{text:?}");
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        serde_json::from_str(&data.join("\n")).unwrap()
    }

    #[test]
    fn stream_shapes_match_the_api() {
        let choices = [text(&["Hi", " there"])];
        let c = completion(&choices);
        let events = c.events(true);
        assert_eq!(events.len(), 6);
        let first = parse(&events[0]);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["usage"].is_null() && first.as_object().unwrap().contains_key("usage"));
        assert_eq!(parse(&events[3])["choices"][0]["finish_reason"], "stop");
        let usage = parse(&events[4]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(events[5].bytes, b"data: [DONE]\n\n");
        let content: Vec<bool> = events.iter().map(|e| e.content).collect();
        assert_eq!(content, [false, true, true, false, false, false]);

        let plain = c.events(false);
        assert_eq!(plain.len(), 5);
        assert!(!parse(&plain[0]).as_object().unwrap().contains_key("usage"));
        let body: Value = serde_json::from_slice(&c.body(true)).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hi there");
        let without: Value = serde_json::from_slice(&c.body(false)).unwrap();
        assert!(without.get("usage").is_none());
    }

    #[test]
    fn default_bytes_are_compact_and_stable() {
        let choices = [text(&["Hi"])];
        let c = completion(&choices);
        let events = c.events(false);
        assert_eq!(
            String::from_utf8(events[1].bytes.clone()).unwrap(),
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_k0m1l10n\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"
        );
        let body = String::from_utf8(c.body(true)).unwrap();
        assert!(
            body.starts_with("{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hi\",\"refusal\":null,\"annotations\":[]},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{"),
            "{body}"
        );
    }

    #[test]
    fn several_choices_take_turns() {
        let choices = [text(&["a", "b"]), text(&["c", "d"])];
        let c = completion(&choices);
        let events = c.events(false);
        // Two role chunks, four pieces, two finishes, [DONE].
        assert_eq!(events.len(), 9);
        let order: Vec<(u64, Value)> = events[..8]
            .iter()
            .map(parse)
            .map(|v| {
                assert_eq!(v["choices"].as_array().unwrap().len(), 1, "one choice per chunk");
                let choice = &v["choices"][0];
                (choice["index"].as_u64().unwrap(), choice["delta"]["content"].clone())
            })
            .collect();
        assert_eq!(
            order,
            [
                (0, json!("")),
                (1, json!("")),
                (0, json!("a")),
                (1, json!("c")),
                (0, json!("b")),
                (1, json!("d")),
                (0, Value::Null),
                (1, Value::Null)
            ]
        );
        let body: Value = serde_json::from_slice(&c.body(true)).unwrap();
        assert_eq!(body["choices"][1]["index"], 1);
        assert_eq!(body["choices"][1]["message"]["content"], "cd");
    }

    #[test]
    fn tool_calls_stream_as_openai_streams_them() {
        let choices = [Choice {
            output: Output::ToolCall {
                id: "call_abc".into(),
                name: "get_weather".into(),
                arguments: vec!["{\"".into(), "city".into(), "\":\"Paris\"}".into()],
            },
            finish_reason: "tool_calls",
            stop: None,
        }];
        let c = completion(&choices);
        let events = c.events(false);
        assert_eq!(events.len(), 6);
        let first = parse(&events[0]);
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}], "refusal": null})
        );
        let fragment = parse(&events[1]);
        assert_eq!(
            fragment["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]})
        );
        assert_eq!(parse(&events[4])["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(events.iter().filter(|e| e.content).count(), 3);

        let body: Value = serde_json::from_slice(&c.body(true)).unwrap();
        let message = &body["choices"][0]["message"];
        assert!(message["content"].is_null());
        assert_eq!(
            message["tool_calls"],
            json!([{"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn logprobs_describe_each_token() {
        let choices = [text(&["Hello", " world"])];
        let mut c = completion(&choices);
        c.logprobs = Some(2);
        let body: Value = serde_json::from_slice(&c.body(true)).unwrap();
        let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        assert_eq!(content[1]["token"], " world");
        assert_eq!(content[1]["bytes"], json!(b" world".to_vec()));
        assert!(content[1]["logprob"].as_f64().unwrap() < 0.0);
        let top = content[1]["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], " world", "the chosen token is the likeliest");
        assert!(top[1]["logprob"].as_f64() < top[0]["logprob"].as_f64());
        assert!(body["choices"][0]["logprobs"]["refusal"].is_null());

        // Streamed, each chunk has its own tokens, numbered on from the chunk before.
        let events = c.events(false);
        let second = parse(&events[2]);
        let streamed = &second["choices"][0]["logprobs"]["content"];
        assert_eq!(streamed, &json!([content[1]]));
        assert!(parse(&events[0])["choices"][0]["logprobs"].is_null());
    }

    #[test]
    fn pretty_output_spans_lines_with_a_data_prefix_each() {
        let choices = [text(&["Hi"])];
        let mut c = completion(&choices);
        c.pretty = true;
        let events = c.events(true);
        let raw = String::from_utf8(events[1].bytes.clone()).unwrap();
        assert!(raw.starts_with("data: {\ndata:   \"id\": \"chatcmpl-1\",\n"), "{raw}");
        assert!(raw.ends_with("\ndata: }\n\n"), "{raw}");
        assert!(raw.trim_end().lines().all(|l| l.starts_with("data: ")), "{raw}");
        assert_eq!(parse(&events[1])["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(parse(&events[3])["usage"]["total_tokens"], 7);
        assert_eq!(events[4].bytes, b"data: [DONE]\n\n");
        let body = String::from_utf8(c.body(true)).unwrap();
        assert!(body.starts_with("{\n  \"id\": \"chatcmpl-1\",\n"), "{body}");
        let error = String::from_utf8(error_body(429, true)).unwrap();
        assert!(error.contains("\"code\": \"rate_limit_exceeded\""), "{error}");
    }
}
