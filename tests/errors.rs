#![allow(clippy::unwrap_used)]
//! Bad input and failing upstreams: each gets OpenAI's error shape with the right status, and
//! nothing hangs.

mod common;

use common::*;
use futures::StreamExt;
use komilion::mock_provider::Behavior;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

async fn post(gw: &GatewayProcess, key: Option<&str>, body: Vec<u8>) -> (u16, serde_json::Value) {
    let mut req = http()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
fn assert_openai_error(v: &serde_json::Value, code: Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.as_object().unwrap().contains_key("param"), "{v}");
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        "limits:\n  max_body_bytes: 1048576\n",
    );
    let good = chat_body("gpt-4o-mini", "hi", false);

    let (status, v) = post(&gw, Some(CLIENT_KEY), b"{\"model\": \"gpt-4o-mini\", ".to_vec()).await;
    assert_eq!(status, 400);
    assert_openai_error(&v, Some("invalid_json"));

    let (status, v) = post(&gw, Some(CLIENT_KEY), json(serde_json::json!({"messages": []}))).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "model");

    let (status, v) = post(&gw, Some(CLIENT_KEY), json(chat_body("gpt-9-ultra", "hi", false))).await;
    assert_eq!(status, 404);
    assert_openai_error(&v, Some("model_not_found"));

    let (status, v) = post(&gw, None, json(good.clone())).await;
    assert_eq!(status, 401);
    assert_openai_error(&v, Some("missing_api_key"));

    let (status, v) = post(&gw, Some("sk-kml-not-a-real-key-000000000"), json(good.clone())).await;
    assert_eq!(status, 401);
    assert_openai_error(&v, Some("invalid_api_key"));
    assert!(
        !v.to_string().contains("sk-kml-not-a-real-key"),
        "the error does not echo the key"
    );

    let big = json(chat_body("gpt-4o-mini", &"z".repeat(1_100_000), false));
    let (status, v) = post(&gw, Some(CLIENT_KEY), big.clone()).await;
    assert_eq!(status, 413);
    assert_openai_error(&v, Some("request_too_large"));

    // Without a Content-Length (chunked upload) the limit holds while reading.
    let stream = futures::stream::iter(
        big.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
    }

    let resp = http().get(gw.url("/v1/nothing-here")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http().get(gw.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(resp.status(), 405);

    assert_eq!(mock.request_count(), 0, "none of these reached the provider");
    let (status, _) = post(&gw, Some(CLIENT_KEY), json(good)).await;
    assert_eq!(status, 200, "the gateway still serves after all that");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_map_to_gateway_statuses() {
    let slow = mock_provider(Behavior {
        ttfb_ms: 60_000,
        ..Behavior::default()
    })
    .await;
    let failing = mock_provider(Behavior {
        fail_status: Some(400),
        ..Behavior::default()
    })
    .await;
    let mut slow_spec = ProviderSpec::new("slow", slow.base_url(), &["slow-model"]);
    slow_spec.first_byte_ms = 300;
    let gw = GatewayProcess::start(
        &[
            slow_spec,
            ProviderSpec::new("dead", format!("http://127.0.0.1:{}/v1", free_port()), &["dead-model"]),
            ProviderSpec::new("picky", failing.base_url(), &["picky-model"]),
        ],
        "",
    );
    let (status, v) = post(&gw, Some(CLIENT_KEY), json(chat_body("dead-model", "x", false))).await;
    assert_eq!(status, 502);
    assert_openai_error(&v, Some("upstream_unreachable"));

    let started = std::time::Instant::now();
    let (status, v) = post(&gw, Some(CLIENT_KEY), json(chat_body("slow-model", "x", true))).await;
    assert_eq!(status, 504);
    assert_openai_error(&v, Some("upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the configured first-byte timeout applies"
    );

    // The provider's own client errors are passed through as it sent them.
    let (status, v) = post(&gw, Some(CLIENT_KEY), json(chat_body("picky-model", "x", false))).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["message"], "Invalid request.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_stream_ends_the_stream_cleanly() {
    let mock = mock_provider(Behavior {
        chunks: 10,
        reset_after: Some(3),
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");

    let fetch = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("gpt-4o-mini", "reset", true))
        .send();
    let resp = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("no hang")
        .unwrap();
    let data = sse_data(&body);
    assert_eq!(
        data.len(),
        1 + 3 + 2,
        "role, 3 content chunks, the error event, [DONE]: {body}"
    );
    let error: serde_json::Value = serde_json::from_str(&data[4]).unwrap();
    assert_eq!(error["error"]["code"], "upstream_connection_lost");
    assert_eq!(
        data[5], "[DONE]",
        "clients that reconnect on an unterminated stream stop here"
    );

    // The official client sees an error, not a silent end, and the stream finishes.
    let client = openai_client(&gw, CLIENT_KEY);
    let req: async_openai::types::CreateChatCompletionRequest =
        serde_json::from_value(chat_body("gpt-4o-mini", "reset", true)).unwrap();
    let items: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        client.chat().create_stream(req).await.unwrap().collect(),
    )
    .await
    .unwrap();
    assert_eq!(items.iter().filter(|i| i.is_ok()).count(), 4);
    assert!(items.last().unwrap().is_err());
    assert_eq!(mock.request_count(), 2, "no reconnect replayed the request");
}

#[test]
fn a_malformed_upstream_event_does_not_break_the_relay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(mock_provider(Behavior {
        chunks: 4,
        malformed_after: Some(2),
        ..Behavior::default()
    }));
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let body = json(chat_body("gpt-4o-mini", "m", true));
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let raw = read_all(&mut s);
    assert!(raw.starts_with("HTTP/1.1 200"));
    // Something the client's SDK cannot parse is not passed on: the stream ends with an error
    // event in the OpenAI shape, then [DONE].
    assert!(
        !raw.contains("chatcmpl-broken"),
        "the malformed event is not relayed: {raw:?}"
    );
    let error = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|d| d.contains("\"error\""))
        .unwrap_or_else(|| panic!("an error event: {raw:?}"));
    let error: serde_json::Value = serde_json::from_str(error).unwrap();
    assert_eq!(error["error"]["code"], "bad_upstream_response");
    assert!(raw.contains("data: [DONE]\n\n"), "the stream ran to its end: {raw:?}");
    assert!(
        raw.ends_with("\r\n0\r\n\r\n"),
        "the chunked body is terminated: {raw:?}"
    );
}

/// Send raw bytes and read the gateway's whole answer (it closes the connection after these):
/// the status and the JSON body.
fn raw_answer(port: u16, request: &[u8]) -> (u16, String, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let raw = read_all(&mut s);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {raw:?}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, head.to_ascii_lowercase(), json)
}

/// What the gateway refuses before routing (a head it cannot read) is still answered in
/// OpenAI's error shape, not with an empty page.
#[test]
fn heads_the_gateway_refuses_get_openai_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(mock_provider(Behavior::default()));
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        "limits:\n  max_header_bytes: 16384\n",
    );
    let key = format!("authorization: Bearer {CLIENT_KEY}\r\n");
    let cases = [
        ("a malformed request line", "GARBAGE\r\n\r\n".to_owned(), 400, "malformed_request"),
        (
            "a malformed header",
            format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{key}no colon here\r\n\r\n"),
            400,
            "malformed_request",
        ),
        (
            "HTTP/1.1 without Host",
            format!("GET /v1/models HTTP/1.1\r\n{key}\r\n"),
            400,
            "missing_host",
        ),
        (
            "oversized headers",
            format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{key}x-big: {}\r\n\r\n", "a".repeat(100_000)),
            431,
            "headers_too_large",
        ),
        (
            "contradictory lengths",
            format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{key}content-length: 2\r\ncontent-length: 3\r\n\r\n{{}}"),
            400,
            "invalid_framing",
        ),
    ];
    for (what, request, status, code) in cases {
        let (got, head, v) = raw_answer(gw.port, request.as_bytes());
        assert_eq!(got, status, "{what}: {head} {v}");
        assert!(head.contains("content-type: application/json"), "{what}: {head}");
        assert!(head.contains("connection: close"), "{what}: {head}");
        assert_openai_error(&v, Some(code));
    }
    // HTTP/1.0 needs no Host.
    let (status, head, v) = raw_answer(gw.port, format!("GET /v1/models HTTP/1.0\r\n{key}\r\n").as_bytes());
    assert_eq!(status, 200, "{head} {v}");
    assert_eq!(v["object"], "list");
}
