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
    /// Microseconds since the epoch in the spool (formatting and parsing RFC 3339 cost more
    /// than the rest of the record); RFC 3339 text is still read, as older spools hold it.
    #[serde(with = "spool_time")]
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
    /// The end user the client named (OpenAI's `user`), validated at the edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
}

/// Bytes a record's text fields may hold (the store refuses more; see migration 0003).
const ROUTE_BYTES: usize = 64;
const MODEL_BYTES: usize = 256;
const NAME_BYTES: usize = 64;
const USER_BYTES: usize = 256;

impl UsageRecord {
    /// The record with every text field within the store's bounds and free of control
    /// characters. Client strings are checked at the edge already; this keeps a plugin's or a
    /// provider's string from ever making a record the store refuses.
    pub fn bounded(mut self) -> UsageRecord {
        bound(&mut self.route, ROUTE_BYTES);
        for (field, max) in [
            (&mut self.requested_model, MODEL_BYTES),
            (&mut self.routed_model, MODEL_BYTES),
            (&mut self.provider, NAME_BYTES),
            (&mut self.task, NAME_BYTES),
            (&mut self.end_user, USER_BYTES),
        ] {
            if let Some(text) = field {
                bound(text, max);
            }
        }
        self
    }
}

/// Drop control characters and cut to at most `max` bytes, on a character boundary.
fn bound(text: &mut String, max: usize) {
    if text.len() <= max && !text.chars().any(char::is_control) {
        return;
    }
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    *text = out;
}

/// The columns of an export, in order (CSV header and JSONL keys).
pub const EXPORT_COLUMNS: [&str; 20] = [
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
    "user",
];

mod spool_time {
    use chrono::{DateTime, Utc};
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_any(StoredTime)
    }

    struct StoredTime;

    impl de::Visitor<'_> for StoredTime {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("microseconds since the epoch or an RFC 3339 time")
        }

        fn visit_i64<E: de::Error>(self, us: i64) -> Result<Self::Value, E> {
            DateTime::from_timestamp_micros(us).ok_or_else(|| E::custom("timestamp out of range"))
        }

        fn visit_u64<E: de::Error>(self, us: u64) -> Result<Self::Value, E> {
            self.visit_i64(i64::try_from(us).map_err(|_| E::custom("timestamp out of range"))?)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_bounded_for_the_store() {
        let mut text = format!("gpt\0x{}", "é".repeat(200));
        bound(&mut text, 10);
        assert_eq!(text, "gptxééé", "NUL dropped, cut on a character boundary");
        let mut fine = "gpt-4o".to_owned();
        bound(&mut fine, 10);
        assert_eq!(fine, "gpt-4o");
    }

    #[test]
    fn spool_times_are_micros_and_older_text_still_reads() {
        let t = DateTime::parse_from_rfc3339("2026-11-28T20:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let record = UsageRecord {
            request_id: "r".into(),
            account_id: "a".into(),
            key_id: None,
            created_at: t,
            route: "chat_completions".into(),
            requested_model: None,
            routed_model: None,
            provider: None,
            task: None,
            status: 200,
            input_tokens: 1,
            output_tokens: 2,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_nano_usd: 3,
            unbilled_nano_usd: 0,
            estimated: false,
            latency_ms: 4,
            ttfb_ms: None,
            cache_hit: false,
            lease_id: None,
            end_user: None,
        };
        let line = serde_json::to_string(&record).unwrap();
        assert!(line.contains(r#""created_at":1795896000123456"#), "{line}");
        assert_eq!(serde_json::from_str::<UsageRecord>(&line).unwrap(), record);
        let older = line.replace("1795896000123456", r#""2026-11-28T20:00:00.123456Z""#);
        assert_eq!(serde_json::from_str::<UsageRecord>(&older).unwrap(), record);
    }
}
