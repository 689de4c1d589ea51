#![allow(clippy::unwrap_used)]
//! Providers of another API format behind the OpenAI surface: Anthropic's Messages API, through
//! the real binary and the official OpenAI client.

mod common;

use async_openai::types::{CreateChatCompletionRequest, CreateChatCompletionStreamResponse, FinishReason};
use common::*;
use futures::StreamExt;
use komilion::mock_provider::{Behavior, MockConfig, MockProvider};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const CLAUDE: &str = "claude-sonnet-4-5";
const DEADLINE: Duration = Duration::from_secs(60);

fn anthropic(name: &str, mock: &MockProvider) -> ProviderSpec {
    ProviderSpec::new(name, mock.base_url(), &[CLAUDE]).of_kind("anthropic")
}

fn typed(body: Value) -> CreateChatCompletionRequest {
    serde_json::from_value(body).unwrap()
}

async fn stream_chunks(gw: &GatewayProcess, body: Value) -> Vec<CreateChatCompletionStreamResponse> {
    stream_chunks_with(gw, CLIENT_KEY, body).await
}

async fn stream_chunks_with(gw: &GatewayProcess, key: &str, body: Value) -> Vec<CreateChatCompletionStreamResponse> {
    let client = openai_client(gw, key);
    let collect = async {
        let stream = client.chat().create_stream(typed(body)).await.unwrap();
        stream.map(|chunk| chunk.unwrap()).collect::<Vec<_>>().await
    };
    tokio::time::timeout(DEADLINE, collect)
        .await
        .expect("the stream ends in time")
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city", "days"]}
    }}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_model_serves_openai_clients_whole_and_streamed() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(&[anthropic("claude", &mock)], "");

    let (status, whole) = post_json(&gw, CLIENT_KEY, &chat_body(CLAUDE, "hello", false)).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], CLAUDE);
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(text.starts_with("Echo: hello"), "{text}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{whole}");
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{whole}");

    // The provider was asked in its own format, with its own credential and nothing of the
    // client's.
    let seen = mock.recorded().pop().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some(PROVIDER_KEY));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen.header("authorization"), None);

    // Streamed, the official client reads the same answer, and its usage when it asks.
    let mut body = chat_body(CLAUDE, "hello", true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&gw, body).await;
    let streamed: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    assert_eq!(streamed, text);
    let finish: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.finish_reason)
        .collect();
    assert_eq!(finish, [FinishReason::Stop]);
    let usage = chunks
        .last()
        .unwrap()
        .usage
        .as_ref()
        .expect("the usage chunk comes last");
    assert_eq!(
        usage.prompt_tokens as u64,
        whole["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage.completion_tokens as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Without include_usage, no usage chunk (as OpenAI would send it).
    let raw = post_chat(&gw, CLIENT_KEY, chat_body(CLAUDE, "hello", true).to_string())
        .await
        .text()
        .await
        .unwrap();
    assert!(!raw.contains("\"usage\""), "{raw}");
    assert_eq!(sse_data(&raw).last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_go_both_ways() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(&[anthropic("claude", &mock)], "");
    let ask = json!({"model": CLAUDE, "messages": [{"role": "user", "content": "weather in Paris?"}],
                     "tools": weather_tool()});

    let (status, whole) = post_json(&gw, CLIENT_KEY, &ask).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string() && args["days"].is_i64(), "{args}");

    // Streamed: the call's arguments arrive in pieces that join to the same JSON.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let chunks = stream_chunks(&gw, streamed).await;
    let calls: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .flat_map(|c| c.delta.tool_calls.iter().flatten())
        .collect();
    assert_eq!(calls[0].function.as_ref().unwrap().name.as_deref(), Some("get_weather"));
    assert!(calls[0].id.is_some());
    let joined: String = calls
        .iter()
        .filter_map(|c| c.function.as_ref()?.arguments.as_deref())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&joined).unwrap(), args);
    let finish: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.finish_reason)
        .collect();
    assert_eq!(finish, [FinishReason::ToolCalls]);

    // The result goes back as Anthropic's tool_result in a user turn.
    let follow_up = json!({"model": CLAUDE, "tools": weather_tool(), "tool_choice": "none", "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}
    ]});
    let (status, answer) = post_json(&gw, CLIENT_KEY, &follow_up).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_openai_clients_in_openai_shape_without_the_provider_key() {
    // One failing provider per fault (a translated request carries no `mock` field: the
    // canonical request keeps only what every format can say).
    let faults = [
        ("claude-429", json!({"fail_status": 429})),
        ("claude-401", json!({"fail_status": 401})),
        ("claude-overloaded", json!({"stream_error_after": 2})),
        ("claude-reset", json!({"reset_after": 2})),
        ("claude-malformed", json!({"malformed_after": 1})),
    ];
    let mut mocks = Vec::new();
    let mut specs = Vec::new();
    for (model, behavior) in &faults {
        let mock = mock_provider(serde_json::from_value(behavior.clone()).unwrap()).await;
        specs.push(ProviderSpec::new(model, mock.base_url(), &[model]).of_kind("anthropic"));
        mocks.push(mock);
    }
    let gw = GatewayProcess::start(&specs, "");
    let streamed = |model: &str| post_chat(&gw, CLIENT_KEY, chat_body(model, "hello", true).to_string());

    // A rate limit stays a 429 the client backs off from, with the provider's retry-after.
    let resp = post_chat(&gw, CLIENT_KEY, chat_body("claude-429", "hello", false).to_string()).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let (status, body) = status_and_json(resp).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(body["error"]["message"].as_str().unwrap().len() > 3, "{body}");

    // The provider refusing the gateway's key is the gateway's problem, not the client's.
    let (status, body) = post_json(&gw, CLIENT_KEY, &chat_body("claude-401", "hello", false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("upstream_auth_failed"))
    );

    // An overloaded provider mid-stream: the client's stream carries an OpenAI error event;
    // nothing quotes the provider's key.
    let raw = streamed("claude-overloaded").await.text().await.unwrap();
    let events = sse_data(&raw);
    let error: Value = events
        .iter()
        .find_map(|e| {
            serde_json::from_str::<Value>(e)
                .ok()
                .filter(|v| v.get("error").is_some())
        })
        .unwrap_or_else(|| panic!("an error event: {raw}"));
    assert!(
        error["error"]["message"].as_str().unwrap().contains("Overloaded"),
        "{error}"
    );
    assert!(!raw.contains(PROVIDER_KEY));

    // A connection reset mid-stream ends the stream with the gateway's error and [DONE].
    let raw = streamed("claude-reset").await.text().await.unwrap();
    let events = sse_data(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    assert!(events[events.len() - 2].contains("upstream_connection_lost"), "{raw}");

    // A malformed provider event is never relayed.
    let raw = streamed("claude-malformed").await.text().await.unwrap();
    assert!(raw.contains("bad_upstream_response"), "{raw}");
    for event in sse_data(&raw) {
        assert!(
            event == "[DONE]" || serde_json::from_str::<Value>(&event).is_ok(),
            "{event}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_from_anthropic_falls_back_to_an_openai_provider_and_is_billed_once() {
    let (_dir, url) = sqlite_url();
    let failing = mock_provider(Behavior {
        fail_status: Some(429),
        ..Behavior::default()
    })
    .await;
    let openai = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[
            anthropic("claude", &failing),
            ProviderSpec::new("compatible", openai.base_url(), &[CLAUDE]),
        ],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "m"}), Some("5")).await;
    let (status, body) = post_json(&gw, &secret, &chat_body(CLAUDE, "hello", false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(failing.request_count(), 1);
    assert_eq!(openai.recorded().pop().unwrap().path, "/v1/chat/completions");
    let records = admin.usage_until(&account, |r| !r.is_empty()).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["provider"], "compatible");
    assert_eq!(records[0]["status"], 200);
}

/// claude-sonnet-4-5's catalog prices in nano-USD per token: $3 in, $0.30 cache read, $3.75
/// five-minute cache write, $15 out per 1M tokens.
fn sonnet_cost(usage: &Value) -> i64 {
    let n = |k: &str| usage[k].as_u64().unwrap_or(0);
    let per = |tokens: u64, usd_per_mtok_nano: i64| komilion::money::token_cost(tokens, usd_per_mtok_nano);
    per(n("input_tokens"), 3_000_000_000)
        + per(n("cache_read_input_tokens"), 300_000_000)
        + per(n("cache_creation_input_tokens"), 3_750_000_000)
        + per(n("output_tokens"), 15_000_000_000)
}

/// Anthropic's own usage for `body` (OpenAI-shaped), from a twin of the simulated provider that
/// has seen the same requests before: what the provider documents, to compare the bill with.
async fn provider_usage(twin: &MockProvider, body: &Value) -> Value {
    let canonical = komilion::formats::openai_chat::decode_request(body.to_string().as_bytes()).unwrap();
    use komilion::providers::ProviderAdapter;
    let mut canonical = canonical;
    canonical.stream = false;
    let wire = komilion::providers::anthropic::Anthropic
        .encode_request(&canonical, CLAUDE)
        .unwrap();
    let resp = http()
        .post(format!("{}/messages", twin.base_url()))
        .header("x-api-key", PROVIDER_KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(wire)
        .send()
        .await
        .unwrap();
    let answer: Value = resp.json().await.unwrap();
    answer["usage"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_reads_and_writes_are_billed_as_anthropic_bills_them_streamed_or_not() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let twin = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(&[anthropic("claude", &mock)], &url, STORE_PLUGINS, "");
    let (account, _, secret) = admin.account_with_key(json!({"name": "m"}), Some("5")).await;
    let long_context = "The gateway keeps an exact ledger of every token. ".repeat(200);
    let body = |stream: bool| {
        json!({"model": CLAUDE, "stream": stream, "messages": [
            {"role": "system", "content": [{"type": "text", "text": long_context,
                                            "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "summarise"}
        ]})
    };

    let mut expected = Vec::new();
    for stream in [false, true, false] {
        let resp = post_chat(&gw, &secret, body(stream).to_string()).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(!text.is_empty());
        expected.push(provider_usage(&twin, &body(stream)).await);
    }
    // The first request wrote the cache, the others read it.
    assert!(
        expected[0]["cache_creation_input_tokens"].as_u64().unwrap() > 0,
        "{expected:?}"
    );
    assert!(
        expected[1]["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{expected:?}"
    );

    let records = admin.usage_until(&account, |r| r.len() == 3).await;
    let mut records = records;
    records.sort_by(|a, b| a["request_id"].as_str().cmp(&b["request_id"].as_str()));
    for (record, usage) in records.iter().zip(&expected) {
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        let prompt = n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
        assert_eq!(record["input_tokens"].as_u64(), Some(prompt), "{record} vs {usage}");
        assert_eq!(
            record["cached_tokens"].as_u64(),
            Some(n("cache_read_input_tokens")),
            "{record}"
        );
        assert_eq!(record["output_tokens"].as_u64(), Some(n("output_tokens")), "{record}");
        assert_eq!(record["estimated"], false, "{record}");
        assert_eq!(
            record["cost_nano_usd"].as_i64(),
            Some(sonnet_cost(usage)),
            "{record} vs {usage}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_event_over_the_cap_ends_the_stream_cleanly() {
    // One `content_block_delta` of 200 KiB, past a 64 KiB cap.
    let base = hand_written_provider(|mut s, _request| async move {
        use tokio::io::AsyncWriteExt;
        let big = "x".repeat(200 * 1024);
        let events = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"content\":[],\"usage\":{{\"input_tokens\":5,\"output_tokens\":1}}}}}}\n\n\
             event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
             event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"ok \"}}}}\n\n\
             event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{big}\"}}}}\n\n"
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
            events.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(events.as_bytes()).await;
    })
    .await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("claude", base, &[CLAUDE]).of_kind("anthropic")],
        "limits:\n  stream_event_max_bytes: 65536\n",
    );
    let raw = post_chat(&gw, CLIENT_KEY, chat_body(CLAUDE, "hello", true).to_string())
        .await
        .text()
        .await
        .unwrap();
    let events = sse_data(&raw);
    assert!(
        raw.contains("\"content\":\"ok \""),
        "what came before is delivered: {raw}"
    );
    assert!(events.iter().any(|e| e.contains("bad_upstream_response")), "{raw}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(raw.len() < 64 * 1024, "the oversized event is not relayed");
}

/// A Messages request (Anthropic's API) with `extra` fields.
fn messages_body(model: &str, stream: bool, extra: Value) -> Value {
    let mut body = json!({"model": model, "max_tokens": 300, "stream": stream,
                          "messages": [{"role": "user", "content": "hello"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn post_messages(gw: &GatewayProcess, key: &str, body: &Value) -> reqwest::Response {
    http()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data` of each event of a Messages stream, by event name.
fn named_events(raw: &str) -> Vec<(String, Value)> {
    raw.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_owned();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
            (name, serde_json::from_str(data).unwrap_or(Value::Null))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_surface_is_metered_and_billed_like_chat_from_either_format() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[
            anthropic("claude", &mock),
            ProviderSpec::new("compatible", mock.base_url(), &["gpt-4o-mini"]),
        ],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "m"}), Some("5")).await;
    let mut seen = Vec::new();
    for model in [CLAUDE, "gpt-4o-mini"] {
        let resp = post_messages(&gw, &secret, &messages_body(model, false, json!({}))).await;
        assert_eq!(resp.status(), 200);
        let message: Value = resp.json().await.unwrap();
        assert_eq!(
            (message["type"].as_str(), message["role"].as_str()),
            (Some("message"), Some("assistant"))
        );
        assert!(
            message["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("Echo: hello"),
            "{message}"
        );
        assert_eq!(message["stop_reason"], "end_turn");
        seen.push(message["usage"].clone());

        let raw = post_messages(&gw, &secret, &messages_body(model, true, json!({})))
            .await
            .text()
            .await
            .unwrap();
        let events = named_events(&raw);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"), "{raw}");
        assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"], "{raw}");
        let text: String = events.iter().filter_map(|(_, d)| d["delta"]["text"].as_str()).collect();
        assert_eq!(text, message["content"][0]["text"].as_str().unwrap());
        seen.push(events[events.len() - 2].1["usage"].clone());
    }
    // Every answer is one record, billed at the model's price from the usage the client saw.
    let records = admin.usage_until(&account, |r| r.len() == 4).await;
    let mut records = records;
    records.sort_by(|a, b| a["request_id"].as_str().cmp(&b["request_id"].as_str()));
    for ((record, usage), (input_price, output_price)) in records.iter().zip(&seen).zip([
        (3_000_000_000, 15_000_000_000),
        (3_000_000_000, 15_000_000_000),
        (150_000_000, 600_000_000),
        (150_000_000, 600_000_000),
    ]) {
        let (input, output) = (
            usage["input_tokens"].as_u64().unwrap(),
            usage["output_tokens"].as_u64().unwrap(),
        );
        assert!(input > 0 && output > 0, "{usage}");
        assert_eq!(record["route"], "messages", "{record}");
        assert_eq!(
            (record["input_tokens"].as_u64(), record["output_tokens"].as_u64()),
            (Some(input), Some(output)),
            "{record} vs {usage}"
        );
        assert_eq!(
            record["cost_nano_usd"].as_i64(),
            Some(komilion::money::token_cost(input, input_price) + komilion::money::token_cost(output, output_price)),
            "{record}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_surface_answers_errors_in_anthropic_shape() {
    let mock = mock_provider(Behavior::default()).await;
    let reset = mock_provider(Behavior {
        reset_after: Some(2),
        ..Behavior::default()
    })
    .await;
    let gw = GatewayProcess::start(
        &[
            anthropic("claude", &mock),
            ProviderSpec::new("cut", reset.base_url(), &["gpt-4o-mini"]),
        ],
        "limits:\n  max_body_bytes: 4096\n",
    );
    let anthropic_error = |v: &Value, kind: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    };
    let cases = [
        (
            json!({"model": CLAUDE, "messages": [{"role": "user", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (messages_body("no-such-model", false, json!({})), 404, "not_found_error"),
        (
            messages_body(CLAUDE, false, json!({"padding": "x".repeat(8000)})),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, kind) in cases {
        let resp = post_messages(&gw, CLIENT_KEY, &body).await;
        let (got, v) = status_and_json(resp).await;
        assert_eq!(got, status, "{v}");
        anthropic_error(&v, kind);
    }
    let (status, v) =
        status_and_json(post_messages(&gw, "sk-wrong-000000000000", &messages_body(CLAUDE, false, json!({}))).await)
            .await;
    assert_eq!(status, 401);
    anthropic_error(&v, "authentication_error");
    let resp = http()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, v) = status_and_json(resp).await;
    assert_eq!(status, 400);
    anthropic_error(&v, "invalid_request_error");

    // An OpenAI upstream that dies mid-stream: the Messages stream ends with its error event.
    let raw = post_messages(&gw, CLIENT_KEY, &messages_body("gpt-4o-mini", true, json!({})))
        .await
        .text()
        .await
        .unwrap();
    let events = named_events(&raw);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error", "{raw}");
    anthropic_error(data, "api_error");
    assert!(events.iter().any(|(n, _)| n == "content_block_delta"), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_account_s_own_provider_key_reaches_the_provider_and_no_other() {
    let (_dir, url) = sqlite_url();
    // A provider that takes any key, so the test sees which one each request carried.
    let open = MockProvider::start(MockConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let (gw, admin) = GatewayProcess::with_store(
        &[
            ProviderSpec::new("compatible", open.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("claude", open.base_url(), &[CLAUDE]).of_kind("anthropic"),
        ],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (alice, _, alice_secret) = admin.account_with_key(json!({"name": "a"}), Some("5")).await;
    let (_bob, _, bob_secret) = admin.account_with_key(json!({"name": "b"}), Some("5")).await;
    let alice_openai = "sk-alice-own-openai-key-0123456789";
    let alice_claude = "sk-ant-alice-own-key-0123456789";
    for (provider, key) in [("compatible", alice_openai), ("claude", alice_claude)] {
        let (status, body) = admin
            .call(
                reqwest::Method::PUT,
                &format!("/accounts/{alice}/provider-keys/{provider}"),
                Some(json!({"api_key": key})),
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }

    let credential = |r: &komilion::mock_provider::RecordedRequest| {
        r.header("authorization")
            .map(|v| v.trim_start_matches("Bearer ").to_owned())
            .or_else(|| r.header("x-api-key").map(str::to_owned))
            .unwrap()
    };
    let mut seen = Vec::new();
    for (secret, model) in [
        (&alice_secret, "gpt-4o-mini"),
        (&alice_secret, CLAUDE),
        (&bob_secret, "gpt-4o-mini"),
        (&bob_secret, CLAUDE),
    ] {
        for stream in [false, true] {
            let resp = post_chat(&gw, secret, chat_body(model, "hello", stream).to_string()).await;
            assert_eq!(resp.status(), 200);
            let text = resp.text().await.unwrap();
            assert!(!text.contains("alice-own"), "{text}");
            seen.push(credential(&open.recorded().pop().unwrap()));
        }
    }
    assert_eq!(
        seen,
        [
            alice_openai,
            alice_openai,
            alice_claude,
            alice_claude,
            PROVIDER_KEY,
            PROVIDER_KEY,
            PROVIDER_KEY,
            PROVIDER_KEY
        ]
    );

    // Alice's own keys are billed by her providers: her wallet pays nothing for the tokens.
    let records = admin.usage_until(&alice, |r| r.len() == 4).await;
    assert!(
        records
            .iter()
            .all(|r| r["cost_nano_usd"] == 0 && r["input_tokens"].as_u64() > Some(0)),
        "{records:?}"
    );
}

const GEMINI: &str = "gemini-2.5-flash";

fn gemini(name: &str, mock: &MockProvider) -> ProviderSpec {
    ProviderSpec::new(name, format!("http://{}/v1beta", mock.addr()), &[GEMINI]).of_kind("gemini")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_model_serves_both_surfaces_with_tools_and_usage() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(&[gemini("google", &mock)], &url, STORE_PLUGINS, "");
    let (account, _, secret) = admin.account_with_key(json!({"name": "m"}), Some("5")).await;

    let (status, whole) = post_json(&gw, &secret, &chat_body(GEMINI, "hello", false)).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(text.starts_with("Echo: hello"), "{whole}");
    let seen = mock.recorded().pop().unwrap();
    assert_eq!(seen.path, format!("/v1beta/models/{GEMINI}:generateContent"));
    assert_eq!(seen.header("x-goog-api-key"), Some(PROVIDER_KEY));
    assert_eq!(seen.header("authorization"), None);

    let mut body = chat_body(GEMINI, "hello", true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks_with(&gw, &secret, body).await;
    assert_eq!(
        mock.recorded().pop().unwrap().path,
        format!("/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse")
    );
    let streamed: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    assert_eq!(streamed, text);
    let usage = chunks.last().unwrap().usage.as_ref().expect("usage comes last");
    assert_eq!(
        usage.completion_tokens as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // A function call, whole and streamed.
    let ask = json!({"model": GEMINI, "messages": [{"role": "user", "content": "weather?"}], "tools": weather_tool()});
    let (status, called) = post_json(&gw, &secret, &ask).await;
    assert_eq!(status, 200, "{called}");
    assert_eq!(called["choices"][0]["finish_reason"], "tool_calls", "{called}");
    let call = &called["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let follow_up = json!({"model": GEMINI, "tools": weather_tool(), "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C"}
    ]});
    let (status, answer) = post_json(&gw, &secret, &follow_up).await;
    assert_eq!(status, 200, "{answer}");

    // Anthropic's SDK shape, streamed from Gemini.
    let raw = post_messages(&gw, &secret, &messages_body(GEMINI, true, json!({})))
        .await
        .text()
        .await
        .unwrap();
    let names: Vec<String> = named_events(&raw).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"), "{raw}");
    assert_eq!(names.last().map(String::as_str), Some("message_stop"), "{raw}");

    // Billed from Gemini's usageMetadata at gemini-2.5-flash's prices ($0.30 in, $2.50 out).
    let records = admin.usage_until(&account, |r| r.len() == 5).await;
    for r in &records {
        let (input, output) = (
            r["input_tokens"].as_u64().unwrap(),
            r["output_tokens"].as_u64().unwrap(),
        );
        assert!(input > 0 && output > 0 && r["estimated"] == false, "{r}");
        let price = komilion::catalog::Catalog::embedded().get(GEMINI).unwrap().price;
        assert_eq!(
            r["cost_nano_usd"].as_i64(),
            Some(komilion::money::token_cost(input, price.input) + komilion::money::token_cost(output, price.output)),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_deployment_is_spliced_like_openai_on_its_own_url() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[
            ProviderSpec::new("azure", format!("http://{}", mock.addr()), &["gpt-4o-mini"])
                .of_kind("azure")
                .with("    api_version: \"2024-10-21\"\n    deployments: {gpt-4o-mini: prod-mini}\n"),
        ],
        "",
    );
    for stream in [false, true] {
        let resp = post_chat(&gw, CLIENT_KEY, chat_body("gpt-4o-mini", "hello", stream).to_string()).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("Echo: hello"));
        let seen = mock.recorded().pop().unwrap();
        assert_eq!(
            seen.path,
            "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(seen.header("api-key"), Some(PROVIDER_KEY));
        assert_eq!(seen.header("authorization"), None);
    }
    // The Messages surface reaches it too.
    let resp = post_messages(&gw, CLIENT_KEY, &messages_body("gpt-4o-mini", false, json!({}))).await;
    let (status, message) = status_and_json(resp).await;
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["type"], "message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cohere_model_serves_both_surfaces_with_tools() {
    let mock = mock_provider(Behavior::default()).await;
    let gw = GatewayProcess::start(
        &[ProviderSpec::new("cohere", format!("http://{}/v2", mock.addr()), &["command-a-03-2025"]).of_kind("cohere")],
        "",
    );
    let model = "command-a-03-2025";
    let (status, whole) = post_json(&gw, CLIENT_KEY, &chat_body(model, "hello", false)).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(text.starts_with("Echo: hello"), "{whole}");
    assert!(whole["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{whole}");
    let seen = mock.recorded().pop().unwrap();
    assert_eq!(seen.path, "/v2/chat");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );

    let chunks = stream_chunks(&gw, chat_body(model, "hello", true)).await;
    let streamed: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    assert_eq!(streamed, text);

    let mut ask =
        json!({"model": model, "messages": [{"role": "user", "content": "weather?"}], "tools": weather_tool()});
    let (status, called) = post_json(&gw, CLIENT_KEY, &ask).await;
    assert_eq!(status, 200, "{called}");
    assert_eq!(called["choices"][0]["finish_reason"], "tool_calls", "{called}");
    ask["stream"] = json!(true);
    let chunks = stream_chunks(&gw, ask).await;
    let joined: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .flat_map(|c| c.delta.tool_calls.iter().flatten())
        .filter_map(|c| c.function.as_ref()?.arguments.clone())
        .collect();
    let args: Value = serde_json::from_str(&joined).unwrap();
    assert!(args["city"].is_string(), "{args}");

    let resp = post_messages(&gw, CLIENT_KEY, &messages_body(model, false, json!({}))).await;
    let (status, message) = status_and_json(resp).await;
    assert_eq!(status, 200, "{message}");
    assert!(message["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Echo: hello"));
}
