#![allow(clippy::unwrap_used)]
//! Metering, prepaid wallets and the usage log end to end.

mod common;

use common::*;
use komilion::metering::tokens::{count_chat_prompt, count_text};
use komilion::mock_provider::Behavior;
use komilion_sdk::ChatMessage;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const FAST_LEASES: &str = "wallets:\n  idle_return_secs: 0\n";

fn prompt_tokens(model: &str, text: &str) -> u64 {
    count_chat_prompt(
        model,
        &[ChatMessage {
            role: "user".into(),
            text: text.into(),
        }],
    )
}

/// gpt-4o-mini: $0.15 / $0.60 per 1M tokens.
fn mini_cost(input: u64, output: u64) -> i64 {
    komilion::money::token_cost(input, 150_000_000) + komilion::money::token_cost(output, 600_000_000)
}

/// The data of each event, without the fields that differ between two answers.
fn normalized_events(body: &str) -> Vec<Value> {
    sse_data(body)
        .iter()
        .map(|d| match serde_json::from_str::<Value>(d) {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.remove("id");
                    o.remove("created");
                }
                v
            }
            Err(_) => Value::String(d.clone()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_comes_from_the_provider_and_the_client_sees_exactly_the_provider_stream() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior {
        chunks: 6,
        ..Behavior::default()
    })
    .await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        FAST_LEASES,
    );
    let (account, key_id, secret) = admin.account_with_key(json!({"name": "m"}), Some("1")).await;

    // A client that did not ask for usage gets the stream the provider sends such a client.
    let body = |stream_options: Option<Value>| {
        let mut b = chat_body("gpt-4o-mini", "meter me", true);
        if let Some(o) = stream_options {
            b["stream_options"] = o;
        }
        b
    };
    let via_gateway = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&body(None))
        .send()
        .await
        .unwrap();
    let request_id = via_gateway.headers()["x-komilion-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let via_gateway = via_gateway.text().await.unwrap();
    let direct = http()
        .post(format!("{}/chat/completions", mock.base_url()))
        .bearer_auth(PROVIDER_KEY)
        .json(&body(None))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!via_gateway.contains("usage"), "{via_gateway}");
    assert_eq!(normalized_events(&via_gateway), normalized_events(&direct));
    // ...while the provider was asked for usage on the gateway's behalf.
    assert!(mock.recorded().iter().any(|r| r.body_len > 0));

    // A client that asked gets the usage chunk untouched.
    let with_usage = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&body(Some(json!({"include_usage": true}))))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(with_usage.contains("\"usage\":{\"prompt_tokens\""));

    let records = admin.usage_until(&account, |r| r.len() == 2).await;
    let record = records.iter().find(|r| r["request_id"] == request_id.as_str()).unwrap();
    let content: String = normalized_events(&direct)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    let (input, output) = (
        prompt_tokens("gpt-4o-mini", "meter me"),
        count_text("gpt-4o-mini", &content),
    );
    assert_eq!(
        (record["input_tokens"].as_u64(), record["output_tokens"].as_u64()),
        (Some(input), Some(output))
    );
    assert_eq!(record["estimated"], false);
    assert_eq!(record["cost_nano_usd"].as_i64(), Some(mini_cost(input, output)));
    assert_eq!(record["key_id"], key_id.as_str());
    assert_eq!(
        (
            record["model"].as_str(),
            record["provider"].as_str(),
            record["status"].as_u64()
        ),
        (Some("gpt-4o-mini"), Some("sim"), Some(200))
    );
    assert!(record["latency_ms"].is_u64() && record["ttfb_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_is_counted_with_the_tokenizer_and_marked_estimated() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior {
        chunks: 10,
        reset_after: Some(4),
        ..Behavior::default()
    })
    .await;
    let quiet = mock_provider(Behavior {
        omit_usage: true,
        ..Behavior::default()
    })
    .await;
    let (gw, admin) = GatewayProcess::with_store(
        &[
            ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"]),
            ProviderSpec::new("quiet", quiet.base_url(), &["gpt-4o"]),
        ],
        &url,
        STORE_PLUGINS,
        FAST_LEASES,
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "e"}), Some("1")).await;
    let body = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&chat_body("gpt-4o-mini", "cut me short", true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let delivered: String = normalized_events(&body)
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(!delivered.is_empty());
    // A JSON answer without usage is counted too.
    let (status, answer, _) = chat(&gw, &secret, "gpt-4o").await;
    assert_eq!(status, 200);
    let answer_text = answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned();

    let records = admin.usage_until(&account, |r| r.len() == 2).await;
    let streamed = records.iter().find(|r| r["model"] == "gpt-4o-mini").unwrap();
    assert_eq!(streamed["estimated"], true);
    assert_eq!(
        streamed["input_tokens"].as_u64(),
        Some(prompt_tokens("gpt-4o-mini", "cut me short"))
    );
    assert_eq!(
        streamed["output_tokens"].as_u64(),
        Some(count_text("gpt-4o-mini", &delivered))
    );
    assert_eq!(
        streamed["cost_nano_usd"].as_i64(),
        Some(mini_cost(
            prompt_tokens("gpt-4o-mini", "cut me short"),
            count_text("gpt-4o-mini", &delivered)
        ))
    );
    let quiet_record = records.iter().find(|r| r["model"] == "gpt-4o").unwrap();
    assert_eq!(quiet_record["estimated"], true);
    assert_eq!(
        quiet_record["output_tokens"].as_u64(),
        Some(count_text("gpt-4o", &answer_text))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_wallet_gets_402_and_a_top_up_takes_effect_without_a_restart() {
    let url = pg_schema_url().await;
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        FAST_LEASES,
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "broke"}), None).await;
    let (status, body, _) = chat(&gw, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(mock.request_count(), 0, "nothing was forwarded");

    admin.topup(&account, "0.50").await;
    let topped_up = Instant::now();
    loop {
        let (status, _, _) = chat(&gw, &secret, "gpt-4o-mini").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 402);
        assert!(
            topped_up.elapsed() < Duration::from_secs(30),
            "the top-up was not seen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http().get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"komilion_wallet_rejections_total{reason="insufficient"}"#),
        "{metrics}"
    );
}

/// Two instances sharing PostgreSQL, 500 concurrent requests, a wallet that affords about 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_never_goes_below_zero_and_costs_equal_debits() {
    let url = pg_schema_url().await;
    let mock = mock_provider(Behavior {
        chunks: 4,
        ..Behavior::default()
    })
    .await;
    let providers = [ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])];
    let leases = "wallets:\n  idle_return_secs: 0\n  lease_max_usd: \"0.0002\"\n";
    let (a, admin) = GatewayProcess::with_store(&providers, &url, STORE_PLUGINS, leases);
    let (b, _) = GatewayProcess::with_store(&providers, &url, STORE_PLUGINS, leases);
    let (account, _, secret) = admin.account_with_key(json!({"name": "many"}), None).await;

    // What one request costs, and what it holds (max_tokens bounds the output).
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "same"}]});
    let per_request = {
        let prompt = prompt_tokens("gpt-4o-mini", "same");
        let answer = http()
            .post(format!("{}/chat/completions", mock.base_url()))
            .bearer_auth(PROVIDER_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = answer.json().await.unwrap();
        mini_cost(prompt, v["usage"]["completion_tokens"].as_u64().unwrap())
    };
    let credit = per_request * 100;
    let credit_usd = komilion::money::Usd(credit).to_string();
    admin.topup(&account, &credit_usd).await;

    let client = http();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let url = if i % 2 == 0 {
                a.url("/v1/chat/completions")
            } else {
                b.url("/v1/chat/completions")
            };
            let (client, secret, mut body) = (client.clone(), secret.clone(), body.clone());
            body["stream"] = json!(i % 3 == 0);
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(secret)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!(ok + refused, 500, "only 200 and 402: {statuses:?}");
    assert!(
        ok > 0 && ok <= 100,
        "{ok} requests were served with money for about 100"
    );

    // Leases go back when idle and the usage reaches the store; then the books must balance.
    let records = admin.usage_until(&account, |r| r.len() == 500).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let wallet = loop {
        let w = admin.wallet(&account).await;
        if w["leased_nano_usd"] == 0 {
            break w;
        }
        assert!(Instant::now() < deadline, "leases were not returned: {w}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let balance = wallet["balance_nano_usd"].as_i64().unwrap();
    assert!(balance >= 0, "the wallet went below zero: {wallet}");
    let billed: i64 = records
        .iter()
        .map(|r| r["cost_nano_usd"].as_i64().unwrap() - r["unbilled_nano_usd"].as_i64().unwrap())
        .sum();
    let unbilled: i64 = records.iter().map(|r| r["unbilled_nano_usd"].as_i64().unwrap()).sum();
    assert_eq!(unbilled, 0, "every served request was covered by its hold");
    assert_eq!(
        credit - balance,
        billed,
        "debits equal recorded costs to the nano-dollar"
    );
    assert_eq!(records.iter().filter(|r| r["status"] == 200).count(), ok);
    assert_eq!(records.iter().filter(|r| r["status"] == 402).count(), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_right_after_the_responses_loses_no_record_and_duplicates_none() {
    let url = pg_schema_url().await;
    let mock = mock_provider(Behavior::default()).await;
    let (mut gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "killed"}), Some("1")).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let resp = http()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .json(&chat_body("gpt-4o-mini", &format!("r{i}"), i % 2 == 0))
            .send()
            .await
            .unwrap();
        ids.push(resp.headers()["x-komilion-request-id"].to_str().unwrap().to_owned());
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    gw.kill();
    gw.restart();
    let admin = Admin {
        base: admin.base.clone(),
        client: http(),
    };
    let records = admin.usage_until(&account, |r| r.len() >= 40).await;
    let mut seen: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    seen.sort();
    ids.sort();
    assert_eq!(
        seen,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "each record exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_streamed_per_account_and_per_key_and_erasure_keeps_billing() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        FAST_LEASES,
    );
    let (account, key_a, secret_a) = admin.account_with_key(json!({"name": "a"}), Some("1")).await;
    let (status, key_b) = admin
        .call(
            Method::POST,
            &format!("/accounts/{account}/keys"),
            Some(json!({"name": "b"})),
        )
        .await;
    assert_eq!(status, 201);
    let secret_b = key_b["key"].as_str().unwrap().to_owned();
    for secret in [&secret_a, &secret_a, &secret_b] {
        assert_eq!(chat(&gw, secret, "gpt-4o-mini").await.0, 200);
    }
    admin.usage_until(&account, |r| r.len() == 3).await;

    let csv = admin
        .client
        .get(format!(
            "{}/accounts/{account}/usage?format=csv&from=2020-01-01",
            admin.base
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with(
        "request_id,created_at,key_id,route,requested_model,model,provider,task,status,input_tokens,output_tokens"
    ));
    assert_eq!(lines.count(), 3);
    let (status, _) = admin
        .call(Method::GET, &format!("/accounts/{account}/usage?format=xml"), None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = admin.call(Method::GET, "/accounts/acct_nope/usage", None).await;
    assert_eq!(status, 404);

    // A key holder exports its own key's usage on the main listener.
    let own = http()
        .get(gw.url("/v1/usage?format=jsonl"))
        .bearer_auth(&secret_b)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let own: Vec<Value> = own
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0]["key_id"], key_b["id"]);
    assert_eq!(http().get(gw.url("/v1/usage")).send().await.unwrap().status(), 401);

    // Erasure.
    let (status, _) = admin.call(Method::DELETE, &format!("/accounts/{account}"), None).await;
    assert_eq!(status, 204);
    let (_, erased) = admin.call(Method::GET, &format!("/accounts/{account}"), None).await;
    assert_eq!(
        (erased["status"].as_str(), erased["email"].is_null()),
        (Some("erased"), true)
    );
    assert_eq!(chat(&gw, &secret_a, "gpt-4o-mini").await.0, 401, "its keys are gone");
    let kept = admin.usage(&account).await;
    assert_eq!(kept.len(), 3, "billing rows are kept");
    assert!(kept.iter().all(|r| r["key_id"].is_null()), "and no longer name a key");
    assert!(!kept.iter().any(|r| r.to_string().contains(&key_a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_balance_sends_one_webhook_retried_until_delivered() {
    // A webhook receiver that fails the first delivery.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = Vec::new();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= head_end + 4 + len {
                        let status = if first { "500 Internal Server Error" } else { "200 OK" };
                        let _ = s
                            .write_all(
                                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                    .as_bytes(),
                            )
                            .await;
                        if !first {
                            let _ = tx.send(text[head_end + 4..].to_owned());
                        }
                        first = false;
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
        }
    });
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let alerts = format!(
        "{FAST_LEASES}alerts:\n  webhook_url: \"http://127.0.0.1:{hook_port}/hook\"\n  wallet_below_usd: \"0.00999\"\n"
    );
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        &alerts,
    );
    // $0.01; each request costs about $0.0000075, so the balance crosses $0.00999 on the second.
    let (account, _, secret) = admin.account_with_key(json!({"name": "alerted"}), Some("0.01")).await;
    for _ in 0..3 {
        assert_eq!(chat(&gw, &secret, "gpt-4o-mini").await.0, 200);
    }
    let payload = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the alert arrives")
        .unwrap();
    let v: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["account_id"].as_str()),
        (Some("wallet.balance_low"), Some(account.as_str()))
    );
    // More spending below the threshold is no new crossing.
    assert_eq!(chat(&gw, &secret, "gpt-4o-mini").await.0, 200);
    admin.usage_until(&account, |r| r.len() == 4).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.is_err(),
        "one alert per crossing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_store_outage_under_load_loses_nothing() {
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = pg_schema_url()
        .await
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "outage"}), Some("1")).await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "during"}]});
    let url = gw.url("/v1/chat/completions");
    let send = move |body: Value| {
        let (url, secret) = (url.clone(), secret.clone());
        async move {
            let resp = http().post(url).bearer_auth(secret).json(&body).send().await.unwrap();
            let id = resp.headers()["x-komilion-request-id"].to_str().unwrap().to_owned();
            (resp.status().as_u16(), id)
        }
    };
    let (status, first) = send(body.clone()).await;
    assert_eq!(status, 200, "warm: key cached, wallet leased");

    relay.cut();
    let cut_at = Instant::now();
    let mut ids = vec![first];
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let send = send.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while cut_at.elapsed() < Duration::from_secs(30) {
                    let (status, id) = send(body.clone()).await;
                    assert_eq!(
                        status, 200,
                        "served from the cache and the local lease during the outage"
                    );
                    ids.push(id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ids
            })
        })
        .collect();
    let mut depth_seen = 0.0;
    while cut_at.elapsed() < Duration::from_secs(29) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let metrics = http().get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
        if let Some(v) = metrics
            .lines()
            .find_map(|l| l.strip_prefix("komilion_usage_spool_depth_bytes "))
        {
            depth_seen = f64::max(depth_seen, v.parse().unwrap_or(0.0));
        }
    }
    for w in workers {
        ids.extend(w.await.unwrap());
    }
    assert!(depth_seen > 0.0, "the backlog showed in the spool depth metric");
    relay.restore();

    let records = admin.usage_until(&account, |r| r.len() >= ids.len()).await;
    let mut seen: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    seen.sort();
    ids.sort();
    assert_eq!(
        seen,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "every record, once"
    );
    assert!(ids.len() > 100, "under load: {} requests", ids.len());
}

/// A chat body with a client-set output cap.
fn capped_body(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})
}

/// One request the wallet cannot cover is refused alone: the next affordable request, on this
/// instance or another, is served at once (not after the leases went idle).
async fn no_false_402(store_url: &str, instances: usize) {
    let mock = mock_provider(Behavior::default()).await;
    let providers = [ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])];
    let mut gateways = Vec::new();
    for _ in 0..instances {
        gateways.push(GatewayProcess::with_store(&providers, store_url, STORE_PLUGINS, ""));
    }
    let admin = gateways[0].1.clone();
    let (_, _, secret) = admin.account_with_key(json!({"name": "f"}), Some("1")).await;
    // 2,000,000 output tokens of gpt-4o-mini cost $1.20.
    let big = capped_body("gpt-4o-mini", 2_000_000);
    let small = capped_body("gpt-4o-mini", 16);
    for round in 0..3 {
        for (i, (gw, _)) in gateways.iter().enumerate() {
            let (status, body) = post_json(gw, &secret, &big).await;
            assert_eq!(status, 402, "round {round}, instance {i}: {body}");
            for (j, (other, _)) in gateways.iter().enumerate() {
                let (status, body) = post_json(other, &secret, &small).await;
                assert_eq!(status, 200, "round {round}: after a 402 on {i}, instance {j}: {body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hold_does_not_refuse_the_next_request_on_sqlite() {
    let (_db, url) = sqlite_url();
    no_false_402(&url, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hold_does_not_refuse_the_next_request_across_two_instances_on_postgres() {
    let url = pg_schema_url().await;
    no_false_402(&url, 2).await;
}

/// A model without a price is never served at $0 by accident: refused to wallet-billed keys
/// unless the provider prices it or opts into `unpriced: free`; `komilion check` warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_price_is_refused_unless_the_provider_opts_in() {
    let (_db, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let providers = [
        ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini", "house-model"]),
        ProviderSpec::new("free", mock.base_url(), &["house-free"]).with("    unpriced: free\n"),
        ProviderSpec::new("priced", mock.base_url(), &["house-priced"])
            .with("    prices:\n      house-priced: {input_per_mtok: \"1.5\", output_per_mtok: \"2\"}\n"),
        // Lists no models: passes `open/<anything>` through.
        ProviderSpec::new("open", mock.base_url(), &[]),
    ];
    let (gw, admin) = GatewayProcess::with_store(&providers, &url, STORE_PLUGINS, "");
    let (account, _, secret) = admin.account_with_key(json!({"name": "u"}), Some("1")).await;

    for model in ["house-model", "open/anything-else"] {
        let (status, body) = post_json(&gw, &secret, &chat_body(model, "hi", false)).await;
        assert_eq!(status, 400, "{model}: {body}");
        assert_eq!(body["error"]["code"], "model_not_priced", "{body}");
        assert_eq!(body["error"]["param"], "model", "{body}");
    }
    assert_eq!(mock.request_count(), 0, "nothing unpriced was forwarded");
    for model in ["gpt-4o-mini", "house-free", "house-priced"] {
        let (status, body) = post_json(&gw, &secret, &chat_body(model, "hi", false)).await;
        assert_eq!(status, 200, "{model}: {body}");
    }
    let records = admin
        .usage_until(&account, |r| r.iter().filter(|x| x["status"] == 200).count() == 3)
        .await;
    let cost = |model: &str| {
        let r = records.iter().find(|r| r["model"] == model).unwrap();
        let expected = komilion::money::token_cost(r["input_tokens"].as_u64().unwrap(), 1_500_000_000)
            + komilion::money::token_cost(r["output_tokens"].as_u64().unwrap(), 2_000_000_000);
        (r["cost_nano_usd"].as_i64().unwrap(), expected)
    };
    let (charged, expected) = cost("house-priced");
    assert!(charged > 0);
    assert_eq!(charged, expected, "the provider's own price");
    assert_eq!(cost("house-free").0, 0, "opted in to $0");

    let check = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&gw.config_path)
        .env("TEST_PROVIDER_KEY", PROVIDER_KEY)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(warnings[0].contains("house-model"), "{out}");
    assert!(warnings[1].contains("`open` passes any model through"), "{out}");
}

/// The hold covers what the provider will honour: the larger of the two output caps, and a
/// body whose keys repeat (read one way by us, another by the provider) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_uses_the_larger_output_cap_and_repeated_keys_are_refused() {
    let (_db, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (_, _, secret) = admin.account_with_key(json!({"name": "d"}), Some("1")).await;
    let raw = |body: &'static str| {
        let (gw, secret) = (&gw, &secret);
        async move { status_and_json(post_chat(gw, secret, body).await).await }
    };
    let (status, body) = raw(
        r#"{"model":"gpt-4o-mini","max_tokens":1,"max_tokens":2000000,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "duplicate_key", "{body}");
    // 2,000,000 output tokens cost $1.20: more than the wallet, whichever field says it.
    let (status, body) = raw(
        r#"{"model":"gpt-4o-mini","max_tokens":16,"max_completion_tokens":2000000,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, 402, "{body}");
    // Each of `n` answers may use the whole cap: 2 × 1,000,000 tokens, $1.20.
    let (status, body) =
        raw(r#"{"model":"gpt-4o-mini","n":2,"max_tokens":1000000,"messages":[{"role":"user","content":"hi"}]}"#).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(mock.request_count(), 0);
}
