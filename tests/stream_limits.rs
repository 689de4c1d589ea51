#![allow(clippy::unwrap_used)]
//! What one streamed answer can make the gateway spend: memory stays bounded however long the
//! stream and however large its events, and what was delivered is billed.

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// " hello" is one token in both OpenAI encodings: a text of N of them is N tokens.
const HELLO: &str = " hello";

/// A provider that answers every request with a stream of `events` content events of
/// `hellos` × " hello" each and no usage, then `[DONE]`; or, with `oversized`, one event of that
/// many bytes that never ends. Generated as it is written: the test holds none of it.
async fn streaming_provider(events: usize, hellos: usize, oversized: Option<usize>) -> String {
    hand_written_provider(move |mut s, _request| async move {
        // Close-delimited, as some providers do.
        let header = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        if s.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        if let Some(size) = oversized {
            let start = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";
            let _ = s.write_all(start).await;
            let filler = vec![b'x'; 65536];
            let mut sent = 0;
            while sent < size {
                if s.write_all(&filler).await.is_err() {
                    return;
                }
                sent += filler.len();
            }
            return;
        }
        let event = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null}}]}}\n\n",
            HELLO.repeat(hellos)
        );
        for _ in 0..events {
            if s.write_all(event.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"data: [DONE]\n\n").await;
    })
    .await
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// 400 MB streamed without usage: the gateway's memory stays flat and the record bills the
/// tokens delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_mb_stream_without_usage_keeps_memory_flat_and_bills_what_was_delivered() {
    let events = 400;
    let hellos = 174_763; // 1,048,578 bytes of content per event
    let base = streaming_provider(events, hellos, None).await;
    let warm = streaming_provider(3, 20_000, None).await;
    let (_db, url) = sqlite_url();
    let (gw, admin) = GatewayProcess::with_store(
        &[
            ProviderSpec::new("big", base, &["gpt-4o-mini"]),
            ProviderSpec::new("warm", warm, &["gpt-4o"]),
        ],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "big"}), Some("1000")).await;
    // Warm up on the same tokenizer (o200k, loaded once for the process), pools and buffers.
    let warmed = post_chat(&gw, &secret, chat_body("gpt-4o", "warm up", true).to_string())
        .await
        .text()
        .await
        .unwrap();
    assert!(warmed.ends_with("data: [DONE]\n\n"));
    admin.usage_until(&account, |r| r.len() == 1).await;
    let baseline = rss_bytes(gw.pid());
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), gw.pid());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .timeout(Duration::from_secs(600))
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "go on"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut received = 0usize;
    let mut tail = Vec::new();
    while let Some(piece) = body.next().await {
        let piece = piece.unwrap();
        received += piece.len();
        tail.extend_from_slice(&piece);
        if tail.len() > 256 {
            tail.drain(..tail.len() - 256);
        }
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert!(received > 400 * 1_000_000, "{received} bytes");
    assert!(String::from_utf8_lossy(&tail).ends_with("data: [DONE]\n\n"));
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(
        growth < 64 * 1024 * 1024,
        "the gateway's RSS grew by {} MiB",
        growth / (1024 * 1024)
    );
    let records = admin.usage_until(&account, |r| r.len() == 2).await;
    let record = records.iter().find(|r| r["model"] == "gpt-4o-mini").unwrap();
    assert_eq!(record["estimated"], true);
    assert_eq!(
        record["output_tokens"].as_u64(),
        Some((events * hellos) as u64),
        "every delivered token, counted as it went"
    );
}

/// One event larger than `limits.stream_event_max_bytes` (still without its blank line) ends
/// the client's stream with an error event; what came before is billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_cap_ends_the_stream_with_an_error_event() {
    let base = streaming_provider(0, 0, Some(8 * 1024 * 1024)).await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("huge", base, &["gpt-4o-mini"])],
        "limits:\n  stream_event_max_bytes: 1048576\n",
    );
    let body = tokio::time::timeout(Duration::from_secs(120), async {
        post_chat(&gw, CLIENT_KEY, chat_body("gpt-4o-mini", "huge", true).to_string())
            .await
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("the stream ends");
    let data = sse_data(&body);
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "bad_upstream_response", "{body}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit of 1048576 bytes"),
        "{error}"
    );
    assert_eq!(data.last().unwrap(), "[DONE]");
    gw.metric_until("komilion_stream_events_too_large_total", |v| v == 1.0)
        .await;
}
