//! The simulated LLM provider used by tests, benches and `komilion demo`.
//!
//! A small HTTP/1.1 server (keep-alive, `Content-Length` and chunked bodies, `Expect:
//! 100-continue`) written directly on tokio so that every byte it sends is under test control:
//! it can stall before the first byte, pace its chunks, fail with a status, reset the connection
//! mid-stream or emit a malformed event. The wire formats live in one file per provider protocol,
//! all on the same port, so one address serves them all:
//!
//! - OpenAI's chat completions at `/v1/chat/completions` ([`openai`]) and embeddings at
//!   `/v1/embeddings` ([`embeddings`]);
//! - Anthropic's Messages API at `/v1/messages` ([`anthropic`]);
//! - Azure OpenAI's `/openai/deployments/{deployment}/chat/completions` and `/embeddings`
//!   ([`azure`]: OpenAI's bodies behind Azure's key header, `api-version` and headers);
//! - Google's Gemini API at `/v1beta/models/{model}:generateContent`, `:streamGenerateContent`,
//!   `:countTokens`, `:embedContent` and `:batchEmbedContents` ([`gemini`]);
//! - Cohere's v2 chat at `/v2/chat` and embed at `/v2/embed` ([`cohere`]).
//!
//! Behaviour comes from [`Behavior`]: the instance default, overridden per request by a `"mock"`
//! object in the JSON body (the gateway forwards unknown fields untouched) or an
//! `x-mock-behavior` header holding the same JSON.
//!
//! The answer honours the request as OpenAI does (`n`, `stop`, `max_tokens`, `tools`,
//! `response_format`, `logprobs`: see [`answer`]), so clients' features can be tested through
//! the gateway, and every response carries its provider's request id and rate-limit headers
//! (OpenAI's `x-request-id` and `x-ratelimit-*`, Anthropic's `request-id` and
//! `anthropic-ratelimit-*`, Azure's `apim-request-id` and `x-ratelimit-remaining-*`; Google and
//! Cohere send no rate limits). The other formats convert their requests to OpenAI's shape for
//! the same planner, so every route answers alike.

pub mod answer;
pub mod anthropic;
pub mod azure;
pub mod cohere;
pub mod embeddings;
pub mod gemini;
pub mod openai;
mod schema;

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the simulated provider answers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Behavior {
    /// Delay before the response status line.
    pub ttfb_ms: u64,
    /// Delay between two streamed chunks.
    pub chunk_delay_ms: u64,
    /// Content pieces in the answer (each one streamed chunk, each one token).
    pub chunks: usize,
    /// Answer with this status and the route's provider's error body for it.
    pub fail_status: Option<u16>,
    /// Reset the connection (TCP RST) after this many content chunks.
    pub reset_after: Option<usize>,
    /// Send a malformed event after this many content chunks.
    pub malformed_after: Option<usize>,
    /// Send the provider's in-stream error event (overloaded) after this many content chunks,
    /// then end the stream cleanly, as a provider that fails after its 200 does.
    pub stream_error_after: Option<usize>,
    /// Leave usage out of the answer entirely (what some providers do): Gemini's `usageMetadata`,
    /// Cohere's `usage` and `billed_units` too. The Anthropic route ignores it: Anthropic always
    /// sends usage.
    pub omit_usage: bool,
    /// Pretty-print JSON bodies and stream events (spaces after colons, one member a line; a
    /// streamed event's lines each get their own `data: `), as some providers send them.
    /// Gemini's bodies are pretty whatever it says, as Google prints them by default (unless
    /// the query says `prettyPrint=false`).
    pub pretty: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            ttfb_ms: 0,
            chunk_delay_ms: 0,
            chunks: 8,
            fail_status: None,
            reset_after: None,
            malformed_after: None,
            stream_error_after: None,
            omit_usage: false,
            pretty: false,
        }
    }
}

/// Settings of one simulated provider instance.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// If set, requests must carry it, or get their provider's refusal: OpenAI's and Cohere's
    /// routes as `Authorization: Bearer <api_key>`, Anthropic's as `x-api-key: <api_key>`,
    /// Azure's as `api-key: <api_key>`, Gemini's as `x-goog-api-key: <api_key>` (or `?key=`).
    pub api_key: Option<String>,
    pub behavior: Behavior,
    /// What `GET /v1/models` lists.
    pub models: Vec<String>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            api_key: None,
            behavior: Behavior::default(),
            models: [
                "gpt-4o-mini",
                "gpt-4o",
                "gpt-4.1",
                "gpt-4.1-mini",
                "gpt-4.1-nano",
                "o4-mini",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// A request as the provider saw it, for tests to inspect.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    config: MockConfig,
    /// The last requests seen (bounded), newest last.
    recorded: Mutex<Vec<RecordedRequest>>,
    requests: AtomicU64,
    next_id: AtomicU64,
    /// Anthropic's prompt cache: the keys of the prompt prefixes written so far.
    prompt_cache: Mutex<HashSet<u64>>,
}

const RECORD_LIMIT: usize = 256;
const MAX_HEAD: usize = 64 * 1024;

/// A running simulated provider.
pub struct MockProvider {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MockProvider {
    /// Serve on `addr` (port 0 for a free port) in the current tokio runtime.
    pub async fn start(config: MockConfig, addr: SocketAddr) -> io::Result<MockProvider> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            recorded: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            prompt_cache: Mutex::new(HashSet::new()),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve_connection(stream, accept_state.clone()));
                    }
                }
            }
        });
        Ok(MockProvider {
            addr,
            state,
            stop: Some(stop),
        })
    }

    /// Serve on `addr` from a thread with its own runtime (for callers without one).
    pub fn start_in_thread(config: MockConfig, addr: SocketAddr, threads: usize) -> io::Result<MockProvider> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("mock-provider".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match MockProvider::start(config, addr).await {
                        Ok(mut provider) => {
                            let stop = provider.stop.take();
                            let _ = tx.send(Ok(provider));
                            // Serve until the process ends (the handle given out cannot stop us).
                            std::future::pending::<()>().await;
                            drop(stop);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        rx.recv().map_err(|_| io::Error::other("mock provider thread died"))?
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `base_url` to configure, e.g. `http://127.0.0.1:34567/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
    close: bool,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<State>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        let head = match read_head(&mut stream, &mut buf).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => return,
        };
        if head.expect_continue && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return;
        }
        let body = match read_body(&mut stream, &mut buf, &head).await {
            Ok(body) => body,
            Err(_) => return,
        };
        state.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut recorded) = state.recorded.lock() {
            if recorded.len() >= RECORD_LIMIT {
                recorded.remove(0);
            }
            recorded.push(RecordedRequest {
                method: head.method.clone(),
                path: head.path.clone(),
                headers: head.headers.clone(),
                body_len: body.len(),
            });
        }
        match respond(&mut stream, &state, &head, &body).await {
            Ok(Keep::Open) if !head.close => {}
            _ => return,
        }
    }
}

enum Keep {
    Open,
    Closed,
}

async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Option<Head>> {
    loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&buf[..end + 4]).map_err(io::Error::other)?;
            let method = req.method.unwrap_or("").to_owned();
            let path = req.path.unwrap_or("").to_owned();
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            buf.advance(end + 4);
            let mut head = Head {
                method,
                path,
                headers,
                content_length: None,
                chunked: false,
                expect_continue: false,
                close: false,
            };
            head.content_length = head.header("content-length").and_then(|v| v.trim().parse().ok());
            head.chunked = head
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            head.expect_continue = head
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            head.close = head
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("request head too large"));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut BytesMut, need: usize) -> io::Result<()> {
    while buf.len() < need {
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn read_body(stream: &mut TcpStream, buf: &mut BytesMut, head: &Head) -> io::Result<Vec<u8>> {
    if head.chunked {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = memchr::memmem::find(buf, b"\r\n") {
                    break i;
                }
                if stream.read_buf(buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            };
            let size_text = std::str::from_utf8(&buf[..line_end]).map_err(io::Error::other)?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(io::Error::other)?;
            buf.advance(line_end + 2);
            fill(stream, buf, size + 2).await?;
            body.extend_from_slice(&buf[..size]);
            buf.advance(size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
    let len = head.content_length.unwrap_or(0);
    fill(stream, buf, len).await?;
    Ok(buf.split_to(len).to_vec())
}

/// A random (version 4) UUID, as Azure and Cohere write their ids.
fn uuid() -> String {
    let v = (rand::random::<u128>() & !(0xf000 << 64) & !(0xc000 << 48)) | (0x4000 << 64) | (0x8000 << 48);
    let hex = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The request's behaviour: the instance default, overridden by the header, then the body.
fn behavior_for(state: &State, head: &Head, body: &serde_json::Value) -> Result<Behavior, String> {
    let mut b = state.config.behavior.clone();
    let mut apply = |v: &serde_json::Value| -> Result<(), String> {
        let mut merged = serde_json::to_value(&b).map_err(|e| e.to_string())?;
        if let (Some(m), Some(o)) = (merged.as_object_mut(), v.as_object()) {
            for (k, val) in o {
                m.insert(k.clone(), val.clone());
            }
        }
        b = serde_json::from_value(merged).map_err(|e| format!("bad mock behavior: {e}"))?;
        Ok(())
    };
    if let Some(h) = head.header("x-mock-behavior") {
        let v: serde_json::Value = serde_json::from_str(h).map_err(|e| format!("bad x-mock-behavior: {e}"))?;
        apply(&v)?;
    }
    if let Some(v) = body.get("mock") {
        apply(v)?;
    }
    Ok(b)
}

/// Requests and tokens a minute the simulated account may use (what the rate-limit headers
/// report).
const LIMIT_REQUESTS: u64 = 10_000;
const LIMIT_TOKENS: u64 = 10_000_000;

/// Which provider's headers an answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
    Azure,
    Gemini,
    Cohere,
}

/// The headers a provider sends with every answer: the request's id, and the rate limits left.
/// Each wire format spells them its own way (`openai::headers`, `anthropic::headers`, ...).
struct ReplyHeaders {
    wire: Wire,
    request_id: String,
    started: Instant,
    /// This request's number on this instance (from 1). The remaining requests count down
    /// from it as if the minute never ended (wrapping at the limit): enough for a client to see
    /// them move.
    number: u64,
    /// Tokens this request uses (prompt and completion), for the token limit.
    tokens: u64,
}

/// The rate limits after one answer, in no provider's spelling.
struct Limits {
    remaining_requests: u64,
    remaining_tokens: u64,
    /// Milliseconds until each limit is whole again at the per-minute refill rate.
    reset_requests_ms: u64,
    reset_tokens_ms: u64,
    /// The answer is a 429: no requests left, and the client is told to retry in a second.
    limited: bool,
}

impl ReplyHeaders {
    fn new(number: u64, wire: Wire) -> ReplyHeaders {
        let request_id = match wire {
            // OpenAI's shape: `req_` and 32 hex digits.
            Wire::OpenAi => format!("req_{:032x}", rand::random::<u128>()),
            Wire::Anthropic => anthropic::request_id(),
            Wire::Azure | Wire::Cohere => uuid(),
            Wire::Gemini => gemini::response_id(),
        };
        ReplyHeaders {
            wire,
            request_id,
            started: Instant::now(),
            number,
            tokens: 0,
        }
    }

    /// The header lines (each ending in CRLF) for an answer with `status`.
    fn render(&self, status: u16) -> String {
        let limited = status == 429;
        let limits = Limits {
            remaining_requests: if limited {
                0
            } else {
                LIMIT_REQUESTS - 1 - (self.number.saturating_sub(1) % LIMIT_REQUESTS)
            },
            remaining_tokens: LIMIT_TOKENS.saturating_sub(self.tokens),
            reset_requests_ms: if limited { 1_000 } else { 60_000 / LIMIT_REQUESTS },
            reset_tokens_ms: (self.tokens * 60_000).div_ceil(LIMIT_TOKENS),
            limited,
        };
        match self.wire {
            Wire::OpenAi => openai::headers(&self.request_id, self.started.elapsed().as_millis(), &limits),
            Wire::Anthropic => anthropic::headers(&self.request_id, &limits),
            Wire::Azure => azure::headers(&self.request_id, &limits),
            Wire::Gemini => gemini::headers(self.started.elapsed().as_millis()),
            Wire::Cohere => cohere::headers(&self.request_id, self.started.elapsed().as_millis()),
        }
    }
}

async fn write_simple(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    headers: &ReplyHeaders,
) -> io::Result<Keep> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        headers.render(status),
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out).await?;
    Ok(Keep::Open)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Status",
    }
}

async fn respond(stream: &mut TcpStream, state: &State, head: &Head, body: &[u8]) -> io::Result<Keep> {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let path = head.path.split('?').next().unwrap_or("");
    // The other providers' routes check their own key headers and answer in their own shapes.
    if head.method == "POST" {
        if matches!(path, "/v1/messages" | "/messages") {
            return anthropic::messages(stream, state, head, body, ReplyHeaders::new(n, Wire::Anthropic)).await;
        }
        if let Some(call) = gemini::Call::parse(path) {
            return gemini::serve(stream, state, head, body, call, ReplyHeaders::new(n, Wire::Gemini)).await;
        }
        if path.starts_with("/openai/deployments/") {
            return azure::serve(stream, state, head, body, n, ReplyHeaders::new(n, Wire::Azure)).await;
        }
        if matches!(path, "/v2/chat" | "/v2/embed") {
            return cohere::serve(stream, state, head, body, ReplyHeaders::new(n, Wire::Cohere)).await;
        }
    }
    let headers = ReplyHeaders::new(n, Wire::OpenAi);
    // Until a chat request's body is read, only the instance default and the header apply.
    let pretty = behavior_for(state, head, &serde_json::Value::Null).map_or(state.config.behavior.pretty, |b| b.pretty);
    if let Some(key) = &state.config.api_key {
        let presented = head.header("authorization").and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(key.as_str()) {
            let body = openai::error_body(401, pretty);
            return write_simple(stream, 401, "application/json", &body, &headers).await;
        }
    }
    match (head.method.as_str(), path) {
        ("GET", "/v1/models" | "/models") => {
            let body = openai::models_body(&state.config.models, now_secs(), pretty);
            write_simple(stream, 200, "application/json", &body, &headers).await
        }
        ("POST", "/v1/chat/completions" | "/chat/completions") => {
            chat_completion(stream, state, head, body, n, headers, Surface::OpenAi).await
        }
        ("POST", "/v1/embeddings" | "/embeddings") => {
            embeddings::openai(stream, state, head, body, headers, Surface::OpenAi).await
        }
        _ => {
            let body = openai::error_body(404, pretty);
            write_simple(stream, 404, "application/json", &body, &headers).await
        }
    }
}

/// The prompt's tokens as the real API counts them (tiktoken, OpenAI's chat format). The
/// gateway's estimates use the same counting, so tests can compare them exactly.
fn prompt_tokens(body: &[u8], model: &str) -> u64 {
    match komilion_sdk::ChatRequest::parse(bytes::Bytes::copy_from_slice(body)) {
        Ok(chat) => crate::metering::tokens::count_chat_prompt(model, &chat.messages),
        Err(_) => 0,
    }
}

/// Which API serves an OpenAI-shaped request: OpenAI's own, or an Azure deployment of it (the
/// same bodies, Azure's error bodies where Azure's gateway answers itself).
#[derive(Debug, Clone, Copy)]
enum Surface<'a> {
    OpenAi,
    Azure { deployment: &'a str, api_version: &'a str },
}

impl Surface<'_> {
    fn error_body(&self, status: u16, pretty: bool) -> Vec<u8> {
        match self {
            Surface::OpenAi => openai::error_body(status, pretty),
            Surface::Azure { api_version, .. } => azure::error_body(status, api_version, pretty),
        }
    }

    /// The model an answer names: the request's, or (on Azure, where the deployment names it)
    /// the deployment's.
    fn model(&self, request: &serde_json::Value) -> String {
        match (request["model"].as_str(), self) {
            (Some(model), _) => model.to_owned(),
            (None, Surface::Azure { deployment, .. }) => (*deployment).to_owned(),
            (None, Surface::OpenAi) => "unknown".to_owned(),
        }
    }
}

/// The stream head's content headers of OpenAI's and Anthropic's streams.
const SSE_HEAD: &str = "content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n";

async fn chat_completion(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    n: u64,
    mut headers: ReplyHeaders,
    surface: Surface<'_>,
) -> io::Result<Keep> {
    let request: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let body = surface.error_body(400, state.config.behavior.pretty);
            return write_simple(stream, 400, "application/json", &body, &headers).await;
        }
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(msg) => {
            let body = openai::invalid_request(&msg, "mock", state.config.behavior.pretty);
            return write_simple(stream, 400, "application/json", &body, &headers).await;
        }
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        let body = surface.error_body(status, behavior.pretty);
        return write_simple(stream, status, "application/json", &body, &headers).await;
    }
    let model = surface.model(&request);
    let plan = match answer::plan(&request, &model, behavior.chunks) {
        Ok(plan) => plan,
        Err(e) => {
            let body = openai::invalid_request(&e.to_string(), e.param(), behavior.pretty);
            return write_simple(stream, 400, "application/json", &body, &headers).await;
        }
    };
    let id = format!("chatcmpl-mock{n:020}");
    let completion = openai::Completion {
        id: &id,
        created: now_secs(),
        model: &model,
        choices: &plan.choices,
        prompt_tokens: if request.get("model").is_some() {
            prompt_tokens(body, &model)
        } else {
            // Azure's requests may leave the model to the deployment; the counter wants one.
            let mut named = request.clone();
            named["model"] = serde_json::Value::String(model.clone());
            prompt_tokens(&serde_json::to_vec(&named).unwrap_or_default(), &model)
        },
        completion_tokens: plan.completion_tokens,
        logprobs: plan.logprobs,
        pretty: behavior.pretty,
    };
    headers.tokens = completion.prompt_tokens + completion.completion_tokens;
    let stream_requested = request["stream"].as_bool().unwrap_or(false);
    if !stream_requested {
        let body = completion.body(!behavior.omit_usage);
        return write_simple(stream, 200, "application/json", &body, &headers).await;
    }

    let include_usage = request["stream_options"]["include_usage"].as_bool().unwrap_or(false) && !behavior.omit_usage;
    let events = completion.events(include_usage);
    write_events(stream, &headers, SSE_HEAD, &events, &behavior, &openai::FAULTS).await
}

/// One SSE event of a streamed answer.
pub struct Event {
    pub bytes: Vec<u8>,
    /// It carries a piece of the output (content or tool-call arguments): the faults count these.
    pub content: bool,
}

/// What a wire format sends for the stream faults.
struct Faults {
    /// An event cut off mid-JSON (`malformed_after`).
    malformed: &'static [u8],
    /// The provider's in-stream error (`stream_error_after`).
    error: &'static [u8],
}

/// Stream `events` in a chunked 200, paced and broken as `behavior` says; `content_head` is the
/// header lines (each ending in CRLF) saying what the stream is (its content type and the like).
async fn write_events(
    stream: &mut TcpStream,
    headers: &ReplyHeaders,
    content_head: &str,
    events: &[Event],
    behavior: &Behavior,
    faults: &Faults,
) -> io::Result<Keep> {
    let head = format!(
        "HTTP/1.1 200 OK\r\n{content_head}transfer-encoding: chunked\r\n{}\r\n",
        headers.render(200)
    );
    stream.write_all(head.as_bytes()).await?;
    let mut content_sent = 0;
    let mut malformed_sent = false;
    for (i, event) in events.iter().enumerate() {
        // Faults come between events, once `content_sent` pieces of output have gone out.
        if i > 0 && behavior.reset_after == Some(content_sent) {
            stream.set_zero_linger()?;
            return Ok(Keep::Closed);
        }
        // Once: several events without content (a stream's head or tail) can follow one count.
        if i > 0 && !malformed_sent && behavior.malformed_after == Some(content_sent) {
            write_chunk(stream, faults.malformed).await?;
            malformed_sent = true;
        }
        if i > 0 && behavior.stream_error_after == Some(content_sent) {
            write_chunk(stream, faults.error).await?;
            break;
        }
        if i > 0 && behavior.chunk_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(behavior.chunk_delay_ms)).await;
        }
        write_chunk(stream, &event.bytes).await?;
        content_sent += usize::from(event.content);
    }
    stream.write_all(b"0\r\n\r\n").await?;
    Ok(Keep::Open)
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    async fn start(behavior: Behavior) -> MockProvider {
        let config = MockConfig {
            behavior,
            ..MockConfig::default()
        };
        MockProvider::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap()
    }

    async fn post(mock: &MockProvider, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn ask(extra: Value) -> Value {
        let mut request = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
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

    #[tokio::test]
    async fn every_answer_carries_a_request_id_and_rate_limits() {
        let mock = start(Behavior::default()).await;
        let first = post(&mock, ask(json!({}))).await;
        let second = post(&mock, ask(json!({}))).await;
        for resp in [&first, &second] {
            let id = header(resp, "x-request-id");
            assert!(
                id.len() == 36 && id.starts_with("req_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
            assert_eq!(header(resp, "x-ratelimit-limit-requests"), "10000");
            assert_eq!(header(resp, "x-ratelimit-limit-tokens"), "10000000");
            assert_eq!(header(resp, "x-ratelimit-reset-requests"), "6ms");
            assert!(header(resp, "x-ratelimit-reset-tokens").ends_with("ms"));
            header(resp, "openai-processing-ms").parse::<u64>().unwrap();
            assert!(resp.headers().get("retry-after").is_none());
        }
        assert_ne!(header(&first, "x-request-id"), header(&second, "x-request-id"));
        assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "9999");
        assert_eq!(header(&second, "x-ratelimit-remaining-requests"), "9998");
        let remaining: u64 = header(&first, "x-ratelimit-remaining-tokens").parse().unwrap();
        let v: Value = first.json().await.unwrap();
        let used = v["usage"]["total_tokens"].as_u64().unwrap();
        assert_eq!(remaining, LIMIT_TOKENS - used);

        let models = reqwest::get(format!("{}/models", mock.base_url())).await.unwrap();
        assert!(header(&models, "x-request-id").starts_with("req_"));
    }

    #[tokio::test]
    async fn a_429_says_when_to_retry() {
        let mock = start(Behavior {
            fail_status: Some(429),
            ..Behavior::default()
        })
        .await;
        for stream in [false, true] {
            let resp = post(&mock, ask(json!({"stream": stream}))).await;
            assert_eq!(resp.status(), 429);
            assert_eq!(header(&resp, "retry-after"), "1");
            assert_eq!(header(&resp, "retry-after-ms"), "1000");
            assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        }
    }

    #[tokio::test]
    async fn a_request_the_api_refuses_gets_its_400() {
        let mock = start(Behavior::default()).await;
        let resp = post(&mock, ask(json!({"n": 0}))).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "n");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn pretty_is_set_per_request() {
        let mock = start(Behavior::default()).await;
        let compact = post(&mock, ask(json!({}))).await.text().await.unwrap();
        assert!(compact.starts_with("{\"id\":\"chatcmpl-"), "{compact}");
        let pretty = post(&mock, ask(json!({"mock": {"pretty": true}})))
            .await
            .text()
            .await
            .unwrap();
        assert!(pretty.starts_with("{\n  \"id\": \"chatcmpl-"), "{pretty}");
        let v: Value = serde_json::from_str(&pretty).unwrap();
        assert!(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Echo: hi"));
    }

    /// The SSE events of a streamed body, each event's `data:` lines joined.
    fn events(body: &str) -> Vec<String> {
        body.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect()
    }

    #[tokio::test]
    async fn streamed_tool_call_arguments_reassemble() {
        let mock = start(Behavior {
            pretty: true,
            ..Behavior::default()
        })
        .await;
        let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query", "limit"]}}}]);
        let body = post(&mock, ask(json!({"stream": true, "tools": tools})))
            .await
            .text()
            .await
            .unwrap();
        let events = events(&body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first["function"]["name"], "lookup");
        assert!(first["id"].as_str().unwrap().starts_with("call_"));
        let arguments: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
            .collect();
        let arguments: Value = serde_json::from_str(&arguments).unwrap();
        assert_eq!(arguments, json!({"query": "example query", "limit": 1}));
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    }

    #[tokio::test]
    async fn a_reset_counts_tool_call_fragments_as_output() {
        let mock = start(Behavior {
            reset_after: Some(2),
            ..Behavior::default()
        })
        .await;
        let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]);
        let mut resp = post(&mock, ask(json!({"stream": true, "tools": tools}))).await;
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
        }
        let events = events(&String::from_utf8(body).unwrap());
        assert_eq!(events.len(), 3, "the call's head and two fragments: {events:?}");
    }
}
