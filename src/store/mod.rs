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
pub mod pg_tls;
pub mod postgres;
pub mod service;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// How many migrations the PostgreSQL store has (for tests that check they all ran once).
pub const MIGRATIONS_POSTGRES: usize = migrate::POSTGRES.len();

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
    /// The store refused what it was given (a value out of its bounds, a byte its text type
    /// cannot hold): retrying the same data fails the same way.
    #[error("the store refused the data: {0}")]
    Rejected(String),
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
    /// What the key is expected to spend (alerts fire at a share of it).
    pub budget_nano_usd: Option<i64>,
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
    pub budget_nano_usd: Option<i64>,
    /// Billed usage so far (as ingested from the usage log).
    pub spent_nano_usd: i64,
}

/// A key found by its digest, with its account's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: KeyInfo,
    pub account_status: AccountStatus,
}

/// A payment event that could not be credited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnmatchedPayment {
    pub event_id: String,
    pub event_type: String,
    /// What the event named as the account, if anything (at most 256 bytes).
    pub account_ref: Option<String>,
    pub amount_nano_usd: i64,
    pub reason: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wallet {
    pub account_id: String,
    /// What the account can still spend: the unleased balance plus what open leases have not
    /// yet been seen spending.
    pub balance_nano_usd: i64,
    /// Part of the balance leased out to gateway instances right now.
    pub leased_nano_usd: i64,
    /// Lifetime credits.
    pub credited_nano_usd: i64,
    /// Lifetime billed usage, as ingested from the usage log.
    pub spent_nano_usd: i64,
    pub updated_at: DateTime<Utc>,
}

/// A slice of a wallet granted to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub lease_id: String,
    /// Granted by this call (0 when the wallet could not cover the minimum).
    pub granted_nano_usd: i64,
    /// Left in the wallet, unleased, after this call.
    pub balance_nano_usd: i64,
}

/// Thresholds whose crossing writes an alert (see [`Store::insert_usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertRules {
    /// Alert when an account's balance falls below this.
    pub wallet_below_nano_usd: Option<i64>,
    /// Alert when a key's spend passes this percentage of its budget.
    pub key_budget_percent: Option<u32>,
}

/// Which usage records to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageFilter {
    pub account_id: String,
    pub key_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// An alert waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAlert {
    pub id: i64,
    pub payload: String,
    pub attempts: i32,
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
    /// Keep a paid top-up that credited no wallet (its account is unknown), for an operator to
    /// settle by hand; a repeat of the same event is a no-op (returns `false`).
    async fn keep_unmatched_payment(&self, payment: &UnmatchedPayment) -> StoreResult<bool>;
    /// The payments kept by [`Store::keep_unmatched_payment`], newest first.
    async fn unmatched_payments(&self, limit: u32) -> StoreResult<Vec<UnmatchedPayment>>;

    async fn put_provider_key(&self, account_id: &str, provider: &str, secret: &SealedSecret) -> StoreResult<()>;
    async fn get_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<Option<SealedSecret>>;
    async fn list_provider_keys(&self, account_id: &str) -> StoreResult<Vec<ProviderKeyInfo>>;
    async fn delete_provider_key(&self, account_id: &str, provider: &str) -> StoreResult<()>;
    /// Every sealed provider key, for re-sealing with a new master key.
    async fn all_provider_keys(&self) -> StoreResult<Vec<(String, String, SealedSecret)>>;

    /// Lease a slice of a wallet to an instance, with one atomic conditional update: nothing
    /// if the balance is under `min`, else [`lease_grant`]. With `lease_id`, the existing open
    /// lease grows (and its expiry moves); otherwise a new lease is opened.
    async fn lease(
        &self,
        account_id: &str,
        instance_id: &str,
        lease_id: Option<&str>,
        min_nano_usd: i64,
        want_nano_usd: i64,
        ttl: Duration,
    ) -> StoreResult<LeaseGrant>;
    /// Move an open lease's expiry.
    async fn extend_lease(&self, lease_id: &str, ttl: Duration) -> StoreResult<()>;
    /// Close a lease its owner spent `spent` of, returning the rest to the wallet. `None` when
    /// it was already settled (reclaimed after expiring).
    async fn settle_lease(&self, lease_id: &str, spent_nano_usd: i64) -> StoreResult<Option<i64>>;
    /// Close leases expired longer than `grace` (their instance is gone): what the usage log
    /// shows spent stays spent, the rest returns. Usage of such a lease that arrives later is
    /// billed to the wallet directly (as far as it covers it). Returns how many were closed.
    async fn reclaim_expired_leases(&self, grace: Duration) -> StoreResult<u64>;

    /// Insert usage records; a request id already present is skipped. Updates lifetime spend
    /// of wallets and keys and writes an alert for each threshold crossed, in the same
    /// transaction. Returns how many records were new. A batch holding a record the store
    /// refuses for its content fails whole with [`StoreError::Rejected`] (nothing written).
    async fn insert_usage(&self, records: &[crate::usage::UsageRecord], rules: &AlertRules) -> StoreResult<u64>;
    /// Usage records by time, `limit` of them after `(created_at, request_id)`.
    async fn usage_page(
        &self,
        filter: &UsageFilter,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> StoreResult<Vec<crate::usage::UsageRecord>>;
    /// Delete usage older than `before`; returns how many records went.
    async fn purge_usage(&self, before: DateTime<Utc>) -> StoreResult<u64>;
    /// Remove an account's personal data and keys; billing rows stay, no longer linked to a
    /// person or a key.
    async fn erase_account(&self, id: &str) -> StoreResult<()>;

    /// Alerts due for delivery.
    async fn due_alerts(&self, limit: u32) -> StoreResult<Vec<PendingAlert>>;
    /// Delivered: remove it.
    async fn alert_delivered(&self, id: i64) -> StoreResult<()>;
    /// Not delivered: try again after `delay`.
    async fn alert_failed(&self, id: i64, delay: Duration) -> StoreResult<()>;

    /// Changes announced by any instance sharing this store (including this one).
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
}

/// In a usage insert, a constraint that fails (the bounds on a record's text; request ids
/// already present are skipped, never a conflict) means the store refuses a record's content.
pub(crate) fn usage_refused(e: StoreError) -> StoreError {
    match e {
        StoreError::Conflict(m) => StoreError::Rejected(m),
        other => other,
    }
}

/// The JSON an alert webhook receives when a wallet falls below its threshold.
pub(crate) fn wallet_alert(account_id: &str, balance: i64, threshold: i64) -> String {
    use crate::money::Usd;
    serde_json::json!({
        "type": "wallet.balance_low", "account_id": account_id,
        "balance_usd": Usd(balance).to_string(), "threshold_usd": Usd(threshold).to_string(),
        "at": Utc::now(),
    })
    .to_string()
}

/// The JSON an alert webhook receives when a key spends past a share of its budget.
pub(crate) fn key_alert(account_id: &str, key_id: &str, spent: i64, budget: i64, percent: u32) -> String {
    use crate::money::Usd;
    serde_json::json!({
        "type": "key.budget_share", "account_id": account_id, "key_id": key_id,
        "spent_usd": Usd(spent).to_string(), "budget_usd": Usd(budget).to_string(), "percent": percent,
        "at": Utc::now(),
    })
    .to_string()
}

/// The alerts a change of lifetime spend crosses: the wallet falling below its threshold, a
/// key passing its share of budget. `before`/`after` are balances (wallet) or spends (key).
pub(crate) fn crossed_below(before: i64, after: i64, threshold: Option<i64>) -> Option<i64> {
    threshold.filter(|t| before >= *t && after < *t)
}

pub(crate) fn crossed_share(before: i64, after: i64, budget: Option<i64>, percent: Option<u32>) -> Option<(i64, u32)> {
    let (budget, percent) = (budget?, percent?);
    let threshold = (budget as i128 * percent as i128 / 100) as i64;
    (before < threshold && after >= threshold).then_some((budget, percent))
}

/// How much of a wallet's unleased `balance` a lease takes: a quarter of it (so that several
/// instances serving one account each get a share), at least `min` (what the request needs),
/// at most `want` (the configured lease size), never more than the balance; nothing if the
/// balance is under `min`.
pub fn lease_grant(balance: i64, min: i64, want: i64) -> i64 {
    if balance < min.max(1) {
        return 0;
    }
    balance.min(min.max(want.min(balance / 4)))
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

/// How long opening a store may spend on its migrations: at start-up, possibly waiting for
/// another instance that migrates the same database first, so far more than an operation.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// An error with its causes, `outer: inner: …`. tokio-postgres's errors name only their kind
/// ("error performing TLS handshake"); the reason is in the causes.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Run a store operation within [`OPERATION_TIMEOUT`].
pub(crate) async fn bounded<T>(fut: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
    bounded_by(OPERATION_TIMEOUT, fut).await
}

/// Run a store operation within `limit`.
pub(crate) async fn bounded_by<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    match tokio::time::timeout(limit, fut).await {
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
