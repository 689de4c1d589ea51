//! Accounts' own provider keys (BYOK): a request of an account that brought a key for a
//! provider goes to that provider with the account's key instead of the operator's.
//!
//! Keys are sealed in the store (`secrets.rs`) and opened here, on first use, with the master
//! key; opened keys are kept in memory for [`KEY_TTL`] so a warm request costs no store round
//! trip. A key set, replaced or deleted through the admin API takes effect within that time on
//! every instance. A key that cannot be opened (a master key rotated away) is logged and the
//! request is refused rather than sent with the operator's key on the account's behalf; a store
//! that cannot be reached is not a reason to refuse (see [`AccountKeys::key_for`]).

use crate::secrets::MasterKeys;
use crate::store::cache::StoreSlot;
use komilion_sdk::{ApiError, ErrorKind};
use moka::future::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an opened key (or the absence of one) is trusted.
pub const KEY_TTL: Duration = Duration::from_secs(30);
/// How long a key read once keeps serving while the store cannot be reached.
pub const STALE_TTL: Duration = Duration::from_secs(3600);
/// Accounts' keys kept opened in memory at most.
const MAX_CACHED: u64 = 100_000;

/// A provider key an account brought. Never printed.
#[derive(Clone)]
pub struct AccountKey(Arc<str>);

impl AccountKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountKey(…)")
    }
}

pub struct AccountKeys {
    slot: StoreSlot,
    master: Arc<MasterKeys>,
    /// (account, provider) → the account's key for it, if any, and when it was read.
    cache: Cache<(String, String), Looked>,
}

#[derive(Clone)]
struct Looked {
    key: Option<AccountKey>,
    at: Instant,
}

/// Why a key could not be read.
enum Unread {
    /// The store did not answer: the last known answer stands, or the operator's key.
    Unavailable(String),
    /// The key is there but cannot be used: the request is refused.
    Unusable(ApiError),
}

impl AccountKeys {
    pub fn new(slot: StoreSlot, master: Arc<MasterKeys>) -> AccountKeys {
        AccountKeys {
            slot,
            master,
            cache: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(STALE_TTL)
                .build(),
        }
    }

    /// The account's own key for `provider`, or None to use the operator's.
    ///
    /// While the store is down, the last key read (up to [`STALE_TTL`] old) stays in use; an
    /// account never read before gets the operator's key, and its wallet pays for the request
    /// as for any other: nobody is served at someone else's expense, and the outage costs no
    /// availability, as for the rest of the request path.
    pub async fn key_for(self: &Arc<Self>, account_id: &str, provider: &str) -> Result<Option<AccountKey>, ApiError> {
        let id = (account_id.to_owned(), provider.to_owned());
        let known = self.cache.get(&id).await;
        if let Some(known) = known {
            if known.at.elapsed() >= KEY_TTL {
                // Read it again off the request path; meanwhile (and if the store does not
                // answer) the known key serves. Marking it fresh first keeps one read in flight.
                let fresh = Looked {
                    key: known.key.clone(),
                    at: Instant::now(),
                };
                self.cache.insert(id.clone(), fresh).await;
                let this = self.clone();
                tokio::spawn(async move {
                    let (account_id, provider) = (&id.0, &id.1);
                    match this.read(account_id, provider).await {
                        Ok(key) => {
                            this.cache
                                .insert(
                                    id.clone(),
                                    Looked {
                                        key,
                                        at: Instant::now(),
                                    },
                                )
                                .await
                        }
                        Err(Unread::Unusable(_)) => this.cache.invalidate(&id).await,
                        Err(Unread::Unavailable(why)) => tracing::warn!(
                            account_id,
                            provider,
                            "cannot read the account's provider key again, the known one serves: {why}"
                        ),
                    }
                });
            }
            return Ok(known.key);
        }
        match self.read(account_id, provider).await {
            Ok(key) => {
                self.cache
                    .insert(
                        id,
                        Looked {
                            key: key.clone(),
                            at: Instant::now(),
                        },
                    )
                    .await;
                Ok(key)
            }
            Err(Unread::Unusable(e)) => Err(e),
            Err(Unread::Unavailable(why)) => {
                tracing::warn!(
                    account_id,
                    provider,
                    "cannot read the account's provider key, the operator's serves: {why}"
                );
                Ok(None)
            }
        }
    }

    async fn read(&self, account_id: &str, provider: &str) -> Result<Option<AccountKey>, Unread> {
        let store = crate::store::cache::opened(&self.slot)
            .await
            .ok_or_else(|| Unread::Unavailable("the store is still opening".into()))?;
        let sealed = store
            .get_provider_key(account_id, provider)
            .await
            .map_err(|e| Unread::Unavailable(e.to_string()))?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let unusable = |why: &str| {
            Unread::Unusable(
                ApiError::new(
                    ErrorKind::Internal,
                    format!("The account's key for this provider cannot be used ({why}); the operator has been told."),
                )
                .with_code("provider_key_unusable"),
            )
        };
        let plain = self.master.open(&sealed, account_id, provider).map_err(|e| {
            tracing::error!(account_id, provider, "cannot open the account's provider key: {e}");
            unusable("it does not open with the configured master keys")
        })?;
        let text = String::from_utf8(plain).map_err(|_| unusable("it is not text"))?;
        Ok(Some(AccountKey(text.into())))
    }
}
