//! The plugin trait and its hooks.
//!
//! The hooks follow the request through the gateway (DESIGN.md §1):
//!
//! ```text
//! on_headers ─▶ (body read, parsed) ─▶ on_body ─▶ on_route ─▶ ┬─ on_attempt ─▶ on_upstream_status ─┐
//!                                                              └──────── next candidate ◀────────────┘
//!   ─▶ on_response (just before the status line goes out) ─▶ on_event (each stream event) ─▶ on_complete
//! ```
//!
//! A plugin declares in [`Plugin::hooks`] which hooks it implements; the engine calls only
//! those, so an unused hook costs nothing on the hot path.

use crate::api_error::ApiError;
use crate::chat::ChatRequest;
use crate::exchange::{Candidate, Exchange, ResponseHead, RoutePlan};
use crate::request::RequestView;
use async_trait::async_trait;
use bytes::Bytes;

/// The set of hooks a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hooks(u16);

impl Hooks {
    pub const NONE: Hooks = Hooks(0);
    pub const ON_HEADERS: Hooks = Hooks(1);
    pub const ON_BODY: Hooks = Hooks(1 << 1);
    pub const ON_ROUTE: Hooks = Hooks(1 << 2);
    pub const ON_ATTEMPT: Hooks = Hooks(1 << 3);
    pub const ON_UPSTREAM_STATUS: Hooks = Hooks(1 << 4);
    pub const ON_RESPONSE: Hooks = Hooks(1 << 5);
    pub const ON_EVENT: Hooks = Hooks(1 << 6);
    pub const ON_COMPLETE: Hooks = Hooks(1 << 7);
    pub const ON_UPSTREAM_FAILURE: Hooks = Hooks(1 << 8);

    pub const fn union(self, other: Hooks) -> Hooks {
        Hooks(self.0 | other.0)
    }

    pub const fn contains(self, other: Hooks) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Hooks {
    type Output = Hooks;
    fn bitor(self, rhs: Hooks) -> Hooks {
        self.union(rhs)
    }
}

/// An answer the gateway gives itself instead of forwarding.
#[derive(Debug, Clone)]
pub enum LocalResponse {
    /// An error, rendered in the client's API format.
    Error(ApiError),
    /// A ready body, e.g. a cached completion.
    Body {
        status: u16,
        content_type: &'static str,
        body: Bytes,
    },
}

impl From<ApiError> for LocalResponse {
    fn from(e: ApiError) -> Self {
        LocalResponse::Error(e)
    }
}

/// What a request-phase hook decided.
#[derive(Debug, Clone)]
pub enum Flow {
    /// Go on with the next plugin.
    Continue,
    /// Stop here and answer the client with this.
    Respond(LocalResponse),
}

impl Flow {
    pub fn error(e: ApiError) -> Flow {
        Flow::Respond(LocalResponse::Error(e))
    }
}

/// What `on_attempt` decided for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptDecision {
    Proceed,
    /// Do not try this candidate (e.g. its circuit is open); go to the next.
    Skip,
}

/// One server-sent event of an upstream stream, already in the canonical (OpenAI) format.
#[derive(Debug, Clone, Copy)]
pub struct StreamEvent<'a> {
    /// The `event:` field, if the stream names its events.
    pub event: Option<&'a str>,
    /// The `data:` payload (lines joined with `\n`).
    pub data: &'a str,
}

/// A gateway plugin. Every method has a no-op default; implement the ones listed in
/// [`Plugin::hooks`].
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// The registry name, as written in the config (`static_key_auth`, ...).
    fn name(&self) -> &'static str;

    /// Which hooks this plugin implements.
    fn hooks(&self) -> Hooks;

    /// True for plugins that establish who is calling. When a chain has one, a request that
    /// leaves `on_headers` without a principal is refused with 401, whatever the plugins'
    /// fall-through settings: no misconfiguration can let an anonymous request through.
    fn authenticates(&self) -> bool {
        false
    }

    /// After the request header is read, before the body. Cheap checks belong here (auth,
    /// request-rate limits) so that rejected requests never cost a body read.
    async fn on_headers(&self, _req: &RequestView, _ex: &mut Exchange) -> Flow {
        Flow::Continue
    }

    /// After the body is read and parsed. May change the request (e.g. its upstream fields) or
    /// answer it (cache hit, budget refusal).
    async fn on_body(&self, _req: &RequestView, _chat: &mut ChatRequest, _ex: &mut Exchange) -> Flow {
        Flow::Continue
    }

    /// After the engine has built its default plan from the requested model. May reorder,
    /// replace or extend the candidates.
    async fn on_route(&self, _chat: &ChatRequest, _plan: &mut RoutePlan, _ex: &mut Exchange) -> Flow {
        Flow::Continue
    }

    /// Before each upstream attempt.
    async fn on_attempt(&self, _candidate: &Candidate, _ex: &mut Exchange) -> AttemptDecision {
        AttemptDecision::Proceed
    }

    /// When an upstream's status line arrived (fallbacks included).
    fn on_upstream_status(&self, _candidate: &Candidate, _status: u16, _ex: &mut Exchange) {}

    /// When an attempt failed without a status line, or its answer broke off: `kind` is
    /// `no_address`, `connect`, `timeout`, `reset` or `bad_response` (the labels of
    /// `komilion_upstream_errors_total`), or `breaker_open` for a candidate skipped unasked.
    fn on_upstream_failure(&self, _candidate: &Candidate, _kind: &'static str, _ex: &mut Exchange) {}

    /// Just before the response header goes to the client, for every response: upstream,
    /// local and error. Add headers here.
    fn on_response(&self, _head: &mut ResponseHead, _ex: &Exchange) {}

    /// For each event of a streamed response, in order. Synchronous: it runs between two
    /// writes to the client.
    fn on_event(&self, _event: &StreamEvent<'_>, _ex: &mut Exchange) {}

    /// After the response is finished or failed (runs on every path). Must not block on I/O:
    /// hand records to a background task.
    async fn on_complete(&self, _ex: &Exchange, _status: u16) {}
}
