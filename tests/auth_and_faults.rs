#![allow(clippy::unwrap_used)]
//! JWT auth, Stripe top-ups, the admin CLI, and a store that is unreachable or goes down.

mod common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use komilion::mock_provider::Behavior;
use reqwest::Method;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const JWT_SECRET: &str = "a-test-jwt-secret-of-at-least-32-bytes";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn jwt(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_api_keys_side_by_side() {
    let (_dir, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let plugins = format!(
        "plugins:\n  - name: request_id\n  - name: jwt_auth\n    settings: {{hs256_secret: \"{JWT_SECRET}\", issuer: \"https://idp.test\", audience: komilion, models_claim: models, fallthrough: true}}\n  - name: key_auth\n"
    );
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini", "gpt-4o"])],
        &url,
        &plugins,
        "",
    );
    let (account, _, secret) = admin.account_with_key(json!({"name": "k"}), Some("1")).await;
    let good = json!({"sub": account, "iss": "https://idp.test", "aud": "komilion", "exp": now() + 300, "models": ["gpt-4o-mini"]});

    assert_eq!(chat(&gw, &jwt(good.clone()), "gpt-4o-mini").await.0, 200);
    assert_eq!(
        chat(&gw, &jwt(good.clone()), "gpt-4o").await.0,
        404,
        "the models claim narrows access"
    );
    assert_eq!(
        chat(&gw, &secret, "gpt-4o").await.0,
        200,
        "API keys still work next to JWTs"
    );

    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    let (status, body, _) = chat(&gw, &jwt(expired), "gpt-4o-mini").await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
    assert!(!body.to_string().contains(JWT_SECRET));

    let mut stranger = good.clone();
    stranger["sub"] = json!("acct_nobody");
    let (status, body, _) = chat(&gw, &jwt(stranger), "gpt-4o-mini").await;
    assert_eq!(status, 401, "{body}");

    let mut wrong_aud = good;
    wrong_aud["aud"] = json!("elsewhere");
    assert_eq!(chat(&gw, &jwt(wrong_aud), "gpt-4o-mini").await.0, 401);
    assert_eq!(
        chat(&gw, "not-a-credential", "gpt-4o-mini").await.0,
        401,
        "no plugin lets an unknown credential through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_checkouts_credit_the_wallet_exactly_once() {
    let url = pg_schema_url().await;
    let mock = mock_provider(Behavior::default()).await;
    let secret = "whsec_test_0123456789";
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        &format!("stripe:\n  webhook_secret: \"{secret}\"\n"),
    );
    let (account, _, _) = admin.account_with_key(json!({"name": "payer"}), None).await;
    let event = json!({
        "id": "evt_1PXYZ", "object": "event", "type": "checkout.session.completed",
        "data": {"object": {"object": "checkout.session", "amount_total": 1250, "currency": "usd",
                            "payment_status": "paid", "metadata": {"account_id": account}}}
    });
    let payload = serde_json::to_vec(&event).unwrap();
    let deliver = |signature: String, body: Vec<u8>| {
        let url = gw.url("/webhooks/stripe");
        async move {
            http()
                .post(url)
                .header("stripe-signature", signature)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let signed = komilion::billing::stripe::sign(&payload, secret, now());
    assert_eq!(deliver(signed.clone(), payload.clone()).await, 200);
    assert_eq!(
        deliver(signed, payload.clone()).await,
        200,
        "Stripe's retry is acknowledged"
    );
    let (_, wallet) = admin
        .call(Method::GET, &format!("/accounts/{account}/wallet"), None)
        .await;
    assert_eq!(wallet["balance_usd"], "12.5", "credited once: {wallet}");

    assert_eq!(
        deliver(
            komilion::billing::stripe::sign(&payload, "whsec_wrong", now()),
            payload.clone()
        )
        .await,
        400
    );
    assert_eq!(
        deliver(
            komilion::billing::stripe::sign(&payload, secret, now() - 3600),
            payload.clone()
        )
        .await,
        400
    );
    assert_eq!(deliver("t=1,v1=zz".into(), payload.clone()).await, 400);
    let mut tampered = event.clone();
    tampered["data"]["object"]["amount_total"] = json!(999_999);
    let signed = komilion::billing::stripe::sign(&payload, secret, now());
    assert_eq!(deliver(signed, serde_json::to_vec(&tampered).unwrap()).await, 400);
    let (_, wallet) = admin
        .call(Method::GET, &format!("/accounts/{account}/wallet"), None)
        .await;
    assert_eq!(wallet["balance_usd"], "12.5");
}

/// Money received for nobody is kept, not dropped; only an explicit "paid" credits; a delayed
/// payment credits when it succeeds, once per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_payments_are_never_dropped_nor_credited_twice() {
    let (_db, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let secret = "whsec_test_0123456789";
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        &format!("stripe:\n  webhook_secret: \"{secret}\"\n"),
    );
    let (account, _, _) = admin.account_with_key(json!({"name": "payer"}), None).await;
    let deliver = |id: &str, kind: &str, session: Value| {
        let payload = serde_json::to_vec(&json!({
            "id": id, "object": "event", "type": kind, "data": {"object": session}
        }))
        .unwrap();
        let signature = komilion::billing::stripe::sign(&payload, secret, now());
        let url = gw.url("/webhooks/stripe");
        async move {
            let resp = http()
                .post(url)
                .header("stripe-signature", signature)
                .body(payload)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    let session = |id: &str, account: &str, status: Option<&str>| {
        let mut s = json!({"id": id, "object": "checkout.session", "amount_total": 500, "currency": "usd",
                           "metadata": {"account_id": account}});
        if let Some(status) = status {
            s["payment_status"] = json!(status);
        }
        s
    };
    let balance = || async { admin.wallet(&account).await["balance_usd"].clone() };

    // No payment_status: not paid.
    deliver("evt_a", "checkout.session.completed", session("cs_a", &account, None)).await;
    // A delayed method: unpaid at completion, paid later; credited once, at the later event.
    deliver(
        "evt_b1",
        "checkout.session.completed",
        session("cs_b", &account, Some("unpaid")),
    )
    .await;
    assert_eq!(balance().await, "0");
    deliver(
        "evt_b2",
        "checkout.session.async_payment_succeeded",
        session("cs_b", &account, Some("paid")),
    )
    .await;
    assert_eq!(balance().await, "5");
    deliver(
        "evt_b2",
        "checkout.session.async_payment_succeeded",
        session("cs_b", &account, Some("paid")),
    )
    .await;
    assert_eq!(balance().await, "5", "a retried delivery credits nothing");

    // Paid for an account that does not exist (or none named): kept for an operator.
    deliver(
        "evt_c",
        "checkout.session.completed",
        session("cs_c", "acct_gone", Some("paid")),
    )
    .await;
    deliver(
        "evt_c",
        "checkout.session.completed",
        session("cs_c", "acct_gone", Some("paid")),
    )
    .await;
    let mut nameless = session("cs_d", "", Some("paid"));
    nameless["metadata"] = json!({});
    deliver("evt_d", "checkout.session.completed", nameless).await;
    let (status, unmatched) = admin.call(Method::GET, "/payments/unmatched", None).await;
    assert_eq!(status, 200, "{unmatched}");
    let mut rows: Vec<(String, Option<String>, i64)> = unmatched["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap().to_owned(),
                r["account_ref"].as_str().map(str::to_owned),
                r["amount_nano_usd"].as_i64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("evt_c".to_owned(), Some("acct_gone".to_owned()), 5_000_000_000),
            ("evt_d".to_owned(), None, 5_000_000_000)
        ]
    );
    gw.metric_until("komilion_stripe_unmatched_total", |v| v == 2.0).await;
}

#[test]
fn an_unreachable_store_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{gateway: [\"127.0.0.1:{}\"], metrics: \"127.0.0.1:{}\"}}\nstore: \"postgres://postgres:hunter2@127.0.0.1:{}/test\"\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(BIN).args(["serve", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password is not printed: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_keeps_cached_keys_working_and_fails_fast_otherwise() {
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
    let (_, _, warm) = admin.account_with_key(json!({"name": "warm"}), Some("1")).await;
    let (_, _, cold) = admin.account_with_key(json!({"name": "cold"}), Some("1")).await;
    assert_eq!(chat(&gw, &warm, "gpt-4o-mini").await.0, 200);

    relay.cut();
    assert_eq!(
        chat(&gw, &warm, "gpt-4o-mini").await.0,
        200,
        "a cached key needs no store"
    );
    let started = Instant::now();
    let (status, body, headers) = chat(&gw, &cold, "gpt-4o-mini").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "503 quickly, not a hang: {:?}",
        started.elapsed()
    );
    let (status, _) = admin.call(Method::GET, "/accounts", None).await;
    assert_eq!(status, 503);

    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = chat(&gw, &cold, "gpt-4o-mini").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway recovers when the store returns");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_admin_cli_works_on_the_configured_store() {
    let (_dir, url) = sqlite_url();
    let run = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["admin", "--store", &url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let account = run(&["accounts", "create", "--name", "Cli", "--email", "cli@example.com"]);
    let id = account["id"].as_str().unwrap();
    let key = run(&[
        "keys",
        "create",
        id,
        "--name",
        "k",
        "--models",
        "gpt-4o-mini,gpt-4o",
        "--rpm",
        "10",
    ]);
    assert!(key["key"].as_str().unwrap().starts_with("sk-kml-"));
    assert_eq!(key["allowed_models"], json!(["gpt-4o-mini", "gpt-4o"]));
    let wallet = run(&["wallet", "topup", id, "--amount-usd", "3.25"]);
    assert_eq!(wallet["balance_usd"], "3.25");
    assert_eq!(run(&["keys", "list", id])["data"].as_array().unwrap().len(), 1);
    run(&["keys", "revoke", key["id"].as_str().unwrap()]);
    assert!(run(&["keys", "list", id])["data"][0]["revoked_at"].is_string());

    // Provider keys: sealed with v1, rotated to v2 by re-sealing.
    let v1 = komilion::secrets::generate_master_key();
    let v2 = komilion::secrets::generate_master_key();
    let mut set = Command::new(BIN)
        .args(["admin", "--store", &url, "provider-keys", "set", id, "openai"])
        .env("KOMILION_MASTER_KEY", &v1)
        .env_remove("KOMILION_MASTER_KEYS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(set.stdin.as_mut().unwrap(), b"sk-theirs-123\n").unwrap();
    drop(set.stdin.take());
    assert!(set.wait().unwrap().success());
    let out = Command::new(BIN)
        .args(["admin", "--store", &url, "reseal-provider-keys"])
        .env("KOMILION_MASTER_KEYS", format!("v2:{v2},v1:{v1}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resealed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resealed["resealed"], 1);
    assert_eq!(run(&["provider-keys", "list", id])["data"][0]["key_version"], "v2");

    let out = Command::new(BIN)
        .args(["admin", "--store", &url, "accounts", "get", "acct_nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}
