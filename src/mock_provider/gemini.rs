//! Google's Gemini API (`generativelanguage`, v1beta) on the wire: `POST
//! /v1beta/models/{model}:generateContent`, `:streamGenerateContent` (`?alt=sse`, or without it
//! the JSON array Google streams), `:countTokens`, `:embedContent` and `:batchEmbedContents`.
//!
//! The request (`contents`, `systemInstruction`, `tools[].functionDeclarations`, `toolConfig`,
//! `generationConfig`, `cachedContent`; Google's JSON parser takes `snake_case` names as well as
//! `camelCase`, and so does this one) is read into the OpenAI-shaped request [`answer::plan`]
//! reads; the answer is rendered as Google renders a `GenerateContentResponse`:
//!
//! - a body is pretty-printed (two spaces, a final newline), as Google's `prettyPrint=true`
//!   default does; `?prettyPrint=false` makes it compact;
//! - a stream's events are `data: <response>` lines ending in CRLF, the JSON spaced as Google
//!   spaces it (`{"candidates": [{"content": {"parts": [{"text": "Hi"}],"role": "model"},...`);
//!   every chunk carries one piece of text (a function call comes whole, in one chunk), the
//!   prompt's usage (`promptTokenCount`, `totalTokenCount`), `modelVersion` and `responseId`;
//!   the last one also `finishReason` and the full usage. There is no end marker.
//! - errors are `{"error": {"code": 429, "message": ..., "status": "RESOURCE_EXHAUSTED"}}`;
//!   the in-stream one (`stream_error_after`) is such an object as a data event (503
//!   `UNAVAILABLE`, Google's "model is overloaded"), then the stream ends.
//!
//! Google sends no request id or rate-limit headers: [`headers`] sends the ones it does send
//! (`server-timing`, `vary`, `x-frame-options`...). Tokens are counted as the OpenAI route counts
//! them (`count_chat_prompt` over the system instruction and contents; Gemini's own tokenizer is
//! not public); with `cachedContent` the whole prompt is reported read from the cache
//! (`cachedContentTokenCount`, counted inside `promptTokenCount` as Gemini counts it), since the
//! simulated provider does not know what the cache holds.

use super::answer::{self, Choice, Output};
use super::azure::query_param;
use super::embeddings::{serialize, vector};
use super::{behavior_for, write_events, write_simple, Event, Faults, Head, Keep, ReplyHeaders, State};
use crate::metering::tokens::{count_chat_prompt, count_text};
use base64::Engine;
use komilion_sdk::ChatMessage;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io;
use std::time::Duration;
use tokio::net::TcpStream;

/// What a Gemini path asks of which model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Call {
    model: String,
    method: Method,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Generate,
    StreamGenerate,
    CountTokens,
    Embed,
    BatchEmbed,
    Unknown,
}

impl Call {
    /// `/v1beta/models/{model}:{method}` (or `/v1/models/...`), or None for a path that is not
    /// Gemini's.
    pub(super) fn parse(path: &str) -> Option<Call> {
        let rest = path
            .strip_prefix("/v1beta/models/")
            .or_else(|| path.strip_prefix("/v1/models/"))?;
        let rest = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
        let (model, method) = rest.rsplit_once(':')?;
        let method = match method {
            "generateContent" => Method::Generate,
            "streamGenerateContent" => Method::StreamGenerate,
            "countTokens" => Method::CountTokens,
            "embedContent" => Method::Embed,
            "batchEmbedContents" => Method::BatchEmbed,
            _ => Method::Unknown,
        };
        Some(Call {
            model: model.to_owned(),
            method,
        })
    }
}

/// How a body is printed: Google pretty-prints unless the query says `prettyPrint=false`.
#[derive(Debug, Clone, Copy)]
struct Print {
    pretty: bool,
}

impl Print {
    fn json(self, v: &Value) -> Vec<u8> {
        self.bytes(v)
    }

    fn bytes<T: Serialize>(self, v: &T) -> Vec<u8> {
        let mut out = serialize(v, self.pretty);
        if self.pretty {
            out.push(b'\n');
        }
        out
    }
}

const JSON: &str = "application/json; charset=UTF-8";

/// The stream head of `alt=sse`, and of the JSON array streamed without it.
const SSE_HEAD: &str = "content-type: text/event-stream\r\ncontent-disposition: attachment\r\n";
const ARRAY_HEAD: &str = "content-type: application/json; charset=UTF-8\r\ncontent-disposition: attachment\r\n";

/// Google's message when a model is overloaded: the in-stream error.
const OVERLOADED: &str = "The model is overloaded. Please try again later.";

/// The stream faults of `alt=sse`: an event cut off mid-JSON, and the error Google sends in the
/// stream when it fails after its 200.
const SSE_FAULTS: Faults = Faults {
    malformed: b"data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \r\n\r\n",
    error: b"data: {\"error\": {\"code\": 503,\"message\": \"The model is overloaded. Please try again later.\",\"status\": \"UNAVAILABLE\"}}\r\n\r\n",
};

/// The same in the JSON array stream (the error closes the array).
const ARRAY_FAULTS: Faults = Faults {
    malformed: b"\n,\r\n{\n  \"candidates\": [\n    {\n      \"content\": {\n",
    error: b"\n,\r\n{\n  \"error\": {\n    \"code\": 503,\n    \"message\": \"The model is overloaded. Please try again later.\",\n    \"status\": \"UNAVAILABLE\"\n  }\n}\n]",
};

/// A request to a Gemini path.
pub(super) async fn serve(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    call: Call,
    mut headers: ReplyHeaders,
) -> io::Result<Keep> {
    let query = head.path.split_once('?').map_or("", |(_, q)| q);
    let pretty_print = query_param(query, "prettyPrint").as_deref() != Some("false");
    // Until the body is read, only the instance default and the header apply.
    let pretty = behavior_for(state, head, &Value::Null).map_or(state.config.behavior.pretty, |b| b.pretty);
    let print = Print {
        pretty: pretty_print || pretty,
    };
    if let Some(key) = &state.config.api_key {
        let presented = head
            .header("x-goog-api-key")
            .map(str::to_owned)
            .or_else(|| query_param(query, "key"));
        match presented {
            None => return refuse(stream, 403, Some(UNREGISTERED), &call.model, &headers, print).await,
            Some(k) if k != *key => {
                let body = print.json(&invalid_key());
                return write_simple(stream, 400, JSON, &body, &headers).await;
            }
            Some(_) => {}
        }
    }
    if call.method == Method::Unknown {
        let message = "The requested method is not supported by this model.";
        return refuse(stream, 404, Some(message), &call.model, &headers, print).await;
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        let message = "Invalid JSON payload received. Unexpected token.";
        return refuse(stream, 400, Some(message), &call.model, &headers, print).await;
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(message) => return refuse(stream, 400, Some(&message), &call.model, &headers, print).await,
    };
    let print = Print {
        pretty: pretty_print || behavior.pretty,
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        return refuse(stream, status, None, &call.model, &headers, print).await;
    }
    match call.method {
        Method::Embed | Method::BatchEmbed => {
            let (answer, tokens) = match embed(&request, &call) {
                Ok(answer) => answer,
                Err(message) => return refuse(stream, 400, Some(&message), &call.model, &headers, print).await,
            };
            headers.tokens = tokens;
            let body = print.bytes(&answer);
            return write_simple(stream, 200, JSON, &body, &headers).await;
        }
        Method::CountTokens => {
            // Either the contents alone, or a whole `generateContentRequest`.
            let inner = get(&request, "generateContentRequest", "generate_content_request");
            let prompt = match Prompt::read(if inner.is_null() { &request } else { inner }, &call.model) {
                Ok(p) => p,
                Err(message) => return refuse(stream, 400, Some(&message), &call.model, &headers, print).await,
            };
            let mut v = json!({"totalTokens": prompt.tokens});
            if prompt.cached {
                v["cachedContentTokenCount"] = json!(prompt.tokens);
            }
            v["promptTokensDetails"] = json!([{"modality": "TEXT", "tokenCount": prompt.tokens}]);
            return write_simple(stream, 200, JSON, &print.json(&v), &headers).await;
        }
        _ => {}
    }

    let prompt = match Prompt::read(&request, &call.model) {
        Ok(p) => p,
        Err(message) => return refuse(stream, 400, Some(&message), &call.model, &headers, print).await,
    };
    let plan = match answer::plan(&prompt.plan, &call.model, behavior.chunks) {
        Ok(plan) => plan,
        Err(e) => return refuse(stream, 400, Some(&e.to_string()), &call.model, &headers, print).await,
    };
    headers.tokens = prompt.tokens + plan.completion_tokens;
    let response_id = headers.request_id.clone();
    let reply = Reply {
        model: &call.model,
        response_id: &response_id,
        choices: &plan.choices,
        usage: (!behavior.omit_usage).then_some(Usage {
            prompt: prompt.tokens,
            candidates: plan.completion_tokens,
            cached: prompt.cached,
        }),
    };
    match (call.method, query_param(query, "alt").as_deref()) {
        (Method::StreamGenerate, Some("sse")) => {
            let events = reply.sse_events(behavior.pretty);
            write_events(stream, &headers, SSE_HEAD, &events, &behavior, &SSE_FAULTS).await
        }
        (Method::StreamGenerate, _) => {
            let events = reply.array_events();
            write_events(stream, &headers, ARRAY_HEAD, &events, &behavior, &ARRAY_FAULTS).await
        }
        _ => write_simple(stream, 200, JSON, &print.json(&reply.body()), &headers).await,
    }
}

/// Google's message for a request without a key.
const UNREGISTERED: &str = "Method doesn't allow unregistered callers (callers without established identity). \
                            Please use API Key or other form of API consumer identity to call this API.";

/// Answer with Google's error for `status` (its standard message unless given one).
async fn refuse(
    stream: &mut TcpStream,
    status: u16,
    message: Option<&str>,
    model: &str,
    headers: &ReplyHeaders,
    print: Print,
) -> io::Result<Keep> {
    let body = print.json(&error_body(status, message, model));
    write_simple(stream, status, JSON, &body, headers).await
}

/// The canonical status Google names for an HTTP status.
fn status_name(status: u16) -> &'static str {
    match status {
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        // 400, and the 4XX codes Google maps no status of its own to.
        400..=499 => "INVALID_ARGUMENT",
        _ => "INTERNAL",
    }
}

/// Google's error body for `status`: its standard message unless given one, and for a 429 when
/// to retry (`RetryInfo`).
pub fn error_body(status: u16, message: Option<&str>, model: &str) -> Value {
    let standard = match status {
        400 => "Request contains an invalid argument.".to_owned(),
        401 => "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other \
                valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
            .to_owned(),
        403 => "The caller does not have permission".to_owned(),
        404 => format!(
            "models/{model} is not found for API version v1beta, or is not supported for generateContent. Call \
             ListModels to see the list of available models and their supported methods."
        ),
        429 => "You exceeded your current quota, please check your plan and billing details. For more information on \
                this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
            .to_owned(),
        503 => OVERLOADED.to_owned(),
        504 => "Deadline expired before operation could complete.".to_owned(),
        _ => "An internal error has occurred. Please retry or report in \
              https://developers.generativeai.google/guide/troubleshooting"
            .to_owned(),
    };
    let mut error = json!({
        "code": status,
        "message": message.map_or(standard, str::to_owned),
        "status": status_name(status),
    });
    if status == 429 {
        error["details"] = json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]);
    }
    json!({"error": error})
}

/// Google's 400 for a key it does not know.
fn invalid_key() -> Value {
    let message = "API key not valid. Please pass a valid API key.";
    json!({"error": {
        "code": 400,
        "message": message,
        "status": "INVALID_ARGUMENT",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message}
        ]
    }})
}

/// The headers Google's front end sends with every answer (no request id, no rate limits).
pub(super) fn headers(processing_ms: u128) -> String {
    format!(
        "vary: Origin\r\nvary: X-Origin\r\nvary: Referer\r\nserver: scaffolding on HTTPServer2\r\n\
         server-timing: gfet4t7; dur={processing_ms}\r\nx-xss-protection: 0\r\nx-frame-options: SAMEORIGIN\r\n\
         x-content-type-options: nosniff\r\n"
    )
}

/// A `responseId` as Google writes them (`wzCjaPa4As7shMIP2Mei0AI`): 17 random bytes, base64url.
pub(super) fn response_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 17]>())
}

/// A member by its `camelCase` name, or its `snake_case` one (Google's parser takes both).
fn get<'a>(v: &'a Value, camel: &str, snake: &str) -> &'a Value {
    match v.get(camel) {
        Some(found) => found,
        None => &v[snake],
    }
}

/// A `generateContent` request, read for the plan and the meter.
struct Prompt {
    /// The same request in OpenAI's shape, for [`answer::plan`].
    plan: Value,
    /// Prompt tokens, as the OpenAI route counts its messages.
    tokens: u64,
    /// It names a `cachedContent`.
    cached: bool,
}

impl Prompt {
    /// Read `request` for `model`, or say why Google would refuse it.
    fn read(request: &Value, model: &str) -> Result<Prompt, String> {
        let contents = match get(request, "contents", "contents") {
            Value::Array(c) if !c.is_empty() => c,
            _ => return Err("* GenerateContentRequest.contents: contents is not specified\n".into()),
        };
        let mut messages = Vec::with_capacity(contents.len() + 1);
        let system = get(request, "systemInstruction", "system_instruction");
        if !system.is_null() {
            let parts = system["parts"].as_array().map_or(&[][..], Vec::as_slice);
            messages.push(ChatMessage {
                role: "system".into(),
                text: parts_text(parts),
            });
        }
        for (i, content) in contents.iter().enumerate() {
            let role = match content["role"].as_str() {
                None | Some("user") => "user",
                Some("model") => "assistant",
                Some(_) => return Err("Please use a valid role: user, model.".into()),
            };
            let parts = match content["parts"].as_array() {
                Some(parts) if !parts.is_empty() => parts,
                _ => {
                    return Err(format!(
                        "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
                    ))
                }
            };
            messages.push(ChatMessage {
                role: role.into(),
                text: parts_text(parts),
            });
        }

        let chat: Vec<Value> = messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.text}))
            .collect();
        let mut plan = json!({"model": model, "messages": chat});
        let config = get(request, "generationConfig", "generation_config");
        match get(config, "maxOutputTokens", "max_output_tokens") {
            Value::Null => {}
            v => match v.as_u64() {
                Some(max) if max > 0 => plan["max_tokens"] = json!(max),
                _ => {
                    return Err(format!(
                        "* GenerateContentRequest.generation_config.max_output_tokens: must be positive, got {v}\n"
                    ))
                }
            },
        }
        match get(config, "candidateCount", "candidate_count") {
            Value::Null => {}
            v => match v.as_u64() {
                Some(n) if (1..=8).contains(&n) => plan["n"] = json!(n),
                _ => return Err(format!("candidateCount must be between 1 and 8, got {v}.")),
            },
        }
        let stops = get(config, "stopSequences", "stop_sequences");
        if !stops.is_null() {
            plan["stop"] = stops.clone();
        }
        if get(config, "responseMimeType", "response_mime_type") == "application/json" {
            let schema = [
                get(config, "responseJsonSchema", "response_json_schema"),
                get(config, "responseSchema", "response_schema"),
            ]
            .into_iter()
            .find(|s| !s.is_null());
            plan["response_format"] = match schema {
                Some(schema) => {
                    json!({"type": "json_schema", "json_schema": {"name": "response", "schema": lowercase_types(schema)}})
                }
                None => json!({"type": "json_object"}),
            };
        }

        let functions: Vec<Value> = get(request, "tools", "tools")
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|tool| {
                get(tool, "functionDeclarations", "function_declarations")
                    .as_array()
                    .into_iter()
                    .flatten()
            })
            .filter_map(|f| {
                let name = f["name"].as_str()?;
                let parameters = [
                    get(f, "parametersJsonSchema", "parameters_json_schema"),
                    &f["parameters"],
                ]
                .into_iter()
                .find(|p| !p.is_null())
                .map_or_else(|| json!({"type": "object", "properties": {}}), lowercase_types);
                Some(json!({"type": "function", "function": {"name": name, "parameters": parameters}}))
            })
            .collect();
        if !functions.is_empty() {
            plan["tools"] = Value::Array(functions);
        }
        let calling = get(
            get(request, "toolConfig", "tool_config"),
            "functionCallingConfig",
            "function_calling_config",
        );
        match calling["mode"].as_str() {
            Some("NONE") => plan["tool_choice"] = json!("none"),
            Some("ANY") => {
                let allowed = get(calling, "allowedFunctionNames", "allowed_function_names");
                plan["tool_choice"] = match allowed.as_array().and_then(|names| names.first()) {
                    Some(name) => json!({"type": "function", "function": {"name": name}}),
                    None => json!("required"),
                };
            }
            // `AUTO` (the default) and `VALIDATED`: the model may call, and here it does.
            _ => {}
        }
        let cached = get(request, "cachedContent", "cached_content")
            .as_str()
            .is_some_and(|name| !name.is_empty());
        Ok(Prompt {
            plan,
            tokens: count_chat_prompt(model, &messages),
            cached,
        })
    }
}

/// The text of a content's parts, joined with newlines as the OpenAI route joins text parts: the
/// text parts, and a function response's JSON. Inline data, files and function calls add none,
/// as the OpenAI route counts no images or calls.
fn parts_text(parts: &[Value]) -> String {
    parts
        .iter()
        .filter_map(|p| match p["text"].as_str() {
            Some(text) => Some(text.to_owned()),
            None => {
                let response = get(p, "functionResponse", "function_response");
                (!response.is_null()).then(|| response["response"].to_string())
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A Gemini schema (OpenAPI's subset, types in capitals: `OBJECT`, `STRING`) in JSON Schema's
/// spelling, for the planner.
fn lowercase_types(schema: &Value) -> Value {
    match schema {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("type", Value::String(t)) => Value::String(t.to_ascii_lowercase()),
                        ("type", Value::Array(types)) => Value::Array(
                            types
                                .iter()
                                .map(|t| t.as_str().map_or_else(|| t.clone(), |t| json!(t.to_ascii_lowercase())))
                                .collect(),
                        ),
                        // Property names are not types, whatever they are called.
                        ("properties", Value::Object(props)) => Value::Object(
                            props
                                .iter()
                                .map(|(name, s)| (name.clone(), lowercase_types(s)))
                                .collect(),
                        ),
                        _ => lowercase_types(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(lowercase_types).collect()),
        other => other.clone(),
    }
}

/// Tokens of one answer as Gemini reports them.
#[derive(Debug, Clone, Copy)]
struct Usage {
    prompt: u64,
    candidates: u64,
    cached: bool,
}

impl Usage {
    /// `usageMetadata`: `whole` once the answer is done, else the prompt's part only (what a
    /// stream's earlier chunks carry). Members in Google's order (the proto's field numbers).
    fn json(&self, whole: bool) -> Value {
        let mut u = Map::new();
        u.insert("promptTokenCount".into(), json!(self.prompt));
        if whole {
            u.insert("candidatesTokenCount".into(), json!(self.candidates));
        }
        let total = if whole {
            self.prompt + self.candidates
        } else {
            self.prompt
        };
        u.insert("totalTokenCount".into(), json!(total));
        if self.cached {
            u.insert("cachedContentTokenCount".into(), json!(self.prompt));
        }
        let text = |n: u64| json!([{"modality": "TEXT", "tokenCount": n}]);
        u.insert("promptTokensDetails".into(), text(self.prompt));
        if self.cached {
            u.insert("cacheTokensDetails".into(), text(self.prompt));
        }
        if whole {
            u.insert("candidatesTokensDetails".into(), text(self.candidates));
        }
        Value::Object(u)
    }
}

/// One answer being produced.
struct Reply<'a> {
    model: &'a str,
    response_id: &'a str,
    choices: &'a [Choice],
    /// None when the behaviour omits usage.
    usage: Option<Usage>,
}

fn finish_reason(choice: &Choice) -> &'static str {
    match choice.finish_reason {
        "length" => "MAX_TOKENS",
        // A stop sequence and a function call end with `STOP` too.
        _ => "STOP",
    }
}

/// A `functionCall` part: the arguments whole, as an object (`{}` if `max_tokens` cut them).
fn function_call(name: &str, arguments: &[String]) -> Value {
    let args = serde_json::from_str::<Value>(&arguments.concat())
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({"functionCall": {"name": name, "args": args}})
}

/// A candidate: its parts, its finish reason once it is done, its index.
fn candidate(parts: Value, finish: Option<&str>, index: usize) -> Value {
    let mut c = json!({"content": {"parts": parts, "role": "model"}});
    if let Some(finish) = finish {
        c["finishReason"] = json!(finish);
    }
    c["index"] = json!(index);
    c
}

impl Reply<'_> {
    /// A `GenerateContentResponse` with these candidates, and the usage so far.
    fn response(&self, candidates: Vec<Value>, whole: bool) -> Value {
        let mut v = json!({"candidates": candidates});
        if let Some(usage) = &self.usage {
            v["usageMetadata"] = usage.json(whole);
        }
        v["modelVersion"] = json!(self.model);
        v["responseId"] = json!(self.response_id);
        v
    }

    /// The non-streamed answer.
    fn body(&self) -> Value {
        let candidates = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, choice)| {
                let part = match &choice.output {
                    Output::Text(pieces) => json!({"text": pieces.concat()}),
                    Output::ToolCall { name, arguments, .. } => function_call(name, arguments),
                };
                candidate(json!([part]), Some(finish_reason(choice)), i)
            })
            .collect();
        self.response(candidates, true)
    }

    /// The streamed chunks, in order, each with whether it carries output: one piece of one
    /// candidate each (the candidates taking turns), the last of each candidate with its finish
    /// reason, the very last with the whole usage.
    fn chunks(&self) -> Vec<(Value, bool)> {
        let mut per_candidate: Vec<std::vec::IntoIter<(Value, bool)>> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, choice)| {
                let finish = finish_reason(choice);
                let chunks = match &choice.output {
                    Output::Text(pieces) if pieces.is_empty() => {
                        vec![(candidate(json!([{"text": ""}]), Some(finish), i), false)]
                    }
                    Output::Text(pieces) => pieces
                        .iter()
                        .enumerate()
                        .map(|(j, piece)| {
                            let last = j + 1 == pieces.len();
                            (candidate(json!([{"text": piece}]), last.then_some(finish), i), true)
                        })
                        .collect(),
                    Output::ToolCall { name, arguments, .. } => {
                        vec![(
                            candidate(json!([function_call(name, arguments)]), Some(finish), i),
                            true,
                        )]
                    }
                };
                chunks.into_iter()
            })
            .collect();
        let mut turns = Vec::new();
        loop {
            let before = turns.len();
            turns.extend(per_candidate.iter_mut().filter_map(Iterator::next));
            if turns.len() == before {
                break;
            }
        }
        let last = turns.len().saturating_sub(1);
        turns
            .into_iter()
            .enumerate()
            .map(|(k, (candidate, content))| (self.response(vec![candidate], k == last), content))
            .collect()
    }

    /// The `alt=sse` events: `data: ` and the chunk, CRLF line endings (a pretty chunk's lines
    /// each with its own `data: `).
    fn sse_events(&self, pretty: bool) -> Vec<Event> {
        self.chunks()
            .into_iter()
            .map(|(v, content)| {
                let mut bytes = Vec::new();
                if pretty {
                    let json = serde_json::to_vec_pretty(&v).unwrap_or_default();
                    for line in json.split(|&b| b == b'\n') {
                        bytes.extend_from_slice(b"data: ");
                        bytes.extend_from_slice(line);
                        bytes.extend_from_slice(b"\r\n");
                    }
                } else {
                    bytes.extend_from_slice(b"data: ");
                    google_compact(&v, &mut bytes);
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"\r\n");
                Event { bytes, content }
            })
            .collect()
    }

    /// The stream without `alt=sse`: one JSON array, its pretty-printed elements sent as they
    /// come.
    fn array_events(&self) -> Vec<Event> {
        let mut out: Vec<Event> = self
            .chunks()
            .into_iter()
            .enumerate()
            .map(|(k, (v, content))| {
                let mut bytes = if k == 0 { b"[".to_vec() } else { b"\n,\r\n".to_vec() };
                bytes.extend(serde_json::to_vec_pretty(&v).unwrap_or_default());
                Event { bytes, content }
            })
            .collect();
        out.push(Event {
            bytes: b"\n]".to_vec(),
            content: false,
        });
        out
    }
}

/// JSON as Google writes a stream's chunks: a space after each colon, none after commas, no
/// line breaks (`{"candidates": [{"content": {"parts": [{"text": "Hi"}],"role": "model"}}]}`).
fn google_compact(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(members) => {
            out.push(b'{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).unwrap_or_default());
                out.extend_from_slice(b": ");
                google_compact(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                google_compact(v, out);
            }
            out.push(b']');
        }
        other => out.extend(serde_json::to_vec(other).unwrap_or_default()),
    }
}

/// The length of a Gemini embedding model's vectors.
fn embedding_dimensions(model: &str) -> usize {
    if model.contains("gemini-embedding") {
        3072
    } else {
        768
    }
}

/// An embedding as Gemini writes it (`f32`s kept as written).
#[derive(Serialize)]
struct Values {
    values: Vec<f32>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Embedded {
    One { embedding: Values },
    Batch { embeddings: Vec<Values> },
}

/// `:embedContent` and `:batchEmbedContents`: the answer and the tokens embedded, or why Google
/// would refuse the request.
fn embed(request: &Value, call: &Call) -> Result<(Embedded, u64), String> {
    let one = |r: &Value, at: &str| -> Result<(Values, u64), String> {
        let parts = r["content"]["parts"].as_array().map_or(&[][..], Vec::as_slice);
        let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
        if texts.is_empty() {
            return Err(format!("* {at}.content.parts: contents.parts must not be empty.\n"));
        }
        let text = texts.join(" ");
        let native = embedding_dimensions(&call.model);
        let dims = match get(r, "outputDimensionality", "output_dimensionality") {
            Value::Null => native,
            v => match v.as_u64() {
                Some(d) if (1..=native as u64).contains(&d) => d as usize,
                _ => {
                    return Err(format!(
                        "* {at}.output_dimensionality: must be between 1 and {native}, got {v}\n"
                    ))
                }
            },
        };
        let tokens = count_text(&call.model, &text);
        Ok((
            Values {
                values: vector(&text, dims),
            },
            tokens,
        ))
    };
    if call.method == Method::Embed {
        let (embedding, tokens) = one(request, "EmbedContentRequest")?;
        return Ok((Embedded::One { embedding }, tokens));
    }
    let requests = match request["requests"].as_array() {
        Some(r) if !r.is_empty() && r.len() <= 100 => r,
        _ => return Err("* BatchEmbedContentsRequest.requests: between 1 and 100 requests per batch\n".into()),
    };
    let mut embeddings = Vec::with_capacity(requests.len());
    let mut tokens = 0;
    for (i, r) in requests.iter().enumerate() {
        let (values, n) = one(r, &format!("BatchEmbedContentsRequest.requests[{i}]"))?;
        embeddings.push(values);
        tokens += n;
    }
    Ok((Embedded::Batch { embeddings }, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_provider::{Behavior, MockConfig, MockProvider};
    use std::net::SocketAddr;

    const MODEL: &str = "gemini-2.0-flash";
    const KEY: &str = "AIza-test";

    async fn start(api_key: Option<&str>, behavior: Behavior) -> MockProvider {
        let config = MockConfig {
            api_key: api_key.map(str::to_owned),
            behavior,
            ..MockConfig::default()
        };
        MockProvider::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap()
    }

    /// POST `method` (with its query) for MODEL, with the test key in `x-goog-api-key`.
    async fn post(mock: &MockProvider, method: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}/v1beta/models/{MODEL}:{method}", mock.addr()))
            .header("x-goog-api-key", KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn ask(extra: Value) -> Value {
        let mut request = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    }

    fn chat(messages: &[(&str, &str)]) -> Vec<ChatMessage> {
        messages
            .iter()
            .map(|(role, text)| ChatMessage {
                role: role.to_string(),
                text: text.to_string(),
            })
            .collect()
    }

    /// The JSON of each `data:` event of an `alt=sse` body.
    fn sse(body: &str) -> Vec<Value> {
        assert!(body.ends_with("\r\n\r\n"), "{body:?}");
        body.split("\r\n\r\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data: Vec<&str> = e.split("\r\n").filter_map(|l| l.strip_prefix("data: ")).collect();
                serde_json::from_str(&data.join("\n")).unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_text_answer_with_usage_and_googles_headers() {
        let mock = start(Some(KEY), Behavior::default()).await;
        let request = ask(json!({"systemInstruction": {"parts": [{"text": "Be brief."}]}}));
        let resp = post(&mock, "generateContent", request).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json; charset=UTF-8");
        assert!(resp.headers()["server-timing"]
            .to_str()
            .unwrap()
            .starts_with("gfet4t7; dur="));
        for openai in [
            "x-request-id",
            "x-ratelimit-limit-requests",
            "openai-processing-ms",
            "request-id",
        ] {
            assert!(resp.headers().get(openai).is_none(), "{openai}");
        }
        let raw = resp.text().await.unwrap();
        assert!(
            raw.starts_with("{\n  \"candidates\": [\n    {\n      \"content\": {\n        \"parts\": [\n"),
            "{raw}"
        );
        assert!(raw.ends_with("\"\n}\n"), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let text = v["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("Echo: hi The quick"), "{text}");
        let prompt = count_chat_prompt(MODEL, &chat(&[("system", "Be brief."), ("user", "hi")]));
        let output = count_text(MODEL, text);
        let id = v["responseId"].as_str().unwrap();
        assert_eq!(id.len(), 23, "{id}");
        assert_eq!(
            v,
            json!({
                "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {
                    "promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
                    "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": output}]
                },
                "modelVersion": MODEL,
                "responseId": id
            })
        );

        // maxOutputTokens, stop sequences, prettyPrint=false, snake_case names.
        let resp = reqwest::Client::new()
            .post(format!(
                "http://{}/v1beta/models/{MODEL}:generateContent?key={KEY}&prettyPrint=false",
                mock.addr()
            ))
            .json(&ask(json!({"generation_config": {"max_output_tokens": 2}})))
            .send()
            .await
            .unwrap();
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with("{\"candidates\":[{"), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
        assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 2);
        let v: Value = post(
            &mock,
            "generateContent",
            ask(json!({"generationConfig": {"stopSequences": [" fox"]}})),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["text"],
            "Echo: hi The quick brown"
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    }

    #[tokio::test]
    async fn a_streamed_answer_reassembles() {
        let mock = start(Some(KEY), Behavior::default()).await;
        let resp = post(&mock, "streamGenerateContent?alt=sse", ask(json!({}))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let body = resp.text().await.unwrap();
        assert!(
            body.starts_with("data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Echo: hi\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": "),
            "{body}"
        );
        let chunks = sse(&body);
        assert_eq!(chunks.len(), 8, "one chunk a piece");
        let text: String = chunks
            .iter()
            .map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap())
            .collect();
        let whole: Value = post(&mock, "generateContent", ask(json!({})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            text,
            whole["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap()
        );
        let prompt = count_chat_prompt(MODEL, &chat(&[("user", "hi")]));
        for chunk in &chunks[..7] {
            assert!(chunk["candidates"][0].get("finishReason").is_none());
            assert_eq!(
                chunk["usageMetadata"],
                json!({"promptTokenCount": prompt, "totalTokenCount": prompt,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]})
            );
            assert_eq!(chunk["responseId"], chunks[0]["responseId"]);
        }
        let last = &chunks[7];
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(last["usageMetadata"], whole["usageMetadata"]);

        // Without alt=sse: one JSON array.
        let body = post(&mock, "streamGenerateContent", ask(json!({"mock": {"chunks": 3}})))
            .await
            .text()
            .await
            .unwrap();
        let array: Vec<Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(array.len(), 3);
        assert_eq!(array[2]["candidates"][0]["finishReason"], "STOP");
    }

    #[tokio::test]
    async fn a_function_call_comes_whole() {
        let mock = start(None, Behavior::default()).await;
        let tools = json!([{"functionDeclarations": [
            {"name": "get_time", "description": "Now.", "parameters": {"type": "OBJECT", "properties": {}}},
            {"name": "get_weather", "description": "The forecast.", "parameters": {"type": "OBJECT",
                "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}}, "required": ["city", "days"]}}
        ]}]);
        let config = json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}});
        let request = ask(json!({"tools": tools, "toolConfig": config}));
        let v: Value = post(&mock, "generateContent", request.clone())
            .await
            .json()
            .await
            .unwrap();
        let candidate = &v["candidates"][0];
        assert_eq!(
            candidate["content"],
            json!({"parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris", "days": 1}}}], "role": "model"})
        );
        assert_eq!(candidate["finishReason"], "STOP");
        let args = serde_json::to_string(&json!({"city": "Paris", "days": 1})).unwrap();
        assert_eq!(
            v["usageMetadata"]["candidatesTokenCount"],
            count_text(MODEL, &format!("get_weather{args}"))
        );

        let body = post(&mock, "streamGenerateContent?alt=sse", request)
            .await
            .text()
            .await
            .unwrap();
        let chunks = sse(&body);
        assert_eq!(chunks.len(), 1, "the call in one chunk: {body}");
        assert_eq!(chunks[0]["candidates"][0]["content"], candidate["content"]);
        assert_eq!(chunks[0]["usageMetadata"], v["usageMetadata"]);

        // NONE answers in text; AUTO calls the first function.
        let none = json!({"functionCallingConfig": {"mode": "NONE"}});
        let v: Value = post(
            &mock,
            "generateContent",
            ask(json!({"tools": tools, "toolConfig": none})),
        )
        .await
        .json()
        .await
        .unwrap();
        assert!(v["candidates"][0]["content"]["parts"][0]["text"].is_string());
        let v: Value = post(&mock, "generateContent", ask(json!({"tools": tools})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["functionCall"],
            json!({"name": "get_time", "args": {}})
        );
    }

    #[tokio::test]
    async fn the_key_goes_in_x_goog_api_key_or_the_query() {
        let mock = start(Some(KEY), Behavior::default()).await;
        let url = format!("http://{}/v1beta/models/{MODEL}:generateContent", mock.addr());
        let client = reqwest::Client::new();
        let resp = client
            .post(&url)
            .bearer_auth(KEY)
            .json(&ask(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(v["error"]["code"], 403);
        let resp = client
            .post(&url)
            .header("x-goog-api-key", "wrong")
            .json(&ask(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(v["error"]["message"], "API key not valid. Please pass a valid API key.");
        assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
        let resp = client
            .post(format!("{url}?key={KEY}"))
            .json(&ask(json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(post(&mock, "generateContent", ask(json!({}))).await.status(), 200);
    }

    #[tokio::test]
    async fn failures_have_googles_error_bodies() {
        let mock = start(Some(KEY), Behavior::default()).await;
        for (status, name) in [
            (400, "INVALID_ARGUMENT"),
            (401, "UNAUTHENTICATED"),
            (403, "PERMISSION_DENIED"),
            (404, "NOT_FOUND"),
            (429, "RESOURCE_EXHAUSTED"),
            (500, "INTERNAL"),
            (503, "UNAVAILABLE"),
        ] {
            let resp = post(&mock, "generateContent", ask(json!({"mock": {"fail_status": status}}))).await;
            assert_eq!(resp.status(), status);
            assert!(resp.headers().get("retry-after").is_none());
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], status);
            assert_eq!(v["error"]["status"], name);
            assert!(v["error"]["message"].as_str().unwrap().len() > 10);
        }
        let v: Value = post(&mock, "generateContent", ask(json!({"mock": {"fail_status": 429}})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["error"]["details"][0]["retryDelay"], "1s");
        let resp = post(&mock, "generateContent", json!({"contents": []})).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");

        // The in-stream error, then the end.
        let body = post(
            &mock,
            "streamGenerateContent?alt=sse",
            ask(json!({"mock": {"stream_error_after": 2}})),
        )
        .await
        .text()
        .await
        .unwrap();
        let events = sse(&body);
        assert_eq!(events.len(), 3, "{body}");
        assert_eq!(
            events[2],
            json!({"error": {"code": 503, "message": OVERLOADED, "status": "UNAVAILABLE"}})
        );
        // A malformed event once, and a reset after one piece.
        let body = post(
            &mock,
            "streamGenerateContent?alt=sse",
            ask(json!({"mock": {"malformed_after": 1, "chunks": 2}})),
        )
        .await
        .text()
        .await
        .unwrap();
        assert_eq!(body.matches("data: ").count(), 3);
        assert!(body.contains("[{\"text\": \r\n\r\n"), "{body}");
        let mut resp = post(
            &mock,
            "streamGenerateContent?alt=sse",
            ask(json!({"mock": {"reset_after": 1}})),
        )
        .await;
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8(body).unwrap().matches("data: ").count(), 1);
    }

    #[tokio::test]
    async fn cached_content_counts_the_prompt_as_read_from_the_cache() {
        let mock = start(None, Behavior::default()).await;
        let v: Value = post(
            &mock,
            "generateContent",
            ask(json!({"cachedContent": "cachedContents/abc123"})),
        )
        .await
        .json()
        .await
        .unwrap();
        let usage = &v["usageMetadata"];
        let prompt = usage["promptTokenCount"].as_u64().unwrap();
        assert_eq!(usage["cachedContentTokenCount"], prompt);
        assert_eq!(
            usage["cacheTokensDetails"],
            json!([{"modality": "TEXT", "tokenCount": prompt}])
        );
        let v: Value = post(&mock, "countTokens", ask(json!({}))).await.json().await.unwrap();
        assert_eq!(
            v,
            json!({"totalTokens": prompt, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]})
        );
        // omit_usage leaves it out.
        let v: Value = post(&mock, "generateContent", ask(json!({"mock": {"omit_usage": true}})))
            .await
            .json()
            .await
            .unwrap();
        assert!(v.get("usageMetadata").is_none());
    }

    #[tokio::test]
    async fn embeddings_are_values_of_the_models_length() {
        let mock = start(None, Behavior::default()).await;
        let url = |model: &str, method: &str| format!("http://{}/v1beta/models/{model}:{method}", mock.addr());
        let client = reqwest::Client::new();
        let resp = client
            .post(url("text-embedding-004", "embedContent"))
            .json(&json!({"content": {"parts": [{"text": "hello"}]}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let raw = resp.text().await.unwrap();
        assert!(
            raw.starts_with("{\n  \"embedding\": {\n    \"values\": [\n      "),
            "{}",
            &raw[..60]
        );
        let v: Value = serde_json::from_str(&raw).unwrap();
        let values: Vec<f32> = v["embedding"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values, vector("hello", 768));
        let v: Value = client
            .post(url("gemini-embedding-001", "batchEmbedContents"))
            .json(&json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hello"}]}},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "bye"}]}, "outputDimensionality": 8}
            ]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["embeddings"][0]["values"].as_array().unwrap().len(), 3072);
        assert_eq!(v["embeddings"][1]["values"].as_array().unwrap().len(), 8);
        let resp = client
            .post(url("text-embedding-004", "embedContent"))
            .json(&json!({"content": {"parts": []}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }

    #[test]
    fn paths_name_the_model_and_method() {
        assert_eq!(
            Call::parse("/v1beta/models/gemini-2.5-pro:streamGenerateContent"),
            Some(Call {
                model: "gemini-2.5-pro".into(),
                method: Method::StreamGenerate
            })
        );
        assert_eq!(
            Call::parse("/v1beta/models/gemini-2.5-pro%3AgenerateContent").map(|c| c.method),
            Some(Method::Generate)
        );
        assert_eq!(Call::parse("/v1/chat/completions"), None);
        assert_eq!(Call::parse("/v1beta/models/gemini-2.5-pro"), None);
    }
}
