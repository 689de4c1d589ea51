//! The config file's format. Field docs here are the reference for operators.

use komilion_sdk::{settings_from, ConfigIssue, PluginSettings};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value as Json;

/// The whole file. Each section, and each entry of a list, is read on its own so that one bad
/// entry does not hide the problems of the others.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub listen: ListenSection,
    pub limits: LimitsSection,
    /// Each provider with its position in the file (broken entries are left out).
    pub providers: Vec<(usize, ProviderSection)>,
    /// The plugin chain, in the order the hooks run.
    pub plugins: Vec<PluginSection>,
    pub store: Option<String>,
    pub admin: Option<AdminSection>,
    pub stripe: Option<StripeSection>,
    pub usage: UsageSection,
    pub wallets: WalletsSection,
    pub alerts: Option<AlertsSection>,
    /// A catalog file replacing the embedded one.
    pub catalog: Option<String>,
    pub fallback: FallbackSection,
}

impl FileConfig {
    const SECTIONS: [&'static str; 13] = [
        "server",
        "listen",
        "limits",
        "providers",
        "plugins",
        "store",
        "admin",
        "stripe",
        "usage",
        "wallets",
        "alerts",
        "catalog",
        "fallback",
    ];

    pub fn from_json(json: &Json, issues: &mut Vec<ConfigIssue>) -> FileConfig {
        let empty = serde_json::Map::new();
        let obj = match json {
            Json::Object(obj) => obj,
            Json::Null => &empty,
            _ => {
                issues.push(ConfigIssue::new("", "the config must be a YAML mapping"));
                &empty
            }
        };
        for key in obj.keys().filter(|k| !Self::SECTIONS.contains(&k.as_str())) {
            issues.push(ConfigIssue::new(key.as_str(), "unknown key"));
        }
        FileConfig {
            server: section(obj, "server", issues),
            listen: section(obj, "listen", issues),
            limits: section(obj, "limits", issues),
            providers: list(obj, "providers", issues),
            plugins: list(obj, "plugins", issues).into_iter().map(|(_, p)| p).collect(),
            store: section(obj, "store", issues),
            admin: section(obj, "admin", issues),
            stripe: section(obj, "stripe", issues),
            usage: section(obj, "usage", issues),
            wallets: section(obj, "wallets", issues),
            alerts: section(obj, "alerts", issues),
            fallback: section(obj, "fallback", issues),
            catalog: section(obj, "catalog", issues),
        }
    }
}

/// A section; its default when it is absent or broken (the breakage is reported).
fn section<T: DeserializeOwned + Default>(
    obj: &serde_json::Map<String, Json>,
    key: &str,
    issues: &mut Vec<ConfigIssue>,
) -> T {
    match obj.get(key) {
        None => T::default(),
        Some(value) => settings_from(value).unwrap_or_else(|found| {
            issues.extend(found.into_iter().map(|i| i.under(key)));
            T::default()
        }),
    }
}

/// The good entries of a list section with their positions; each broken entry is reported.
fn list<T: DeserializeOwned>(
    obj: &serde_json::Map<String, Json>,
    key: &str,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<(usize, T)> {
    match obj.get(key) {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match settings_from(item) {
                Ok(v) => Some((i, v)),
                Err(found) => {
                    let at = format!("{key}[{i}]");
                    issues.extend(found.into_iter().map(|issue| issue.under(&at)));
                    None
                }
            })
            .collect(),
        Some(_) => {
            issues.push(ConfigIssue::new(key, "must be a list"));
            Vec::new()
        }
    }
}

/// Process settings, handed to Pingora.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerSection {
    /// Worker threads of the gateway listener.
    pub threads: usize,
    /// Let idle worker threads steal tasks from busy ones (a tokio multi-thread runtime). Off,
    /// each thread runs its own single-threaded runtime: lower latency per hop, less balance.
    pub work_stealing: bool,
    /// Seconds a SIGTERM waits for in-flight requests before shutting runtimes down.
    /// (Pingora's own default is 300 s; ours is short and explicit.)
    pub grace_period_seconds: u64,
    /// Seconds runtimes get to stop after the grace period.
    pub graceful_shutdown_timeout_seconds: u64,
    pub daemon: bool,
    pub pid_file: String,
    /// The socket the listeners are handed over on during a graceful upgrade (`-u`).
    pub upgrade_sock: String,
    pub error_log: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Idle upstream connections kept per process.
    pub upstream_keepalive_pool_size: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            work_stealing: true,
            grace_period_seconds: 10,
            graceful_shutdown_timeout_seconds: 5,
            daemon: false,
            pid_file: "/tmp/komilion.pid".into(),
            upgrade_sock: "/tmp/komilion_upgrade.sock".into(),
            error_log: None,
            user: None,
            group: None,
            upstream_keepalive_pool_size: 256,
        }
    }
}

/// Listening addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ListenSection {
    /// The API listeners (OpenAI and Anthropic surfaces).
    pub gateway: Vec<String>,
    /// `/metrics` and `/health`; leave out to disable.
    pub metrics: Option<String>,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            gateway: vec!["0.0.0.0:8080".into()],
            metrics: Some("127.0.0.1:9090".into()),
        }
    }
}

/// What one client may take from a listener: sizes, times and connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsSection {
    /// Largest request body accepted; larger ones get 413. Default 8 MiB.
    pub max_body_bytes: u64,
    /// Largest provider stream event accepted (an event still waiting for its blank line
    /// counts); past it the client's stream ends with an error event. Default 4 MiB.
    pub stream_event_max_bytes: u64,
    /// Delivered output a stream keeps before counting its tokens (for a stream that ends
    /// without usage). Default 16 KiB; at most 1 MiB.
    pub stream_count_window_bytes: u64,
    /// Largest request head (request line and headers); larger ones get 431. Default 64 KiB.
    pub max_header_bytes: u64,
    /// Time a client has to send a whole request head: from accepting a new connection, or from
    /// the first byte of the next request on a kept-alive one. Late heads get 408 and the
    /// connection is closed. Default 10 s.
    pub request_head_timeout_ms: u64,
    /// Time a client has to send a whole request body, from the end of its head. Late bodies
    /// get 408 and the connection is closed. Default 60 s.
    pub body_timeout_ms: u64,
    /// How long a kept-alive connection may wait for the first byte of its next request before
    /// it is closed. Default 60 s.
    pub idle_keepalive_ms: u64,
    /// Open connections each listener accepts; the ones over it get 503 and are closed.
    /// Default 10 000.
    pub max_connections_per_listener: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_body_bytes: 8 * 1024 * 1024,
            stream_event_max_bytes: 4 * 1024 * 1024,
            stream_count_window_bytes: 16 * 1024,
            max_header_bytes: 64 * 1024,
            request_head_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_keepalive_ms: 60_000,
            max_connections_per_listener: 10_000,
        }
    }
}

/// Which wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Azure,
    Anthropic,
    Gemini,
    Cohere,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Cohere => "cohere",
        }
    }
}

/// One upstream LLM provider.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSection {
    /// Unique name, used in `provider/model` references, metrics and usage records.
    pub name: String,
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`; http or https.
    pub base_url: String,
    /// The provider's key; write `${ENV_VAR}` rather than the secret.
    pub api_key: String,
    /// Models served by this provider. A model listed by several providers is tried on each in
    /// config order (the later ones are fallbacks).
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    /// When this provider is skipped for failing (per model).
    #[serde(default)]
    pub breaker: BreakerSection,
    /// `azure`: the `api-version` of its requests (default `2024-10-21`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// `azure`: the deployment serving each model (a model not listed is its own deployment).
    #[serde(default)]
    pub deployments: std::collections::BTreeMap<String, String>,
    /// Prices of this provider's models (USD per million tokens, decimal strings), for models the
    /// catalog does not price or that this provider sells at another price.
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, PriceSection>,
    /// What to do with a model that has no price (neither here nor in the catalog): `refuse`
    /// (default: wallet-billed keys get `400 model_not_priced`) or `free` (served at $0).
    #[serde(default)]
    pub unpriced: UnpricedPolicy,
    /// Ask this provider for a stream's usage chunk (`stream_options.include_usage`). Turn off
    /// for OpenAI-compatible servers that refuse the field; the gateway then counts the
    /// delivered output itself and marks the record estimated.
    #[serde(default = "yes")]
    pub stream_usage: bool,
}

fn yes() -> bool {
    true
}

/// A model's price on one provider, USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct PriceSection {
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    /// The input price when absent.
    #[serde(default)]
    pub cached_input_per_mtok: Option<String>,
    /// Input written to the provider's prompt cache; the input price when absent.
    #[serde(default)]
    pub cache_write_input_per_mtok: Option<String>,
    /// The same with a one-hour lifetime; the five-minute write price when absent.
    #[serde(default)]
    pub cache_write_1h_input_per_mtok: Option<String>,
}

/// What a provider does with models it has no price for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnpricedPolicy {
    /// Refuse them for wallet-billed keys: no request is ever held and charged at $0 by
    /// accident.
    #[default]
    Refuse,
    /// Serve them at $0 (a self-hosted model the operator does not charge for).
    Free,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TimeoutsSection {
    /// TCP + TLS connect.
    pub connect_ms: u64,
    /// From sending the request to the response status line (long prompts and reasoning models
    /// take minutes).
    pub first_byte_ms: u64,
    /// Longest silence between two reads of the response body.
    pub idle_ms: u64,
    /// Longest whole exchange, from sending the request to the answer's last byte (a long
    /// reasoning stream included).
    pub total_ms: u64,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        TimeoutsSection {
            connect_ms: 5_000,
            first_byte_ms: 600_000,
            idle_ms: 300_000,
            total_ms: 1_800_000,
        }
    }
}

/// A provider's circuit breaker (per model): it opens after `consecutive_failures` failures
/// in a row, or when `error_rate_percent` of at least `min_requests` attempts within
/// `window_ms` failed; requests then skip the provider for `cooldown_ms`, after which one
/// probe decides. A 429's `retry-after` (up to `max_retry_after_ms`) opens it for that long.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSection {
    pub consecutive_failures: u32,
    pub error_rate_percent: u32,
    pub min_requests: u32,
    pub window_ms: u64,
    pub cooldown_ms: u64,
    pub max_retry_after_ms: u64,
}

impl Default for BreakerSection {
    fn default() -> Self {
        BreakerSection {
            consecutive_failures: 5,
            error_rate_percent: 50,
            min_requests: 20,
            window_ms: 60_000,
            cooldown_ms: 30_000,
            max_retry_after_ms: 300_000,
        }
    }
}

/// How far one request goes down its candidates before it is answered with the last error.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackSection {
    /// Providers tried at most (candidates skipped by an open breaker do not count).
    pub max_attempts: u32,
    /// Time from the request's arrival within which an answer must have started; no further
    /// candidate is tried past it, and each attempt's first-byte wait is cut to what is left.
    pub deadline_ms: u64,
}

impl Default for FallbackSection {
    fn default() -> Self {
        FallbackSection {
            max_attempts: 3,
            deadline_ms: 600_000,
        }
    }
}

/// One entry of the plugin chain.
#[derive(Debug, Clone, Deserialize)]
pub struct PluginSection {
    /// The registry name of the plugin (`static_key_auth`, `request_id`, ...).
    pub name: String,
    /// The plugin's own settings, validated by the plugin.
    #[serde(default)]
    pub settings: PluginSettings,
}

/// The admin API's listener.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminSection {
    /// e.g. `127.0.0.1:9091`; keep it off the public network.
    pub listen: String,
    /// The bearer token admin calls must carry; write `${KOMILION_ADMIN_TOKEN}`.
    pub token: String,
}

/// Stripe top-ups (`POST /webhooks/stripe` on the gateway listener).
#[derive(Debug, Clone, Deserialize)]
pub struct StripeSection {
    /// The endpoint's signing secret (`whsec_…`); write `${STRIPE_WEBHOOK_SECRET}`.
    pub webhook_secret: String,
    /// Oldest accepted signature timestamp, in seconds (Stripe's default is 300).
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
}

fn default_tolerance() -> u64 {
    300
}

/// The usage log.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UsageSection {
    /// The local spool directory (append-only files, drained into the store).
    pub spool_dir: String,
    /// Records per store write.
    pub batch_size: usize,
    /// Usage older than this many days is deleted.
    pub retention_days: u32,
}

impl Default for UsageSection {
    fn default() -> Self {
        UsageSection {
            spool_dir: "komilion-spool".into(),
            batch_size: 1000,
            retention_days: 400,
        }
    }
}

/// Prepaid wallets (with a store).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WalletsSection {
    /// Output tokens held for a request without `max_tokens` (capped by the model's limit).
    pub max_output_tokens: u64,
    /// Largest lease per account and instance, decimal USD.
    pub lease_max_usd: String,
    /// Lease lifetime in the store, renewed while in use.
    pub lease_ttl_secs: u64,
    /// An idle lease goes back to the wallet after this long.
    pub idle_return_secs: u64,
    /// Leases of vanished instances are reclaimed this long after expiring.
    pub reclaim_grace_secs: u64,
}

impl Default for WalletsSection {
    fn default() -> Self {
        WalletsSection {
            max_output_tokens: 8192,
            lease_max_usd: "5".into(),
            lease_ttl_secs: 30,
            idle_return_secs: 10,
            reclaim_grace_secs: 300,
        }
    }
}

/// Usage alerts, sent as JSON webhooks.
#[derive(Debug, Clone, Deserialize)]
pub struct AlertsSection {
    pub webhook_url: String,
    /// Alert when an account's balance falls below this (decimal USD).
    #[serde(default)]
    pub wallet_below_usd: Option<String>,
    /// Alert when a key has spent this percentage of its budget.
    #[serde(default)]
    pub key_budget_percent: Option<u32>,
}
