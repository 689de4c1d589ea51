#![allow(clippy::unwrap_used)]
//! What crosses between a provider and a client through the gateway: the provider's headers the
//! SDKs rely on (and nothing else), usage taken out structurally from pretty-printed streams,
//! providers that refuse `stream_options`, and no provider secret ever reaching a client.

mod common;

use common::*;
use komilion::mock_provider::Behavior;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

async fn post(gw: &GatewayProcess, body: &Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_providers_request_id_rate_limits_and_retry_after_reach_the_client() {
    let mock = mock_provider(Behavior::default()).await;
    let limited = mock_provider(Behavior {
        fail_status: Some(429),
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("limited", limited.base_url(), &["gpt-4o"]),
        ],
        "",
    );
    for stream in [false, true] {
        let resp = post(&gw, &chat_body("gpt-4o-mini", "headers", stream)).await;
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"), "{h:?}");
        for name in [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
            "x-ratelimit-limit-tokens",
            "openai-processing-ms",
        ] {
            assert!(h.contains_key(name), "{name} missing: {h:?}");
        }
        assert!(!h.contains_key("set-cookie"));
    }
    // A provider's 429 (the last candidate) comes with its retry-after.
    let resp = post(&gw, &chat_body("gpt-4o", "limited", false)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["retry-after-ms"], "1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_taken_out_of_a_pretty_printed_stream_by_structure() {
    let mock = mock_provider(Behavior {
        pretty: true,
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let body = post(&gw, &chat_body("gpt-4o-mini", "pretty", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(body.contains("data: [DONE]"), "{body}");
    assert!(
        !body.contains("usage"),
        "neither the usage chunk nor a `\"usage\": null` member reaches a client that did not ask: {body}"
    );
    // Every event still parses (multi-line data joined as SSE says).
    let mut events = 0;
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let data = data.join("\n");
        if data != "[DONE]" {
            serde_json::from_str::<Value>(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
            events += 1;
        }
    }
    assert!(events >= 3);
}

/// A provider entry with `stream_usage: false` is not sent `stream_options`; the gateway counts
/// the delivered output itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_options_injection_can_be_turned_off_per_provider() {
    let (_db, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"]).with("    stream_usage: false\n")],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "s"}), Some("1")).await;
    let body = post_chat(
        &gw,
        &secret,
        chat_body("gpt-4o-mini", "count it yourself", true).to_string(),
    )
    .await
    .text()
    .await
    .unwrap();
    let delivered: String = sse_data(&body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    let records = admin.usage_until(&account, |r| r.len() == 1).await;
    assert_eq!(records[0]["estimated"], true, "the provider was not asked for usage");
    assert_eq!(
        records[0]["output_tokens"].as_u64(),
        Some(komilion::metering::tokens::count_text("gpt-4o-mini", &delivered))
    );
}

/// A provider that answers each request with a canned response chosen by the request's model.
async fn canned_provider(answers: Vec<(&'static str, String)>) -> String {
    hand_written_provider(move |mut s, request| {
        let text = String::from_utf8_lossy(&request);
        let answer = answers
            .iter()
            .find(|(model, _)| text.contains(&format!("\"{model}\"")))
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into());
        async move {
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

fn json_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_provider_secret_reaches_a_client() {
    let quoted = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {PROVIDER_KEY}.","type":"invalid_request_error","code":"invalid_api_key"}}}}"#
    );
    let debug = format!(
        r#"{{"error":{{"message":"upstream said no; request headers: Authorization: Bearer {PROVIDER_KEY}","type":"server_error"}}}}"#
    );
    let stream_error = format!(
        "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"Hi\"}}}}]}}\n\ndata: {{\"error\":{{\"message\":\"key {PROVIDER_KEY} over quota\",\"type\":\"server_error\"}}}}\n\ndata: [DONE]\n\n"
    );
    let base = canned_provider(vec![
        ("m-401", json_response("401 Unauthorized", &quoted)),
        ("m-403", json_response("403 Forbidden", &quoted)),
        ("m-429", json_response("429 Too Many Requests", &debug)),
        ("m-500", json_response("500 Internal Server Error", &debug)),
        (
            "m-stream",
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{stream_error}",
                stream_error.len()
            ),
        ),
    ])
    .await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new(
            "canned",
            base,
            &["m-401", "m-403", "m-429", "m-500", "m-stream"],
        )],
        "",
    );
    for (model, status, code) in [
        ("m-401", 502, Some("upstream_auth_failed")),
        ("m-403", 502, Some("upstream_auth_failed")),
        ("m-429", 429, None),
        ("m-500", 500, None),
    ] {
        let resp = post(&gw, &chat_body(model, "hi", false)).await;
        assert_eq!(resp.status().as_u16(), status, "{model}");
        let headers = format!("{:?}", resp.headers());
        let body = resp.text().await.unwrap();
        assert!(
            !body.contains(PROVIDER_KEY) && !headers.contains(PROVIDER_KEY),
            "{model}: {body}"
        );
        assert!(!body.contains("provider-secret"), "{model}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{model}: {e}: {body}"));
        if let Some(code) = code {
            assert_eq!(v["error"]["code"], code, "{body}");
            assert!(
                !body.contains("Incorrect API key"),
                "the provider's body is not passed on: {body}"
            );
        } else {
            assert!(body.contains("Bearer sk-p"), "the rest of the message stays: {body}");
        }
    }
    let body = post(&gw, &chat_body("m-stream", "hi", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(body.contains("over quota"), "{body}");
    assert!(!body.contains("provider-secret"), "{body}");
}

/// Strings a client sends never come back unbounded in a header or a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_strings_are_not_echoed_unbounded() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    for model in ["m".repeat(200_000), format!("gpt\u{7}{}", "x".repeat(300))] {
        let resp = tokio::time::timeout(Duration::from_secs(60), post(&gw, &chat_body(&model, "hi", false)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let header_bytes: usize = resp.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        assert!(header_bytes < 2048, "{header_bytes} bytes of headers");
        let body = resp.text().await.unwrap();
        assert!(body.len() < 2048, "{} bytes of body", body.len());
    }
}
