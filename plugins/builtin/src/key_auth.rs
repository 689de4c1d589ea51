//! `key_auth`: API keys issued by the admin API (`sk-kml-…`), resolved in the store.
//!
//! The presented key is hashed (SHA-256) and looked up through the engine's cache: a warm key
//! costs no store round trip. Revoked and expired keys and keys of disabled accounts are
//! refused; if the store cannot answer, the request gets a quick 503 rather than waiting.

use komilion_sdk::{
    settings_from, ApiError, ConfigIssue, ErrorKind, Exchange, Flow, Hooks, KeyLookup, Plugin, PluginServices,
    PluginSettings, RequestView,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub const NAME: &str = "key_auth";
pub const KEY_PREFIX: &str = "sk-kml-";

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyAuthSettings {
    /// Leave credentials that are not `sk-kml-` keys to the next auth plugin (e.g. `jwt_auth`).
    pub fallthrough: bool,
}

pub struct KeyAuth {
    keys: Arc<dyn KeyLookup>,
    settings: KeyAuthSettings,
}

impl KeyAuth {
    pub fn new(keys: Arc<dyn KeyLookup>, settings: KeyAuthSettings) -> KeyAuth {
        KeyAuth { keys, settings }
    }

    pub fn build(settings: &PluginSettings, services: &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>> {
        let settings = settings_from(settings)?;
        let keys = services.keys.clone().ok_or_else(|| {
            vec![ConfigIssue::new(
                "",
                "key_auth needs a store: set `store:` in the config",
            )]
        })?;
        Ok(Arc::new(KeyAuth::new(keys, settings)))
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[async_trait::async_trait]
impl Plugin for KeyAuth {
    fn name(&self) -> &'static str {
        NAME
    }

    fn hooks(&self) -> Hooks {
        Hooks::ON_HEADERS
    }

    fn authenticates(&self) -> bool {
        true
    }

    async fn on_headers(&self, req: &RequestView, ex: &mut Exchange) -> Flow {
        if ex.principal.is_some() {
            return Flow::Continue;
        }
        let presented = match req.credential() {
            Some(c) if c.starts_with(KEY_PREFIX) => c,
            _ if self.settings.fallthrough => return Flow::Continue,
            Some(_) => return Flow::error(ApiError::invalid_api_key()),
            None => return Flow::error(ApiError::missing_api_key()),
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let grant = match self.keys.lookup(digest).await {
            Ok(Some(grant)) => grant,
            Ok(None) => return Flow::error(ApiError::invalid_api_key()),
            Err(_) => {
                return Flow::error(
                    ApiError::store_unavailable("Keys cannot be checked right now; retry shortly.").with_retry_after(1),
                )
            }
        };
        if grant.revoked {
            return Flow::error(
                ApiError::new(ErrorKind::Authentication, "This API key has been revoked.").with_code("invalid_api_key"),
            );
        }
        if grant.expires_at.is_some_and(|t| t <= now_unix()) {
            return Flow::error(
                ApiError::new(ErrorKind::Authentication, "This API key has expired.").with_code("invalid_api_key"),
            );
        }
        if !grant.account_active {
            return Flow::error(
                ApiError::new(ErrorKind::PermissionDenied, "The account of this API key is disabled.")
                    .with_code("account_disabled"),
            );
        }
        ex.principal = Some(grant.principal);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};
    use komilion_sdk::{KeyGrant, LocalResponse, Principal, StoreUnavailable, Surface};
    use std::collections::HashMap;
    use std::time::Instant;

    /// A store of keys in memory; `None` in the map means "the store is down".
    struct Keys(HashMap<[u8; 32], Option<KeyGrant>>);

    #[async_trait::async_trait]
    impl KeyLookup for Keys {
        async fn lookup(&self, digest: [u8; 32]) -> Result<Option<KeyGrant>, StoreUnavailable> {
            match self.0.get(&digest) {
                Some(Some(g)) => Ok(Some(g.clone())),
                Some(None) => Err(StoreUnavailable("down".into())),
                None => Ok(None),
            }
        }
    }

    fn grant(key_id: &str) -> KeyGrant {
        KeyGrant {
            principal: Principal {
                account_id: "acct_1".into(),
                key_id: key_id.into(),
                ..Default::default()
            },
            expires_at: None,
            revoked: false,
            account_active: true,
        }
    }

    fn digest(s: &str) -> [u8; 32] {
        Sha256::digest(s.as_bytes()).into()
    }

    fn plugin(fallthrough: bool) -> KeyAuth {
        let mut map = HashMap::new();
        map.insert(digest("sk-kml-good"), Some(grant("key_good")));
        map.insert(
            digest("sk-kml-revoked"),
            Some(KeyGrant {
                revoked: true,
                ..grant("r")
            }),
        );
        map.insert(
            digest("sk-kml-expired"),
            Some(KeyGrant {
                expires_at: Some(1),
                ..grant("e")
            }),
        );
        map.insert(
            digest("sk-kml-disabled"),
            Some(KeyGrant {
                account_active: false,
                ..grant("d")
            }),
        );
        map.insert(digest("sk-kml-storedown"), None);
        KeyAuth::new(Arc::new(Keys(map)), KeyAuthSettings { fallthrough })
    }

    async fn call(p: &KeyAuth, key: Option<&str>) -> (Option<(u16, Option<&'static str>)>, Exchange) {
        let mut headers = HeaderMap::new();
        if let Some(k) = key {
            headers.insert("x-api-key", HeaderValue::from_str(k).unwrap());
        }
        let mut ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        let flow = p
            .on_headers(&RequestView::new(Method::POST, "/", headers), &mut ex)
            .await;
        let status = match flow {
            Flow::Respond(LocalResponse::Error(e)) => Some((e.status(), e.code)),
            _ => None,
        };
        (status, ex)
    }

    #[tokio::test]
    async fn good_keys_pass_and_bad_ones_are_refused_precisely() {
        let p = plugin(false);
        let (status, ex) = call(&p, Some("sk-kml-good")).await;
        assert_eq!(status, None);
        assert_eq!(ex.principal.unwrap().key_id, "key_good");
        assert_eq!(
            call(&p, Some("sk-kml-unknown")).await.0,
            Some((401, Some("invalid_api_key")))
        );
        assert_eq!(
            call(&p, Some("sk-kml-revoked")).await.0,
            Some((401, Some("invalid_api_key")))
        );
        assert_eq!(
            call(&p, Some("sk-kml-expired")).await.0,
            Some((401, Some("invalid_api_key")))
        );
        assert_eq!(
            call(&p, Some("sk-kml-disabled")).await.0,
            Some((403, Some("account_disabled")))
        );
        assert_eq!(
            call(&p, Some("sk-kml-storedown")).await.0,
            Some((503, Some("store_unavailable")))
        );
        assert_eq!(call(&p, None).await.0, Some((401, Some("missing_api_key"))));
        assert_eq!(
            call(&p, Some("eyJhbGciOi.x.y")).await.0,
            Some((401, Some("invalid_api_key")))
        );
    }

    #[tokio::test]
    async fn fallthrough_leaves_other_credentials_alone() {
        let p = plugin(true);
        let (status, ex) = call(&p, Some("eyJhbGciOi.x.y")).await;
        assert_eq!(status, None);
        assert!(ex.principal.is_none());
        assert_eq!(
            call(&p, Some("sk-kml-unknown")).await.0,
            Some((401, Some("invalid_api_key")))
        );
    }
}
