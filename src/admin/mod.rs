//! The admin API, on its own listener, guarded by `Authorization: Bearer <admin token>`.
//!
//! Contract (JSON in and out; errors as `{"error": {"message", "type", "code"}}`):
//!
//! | method and path | does |
//! |---|---|
//! | `POST /admin/v1/accounts` `{"name","email"}` | 201, the account |
//! | `GET /admin/v1/accounts[?limit=&after=]` | accounts, by id |
//! | `GET /admin/v1/accounts/{id}` | the account |
//! | `PATCH /admin/v1/accounts/{id}` `{"status": "active"\|"disabled"}` | the account |
//! | `POST /admin/v1/accounts/{id}/keys` `{"name", "expires_at"?, "allowed_models"?, "rpm_limit"?, "tpm_limit"?}` | 201, `{"id", "key", …}`: the only time the key is shown |
//! | `GET /admin/v1/accounts/{id}/keys` | the keys, never the secrets |
//! | `DELETE /admin/v1/keys/{key_id}` | 204, revoked |
//! | `POST /admin/v1/accounts/{id}/wallet/topup` `{"amount_usd": "12.50"}` | `{"balance_usd", …}`; an `Idempotency-Key` header makes retries no-ops |
//! | `GET /admin/v1/accounts/{id}/wallet` | `{"balance_usd", "balance_nano_usd", …}` |
//! | `PUT /admin/v1/accounts/{id}/provider-keys/{provider}` `{"api_key"}` | 204, sealed with the master key |
//! | `GET /admin/v1/accounts/{id}/provider-keys` | providers and key versions, never the keys |
//! | `DELETE /admin/v1/accounts/{id}/provider-keys/{provider}` | 204 |
//! | `GET /admin/v1/accounts/{id}/usage?from=&to=&format=jsonl\|csv` | the usage records, streamed |
//! | `DELETE /admin/v1/accounts/{id}` | 204: personal data and keys erased, billing rows kept anonymised |

pub mod ops;

use crate::proxy::body::read_body;
use crate::secrets::MasterKeys;
use crate::store::cache::StoreSlot;
use crate::store::Store;
use async_trait::async_trait;
use bytes::Bytes;
use komilion_sdk::Timing;
use ops::OpError;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 1024 * 1024;

pub struct AdminApi {
    store: StoreSlot,
    token_digest: [u8; 32],
    master_keys: Option<Arc<MasterKeys>>,
    /// Time a client has to send a whole request body (`limits.body_timeout_ms`).
    body_timeout: Duration,
}

/// What a handler answers: a status and a JSON body (none for 204).
type Reply = Result<(u16, Option<Value>), OpError>;

impl AdminApi {
    async fn store_opened(&self) -> Option<Arc<dyn Store>> {
        crate::store::cache::opened(&self.store).await.cloned()
    }

    pub fn new(
        store: StoreSlot,
        token: &str,
        master_keys: Option<Arc<MasterKeys>>,
        body_timeout: Duration,
    ) -> AdminApi {
        AdminApi {
            store,
            token_digest: Sha256::digest(token.as_bytes()).into(),
            master_keys,
            body_timeout,
        }
    }

    fn authorized(&self, session: &Session) -> bool {
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.token_digest))
    }

    async fn body<T: DeserializeOwned>(&self, session: &mut Session) -> Result<T, OpError> {
        let mut timing = Timing::new(Instant::now());
        let raw = read_body(session, MAX_ADMIN_BODY, self.body_timeout, &mut timing)
            .await
            .map_err(|e| match e {
                crate::proxy::body::BodyError::TooLarge(e) | crate::proxy::body::BodyError::TimedOut(e) => {
                    OpError::BadRequest(e.message)
                }
                crate::proxy::body::BodyError::ClientGone => {
                    OpError::BadRequest("the request body was cut short".into())
                }
            })?;
        serde_json::from_slice(&raw).map_err(|e| OpError::BadRequest(format!("invalid JSON body: {e}")))
    }

    async fn route(&self, session: &mut Session) -> Reply {
        let store: Arc<dyn Store> = self
            .store_opened()
            .await
            .ok_or_else(|| OpError::Unavailable("the store is still opening".into()))?;
        let store = store.as_ref();
        let method = session.req_header().method.clone();
        let uri = session.req_header().uri.clone();
        let Some(rest) = uri.path().strip_prefix("/admin/v1/") else {
            return Err(OpError::NotFound(format!("no route {}", uri.path())));
        };
        let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        let query = |name: &str| -> Option<String> {
            uri.query()?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| v.to_owned())
            })
        };
        use http::Method as M;
        match (&method, parts.as_slice()) {
            (&M::POST, ["accounts"]) => {
                let body = self.body(session).await?;
                Ok((201, Some(ops::create_account(store, body).await?)))
            }
            (&M::GET, ["accounts"]) => {
                let limit = query("limit").map_or(Ok(100), |l| {
                    l.parse()
                        .map_err(|_| OpError::BadRequest("`limit` must be a number".into()))
                })?;
                let after = query("after");
                Ok((200, Some(ops::list_accounts(store, limit, after.as_deref()).await?)))
            }
            (&M::GET, ["accounts", id]) => Ok((200, Some(ops::get_account(store, id).await?))),
            (&M::DELETE, ["accounts", id]) => {
                ops::erase_account(store, id).await?;
                Ok((204, None))
            }
            (&M::PATCH, ["accounts", id]) => {
                let body = self.body(session).await?;
                Ok((200, Some(ops::update_account(store, id, body).await?)))
            }
            (&M::POST, ["accounts", id, "keys"]) => {
                let body = self.body(session).await?;
                Ok((201, Some(ops::create_key(store, id, body).await?)))
            }
            (&M::GET, ["accounts", id, "keys"]) => Ok((200, Some(ops::list_keys(store, id).await?))),
            (&M::DELETE, ["keys", key_id]) => {
                ops::revoke_key(store, key_id).await?;
                Ok((204, None))
            }
            (&M::GET, ["accounts", id, "wallet"]) => Ok((200, Some(ops::wallet(store, id).await?))),
            (&M::POST, ["accounts", id, "wallet", "topup"]) => {
                let reference = session
                    .req_header()
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = self.body(session).await?;
                Ok((200, Some(ops::top_up(store, id, body, reference.as_deref()).await?)))
            }
            (&M::GET, ["accounts", id, "provider-keys"]) => Ok((200, Some(ops::list_provider_keys(store, id).await?))),
            (&M::PUT, ["accounts", id, "provider-keys", provider]) => {
                let body = self.body(session).await?;
                ops::put_provider_key(store, self.master_keys.as_deref(), id, provider, body).await?;
                Ok((204, None))
            }
            (&M::DELETE, ["accounts", id, "provider-keys", provider]) => {
                ops::delete_provider_key(store, id, provider).await?;
                Ok((204, None))
            }
            (&M::GET, ["payments", "unmatched"]) => Ok((200, Some(ops::unmatched_payments(store).await?))),
            _ => Err(OpError::NotFound(format!("no route {method} {}", uri.path()))),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched without regard
/// to case (RFC 9110 §11.1), as the gateway's own [`komilion_sdk::RequestView::credential`]
/// does: a client that sends `bearer` must not be refused on one listener and let in on the
/// other. Surrounding whitespace is dropped; an empty token is none.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `GET /admin/v1/accounts/{id}/usage`: the account id.
fn usage_export_path(session: &Session) -> Option<String> {
    let header = session.req_header();
    if header.method != http::Method::GET {
        return None;
    }
    let rest = header.uri.path().strip_prefix("/admin/v1/accounts/")?;
    let (id, tail) = rest.split_once('/')?;
    (tail.trim_end_matches('/') == "usage").then(|| id.to_owned())
}

impl AdminApi {
    /// Stream an account's usage. Errors before the first byte are answered as JSON.
    async fn export(&self, session: &mut Session, account_id: &str) -> Result<(), OpError> {
        let store = self
            .store_opened()
            .await
            .ok_or_else(|| OpError::Unavailable("the store is still opening".into()))?;
        store.get_account(account_id).await?;
        let query =
            crate::usage::export::ExportQuery::parse(session.req_header().uri.query()).map_err(OpError::BadRequest)?;
        let filter = crate::store::UsageFilter {
            account_id: account_id.to_owned(),
            key_id: None,
            from: query.from,
            to: query.to,
        };
        match crate::usage::export::stream(session, store.as_ref(), filter, query.format).await {
            Ok(()) => Ok(()),
            // Nothing was written yet if the first page failed: answer with the error.
            Err(e) if session.response_written().is_none() => Err(e.into()),
            Err(e) => {
                tracing::warn!(account_id, "usage export cut short: {e}");
                Ok(())
            }
        }
    }
}

async fn send(session: &mut Session, status: u16, body: Option<Value>) {
    let body = body.map(|v| Bytes::from(serde_json::to_vec(&v).unwrap_or_default()));
    let Ok(mut resp) = ResponseHeader::build(status, Some(3)) else {
        return;
    };
    let _ = resp.insert_header(http::header::CONTENT_LENGTH, body.as_ref().map_or(0, |b| b.len()));
    if body.is_some() {
        let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
    }
    if session
        .write_response_header(Box::new(resp), body.is_none())
        .await
        .is_ok()
    {
        if let Some(body) = body {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}

#[async_trait]
impl ProxyHttp for AdminApi {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "the admin API has no upstream",
        ))
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        if !self.authorized(session) {
            session.set_keepalive(None);
            let e = serde_json::json!({"error": {"message": "A valid admin token is required (Authorization: Bearer <token>).",
                                                  "type": "invalid_request_error", "code": "invalid_admin_token"}});
            send(session, 401, Some(e)).await;
            return Ok(true);
        }
        if let Some(account_id) = usage_export_path(session) {
            if let Err(e) = self.export(session, &account_id).await {
                send(session, e.status(), Some(e.to_json())).await;
            }
            return Ok(true);
        }
        match self.route(session).await {
            Ok((status, body)) => send(session, status, body).await,
            Err(e) => send(session, e.status(), Some(e.to_json())).await,
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR  tok ", " Bearer tok"] {
            assert_eq!(bearer_token(value), Some("tok"), "{value:?}");
        }
        for value in ["Basic tok", "Bearertok", "Bearer", "Bearer   ", "tok", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
