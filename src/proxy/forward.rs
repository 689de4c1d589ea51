//! Steps 6 and 7 of the flow: send the request to each candidate in turn, and relay the answer.
//!
//! An attempt is abandoned for the next candidate when it fails before anything reached the
//! client: no address, connect failure, timeout, a 429 or 5xx status, or a connection lost
//! before the first body bytes. Once the first byte of an answer went to the client, the
//! gateway is committed to that upstream; if it dies mid-stream the client's stream is ended
//! cleanly with an error event, never left hanging.

use super::body::BodyBuffer;
use super::stream::StreamRelay;
use super::{Gateway, RequestCtx};
use crate::metering::tokens::{count_chat_prompt, count_text};
use crate::metering::usage_from_body;
use crate::metrics::METRICS;
use crate::providers::breaker::{Admission, Outcome};
use crate::providers::byok::AccountKey;
use crate::providers::translate::StreamTranslator;
use crate::upstream::Upstream;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use komilion_sdk::{
    ApiError, AttemptDecision, ChatRequest, ErrorKind, LocalResponse, RoutePlan, Surface, Timing, Usage,
};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest non-streamed upstream answer accepted (they are buffered to be checked whole).
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// How long a pooled connection may idle after being released.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Times a request is re-sent when a pooled connection turns out to be closed.
const STALE_RETRIES: usize = 2;

/// Why an attempt failed before anything reached the client.
#[derive(Debug)]
enum AttemptError {
    NoAddress,
    Connect(Box<pingora::Error>),
    Timeout,
    Lost(Box<pingora::Error>),
    TooLarge,
}

impl AttemptError {
    /// The `kind` label of `komilion_upstream_errors_total`.
    fn kind(&self) -> &'static str {
        match self {
            AttemptError::NoAddress => "no_address",
            AttemptError::Connect(e) if e.etype() == &pingora::ErrorType::ConnectTimedout => "timeout",
            AttemptError::Connect(_) => "connect",
            AttemptError::Timeout => "timeout",
            AttemptError::Lost(_) => "reset",
            AttemptError::TooLarge => "bad_response",
        }
    }

    fn to_api_error(&self, provider: &str) -> ApiError {
        match self {
            AttemptError::NoAddress => ApiError::new(
                ErrorKind::BadGateway,
                format!("The provider `{provider}` has no resolvable address."),
            )
            .with_code("upstream_unreachable"),
            AttemptError::Connect(e) if e.etype() == &pingora::ErrorType::ConnectTimedout => ApiError::new(
                ErrorKind::GatewayTimeout,
                format!("Connecting to the provider `{provider}` timed out."),
            )
            .with_code("upstream_timeout"),
            AttemptError::Connect(_) => ApiError::new(
                ErrorKind::BadGateway,
                format!("The provider `{provider}` could not be reached."),
            )
            .with_code("upstream_unreachable"),
            AttemptError::Timeout => ApiError::new(
                ErrorKind::GatewayTimeout,
                format!("The provider `{provider}` did not answer in time."),
            )
            .with_code("upstream_timeout"),
            AttemptError::Lost(e) => ApiError::new(
                ErrorKind::BadGateway,
                format!(
                    "The connection to the provider `{provider}` was lost before its answer was complete ({}).",
                    e.etype().as_str()
                ),
            )
            .with_code("upstream_connection_lost"),
            AttemptError::TooLarge => ApiError::new(
                ErrorKind::BadGateway,
                format!("The provider `{provider}` sent an oversized answer."),
            )
            .with_code("bad_upstream_response"),
        }
    }
}

/// Headers of a provider's answer passed on to the client: the ones SDKs read (the request id
/// they expose, rate-limit state, how long to wait before a retry) and nothing else, so no
/// hop-by-hop header, cookie or credential of the provider ever reaches a client.
pub type ProviderHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

/// Whether the client gets this header of the provider's answer.
fn passed_to_client(name: &str) -> bool {
    matches!(
        name,
        "x-request-id" | "retry-after" | "retry-after-ms" | "openai-processing-ms"
    ) || name.starts_with("x-ratelimit-")
}

fn provider_headers(header: &pingora::http::ResponseHeader) -> ProviderHeaders {
    header
        .headers
        .iter()
        .filter_map(|(name, value)| {
            if passed_to_client(name.as_str()) {
                Some((name.clone(), value.clone()))
            } else if name.as_str() == "request-id" && !header.headers.contains_key("x-request-id") {
                // Anthropic's name for it; OpenAI's SDKs read `x-request-id`.
                Some((http::HeaderName::from_static("x-request-id"), value.clone()))
            } else {
                None
            }
        })
        .collect()
}

/// What an attempt produced.
enum Answer {
    /// A complete non-streamed answer (JSON, or an error of any status).
    Whole {
        status: u16,
        content_type: String,
        body: Bytes,
        headers: ProviderHeaders,
    },
    /// A stream that has started.
    Stream(Box<StartedStream>),
}

/// A stream's first bytes and the open connection it continues on.
struct StartedStream {
    content_type: String,
    headers: ProviderHeaders,
    first: Bytes,
    http: HttpSession,
    peer: HttpPeer,
    limits: ReadLimits,
}

/// Where one attempt goes: the model, and the account's own key if it brought one.
#[derive(Clone, Copy)]
struct Target<'a> {
    model: &'a str,
    account_key: Option<&'a str>,
}

/// How long reading an answer may take: the longest silence, and when the whole exchange must
/// be over (`timeouts.idle_ms` and `timeouts.total_ms`).
#[derive(Debug, Clone, Copy)]
struct ReadLimits {
    idle: Duration,
    ends_by: Instant,
}

/// Statuses worth trying another candidate for. A 401 or 403 is the provider refusing the
/// gateway's own credential: another provider may well take the request.
fn should_fall_back(status: u16) -> bool {
    status == 401 || status == 403 || status == 429 || status >= 500
}

/// A provider refused the gateway's credential. The client gets neither the provider's body
/// (it may quote the key) nor a 401 of its own (its SDK would say the client's key is wrong).
fn upstream_auth_failed(provider: &str, status: u16) -> ApiError {
    ApiError::new(
        ErrorKind::BadGateway,
        format!(
            "The provider `{provider}` refused the gateway's credentials (HTTP {status}); the operator has been told."
        ),
    )
    .with_code("upstream_auth_failed")
}

impl Gateway {
    pub(super) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        chat: &mut ChatRequest,
        plan: &RoutePlan,
    ) -> Result<(), LocalResponse> {
        let mut last_error = None;
        // The request in no provider's format, decoded once if a candidate needs it.
        let mut canonical = None;
        let total = plan.candidates.len();
        let deadline = ctx.exchange.timing.started + self.fallback.deadline;
        for (i, candidate) in plan.candidates.iter().enumerate() {
            if ctx.exchange.attempts as usize >= self.fallback.max_attempts {
                break;
            }
            let Some(upstream) = self.upstreams.get(&candidate.provider) else {
                last_error = Some(ApiError::new(
                    ErrorKind::BadGateway,
                    format!("Unknown provider `{}`.", candidate.provider),
                ));
                continue;
            };
            if self.chain.on_attempt(candidate, &mut ctx.exchange).await == AttemptDecision::Skip {
                continue;
            }
            let Some(time_left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
            else {
                last_error = Some(
                    ApiError::new(
                        ErrorKind::GatewayTimeout,
                        "No provider answered within the request's deadline.",
                    )
                    .with_code("upstream_timeout"),
                );
                break;
            };
            let breaker_model = self.models.metric_label(&candidate.model, &self.pricing);
            if let Admission::Refused { retry_in, rate_limited } =
                self.breakers.admit(upstream.name(), breaker_model, Instant::now())
            {
                METRICS.breaker_rejections.with_label_values(&[upstream.name()]).inc();
                self.chain
                    .on_upstream_failure(candidate, "breaker_open", &mut ctx.exchange);
                last_error = Some(breaker_open(upstream.name(), retry_in, rate_limited));
                continue;
            }
            // An account's own key for this provider replaces the operator's.
            let account_key = match (&self.account_keys, &ctx.exchange.principal) {
                (Some(keys), Some(principal)) => match keys.key_for(&principal.account_id, upstream.name()).await {
                    Ok(key) => key,
                    Err(e) => {
                        last_error = Some(e);
                        continue;
                    }
                },
                _ => None,
            };
            let scrubber = match &account_key {
                Some(key) => Arc::new(self.upstreams.scrubber.with_secret(key.expose())),
                None => self.upstreams.scrubber.clone(),
            };
            let body = match upstream_body(upstream, chat, &candidate.model, &mut canonical) {
                Ok(body) => body,
                Err(e) => {
                    // What this provider's format cannot express; another candidate may.
                    last_error = Some(e);
                    continue;
                }
            };
            ctx.exchange.attempts += 1;
            // The last candidate, or the last attempt allowed: its answer, even an error, is
            // the client's.
            let is_last = i + 1 == total || ctx.exchange.attempts as usize >= self.fallback.max_attempts;
            ctx.exchange.provider = Some(candidate.provider.clone());
            ctx.exchange.routed_model = Some(candidate.model.clone());
            let mut answer = match self
                .attempt(
                    upstream,
                    Target {
                        model: &candidate.model,
                        account_key: account_key.as_ref().map(AccountKey::expose),
                    },
                    chat.stream,
                    body,
                    time_left,
                    &mut ctx.exchange.timing,
                )
                .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    METRICS
                        .upstream_errors
                        .with_label_values(&[upstream.name(), e.kind()])
                        .inc();
                    self.breakers
                        .record(upstream.name(), breaker_model, Outcome::Failure, Instant::now());
                    self.chain.on_upstream_failure(candidate, e.kind(), &mut ctx.exchange);
                    tracing::debug!(provider = upstream.name(), request_id = %ctx.exchange.request_id, "attempt failed: {e:?}");
                    if !is_last {
                        METRICS.fallbacks.with_label_values(&[upstream.name()]).inc();
                    }
                    last_error = Some(e.to_api_error(upstream.name()));
                    continue;
                }
            };
            let status = match &answer {
                Answer::Whole { status, .. } => *status,
                Answer::Stream(_) => 200,
            };
            self.chain.on_upstream_status(candidate, status, &mut ctx.exchange);
            let outcome = match &answer {
                Answer::Whole { headers, .. } => outcome_of(status, headers),
                Answer::Stream(_) => Outcome::Success,
            };
            self.breakers
                .record(upstream.name(), breaker_model, outcome, Instant::now());
            if let Answer::Whole {
                body,
                status: client_status,
                content_type,
                ..
            } = &mut answer
            {
                if !(200..300).contains(&status) {
                    // An error body may quote a credential: masked once, for the client and for
                    // the log (a successful answer is relayed byte for byte). Loud for what an
                    // operator must act on, quiet for a client's own mistakes.
                    *body = scrubber.scrub_body(std::mem::take(body));
                    let masked = String::from_utf8_lossy(&body[..body.len().min(4096)]);
                    if status >= 500 || status == 401 || status == 403 {
                        tracing::warn!(provider = upstream.name(), request_id = %ctx.exchange.request_id, status, "the provider answered an error: {masked}");
                    } else {
                        tracing::debug!(provider = upstream.name(), request_id = %ctx.exchange.request_id, status, "the provider answered an error: {masked}");
                    }
                }
                if let Some(adapter) = upstream.translator() {
                    // Another format's answer: the client gets its own surface's.
                    match translate_whole(adapter, status, body, &candidate.model, ctx.exchange.surface) {
                        Ok((translated, usage)) => {
                            *client_status = translated.0;
                            *body = translated.1;
                            *content_type = "application/json".to_owned();
                            if let Some(usage) = usage {
                                ctx.exchange.usage = usage;
                            }
                        }
                        Err(why) => {
                            let error = invalid_answer(upstream, &ctx.exchange.request_id, &why);
                            *client_status = error.status();
                            *body = Bytes::from(error.render(ctx.exchange.surface));
                            *content_type = "application/json".to_owned();
                        }
                    }
                }
            }
            if status == 401 || status == 403 {
                METRICS
                    .upstream_errors
                    .with_label_values(&[upstream.name(), "auth"])
                    .inc();
                if !is_last {
                    METRICS.fallbacks.with_label_values(&[upstream.name()]).inc();
                }
                last_error = Some(upstream_auth_failed(upstream.name(), status));
                continue;
            }
            if should_fall_back(status) {
                let kind = if status == 429 { "status_429" } else { "status_5xx" };
                METRICS
                    .upstream_errors
                    .with_label_values(&[upstream.name(), kind])
                    .inc();
                if !is_last {
                    METRICS.fallbacks.with_label_values(&[upstream.name()]).inc();
                    continue;
                }
            }
            ctx.account_key_used = account_key.is_some();
            match answer {
                Answer::Whole {
                    status,
                    content_type,
                    body,
                    headers,
                } => {
                    ctx.provider_headers = headers;
                    if (200..300).contains(&status) && upstream.translator().is_none() {
                        ctx.exchange.usage =
                            usage_from_body(&body).unwrap_or_else(|| estimate_whole(chat, &candidate.model, &body));
                    } else if (200..300).contains(&status) && ctx.exchange.usage == Usage::default() {
                        ctx.exchange.usage = estimate_whole(chat, &candidate.model, &body);
                    }
                    let (status, content_type, body) = match ctx.exchange.surface {
                        Surface::OpenAi => (status, content_type, body),
                        Surface::Anthropic => {
                            let (status, body) = as_messages_answer(upstream, status, body, &candidate.model, ctx);
                            (status, "application/json".to_owned(), body)
                        }
                    };
                    // `send_body` spools the record before the client can see the answer end.
                    self.send_body(session, ctx, status, &content_type, body).await;
                }
                Answer::Stream(started) => {
                    self.relay_stream(session, ctx, upstream, chat, *started, scrubber)
                        .await
                }
            }
            return Ok(());
        }
        Err(last_error
            .unwrap_or_else(|| {
                ApiError::new(ErrorKind::BadGateway, "No upstream could take the request.").with_code("no_upstream")
            })
            .into())
    }

    /// Send the request and read enough of the answer to know it is good: the whole body, or
    /// the first piece of a stream.
    async fn attempt(
        &self,
        upstream: &Upstream,
        target: Target<'_>,
        stream: bool,
        body: Bytes,
        time_left: Duration,
        timing: &mut Timing,
    ) -> Result<Answer, AttemptError> {
        let peer = upstream.peer().ok_or(AttemptError::NoAddress)?;
        let started = Instant::now();
        // The whole exchange, a long stream included, ends by this time.
        let ends_by = started + upstream.config.total_timeout;
        let first_byte = upstream.config.first_byte_timeout.min(time_left);
        let sent = self.send(upstream, target, &peer, stream, body, first_byte).await;
        let ttfb = started.elapsed();
        timing.upstream_wait += ttfb;
        let mut http = sent?;
        timing.upstream_first_byte = Some(Instant::now().saturating_duration_since(timing.started));
        METRICS
            .upstream_ttfb
            .with_label_values(&[upstream.name()])
            .observe(ttfb.as_secs_f64());

        let (status, content_type, headers) = match http.response_header() {
            Some(h) => (
                h.status.as_u16(),
                h.headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_owned(),
                provider_headers(h),
            ),
            None => {
                return Err(AttemptError::Lost(pingora::Error::explain(
                    pingora::ErrorType::InvalidHTTPHeader,
                    "no response header",
                )))
            }
        };
        let limits = ReadLimits {
            idle: upstream.config.idle_timeout,
            ends_by,
        };
        if status == 200 && content_type.starts_with("text/event-stream") {
            let first = read_piece(&mut http, limits, timing).await?.unwrap_or_default();
            return Ok(Answer::Stream(Box::new(StartedStream {
                content_type,
                headers,
                first,
                http,
                peer,
                limits,
            })));
        }
        let mut body = BodyBuffer::new(MAX_UPSTREAM_BODY, 0);
        while let Some(piece) = read_piece(&mut http, limits, timing).await? {
            body.push(piece).map_err(|_| AttemptError::TooLarge)?;
        }
        self.release(http, &peer).await;
        Ok(Answer::Whole {
            status,
            content_type,
            body: body.finish(),
            headers,
        })
    }

    /// Connect (or reuse a pooled connection), send the request and read the status line.
    async fn send(
        &self,
        upstream: &Upstream,
        target: Target<'_>,
        peer: &HttpPeer,
        stream: bool,
        body: Bytes,
        ttfb: Duration,
    ) -> Result<HttpSession, AttemptError> {
        let mut round = 0;
        loop {
            let (mut http, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(AttemptError::Connect)?;
            let header = upstream.request_header(target.model, stream, body.len(), target.account_key);
            let exchange = async {
                // Pingora flushes the header on its own: cork the socket so header and body
                // leave together and the provider is woken once, not twice.
                cork(http.stream(), true);
                http.write_request_header(header).await?;
                http.write_request_body(body.clone(), true).await?;
                http.finish_request_body().await?;
                cork(http.stream(), false);
                http.read_response_header().await
            };
            match pingora::time::timeout(ttfb, exchange).await {
                Ok(Ok(())) => return Ok(http),
                Err(_) => return Err(AttemptError::Timeout),
                // A pooled connection the provider had already closed: nothing was processed,
                // so sending again on a fresh one is safe.
                Ok(Err(_)) if reused && round < STALE_RETRIES => round += 1,
                Ok(Err(e)) => return Err(AttemptError::Lost(e)),
            }
        }
    }

    async fn release(&self, mut http: HttpSession, peer: &HttpPeer) {
        if http.response_done() {
            self.connector.release_http_session(http, peer, Some(POOL_IDLE)).await;
        }
    }

    /// Relay a started stream to the client until it ends, the upstream dies or the client goes.
    async fn relay_stream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        upstream: &Upstream,
        chat: &ChatRequest,
        started: StartedStream,
        scrubber: Arc<crate::upstream::scrub::Scrubber>,
    ) {
        let StartedStream {
            content_type,
            headers,
            first,
            mut http,
            peer,
            limits,
        } = started;
        ctx.provider_headers = headers;
        let Some(mut resp) = self.response_header(ctx, 200, &content_type) else {
            return;
        };
        let _ = resp.insert_header(http::header::CACHE_CONTROL, "no-cache");
        // Without a length or chunked framing Pingora ends an HTTP/1.1 body by closing the
        // connection; chunked keeps the client's connection reusable (HTTP/1.0 clients get
        // the close-delimited body they understand).
        super::frame_unknown_length(session, &mut resp);
        ctx.status = 200;
        let model = ctx.exchange.routed_model.clone().unwrap_or_default();
        // Pingora sends the header in a write of its own; corked until the first events are
        // written, header and events leave as one segment.
        let mut corked = true;
        cork(session.stream(), true);
        if session.write_response_header(resp, false).await.is_err() {
            cork(session.stream(), false);
            ctx.client_gone = true;
            self.finish_usage(ctx, 200);
            return;
        }
        // The gateway asked for the usage chunk; the client gets it only if it asked too.
        let mut relay = StreamRelay::new(!chat.include_usage, &model, self.stream_limits, scrubber);
        if let Some(adapter) = upstream.translator() {
            relay = relay.translating(StreamTranslator::new(
                adapter,
                &model,
                unix_now(),
                self.stream_limits.max_event_bytes,
            ));
        }
        relay = relay.for_surface(ctx.exchange.surface, &model);
        // Events that arrived together leave together: a provider sends each event as its own
        // HTTP chunk, and writing them one by one would cost the client a wake-up per event.
        let mut outbox = Outbox::default();
        let mut piece = Some(first);
        loop {
            if let Some(chunk) = piece.take() {
                let fed = relay.feed(&chunk, &self.chain, &mut ctx.exchange);
                if let Some(out) = fed.out {
                    outbox.push(out);
                }
                if let Some(why) = fed.broken {
                    // Never relay what the client's SDK cannot parse: end its stream cleanly
                    // with an error, bill what was delivered, and drop the upstream connection.
                    let error = invalid_answer(upstream, &ctx.exchange.request_id, &why);
                    ctx.exchange.usage = stream_usage(&mut relay, chat, &model);
                    self.finish_usage(ctx, 200);
                    outbox.push(stream_error_event(&error, ctx.exchange.surface));
                    if end_client_stream(session, outbox.take()).await.is_err() {
                        ctx.client_gone = true;
                    }
                    return;
                }
            }
            // A piece already here is taken without waiting (Pingora's body read is cancel-safe:
            // a poll that finds nothing consumes nothing).
            let ready = if outbox.len() < OUTBOX_MAX {
                read_piece(&mut http, limits, &mut ctx.exchange.timing).now_or_never()
            } else {
                None
            };
            let next = match ready {
                Some(ready) => ready,
                None => {
                    let written = match outbox.take() {
                        Some(out) => session.write_response_body(Some(out), false).await,
                        None => Ok(()),
                    };
                    // Nothing more is at hand: whatever is written goes out now.
                    if std::mem::take(&mut corked) {
                        cork(session.stream(), false);
                    }
                    if written.is_err() {
                        // The client left: dropping the upstream connection stops the
                        // generation; what was delivered is billed.
                        ctx.client_gone = true;
                        ctx.exchange.usage = stream_usage(&mut relay, chat, &model);
                        self.finish_usage(ctx, 200);
                        return;
                    }
                    read_piece(&mut http, limits, &mut ctx.exchange.timing).await
                }
            };
            match next {
                Ok(Some(chunk)) => piece = Some(chunk),
                Ok(None) => {
                    let fed = relay.finish(&self.chain, &mut ctx.exchange);
                    if let Some(out) = fed.out {
                        outbox.push(out);
                    }
                    if let Some(why) = fed.broken {
                        let error = invalid_answer(upstream, &ctx.exchange.request_id, &why);
                        outbox.push(stream_error_event(&error, ctx.exchange.surface));
                    }
                    ctx.exchange.usage = stream_usage(&mut relay, chat, &model);
                    self.finish_usage(ctx, 200);
                    if end_client_stream(session, outbox.take()).await.is_err() {
                        ctx.client_gone = true;
                    }
                    self.release(http, &peer).await;
                    return;
                }
                Err(e) => {
                    METRICS
                        .upstream_errors
                        .with_label_values(&[upstream.name(), e.kind()])
                        .inc();
                    tracing::warn!(provider = upstream.name(), request_id = %ctx.exchange.request_id, "stream ended early: {e:?}");
                    let breaker_model = self.models.metric_label(&model, &self.pricing);
                    self.breakers
                        .record(upstream.name(), breaker_model, Outcome::Failure, Instant::now());
                    ctx.exchange.usage = stream_usage(&mut relay, chat, &model);
                    self.finish_usage(ctx, 200);
                    outbox.push(stream_error_event(
                        &e.to_api_error(upstream.name()),
                        ctx.exchange.surface,
                    ));
                    if end_client_stream(session, outbox.take()).await.is_err() {
                        ctx.client_gone = true;
                    }
                    return;
                }
            }
        }
    }
}

/// Write the stream's last bytes and end it: corked, so the data and the chunked terminator
/// (and a header not yet sent) leave as one segment.
async fn end_client_stream(session: &mut Session, last: Option<Bytes>) -> pingora::Result<()> {
    cork(session.stream(), true);
    let written = session.write_response_body(last, true).await;
    cork(session.stream(), false);
    written
}

/// Relayed bytes gathered before one write to the client: at most this much.
const OUTBOX_MAX: usize = 64 * 1024;

/// What the relay will write to the client next, as one piece.
#[derive(Default)]
struct Outbox {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Outbox {
    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        match (&mut self.first, &mut self.more) {
            (None, _) => self.first = Some(bytes),
            (Some(_), Some(more)) => more.extend_from_slice(&bytes),
            (Some(first), more @ None) => {
                // A second piece: only now is copying worth it.
                let mut joined = BytesMut::with_capacity(first.len() + bytes.len() * 4);
                joined.extend_from_slice(first);
                joined.extend_from_slice(&bytes);
                *more = Some(joined);
            }
        }
    }

    fn len(&self) -> usize {
        match (&self.first, &self.more) {
            (_, Some(more)) => more.len(),
            (Some(first), None) => first.len(),
            (None, None) => 0,
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        let first = self.first.take();
        match self.more.take() {
            Some(more) => Some(more.freeze()),
            None => first,
        }
    }
}

/// A provider's answer that cannot be relayed (a body or stream event that is not valid, an
/// event over the size cap): counted and logged, and the error the client gets instead.
fn invalid_answer(upstream: &Upstream, request_id: &str, why: &str) -> ApiError {
    METRICS
        .upstream_errors
        .with_label_values(&[upstream.name(), "bad_response"])
        .inc();
    tracing::warn!(provider = upstream.name(), request_id, "stream ended: {why}");
    ApiError::new(
        ErrorKind::BadGateway,
        format!("The provider `{}` sent an invalid answer: {why}.", upstream.name()),
    )
    .with_code("bad_upstream_response")
}

/// A stream's usage: the provider's, or counted from what was delivered.
fn stream_usage(relay: &mut StreamRelay, chat: &ChatRequest, model: &str) -> Usage {
    match relay.provider_usage() {
        Some(usage) => usage,
        None => Usage {
            input_tokens: count_chat_prompt(model, &chat.messages),
            output_tokens: relay.meter.delivered_output_tokens(),
            estimated: true,
            ..Usage::default()
        },
    }
}

/// The body for one attempt: the client's own, spliced, for an OpenAI-compatible provider;
/// otherwise the canonical request (decoded on first need) in the provider's format.
fn upstream_body(
    upstream: &Upstream,
    chat: &mut ChatRequest,
    model: &str,
    canonical: &mut Option<crate::formats::canonical::Request>,
) -> Result<Bytes, ApiError> {
    let Some(adapter) = upstream.translator() else {
        chat.set_upstream_model(model);
        // Usage comes from the provider's own figures: ask for the stream's usage chunk
        // (the relay removes it again if the client did not ask), unless this provider
        // refuses the field.
        chat.request_upstream_usage(upstream.config.stream_usage);
        return Ok(chat.upstream_body());
    };
    if canonical.is_none() {
        // Plugins may have rewritten fields: decode what would go upstream, not the original.
        *canonical = Some(crate::formats::openai_chat::decode_request(&chat.upstream_body())?);
    }
    let request = canonical
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorKind::Internal, "no request"))?;
    adapter.encode_request(request, model).map(Bytes::from)
}

/// A whole answer of another format as the client's surface's: the status and body to send,
/// and the provider's usage; Err when a successful answer cannot be read.
fn translate_whole(
    adapter: &dyn crate::providers::ProviderAdapter,
    status: u16,
    body: &[u8],
    model: &str,
    surface: Surface,
) -> Result<((u16, Bytes), Option<Usage>), String> {
    if !(200..300).contains(&status) {
        let error = adapter.decode_error(status, body);
        return Ok(((error.status(), Bytes::from(error.render(surface))), None));
    }
    let answer = adapter.decode_answer(body)?;
    let encoded = crate::formats::openai_chat::encode_answer(&answer, model, unix_now());
    Ok(((status, Bytes::from(encoded)), answer.usage))
}

/// A whole answer, already in OpenAI's shape (or, for an error from a provider of another
/// format, already in the client's), as a Messages client reads it.
fn as_messages_answer(upstream: &Upstream, status: u16, body: Bytes, model: &str, ctx: &RequestCtx) -> (u16, Bytes) {
    use crate::providers::ProviderAdapter;
    let openai = crate::providers::openai::OpenAi;
    if !(200..300).contains(&status) {
        if upstream.translator().is_some() {
            return (status, body);
        }
        let error = openai.decode_error(status, &body);
        return (error.status(), Bytes::from(error.render(Surface::Anthropic)));
    }
    match openai.decode_answer(&body) {
        Ok(mut answer) => {
            // The recorded usage: the provider's own, cache writes included.
            answer.usage = Some(ctx.exchange.usage);
            (
                status,
                Bytes::from(crate::formats::anthropic_messages::encode_answer(&answer, model)),
            )
        }
        Err(why) => {
            let error = invalid_answer(upstream, &ctx.exchange.request_id, &why);
            (error.status(), Bytes::from(error.render(Surface::Anthropic)))
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What an answer's status says about the provider's health, for its breaker.
fn outcome_of(status: u16, headers: &ProviderHeaders) -> Outcome {
    match status {
        429 => Outcome::RateLimited {
            retry_after: retry_after(headers),
        },
        401 | 403 => Outcome::Failure,
        s if s >= 500 => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// The wait a provider asked for: `retry-after-ms`, else `retry-after` in seconds (an HTTP date
/// is not honoured: the breaker's cooldown applies instead).
fn retry_after(headers: &ProviderHeaders) -> Option<Duration> {
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = value("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return (ms.is_finite() && ms > 0.0).then(|| Duration::from_millis(ms.min(1e12) as u64));
    }
    value("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A candidate skipped by its open breaker; the client learns when to come back. A provider
/// that said "retry after" is a rate limit to the client too (its SDK backs off), one that keeps
/// failing is unavailable.
fn breaker_open(provider: &str, retry_in: Duration, rate_limited: bool) -> ApiError {
    let ms = (retry_in.as_millis() as u64).max(1);
    let secs = ms.div_ceil(1000);
    let error = if rate_limited {
        ApiError::new(
            ErrorKind::RateLimited,
            format!("The provider `{provider}` asked for a pause; it is tried again in {secs} s."),
        )
        .with_code("rate_limit_exceeded")
    } else {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("The provider `{provider}` is failing and is skipped for now; it is tried again in {secs} s."),
        )
        .with_code("provider_unavailable")
    };
    error.with_retry_after_ms(ms)
}

/// A JSON answer without usage: count its prompt and message text.
fn estimate_whole(chat: &ChatRequest, model: &str, body: &[u8]) -> Usage {
    let text: String = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["choices"].as_array().map(|choices| {
                choices
                    .iter()
                    .filter_map(|c| c["message"]["content"].as_str())
                    .collect::<Vec<_>>()
                    .concat()
            })
        })
        .unwrap_or_default();
    Usage {
        input_tokens: count_chat_prompt(model, &chat.messages),
        output_tokens: if text.is_empty() { 0 } else { count_text(model, &text) },
        estimated: true,
        ..Usage::default()
    }
}

/// Set or clear `TCP_CORK` on a connection (Linux; a no-op elsewhere or without a TCP stream).
fn cork(stream: Option<&pingora::protocols::Stream>, on: bool) {
    #[cfg(target_os = "linux")]
    if let Some(stream) = stream {
        let fd = stream.id();
        // SAFETY: `fd` is the socket owned by `stream`, which outlives this borrow; setsockopt
        // neither closes nor keeps it.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = socket2::SockRef::from(&fd).set_tcp_cork(on);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, on);
}

/// Read the next piece of the upstream body within the idle timeout and the exchange's total.
async fn read_piece(
    http: &mut HttpSession,
    limits: ReadLimits,
    timing: &mut Timing,
) -> Result<Option<Bytes>, AttemptError> {
    let started = Instant::now();
    let wait = limits.idle.min(limits.ends_by.saturating_duration_since(started));
    let read = pingora::time::timeout(wait, http.read_response_body()).await;
    timing.upstream_wait += started.elapsed();
    match read {
        Ok(Ok(piece)) => Ok(piece),
        Ok(Err(e)) => Err(AttemptError::Lost(e)),
        Err(_) => Err(AttemptError::Timeout),
    }
}

/// The last events of a stream whose upstream died: an error the client's SDK raises, then
/// (OpenAI) the end marker, so clients that reconnect on an unterminated stream do not replay
/// the request.
fn stream_error_event(error: &ApiError, surface: Surface) -> Bytes {
    let json = error.render(surface);
    let mut out = Vec::with_capacity(json.len() + 40);
    match surface {
        Surface::OpenAi => {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&json);
            out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        }
        Surface::Anthropic => {
            out.extend_from_slice(b"event: error\ndata: ");
            out.extend_from_slice(&json);
            out.extend_from_slice(b"\n\n");
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_joins_pieces_in_order_and_copies_only_when_there_are_several() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.take(), None);
        let one = Bytes::from_static(b"data: 1\n\n");
        outbox.push(one.clone());
        outbox.push(Bytes::new());
        let taken = outbox.take().unwrap();
        assert_eq!(taken.as_ptr(), one.as_ptr(), "a single piece goes out as it came");
        for piece in ["data: 1\n\n", "data: 2\n\n", "data: [DONE]\n\n"] {
            outbox.push(Bytes::from(piece));
        }
        assert_eq!(outbox.len(), 32);
        assert_eq!(&outbox.take().unwrap()[..], b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n");
        assert_eq!(outbox.take(), None, "taking empties it");
    }
}
