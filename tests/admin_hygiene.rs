#![allow(clippy::unwrap_used)]
//! Admin API hygiene (issue 9, item 7): the `Bearer` scheme in any case, provider names checked
//! before the store sees them, money amounts as plain decimals only.

mod common;

use common::*;
use komilion::mock_provider::{Behavior, MockProvider};
use reqwest::Method;
use serde_json::json;

/// A gateway with an admin listener on a fresh SQLite store.
async fn gateway() -> (tempfile::TempDir, MockProvider, GatewayProcess, Admin) {
    let (db, url) = sqlite_url();
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    (db, mock, gw, admin)
}

/// `Bearer` is a case-insensitive scheme (RFC 9110), as on the gateway listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let (_db, _mock, _gw, admin) = gateway().await;
    for (header, status) in [
        (format!("Bearer {ADMIN_TOKEN}"), 200),
        (format!("bearer {ADMIN_TOKEN}"), 200),
        (format!("BEARER  {ADMIN_TOKEN} "), 200),
        (format!("Basic {ADMIN_TOKEN}"), 401),
        (ADMIN_TOKEN.to_owned(), 401),
        ("bearer".to_owned(), 401),
    ] {
        let resp = admin
            .client
            .get(format!("{}/accounts", admin.base))
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{header:?}");
    }
}

/// Money typed by a person is a plain decimal: `"1e3"` used to credit $1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_are_plain_decimals_only() {
    let (_db, _mock, _gw, admin) = gateway().await;
    let (id, _, _) = admin.account_with_key(json!({"name": "w"}), None).await;
    let topup = format!("/accounts/{id}/wallet/topup");
    for amount in ["1e3", "1E3", "1.5e2", "+5", " 5", ".5", "5.", "0x10", "1_000"] {
        let (status, body) = admin
            .call(Method::POST, &topup, Some(json!({"amount_usd": amount})))
            .await;
        assert_eq!(status, 400, "{amount:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`amount_usd`") && message.contains("plain decimal"),
            "{message}"
        );
    }
    assert_eq!(admin.wallet(&id).await["balance_usd"], "0", "nothing was credited");
    assert_eq!(admin.topup(&id, "12.50").await["balance_usd"], "12.5");
    // A key's budget is money typed by a person too.
    let (status, body) = admin
        .call(
            Method::POST,
            &format!("/accounts/{id}/keys"),
            Some(json!({"name": "b", "budget_usd": "1e2"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("`budget_usd`"),
        "{body}"
    );
}

/// Provider names are `[a-z0-9_-]{1,64}`, checked on every provider-key route before the
/// store sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_names_are_checked() {
    let (_db, _mock, _gw, admin) = gateway().await;
    let (id, _, _) = admin.account_with_key(json!({"name": "byok"}), None).await;
    let key = || Some(json!({"api_key": "sk-their-own-key-0123456789"}));
    let long = "x".repeat(65);
    for name in ["OpenAI", "open%20ai", "open.ai", "open%2Fai", "%C3%A9", long.as_str()] {
        let path = format!("/accounts/{id}/provider-keys/{name}");
        let (status, body) = admin.call(Method::PUT, &path, key()).await;
        assert_eq!(status, 400, "PUT {name}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("a-z, 0-9"),
            "{body}"
        );
        let (status, body) = admin.call(Method::DELETE, &path, None).await;
        assert_eq!(status, 400, "DELETE {name}: {body}");
    }
    let (_, list) = admin
        .call(Method::GET, &format!("/accounts/{id}/provider-keys"), None)
        .await;
    assert_eq!(list["data"], json!([]), "nothing was stored under a bad name");
    let (status, body) = admin
        .call(Method::PUT, &format!("/accounts/{id}/provider-keys/azure-eu_2"), key())
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = admin
        .call(
            Method::DELETE,
            &format!("/accounts/{id}/provider-keys/azure-eu_2"),
            None,
        )
        .await;
    assert_eq!(status, 204);
}
