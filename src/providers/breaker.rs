//! Circuit breakers, one per provider and model: a provider that keeps failing is skipped for a
//! cooldown instead of costing every request a timeout, then tried again with one probe.
//!
//! ```text
//! closed ──(N failures in a row, or an error rate over a window)──> open
//! open ──(cooldown over: the next request is the probe)──> half-open
//! half-open ──probe succeeds──> closed      half-open ──probe fails──> open
//! ```
//!
//! A 429 with `retry-after` opens the breaker for that long at once: the provider said when
//! to come back, and every request before then would only be refused again.
//!
//! Models are keyed by their metric label (configured and catalog models by name, any other
//! pass-through name as `other`), so clients cannot grow the table.

use crate::metrics::METRICS;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// When a breaker opens and for how long (a provider's `breaker` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open it.
    pub consecutive_failures: u32,
    /// Failures per hundred attempts over `window` that open it, once `min_requests` were made.
    pub error_rate_percent: u32,
    pub min_requests: u32,
    pub window: Duration,
    /// How long it stays open before a probe.
    pub cooldown: Duration,
    /// The longest `retry-after` honoured (a provider asking for an hour is capped here).
    pub max_retry_after: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            error_rate_percent: 50,
            min_requests: 20,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of `komilion_breaker_state`.
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// Whether a request may go to a provider now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused: open for this much longer; `rate_limited` when the provider's own 429 opened it
    /// (the client is told to back off, as the provider would have told it).
    Refused {
        retry_in: Duration,
        rate_limited: bool,
    },
}

/// How an attempt went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered (a client's 4xx included: the provider is fine).
    Success,
    /// Connect failure, timeout, reset, 5xx, or the provider refusing the gateway's key.
    Failure,
    /// A 429, with the provider's `retry-after` if it sent one.
    RateLimited { retry_after: Option<Duration> },
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    consecutive: u32,
    window_start: Instant,
    requests: u32,
    failures: u32,
    open_until: Instant,
    /// A 429's `retry-after` opened it.
    rate_limited: bool,
    /// When the half-open probe went out; another may go once it is older than the cooldown
    /// (its request was abandoned without an outcome).
    probe_since: Option<Instant>,
}

impl Breaker {
    fn new(now: Instant) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            consecutive: 0,
            window_start: now,
            requests: 0,
            failures: 0,
            open_until: now,
            rate_limited: false,
            probe_since: None,
        }
    }

    fn open(&mut self, now: Instant, for_: Duration, rate_limited: bool) {
        self.state = BreakerState::Open;
        self.open_until = now + for_;
        self.rate_limited = rate_limited;
        self.probe_since = None;
        self.consecutive = 0;
        self.requests = 0;
        self.failures = 0;
    }
}

/// The breakers that have seen traffic, by provider then model (looked up by `&str`, so a
/// request allocates nothing to find its breaker).
type BreakerTable = HashMap<String, HashMap<String, Arc<Mutex<Breaker>>>>;

/// Every provider's and model's breaker.
pub struct Breakers {
    config: HashMap<String, BreakerConfig>,
    by_key: RwLock<BreakerTable>,
}

impl Breakers {
    /// `config`: each provider's settings (providers not named get the defaults).
    pub fn new(config: HashMap<String, BreakerConfig>) -> Breakers {
        Breakers {
            config,
            by_key: RwLock::new(HashMap::new()),
        }
    }

    fn config(&self, provider: &str) -> BreakerConfig {
        self.config.get(provider).copied().unwrap_or_default()
    }

    fn breaker(&self, provider: &str, model: &str, now: Instant) -> Arc<Mutex<Breaker>> {
        let found = self
            .by_key
            .read()
            .ok()
            .and_then(|m| m.get(provider).and_then(|models| models.get(model)).cloned());
        if let Some(b) = found {
            return b;
        }
        match self.by_key.write() {
            Ok(mut map) => map
                .entry(provider.to_owned())
                .or_default()
                .entry(model.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(Breaker::new(now))))
                .clone(),
            // A poisoned table: a breaker of its own, so requests still flow.
            Err(_) => Arc::new(Mutex::new(Breaker::new(now))),
        }
    }

    /// May a request go to `provider`'s `model` now? The first request after the cooldown is
    /// the half-open probe; others wait for its outcome.
    pub fn admit(&self, provider: &str, model: &str, now: Instant) -> Admission {
        let config = self.config(provider);
        let breaker = self.breaker(provider, model, now);
        let Ok(mut b) = breaker.lock() else {
            return Admission::Allowed;
        };
        match b.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open if now >= b.open_until => {
                b.state = BreakerState::HalfOpen;
                b.probe_since = Some(now);
                set_gauge(provider, model, BreakerState::HalfOpen);
                Admission::Allowed
            }
            BreakerState::Open => Admission::Refused {
                retry_in: b.open_until.saturating_duration_since(now),
                rate_limited: b.rate_limited,
            },
            BreakerState::HalfOpen => match b.probe_since {
                Some(since) if now.saturating_duration_since(since) < config.cooldown => Admission::Refused {
                    retry_in: config.cooldown.saturating_sub(now.saturating_duration_since(since)),
                    rate_limited: b.rate_limited,
                },
                _ => {
                    b.probe_since = Some(now);
                    Admission::Allowed
                }
            },
        }
    }

    /// Record how an attempt went.
    pub fn record(&self, provider: &str, model: &str, outcome: Outcome, now: Instant) {
        let config = self.config(provider);
        let breaker = self.breaker(provider, model, now);
        let Ok(mut b) = breaker.lock() else {
            return;
        };
        let before = b.state;
        if now.saturating_duration_since(b.window_start) > config.window {
            b.window_start = now;
            b.requests = 0;
            b.failures = 0;
        }
        b.requests = b.requests.saturating_add(1);
        match outcome {
            Outcome::Success => {
                b.consecutive = 0;
                if b.state == BreakerState::HalfOpen {
                    *b = Breaker::new(now);
                }
            }
            Outcome::RateLimited {
                retry_after: Some(wait),
            } if !wait.is_zero() => b.open(now, wait.min(config.max_retry_after), true),
            Outcome::Failure | Outcome::RateLimited { .. } => {
                b.consecutive = b.consecutive.saturating_add(1);
                b.failures = b.failures.saturating_add(1);
                let too_many_in_a_row = b.consecutive >= config.consecutive_failures;
                let rate_too_high = b.requests >= config.min_requests
                    && u64::from(b.failures) * 100 >= u64::from(config.error_rate_percent) * u64::from(b.requests);
                if b.state == BreakerState::HalfOpen || too_many_in_a_row || rate_too_high {
                    b.open(now, config.cooldown, false);
                }
            }
        }
        if b.state != before {
            set_gauge(provider, model, b.state);
            if b.state == BreakerState::Open {
                METRICS.breaker_opened.with_label_values(&[provider, model]).inc();
                tracing::warn!(
                    provider,
                    model,
                    "circuit breaker opened: requests skip this provider for now"
                );
            } else if b.state == BreakerState::Closed {
                tracing::info!(provider, model, "circuit breaker closed again");
            }
        }
    }

    /// Every breaker that has seen traffic, with its state, for `/health`.
    pub fn states(&self, now: Instant) -> Vec<(String, String, BreakerState)> {
        let Ok(map) = self.by_key.read() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map
            .iter()
            .flat_map(|(p, models)| models.iter().map(move |(m, b)| (p, m, b)))
            .filter_map(|(p, m, b)| {
                let b = b.lock().ok()?;
                // An open breaker whose cooldown is over lets the next request probe.
                let state = match b.state {
                    BreakerState::Open if now >= b.open_until => BreakerState::HalfOpen,
                    s => s,
                };
                Some((p.clone(), m.clone(), state))
            })
            .collect();
        out.sort();
        out
    }
}

fn set_gauge(provider: &str, model: &str, state: BreakerState) {
    METRICS
        .breaker_state
        .with_label_values(&[provider, model])
        .set(state.gauge());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(HashMap::from([(
            "p".to_owned(),
            BreakerConfig {
                consecutive_failures: 3,
                error_rate_percent: 50,
                min_requests: 10,
                window: Duration::from_secs(60),
                cooldown: Duration::from_secs(30),
                max_retry_after: Duration::from_secs(120),
            },
        )]))
    }

    #[test]
    fn failures_in_a_row_open_it_and_a_probe_closes_it() {
        let b = breakers();
        let t = Instant::now();
        for _ in 0..2 {
            b.record("p", "m", Outcome::Failure, t);
        }
        b.record("p", "m", Outcome::Success, t);
        for _ in 0..2 {
            b.record("p", "m", Outcome::Failure, t);
        }
        assert_eq!(b.admit("p", "m", t), Admission::Allowed, "a success resets the count");
        b.record("p", "m", Outcome::Failure, t);
        assert_eq!(
            b.admit("p", "m", t + Duration::from_secs(10)),
            Admission::Refused {
                retry_in: Duration::from_secs(20),
                rate_limited: false
            }
        );
        assert_eq!(b.admit("p", "other", t), Admission::Allowed, "per model");
        // After the cooldown one probe goes; the others wait for it.
        let later = t + Duration::from_secs(31);
        assert_eq!(b.admit("p", "m", later), Admission::Allowed);
        assert!(matches!(b.admit("p", "m", later), Admission::Refused { .. }));
        assert_eq!(
            b.states(later),
            [
                ("p".into(), "m".into(), BreakerState::HalfOpen),
                ("p".into(), "other".into(), BreakerState::Closed)
            ]
        );
        b.record("p", "m", Outcome::Success, later);
        assert_eq!(b.admit("p", "m", later), Admission::Allowed);
        assert_eq!(b.states(later)[0].2, BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_an_abandoned_probe_is_replaced() {
        let b = breakers();
        let t = Instant::now();
        for _ in 0..3 {
            b.record("p", "m", Outcome::Failure, t);
        }
        let probe = t + Duration::from_secs(30);
        assert_eq!(b.admit("p", "m", probe), Admission::Allowed);
        b.record("p", "m", Outcome::Failure, probe);
        assert!(matches!(
            b.admit("p", "m", probe + Duration::from_secs(29)),
            Admission::Refused { .. }
        ));
        let second = probe + Duration::from_secs(30);
        assert_eq!(b.admit("p", "m", second), Admission::Allowed);
        // That probe never reports; after a cooldown another may go.
        assert!(matches!(
            b.admit("p", "m", second + Duration::from_secs(1)),
            Admission::Refused { .. }
        ));
        assert_eq!(b.admit("p", "m", second + Duration::from_secs(30)), Admission::Allowed);
    }

    #[test]
    fn an_error_rate_over_the_window_opens_it() {
        let b = breakers();
        let t = Instant::now();
        for i in 0..10 {
            let outcome = if i % 2 == 1 { Outcome::Failure } else { Outcome::Success };
            assert_eq!(b.admit("p", "m", t), Admission::Allowed, "attempt {i}");
            b.record("p", "m", outcome, t);
        }
        assert!(matches!(b.admit("p", "m", t), Admission::Refused { .. }));
        // Failures spread over more than a window do not add up.
        let b = breakers();
        for i in 0..20u64 {
            let now = t + Duration::from_secs(i * 10);
            let outcome = if i % 2 == 0 { Outcome::Failure } else { Outcome::Success };
            b.record("p", "m", outcome, now);
            assert_eq!(b.admit("p", "m", now), Admission::Allowed, "attempt {i}");
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_a_cap() {
        let b = breakers();
        let t = Instant::now();
        b.record(
            "p",
            "m",
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
            },
            t,
        );
        assert_eq!(
            b.admit("p", "m", t),
            Admission::Refused {
                retry_in: Duration::from_secs(7),
                rate_limited: true
            }
        );
        assert_eq!(b.admit("p", "m", t + Duration::from_secs(7)), Admission::Allowed);
        b.record(
            "p",
            "m",
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(3600)),
            },
            t,
        );
        assert_eq!(
            b.admit("p", "m", t),
            Admission::Refused {
                retry_in: Duration::from_secs(120),
                rate_limited: true
            }
        );
        // A 429 without retry-after is one failure like any other.
        b.record("q", "m", Outcome::RateLimited { retry_after: None }, t);
        assert_eq!(b.admit("q", "m", t), Admission::Allowed);
    }
}
