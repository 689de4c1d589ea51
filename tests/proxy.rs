#![allow(clippy::unwrap_used)]
//! The gateway core end to end: the real binary, a real client library, the simulated provider.

mod common;

use async_openai::types::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use common::*;
use futures::StreamExt;
use komilion::mock_provider::Behavior;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn request(model: &str, content: &str) -> async_openai::types::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(content)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_through_the_openai_client() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let client = openai_client(&gw, CLIENT_KEY);
    let reply = client
        .chat()
        .create(request("gpt-4o-mini", "nonce-1234"))
        .await
        .unwrap();
    let content = reply.choices[0].message.content.clone().unwrap();
    assert!(content.starts_with("Echo: nonce-1234"), "{content}");
    let usage = reply.usage.unwrap();
    assert_eq!(
        usage.completion_tokens as u64,
        komilion::metering::tokens::count_text("gpt-4o-mini", &content)
    );
    // "user" message: 3 + 1 + content tokens, and 3 priming the reply.
    let prompt = 3 + 1 + komilion::metering::tokens::count_text("gpt-4o-mini", "nonce-1234") + 3;
    assert_eq!(usage.prompt_tokens as u64, prompt);

    // The provider got its own key, never the client's.
    let seen = mock.recorded().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert!(seen.headers.iter().all(|(_, v)| !v.contains(CLIENT_KEY)));
    assert_eq!(seen.path, "/v1/chat/completions");

    // Every response says which request it was and what the gateway cost.
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("gpt-4o-mini", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-komilion-request-id"].len(), 32);
    let overhead: u64 = resp.headers()["x-komilion-overhead-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead < 5_000_000);
    assert_eq!(resp.headers()["x-komilion-provider"], "sim");
    assert_eq!(resp.headers()["x-komilion-model"], "gpt-4o-mini");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_and_without_include_usage() {
    let mock = mock_provider(Behavior {
        chunks: 5,
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let client = openai_client(&gw, CLIENT_KEY);

    let mut req = request("gpt-4o-mini", "stream-nonce");
    req.stream = Some(true);
    let chunks: Vec<_> = client.chat().create_stream(req.clone()).await.unwrap().collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(|c| c.unwrap()).collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c.choices.first()?.delta.content.clone())
        .collect();
    assert!(text.starts_with("Echo: stream-nonce"), "{text}");
    assert!(
        chunks.iter().all(|c| c.usage.is_none()),
        "a client that did not ask gets no usage chunk"
    );

    req.stream_options = Some(ChatCompletionStreamOptions { include_usage: true });
    let chunks: Vec<_> = client.chat().create_stream(req).await.unwrap().collect().await;
    let last = chunks.last().unwrap().as_ref().unwrap();
    assert!(last.choices.is_empty());
    assert_eq!(
        last.usage.as_ref().unwrap().completion_tokens as u64,
        komilion::metering::tokens::count_text("gpt-4o-mini", &text)
    );

    // On the wire: the stream ends with [DONE] and carries no usage event unasked.
    let body = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("gpt-4o-mini", "raw", true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(data.len(), 1 + 5 + 1 + 1, "role, 5 content, finish, [DONE]");
    assert!(!body.contains("\"usage\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_mib_prompt_is_forwarded_whole() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let big = "x".repeat(2 * 1024 * 1024);
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", &big, false)).unwrap();
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Echo: xxxx"));
    assert_eq!(
        mock.recorded().pop().unwrap().body_len,
        body.len(),
        "the body reached the provider byte for byte"
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(mock_provider(Behavior::default()));
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", &"y".repeat(1_500_000), false)).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(&body).unwrap();
    let rest = read_all(&mut s);
    assert!(rest.starts_with("HTTP/1.1 200"), "{}", &rest[..rest.len().min(200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_for_the_caller() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini", "gpt-4o"])],
        "",
    );
    let list = openai_client(&gw, CLIENT_KEY).models().list().await.unwrap();
    let ids: Vec<_> = list.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["gpt-4o-mini", "gpt-4o"]);
    let year_2020 = 1_577_836_800;
    assert!(
        list.data.iter().all(|m| m.created > year_2020),
        "`created` is a real time: {:?}",
        list.data.iter().map(|m| m.created).collect::<Vec<_>>()
    );
    let resp = http().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // One model, as the SDK retrieves it; an unknown one is a 404 in OpenAI's shape.
    let one = openai_client(&gw, CLIENT_KEY)
        .models()
        .retrieve("gpt-4o")
        .await
        .unwrap();
    assert_eq!((one.id.as_str(), one.owned_by.as_str()), ("gpt-4o", "sim"));
    let resp = http()
        .get(gw.url("/v1/models/no-such%00model"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{body}"
    );
    assert!(
        body["error"]["message"].as_str().unwrap().contains("no-suchmodel"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_falls_back_to_the_next_provider() {
    let limited = mock_provider(Behavior {
        fail_status: Some(429),
        ..Behavior::default()
    })
    .await;
    let healthy = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("first", limited.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("second", healthy.base_url(), &["gpt-4o-mini"]),
        ],
        "",
    );
    for stream in [false, true] {
        let resp = http()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .json(&chat_body("gpt-4o-mini", "fallback", stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-komilion-provider"], "second");
        assert!(resp.text().await.unwrap().contains("Echo: fallback"));
    }
    // The 429 said `retry-after: 1`: a request within that second skips the limited provider
    // (tests/fallbacks.rs), a later one asks it again; either way it fell back or skipped.
    let metrics = http().get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
    let value = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let fallbacks = value(r#"komilion_fallbacks_total{provider="first"}"#);
    let skipped = value(r#"komilion_breaker_rejections_total{provider="first"}"#);
    assert_eq!(
        (fallbacks + skipped, limited.request_count()),
        (2, fallbacks),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_get_their_own_answers() {
    let mock = mock_provider(Behavior {
        chunk_delay_ms: 2,
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let client = http();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            let url = gw.url("/v1/chat/completions");
            tokio::spawn(async move {
                let nonce = format!("caller-{i:03}-{}", i * 7919);
                let resp = client
                    .post(url)
                    .bearer_auth(CLIENT_KEY)
                    .json(&chat_body("gpt-4o-mini", &nonce, i % 2 == 0))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let text = resp.text().await.unwrap();
                assert_eq!(status, 200, "caller {i}: {text}");
                assert!(
                    text.contains(&format!("Echo: {nonce}")),
                    "caller {i} got someone else's answer"
                );
                for other in [i + 1, i + 100] {
                    assert!(!text.contains(&format!("caller-{:03}-", other % 200)) || other % 200 == i);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(mock.request_count(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_requests_latency_and_errors() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("dead", format!("http://127.0.0.1:{}/v1", free_port()), &["gpt-dead"]),
        ],
        "",
    );
    let client = http();
    for (model, stream) in [("gpt-4o-mini", false), ("gpt-4o-mini", true), ("gpt-dead", false)] {
        client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .json(&chat_body(model, "m", stream))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    // A request's metrics are recorded in its logging phase, which may run just after the
    // client has its answer: wait for them rather than read once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let needles = [
        r#"komilion_requests_total{model="gpt-4o-mini",provider="sim",route="chat_completions",status="200"} 2"#,
        r#"komilion_requests_total{model="gpt-dead",provider="dead",route="chat_completions",status="502"} 1"#,
        r#"komilion_upstream_errors_total{kind="connect",provider="dead"} 1"#,
        r#"komilion_request_duration_seconds_count{route="chat_completions"} 3"#,
        r#"komilion_gateway_overhead_seconds_count{route="chat_completions"} 3"#,
        r#"komilion_upstream_ttfb_seconds_count{provider="sim"} 2"#,
        "komilion_requests_in_flight 0",
    ];
    loop {
        let metrics = client.get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
        let missing: Vec<_> = needles.iter().filter(|n| !metrics.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "missing {missing:?}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_status(gw.metrics_port, "/health"), Some(200));
}

#[test]
fn a_streamed_answer_keeps_the_connection_reusable() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(mock_provider(Behavior::default()));
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", "keepalive", true)).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for round in 0..2 {
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        // Read until the chunked body's terminator: the response is framed, not close-delimited.
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "round {round}: the gateway closed the connection");
            raw.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "round {round}");
        assert!(text.to_ascii_lowercase().contains("transfer-encoding: chunked"));
        assert!(text.contains("data: [DONE]"));
    }
}

/// An HTTP/1.0 client knows no chunked encoding: its stream is the bare SSE bytes, ended by
/// closing the connection, whether or not it asked for keep-alive.
#[test]
fn an_http10_stream_is_close_delimited() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(mock_provider(Behavior::default()));
    let gw = GatewayProcess::start(&[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])], "");
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", "old client", true)).unwrap();
    for connection in ["", "connection: keep-alive\r\n"] {
        let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.0\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{connection}\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        // read_all returns only once the gateway closes the connection.
        let raw = read_all(&mut s);
        let (head, events) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{raw:?}"));
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        assert!(head.contains("connection: close"), "{connection:?}: {head}");
        assert!(events.starts_with("data: {"), "no chunk framing: {events:?}");
        let data = sse_data(events);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let content: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        assert!(!content.is_empty(), "{events:?}");
    }
}
