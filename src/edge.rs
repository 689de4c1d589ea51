//! The edge of each listener: what a client may hold before its request reaches Pingora's
//! phases. Connections are counted and capped per listener, and each request head is read
//! here against one deadline for the whole head, then handed to Pingora.
//!
//! Why not one of Pingora's hooks (pingora-core 0.9.1):
//! - Pingora reads a head in `HttpSession::read_request` (`protocols/http/v1/server.rs:278`)
//!   with a timeout per read, never per head (`read_request_buf`, `:211-240`): the 60 s that
//!   `ServerApp::process_new` sets (`apps/mod.rs`, "default 60s") restarts with every byte, so
//!   a head sent a byte at a time, or 300 half-sent heads, hold their connections for as long
//!   as the client likes. After the first request `respect_keepalive` (`:798-815`) turns an
//!   HTTP/1.1 connection's keep-alive to `Infinite`, which reads with no timeout at all
//!   ("FIXME: this should only apply to reads between requests", `:225`): an idle kept-alive
//!   connection is never closed.
//! - `early_request_filter` runs once the head is read: too late for the head.
//! - `ConnectionFilter` (feature `connection_filter`, `listeners/connection_filter.rs`) sees the
//!   peer address at accept and nothing at close, so it cannot count open connections.
//! - A head Pingora cannot parse gets `respond_error(400)`, an empty body, and the connection
//!   closes (`pingora-proxy` `lib.rs:341-365`); no hook lets us write our own answer.
//!
//! So each listener's service runs [`Edge`], a `ServerApp` around Pingora's HTTP app (the
//! HTTP/1 loop of Pingora's own `ServerApp` for HTTP apps, `apps/mod.rs`, with a head reader
//! in front). For each request on a connection, Edge reads bytes into the connection's
//! buffer until they hold a whole head, checks it with `httparse`, and answers what it refuses
//! with OpenAI's error JSON: a late head 408, an oversized one 431, a malformed one, an
//! HTTP/1.1 one without `Host` or one with contradictory framing 400. Only a whole, sane head
//! goes on to Pingora, inside an [`EdgeStream`] that replays the buffered bytes, so Pingora's
//! parse finds the whole head in its first read. The cost per request is one more parse of the
//! head, without allocation: the buffer lives as long as the connection.

use bytes::{Buf, BytesMut};
use komilion_sdk::{ApiError, ErrorKind, Surface};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::metrics::METRICS;

/// Pingora's own limit on a request head (`MAX_HEADER_SIZE`, `protocols/http/v1/common.rs:30`);
/// ours stays below it so an oversized head always gets our 431, never Pingora's empty 400.
pub const PINGORA_MAX_HEADER_BYTES: usize = 1_048_575;
/// Pingora's limit on the number of headers (`MAX_HEADERS`, `v1/common.rs:27`): a head with
/// more gets 431 here rather than an empty 400 there.
const MAX_HEADERS: usize = 256;
/// Bytes read from the socket at a time while waiting for a head.
const READ_CHUNK: usize = 4096;
/// Longest time spent writing one of the edge's own answers to a client that does not read.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// After answering a refused head, the rest of what the client sends is read and dropped for
/// at most this long (and this many bytes) before the connection closes. Closing a socket
/// with unread bytes makes the kernel send a reset, which can destroy the answer before the
/// client reads it (nginx's `lingering_close` does the same).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// Time, size and connection limits on clients, from the config's `limits` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Largest request head; larger ones get 431.
    pub max_header_bytes: usize,
    /// Time to send a whole request head: from the accept of a new connection, or from the
    /// first byte of a next request on a kept-alive one.
    pub head_timeout: Duration,
    /// Time to send a whole request body, once its head is read (applied by the body reader).
    pub body_timeout: Duration,
    /// Time a kept-alive connection may wait for the first byte of its next request.
    pub idle_keepalive: Duration,
    /// Open connections per listener; more get 503.
    pub max_connections: usize,
}

/// One listener's open connections.
struct Listener {
    addr: SocketAddr,
    open: AtomicUsize,
    /// Series resolved once: counting a connection costs two atomic operations.
    open_gauge: IntGauge,
    refused: IntCounter,
}

/// A connection's place in its listener's count, given back when dropped.
struct Slot<'a>(&'a Listener);

impl Listener {
    fn new(addr: SocketAddr, label: &str) -> Listener {
        Listener {
            addr,
            open: AtomicUsize::new(0),
            open_gauge: METRICS.connections_open.with_label_values(&[label]),
            refused: METRICS.connections_refused.with_label_values(&[label]),
        }
    }

    fn enter(&self, cap: usize) -> Option<Slot<'_>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= cap {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused.inc();
            return None;
        }
        self.open_gauge.inc();
        Some(Slot(self))
    }

    /// Whether a connection that arrived on local address `local` is this listener's.
    fn owns(&self, local: &SocketAddr) -> bool {
        self.addr.port() == local.port() && (self.addr.ip().is_unspecified() || self.addr.ip() == local.ip())
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.open_gauge.dec();
    }
}

/// A Pingora HTTP app (the gateway's or the admin API's proxy, the metrics app) behind the
/// edge's limits. Serve it with `Service::new(name, edge)` and the listeners it was built for.
pub struct Edge<A> {
    app: Arc<A>,
    limits: ClientLimits,
    listeners: Vec<Listener>,
}

impl<A> Edge<A> {
    /// `addrs` are the service's listening addresses, as validated by the config.
    pub fn new(app: A, limits: ClientLimits, addrs: &[&str]) -> Edge<A> {
        let listeners = addrs
            .iter()
            .map(|label| {
                let addr = label.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                Listener::new(addr, label)
            })
            .collect();
        Edge {
            app: Arc::new(app),
            limits,
            listeners,
        }
    }

    /// The listener a connection came in on; the first one when the socket says nothing
    /// (a service with one listener, the usual case, needs no lookup).
    fn listener_of(&self, stream: &Stream) -> Option<&Listener> {
        if self.listeners.len() > 1 {
            let local = stream
                .get_socket_digest()
                .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
            if let Some(found) = local.and_then(|local| self.listeners.iter().find(|l| l.owns(&local))) {
                return Some(found);
            }
        }
        self.listeners.first()
    }
}

#[async_trait::async_trait]
impl<A> ServerApp for Edge<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let accepted = Instant::now();
        let _slot = match self.listener_of(&stream) {
            Some(listener) => match listener.enter(self.limits.max_connections) {
                Some(slot) => Some(slot),
                None => {
                    refuse_connection(stream).await;
                    return None;
                }
            },
            None => None,
        };
        // HTTP/2 (ALPN over TLS, or h2c) multiplexes its requests in frames that Pingora reads
        // itself; such a connection is counted but left to Pingora's own handling. The
        // listeners configured today are plain HTTP/1.
        let h2c = self.app.server_options().is_some_and(|o| o.h2c);
        if h2c || !matches!(stream.selected_alpn_proto(), None | Some(ALPN::H1)) {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }

        let mut conn = Box::new(EdgeStream::new(stream));
        let mut watch = shutdown.clone();
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let wait = if first {
                Wait::Head(accepted + self.limits.head_timeout)
            } else {
                Wait::Idle
            };
            match read_head(&mut conn, &self.limits, wait, &mut watch).await {
                Head::Ready => {}
                Head::Close => return None,
                Head::Refuse(reason, error) => {
                    METRICS.bad_heads.with_label_values(&[reason]).inc();
                    answer_and_close(conn, &error).await;
                    return None;
                }
                Head::TimedOut(error) => {
                    answer_and_close(conn, &error).await;
                    return None;
                }
            }
            // From here on, what Pingora's `ServerApp` for HTTP apps does with an HTTP/1
            // connection (`apps/mod.rs`).
            let mut session = ServerSession::new_http1(conn);
            if first {
                // Pingora's own 60 s per read of a first head (which it now finds buffered);
                // once the head is parsed, Pingora sets keep-alive from the request.
                session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
                session
                    .set_keepalive_reuses_remaining(self.app.server_options().and_then(|o| o.keepalive_request_limit));
            } else if let Some(settings) = settings.take() {
                settings.apply_to_session(&mut session);
            }
            let (stream, persistent) = self.app.process_new_http(session, shutdown).await?.consume();
            settings = persistent;
            first = false;
            // Pingora hands back the stream it was given.
            conn = match stream.into_any().downcast::<EdgeStream>() {
                Ok(conn) => conn,
                Err(_) => {
                    tracing::warn!("a reused connection is not the edge's stream; closing it");
                    return None;
                }
            };
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// How long [`read_head`] waits.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// A new connection: its whole head by this instant.
    Head(Instant),
    /// A kept-alive connection: a first byte within the idle timeout, then the whole head
    /// within the head timeout from that byte.
    Idle,
}

/// What waiting for a head ended with.
#[derive(Debug)]
enum Head {
    /// A whole head is buffered.
    Ready,
    /// Close without a word: the client left, sent nothing before its deadline, or the
    /// server is shutting down.
    Close,
    /// Answer this error (the reason labels the metric) and close.
    Refuse(&'static str, ApiError),
    /// Part of a head came, not all of it in time: answer 408 and close.
    TimedOut(ApiError),
}

/// Read until `conn` buffers a whole request head, within the limits.
async fn read_head(conn: &mut EdgeStream, limits: &ClientLimits, wait: Wait, shutdown: &mut ShutdownWatch) -> Head {
    let mut deadline = match wait {
        Wait::Head(deadline) => Some(deadline),
        Wait::Idle => None,
    };
    let mut scan = HeadScan::default();
    loop {
        if !conn.pending.is_empty() {
            // The first byte of a kept-alive connection's next request starts its deadline.
            deadline.get_or_insert_with(|| Instant::now() + limits.head_timeout);
            match scan.check(&conn.pending, limits.max_header_bytes) {
                Scan::Partial => {}
                Scan::Complete => return Head::Ready,
                Scan::Refuse(reason, error) => return Head::Refuse(reason, error),
            }
        }
        let (until, phase) = match deadline {
            Some(deadline) => (deadline, "head"),
            None => (Instant::now() + limits.idle_keepalive, "idle"),
        };
        // A new connection's first request is read even when shutdown has begun (as Pingora
        // does, `apps/mod.rs:345-360`): the client connected before the listener closed and is
        // owed an answer, and the head deadline bounds the wait. Only a kept-alive connection
        // waiting for its next request is closed at shutdown. Biased: bytes already here are
        // taken first.
        let read = if matches!(wait, Wait::Head(_)) {
            tokio::time::timeout_at(until, conn.fill()).await
        } else {
            tokio::select! {
                biased;
                read = tokio::time::timeout_at(until, conn.fill()) => read,
                _ = shutdown.wait_for(|down| *down) => return Head::Close,
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Close,
            Ok(Ok(_)) => {}
            Err(_elapsed) => {
                METRICS.client_timeouts.with_label_values(&[phase]).inc();
                if conn.pending.is_empty() {
                    // Nothing was asked: nothing to answer (a browser's spare connection).
                    return Head::Close;
                }
                let error = ApiError::new(
                    ErrorKind::RequestTimeout,
                    format!(
                        "The request head was not received within {} ms.",
                        limits.head_timeout.as_millis()
                    ),
                )
                .with_code("request_timeout");
                return Head::TimedOut(error);
            }
        }
    }
}

/// Where the search for the end of a head stands, across reads.
#[derive(Debug, Default)]
struct HeadScan {
    /// Bytes of the buffer already searched for the blank line that ends a head.
    searched: usize,
    /// The request line was parsed once already.
    line_checked: bool,
}

#[derive(Debug)]
enum Scan {
    Partial,
    Complete,
    Refuse(&'static str, ApiError),
}

impl HeadScan {
    /// Look at the buffer after a read. It is parsed only when that can end something: at the
    /// first line end (a bad request line is refused without waiting for the rest) and when a
    /// blank line arrived. Parsing after every read would cost a head sent a byte at a time
    /// quadratic time.
    fn check(&mut self, buf: &[u8], max_header_bytes: usize) -> Scan {
        // A blank line ("\n\n" or "\n\r\n") may straddle the previous read.
        let new = &buf[self.searched.saturating_sub(2).min(buf.len())..];
        self.searched = buf.len();
        let ended = has_blank_line(new);
        let first_line = !self.line_checked && memchr::memchr(b'\n', new).is_some();
        if ended || first_line {
            self.line_checked = true;
            match parse_head(buf, max_header_bytes) {
                Parsed::Complete => return Scan::Complete,
                Parsed::Refuse(reason, error) => return Scan::Refuse(reason, error),
                // Pingora escapes a request line with unsafe bytes in its target; let it, once
                // the whole head is here.
                Parsed::Repairable if ended => return Scan::Complete,
                Parsed::Repairable | Parsed::Partial => {}
            }
        }
        if buf.len() > max_header_bytes {
            return Scan::Refuse("too_large", too_large(max_header_bytes));
        }
        Scan::Partial
    }
}

fn has_blank_line(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|i| match bytes.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => bytes.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

#[derive(Debug)]
enum Parsed {
    Partial,
    Complete,
    /// A request line `httparse` refuses but Pingora repairs (`escape_illegal_request_line`).
    Repairable,
    Refuse(&'static str, ApiError),
}

fn too_large(max_header_bytes: usize) -> ApiError {
    ApiError::new(
        ErrorKind::HeadersTooLarge,
        format!("The request line and headers are larger than the limit of {max_header_bytes} bytes."),
    )
    .with_code("headers_too_large")
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidRequest, message).with_code(code)
}

/// Parse a buffered head as Pingora will (`httparse` with its default settings), then check
/// what Pingora does not: `Host` on HTTP/1.1 (RFC 9112 §3.2: a request without it MUST get
/// 400). Framing Pingora would refuse with an empty 400 (`validate_request`,
/// `v1/server.rs:486-512`) is refused here first, with a body.
fn parse_head(buf: &[u8], max_header_bytes: usize) -> Parsed {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) if len > max_header_bytes => {
            Parsed::Refuse("too_large", too_large(max_header_bytes))
        }
        Ok(httparse::Status::Complete(_)) => match check_head(&req) {
            Ok(()) => Parsed::Complete,
            Err((reason, error)) => Parsed::Refuse(reason, error),
        },
        Err(httparse::Error::TooManyHeaders) => Parsed::Refuse(
            "too_large",
            ApiError::new(
                ErrorKind::HeadersTooLarge,
                format!("The request has more than {MAX_HEADERS} headers."),
            )
            .with_code("headers_too_large"),
        ),
        Err(httparse::Error::Token | httparse::Error::Version) if pingora_repairs(buf) => Parsed::Repairable,
        Err(e) => Parsed::Refuse(
            "malformed",
            bad_request(
                "malformed_request",
                format!("The request line or a header is malformed ({e}); send an HTTP/1.1 request."),
            ),
        ),
    }
}

/// Whether Pingora's fallback for a request line `httparse` refuses would take it: its regex
/// `^\w+ (?P<uri>.+) HTTP/\d(?:\.\d)?` on the first line (`REQUEST_LINE_REGEX`,
/// `v1/server.rs:1760`), here over ASCII word characters.
fn pingora_repairs(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let method_len = line
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .count();
    if method_len == 0 || line.get(method_len) != Some(&b' ') {
        return false;
    }
    let rest = &line[method_len + 1..];
    // At least one byte of target, then " HTTP/" and a digit.
    (1..rest.len()).any(|i| rest[i..].starts_with(b" HTTP/") && rest.get(i + 6).is_some_and(u8::is_ascii_digit))
}

/// The framing rules of RFC 9112 that Pingora enforces with an empty 400, `Host`, and CONNECT
/// (which Pingora's proxy refuses with an empty 405, `pingora-proxy` `lib.rs:378-393`).
fn check_head(req: &httparse::Request<'_, '_>) -> Result<(), (&'static str, ApiError)> {
    if req.method == Some("CONNECT") {
        let error = ApiError::new(ErrorKind::MethodNotAllowed, "The gateway does not tunnel (CONNECT).")
            .with_code("method_not_allowed");
        return Err(("method", error));
    }
    let framing = |message: &str| ("framing", bad_request("invalid_framing", message));
    let mut hosts = 0;
    let mut content_length: Option<u64> = None;
    let mut bad_length = false;
    let mut transfer_encoding: Option<&[u8]> = None;
    for header in req.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if header.value.contains(&b'@') {
                return Err(framing("The Host header must not carry user information."));
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                let n = (!token.is_empty() && token.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(token).ok()?.parse::<u64>().ok())
                    .flatten();
                match (n, content_length) {
                    (Some(n), None) => content_length = Some(n),
                    (Some(n), Some(seen)) if n == seen => {}
                    _ => bad_length = true,
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = Some(header.value);
        }
    }
    if hosts == 0 && req.version == Some(1) {
        return Err((
            "missing_host",
            bad_request("missing_host", "An HTTP/1.1 request must carry a Host header."),
        ));
    }
    if hosts > 1 {
        return Err(framing("The request has more than one Host header."));
    }
    match transfer_encoding {
        Some(_) if req.version == Some(0) => Err(framing("An HTTP/1.0 request cannot use Transfer-Encoding.")),
        Some(te) if !last_token(te).eq_ignore_ascii_case(b"chunked") => {
            Err(framing("The last Transfer-Encoding of a request must be chunked."))
        }
        // Transfer-Encoding frames the body; Content-Length is then ignored (RFC 9112 §6.3).
        Some(_) => Ok(()),
        None if bad_length => Err(framing("The Content-Length header is not one non-negative number.")),
        None => Ok(()),
    }
}

fn last_token(value: &[u8]) -> &[u8] {
    value.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii()
}

/// Answer an over-the-cap connection with 503 and close it. Nothing is read: the cap is there
/// to stop spending on connections.
async fn refuse_connection(mut stream: Stream) {
    let error = ApiError::new(
        ErrorKind::Unavailable,
        "The gateway has too many open connections; retry shortly.",
    )
    .with_code("too_many_connections")
    .with_retry_after(1);
    let answer = answer_bytes(&error);
    let _ = tokio::time::timeout(ANSWER_WRITE_TIMEOUT, async {
        stream.write_all(&answer).await?;
        stream.flush().await
    })
    .await;
    Shutdown::shutdown(&mut *stream).await;
}

/// Answer a refused head and close the connection, reading (and dropping) what the client
/// still sends for a little while so that the answer is not lost to a reset.
async fn answer_and_close(mut conn: Box<EdgeStream>, error: &ApiError) {
    let answer = answer_bytes(error);
    let written = tokio::time::timeout(ANSWER_WRITE_TIMEOUT, async {
        conn.inner.write_all(&answer).await?;
        conn.inner.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    Shutdown::shutdown(&mut *conn.inner).await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut drained = 0;
        while drained < LINGER_BYTES {
            conn.pending.clear();
            match conn.fill().await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// A whole HTTP/1.1 response carrying `error` in OpenAI's format (the surface is not known
/// before routing; OpenAI's is the gateway's default), closing the connection.
fn answer_bytes(error: &ApiError) -> Vec<u8> {
    let body = error.render(Surface::OpenAi);
    let status = error.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in error.retry_headers() {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A client connection with the bytes read ahead for the next request head, which reads
/// replay before the socket's. Everything else is the connection's own.
#[derive(Debug)]
pub struct EdgeStream {
    inner: Stream,
    pending: BytesMut,
}

impl EdgeStream {
    fn new(inner: Stream) -> EdgeStream {
        EdgeStream {
            inner,
            pending: BytesMut::new(),
        }
    }

    /// Read more of the socket into the buffer. Once the buffer has been replayed to Pingora,
    /// `reserve` finds its allocation free again and reuses it.
    async fn fill(&mut self) -> io::Result<usize> {
        self.pending.reserve(READ_CHUNK);
        self.inner.read_buf(&mut self.pending).await
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() && buf.remaining() > 0 {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for EdgeStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl Peek for EdgeStream {
    /// Peeked bytes stay in the buffer, where reads find them first.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        while self.pending.len() < buf.len() {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.copy_from_slice(&self.pending[..buf.len()]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn refused(buf: &[u8]) -> (&'static str, u16, &'static str) {
        match parse_head(buf, MAX) {
            Parsed::Refuse(reason, e) => (reason, e.status(), e.code.unwrap_or_default()),
            other => panic!("{:?} was not refused: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn whole_heads_pass_and_half_heads_wait() {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        assert!(matches!(parse_head(head, MAX), Parsed::Complete));
        assert!(matches!(parse_head(&head[..40], MAX), Parsed::Partial));
        assert!(
            matches!(parse_head(b"GET / HTTP/1.0\n\n", MAX), Parsed::Complete),
            "no Host in 1.0, bare LFs"
        );
        let same = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\n";
        assert!(
            matches!(parse_head(same, MAX), Parsed::Complete),
            "identical lengths agree"
        );
        let te = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: x\r\n\r\n";
        assert!(
            matches!(parse_head(te, MAX), Parsed::Complete),
            "chunked last; the length is ignored"
        );
    }

    #[test]
    fn bad_heads_are_refused_with_the_right_status() {
        assert_eq!(refused(b"GARBAGE\r\n\r\n"), ("malformed", 400, "malformed_request"));
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"),
            ("malformed", 400, "malformed_request")
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\n\r\n"),
            ("missing_host", 400, "missing_host")
        );
        assert_eq!(
            refused(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            ("method", 405, "method_not_allowed")
        );
        for framing in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(refused(framing), ("framing", 400, "invalid_framing"));
        }
        let long = format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "a".repeat(MAX));
        assert_eq!(refused(long.as_bytes()), ("too_large", 431, "headers_too_large"));
        let many: String = (0..300).map(|i| format!("x-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(refused(many.as_bytes()), ("too_large", 431, "headers_too_large"));
    }

    #[test]
    fn request_lines_pingora_repairs_are_left_to_it() {
        assert!(matches!(
            parse_head(b"GET /a b|c HTTP/1.1\r\nHost: x\r\n\r\n", MAX),
            Parsed::Repairable
        ));
        assert!(!pingora_repairs(b"GARBAGE\r\n"));
        assert!(!pingora_repairs(b"GET  HTTP/1.1\r\n"));
        assert!(pingora_repairs(b"GET /{x} HTTP/1.1\r\n"));
    }

    #[test]
    fn the_scan_parses_at_the_first_line_and_at_the_blank_line_only() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut scan = HeadScan::default();
        // Byte by byte, as a slow client sends it: complete exactly at the last byte, with a
        // blank line split across reads.
        for end in 1..head.len() {
            assert!(matches!(scan.check(&head[..end], MAX), Scan::Partial), "at {end}");
        }
        assert!(matches!(scan.check(head, MAX), Scan::Complete));

        // A bad request line is refused as soon as it ends.
        let mut scan = HeadScan::default();
        assert!(matches!(
            scan.check(b"NOT HTTP\r\nHost", MAX),
            Scan::Refuse("malformed", _)
        ));

        // A head that never ends is refused once over the limit.
        let mut scan = HeadScan::default();
        let endless = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(2000));
        assert!(matches!(scan.check(&endless.as_bytes()[..100], 1024), Scan::Partial));
        assert!(matches!(
            scan.check(endless.as_bytes(), 1024),
            Scan::Refuse("too_large", _)
        ));
    }

    #[test]
    fn answers_are_whole_responses_with_openai_json() {
        let e = too_large(1024);
        let bytes = answer_bytes(&e);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn listeners_own_their_local_addresses() {
        let any = Listener::new("0.0.0.0:8080".parse().unwrap(), "0.0.0.0:8080");
        let one = Listener::new("127.0.0.1:8081".parse().unwrap(), "127.0.0.1:8081");
        assert!(any.owns(&"10.1.2.3:8080".parse().unwrap()));
        assert!(!any.owns(&"10.1.2.3:8081".parse().unwrap()));
        assert!(one.owns(&"127.0.0.1:8081".parse().unwrap()));
        assert!(!one.owns(&"127.0.0.2:8081".parse().unwrap()));

        let slots: Vec<_> = (0..2).map(|_| one.enter(2)).collect();
        assert!(slots.iter().all(Option::is_some));
        assert!(one.enter(2).is_none(), "over the cap");
        drop(slots);
        assert!(one.enter(2).is_some(), "slots come back");
    }
}
