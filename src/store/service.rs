//! The store's background service: opens the store in its own runtime (after Pingora's daemon
//! fork), publishes it, applies change notices to the caches, and flushes key usage times.

use super::cache::StoreCache;
use super::{open, StoreEvent};
use async_trait::async_trait;
use chrono::Utc;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How often `last_used_at` of used keys is written (one batched UPDATE).
const TOUCH_EVERY: Duration = Duration::from_secs(30);

pub struct StoreService {
    pub url: String,
    pub cache: Arc<StoreCache>,
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
        let mut touch = tokio::time::interval(TOUCH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    Ok(event) => self.cache.apply(&event).await,
                    Err(RecvError::Lagged(_)) => self.cache.apply(&StoreEvent::Resync).await,
                    Err(RecvError::Closed) => break,
                },
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
        let used = self.cache.take_used();
        if !used.is_empty() {
            let _ = store.touch_keys(&used, Utc::now()).await;
        }
    }
}
