//! Prepaid wallets without a store round trip per request.
//!
//! Each instance leases a slice of an account's wallet from the store (one atomic conditional
//! update that moves money out of the wallet into the lease) and spends it locally: a request
//! holds its maximum possible cost before it is forwarded, and settles its real cost after. The
//! unspent part of a lease goes back to the wallet when the lease has been idle for
//! [`WalletSettings::idle_return`], when its account is disabled, and at shutdown. A wallet
//! therefore never goes below zero, whatever the concurrency and the number of instances, and
//! every nano-dollar that leaves it is either returned or recorded as a request's cost.
//!
//! Sizing ([`crate::store::lease_grant`]): a lease takes a quarter of the wallet's unleased
//! balance, at least what the request needs and at most [`WalletSettings::lease_max`]. So one
//! instance can serve an account through a store outage on its lease, and N instances serving
//! one account each get a share. Worst case, a crashed instance strands at most `lease_max` (and
//! never more than a quarter of the balance at each lease) per account it served, until its
//! leases expire (`lease_ttl`) and are reclaimed (`reclaim_grace` later): reclaiming keeps what
//! the usage log shows spent and returns the rest.

use crate::store::cache::StoreSlot;
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct WalletSettings {
    /// Output tokens assumed for a request without `max_tokens` (capped by the model's limit).
    pub max_output_tokens: u64,
    /// Largest lease per account and instance, nano-USD.
    pub lease_max: i64,
    /// Lease lifetime in the store; renewed while in use.
    pub lease_ttl: Duration,
    /// A lease with nothing held for this long goes back to the wallet.
    pub idle_return: Duration,
    /// Leases expired this long (their instance is gone) are reclaimed by any instance.
    pub reclaim_grace: Duration,
}

impl Default for WalletSettings {
    fn default() -> Self {
        WalletSettings {
            max_output_tokens: 8192,
            lease_max: 5 * crate::money::NANOS_PER_USD,
            lease_ttl: Duration::from_secs(30),
            idle_return: Duration::from_secs(10),
            reclaim_grace: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    #[error("the wallet cannot cover this request")]
    Insufficient,
    #[error("the account is disabled")]
    Disabled,
    #[error("{0}")]
    Unavailable(String),
}

/// Money set aside for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub account_id: String,
    pub amount: i64,
}

/// What settling a request did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settlement {
    pub lease_id: Option<String>,
    /// Cost taken from the lease.
    pub billed: i64,
    /// Cost the lease could not cover (only if the real cost exceeded the hold).
    pub unbilled: i64,
}

#[derive(Debug, Default)]
struct LeaseState {
    lease_id: Option<String>,
    granted: i64,
    spent: i64,
    held: i64,
    last_used: Option<Instant>,
    /// When the store's expiry was last pushed forward.
    renewed: Option<Instant>,
    /// The store could not cover a request: what it still had unleased then, and when. For a
    /// moment (or until a top-up is announced) a hold larger than that plus the local lease is
    /// refused without asking the store again; a smaller one still asks.
    refused: Option<(i64, Instant)>,
}

/// How long a refusal from the store answers for it: other instances return idle leases to the
/// wallet without announcing it, so a refusal is only trusted briefly.
const REFUSAL_MEMORY: Duration = Duration::from_secs(1);

impl LeaseState {
    fn available(&self) -> i64 {
        self.granted - self.spent - self.held
    }
}

#[derive(Default)]
struct AccountBook {
    state: Mutex<LeaseState>,
    /// One lease request at a time per account.
    refill: tokio::sync::Mutex<()>,
}

impl AccountBook {
    fn try_hold(&self, amount: i64) -> Option<bool> {
        let mut s = self.state.lock().ok()?;
        if s.available() >= amount {
            s.held += amount;
            s.last_used = Some(Instant::now());
            Some(true)
        } else {
            Some(false)
        }
    }
}

/// This instance's leases, by account.
pub struct WalletBook {
    store: StoreSlot,
    instance_id: String,
    settings: WalletSettings,
    accounts: Mutex<HashMap<String, Arc<AccountBook>>>,
    /// Leases taken out of the book whose return to the store failed; retried first next time
    /// (settling a lease is idempotent).
    unreturned: Mutex<Vec<(String, i64)>>,
}

impl WalletBook {
    pub fn new(store: StoreSlot, instance_id: String, settings: WalletSettings) -> WalletBook {
        WalletBook {
            store,
            instance_id,
            settings,
            accounts: Mutex::new(HashMap::new()),
            unreturned: Mutex::new(Vec::new()),
        }
    }

    pub fn settings(&self) -> &WalletSettings {
        &self.settings
    }

    fn book(&self, account_id: &str) -> Arc<AccountBook> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts.entry(account_id.to_owned()).or_default().clone()
    }

    /// Set aside `amount` for a request, leasing more from the store only when the local lease
    /// cannot cover it.
    pub async fn hold(&self, account_id: &str, amount: i64) -> Result<Hold, WalletError> {
        let amount = amount.max(0);
        let hold = Hold {
            account_id: account_id.to_owned(),
            amount,
        };
        let book = self.book(account_id);
        if book.try_hold(amount) == Some(true) {
            return Ok(hold);
        }
        let _one_at_a_time = book.refill.lock().await;
        if book.try_hold(amount) == Some(true) {
            return Ok(hold);
        }
        let (lease_id, available) = {
            let s = book
                .state
                .lock()
                .map_err(|_| WalletError::Unavailable("wallet lock poisoned".into()))?;
            let known_short = s
                .refused
                .is_some_and(|(unleased, at)| at.elapsed() < REFUSAL_MEMORY && amount > s.available() + unleased);
            if known_short {
                return Err(WalletError::Insufficient);
            }
            (s.lease_id.clone(), s.available())
        };
        let store = crate::store::cache::opened(&self.store)
            .await
            .ok_or_else(|| WalletError::Unavailable("the store is still opening".into()))?;
        let min = (amount - available).max(1);
        let want = self.settings.lease_max.max(min);
        let grant = store
            .lease(
                account_id,
                &self.instance_id,
                lease_id.as_deref(),
                min,
                want,
                self.settings.lease_ttl,
            )
            .await
            .map_err(|e| match e {
                StoreError::Invalid(_) => WalletError::Disabled,
                StoreError::NotFound(_) => WalletError::Insufficient,
                other => WalletError::Unavailable(other.to_string()),
            })?;
        let mut s = book
            .state
            .lock()
            .map_err(|_| WalletError::Unavailable("wallet lock poisoned".into()))?;
        if grant.granted_nano_usd > 0 {
            if s.lease_id.as_ref().is_some_and(|old| *old != grant.lease_id) {
                // Our old lease was settled elsewhere (reclaimed after it expired), which
                // already gave its rest back: count from the new lease alone, in-flight holds
                // included, so the final settle reports only what this lease paid for.
                s.granted = s.held;
                s.spent = 0;
            }
            s.lease_id = Some(grant.lease_id);
            s.granted += grant.granted_nano_usd;
            s.renewed = Some(Instant::now());
        }
        if s.available() >= amount {
            s.held += amount;
            s.last_used = Some(Instant::now());
            s.refused = None;
            Ok(hold)
        } else {
            // Only this request is refused: a smaller one may still fit in what is left.
            s.refused = Some((grant.balance_nano_usd.max(0), Instant::now()));
            Err(WalletError::Insufficient)
        }
    }

    /// Release a hold and take the real cost from the lease.
    pub fn settle(&self, hold: &Hold, cost: i64) -> Settlement {
        let book = self.book(&hold.account_id);
        let Ok(mut s) = book.state.lock() else {
            return Settlement {
                unbilled: cost,
                ..Default::default()
            };
        };
        s.held = (s.held - hold.amount).max(0);
        let billed = cost.clamp(0, s.available().max(0));
        s.spent += billed;
        s.last_used = Some(Instant::now());
        Settlement {
            lease_id: s.lease_id.clone(),
            billed,
            unbilled: cost - billed,
        }
    }

    /// A top-up was announced: the account may lease again.
    pub fn wallet_changed(&self, account_id: &str) {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(book) = accounts.get(account_id) {
            if let Ok(mut s) = book.state.lock() {
                s.refused = None;
            }
        }
    }

    /// Forget every remembered refusal (after missed notifications).
    pub fn resync(&self) {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        for book in accounts.values() {
            if let Ok(mut s) = book.state.lock() {
                s.refused = None;
            }
        }
    }

    /// Leases to return now: idle ones (or all, at shutdown, or one account's). Each is taken
    /// out of the book; `(lease_id, spent)`.
    fn take_returnable(&self, all: bool, only: Option<&str>) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts.retain(|account_id, book| {
            if only.is_some_and(|o| o != account_id) {
                return true;
            }
            // A request between `book()` and its hold (maybe awaiting a lease from the store)
            // still has this book: dropping it now would strand whatever the store grants.
            if Arc::strong_count(book) > 1 {
                return true;
            }
            let Ok(mut s) = book.state.lock() else { return true };
            let idle = s.last_used.is_none_or(|t| t.elapsed() >= self.settings.idle_return);
            if s.held > 0 || !(all || only.is_some() || idle) {
                return true;
            }
            if let Some(id) = s.lease_id.take() {
                out.push((id, s.spent));
            }
            *s = LeaseState::default();
            false
        });
        out
    }

    /// Settle `leases` in the store, after any earlier returns that failed. What fails stays
    /// queued for the next call, so a store hiccup never strands a lease until it expires.
    async fn give_back(&self, store: &dyn Store, leases: Vec<(String, i64)>) -> Result<(), StoreError> {
        let mut queue = std::mem::take(&mut *self.unreturned.lock().unwrap_or_else(|p| p.into_inner()));
        queue.extend(leases);
        let mut pending = queue.into_iter();
        while let Some((lease_id, spent)) = pending.next() {
            match store.settle_lease(&lease_id, spent).await {
                Ok(_) => {}
                // Gone from the store (erased with its account): nothing left to return.
                Err(StoreError::NotFound(_)) => tracing::warn!(lease_id, "a lease to return no longer exists"),
                Err(e) => {
                    let mut unreturned = self.unreturned.lock().unwrap_or_else(|p| p.into_inner());
                    unreturned.push((lease_id, spent));
                    unreturned.extend(pending);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Return idle leases, renew busy ones. Called every second by the store service.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        let Some(store) = self.store.get() else { return Ok(()) };
        self.give_back(store.as_ref(), self.take_returnable(false, None))
            .await?;
        let renew: Vec<String> = {
            let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
            accounts
                .values()
                .filter_map(|book| {
                    let mut s = book.state.lock().ok()?;
                    let due = s.renewed.is_none_or(|t| t.elapsed() >= self.settings.lease_ttl / 3);
                    if !due {
                        return None;
                    }
                    s.renewed = Some(Instant::now());
                    s.lease_id.clone()
                })
                .collect()
        };
        for lease_id in renew {
            store.extend_lease(&lease_id, self.settings.lease_ttl).await?;
        }
        Ok(())
    }

    /// The account was disabled: give its money back now.
    pub async fn release_account(&self, account_id: &str) -> Result<(), StoreError> {
        let Some(store) = self.store.get() else { return Ok(()) };
        self.give_back(store.as_ref(), self.take_returnable(false, Some(account_id)))
            .await
    }

    /// Shutdown: return every lease.
    pub async fn return_all(&self) -> Result<(), StoreError> {
        let Some(store) = self.store.get() else { return Ok(()) };
        self.give_back(store.as_ref(), self.take_returnable(true, None)).await
    }

    /// Leases this instance holds (for the metric).
    pub fn active_leases(&self) -> usize {
        let accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        accounts
            .values()
            .filter(|b| b.state.lock().is_ok_and(|s| s.lease_id.is_some()))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    async fn book_with(balance_usd: &str) -> (tempfile::TempDir, Arc<dyn Store>, WalletBook, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let store = crate::store::open(&url).await.unwrap();
        let account = store.create_account("w", "w@example.com").await.unwrap();
        store
            .credit(
                &account.id,
                crate::money::parse_usd(balance_usd).unwrap(),
                "admin",
                "seed",
            )
            .await
            .unwrap();
        let slot: StoreSlot = Default::default();
        let _ = slot.set(store.clone());
        let settings = WalletSettings {
            lease_max: 1_000,
            idle_return: Duration::ZERO,
            ..Default::default()
        };
        (dir, store, WalletBook::new(slot, "i1".into(), settings), account.id)
    }

    #[tokio::test]
    async fn holds_lease_locally_and_settle_exactly() {
        let (_dir, store, book, account) = book_with("0.000005").await; // 5,000 nano-USD
        let h = book.hold(&account, 100).await.unwrap();
        // One lease of lease_max (a quarter of 5,000 is more); the next holds need no store.
        assert_eq!(store.wallet(&account).await.unwrap().leased_nano_usd, 1_000);
        let h2 = book.hold(&account, 100).await.unwrap();
        let s = book.settle(&h, 60);
        assert_eq!((s.billed, s.unbilled), (60, 0));
        assert!(s.lease_id.is_some());
        book.settle(&h2, 40);
        book.return_all().await.unwrap();
        let w = store.wallet(&account).await.unwrap();
        assert_eq!(w.balance_nano_usd, 5_000 - 100, "60 + 40 spent, the rest returned");
        assert_eq!(w.leased_nano_usd, 0);
    }

    #[tokio::test]
    async fn upkeep_keeps_a_book_that_a_request_is_still_using() {
        let (_dir, store, book, account) = book_with("0.000005").await;
        // A request has its book and is about to lease (the store call may take a while).
        let in_flight = book.book(&account);
        book.maintain().await.unwrap();
        let h = book.hold(&account, 100).await.unwrap();
        assert!(
            Arc::ptr_eq(&in_flight, &book.book(&account)),
            "a grant landing in a dropped book would be stranded"
        );
        drop(in_flight);
        book.settle(&h, 100);
        book.maintain().await.unwrap();
        let w = store.wallet(&account).await.unwrap();
        assert_eq!((w.balance_nano_usd, w.leased_nano_usd), (5_000 - 100, 0));
    }

    #[tokio::test]
    async fn a_hold_the_wallet_cannot_cover_is_refused_alone() {
        let (_dir, store, book, account) = book_with("0.000001").await; // 1,000 nano-USD
        assert_eq!(book.hold(&account, 5_000).await, Err(WalletError::Insufficient));
        // Remembered for a moment: no store round trip for the same refusal...
        assert_eq!(book.hold(&account, 5_000).await, Err(WalletError::Insufficient));
        // ...but a request the wallet can cover goes through at once.
        let small = book.hold(&account, 400).await.unwrap();
        book.settle(&small, 400);
        store.credit(&account, 10_000, "admin", "top").await.unwrap();
        // A top-up, once announced, is used at once.
        book.wallet_changed(&account);
        assert!(book.hold(&account, 5_000).await.is_ok());
    }

    #[tokio::test]
    async fn a_disabled_account_cannot_lease() {
        let (_dir, store, book, account) = book_with("1").await;
        store
            .set_account_status(&account, crate::store::AccountStatus::Disabled)
            .await
            .unwrap();
        assert_eq!(book.hold(&account, 10).await, Err(WalletError::Disabled));
    }
}
