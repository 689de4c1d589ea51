//! Moves spooled usage records into the store, a batch at a time, and only then moves the
//! spool's committed position. A batch that fails stays in the spool and is tried again; one
//! that was written but not yet marked committed (a crash in between) is written again, and the
//! store skips request ids it already has.

use super::spool::{SpoolError, SpoolReader, UsageSpool};
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
    reader: SpoolReader,
    batch_size: usize,
    rules: AlertRules,
}

impl UsageBatcher {
    pub fn new(spool: Arc<UsageSpool>, batch_size: usize, rules: AlertRules) -> Result<UsageBatcher, SpoolError> {
        let reader = SpoolReader::open(spool.dir())?;
        Ok(UsageBatcher {
            spool,
            reader,
            batch_size: batch_size.max(1),
            rules,
        })
    }

    /// Write one batch. Returns how many records it held (0: nothing pending).
    pub async fn drain_once(&mut self, store: &dyn Store) -> Result<usize, BatchError> {
        let batch = self.reader.read(self.batch_size, self.spool.writing_segment())?;
        if batch.next == self.reader.position() {
            return Ok(0);
        }
        let n = batch.records.len();
        if n > 0 {
            let written = store.insert_usage(&batch.records, &self.rules).await.inspect_err(|_| {
                METRICS.store_errors.with_label_values(&["usage"]).inc();
            })?;
            METRICS.usage_written.inc_by(written);
        }
        self.reader.commit(batch.next)?;
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
        let (bytes, oldest) = self.reader.backlog();
        METRICS.spool_depth.set(bytes as i64);
        let age = oldest.map_or(0.0, |t| {
            (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        METRICS.spool_age.set(age);
    }
}
