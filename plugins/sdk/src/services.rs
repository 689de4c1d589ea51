//! What plugins may ask of the engine's storage, as traits the engine implements.
//!
//! Plugins never talk to a database: they get these handles in [`crate::PluginServices`]. The
//! engine's implementations cache (a warm key costs no store round trip) and are invalidated
//! when the store changes.

use crate::exchange::Principal;
use async_trait::async_trait;

/// An API key as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGrant {
    pub principal: Principal,
    /// Unix seconds after which the key no longer works.
    pub expires_at: Option<i64>,
    pub revoked: bool,
    /// The owning account is active (not disabled or erased).
    pub account_active: bool,
}

/// The store could not answer (down, slow, misconfigured). Plugins answer 503, never hang.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store is unavailable: {0}")]
pub struct StoreUnavailable(pub String);

/// Resolves API keys by the SHA-256 digest of the presented secret.
#[async_trait]
pub trait KeyLookup: Send + Sync {
    async fn lookup(&self, key_digest: [u8; 32]) -> Result<Option<KeyGrant>, StoreUnavailable>;
}

/// Whether an account exists and may spend (for credentials, like JWTs, that name an account).
#[async_trait]
pub trait AccountLookup: Send + Sync {
    /// `None` when there is no such account; `Some(active)` otherwise.
    async fn account_active(&self, account_id: &str) -> Result<Option<bool>, StoreUnavailable>;
}
