//! The gateway's `ProxyHttp` implementation: the request flow of DESIGN.md §1.
//!
//! ```text
//! request_filter ── route ── on_headers ── read body ── parse ── on_body ── plan ── on_route
//!                                                                                    │
//!                         forward: for each candidate: on_attempt, send, status ─────┘
//!                         relay: stream back (on_event per event), or buffer JSON
//! logging ── metrics, on_complete (runs on every path)
//! ```
//!
//! Every route answers from `request_filter` and returns `Ok(true)`: LLM routes need the whole
//! body before choosing an upstream, which stock Pingora cannot replay past 64 KiB, so the
//! upstream exchange is driven here with Pingora's pooled connector (`forward.rs`).

mod billing;
pub(crate) mod body;
mod forward;
mod respond;
mod route;
mod stream;
mod webhooks;

pub use billing::Billing;
pub(crate) use respond::frame_unknown_length;
pub use route::Route;
pub use webhooks::StripeEndpoint;

use crate::chain::PluginChain;
use crate::metrics::{InFlight, METRICS};
use crate::router::ModelTable;
use crate::upstream::Upstreams;
use async_trait::async_trait;
use bytes::Bytes;
use komilion_sdk::{ApiError, ChatRequest, ErrorKind, Exchange, LocalResponse, RequestView};
use pingora::connectors::http::Connector;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use std::sync::Arc;
use std::time::Instant;

/// The gateway service: shared by every request of the listener.
pub struct Gateway {
    pub chain: PluginChain,
    pub upstreams: Arc<Upstreams>,
    pub models: ModelTable,
    pub connector: Connector,
    pub max_body_bytes: usize,
    /// What one streamed answer may make the gateway keep.
    pub stream_limits: crate::config::StreamLimits,
    /// Time a client has to send a whole request body (`limits.body_timeout_ms`).
    pub body_timeout: std::time::Duration,
    /// Stripe top-ups, when configured.
    pub stripe: Option<StripeEndpoint>,
    /// Model prices and limits.
    pub pricing: crate::billing::pricing::Pricing,
    /// Wallets and the usage log, when the gateway has a store.
    pub billing: Option<Billing>,
    /// The store, for a key holder's usage export.
    pub store: Option<crate::store::cache::StoreSlot>,
    /// Which providers are skipped for failing.
    pub breakers: Arc<crate::providers::breaker::Breakers>,
    /// How far a request goes down its candidates.
    pub fallback: crate::config::FallbackLimits,
    /// Accounts' own provider keys, when the store and a master key are configured.
    pub account_keys: Option<Arc<crate::providers::byok::AccountKeys>>,
}

/// Per-request state (Pingora's CTX).
pub struct RequestCtx {
    pub exchange: Exchange,
    pub route: Route,
    /// The status written to the client (0 until a header went out).
    pub status: u16,
    /// Which plugin answered the request, if one did.
    pub answered_by: Option<&'static str>,
    /// The client went away before the response was complete.
    pub client_gone: bool,
    /// Money set aside on the wallet for this request.
    pub hold: Option<crate::billing::wallet::Hold>,
    /// The usage record was written.
    pub recorded: bool,
    /// The answer came with the account's own provider key: the provider bills the account,
    /// the wallet is not charged for the tokens.
    pub account_key_used: bool,
    /// Headers of the provider's answer that the client gets too (see [`forward`]).
    pub provider_headers: forward::ProviderHeaders,
    _in_flight: InFlight,
}

/// A Messages request as the chat request the flow runs on: decoded, then written as chat
/// completions (what an OpenAI-compatible upstream is sent, spliced; other formats re-encode
/// it, losing nothing the canonical request carries). Usage is always asked for: Anthropic's
/// stream reports it in `message_delta`.
fn messages_as_chat(raw: &[u8], to_generate: bool) -> Result<ChatRequest, ApiError> {
    use crate::providers::ProviderAdapter;
    let decoded = crate::formats::anthropic_messages::decode_request(raw, to_generate)?;
    let body = crate::providers::openai::OpenAi.encode_request(&decoded.request, &decoded.model)?;
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    if let Some(user) = decoded.user {
        body.insert("user".into(), serde_json::Value::String(user));
    }
    if decoded.request.stream {
        body.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
    }
    let body = serde_json::to_vec(&body).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    ChatRequest::parse(Bytes::from(body)).map_err(ApiError::from)
}

/// A time-ordered request id: 48 bits of milliseconds then 80 random bits, as 32 hex digits.
/// Time order keeps usage-table inserts at the end of the index.
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: u128 = rand::random();
    let id = ((ms as u128 & 0xffff_ffff_ffff) << 80) | (random & ((1u128 << 80) - 1));
    format!("{id:032x}")
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            exchange: Exchange::new(new_request_id(), Default::default(), Instant::now()),
            route: Route::NotFound,
            status: 0,
            answered_by: None,
            client_gone: false,
            hold: None,
            recorded: false,
            account_key_used: false,
            provider_headers: Vec::new(),
            _in_flight: InFlight::enter(),
        }
    }

    /// Never reached: every route answers in `request_filter`.
    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> pingora::Result<Box<HttpPeer>> {
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "no stock upstream path",
        ))
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> pingora::Result<bool> {
        let header = session.req_header();
        ctx.route = Route::of(&header.method, header.uri.path());
        ctx.exchange.surface = ctx.route.surface();
        let outcome = match ctx.route {
            Route::ChatCompletions => self.chat_completions(session, ctx).await,
            Route::Messages => self.messages(session, ctx).await,
            Route::CountTokens => self.count_tokens(session, ctx).await,
            Route::Models => self.list_models(session, ctx).await,
            Route::Model => self.one_model(session, ctx).await,
            Route::StripeWebhook => self.stripe_webhook(session, ctx).await,
            Route::Usage => self.own_usage(session, ctx).await,
            Route::MethodNotAllowed(allow) => {
                Err(ApiError::new(ErrorKind::MethodNotAllowed, format!("This route only accepts {allow}.")).into())
            }
            Route::NotFound => Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "Unknown route {} {}.",
                    session.req_header().method,
                    session.req_header().uri.path()
                ),
            )
            .with_code("unknown_route")
            .into()),
        };
        if let Err(response) = outcome {
            self.send_local(session, ctx, response).await;
        }
        Ok(true)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut RequestCtx) {
        let status = if ctx.status != 0 {
            ctx.status
        } else {
            session.response_written().map_or(0, |r| r.status.as_u16())
        };
        // Paths that wrote no answer (the client left early) still settle and record.
        self.finish_usage(ctx, status);
        let now = Instant::now();
        let route = ctx.route.label();
        let ex = &ctx.exchange;
        let mut status_buf = itoa::Buffer::new();
        METRICS
            .requests
            .with_label_values(&[
                route,
                ex.provider.as_deref().unwrap_or(""),
                self.models
                    .metric_label(ex.routed_model.as_deref().unwrap_or(""), &self.pricing),
                status_buf.format(status),
            ])
            .inc();
        METRICS
            .request_duration
            .with_label_values(&[route])
            .observe(now.saturating_duration_since(ex.timing.started).as_secs_f64());
        METRICS
            .overhead
            .with_label_values(&[route])
            .observe(ex.timing.overhead(now).as_secs_f64());
        if let Some(plugin) = ctx.answered_by {
            METRICS
                .plugin_responses
                .with_label_values(&[plugin, status_buf.format(status)])
                .inc();
        }
        self.chain.on_complete(ex, status).await;
    }
}

impl Gateway {
    fn request_view(session: &Session) -> RequestView {
        let header = session.req_header();
        let mut view = RequestView::new(header.method.clone(), header.uri.path(), header.headers.clone());
        view.client_addr = session.client_addr().and_then(|a| a.as_inet()).copied();
        view
    }

    /// Run `on_headers`; a refusal is answered as the plugin's response.
    async fn authorize(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<RequestView, LocalResponse> {
        let view = Gateway::request_view(session);
        if let Err(stop) = self.chain.on_headers(&view, &mut ctx.exchange).await {
            ctx.answered_by = Some(stop.plugin);
            // The body is left unread: don't let a client that is still sending it reuse the
            // connection.
            session.set_keepalive(None);
            return Err(stop.response);
        }
        Ok(view)
    }

    /// The request's whole body (at most `limit` bytes, within the body deadline); None when
    /// the client went away, an answer to send when it is too large or too slow.
    async fn read_client_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        limit: usize,
    ) -> Result<Option<Bytes>, LocalResponse> {
        match body::read_body(session, limit, self.body_timeout, &mut ctx.exchange.timing).await {
            Ok(raw) => Ok(Some(raw)),
            Err(e) => match e.into_answer() {
                Some(answer) => Err(answer.into()),
                None => {
                    ctx.client_gone = true;
                    session.set_keepalive(None);
                    Ok(None)
                }
            },
        }
    }

    async fn chat_completions(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        let view = self.authorize(session, ctx).await?;
        let Some(raw) = self.read_client_body(session, ctx, self.max_body_bytes).await? else {
            return Ok(());
        };
        let chat = ChatRequest::parse(raw).map_err(ApiError::from)?;
        self.chat(session, ctx, &view, chat).await
    }

    /// `POST /v1/messages`: decoded, then served by the same flow as chat completions with the
    /// answer written in Anthropic's shapes.
    async fn messages(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        let view = self.authorize(session, ctx).await?;
        let Some(raw) = self.read_client_body(session, ctx, self.max_body_bytes).await? else {
            return Ok(());
        };
        let chat = messages_as_chat(&raw, true)?;
        self.chat(session, ctx, &view, chat).await
    }

    /// `POST /v1/messages/count_tokens`: the prompt's tokens, counted here.
    async fn count_tokens(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        self.authorize(session, ctx).await?;
        let Some(raw) = self.read_client_body(session, ctx, self.max_body_bytes).await? else {
            return Ok(());
        };
        let chat = messages_as_chat(&raw, false)?;
        let tokens = crate::metering::tokens::count_chat_prompt(&chat.model, &chat.messages);
        let body = serde_json::to_vec(&serde_json::json!({"input_tokens": tokens}))
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.send_body(session, ctx, 200, "application/json", Bytes::from(body))
            .await;
        Ok(())
    }

    /// Steps 4 to 7 for any chat surface: plugins, routing, the hold, forwarding.
    async fn chat(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        view: &RequestView,
        mut chat: ChatRequest,
    ) -> Result<(), LocalResponse> {
        ctx.exchange.requested_model = Some(chat.model.clone());
        ctx.exchange.end_user = chat.user.clone();
        ctx.exchange.stream = chat.stream;
        if let Err(stop) = self.chain.on_body(view, &mut chat, &mut ctx.exchange).await {
            ctx.answered_by = Some(stop.plugin);
            return Err(stop.response);
        }
        let mut plan = self.models.plan(&chat.model, ctx.exchange.principal.as_ref())?;
        if let Err(stop) = self.chain.on_route(&chat, &mut plan, &mut ctx.exchange).await {
            ctx.answered_by = Some(stop.plugin);
            return Err(stop.response);
        }
        self.hold(ctx, &chat, &mut plan).await?;
        self.forward(session, ctx, &mut chat, &plan).await
    }

    /// `GET /v1/usage`: the caller's key's own usage records, streamed.
    async fn own_usage(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        self.authorize(session, ctx).await?;
        let unavailable = || ApiError::store_unavailable("The usage log is not available.");
        let store = self
            .store
            .as_ref()
            .and_then(|s| s.get())
            .cloned()
            .ok_or_else(unavailable)?;
        let principal = ctx.exchange.principal.clone().ok_or_else(ApiError::missing_api_key)?;
        let query = crate::usage::export::ExportQuery::parse(session.req_header().uri.query())
            .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, e).with_code("invalid_request"))?;
        let filter = crate::store::UsageFilter {
            account_id: principal.account_id,
            key_id: Some(principal.key_id),
            from: query.from,
            to: query.to,
        };
        ctx.status = 200;
        match crate::usage::export::stream(session, store.as_ref(), filter, query.format).await {
            Ok(()) => Ok(()),
            Err(e) if session.response_written().is_none() => {
                ctx.status = 0;
                Err(ApiError::store_unavailable(e.to_string()).into())
            }
            Err(_) => Ok(()),
        }
    }

    /// `GET /v1/models/{id}`: one model the caller may use, as OpenAI describes it.
    async fn one_model(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        self.authorize(session, ctx).await?;
        let path = session.req_header().uri.path();
        let raw = path
            .split_once("/models/")
            .map_or("", |(_, id)| id)
            .trim_end_matches('/');
        let id = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let found = self
            .models
            .list(ctx.exchange.principal.as_ref())
            .find(|(model, _)| *model == id)
            .map(|(model, provider)| {
                serde_json::json!({"id": model, "object": "model", "created": self.models.created, "owned_by": provider})
            });
        let Some(model) = found else {
            // The client's own text, echoed: bounded and without control characters.
            let shown: String = id.chars().filter(|c| !c.is_control()).take(256).collect();
            return Err(ApiError::model_not_found(&shown).into());
        };
        let body = serde_json::to_vec(&model).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.send_body(session, ctx, 200, "application/json", Bytes::from(body))
            .await;
        Ok(())
    }

    async fn list_models(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), LocalResponse> {
        self.authorize(session, ctx).await?;
        let data: Vec<serde_json::Value> = self
            .models
            .list(ctx.exchange.principal.as_ref())
            .map(|(id, provider)| {
                serde_json::json!({"id": id, "object": "model", "created": self.models.created, "owned_by": provider})
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        self.send_body(session, ctx, 200, "application/json", Bytes::from(body))
            .await;
        Ok(())
    }
}
