//! `rate_limit`: requests and tokens per minute, per credential.
//!
//! Each credential has two token buckets, refilled continuously: one of `rpm` requests, one of
//! `tpm` tokens. A request takes one from the first when its headers arrive and its estimated
//! tokens (prompt, plus `max_tokens` if given) from the second once its body is read; when the
//! answer reports real usage the difference is settled. An empty bucket means 429 with
//! `retry-after` / `retry-after-ms` (until enough refills) in the client's error format; a
//! request whose tokens exceed the whole limit can never be served and gets a 400 instead (a
//! 429 would have the client's SDK retry it for minutes in vain). Every response of a limited
//! key carries OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
//!
//! Limits come from the key (`rpm_limit`, `tpm_limit`) or this plugin's defaults. They are kept
//! in each instance's memory: with N instances behind a balancer, set `instances: N` and each
//! instance enforces 1/N of every limit (exact when the balancer spreads evenly; a client pinned
//! to one instance gets 1/N). See the README, "Rate limits".

use komilion_sdk::{
    settings_from, ApiError, ChatRequest, ConfigIssue, ErrorKind, Exchange, Flow, Hooks, Plugin, PluginServices,
    PluginSettings, RequestView, ResponseHead,
};
use moka::sync::Cache;
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NAME: &str = "rate_limit";

/// The note left for `on_complete`: tokens taken at admission.
const NOTE_TOKENS_TAKEN: &str = "rate_limit.tokens_taken";
/// Notes left for `on_response`: each bucket's state as `limit remaining reset_ms`.
const NOTE_REQUESTS: &str = "rate_limit.requests";
const NOTE_TOKENS: &str = "rate_limit.tokens";

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Gateway instances sharing the traffic; each enforces 1/instances of every limit.
    pub instances: u32,
    /// Requests per minute for credentials without their own limit.
    pub default_rpm: Option<u32>,
    /// Tokens per minute for credentials without their own limit.
    pub default_tpm: Option<u32>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            instances: 1,
            default_rpm: None,
            default_tpm: None,
        }
    }
}

/// A bucket of `capacity` that refills `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            capacity,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        // A changed limit applies at once, keeping what was spent.
        if capacity != self.capacity {
            self.level = (self.level + capacity - self.capacity).min(capacity);
            self.capacity = capacity;
        }
        let per_sec = self.capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_sec).min(self.capacity);
        self.updated = now;
    }

    /// Take `amount`, or say how long until it could be taken.
    fn take(&mut self, amount: f64, capacity: f64, now: Instant) -> Result<(), Refusal> {
        self.refill(capacity, now);
        if amount > self.capacity {
            return Err(Refusal::NeverFits);
        }
        if self.level >= amount {
            self.level -= amount;
            return Ok(());
        }
        let per_sec = self.capacity / 60.0;
        Err(Refusal::Wait(Duration::from_secs_f64((amount - self.level) / per_sec)))
    }

    /// `limit remaining reset_ms` for the response headers: this instance's share scaled back to
    /// the whole limit, and the time until the bucket is full again.
    fn state(&self, limit: u32) -> String {
        let scale = limit as f64 / self.capacity;
        let remaining = (self.level.max(0.0) * scale).floor().min(limit as f64) as u64;
        let reset_ms = ((self.capacity - self.level).max(0.0) / (self.capacity / 60.0) * 1000.0).ceil() as u64;
        format!("{limit} {remaining} {reset_ms}")
    }

    /// Give back (or, with a negative amount, take more).
    fn adjust(&mut self, amount: f64) {
        self.level = (self.level + amount).min(self.capacity);
    }
}

/// Why a bucket refused.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Enough refills after this long.
    Wait(Duration),
    /// More than the bucket ever holds.
    NeverFits,
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

pub struct RateLimit {
    settings: RateLimitSettings,
    buckets: Cache<String, Arc<Mutex<Buckets>>>,
}

impl RateLimit {
    pub fn new(settings: RateLimitSettings) -> Result<RateLimit, Vec<ConfigIssue>> {
        if settings.instances == 0 {
            return Err(vec![ConfigIssue::new("instances", "must be at least 1")]);
        }
        Ok(RateLimit {
            settings,
            // Idle credentials are forgotten: their buckets would be full again anyway.
            buckets: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(120))
                .build(),
        })
    }

    pub fn build(settings: &PluginSettings, _: &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>> {
        Ok(Arc::new(RateLimit::new(settings_from(settings)?)?))
    }

    fn share(&self, limit: u32) -> f64 {
        (limit as f64 / self.settings.instances as f64).max(1.0)
    }

    fn buckets(&self, key_id: &str) -> Arc<Mutex<Buckets>> {
        self.buckets
            .get_with_by_ref(key_id, || Arc::new(Mutex::new(Buckets::default())))
    }

    fn limits(&self, ex: &Exchange) -> Option<(String, Option<u32>, Option<u32>)> {
        let p = ex.principal.as_ref()?;
        let rpm = p.rpm_limit.or(self.settings.default_rpm);
        let tpm = p.tpm_limit.or(self.settings.default_tpm);
        (rpm.is_some() || tpm.is_some()).then(|| (p.key_id.clone(), rpm, tpm))
    }
}

fn too_many(what: &str, limit: u32, wait: Duration) -> Flow {
    let ms = (wait.as_secs_f64() * 1000.0).ceil().max(1.0) as u64;
    let secs = ms.div_ceil(1000);
    Flow::error(
        ApiError::new(
            ErrorKind::RateLimited,
            format!("Rate limit reached for {what} per minute (limit: {limit}). Please try again in {secs}s."),
        )
        .with_code("rate_limit_exceeded")
        .with_retry_after_ms(ms),
    )
}

/// A request larger than the whole tokens-per-minute limit: no wait would let it through.
fn never_fits(estimate: u64, limit: u32) -> Flow {
    Flow::error(
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "This request needs up to {estimate} tokens (its prompt plus max_tokens), more than this key's \
                 limit of {limit} tokens per minute, so it can never be served; lower max_tokens or shorten the prompt."
            ),
        )
        .with_code("tokens_exceed_limit")
        .with_param("max_tokens"),
    )
}

/// OpenAI's reset format: `250ms`, `1.5s`, `6m0s`.
fn reset_text(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => {
            let secs = ms as f64 / 1000.0;
            format!("{}s", (secs * 10.0).round() / 10.0)
        }
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// A cheap upper-range estimate of a prompt's tokens: about four bytes per token.
fn estimate_prompt_tokens(chat: &ChatRequest) -> u64 {
    chat.messages.iter().map(|m| m.text.len() as u64 / 4 + 4).sum()
}

#[async_trait::async_trait]
impl Plugin for RateLimit {
    fn name(&self) -> &'static str {
        NAME
    }

    fn hooks(&self) -> Hooks {
        Hooks::ON_HEADERS | Hooks::ON_BODY | Hooks::ON_RESPONSE | Hooks::ON_COMPLETE
    }

    async fn on_headers(&self, _req: &RequestView, ex: &mut Exchange) -> Flow {
        let Some((key_id, Some(rpm), _)) = self.limits(ex) else {
            return Flow::Continue;
        };
        let cap = self.share(rpm);
        let now = Instant::now();
        let buckets = self.buckets(&key_id);
        let Ok(mut b) = buckets.lock() else {
            return Flow::Continue;
        };
        let bucket = b.requests.get_or_insert_with(|| Bucket::new(cap, now));
        let taken = bucket.take(1.0, cap, now);
        ex.notes.push((NOTE_REQUESTS, bucket.state(rpm)));
        match taken {
            Ok(()) => Flow::Continue,
            Err(Refusal::Wait(wait)) => too_many("requests", rpm, wait),
            // Cannot happen (a bucket holds at least one request); refuse for a full minute.
            Err(Refusal::NeverFits) => too_many("requests", rpm, Duration::from_secs(60)),
        }
    }

    async fn on_body(&self, _req: &RequestView, chat: &mut ChatRequest, ex: &mut Exchange) -> Flow {
        let Some((key_id, _, Some(tpm))) = self.limits(ex) else {
            return Flow::Continue;
        };
        let estimate = estimate_prompt_tokens(chat) + chat.max_tokens.unwrap_or(0).saturating_mul(chat.choices);
        let cap = self.share(tpm);
        let now = Instant::now();
        let buckets = self.buckets(&key_id);
        let Ok(mut b) = buckets.lock() else {
            return Flow::Continue;
        };
        let bucket = b.tokens.get_or_insert_with(|| Bucket::new(cap, now));
        let taken = bucket.take(estimate as f64, cap, now);
        ex.notes.push((NOTE_TOKENS, bucket.state(tpm)));
        match taken {
            Ok(()) => {
                ex.notes.push((NOTE_TOKENS_TAKEN, estimate.to_string()));
                Flow::Continue
            }
            Err(Refusal::Wait(wait)) => too_many("tokens", tpm, wait),
            Err(Refusal::NeverFits) => never_fits(estimate, tpm),
        }
    }

    fn on_response(&self, head: &mut ResponseHead, ex: &Exchange) {
        for (note, what) in [(NOTE_REQUESTS, "requests"), (NOTE_TOKENS, "tokens")] {
            let Some(state) = ex.note(note) else { continue };
            let mut parts = state.split(' ');
            let (Some(limit), Some(remaining), Some(reset_ms)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let reset = reset_text(reset_ms.parse().unwrap_or(0));
            for (name, value) in [("limit", limit), ("remaining", remaining), ("reset", reset.as_str())] {
                if let Ok(name) = http::HeaderName::try_from(format!("x-ratelimit-{name}-{what}")) {
                    head.insert(name, value);
                }
            }
        }
    }

    async fn on_complete(&self, ex: &Exchange, _status: u16) {
        let Some(taken) = ex.note(NOTE_TOKENS_TAKEN).and_then(|t| t.parse::<f64>().ok()) else {
            return;
        };
        let used = (ex.usage.input_tokens + ex.usage.output_tokens) as f64;
        // No usage known (e.g. the upstream failed): keep the estimate as charged.
        if used == 0.0 {
            return;
        }
        if let Some(p) = &ex.principal {
            if let Ok(mut b) = self.buckets(&p.key_id).lock() {
                if let Some(bucket) = b.tokens.as_mut() {
                    bucket.adjust(taken - used);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, Method};
    use komilion_sdk::{LocalResponse, Principal, Surface};

    fn exchange(rpm: Option<u32>, tpm: Option<u32>) -> Exchange {
        let mut ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        ex.principal = Some(Principal {
            account_id: "a".into(),
            key_id: "k".into(),
            rpm_limit: rpm,
            tpm_limit: tpm,
            ..Default::default()
        });
        ex
    }

    fn refused(flow: &Flow) -> Option<(u16, u64)> {
        match flow {
            Flow::Respond(LocalResponse::Error(e)) => Some((e.status(), e.retry_after_secs.unwrap_or(0))),
            _ => None,
        }
    }

    #[tokio::test]
    async fn requests_per_minute_then_429_with_retry_after() {
        let p = RateLimit::new(RateLimitSettings::default()).unwrap();
        let req = RequestView::new(Method::POST, "/", HeaderMap::new());
        for _ in 0..3 {
            assert!(refused(&p.on_headers(&req, &mut exchange(Some(3), None)).await).is_none());
        }
        let (status, retry) = refused(&p.on_headers(&req, &mut exchange(Some(3), None)).await).unwrap();
        assert_eq!(status, 429);
        assert!((1..=20).contains(&retry), "one request refills in 20 s: {retry}");
    }

    #[tokio::test]
    async fn limits_divide_across_instances() {
        let p = RateLimit::new(RateLimitSettings {
            instances: 2,
            ..Default::default()
        })
        .unwrap();
        let req = RequestView::new(Method::POST, "/", HeaderMap::new());
        let admitted = futures_count(&p, &req, 10).await;
        assert_eq!(admitted, 5);
    }

    async fn futures_count(p: &RateLimit, req: &RequestView, rpm: u32) -> usize {
        let mut n = 0;
        for _ in 0..rpm * 2 {
            if refused(&p.on_headers(req, &mut exchange(Some(rpm), None)).await).is_none() {
                n += 1;
            }
        }
        n
    }

    #[tokio::test]
    async fn tokens_per_minute_are_estimated_then_settled() {
        let p = RateLimit::new(RateLimitSettings::default()).unwrap();
        let req = RequestView::new(Method::POST, "/", HeaderMap::new());
        let body = |max: u64| {
            let json = format!(
                r#"{{"model":"m","max_tokens":{max},"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(400)
            );
            ChatRequest::parse(Bytes::from(json)).unwrap()
        };
        // 400 bytes ≈ 104 tokens with overhead, + 500 max tokens = 604 of 1000.
        let mut ex = exchange(None, Some(1000));
        assert!(refused(&p.on_body(&req, &mut body(500), &mut ex).await).is_none());
        assert_eq!(
            refused(&p.on_body(&req, &mut body(500), &mut exchange(None, Some(1000))).await).map(|r| r.0),
            Some(429)
        );
        // The answer used far less: the difference comes back and the next request fits.
        ex.usage.input_tokens = 100;
        ex.usage.output_tokens = 20;
        p.on_complete(&ex, 200).await;
        assert!(refused(&p.on_body(&req, &mut body(500), &mut exchange(None, Some(1000))).await).is_none());
        // A request that can never fit is a 400 that says so, not a 429 the SDK retries.
        match p.on_body(&req, &mut body(5000), &mut exchange(None, Some(1000))).await {
            Flow::Respond(LocalResponse::Error(e)) => {
                assert_eq!(e.status(), 400);
                assert_eq!(e.code, Some("tokens_exceed_limit"));
                assert_eq!(e.retry_after_secs, None);
            }
            _ => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn every_response_of_a_limited_key_says_its_limits_as_openai_does() {
        let p = RateLimit::new(RateLimitSettings::default()).unwrap();
        let req = RequestView::new(Method::POST, "/", HeaderMap::new());
        let mut ex = exchange(Some(2), None);
        assert!(refused(&p.on_headers(&req, &mut ex).await).is_none());
        let mut head = ResponseHead::new(200);
        p.on_response(&mut head, &ex);
        let h = |name: &str| head.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("x-ratelimit-limit-requests").as_deref(), Some("2"));
        assert_eq!(h("x-ratelimit-remaining-requests").as_deref(), Some("1"));
        assert_eq!(h("x-ratelimit-reset-requests").as_deref(), Some("30s"));
        assert_eq!(h("x-ratelimit-limit-tokens"), None, "no token limit, no token headers");

        p.on_headers(&req, &mut exchange(Some(2), None)).await;
        let mut ex = exchange(Some(2), None);
        match p.on_headers(&req, &mut ex).await {
            Flow::Respond(LocalResponse::Error(e)) => {
                assert_eq!(e.status(), 429);
                let ms = e.retry_after_ms.unwrap();
                assert!((29_000..=30_000).contains(&ms), "{ms}");
                assert_eq!(e.retry_after_secs, Some(30));
            }
            _ => panic!("refused"),
        }
        let mut head = ResponseHead::new(429);
        p.on_response(&mut head, &ex);
        assert_eq!(head.headers["x-ratelimit-remaining-requests"], "0");
    }

    #[test]
    fn reset_times_read_as_openai_writes_them() {
        assert_eq!(reset_text(250), "250ms");
        assert_eq!(reset_text(1_500), "1.5s");
        assert_eq!(reset_text(360_000), "6m0s");
    }

    #[test]
    fn bucket_refills_continuously() {
        let t0 = Instant::now();
        let mut b = Bucket::new(60.0, t0);
        assert!(b.take(60.0, 60.0, t0).is_ok());
        assert!(b.take(1.0, 60.0, t0).is_err());
        assert!(b.take(1.0, 60.0, t0 + Duration::from_millis(1100)).is_ok());
    }
}
