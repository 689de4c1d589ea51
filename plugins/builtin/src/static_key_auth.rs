//! `static_key_auth`: API keys listed in the config.
//!
//! For small deployments and the demo; the store-backed `key_auth` plugin is for real tenants.
//! Presented keys are hashed and compared with every configured hash in constant time, so
//! neither the position of a match nor a shared prefix shows in the timing.

use komilion_sdk::{
    settings_from, ApiError, ConfigIssue, Exchange, Flow, Hooks, Plugin, PluginServices, PluginSettings, Principal,
    RequestView,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::{ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};

pub const NAME: &str = "static_key_auth";

/// Keys shorter than this are refused by the config check: they can be guessed.
const MIN_KEY_LEN: usize = 16;

#[derive(Debug, Deserialize)]
pub struct StaticKeyAuthSettings {
    pub keys: Vec<StaticKey>,
}

#[derive(Debug, Deserialize)]
pub struct StaticKey {
    /// A label for logs and usage records (never the key itself).
    pub name: String,
    /// The secret; use `${ENV}` interpolation in the config.
    pub key: String,
    /// The account charged; defaults to the key's name.
    #[serde(default)]
    pub account: Option<String>,
    /// Models this key may use; empty means all.
    #[serde(default)]
    pub models: Vec<String>,
}

struct Entry {
    digest: [u8; 32],
    principal: Principal,
}

pub struct StaticKeyAuth {
    entries: Vec<Entry>,
}

impl StaticKeyAuth {
    pub fn new(settings: StaticKeyAuthSettings) -> Result<Self, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        if settings.keys.is_empty() {
            issues.push(ConfigIssue::new("keys", "at least one key is required"));
        }
        for (i, k) in settings.keys.iter().enumerate() {
            if k.key.len() < MIN_KEY_LEN {
                issues.push(ConfigIssue::new(
                    format!("keys[{i}].key"),
                    format!("a key needs at least {MIN_KEY_LEN} characters"),
                ));
            }
            if settings.keys[..i].iter().any(|o| o.name == k.name) {
                issues.push(ConfigIssue::new(
                    format!("keys[{i}].name"),
                    format!("duplicate name `{}`", k.name),
                ));
            }
            if settings.keys[..i].iter().any(|o| o.key == k.key) {
                issues.push(ConfigIssue::new(
                    format!("keys[{i}].key"),
                    "the same key is listed twice",
                ));
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        let entries = settings
            .keys
            .into_iter()
            .map(|k| Entry {
                digest: Sha256::digest(k.key.as_bytes()).into(),
                principal: Principal {
                    account_id: k.account.unwrap_or_else(|| k.name.clone()),
                    key_id: k.name,
                    allowed_models: k.models,
                    ..Principal::default()
                },
            })
            .collect();
        Ok(StaticKeyAuth { entries })
    }

    pub fn build(settings: &PluginSettings, _: &PluginServices) -> Result<Arc<dyn Plugin>, Vec<ConfigIssue>> {
        Ok(Arc::new(StaticKeyAuth::new(settings_from(settings)?)?))
    }

    /// The principal of a presented key. Touches every entry whatever the outcome.
    fn lookup(&self, presented: &str) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // 1-based index of the match, 0 for none, selected without branching on secrets.
        let mut found = 0u32;
        for (i, entry) in self.entries.iter().enumerate() {
            let index = i as u32 + 1;
            let hit = entry.digest.ct_eq(&digest);
            found = u32::conditional_select(&found, &index, hit);
        }
        (found.ct_gt(&0).unwrap_u8() == 1).then(|| &self.entries[found as usize - 1].principal)
    }
}

#[async_trait::async_trait]
impl Plugin for StaticKeyAuth {
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
        let Some(presented) = req.credential() else {
            return Flow::error(ApiError::missing_api_key());
        };
        match self.lookup(presented) {
            Some(principal) => {
                ex.principal = Some(principal.clone());
                Flow::Continue
            }
            None => Flow::error(ApiError::invalid_api_key()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};
    use komilion_sdk::Surface;
    use std::time::Instant;

    fn plugin() -> Arc<dyn Plugin> {
        let settings = serde_json::json!({"keys": [
            {"name": "alice", "key": "sk-alice-0123456789abcdef", "models": ["gpt-4o-mini"]},
            {"name": "bob", "key": "sk-bob-0123456789abcdef", "account": "acme"},
        ]});
        StaticKeyAuth::build(&settings, &Default::default()).unwrap()
    }

    async fn call(plugin: &Arc<dyn Plugin>, header: Option<(&'static str, &str)>) -> (Flow, Exchange) {
        let mut headers = HeaderMap::new();
        if let Some((k, v)) = header {
            headers.insert(k, HeaderValue::from_str(v).unwrap());
        }
        let req = RequestView::new(Method::POST, "/v1/chat/completions", headers);
        let mut ex = Exchange::new("r".into(), Surface::OpenAi, Instant::now());
        let flow = plugin.on_headers(&req, &mut ex).await;
        (flow, ex)
    }

    fn status(flow: &Flow) -> Option<(u16, Option<&'static str>)> {
        match flow {
            Flow::Respond(komilion_sdk::LocalResponse::Error(e)) => Some((e.status(), e.code)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn accepts_configured_keys_and_names_the_account() {
        let p = plugin();
        let (flow, ex) = call(&p, Some(("authorization", "Bearer sk-bob-0123456789abcdef"))).await;
        assert!(matches!(flow, Flow::Continue));
        let principal = ex.principal.unwrap();
        assert_eq!(
            (principal.account_id.as_str(), principal.key_id.as_str()),
            ("acme", "bob")
        );

        let (flow, ex) = call(&p, Some(("x-api-key", "sk-alice-0123456789abcdef"))).await;
        assert!(matches!(flow, Flow::Continue));
        assert_eq!(ex.principal.unwrap().allowed_models, ["gpt-4o-mini"]);
    }

    #[tokio::test]
    async fn rejects_missing_and_wrong_keys_with_401() {
        let p = plugin();
        assert_eq!(status(&call(&p, None).await.0), Some((401, Some("missing_api_key"))));
        let wrong = call(&p, Some(("authorization", "Bearer sk-bob-0123456789abcdeX"))).await;
        assert_eq!(status(&wrong.0), Some((401, Some("invalid_api_key"))));
        assert!(wrong.1.principal.is_none());
    }

    #[test]
    fn config_errors_are_all_listed() {
        let settings = serde_json::json!({"keys": [
            {"name": "a", "key": "short"},
            {"name": "a", "key": "short"},
        ]});
        let issues = StaticKeyAuth::build(&settings, &Default::default()).err().unwrap();
        let paths: Vec<_> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["keys[0].key", "keys[1].key", "keys[1].name", "keys[1].key"]);
    }
}
