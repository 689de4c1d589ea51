//! The simulated LLM provider used by tests, benches and `komilion demo`.
//!
//! A small HTTP/1.1 server (keep-alive, `Content-Length` and chunked bodies, `Expect:
//! 100-continue`) written directly on tokio so that every byte it sends is under test control:
//! it can stall before the first byte, pace its chunks, fail with a status, reset the connection
//! mid-stream or emit a malformed event. The wire formats live in one file per provider protocol.
//!
//! Behaviour comes from [`Behavior`]: the instance default, overridden per request by a `"mock"`
//! object in the JSON body (the gateway forwards unknown fields untouched) or an
//! `x-mock-behavior` header holding the same JSON.

pub mod openai;

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
    /// Answer with this status and OpenAI's error body for it.
    pub fail_status: Option<u16>,
    /// Reset the connection (TCP RST) after this many content chunks.
    pub reset_after: Option<usize>,
    /// Send a malformed event after this many content chunks.
    pub malformed_after: Option<usize>,
    /// Leave usage out of the answer entirely (what some providers do).
    pub omit_usage: bool,
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
            omit_usage: false,
        }
    }
}

/// Settings of one simulated provider instance.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// If set, requests must carry `Authorization: Bearer <api_key>` or get OpenAI's 401.
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

async fn write_simple(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    request_id: &str,
) -> io::Result<Keep> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nopenai-processing-ms: 1\r\n\r\n",
        reason(status),
        body.len()
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
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn respond(stream: &mut TcpStream, state: &State, head: &Head, body: &[u8]) -> io::Result<Keep> {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("req_mock{n:016x}");
    let path = head.path.split('?').next().unwrap_or("");
    if let Some(key) = &state.config.api_key {
        let presented = head.header("authorization").and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(key.as_str()) {
            return write_simple(stream, 401, "application/json", &openai::error_body(401), &request_id).await;
        }
    }
    match (head.method.as_str(), path) {
        ("GET", "/v1/models" | "/models") => {
            let body = openai::models_body(&state.config.models, now_secs());
            write_simple(stream, 200, "application/json", &body, &request_id).await
        }
        ("POST", "/v1/chat/completions" | "/chat/completions") => {
            chat_completion(stream, state, head, body, n, &request_id).await
        }
        _ => write_simple(stream, 404, "application/json", &openai::error_body(404), &request_id).await,
    }
}

/// Words of the filler text after the echo.
const FILLER: [&str; 16] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", " while", " the", " gateway",
    " counts", " every", " token", ".",
];

/// The answer's pieces: an echo of the start of the last user message (so concurrent callers
/// can check they got their own answer), then filler, `chunks` pieces in all.
fn answer_pieces(request: &serde_json::Value, chunks: usize) -> Vec<String> {
    let last_user = request["messages"]
        .as_array()
        .and_then(|msgs| msgs.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default();
    let echo: String = last_user.chars().take(64).collect();
    let mut pieces = Vec::with_capacity(chunks);
    if chunks > 0 {
        pieces.push(format!("Echo: {echo}"));
    }
    for i in 1..chunks {
        pieces.push(FILLER[(i - 1) % FILLER.len()].to_owned());
    }
    pieces
}

/// The prompt's tokens as the real API counts them (tiktoken, OpenAI's chat format). The
/// gateway's estimates use the same counting, so tests can compare them exactly.
fn prompt_tokens(body: &[u8], model: &str) -> u64 {
    match komilion_sdk::ChatRequest::parse(bytes::Bytes::copy_from_slice(body)) {
        Ok(chat) => crate::metering::tokens::count_chat_prompt(model, &chat.messages),
        Err(_) => 0,
    }
}

async fn chat_completion(
    stream: &mut TcpStream,
    state: &State,
    head: &Head,
    body: &[u8],
    n: u64,
    request_id: &str,
) -> io::Result<Keep> {
    let request: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return write_simple(stream, 400, "application/json", &openai::error_body(400), request_id).await,
    };
    let behavior = match behavior_for(state, head, &request) {
        Ok(b) => b,
        Err(msg) => {
            let body = serde_json::to_vec(&serde_json::json!({"error": {"message": msg, "type": "invalid_request_error", "param": "mock", "code": null}}))
                .unwrap_or_default();
            return write_simple(stream, 400, "application/json", &body, request_id).await;
        }
    };
    if behavior.ttfb_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behavior.ttfb_ms)).await;
    }
    if let Some(status) = behavior.fail_status {
        return write_simple(
            stream,
            status,
            "application/json",
            &openai::error_body(status),
            request_id,
        )
        .await;
    }
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    let pieces = answer_pieces(&request, behavior.chunks);
    let id = format!("chatcmpl-mock{n:020}");
    let completion = openai::Completion {
        id: &id,
        created: now_secs(),
        model: &model,
        pieces: &pieces,
        prompt_tokens: prompt_tokens(body, &model),
        completion_tokens: crate::metering::tokens::count_text(&model, &pieces.concat()),
    };
    let stream_requested = request["stream"].as_bool().unwrap_or(false);
    if !stream_requested {
        let mut body = completion.body();
        if behavior.omit_usage {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
                body = serde_json::to_vec(&v).unwrap_or_default();
            }
        }
        return write_simple(stream, 200, "application/json", &body, request_id).await;
    }

    let include_usage = request["stream_options"]["include_usage"].as_bool().unwrap_or(false) && !behavior.omit_usage;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\nx-request-id: {request_id}\r\nopenai-processing-ms: 1\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let events = completion.events(include_usage);
    for (i, event) in events.iter().enumerate() {
        // Events 1..=pieces are content; `i - 1` content chunks precede event `i`.
        let content_sent = i.saturating_sub(1).min(pieces.len());
        if i > 0 && behavior.reset_after == Some(content_sent) {
            stream.set_zero_linger()?;
            return Ok(Keep::Closed);
        }
        if i > 0 && behavior.malformed_after == Some(content_sent) {
            write_chunk(stream, b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [\n\n").await?;
        }
        if i > 0 && behavior.chunk_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(behavior.chunk_delay_ms)).await;
        }
        write_chunk(stream, event).await?;
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
