//! The store as plugins see it: [`KeyLookup`] and [`AccountLookup`] behind moka caches, so a
//! warm key costs no store round trip. Entries are dropped when the store announces a change
//! (LISTEN/NOTIFY on PostgreSQL), and expire anyway after [`POSITIVE_TTL`] as a safety net.
//!
//! A change can land while a cold lookup of the same key is in flight: the lookup read the key
//! before the change, the change's notice found nothing cached to drop, and the lookup would
//! then cache what it read for a full TTL (a revoked key working for another minute). Every
//! notice moves a generation counter; a lookup that saw it move reads again and caches nothing.

use super::{AccountStatus, Store, StoreError, StoreEvent};
use async_trait::async_trait;
use komilion_sdk::{AccountLookup, KeyGrant, KeyLookup, Principal, StoreUnavailable};
use moka::future::Cache;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long a found key or account is trusted without a change notice.
pub const POSITIVE_TTL: Duration = Duration::from_secs(60);
/// How long "no such key" is remembered (bounds store load from key-guessing).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// The store once it is open. Empty until the store service has opened it (after Pingora's
/// daemon fork, in the runtime that will own its connections).
pub type StoreSlot = Arc<OnceLock<Arc<dyn Store>>>;

fn unavailable(e: StoreError) -> StoreUnavailable {
    StoreUnavailable(e.to_string())
}

/// How long a request waits for a store that is still opening. A process serves as soon as it
/// has its listeners, before its store service has connected: at a start, and in a graceful
/// upgrade, where the new process takes traffic at once.
pub const OPENING_WAIT: Duration = Duration::from_secs(10);

/// The store, once open (waiting up to [`OPENING_WAIT`] for it).
pub async fn opened(slot: &StoreSlot) -> Option<&Arc<dyn Store>> {
    let deadline = std::time::Instant::now() + OPENING_WAIT;
    loop {
        if let Some(store) = slot.get() {
            return Some(store);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn store(slot: &StoreSlot) -> Result<&Arc<dyn Store>, StoreUnavailable> {
    opened(slot)
        .await
        .ok_or_else(|| StoreUnavailable("the store is still opening".into()))
}

/// Cached key and account lookups, shared by every plugin of the gateway.
pub struct StoreCache {
    slot: StoreSlot,
    keys: Cache<[u8; 32], Option<KeyGrant>>,
    accounts: Cache<String, Option<bool>>,
    /// Key ids used since the last flush of `last_used_at`.
    used: Mutex<HashSet<String>>,
    /// Moves on every change notice (see the module docs).
    generation: AtomicU64,
}

/// Why a cold key lookup cached nothing.
#[derive(Debug, Clone)]
enum Uncached {
    Unavailable(StoreUnavailable),
    /// A change notice arrived while the key was read: what was read may predate it.
    Raced,
}

impl StoreCache {
    pub fn new(slot: StoreSlot) -> Arc<StoreCache> {
        Arc::new(StoreCache {
            slot,
            keys: Cache::builder()
                .max_capacity(1_000_000)
                .expire_after(TtlByOutcome)
                .build(),
            accounts: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(POSITIVE_TTL)
                .build(),
            used: Mutex::new(HashSet::new()),
            generation: AtomicU64::new(0),
        })
    }

    pub fn slot(&self) -> &StoreSlot {
        &self.slot
    }

    /// Apply a change notice.
    pub async fn apply(&self, event: &StoreEvent) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        match event {
            StoreEvent::Key(digest) => self.keys.invalidate(digest).await,
            StoreEvent::Account(id) => {
                self.accounts.invalidate(id).await;
                // Keys carry their account's status: drop them all (status changes are rare).
                self.keys.invalidate_all();
            }
            StoreEvent::Wallet(_) => {}
            StoreEvent::Resync => {
                self.keys.invalidate_all();
                self.accounts.invalidate_all();
            }
        }
    }

    /// Key ids used since the last call (for a batched `last_used_at` update).
    pub fn take_used(&self) -> Vec<String> {
        self.used.lock().map(|mut u| u.drain().collect()).unwrap_or_default()
    }
}

/// Found keys live [`POSITIVE_TTL`], misses [`NEGATIVE_TTL`].
struct TtlByOutcome;

impl moka::Expiry<[u8; 32], Option<KeyGrant>> for TtlByOutcome {
    fn expire_after_create(&self, _: &[u8; 32], value: &Option<KeyGrant>, _: std::time::Instant) -> Option<Duration> {
        Some(if value.is_some() { POSITIVE_TTL } else { NEGATIVE_TTL })
    }
}

impl StoreCache {
    /// A key's grant: from the cache, or read with `read` and cached unless a change notice
    /// arrived meanwhile (then read again, after the change, and not cached).
    async fn grant<F, Fut>(&self, digest: [u8; 32], read: F) -> Result<Option<KeyGrant>, StoreUnavailable>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<KeyGrant>, StoreUnavailable>>,
    {
        let cached = self
            .keys
            .try_get_with(digest, async {
                let before = self.generation.load(Ordering::Acquire);
                let grant = read().await.map_err(Uncached::Unavailable)?;
                if self.generation.load(Ordering::Acquire) != before {
                    return Err(Uncached::Raced);
                }
                Ok(grant)
            })
            .await;
        match cached {
            Ok(grant) => Ok(grant),
            Err(e) => match &*e {
                Uncached::Unavailable(e) => Err(e.clone()),
                Uncached::Raced => read().await,
            },
        }
    }
}

#[async_trait]
impl KeyLookup for StoreCache {
    async fn lookup(&self, digest: [u8; 32]) -> Result<Option<KeyGrant>, StoreUnavailable> {
        let grant = self
            .grant(digest, || async {
                let record = store(&self.slot).await?.find_key(digest).await.map_err(unavailable)?;
                Ok(record.map(|r| KeyGrant {
                    principal: Principal {
                        account_id: r.key.account_id,
                        key_id: r.key.id,
                        allowed_models: r.key.allowed_models,
                        rpm_limit: r.key.rpm_limit,
                        tpm_limit: r.key.tpm_limit,
                        prepaid: true,
                    },
                    expires_at: r.key.expires_at.map(|t| t.timestamp()),
                    revoked: r.key.revoked_at.is_some(),
                    account_active: r.account_status == AccountStatus::Active,
                }))
            })
            .await?;
        if let Some(g) = &grant {
            if let Ok(mut used) = self.used.lock() {
                if !used.contains(&g.principal.key_id) {
                    used.insert(g.principal.key_id.clone());
                }
            }
        }
        Ok(grant)
    }
}

#[async_trait]
impl AccountLookup for StoreCache {
    async fn account_active(&self, account_id: &str) -> Result<Option<bool>, StoreUnavailable> {
        self.accounts
            .try_get_with(account_id.to_owned(), async {
                match store(&self.slot).await?.get_account(account_id).await {
                    Ok(a) => Ok(Some(a.status == AccountStatus::Active)),
                    Err(StoreError::NotFound(_)) => Ok(None),
                    Err(e) => Err(unavailable(e)),
                }
            })
            .await
            .map_err(|e: Arc<StoreUnavailable>| (*e).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn grant(revoked: bool) -> Option<KeyGrant> {
        Some(KeyGrant {
            principal: Principal::default(),
            expires_at: None,
            revoked,
            account_active: true,
        })
    }

    #[tokio::test]
    async fn a_key_revoked_during_its_cold_lookup_is_not_cached_as_valid() {
        let cache = StoreCache::new(StoreSlot::default());
        let digest = [7u8; 32];
        let reads = AtomicUsize::new(0);
        // The first read sees the key before its revocation, whose notice lands before the read
        // returns; the store says revoked from then on.
        let read = || async {
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                cache.apply(&StoreEvent::Key(digest)).await;
                return Ok(grant(false));
            }
            Ok(grant(true))
        };
        let first = cache.grant(digest, read).await.unwrap().unwrap();
        assert!(first.revoked, "read again after the notice");
        let again = cache.grant(digest, read).await.unwrap().unwrap();
        assert!(again.revoked);
        assert_eq!(reads.load(Ordering::SeqCst), 3, "the raced read was not cached");
        // Without a notice in between, the answer is cached.
        cache.grant(digest, read).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }
}
