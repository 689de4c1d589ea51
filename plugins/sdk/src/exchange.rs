//! The per-request state shared by the engine and the plugins.

use crate::request::Surface;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, Instant};

/// Who is calling, as established by an auth plugin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// The account that pays.
    pub account_id: String,
    /// The credential used (API key id, or the JWT subject).
    pub key_id: String,
    /// Models this caller may use; empty means all.
    pub allowed_models: Vec<String>,
    /// Requests per minute allowed for this credential, if limited.
    pub rpm_limit: Option<u32>,
    /// Tokens per minute allowed for this credential, if limited.
    pub tpm_limit: Option<u32>,
    /// The account pays from a prepaid wallet in the store (keys and JWTs backed by the
    /// store); static keys from the config are not billed.
    pub prepaid: bool,
}

impl Principal {
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }
}

/// One upstream to try: a provider and the model name it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub provider: String,
    pub model: String,
}

/// The ordered candidates for a request. The first is preferred; the rest are fallbacks tried
/// when an attempt fails before any byte reached the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    pub candidates: Vec<Candidate>,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of `input_tokens`, read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Of `input_tokens`, written to the provider's prompt cache (Anthropic bills them above
    /// the input price; OpenAI and Gemini report none).
    pub cache_write_input_tokens: u64,
    /// Of `cache_write_input_tokens`, written with a one-hour lifetime (billed higher still).
    pub cache_write_1h_input_tokens: u64,
    /// Of `output_tokens`, spent on reasoning.
    pub reasoning_tokens: u64,
    /// Counted by the gateway because the provider did not report usage.
    pub estimated: bool,
}

/// Where the time of a request went. The gateway's own overhead is the total minus the time
/// spent waiting on the upstream and on the client's upload.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub started: Instant,
    /// Time blocked on the upstream: connect, send, and every read of its response.
    pub upstream_wait: Duration,
    /// Time blocked reading the request body from the client.
    pub client_wait: Duration,
    /// When the upstream's response header arrived (time to first byte).
    pub upstream_first_byte: Option<Duration>,
}

impl Timing {
    pub fn new(started: Instant) -> Self {
        Timing {
            started,
            upstream_wait: Duration::ZERO,
            client_wait: Duration::ZERO,
            upstream_first_byte: None,
        }
    }

    /// The gateway's own time so far.
    pub fn overhead(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
            .saturating_sub(self.upstream_wait)
            .saturating_sub(self.client_wait)
    }
}

/// The response status and the headers plugins add to it, just before it is written.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: HeaderMap,
}

impl ResponseHead {
    pub fn new(status: u16) -> Self {
        ResponseHead {
            status,
            headers: HeaderMap::new(),
        }
    }

    /// Add a header; a value that is not a valid header value is dropped.
    pub fn insert(&mut self, name: HeaderName, value: &str) {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
    }
}

/// Everything known about one request, annotated as it flows through the plugins.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The gateway's id for this request; also the idempotency key of its usage record.
    pub request_id: String,
    pub surface: Surface,
    pub principal: Option<Principal>,
    /// The task label assigned by a classifier (`coding`, `math`, ...).
    pub task: Option<String>,
    /// The model the client asked for (validated: at most 256 bytes, no control characters).
    pub requested_model: Option<String>,
    /// The end user the client named (OpenAI's `user`), validated like the model.
    pub end_user: Option<String>,
    pub stream: bool,
    /// The provider and model that produced the response (the last attempt).
    pub provider: Option<String>,
    pub routed_model: Option<String>,
    /// Upstream attempts made, fallbacks included.
    pub attempts: u32,
    pub usage: Usage,
    /// The response came from the gateway's cache.
    pub cache_hit: bool,
    pub timing: Timing,
    /// Free-form notes plugins leave for later plugins (and the logs).
    pub notes: Vec<(&'static str, String)>,
}

impl Exchange {
    pub fn new(request_id: String, surface: Surface, started: Instant) -> Self {
        Exchange {
            request_id,
            surface,
            principal: None,
            task: None,
            requested_model: None,
            end_user: None,
            stream: false,
            provider: None,
            routed_model: None,
            attempts: 0,
            usage: Usage::default(),
            cache_hit: false,
            timing: Timing::new(started),
            notes: Vec::new(),
        }
    }

    pub fn note(&self, key: &str) -> Option<&str> {
        self.notes.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_excludes_upstream_and_client_time() {
        let start = Instant::now();
        let mut t = Timing::new(start);
        t.upstream_wait = Duration::from_millis(70);
        t.client_wait = Duration::from_millis(20);
        let now = start + Duration::from_millis(100);
        assert_eq!(t.overhead(now), Duration::from_millis(10));
        t.upstream_wait = Duration::from_millis(500);
        assert_eq!(t.overhead(now), Duration::ZERO);
    }

    #[test]
    fn empty_allow_list_allows_all() {
        let mut p = Principal::default();
        assert!(p.may_use("x"));
        p.allowed_models = vec!["a".into()];
        assert!(p.may_use("a") && !p.may_use("x"));
    }
}
