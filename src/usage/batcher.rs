//! Moves spooled usage records into the store, a batch at a time, and only then moves the
//! spool's committed position. A batch that fails because the store is down stays in the spool
//! and is tried again; one that was written but not yet marked committed (a crash in between) is
//! written again, and the store skips request ids it already has.
//!
//! A batch the store refuses for its content ([`StoreError::Rejected`]: a value out of its
//! bounds, a byte its text type cannot hold) is split in halves until the refused records are
//! alone; each of those goes to the spool's dead-letter file (with a metric and one error log
//! line) and everything else is written. One bad record never holds up the records behind it.

use super::spool::{SpoolError, SpoolReader, UsageSpool};
use super::UsageRecord;
use crate::metrics::METRICS;
use crate::store::{AlertRules, Store, StoreError};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct UsageBatcher {
    spool: Arc<UsageSpool>,
    /// Present once this process is the spool's reader (at once, or after an upgrade's
    /// predecessor let go).
    reader: Option<SpoolReader>,
    batch_size: usize,
    rules: AlertRules,
}

impl UsageBatcher {
    pub fn new(spool: Arc<UsageSpool>, batch_size: usize, rules: AlertRules) -> UsageBatcher {
        UsageBatcher {
            spool,
            reader: None,
            batch_size: batch_size.max(1),
            rules,
        }
    }

    /// The reader, once this process holds the spool's reader role.
    fn reader(&mut self) -> Option<&mut SpoolReader> {
        if self.reader.is_none() && self.spool.try_take_reader() {
            self.reader = Some(SpoolReader::open(&self.spool));
        }
        self.reader.as_mut()
    }

    /// Write one batch. Returns how many records it held (0: nothing pending, or another
    /// process is still the reader).
    pub async fn drain_once(&mut self, store: &dyn Store) -> Result<usize, BatchError> {
        let (batch_size, rules, spool) = (self.batch_size, self.rules.clone(), self.spool.clone());
        let Some(reader) = self.reader() else {
            return Ok(0);
        };
        let batch = reader.read(batch_size, &spool)?;
        if batch.next == reader.position() {
            return Ok(0);
        }
        let n = batch.records.len();
        if n > 0 {
            let written = insert_isolating(store, &spool, &batch.records, &rules).await?;
            METRICS.usage_written.inc_by(written);
        }
        reader.commit(batch.next)?;
        Ok(n.max(1))
    }

    /// Drain what is pending, until a batch comes back short (the spool's end was reached) or a
    /// write fails. Records appended meanwhile wait for the next call rather than going out in a
    /// trickle of tiny batches: each batch is a transaction and a spool commit, so under load a
    /// drain that chased the writer would spend more on batches than on records.
    pub async fn drain(&mut self, store: &dyn Store) -> Result<usize, BatchError> {
        let mut total = 0;
        loop {
            match self.drain_once(store).await? {
                0 => return Ok(total),
                n => {
                    total += n;
                    if n < self.batch_size {
                        return Ok(total);
                    }
                }
            }
        }
    }

    /// Spool depth and age for the metrics.
    pub fn observe(&self) {
        let Some(reader) = &self.reader else { return };
        let (bytes, oldest) = reader.backlog();
        METRICS.spool_depth.set(bytes as i64);
        let age = oldest.map_or(0.0, |t| {
            (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        METRICS.spool_age.set(age);
    }
}

/// Insert `records`; when the store refuses the batch for its content, split it until each
/// refused record is alone and dead-letter those. Any other failure stops here (the caller keeps
/// the whole batch in the spool; what was already written is skipped when it is replayed).
async fn insert_isolating(
    store: &dyn Store,
    spool: &UsageSpool,
    records: &[UsageRecord],
    rules: &AlertRules,
) -> Result<u64, BatchError> {
    let mut written = 0;
    // Ranges still to write, the next on top; halves are pushed second-half first so that
    // records go in their spool order.
    let mut todo: Vec<std::ops::Range<usize>> = Vec::with_capacity(8);
    todo.push(0..records.len());
    while let Some(range) = todo.pop() {
        match store.insert_usage(&records[range.clone()], rules).await {
            Ok(n) => written += n,
            Err(StoreError::Rejected(reason)) if range.len() == 1 => {
                let record = &records[range.start];
                spool.dead_letter(record, &reason)?;
                METRICS.usage_dead_letters.inc();
                tracing::error!(
                    request_id = %record.request_id,
                    account_id = %record.account_id,
                    "the store refused a usage record ({reason}); it is kept in {}",
                    spool.dir().join(super::spool::DEAD_LETTER_FILE).display()
                );
            }
            Err(StoreError::Rejected(_)) => {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
            Err(e) => {
                METRICS.store_errors.with_label_values(&["usage"]).inc();
                return Err(e.into());
            }
        }
    }
    Ok(written)
}
