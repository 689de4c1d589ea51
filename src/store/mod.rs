//! The store: accounts, API keys, wallets, provider keys (and, later, usage).
//!
//! One trait, [`Store`], two implementations that pass the same conformance suite
//! ([`conformance`]): [`sqlite`] (the embedded default: a file, zero set-up, one instance) and
//! [`postgres`] (several instances share it; changes are announced with LISTEN/NOTIFY).
//! Migrations are versioned SQL files under `migrations/`, applied at start.
//!
//! Secrets are never stored: API keys as SHA-256 digests, provider keys sealed with AES-256-GCM
//! ([`crate::secrets`]).

pub mod cache;
pub mod conformance;
mod migrate;
pub mod postgres;
pub mod service;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// How long a store operation may take before it counts as unavailable.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Disabled,
    /// Personal data removed; billing rows kept anonymised.
    Erased,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Disabled => "disabled",
            AccountStatus::Erased => "erased",
        }
    }

    pub fn parse(s: &str) -> StoreResult<AccountStatus> {
        match s {
            "active" => Ok(AccountStatus::Active),
            "disabled" => Ok(AccountStatus::Disabled),
            "erased" => Ok(AccountStatus::Erased),
            other => Err(StoreError::Internal(format!("unknown account status `{other}`"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub status: AccountStatus,
    pub created_at: DateTime<Utc>,
}

/// What a new key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub expires_at: Option<DateTime<Utc>>,
    /// Models the key may use; empty means all.
    pub allowed_models: Vec<String>,
    pub rpm_limit: Option<u32>,
    pub tpm_limit: Option<u32>,
}

/// An API key's record. The secret itself is never stored or returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The first characters of the key, to recognise it (`sk-kml-AbCd…`).
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub allowed_models: Vec<String>,
    pub rpm_limit: Option<u32>,
    pub tpm_limit: Option<u32>,
}

/// A key found by its digest, with its account's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: KeyInfo,
    pub account_status: AccountStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wallet {
    pub account_id: String,
    pub balance_nano_usd: i64,
    pub updated_at: DateTime<Utc>,
}

/// A provider key sealed with the master key ([`crate::secrets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// Which master key sealed it (for rotation).
    pub key_version: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderKeyInfo {
    pub provider: String,
    pub key_version: String,
    pub created_at: DateTime<Utc>,
}

/// A change other instances must hear about (their caches hold the old state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A key was created, revoked or changed; the value is its SHA-256 digest.
    Key([u8; 32]),
    /// An account's status changed; every key of it is affected.
    Account(String),
    /// A wallet was credited or debited outside the request path (top-up, admin).
    Wallet(String),
    /// Notifications may have been missed (listener reconnected): drop every cache.
    Resync,
}

impl StoreEvent {
    /// The NOTIFY payload.
    pub fn encode(&self) -> String {
        match self {
            StoreEvent::Key(digest) => format!("key:{}", hex::encode(digest)),
            StoreEvent::Account(id) => format!("account:{id}"),
            StoreEvent::Wallet(id) => format!("wallet:{id}"),
            StoreEvent::Resync => "resync".into(),
        }
    }

    pub fn decode(payload: &str) -> Option<StoreEvent> {
        let (kind, value) = payload.split_once(':').unwrap_or((payload, ""));
        match kind {
            "key" => {
                let bytes = hex::decode(value).ok()?;
                Some(StoreEvent::Key(bytes.try_into().ok()?))
            }
            "account" => Some(StoreEvent::Account(value.to_owned())),
            "wallet" => Some(StoreEvent::Wallet(value.to_owned())),
            "resync" => Some(StoreEvent::Resync),
            _ => None,
        }
    }
}

/// The storage operations of the gateway. Every method is bounded by [`OPERATION_TIMEOUT`] and
/// answers [`StoreError::Unavailable`] rather than hanging.
#[async_trait]
pub trait Store: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    async fn create_account(&self, name: &str, email: &str) -> StoreResult<Account>;
    async fn get_account(&self, id: &str) -> StoreResult<Account>;
    /// Accounts by creation, `limit` of them after the id `after`.
    async fn list_accounts(&self, limit: u32, after: Option<&str>) -> StoreResult<Vec<Account>>;
    async fn set_account_status(&self, id: &str, status: AccountStatus) -> StoreResult<Account>;

    async fn create_key(
        &self,
        account_id: &str,
        name: &str,
        digest: [u8; 32],
        prefix: &str,
        limits: &KeyLimits,
    ) -> StoreResult<KeyInfo>;
    async fn list_keys(&self, account_id: &str) -> StoreResult<Vec<KeyInfo>>;
    async fn revoke_key(&self, key_id: &str) -> StoreResult<()>;
    async fn find_key(&self, digest: [u8; 32]) -> StoreResult<Option<KeyRecord>>;
    /// Record that keys were used (batched by the caller, never per request).
    async fn touch_keys(&self, key_ids: &[String], at: DateTime<Utc>) -> StoreResult<()>;

    async fn wallet(&self, account_id: &str) -> StoreResult<Wallet>;
    /// Credit a wallet; `reference` makes the credit idempotent per `kind` (a repeat is a
    /// no-op that returns the current wallet and `false`).
    async fn credit(
        &self,
        account_id: &str,
        amount_nano_usd: i64,
        kind: &str,
        reference: &str,
    ) -> StoreResult<(Wallet, bool)>;

    async fn put_provider_key(&self, account_id: &str, provider: &str, secret: &SealedSecret) -> StoreResult<()>;
    async fn get_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<Option<SealedSecret>>;
    async fn list_provider_keys(&self, account_id: &str) -> StoreResult<Vec<ProviderKeyInfo>>;
    async fn delete_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<()>;
    /// Every sealed provider key, for re-sealing with a new master key.
    async fn all_provider_keys(&self) -> StoreResult<Vec<(String, String, SealedSecret)>>;

    /// Changes announced by any instance sharing this store (including this one).
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
}

/// Open the store a config names: `sqlite://PATH` (or a bare path) or `postgres://…`.
pub async fn open(url: &str) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(sqlite::SqliteStore::open(path).await?))
    }
}

/// A fresh id with a type prefix: `acct_…`, `key_…` (96 random bits, hex).
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// An API key secret: `sk-kml-` and 32 base62 characters (190 random bits). Returns the secret,
/// its SHA-256 digest and its display prefix.
pub fn generate_api_key() -> (String, [u8; 32], String) {
    use rand::Rng;
    use sha2::Digest;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    let secret = format!("{API_KEY_PREFIX}{body}");
    let digest: [u8; 32] = sha2::Sha256::digest(secret.as_bytes()).into();
    let prefix = secret[..API_KEY_PREFIX.len() + 4].to_owned();
    (secret, digest, prefix)
}

pub const API_KEY_PREFIX: &str = "sk-kml-";

/// Run a store operation within [`OPERATION_TIMEOUT`].
pub(crate) async fn bounded<T>(fut: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
    match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable("the operation timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_long_random_and_prefixed() {
        let (a, da, pa) = generate_api_key();
        let (b, db, _) = generate_api_key();
        assert!(a.starts_with("sk-kml-") && a.len() == 39);
        assert_ne!(a, b);
        assert_ne!(da, db);
        assert_eq!(pa, &a[..11]);
    }

    #[test]
    fn events_round_trip() {
        for e in [
            StoreEvent::Key([7; 32]),
            StoreEvent::Account("acct_1".into()),
            StoreEvent::Wallet("a".into()),
            StoreEvent::Resync,
        ] {
            assert_eq!(StoreEvent::decode(&e.encode()), Some(e));
        }
        assert_eq!(StoreEvent::decode("nonsense:1"), None);
    }
}
