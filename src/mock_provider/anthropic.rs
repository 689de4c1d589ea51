//! Anthropic's Messages API on the wire (`POST /v1/messages`): the request, read into the
//! OpenAI-shaped request [`answer::plan`] reads; the answer as a `message` object or its SSE
//! events; Anthropic's error bodies and headers; and prompt caching's token accounting.
//!
//! Shapes follow the API reference (Messages, Streaming Messages, Errors). A stream is
//! `message_start`, `content_block_start`, `ping`, one `content_block_delta` per piece,
//! `content_block_stop`, `message_delta` (stop reason, output tokens), `message_stop`, each sent
//! as `event: <type>` then `data: <json>`. Usage is always sent, whatever `omit_usage` says.

use super::answer::{self, Choice, Output};
use super::openai::{sse_data, to_json};
use super::{
    behavior_for, write_events, write_simple, Event, Faults, Head, Keep, Limits, ReplyHeaders, State, LIMIT_REQUESTS,
    LIMIT_TOKENS, SSE_HEAD,
};
use crate::metering::tokens::count_chat_prompt;
use komilion_sdk::ChatMessage;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;

/// The stream faults as Anthropic would send them: an event cut off mid-JSON, and the error
/// event it sends when it fails after its 200.
const FAULTS: Faults = Faults {
    malformed: b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0,\n\n",
    error: b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
};

/// How many block boundaries before a cache breakpoint Anthropic looks back for a cached prefix.
const LOOKBACK_BLOCKS: usize = 20;

/// Tokens `count_chat_prompt` adds once for priming the reply: not part of any prefix.
const REPLY_PRIMING: u64 = 3;

/// `POST /v1/messages`.
pub(super) async fn messages(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    mut headers: ReplyHeaders,
) -> io::Result<Keep> {
    // Until the body is read, only the instance default and the header say how to print.
    let pretty = behavior_for(state, head, &Value::Null).map_or(state.config.behavior.pretty, |b| b.pretty);
    if let Some(key) = &state.config.api_key {
        if head.header("x-api-key") != Some(key.as_str()) {
            return refuse(stream, 401, Some("invalid x-api-key"), &headers, pretty).await;
        }
    }
    if head.header("anthropic-version").is_none() {
        let message = "anthropic-version: header is required";
        return refuse(stream, 400, Some(message), &headers, pretty).await;
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return refuse(stream, 400, None, &headers, pretty).await;
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(message) => return refuse(stream, 400, Some(message.as_str()), &headers, pretty).await,
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        return refuse(stream, status, None, &headers, behavior.pretty).await;
    }
    let prompt = match Prompt::read(&request) {
        Ok(p) => p,
        Err(message) => return refuse(stream, 400, Some(message.as_str()), &headers, behavior.pretty).await,
    };
    let plan = match answer::plan(&prompt.plan, &prompt.model, behavior.chunks) {
        Ok(plan) => plan,
        Err(e) => return refuse(stream, 400, Some(e.to_string().as_str()), &headers, behavior.pretty).await,
    };
    // `n` is never set, so there is exactly one choice.
    let Some(choice) = plan.choices.first() else {
        return refuse(stream, 500, None, &headers, behavior.pretty).await;
    };
    let usage = prompt.usage(&state.prompt_cache, plan.completion_tokens);
    headers.tokens = usage.input + usage.cache_read + usage.cache_write_5m + usage.cache_write_1h + usage.output;
    let reply = Reply {
        id: id("msg_"),
        tool_id: id("toolu_"),
        model: &prompt.model,
        choice,
        usage,
        pretty: behavior.pretty,
    };
    if request["stream"].as_bool().unwrap_or(false) {
        write_events(stream, &headers, SSE_HEAD, &reply.events(), &behavior, &FAULTS).await
    } else {
        write_simple(stream, 200, "application/json", &reply.body(), &headers).await
    }
}

/// Answer with Anthropic's error for `status` (its standard message unless given one).
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

/// Anthropic's error body: the error type its docs give for the status, and the request's id.
pub fn error_body(status: u16, message: Option<&str>, request_id: &str, pretty: bool) -> Vec<u8> {
    let (kind, standard) = match status {
        401 => ("authentication_error", "invalid x-api-key"),
        402 => (
            "billing_error",
            "Your credit balance is too low to access the Anthropic API.",
        ),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => ("not_found_error", "The requested resource could not be found."),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        429 => (
            "rate_limit_error",
            "Number of requests has exceeded your per-minute rate limit.",
        ),
        529 => ("overloaded_error", "Overloaded"),
        // The docs: invalid_request_error also stands for the 4XX codes they do not list.
        400..=499 => (
            "invalid_request_error",
            "There was an issue with the format or content of your request.",
        ),
        _ => ("api_error", "Internal server error"),
    };
    let message = message.unwrap_or(standard);
    to_json(
        &json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}),
        pretty,
    )
}

/// The headers Anthropic sends with every answer: the request's id and the rate limits left,
/// each with the time (RFC 3339) it is whole again (and when to retry, on a 429).
pub(super) fn headers(request_id: &str, limits: &Limits) -> String {
    let at = |ms: u64| {
        chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + Duration::from_millis(ms))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let mut out = format!(
        "request-id: {request_id}\r\n\
         anthropic-ratelimit-requests-limit: {LIMIT_REQUESTS}\r\nanthropic-ratelimit-requests-remaining: {}\r\n\
         anthropic-ratelimit-requests-reset: {}\r\n\
         anthropic-ratelimit-tokens-limit: {LIMIT_TOKENS}\r\nanthropic-ratelimit-tokens-remaining: {}\r\n\
         anthropic-ratelimit-tokens-reset: {}\r\n",
        limits.remaining_requests,
        at(limits.reset_requests_ms),
        limits.remaining_tokens,
        at(limits.reset_tokens_ms),
    );
    if limits.limited {
        out.push_str("retry-after: 1\r\n");
    }
    out
}

/// A request id as Anthropic writes them (`req_018EeWyXxfu5pfWkrYcMdjWG`).
pub(super) fn request_id() -> String {
    id("req_")
}

/// Anthropic's id shape: a prefix, `01`, and 22 letters and digits.
fn id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect();
    format!("{prefix}01{tail}")
}

/// How long a cache entry lives (`cache_control.ttl`), which Anthropic bills apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ttl {
    FiveMinutes,
    OneHour,
}

/// One block of the prompt, in the order Anthropic caches them: tools, system, messages.
struct Block {
    /// The message it belongs to in the list that is counted (the system prompt first); none
    /// for a tool definition, which is not counted, as the OpenAI route does not count tools.
    message: Option<usize>,
    role: &'static str,
    /// What it adds to its message's text: a text block's text, a tool result's text. Images
    /// and tool calls add nothing, as the OpenAI route counts only the text parts of messages.
    text: Option<String>,
    /// Its JSON without `cache_control`, which the cache keys on (moving a breakpoint later in
    /// a conversation must not change the prefix before it).
    key: String,
    /// Its `cache_control`: the prompt up to and including it is to be cached.
    breakpoint: Option<Ttl>,
}

/// A Messages request, read for the plan and the meter.
struct Prompt {
    model: String,
    /// The same request in OpenAI's shape, for [`answer::plan`].
    plan: Value,
    blocks: Vec<Block>,
}

impl Prompt {
    /// Read `request`, or say why Anthropic would refuse it.
    fn read(request: &Value) -> Result<Prompt, String> {
        let model = request["model"].as_str().ok_or("model: Field required")?.to_owned();
        let max_tokens = match &request["max_tokens"] {
            Value::Null => return Err("max_tokens: Field required".into()),
            v => v
                .as_u64()
                .filter(|&m| m >= 1)
                .ok_or("max_tokens: Input should be greater than or equal to 1")?,
        };
        let messages = request["messages"].as_array().ok_or("messages: Field required")?;

        let mut blocks = Vec::new();
        let mut functions = Vec::new();
        for tool in request["tools"].as_array().into_iter().flatten() {
            blocks.push(block(tool, None, "tools", None));
            // Server tools (web search and the like) have no schema and are never called here.
            if let (Some(name), Some(schema)) = (tool["name"].as_str(), tool.get("input_schema")) {
                functions.push(json!({"type": "function", "function": {"name": name, "parameters": schema}}));
            }
        }
        // The system prompt, if any, is the first message counted.
        let system = &request["system"];
        let first = usize::from(!system.is_null());
        if !system.is_null() {
            blocks.extend(content_blocks(system, 0, "system").ok_or("system: Input should be a valid list")?);
        }
        for (i, m) in messages.iter().enumerate() {
            let role = match m["role"].as_str() {
                Some("user") => "user",
                Some("assistant") => "assistant",
                _ => return Err(format!("messages.{i}.role: Input should be 'user' or 'assistant'")),
            };
            let content = content_blocks(&m["content"], first + i, role)
                .ok_or_else(|| format!("messages.{i}.content: Input should be a valid list"))?;
            blocks.extend(content);
        }

        let mut prompt = Prompt {
            model,
            plan: Value::Null,
            blocks,
        };
        let chat: Vec<Value> = prompt
            .messages(prompt.blocks.len())
            .into_iter()
            .map(|m| json!({"role": m.role, "content": m.text}))
            .collect();
        let mut plan = json!({"model": prompt.model, "messages": chat, "max_tokens": max_tokens});
        if !functions.is_empty() {
            plan["tools"] = Value::Array(functions);
        }
        let choice = &request["tool_choice"];
        match choice["type"].as_str() {
            Some("any") => plan["tool_choice"] = json!("required"),
            Some("tool") => plan["tool_choice"] = json!({"type": "function", "function": {"name": choice["name"]}}),
            Some("none") => plan["tool_choice"] = json!("none"),
            // `auto`, the default.
            _ => {}
        }
        if let Some(stops) = request.get("stop_sequences") {
            plan["stop"] = stops.clone();
        }
        prompt.plan = plan;
        Ok(prompt)
    }

    /// The messages (system prompt first) as the blocks before `end` make them: each one's
    /// texts joined with newlines, as the OpenAI route's parser joins text parts.
    fn messages(&self, end: usize) -> Vec<ChatMessage> {
        let mut out: Vec<ChatMessage> = Vec::new();
        let mut current = None;
        for b in &self.blocks[..end] {
            let Some(m) = b.message else { continue };
            if current != Some(m) {
                out.push(ChatMessage {
                    role: b.role.to_owned(),
                    text: String::new(),
                });
                current = Some(m);
            }
            if let (Some(text), Some(last)) = (&b.text, out.last_mut()) {
                if !last.text.is_empty() {
                    last.text.push('\n');
                }
                last.text.push_str(text);
            }
        }
        out
    }

    /// The tokens of the prompt up to and including block `last`, counted as the whole prompt
    /// is (`count_chat_prompt`), less the reply's priming.
    fn prefix_tokens(&self, last: usize) -> u64 {
        count_chat_prompt(&self.model, &self.messages(last + 1)).saturating_sub(REPLY_PRIMING)
    }

    /// The usage of this prompt, with `output` tokens in the answer.
    ///
    /// Input tokens are `count_chat_prompt` over the system prompt and the messages, as the
    /// OpenAI route counts its messages. With `cache_control` breakpoints, the prefix up to the
    /// last one is cached as Anthropic caches it: the longest prefix already written (ending at
    /// a block boundary at most [`LOOKBACK_BLOCKS`] before a breakpoint) is read, the rest of
    /// the prefix written (billed at each breakpoint's TTL), and every breakpoint's prefix
    /// remembered. `input_tokens` is what is left, after the last breakpoint.
    fn usage(&self, cache: &Mutex<HashSet<u64>>, output: u64) -> Usage {
        let total = count_chat_prompt(&self.model, &self.messages(self.blocks.len()));
        let mut usage = Usage {
            output,
            ..Usage::default()
        };
        let breakpoints: Vec<(usize, Ttl)> = self
            .blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((i, b.breakpoint?)))
            .collect();
        if let Some(&(last, _)) = breakpoints.last() {
            let keys = self.prefix_keys(last);
            let hit = {
                let mut written = cache.lock().unwrap_or_else(PoisonError::into_inner);
                let hit = breakpoints.iter().rev().find_map(|&(b, _)| {
                    (b.saturating_sub(LOOKBACK_BLOCKS)..=b)
                        .rev()
                        .find(|&i| written.contains(&keys[i]))
                });
                written.extend(breakpoints.iter().map(|&(b, _)| keys[b]));
                hit
            };
            usage.cache_read = hit.map_or(0, |i| self.prefix_tokens(i));
            let mut cached = usage.cache_read;
            for &(b, ttl) in breakpoints.iter().filter(|(b, _)| hit.is_none_or(|h| *b > h)) {
                let tokens = self.prefix_tokens(b);
                let new = tokens.saturating_sub(cached);
                match ttl {
                    Ttl::FiveMinutes => usage.cache_write_5m += new,
                    Ttl::OneHour => usage.cache_write_1h += new,
                }
                cached = cached.max(tokens);
            }
        }
        usage.input = total.saturating_sub(usage.cache_read + usage.cache_write_5m + usage.cache_write_1h);
        usage
    }

    /// The cache key of each prefix of the prompt ending at a block up to `last`: the model and
    /// the blocks so far (their messages, roles and JSON).
    fn prefix_keys(&self, last: usize) -> Vec<u64> {
        let mut hasher = DefaultHasher::new();
        self.model.hash(&mut hasher);
        self.blocks[..=last]
            .iter()
            .map(|b| {
                (b.message, b.role, &b.key).hash(&mut hasher);
                hasher.finish()
            })
            .collect()
    }
}

fn block(json: &Value, message: Option<usize>, role: &'static str, text: Option<String>) -> Block {
    let control = &json["cache_control"];
    let breakpoint = (control["type"] == "ephemeral").then(|| match control["ttl"].as_str() {
        Some("1h") => Ttl::OneHour,
        _ => Ttl::FiveMinutes,
    });
    let mut key = json.clone();
    if let Some(o) = key.as_object_mut() {
        o.shift_remove("cache_control");
    }
    Block {
        message,
        role,
        text,
        key: key.to_string(),
        breakpoint,
    }
}

/// The blocks of a message's `content` (or of `system`): a string, or a list of blocks.
fn content_blocks(content: &Value, message: usize, role: &'static str) -> Option<Vec<Block>> {
    match content {
        Value::String(text) => Some(vec![block(content, Some(message), role, Some(text.clone()))]),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|b| block(b, Some(message), role, block_text(b)))
                .collect(),
        ),
        _ => None,
    }
}

/// The text a content block adds to its message (see [`Block::text`]).
fn block_text(block: &Value) -> Option<String> {
    match block["type"].as_str() {
        Some("text") => block["text"].as_str().map(str::to_owned),
        Some("tool_result") => match &block["content"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(parts) => Some(
                parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => None,
        },
        _ => None,
    }
}

/// Tokens of one answer as Anthropic reports them: input excludes cache reads and writes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    input: u64,
    cache_write_5m: u64,
    cache_write_1h: u64,
    cache_read: u64,
    output: u64,
}

impl Usage {
    fn json(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_write_5m + self.cache_write_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_write_5m,
                "ephemeral_1h_input_tokens": self.cache_write_1h
            },
            "output_tokens": output_tokens
        })
    }
}

/// One answer being produced.
struct Reply<'a> {
    id: String,
    /// The id of the tool call, if the answer is one (the plan's is in OpenAI's shape).
    tool_id: String,
    model: &'a str,
    choice: &'a Choice,
    usage: Usage,
    pretty: bool,
}

impl Reply<'_> {
    fn stop_reason(&self) -> &'static str {
        match self.choice.finish_reason {
            "length" => "max_tokens",
            "tool_calls" => "tool_use",
            _ if self.choice.stop.is_some() => "stop_sequence",
            _ => "end_turn",
        }
    }

    /// The `message` object; a stream's first event carries it with no content yet.
    fn message(&self, content: Value, stop_reason: Value, stop_sequence: Value, output_tokens: u64) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self.usage.json(output_tokens),
        })
    }

    /// The non-streamed answer.
    fn body(&self) -> Vec<u8> {
        let block = match &self.choice.output {
            Output::Text(pieces) => json!({"type": "text", "text": pieces.concat()}),
            Output::ToolCall { name, arguments, .. } => {
                // Arguments cut short by `max_tokens` are no JSON object: then the input is empty.
                let input = serde_json::from_str::<Value>(&arguments.concat())
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                json!({"type": "tool_use", "id": self.tool_id, "name": name, "input": input})
            }
        };
        let message = self.message(
            json!([block]),
            json!(self.stop_reason()),
            json!(self.choice.stop),
            self.usage.output,
        );
        to_json(&message, self.pretty)
    }

    /// Every SSE event of the streamed answer, in order.
    fn events(&self) -> Vec<Event> {
        let event = |v: Value, content: bool| {
            let mut bytes = format!("event: {}\n", v["type"].as_str().unwrap_or_default()).into_bytes();
            bytes.extend(sse_data(&v, self.pretty));
            Event { bytes, content }
        };
        let (start, deltas): (Value, Vec<Value>) = match &self.choice.output {
            Output::Text(pieces) => (
                json!({"type": "text", "text": ""}),
                pieces
                    .iter()
                    .map(|p| json!({"type": "text_delta", "text": p}))
                    .collect(),
            ),
            Output::ToolCall { name, arguments, .. } => (
                json!({"type": "tool_use", "id": self.tool_id, "name": name, "input": {}}),
                arguments
                    .iter()
                    .map(|p| json!({"type": "input_json_delta", "partial_json": p}))
                    .collect(),
            ),
        };
        // The docs' first event counts one output token already.
        let empty = self.message(json!([]), Value::Null, Value::Null, 1);
        let mut out = vec![
            event(json!({"type": "message_start", "message": empty}), false),
            event(
                json!({"type": "content_block_start", "index": 0, "content_block": start}),
                false,
            ),
            event(json!({"type": "ping"}), false),
        ];
        out.extend(
            deltas
                .into_iter()
                .map(|delta| event(json!({"type": "content_block_delta", "index": 0, "delta": delta}), true)),
        );
        out.push(event(json!({"type": "content_block_stop", "index": 0}), false));
        out.push(event(
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason(), "stop_sequence": self.choice.stop},
                "usage": {"output_tokens": self.usage.output}
            }),
            false,
        ));
        out.push(event(json!({"type": "message_stop"}), false));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::tokens::count_text;
    use crate::mock_provider::{Behavior, MockConfig, MockProvider};
    use std::net::SocketAddr;

    const MODEL: &str = "claude-sonnet-4-5";
    const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

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

    async fn post(mock: &MockProvider, headers: &[(&str, &str)], body: Value) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}/messages", mock.base_url()))
            .json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    fn ask(extra: Value) -> Value {
        let mut request = json!({"model": MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    }

    fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
        resp.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{name} is sent"))
            .to_str()
            .unwrap()
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

    fn names(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_text_answer_with_usage_and_anthropic_headers() {
        let mock = start(None, Behavior::default()).await;
        // `omit_usage` changes nothing: Anthropic always sends usage.
        let resp = post(
            &mock,
            &[VERSION],
            ask(json!({"system": "Be brief.", "mock": {"omit_usage": true}})),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let id = header(&resp, "request-id").to_owned();
        assert!(
            id.starts_with("req_01") && id.len() == 28 && id[4..].bytes().all(|b| b.is_ascii_alphanumeric()),
            "{id}"
        );
        assert_eq!(header(&resp, "anthropic-ratelimit-requests-limit"), "10000");
        assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "9999");
        chrono::DateTime::parse_from_rfc3339(header(&resp, "anthropic-ratelimit-requests-reset")).unwrap();
        chrono::DateTime::parse_from_rfc3339(header(&resp, "anthropic-ratelimit-tokens-reset")).unwrap();
        let tokens_left: u64 = header(&resp, "anthropic-ratelimit-tokens-remaining").parse().unwrap();
        for openai in ["x-request-id", "x-ratelimit-limit-requests", "retry-after"] {
            assert!(resp.headers().get(openai).is_none(), "{openai}");
        }
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with("{\"id\":\"msg_01"), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        let text = v["content"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("Echo: hi The quick"), "{text}");
        let input = count_chat_prompt(MODEL, &chat(&[("system", "Be brief."), ("user", "hi")]));
        let output = count_text(MODEL, text);
        assert_eq!(
            v,
            json!({
                "id": v["id"], "type": "message", "role": "assistant", "model": MODEL,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                    "output_tokens": output}
            })
        );
        assert_eq!(tokens_left, LIMIT_TOKENS - input - output);

        let v: Value = post(&mock, &[VERSION], ask(json!({"stop_sequences": [" fox", "zzz"]})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["content"][0]["text"], "Echo: hi The quick brown");
        assert_eq!(
            (&v["stop_reason"], &v["stop_sequence"]),
            (&json!("stop_sequence"), &json!(" fox"))
        );
        let v: Value = post(&mock, &[VERSION], ask(json!({"max_tokens": 2})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            (&v["stop_reason"], &v["usage"]["output_tokens"]),
            (&json!("max_tokens"), &json!(2))
        );
    }

    #[tokio::test]
    async fn max_tokens_is_required() {
        let mock = start(None, Behavior::default()).await;
        let mut request = ask(json!({}));
        request.as_object_mut().unwrap().remove("max_tokens");
        let resp = post(&mock, &[VERSION], request).await;
        assert_eq!(resp.status(), 400);
        let id = header(&resp, "request-id").to_owned();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
                "request_id": id})
        );
    }

    #[tokio::test]
    async fn the_key_goes_in_x_api_key_and_the_version_is_required() {
        let mock = start(Some("sk-ant-test"), Behavior::default()).await;
        let bearer = ("authorization", "Bearer sk-ant-test");
        let key = ("x-api-key", "sk-ant-test");
        for headers in [&[bearer, VERSION][..], &[("x-api-key", "wrong"), VERSION][..]] {
            let resp = post(&mock, headers, ask(json!({}))).await;
            assert_eq!(resp.status(), 401);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(
                v["error"],
                json!({"type": "authentication_error", "message": "invalid x-api-key"})
            );
        }
        let resp = post(&mock, &[key], ask(json!({}))).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(post(&mock, &[key, VERSION], ask(json!({}))).await.status(), 200);

        // The OpenAI route keeps its bearer check.
        let openai = |header: (&'static str, &'static str)| {
            reqwest::Client::new()
                .post(format!("{}/chat/completions", mock.base_url()))
                .header(header.0, header.1)
                .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
        };
        let refused = openai(key).await.unwrap();
        assert_eq!(refused.status(), 401);
        assert!(refused.headers().get("x-request-id").is_some());
        let v: Value = refused.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(openai(bearer).await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_streamed_tool_call_follows_the_documented_sequence() {
        let mock = start(None, Behavior::default()).await;
        let tools = json!([
            {"name": "get_time", "description": "Now.", "input_schema": {"type": "object", "properties": {}}},
            {"name": "get_weather", "description": "The forecast.", "input_schema": {"type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}
        ]);
        let request =
            ask(json!({"stream": true, "tools": tools, "tool_choice": {"type": "tool", "name": "get_weather"}}));
        let resp = post(&mock, &[VERSION], request).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "content-type"), "text/event-stream; charset=utf-8");
        assert_eq!(header(&resp, "transfer-encoding"), "chunked");
        let body = resp.text().await.unwrap();
        assert!(
            body.starts_with("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01"),
            "{body}"
        );
        let events = parse_events(&body);
        let deltas = events.len() - 6;
        assert!(deltas > 1, "the input comes in pieces: {body}");
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(std::iter::repeat_n("content_block_delta", deltas));
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names(&events), expected);

        let start = &events[0].1["message"];
        assert_eq!(start["content"], json!([]));
        assert!(start["stop_reason"].is_null() && start["stop_sequence"].is_null());
        assert_eq!(start["usage"]["output_tokens"], 1);
        assert!(start["usage"]["input_tokens"].as_u64().unwrap() > 0);
        let block = &events[1].1;
        assert_eq!(block["index"], 0);
        let id = block["content_block"]["id"].as_str().unwrap();
        assert!(id.starts_with("toolu_01") && id.len() == 30, "{id}");
        assert_eq!(
            block["content_block"],
            json!({"type": "tool_use", "id": id, "name": "get_weather", "input": {}})
        );
        let partial: String = events[3..3 + deltas]
            .iter()
            .map(|(_, e)| {
                assert_eq!(
                    (&e["index"], &e["delta"]["type"]),
                    (&json!(0), &json!("input_json_delta"))
                );
                e["delta"]["partial_json"].as_str().unwrap()
            })
            .collect();
        let input: Value = serde_json::from_str(&partial).unwrap();
        assert_eq!(input, json!({"city": "Paris", "days": 1}));
        assert_eq!(events[3 + deltas].1, json!({"type": "content_block_stop", "index": 0}));
        assert_eq!(
            events[4 + deltas].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"output_tokens": count_text(MODEL, &format!("get_weather{partial}"))}})
        );
        assert_eq!(events[5 + deltas].1, json!({"type": "message_stop"}));
    }

    fn usage_of(v: &Value) -> (u64, u64, u64) {
        let u = &v["usage"];
        let n = |k: &str| u[k].as_u64().unwrap();
        (
            n("input_tokens"),
            n("cache_creation_input_tokens"),
            n("cache_read_input_tokens"),
        )
    }

    #[tokio::test]
    async fn cache_control_writes_the_prefix_then_reads_it() {
        let mock = start(None, Behavior::default()).await;
        let long = "You answer questions about the gateway. ".repeat(40);
        let system = json!([{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}]);
        let request = ask(json!({"system": system}));
        let total = count_chat_prompt(MODEL, &chat(&[("system", &long), ("user", "hi")]));

        let first: Value = post(&mock, &[VERSION], request.clone()).await.json().await.unwrap();
        let (input, written, read) = usage_of(&first);
        assert!(written > 0 && read == 0, "{first}");
        assert_eq!(written, count_chat_prompt(MODEL, &chat(&[("system", &long)])) - 3);
        assert_eq!(input + written, total, "input_tokens excludes the cache write");
        assert_eq!(
            first["usage"]["cache_creation"],
            json!({"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0})
        );

        let second: Value = post(&mock, &[VERSION], request).await.json().await.unwrap();
        assert_eq!(usage_of(&second), (input, 0, written), "{second}");

        // The next turn moves the breakpoint on: the first turn's prefix is read, the rest written.
        let turn = ask(json!({"system": [{"type": "text", "text": long}], "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": [{"type": "text", "text": "More?", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
        ]}));
        let third: Value = post(&mock, &[VERSION], turn).await.json().await.unwrap();
        let (input, written_now, read) = usage_of(&third);
        assert_eq!(read, written, "{third}");
        let prefix = count_chat_prompt(
            MODEL,
            &chat(&[
                ("system", &long),
                ("user", "hi"),
                ("assistant", "Hello."),
                ("user", "More?"),
            ]),
        ) - 3;
        assert_eq!(written_now, prefix - read);
        assert_eq!(input, 3, "only the reply's priming is after the breakpoint");
        assert_eq!(
            third["usage"]["cache_creation"],
            json!({"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": written_now})
        );

        // Without cache_control nothing is cached.
        let plain: Value = post(&mock, &[VERSION], ask(json!({"system": long})))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(usage_of(&plain), (total, 0, 0));
    }

    #[tokio::test]
    async fn failures_have_anthropics_error_types() {
        let mock = start(None, Behavior::default()).await;
        for stream in [false, true] {
            let resp = post(
                &mock,
                &[VERSION],
                ask(json!({"stream": stream, "mock": {"fail_status": 429}})),
            )
            .await;
            assert_eq!(resp.status(), 429);
            assert_eq!(header(&resp, "retry-after"), "1");
            assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "0");
            assert!(resp.headers().get("retry-after-ms").is_none());
            let id = header(&resp, "request-id").to_owned();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "rate_limit_error");
            assert_eq!(v["request_id"], id);
        }
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (500, "api_error"),
            (529, "overloaded_error"),
        ] {
            let resp = post(&mock, &[VERSION], ask(json!({"mock": {"fail_status": status}}))).await;
            assert_eq!(resp.status(), status);
            assert!(resp.headers().get("retry-after").is_none());
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["type"], kind, "{status}");
        }
    }

    #[tokio::test]
    async fn stream_error_after_ends_the_stream_with_an_error_event() {
        let mock = start(
            None,
            Behavior {
                stream_error_after: Some(2),
                ..Behavior::default()
            },
        )
        .await;
        let body = post(&mock, &[VERSION], ask(json!({"stream": true})))
            .await
            .text()
            .await
            .unwrap();
        assert!(
            body.ends_with(
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
            ),
            "{body}"
        );
        let events = parse_events(&body);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "error"
            ]
        );

        // OpenAI's route sends its own error object, and no `[DONE]`.
        let body = reqwest::Client::new()
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            body.ends_with(
                "\n\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\",\"code\":null}}\n\n"
            ),
            "{body}"
        );
        assert_eq!(
            body.matches("data: ").count(),
            4,
            "the role chunk, two pieces, the error"
        );
    }

    #[tokio::test]
    async fn faults_and_pretty_streams() {
        let mock = start(None, Behavior::default()).await;
        let body = post(
            &mock,
            &[VERSION],
            ask(json!({"stream": true, "mock": {"pretty": true, "chunks": 2, "malformed_after": 0}})),
        )
        .await
        .text()
        .await
        .unwrap();
        let broken = "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0,\n\n";
        assert_eq!(body.matches(broken).count(), 1, "{body}");
        let body = body.replacen(broken, "", 1);
        assert!(
            body.starts_with("event: message_start\ndata: {\ndata:   \"type\": \"message_start\",\n"),
            "{body}"
        );
        let events = parse_events(&body);
        assert_eq!(events.len(), 8);
        assert_eq!(events[3].1["delta"], json!({"type": "text_delta", "text": "Echo: hi"}));

        let mut resp = post(
            &mock,
            &[VERSION],
            ask(json!({"stream": true, "mock": {"reset_after": 1}})),
        )
        .await;
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
        }
        let events = parse_events(&String::from_utf8(body).unwrap());
        assert_eq!(names(&events).last(), Some(&"content_block_delta"));
        assert_eq!(events.len(), 4, "cut after the first delta");
    }
}
