#![allow(clippy::unwrap_used)]
//! Fallbacks, circuit breakers and deadlines through the real binary.

mod common;

use common::*;
use komilion::mock_provider::Behavior;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MODEL: &str = "gpt-4o-mini";

fn failing_with(status: u16) -> Value {
    let mut body = chat_body(MODEL, "hello", false);
    body["mock"] = json!({"fail_status": status});
    body
}

async fn health(gw: &GatewayProcess) -> Value {
    http()
        .get(gw.metrics_url().replace("/metrics", "/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn breaker_state(health: &Value, provider: &str) -> Option<String> {
    health["breakers"]
        .as_array()?
        .iter()
        .find(|b| b["provider"] == provider && b["model"] == MODEL)
        .and_then(|b| b["state"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("flaky", mock.base_url(), &[MODEL])
            .with("    breaker: {consecutive_failures: 2, cooldown_ms: 1000}\n")],
        "",
    );
    for _ in 0..2 {
        let (status, body) = post_json(&gw, CLIENT_KEY, &failing_with(500)).await;
        assert_eq!(status, 500, "{body}");
    }
    // Open: the provider is not asked; the client is told when to come back.
    let asked = mock.request_count();
    let resp = post_chat(&gw, CLIENT_KEY, chat_body(MODEL, "hello", false).to_string()).await;
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry_after), "{retry_after}");
    let (status, body) = status_and_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("provider_unavailable")),
        "{body}"
    );
    assert_eq!(mock.request_count(), asked);
    assert_eq!(breaker_state(&health(&gw).await, "flaky").as_deref(), Some("open"));
    gw.metric_until(
        "komilion_breaker_state{model=\"gpt-4o-mini\",provider=\"flaky\"}",
        |v| v == 2.0,
    )
    .await;
    gw.metric_until("komilion_breaker_rejections_total{provider=\"flaky\"}", |v| v == 1.0)
        .await;

    // After the cooldown one request probes; it succeeds and the breaker closes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post_json(&gw, CLIENT_KEY, &chat_body(MODEL, "hello", false)).await;
        if status == 200 {
            break;
        }
        assert_eq!(body["error"]["code"], "provider_unavailable", "{body}");
        assert!(Instant::now() < deadline, "the breaker never let a probe through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(breaker_state(&health(&gw).await, "flaky").as_deref(), Some("closed"));
    let (status, _) = post_json(&gw, CLIENT_KEY, &chat_body(MODEL, "hello", false)).await;
    assert_eq!(status, 200);
}

/// A provider that answers every request 429 with `retry-after: 60` (long enough that no
/// machine is slow enough to see it expire within a test); returns its URL and request count.
async fn rate_limited_provider() -> (String, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let url = hand_written_provider(move |mut s, _request| {
        let counter = counter.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            counter.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
            let head = format!(
                "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 60\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        }
    })
    .await;
    (url, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_skips_the_provider_for_that_long_and_falls_back_meanwhile() {
    let (limited, asked) = rate_limited_provider().await;
    let spare = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("limited", limited, &[MODEL]),
            ProviderSpec::new("spare", spare.base_url(), &[MODEL]),
        ],
        "",
    );
    // The first provider answers 429 `retry-after: 60`: the spare serves, now and for the
    // requests that follow within the minute, without the limited provider being asked again.
    for served in 1..=3 {
        let (status, body) = post_json(&gw, CLIENT_KEY, &chat_body(MODEL, "hello", false)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((asked.load(Ordering::SeqCst), spare.request_count()), (1, served));
    }
    assert_eq!(breaker_state(&health(&gw).await, "limited").as_deref(), Some("open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_only_provider_answers_429_without_being_asked_again() {
    let (limited, asked) = rate_limited_provider().await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("limited", limited, &[MODEL])], "");
    let (status, _) = post_json(&gw, CLIENT_KEY, &chat_body(MODEL, "hello", false)).await;
    assert_eq!(status, 429);
    let resp = post_chat(&gw, CLIENT_KEY, chat_body(MODEL, "hello", false).to_string()).await;
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry_after), "{retry_after}");
    let (status, body) = status_and_json(resp).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (429, Some("rate_limit_error")),
        "{body}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_provider_is_down_the_client_gets_an_error_in_its_surface_within_the_deadline() {
    // Nothing listens on these ports; a third provider answers only after 30 s.
    let slow = mock_provider(Behavior {
        ttfb_ms: 30_000,
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("gone", format!("http://127.0.0.1:{}/v1", free_port()), &[MODEL]),
            ProviderSpec::new("also-gone", format!("http://127.0.0.1:{}/v1", free_port()), &[MODEL]),
            ProviderSpec::new("slow", slow.base_url(), &[MODEL]).of_kind("openai"),
        ],
        "fallback:\n  max_attempts: 3\n  deadline_ms: 1500\n",
    );
    let started = Instant::now();
    let (status, body) = post_json(&gw, CLIENT_KEY, &chat_body(MODEL, "hello", false)).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    let started = Instant::now();
    let resp = http()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .json(&json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(resp).await;
    assert!(status == 504 || status == 503, "{status} {body}");
    assert_eq!(body["type"], "error", "Anthropic's shape: {body}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_stop_at_max_attempts() {
    let mocks = [
        mock_provider(Behavior::default()).await,
        mock_provider(Behavior::default()).await,
        mock_provider(Behavior::default()).await,
    ];
    let specs: Vec<_> = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| ProviderSpec::new(&format!("p{i}"), m.base_url(), &[MODEL]))
        .collect();
    let gw = GatewayProcess::start(&specs, "fallback:\n  max_attempts: 2\n");
    let (status, body) = post_json(&gw, CLIENT_KEY, &failing_with(500)).await;
    assert_eq!(status, 500, "{body}");
    let asked: Vec<u64> = mocks.iter().map(|m| m.request_count()).collect();
    assert_eq!(asked, [1, 1, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_total_timeout_ends_with_an_error_event() {
    // 40 pieces 250 ms apart: 10 s, against a total of 1.5 s.
    let slow = mock_provider(Behavior {
        chunks: 40,
        chunk_delay_ms: 250,
        ..Behavior::default()
    })
    .await;
    let mut spec = ProviderSpec::new("slow", slow.base_url(), &[MODEL]);
    spec.total_ms = 1500;
    let gw = GatewayProcess::start(&[spec], "");
    let started = Instant::now();
    let raw = post_chat(&gw, CLIENT_KEY, chat_body(MODEL, "hello", true).to_string())
        .await
        .text()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    let events = sse_data(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    assert!(events[events.len() - 2].contains("upstream_timeout"), "{raw}");
    assert!(
        events.iter().any(|e| e.contains("Echo: hello")),
        "what came in time is delivered: {raw}"
    );
}
