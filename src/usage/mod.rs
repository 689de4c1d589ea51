//! The usage log: one record per request, durable before the client sees the end of its
//! answer, written to the store exactly once.
//!
//! The request path appends the record to a local append-only [`spool`]; a background
//! [`batcher`] copies spooled records into the store in batches (idempotent by request id) and
//! only then moves its committed offset. A crash loses nothing: what was appended is replayed
//! at the next start, and replays are no-ops.

pub mod batcher;
pub mod export;
pub mod spool;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One request, as billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub route: String,
    pub requested_model: Option<String>,
    pub routed_model: Option<String>,
    pub provider: Option<String>,
    pub task: Option<String>,
    pub status: u16,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    /// What the request cost, in nano-USD.
    pub cost_nano_usd: i64,
    /// Part of the cost the wallet could not cover (see the wallet's lease rules).
    #[serde(default)]
    pub unbilled_nano_usd: i64,
    /// Tokens were counted by the gateway, the provider having reported none.
    pub estimated: bool,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub cache_hit: bool,
    /// The wallet lease the cost was taken from.
    pub lease_id: Option<String>,
}

/// The columns of an export, in order (CSV header and JSONL keys).
pub const EXPORT_COLUMNS: [&str; 19] = [
    "request_id",
    "created_at",
    "key_id",
    "route",
    "requested_model",
    "model",
    "provider",
    "task",
    "status",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "unbilled_nano_usd",
    "estimated",
    "latency_ms",
    "ttfb_ms",
    "cache_hit",
];
