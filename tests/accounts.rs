#![allow(clippy::unwrap_used)]
//! Accounts, keys, wallets and the admin API end to end, on SQLite and on PostgreSQL.

mod common;

use common::*;
use komilion::mock_provider::Behavior;
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

async fn admin_api_contract(store_url: &str) {
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini", "gpt-4o"])],
        store_url,
        STORE_PLUGINS,
        "",
    );

    // Accounts.
    let email = format!("{}@example.com", komilion::store::new_id("ada"));
    let (status, account) = admin
        .call(Method::POST, "/accounts", Some(json!({"name": "Ada", "email": email})))
        .await;
    assert_eq!(status, 201, "{account}");
    let id = account["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (account["name"].as_str(), account["status"].as_str()),
        (Some("Ada"), Some("active"))
    );
    assert!(account["created_at"].is_string());
    assert_eq!(
        admin.call(Method::GET, &format!("/accounts/{id}"), None).await,
        (200, account.clone())
    );
    let (status, list) = admin.call(Method::GET, "/accounts", None).await;
    assert_eq!(status, 200);
    assert!(list["data"].as_array().unwrap().iter().any(|a| a["id"] == id.as_str()));
    let (status, dup) = admin
        .call(
            Method::POST,
            "/accounts",
            Some(json!({"name": "Ada", "email": email.to_uppercase()})),
        )
        .await;
    assert_eq!(status, 409, "{dup}");
    assert!(dup["error"]["message"].is_string());

    // Keys: shown once, stored as a digest, usable at once.
    let (status, key) = admin
        .call(
            Method::POST,
            &format!("/accounts/{id}/keys"),
            Some(json!({"name": "ci", "allowed_models": ["gpt-4o-mini"]})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-kml-") && secret.len() >= 39);
    let key_id = key["id"].as_str().unwrap().to_owned();
    let (status, keys) = admin.call(Method::GET, &format!("/accounts/{id}/keys"), None).await;
    assert_eq!(status, 200);
    assert_eq!(keys["data"][0]["id"], key_id.as_str());
    assert!(!keys.to_string().contains(&secret[10..]), "the secret is never listed");

    // Prepaid: the account needs money before it can call.
    admin.topup(&id, "1").await;
    let (status, _, headers) = chat(&gw, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-komilion-provider"], "sim");
    let (status, body, _) = chat(&gw, &secret, "gpt-4o").await;
    assert_eq!(status, 404, "the key's allowed models narrow what it may use: {body}");

    // Anthropic-style header works too.
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", &secret)
        .json(&chat_body("gpt-4o-mini", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Wallets (of an account that makes no calls, so balances are exact).
    let (wid, _, _) = admin.account_with_key(json!({"name": "w"}), None).await;
    let (status, wallet) = admin.call(Method::GET, &format!("/accounts/{wid}/wallet"), None).await;
    assert_eq!((status, wallet["balance_usd"].as_str()), (200, Some("0")));
    let topup = |amount: &str| json!({"amount_usd": amount});
    let wallet = admin.topup(&wid, "12.50").await;
    assert_eq!(wallet["balance_usd"].as_str(), Some("12.5"), "{wallet}");
    assert_eq!(wallet["balance_nano_usd"], 12_500_000_000i64);
    let (status, _) = admin
        .call(
            Method::POST,
            &format!("/accounts/{wid}/wallet/topup"),
            Some(json!({"amount_usd": 12.5})),
        )
        .await;
    assert_eq!(status, 400, "a float amount is refused");
    let (status, _) = admin
        .call(
            Method::POST,
            &format!("/accounts/{wid}/wallet/topup"),
            Some(topup("-1")),
        )
        .await;
    assert_eq!(status, 400);
    // An idempotency key makes a retried top-up a no-op.
    for _ in 0..2 {
        let resp = admin
            .client
            .post(format!("{}/accounts/{wid}/wallet/topup", admin.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("idempotency-key", "retry-me")
            .json(&topup("1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (_, wallet) = admin.call(Method::GET, &format!("/accounts/{wid}/wallet"), None).await;
    assert_eq!(wallet["balance_usd"], "13.5");

    // Revocation takes effect on the next request.
    let (status, _) = admin.call(Method::DELETE, &format!("/keys/{key_id}"), None).await;
    assert_eq!(status, 204);
    let (status, body, _) = chat(&gw, &secret, "gpt-4o-mini").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{body}"
    );

    // Errors.
    let (status, body) = admin.call(Method::GET, "/accounts/acct_nope", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = admin.call(Method::DELETE, "/keys/key_nope", None).await;
    assert_eq!(status, 404);
    let (status, _) = admin
        .call(Method::POST, "/accounts/acct_nope/keys", Some(json!({"name": "x"})))
        .await;
    assert_eq!(status, 404);
    let resp = admin
        .client
        .post(format!("{}/accounts", admin.base))
        .bearer_auth(ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.json::<serde_json::Value>().await.unwrap()["error"]["message"].is_string());
    let (status, _) = admin
        .call(
            Method::POST,
            "/accounts",
            Some(json!({"name": "x", "email": "x@example.com", "extra": 1})),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused");
    let resp = admin
        .client
        .get(format!("{}/accounts", admin.base))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = admin
        .client
        .get(format!("{}/accounts", admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "invalid_admin_token"
    );

    // Disabled accounts are refused with 403.
    let (account2, _, secret2) = admin.account_with_key(json!({"name": "k2"}), Some("1")).await;
    assert_eq!(chat(&gw, &secret2, "gpt-4o-mini").await.0, 200);
    let (status, _) = admin
        .call(
            Method::PATCH,
            &format!("/accounts/{account2}"),
            Some(json!({"status": "disabled"})),
        )
        .await;
    assert_eq!(status, 200);
    // The change reaches the key cache through the store's change notices (on this instance
    // too, a moment after the admin call returns): wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = chat(&gw, &secret2, "gpt-4o-mini").await;
        if status != 200 {
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (403, Some("account_disabled")),
                "{body}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the account was never disabled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_on_sqlite() {
    let (_dir, url) = sqlite_url();
    admin_api_contract(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_on_postgres() {
    admin_api_contract(&pg_schema_url().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_instance_within_a_second() {
    let url = pg_schema_url().await;
    let mock = mock_provider(Behavior::default()).await;
    let providers = [ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])];
    let (a, admin) = GatewayProcess::with_store(&providers, &url, STORE_PLUGINS, "");
    let (b, _) = GatewayProcess::with_store(&providers, &url, STORE_PLUGINS, "");
    let (_, key_id, secret) = admin.account_with_key(json!({"name": "shared"}), Some("1")).await;
    // Warm both caches.
    assert_eq!(chat(&a, &secret, "gpt-4o-mini").await.0, 200);
    assert_eq!(chat(&b, &secret, "gpt-4o-mini").await.0, 200);

    let (status, _) = admin.call(Method::DELETE, &format!("/keys/{key_id}"), None).await;
    assert_eq!(status, 204);
    let revoked_at = Instant::now();
    // Instance B never saw the admin call: it hears of it through PostgreSQL.
    loop {
        let (status, _, _) = chat(&b, &secret, "gpt-4o-mini").await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(30),
            "instance B still accepts the key after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (_, _, secret) = admin
        .account_with_key(json!({"name": "slow", "rpm_limit": 2}), Some("1"))
        .await;
    assert_eq!(chat(&gw, &secret, "gpt-4o-mini").await.0, 200);
    assert_eq!(chat(&gw, &secret, "gpt-4o-mini").await.0, 200);
    let (status, body, headers) = chat(&gw, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    // As OpenAI sends them: the wait to the millisecond, and the limit's state.
    let retry_ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(
        retry_ms <= retry * 1000 && retry_ms > (retry - 1) * 1000,
        "{retry_ms} vs {retry}"
    );
    assert_eq!(headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert!(headers.contains_key("x-ratelimit-reset-requests"));

    let (_, _, tight) = admin
        .account_with_key(json!({"name": "few tokens", "tpm_limit": 50}), Some("1"))
        .await;
    let big = "word ".repeat(100);
    let resp = http()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&tight)
        .json(&chat_body("gpt-4o-mini", &big, false))
        .send()
        .await
        .unwrap();
    // It could never fit: a 400 that says so, not a 429 the SDK would retry for minutes.
    assert_eq!(resp.status(), 400, "a prompt over the whole TPM limit is refused");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "tokens_exceed_limit", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_keys_are_sealed_and_never_returned() {
    let (dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (_gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (id, _, _) = admin.account_with_key(json!({"name": "byok"}), None).await;
    let byok = "sk-their-own-openai-key-ABCDEF123456";
    let (status, _) = admin
        .call(
            Method::PUT,
            &format!("/accounts/{id}/provider-keys/openai"),
            Some(json!({"api_key": byok})),
        )
        .await;
    assert_eq!(status, 204);
    let (status, list) = admin
        .call(Method::GET, &format!("/accounts/{id}/provider-keys"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["provider"], "openai");
    assert_eq!(list["data"][0]["key_version"], "v1");
    assert!(!list.to_string().contains("ABCDEF123456"));
    let db = std::fs::read(dir.path().join("komilion.db")).unwrap();
    let wal = std::fs::read(dir.path().join("komilion.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(12).any(|w| w == b"ABCDEF123456"),
            "the key is not stored in clear"
        );
    }
    let (status, _) = admin
        .call(Method::DELETE, &format!("/accounts/{id}/provider-keys/openai"), None)
        .await;
    assert_eq!(status, 204);
}
