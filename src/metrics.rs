//! Prometheus metrics (all prefixed `komilion_`) and the metrics listener (`/metrics`, `/health`).
//!
//! Metrics live in Prometheus' default registry, so anything else in the process that registers
//! there (Pingora's own metrics included) shows up on the same page.

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    register_gauge, register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, TextEncoder,
};
use std::sync::LazyLock;

pub struct Metrics {
    /// Finished requests by route, provider, model and final status.
    pub requests: IntCounterVec,
    /// Whole-request duration as the client saw it.
    pub request_duration: HistogramVec,
    /// Time spent in the gateway itself: total minus upstream and client waits.
    pub overhead: HistogramVec,
    /// From sending the request upstream to its status line.
    pub upstream_ttfb: HistogramVec,
    pub in_flight: IntGauge,
    /// Failed upstream attempts by provider and kind (connect, timeout, status_429, status_5xx,
    /// reset, bad_response).
    pub upstream_errors: IntCounterVec,
    /// Attempts abandoned for the next candidate.
    pub fallbacks: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_opened: IntCounterVec,
    pub breaker_rejections: IntCounterVec,
    /// Requests answered by a plugin (auth failures, limits, cache hits) by plugin and status.
    pub plugin_responses: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Tokens by provider, model, task and direction (`input`, `output`).
    pub tokens: IntCounterVec,
    /// Cost in nano-USD by provider, model and task.
    pub cost: IntCounterVec,
    /// Requests refused by the wallet, by reason (`insufficient`, `disabled`, `unavailable`).
    pub wallet_rejections: IntCounterVec,
    /// Usage records that could not be appended to the spool.
    pub spool_errors: IntCounter,
    /// Spooled usage bytes not yet in the store.
    pub spool_depth: IntGauge,
    /// Age in seconds of the oldest spooled record not yet in the store.
    pub spool_age: prometheus::Gauge,
    /// Usage records written to the store.
    pub usage_written: IntCounter,
    /// Usage records the store refused for their content, moved to the dead-letter file.
    pub usage_dead_letters: IntCounter,
    /// Paid Stripe checkouts that credited no wallet (kept for an operator).
    pub stripe_unmatched: IntCounter,
    /// Provider stream events over `limits.stream_event_max_bytes` (the stream was ended).
    pub stream_events_too_large: IntCounter,
    /// 1 while the spool accepts records, 0 while it cannot (disk full, read-only): paid
    /// requests are then refused with 503 before they are forwarded.
    pub spool_writable: IntGauge,
    /// Records that could not be appended, held in memory until the spool recovers.
    pub spool_pending: IntGauge,
    /// Failed store writes by operation (`usage`, `lease`, `alert`).
    pub store_errors: IntCounterVec,
    /// Wallet leases this instance holds.
    pub active_leases: IntGauge,
    /// Alert webhooks delivered and failed.
    pub alerts: IntCounterVec,
    /// Connections closed because the client was too slow, by phase (`head`: the request head
    /// missed its deadline; `body`: the body did; `idle`: a kept-alive connection sent nothing).
    pub client_timeouts: IntCounterVec,
    /// Request heads refused before routing, by reason (`malformed`, `too_large`,
    /// `missing_host`, `framing`, `method`); late heads are in `client_timeouts`.
    pub bad_heads: IntCounterVec,
    /// Open client connections by listener address.
    pub connections_open: IntGaugeVec,
    /// Connections refused (503, closed) because their listener was at its cap.
    pub connections_refused: IntCounterVec,
}

/// Seconds buckets from 10 µs to 2.5 s, for the gateway's own overhead.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5,
];
/// Seconds buckets from 5 ms to 10 min, for LLM latencies.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0,
];

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    // Registration only fails for a duplicate name, a bug caught by the first test run.
    let m = Metrics {
        requests: register_int_counter_vec!(
            "komilion_requests_total",
            "Finished requests by route, provider, model and status.",
            &["route", "provider", "model", "status"]
        )
        .expect("register komilion_requests_total"),
        request_duration: register_histogram_vec!(
            "komilion_request_duration_seconds",
            "Request duration as the client saw it.",
            &["route"],
            LATENCY_BUCKETS.to_vec()
        )
        .expect("register komilion_request_duration_seconds"),
        overhead: register_histogram_vec!(
            "komilion_gateway_overhead_seconds",
            "Time spent in the gateway itself (total minus upstream and client waits).",
            &["route"],
            OVERHEAD_BUCKETS.to_vec()
        )
        .expect("register komilion_gateway_overhead_seconds"),
        upstream_ttfb: register_histogram_vec!(
            "komilion_upstream_ttfb_seconds",
            "Upstream time to first byte (request sent to status line).",
            &["provider"],
            LATENCY_BUCKETS.to_vec()
        )
        .expect("register komilion_upstream_ttfb_seconds"),
        in_flight: register_int_gauge!("komilion_requests_in_flight", "Requests being processed.")
            .expect("register komilion_requests_in_flight"),
        upstream_errors: register_int_counter_vec!(
            "komilion_upstream_errors_total",
            "Failed upstream attempts by provider and kind.",
            &["provider", "kind"]
        )
        .expect("register komilion_upstream_errors_total"),
        fallbacks: register_int_counter_vec!(
            "komilion_fallbacks_total",
            "Upstream attempts abandoned for the next candidate, by the provider left.",
            &["provider"]
        )
        .expect("register komilion_fallbacks_total"),
        breaker_state: register_int_gauge_vec!(
            "komilion_breaker_state",
            "Circuit breaker of a provider and model: 0 closed, 1 half-open, 2 open.",
            &["provider", "model"]
        )
        .expect("register komilion_breaker_state"),
        breaker_opened: register_int_counter_vec!(
            "komilion_breaker_opened_total",
            "Times a provider's breaker opened, by model.",
            &["provider", "model"]
        )
        .expect("register komilion_breaker_opened_total"),
        breaker_rejections: register_int_counter_vec!(
            "komilion_breaker_rejections_total",
            "Candidates skipped because their breaker was open.",
            &["provider"]
        )
        .expect("register komilion_breaker_rejections_total"),
        plugin_responses: register_int_counter_vec!(
            "komilion_plugin_responses_total",
            "Requests answered by a plugin instead of an upstream.",
            &["plugin", "status"]
        )
        .expect("register komilion_plugin_responses_total"),
        build_info: register_int_gauge_vec!("komilion_build_info", "Build information.", &["version"])
            .expect("register komilion_build_info"),
        tokens: register_int_counter_vec!(
            "komilion_tokens_total",
            "Tokens by provider, model, task and direction.",
            &["provider", "model", "task", "direction"]
        )
        .expect("register komilion_tokens_total"),
        cost: register_int_counter_vec!(
            "komilion_cost_nano_usd_total",
            "Cost of requests in nano-USD by provider, model and task.",
            &["provider", "model", "task"]
        )
        .expect("register komilion_cost_nano_usd_total"),
        wallet_rejections: register_int_counter_vec!(
            "komilion_wallet_rejections_total",
            "Requests refused by the wallet, by reason.",
            &["reason"]
        )
        .expect("register komilion_wallet_rejections_total"),
        spool_errors: register_int_counter!(
            "komilion_usage_spool_errors_total",
            "Usage records that could not be spooled."
        )
        .expect("register komilion_usage_spool_errors_total"),
        spool_depth: register_int_gauge!(
            "komilion_usage_spool_depth_bytes",
            "Spooled usage bytes not yet in the store."
        )
        .expect("register komilion_usage_spool_depth_bytes"),
        spool_age: register_gauge!(
            "komilion_usage_spool_age_seconds",
            "Age of the oldest spooled usage record not yet in the store."
        )
        .expect("register komilion_usage_spool_age_seconds"),
        usage_written: register_int_counter!(
            "komilion_usage_records_written_total",
            "Usage records written to the store."
        )
        .expect("register komilion_usage_records_written_total"),
        usage_dead_letters: register_int_counter!(
            "komilion_usage_dead_letters_total",
            "Usage records the store refused for their content, moved to the spool's dead-letter file."
        )
        .expect("register komilion_usage_dead_letters_total"),
        stripe_unmatched: register_int_counter!(
            "komilion_stripe_unmatched_total",
            "Paid Stripe checkouts that credited no wallet (unknown account, other currency); see GET /admin/v1/payments/unmatched."
        )
        .expect("register komilion_stripe_unmatched_total"),
        stream_events_too_large: register_int_counter!(
            "komilion_stream_events_too_large_total",
            "Provider stream events over limits.stream_event_max_bytes; each ended its stream with an error event."
        )
        .expect("register komilion_stream_events_too_large_total"),
        spool_writable: register_int_gauge!(
            "komilion_usage_spool_writable",
            "1 while the usage spool accepts records; 0 while paid requests are refused for it."
        )
        .expect("register komilion_usage_spool_writable"),
        spool_pending: register_int_gauge!(
            "komilion_usage_spool_pending_records",
            "Usage records held in memory until the spool can be appended again."
        )
        .expect("register komilion_usage_spool_pending_records"),
        store_errors: register_int_counter_vec!(
            "komilion_store_write_errors_total",
            "Failed store writes by operation.",
            &["operation"]
        )
        .expect("register komilion_store_write_errors_total"),
        active_leases: register_int_gauge!("komilion_wallet_leases_active", "Wallet leases this instance holds.")
            .expect("register komilion_wallet_leases_active"),
        alerts: register_int_counter_vec!("komilion_alerts_total", "Alert webhooks by outcome.", &["outcome"])
            .expect("register komilion_alerts_total"),
        client_timeouts: register_int_counter_vec!(
            "komilion_client_timeouts_total",
            "Client connections closed for being too slow, by phase (head, body, idle).",
            &["phase"]
        )
        .expect("register komilion_client_timeouts_total"),
        bad_heads: register_int_counter_vec!(
            "komilion_bad_request_heads_total",
            "Request heads refused before routing, by reason.",
            &["reason"]
        )
        .expect("register komilion_bad_request_heads_total"),
        connections_open: register_int_gauge_vec!(
            "komilion_connections_open",
            "Open client connections by listener.",
            &["listener"]
        )
        .expect("register komilion_connections_open"),
        connections_refused: register_int_counter_vec!(
            "komilion_connections_refused_total",
            "Connections refused because their listener was at max_connections_per_listener.",
            &["listener"]
        )
        .expect("register komilion_connections_refused_total"),
    };
    m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    m
});

/// Decrements the in-flight gauge however the request ends (even if its task is dropped).
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> InFlight {
        METRICS.in_flight.inc();
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        METRICS.in_flight.dec();
    }
}

/// The metrics listener: `GET /metrics` (Prometheus text format) and `GET /health` (200 once
/// the gateway can serve: its store, if it has one, is open; 503 before).
pub struct MetricsApp {
    pub ready: Option<crate::store::cache::StoreSlot>,
    /// Shown by `/health`.
    pub breakers: std::sync::Arc<crate::providers::breaker::Breakers>,
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        LazyLock::force(&METRICS);
        let path = session.req_header().uri.path();
        let (status, content_type, body) = match path {
            "/metrics" => {
                let mut body = Vec::with_capacity(16 * 1024);
                let encoder = TextEncoder::new();
                match encoder.encode(&prometheus::gather(), &mut body) {
                    Ok(()) => (200, encoder.format_type().to_owned(), body),
                    Err(e) => (500, "text/plain".to_owned(), e.to_string().into_bytes()),
                }
            }
            "/health" if self.ready.as_ref().is_some_and(|slot| slot.get().is_none()) => {
                (503, "application/json".to_owned(), br#"{"status":"starting"}"#.to_vec())
            }
            "/health" => {
                // Serving, whatever the providers' state: which ones are skipped is shown for
                // dashboards, not a reason to take the instance out of a balancer.
                let breakers: Vec<serde_json::Value> = self
                    .breakers
                    .states(std::time::Instant::now())
                    .into_iter()
                    .map(|(provider, model, state)| {
                        serde_json::json!({"provider": provider, "model": model, "state": state.as_str()})
                    })
                    .collect();
                let body = serde_json::json!({"status": "ok", "breakers": breakers});
                (200, "application/json".to_owned(), body.to_string().into_bytes())
            }
            _ => (404, "application/json".to_owned(), br#"{"error":"not found"}"#.to_vec()),
        };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}
