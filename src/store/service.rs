//! The store's background service. It opens the store in its own runtime (after Pingora's daemon
//! fork) and publishes it, then keeps the slow work off the request path:
//!
//! - change notices → caches and wallet leases (every second at most);
//! - the usage batcher (spool → store) every 200 ms;
//! - wallet leases: return idle ones, renew busy ones, reclaim those of vanished instances;
//! - alert webhooks from the outbox, retried with backoff;
//! - `last_used_at` of keys, batched; retention of the usage log.
//!
//! At shutdown it drains the spool and returns every lease before the runtime stops.

use super::cache::StoreCache;
use super::{open, Store, StoreEvent};
use crate::billing::wallet::WalletBook;
use crate::config::Alerts;
use crate::metrics::METRICS;
use crate::usage::batcher::UsageBatcher;
use crate::usage::spool::UsageSpool;
use async_trait::async_trait;
use chrono::Utc;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How often `last_used_at` of used keys is written (one batched UPDATE).
const TOUCH_EVERY: Duration = Duration::from_secs(30);
/// How often the spool is flushed to disk and drained into the store.
const DRAIN_EVERY: Duration = crate::usage::spool::FSYNC_EVERY;
/// How often expired leases of other instances are looked for.
const RECLAIM_EVERY: Duration = Duration::from_secs(30);
/// How often old usage is purged.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// How long shutdown may spend draining the spool.
const FINAL_DRAIN: Duration = Duration::from_secs(3);

pub struct StoreService {
    pub url: String,
    /// How long requests under way may take to finish at shutdown before the last drain.
    pub grace: Duration,
    pub cache: Arc<StoreCache>,
    /// Wallets and the usage log (absent when only keys are stored).
    pub billing: Option<BillingWork>,
    pub alerts: Option<Alerts>,
    pub retention_days: u32,
}

pub struct BillingWork {
    pub wallets: Arc<WalletBook>,
    pub spool: Arc<UsageSpool>,
    pub batch_size: usize,
}

impl StoreService {
    async fn apply(&self, event: StoreEvent) {
        self.cache.apply(&event).await;
        let Some(billing) = &self.billing else { return };
        match &event {
            StoreEvent::Wallet(account) => billing.wallets.wallet_changed(account),
            StoreEvent::Account(account) => {
                billing.wallets.wallet_changed(account);
                if let Err(e) = billing.wallets.release_account(account).await {
                    tracing::warn!(account, "cannot return the lease of a changed account: {e}");
                }
            }
            StoreEvent::Resync => billing.wallets.resync(),
            StoreEvent::Key(_) => {}
        }
    }
}

/// The state of the usage writes, so an outage is logged when it starts, every minute while it
/// lasts, and when it ends, instead of at every drain tick.
#[derive(Default)]
struct Trouble {
    since: Option<std::time::Instant>,
    logged: Option<std::time::Instant>,
}

impl Trouble {
    const REPEAT: Duration = Duration::from_secs(60);

    fn seen(&mut self, e: &crate::usage::batcher::BatchError) {
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.logged.is_none_or(|t| now.duration_since(t) >= Self::REPEAT) {
            self.logged = Some(now);
            tracing::warn!(
                "usage not yet written to the store for {}s (kept in the spool): {e}",
                now.duration_since(since).as_secs()
            );
        }
    }

    fn over(&mut self) {
        if let Some(since) = self.since.take() {
            self.logged = None;
            tracing::info!("usage reaches the store again after {}s", since.elapsed().as_secs());
        }
    }
}

async fn send_alerts(store: &dyn Store, alerts: &Alerts, client: &reqwest::Client) {
    let Ok(due) = store.due_alerts(20).await else { return };
    for alert in due {
        let delivered = client
            .post(&alerts.webhook_url)
            .header("content-type", "application/json")
            .body(alert.payload.clone())
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if delivered {
            METRICS.alerts.with_label_values(&["delivered"]).inc();
            let _ = store.alert_delivered(alert.id).await;
        } else {
            METRICS.alerts.with_label_values(&["failed"]).inc();
            // 1 s, 2 s, 4 s, … up to an hour.
            let delay = Duration::from_secs(1u64 << alert.attempts.clamp(0, 12) as u32).min(Duration::from_secs(3600));
            let _ = store.alert_failed(alert.id, delay).await;
        }
    }
}

#[async_trait]
impl BackgroundService for StoreService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let store = loop {
            match open(&self.url).await {
                Ok(store) => break store,
                Err(e) => {
                    tracing::error!("cannot open the store: {e}; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let mut events = store.subscribe();
        // Anything cached before the store opened (only failures) is stale now.
        self.cache.apply(&StoreEvent::Resync).await;
        let _ = self.cache.slot().set(store.clone());
        tracing::info!(backend = store.backend(), "store ready");

        let rules = self.alerts.as_ref().map(|a| a.rules.clone()).unwrap_or_default();
        let mut batcher = self
            .billing
            .as_ref()
            .map(|b| UsageBatcher::new(b.spool.clone(), b.batch_size, rules));
        let mut store_trouble = Trouble::default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let mut touch = tokio::time::interval(TOUCH_EVERY);
        let mut drain = tokio::time::interval(DRAIN_EVERY);
        let mut second = tokio::time::interval(Duration::from_secs(1));
        let mut reclaim = tokio::time::interval(RECLAIM_EVERY);
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        for tick in [&mut touch, &mut drain, &mut second, &mut reclaim, &mut retention] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    Ok(event) => self.apply(event).await,
                    Err(RecvError::Lagged(_)) => self.apply(StoreEvent::Resync).await,
                    Err(RecvError::Closed) => break,
                },
                _ = drain.tick() => {
                    if let Some(billing) = &self.billing {
                        billing.spool.sync();
                        billing.spool.check();
                    }
                    if let Some(batcher) = batcher.as_mut() {
                        match batcher.drain(store.as_ref()).await {
                            Ok(_) => store_trouble.over(),
                            Err(e) => store_trouble.seen(&e),
                        }
                        batcher.observe();
                    }
                }
                _ = second.tick() => {
                    if let Some(billing) = &self.billing {
                        if let Err(e) = billing.wallets.maintain().await {
                            METRICS.store_errors.with_label_values(&["lease"]).inc();
                            tracing::warn!("wallet lease upkeep failed: {e}");
                        }
                        METRICS.active_leases.set(billing.wallets.active_leases() as i64);
                    }
                    if let Some(alerts) = &self.alerts {
                        send_alerts(store.as_ref(), alerts, &client).await;
                    }
                }
                _ = reclaim.tick() => {
                    if let Some(billing) = &self.billing {
                        match store.reclaim_expired_leases(billing.wallets.settings().reclaim_grace).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!("reclaimed {n} expired wallet leases"),
                            Err(e) => tracing::warn!("cannot reclaim expired leases: {e}"),
                        }
                    }
                }
                _ = retention.tick() => {
                    let before = Utc::now() - chrono::Duration::days(self.retention_days as i64);
                    match store.purge_usage(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!("purged {n} usage records older than {} days", self.retention_days),
                        Err(e) => tracing::warn!("usage retention failed: {e}"),
                    }
                }
                _ = touch.tick() => {
                    let used = self.cache.take_used();
                    if !used.is_empty() {
                        if let Err(e) = store.touch_keys(&used, Utc::now()).await {
                            tracing::warn!("cannot record key use: {e}");
                        }
                    }
                }
            }
        }
        // Shutdown: requests still under way finish first (within the grace period), then
        // everything spooled goes to the store and every lease goes back.
        if let Some(billing) = &self.billing {
            let deadline = tokio::time::Instant::now() + self.grace;
            while METRICS.in_flight.get() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            billing.spool.sync();
            billing.spool.check();
            if let Some(batcher) = batcher.as_mut() {
                match tokio::time::timeout(FINAL_DRAIN, batcher.drain(store.as_ref())).await {
                    Ok(Ok(_)) => {}
                    _ => tracing::warn!("usage left in the spool at shutdown; it is written at the next start"),
                }
            }
            // A successor (graceful upgrade) drains from here on, without waiting for this
            // process to exit. Records of requests that outlive the grace period stay in this
            // process's segment, which the successor reads once this process is gone.
            billing.spool.release_reader();
            if let Err(e) = billing.wallets.return_all().await {
                tracing::warn!("leases not returned at shutdown (reclaimed after they expire): {e}");
            }
        }
        let used = self.cache.take_used();
        if !used.is_empty() {
            let _ = store.touch_keys(&used, Utc::now()).await;
        }
    }
}
