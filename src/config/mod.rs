//! The config file (`komilion.yaml`) and the validated config the gateway runs on.
//!
//! The file format ([`file`]) is not the internal config ([`Config`]): the file is parsed, `${ENV}`
//! references are expanded, every section is checked, and only then is a [`Config`] built. Every
//! problem is collected with its path, so an operator fixes a config in one pass.

mod env;
mod file;

pub use file::{
    AdminSection, AlertsSection, FileConfig, LimitsSection, ListenSection, PluginSection, PriceSection, ProviderKind,
    ProviderSection, ServerSection, StripeSection, TimeoutsSection, UnpricedPolicy, UsageSection, WalletsSection,
};

use komilion_sdk::ConfigIssue;
use std::fmt;
use std::path::Path;
use std::time::Duration;
use url::Url;

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} config error{}:", if n == 1 { "" } else { "s" })?;
        for issue in &self.0 {
            writeln!(f, "  - {issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A provider, validated: its URL split into what a connection needs.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The base URL's path without a trailing slash, e.g. `/v1`.
    pub base_path: String,
    pub api_key: String,
    pub models: Vec<String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub breaker: crate::providers::breaker::BreakerConfig,
    /// `azure`: the API version and each model's deployment.
    pub api_version: Option<String>,
    pub deployments: std::collections::HashMap<String, String>,
    /// This provider's own prices, by model.
    pub prices: std::collections::HashMap<String, crate::catalog::ModelPrice>,
    pub unpriced: UnpricedPolicy,
    /// Ask for a stream's usage chunk (`stream_options.include_usage`).
    pub stream_usage: bool,
}

/// What one streamed answer may make the gateway keep (see `limits` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_event_bytes: usize,
    pub count_window_bytes: usize,
}

/// The validated config the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSection,
    pub listen: ListenSection,
    pub max_body_bytes: usize,
    pub stream_limits: StreamLimits,
    /// Time, size and connection limits on clients (the `limits` section but the body size).
    pub client: crate::edge::ClientLimits,
    pub providers: Vec<ProviderConfig>,
    pub plugins: Vec<PluginSection>,
    /// `sqlite://PATH` or `postgres://…`; none means no accounts (static keys only).
    pub store: Option<String>,
    pub admin: Option<AdminSection>,
    pub stripe: Option<StripeSection>,
    pub usage: UsageSection,
    pub wallets: crate::billing::wallet::WalletSettings,
    pub alerts: Option<Alerts>,
    pub catalog: crate::catalog::Catalog,
    pub fallback: FallbackLimits,
}

/// How far one request goes down its candidates (the `fallback` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackLimits {
    pub max_attempts: usize,
    pub deadline: Duration,
}

/// Alert rules and where they go.
#[derive(Debug, Clone)]
pub struct Alerts {
    pub webhook_url: String,
    pub rules: crate::store::AlertRules,
}

impl Config {
    /// Read, expand and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigIssue::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        Config::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parse a config from YAML text, looking `${ENV}` references up with `env`.
    pub fn from_yaml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let yaml: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigErrors(vec![ConfigIssue::new("", format!("invalid YAML: {e}"))]))?;
        let mut issues = Vec::new();
        let json = env::to_json_expanding_env(yaml, "", env, &mut issues);
        let file = FileConfig::from_json(&json, &mut issues);
        let config = Config::validate(file, &mut issues);
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(issues))
        }
    }

    fn validate(file: FileConfig, issues: &mut Vec<ConfigIssue>) -> Config {
        if file.limits.max_body_bytes == 0 {
            issues.push(ConfigIssue::new("limits.max_body_bytes", "must be greater than 0"));
        }
        let stream_limits = validate_stream_limits(&file.limits, issues);
        let client = validate_client_limits(&file.limits, issues);
        if file.listen.gateway.is_empty() {
            issues.push(ConfigIssue::new("listen.gateway", "at least one address is required"));
        }
        for (i, addr) in file.listen.gateway.iter().enumerate() {
            check_addr(addr, &format!("listen.gateway[{i}]"), issues);
        }
        if let Some(addr) = &file.listen.metrics {
            check_addr(addr, "listen.metrics", issues);
        }
        if file.server.threads == 0 {
            issues.push(ConfigIssue::new("server.threads", "must be at least 1"));
        }
        let mut providers = Vec::with_capacity(file.providers.len());
        for (i, p) in file.providers {
            let at = format!("providers[{i}]");
            if providers.iter().any(|o: &ProviderConfig| o.name == p.name) {
                issues.push(ConfigIssue::new(
                    format!("{at}.name"),
                    format!("duplicate provider `{}`", p.name),
                ));
            }
            if let Some(provider) = validate_provider(p, &at, issues) {
                providers.push(provider);
            }
        }
        if let Some(store) = &file.store {
            let known = ["sqlite://", "postgres://", "postgresql://"];
            if !known.iter().any(|p| store.starts_with(p)) {
                issues.push(ConfigIssue::new(
                    "store",
                    "must start with sqlite://, postgres:// or postgresql://",
                ));
            } else if !store.starts_with("sqlite://") {
                // Parameters and TLS settings; `sslrootcert` itself is read when the store opens.
                if let Err(e) = crate::store::pg_tls::parse_url(store) {
                    issues.push(ConfigIssue::new("store", e.to_string()));
                }
            }
        }
        if let Some(admin) = &file.admin {
            check_addr(&admin.listen, "admin.listen", issues);
            if admin.token.len() < 16 {
                issues.push(ConfigIssue::new("admin.token", "use at least 16 characters"));
            }
            if file.store.is_none() {
                issues.push(ConfigIssue::new("admin", "the admin API needs a store: set `store:`"));
            }
        }
        if let Some(stripe) = &file.stripe {
            if stripe.webhook_secret.is_empty() {
                issues.push(ConfigIssue::new("stripe.webhook_secret", "must not be empty"));
            }
            if file.store.is_none() {
                issues.push(ConfigIssue::new("stripe", "Stripe top-ups need a store: set `store:`"));
            }
        }
        let lease_max = crate::money::parse_usd(&file.wallets.lease_max_usd).unwrap_or_else(|e| {
            issues.push(ConfigIssue::new("wallets.lease_max_usd", e.to_string()));
            0
        });
        if file.wallets.lease_ttl_secs == 0 {
            issues.push(ConfigIssue::new("wallets.lease_ttl_secs", "must be at least 1"));
        }
        let wallets = crate::billing::wallet::WalletSettings {
            max_output_tokens: file.wallets.max_output_tokens,
            lease_max,
            lease_ttl: Duration::from_secs(file.wallets.lease_ttl_secs),
            idle_return: Duration::from_secs(file.wallets.idle_return_secs),
            reclaim_grace: Duration::from_secs(file.wallets.reclaim_grace_secs),
        };
        if file.usage.batch_size == 0 {
            issues.push(ConfigIssue::new("usage.batch_size", "must be at least 1"));
        }
        let alerts = file.alerts.as_ref().map(|a| {
            if Url::parse(&a.webhook_url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                issues.push(ConfigIssue::new("alerts.webhook_url", "must be an http or https URL"));
            }
            let wallet_below = a.wallet_below_usd.as_deref().and_then(|t| {
                crate::money::parse_usd(t)
                    .map_err(|e| issues.push(ConfigIssue::new("alerts.wallet_below_usd", e.to_string())))
                    .ok()
            });
            if a.key_budget_percent.is_some_and(|p| p == 0 || p > 100) {
                issues.push(ConfigIssue::new("alerts.key_budget_percent", "must be 1 to 100"));
            }
            Alerts {
                webhook_url: a.webhook_url.clone(),
                rules: crate::store::AlertRules {
                    wallet_below_nano_usd: wallet_below,
                    key_budget_percent: a.key_budget_percent,
                },
            }
        });
        let catalog = match &file.catalog {
            None => crate::catalog::Catalog::embedded(),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => crate::catalog::Catalog::from_yaml(&text).unwrap_or_else(|found| {
                    issues.extend(found.into_iter().map(|i| i.under("catalog")));
                    crate::catalog::Catalog::embedded()
                }),
                Err(e) => {
                    issues.push(ConfigIssue::new("catalog", format!("{path}: {e}")));
                    crate::catalog::Catalog::embedded()
                }
            },
        };
        for (i, plugin) in file.plugins.iter().enumerate() {
            if plugin.name.trim().is_empty() {
                issues.push(ConfigIssue::new(format!("plugins[{i}].name"), "must not be empty"));
            }
        }
        Config {
            server: file.server,
            listen: file.listen,
            max_body_bytes: file.limits.max_body_bytes as usize,
            stream_limits,
            client,
            providers,
            plugins: file.plugins,
            store: file.store,
            admin: file.admin,
            stripe: file.stripe,
            usage: file.usage,
            wallets,
            alerts,
            catalog,
            fallback: validate_fallback(&file.fallback, issues),
        }
    }
}

fn validate_fallback(f: &file::FallbackSection, issues: &mut Vec<ConfigIssue>) -> FallbackLimits {
    if f.max_attempts == 0 {
        issues.push(ConfigIssue::new("fallback.max_attempts", "must be at least 1"));
    }
    if !(1..=MAX_LIMIT_MS).contains(&f.deadline_ms) {
        issues.push(ConfigIssue::new(
            "fallback.deadline_ms",
            format!("must be between 1 and {MAX_LIMIT_MS}"),
        ));
    }
    FallbackLimits {
        max_attempts: f.max_attempts.max(1) as usize,
        deadline: Duration::from_millis(f.deadline_ms.clamp(1, MAX_LIMIT_MS)),
    }
}

/// Longest time limit accepted: a day. A bound keeps deadlines (now + limit) from overflowing.
const MAX_LIMIT_MS: u64 = 86_400_000;

fn validate_stream_limits(limits: &LimitsSection, issues: &mut Vec<ConfigIssue>) -> StreamLimits {
    if !(1024..=1024 * 1024 * 1024).contains(&limits.stream_event_max_bytes) {
        issues.push(ConfigIssue::new(
            "limits.stream_event_max_bytes",
            "must be between 1024 (1 KiB) and 1073741824 (1 GiB)",
        ));
    }
    if !(1024..=1024 * 1024).contains(&limits.stream_count_window_bytes) {
        issues.push(ConfigIssue::new(
            "limits.stream_count_window_bytes",
            "must be between 1024 (1 KiB) and 1048576 (1 MiB)",
        ));
    }
    StreamLimits {
        max_event_bytes: limits.stream_event_max_bytes as usize,
        count_window_bytes: limits.stream_count_window_bytes as usize,
    }
}

fn validate_client_limits(limits: &LimitsSection, issues: &mut Vec<ConfigIssue>) -> crate::edge::ClientLimits {
    use crate::edge::{ClientLimits, PINGORA_MAX_HEADER_BYTES};
    let mut millis = |field: &str, ms: u64| {
        if !(1..=MAX_LIMIT_MS).contains(&ms) {
            issues.push(ConfigIssue::new(
                format!("limits.{field}"),
                format!("must be 1 to {MAX_LIMIT_MS} milliseconds (a day), not {ms}"),
            ));
        }
        Duration::from_millis(ms.clamp(1, MAX_LIMIT_MS))
    };
    let head_timeout = millis("request_head_timeout_ms", limits.request_head_timeout_ms);
    let body_timeout = millis("body_timeout_ms", limits.body_timeout_ms);
    let idle_keepalive = millis("idle_keepalive_ms", limits.idle_keepalive_ms);
    // Pingora refuses heads over its own limit with a bare 400; ours must be below it so that
    // an oversized head always gets our 431.
    if !(1024..=PINGORA_MAX_HEADER_BYTES as u64).contains(&limits.max_header_bytes) {
        issues.push(ConfigIssue::new(
            "limits.max_header_bytes",
            format!(
                "must be 1024 to {PINGORA_MAX_HEADER_BYTES} bytes (Pingora's own limit), not {}",
                limits.max_header_bytes
            ),
        ));
    }
    if limits.max_connections_per_listener == 0 {
        issues.push(ConfigIssue::new(
            "limits.max_connections_per_listener",
            "must be at least 1",
        ));
    }
    ClientLimits {
        max_header_bytes: limits.max_header_bytes.clamp(1024, PINGORA_MAX_HEADER_BYTES as u64) as usize,
        head_timeout,
        body_timeout,
        idle_keepalive,
        max_connections: usize::try_from(limits.max_connections_per_listener)
            .unwrap_or(usize::MAX)
            .max(1),
    }
}

fn check_addr(addr: &str, at: &str, issues: &mut Vec<ConfigIssue>) {
    if addr.parse::<std::net::SocketAddr>().is_err() {
        issues.push(ConfigIssue::new(
            at,
            format!("`{addr}` is not an address like 127.0.0.1:8080"),
        ));
    }
}

fn validate_provider(p: ProviderSection, at: &str, issues: &mut Vec<ConfigIssue>) -> Option<ProviderConfig> {
    if p.name.is_empty() || p.name.contains('/') {
        issues.push(ConfigIssue::new(
            format!("{at}.name"),
            "must be non-empty and contain no `/`",
        ));
    }
    if p.kind != ProviderKind::Azure && (p.api_version.is_some() || !p.deployments.is_empty()) {
        issues.push(ConfigIssue::new(
            format!("{at}.api_version"),
            "`api_version` and `deployments` are for `kind: azure` providers",
        ));
    }
    if p.api_key.is_empty() {
        issues.push(ConfigIssue::new(format!("{at}.api_key"), "must not be empty"));
    }
    let url = match Url::parse(&p.base_url) {
        Ok(url) => url,
        Err(e) => {
            issues.push(ConfigIssue::new(format!("{at}.base_url"), format!("invalid URL: {e}")));
            return None;
        }
    };
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            issues.push(ConfigIssue::new(
                format!("{at}.base_url"),
                format!("scheme must be http or https, not {other}"),
            ));
            return None;
        }
    };
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        issues.push(ConfigIssue::new(format!("{at}.base_url"), "has no host"));
        return None;
    };
    if url.query().is_some() || !url.username().is_empty() {
        issues.push(ConfigIssue::new(
            format!("{at}.base_url"),
            "must not carry a query or credentials",
        ));
    }
    for (field, ms) in [
        ("timeouts.connect_ms", p.timeouts.connect_ms),
        ("timeouts.first_byte_ms", p.timeouts.first_byte_ms),
        ("timeouts.idle_ms", p.timeouts.idle_ms),
        ("timeouts.total_ms", p.timeouts.total_ms),
        ("breaker.window_ms", p.breaker.window_ms),
        ("breaker.cooldown_ms", p.breaker.cooldown_ms),
        ("breaker.max_retry_after_ms", p.breaker.max_retry_after_ms),
    ] {
        if !(1..=MAX_LIMIT_MS).contains(&ms) {
            issues.push(ConfigIssue::new(
                format!("{at}.{field}"),
                format!("must be between 1 and {MAX_LIMIT_MS}"),
            ));
        }
    }
    if p.breaker.consecutive_failures == 0 {
        issues.push(ConfigIssue::new(
            format!("{at}.breaker.consecutive_failures"),
            "must be at least 1",
        ));
    }
    if !(1..=100).contains(&p.breaker.error_rate_percent) {
        issues.push(ConfigIssue::new(
            format!("{at}.breaker.error_rate_percent"),
            "must be between 1 and 100",
        ));
    }
    let ms = |ms: u64| Duration::from_millis(ms.clamp(1, MAX_LIMIT_MS));
    let breaker = crate::providers::breaker::BreakerConfig {
        consecutive_failures: p.breaker.consecutive_failures.max(1),
        error_rate_percent: p.breaker.error_rate_percent.clamp(1, 100),
        min_requests: p.breaker.min_requests.max(1),
        window: ms(p.breaker.window_ms),
        cooldown: ms(p.breaker.cooldown_ms),
        max_retry_after: ms(p.breaker.max_retry_after_ms),
    };
    let mut prices = std::collections::HashMap::new();
    for (model, price) in &p.prices {
        let at = format!("{at}.prices.{model}");
        match crate::catalog::ModelPrice::parse(crate::catalog::PriceText {
            input: &price.input_per_mtok,
            output: &price.output_per_mtok,
            cached_input: price.cached_input_per_mtok.as_deref(),
            cache_write_input: price.cache_write_input_per_mtok.as_deref(),
            cache_write_1h_input: price.cache_write_1h_input_per_mtok.as_deref(),
        }) {
            Ok(parsed) => {
                prices.insert(model.clone(), parsed);
            }
            Err(found) => issues.extend(found.into_iter().map(|i| i.under(&at))),
        }
    }
    Some(ProviderConfig {
        prices,
        unpriced: p.unpriced,
        stream_usage: p.stream_usage,
        host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 }),
        base_path: url.path().trim_end_matches('/').to_owned(),
        tls,
        name: p.name,
        kind: p.kind,
        api_key: p.api_key,
        models: p.models,
        connect_timeout: ms(p.timeouts.connect_ms),
        first_byte_timeout: ms(p.timeouts.first_byte_ms),
        idle_timeout: ms(p.timeouts.idle_ms),
        total_timeout: ms(p.timeouts.total_ms),
        breaker,
        api_version: p.api_version,
        deployments: p.deployments.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "OPENAI_KEY").then(|| "sk-upstream".to_owned())
    }

    const GOOD: &str = r#"
listen:
  gateway: ["127.0.0.1:8080"]
  metrics: 127.0.0.1:9090
providers:
  - name: openai
    kind: openai
    base_url: https://api.openai.com/v1/
    api_key: ${OPENAI_KEY}
    models: [gpt-4o-mini]
plugins:
  - name: request_id
"#;

    #[test]
    fn a_good_config_loads_with_env_expanded() {
        let c = Config::from_yaml(GOOD, &env).unwrap();
        let p = &c.providers[0];
        assert_eq!(
            (p.host.as_str(), p.port, p.tls, p.base_path.as_str()),
            ("api.openai.com", 443, true, "/v1")
        );
        assert_eq!(p.api_key, "sk-upstream");
        assert_eq!(c.max_body_bytes, 8 * 1024 * 1024);
        assert_eq!(
            c.client,
            crate::edge::ClientLimits {
                max_header_bytes: 64 * 1024,
                head_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(60),
                idle_keepalive: Duration::from_secs(60),
                max_connections: 10_000,
            }
        );
    }

    #[test]
    fn client_limits_are_checked_with_their_bounds() {
        let text = format!(
            "{GOOD}limits:\n  request_head_timeout_ms: 0\n  body_timeout_ms: 90000000\n  idle_keepalive_ms: 1500\n  max_header_bytes: 2000000\n  max_connections_per_listener: 0\n"
        );
        let errs = Config::from_yaml(&text, &env).unwrap_err();
        let messages: Vec<String> = errs.0.iter().map(|i| i.to_string()).collect();
        for (path, words) in [
            (
                "limits.request_head_timeout_ms",
                "must be 1 to 86400000 milliseconds (a day), not 0",
            ),
            ("limits.body_timeout_ms", "not 90000000"),
            ("limits.max_header_bytes", "must be 1024 to 1048575 bytes"),
            ("limits.max_connections_per_listener", "must be at least 1"),
        ] {
            assert!(
                errs.0.iter().any(|i| i.path == path && i.message.contains(words)),
                "{path}: {words} missing from {messages:?}"
            );
        }
        assert!(
            !errs.0.iter().any(|i| i.path == "limits.idle_keepalive_ms"),
            "{messages:?}"
        );

        let text = format!(
            "{GOOD}limits:\n  request_head_timeout_ms: 1500\n  idle_keepalive_ms: 250\n  max_connections_per_listener: 7\n"
        );
        let c = Config::from_yaml(&text, &env).unwrap();
        assert_eq!(c.client.head_timeout, Duration::from_millis(1500));
        assert_eq!(c.client.idle_keepalive, Duration::from_millis(250));
        assert_eq!(c.client.max_connections, 7);
        assert_eq!(c.client.body_timeout, Duration::from_secs(60));
    }

    #[test]
    fn every_error_is_listed_with_its_path() {
        let text = r#"
listen:
  gateway: ["nope"]
limits:
  max_body_bytes: 0
  max_bdy: 1
providers:
  - name: a
    kind: openai
    base_url: ftp://x
    api_key: ${MISSING_VAR}
    colour: blue
  - name: b
    kind: bedrock
    base_url: http://localhost:1/v1
    api_key: k
typo: 1
"#;
        let errs = Config::from_yaml(text, &env).unwrap_err();
        let paths: Vec<_> = errs.0.iter().map(|i| i.path.as_str()).collect();
        for expected in ["providers[0].api_key", "limits.max_bdy", "providers[0].colour", "typo"] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
        // A section with an unknown key is not validated further; the others are.
        for expected in ["listen.gateway[0]", "providers[1].kind"] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
        let text = text.replace("  max_bdy: 1\n", "").replace("    colour: blue\n", "");
        let errs = Config::from_yaml(&text, &env).unwrap_err();
        let paths: Vec<_> = errs.0.iter().map(|i| i.path.as_str()).collect();
        for expected in ["limits.max_body_bytes", "providers[0].base_url", "providers[1].kind"] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
    }

    #[test]
    fn store_tls_settings_are_checked_without_connecting() {
        let with_store = |url: &str| format!("{GOOD}store: \"{url}\"\n");
        Config::from_yaml(
            &with_store("postgres://k:pw@db/k?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            &env,
        )
        .expect("the root file is read when the store opens, not by `check`");
        let errs = Config::from_yaml(&with_store("postgres://k:pw@db/k?sslmode=verify"), &env).unwrap_err();
        let issue = errs.0.iter().find(|i| i.path == "store").expect("a store issue");
        assert!(issue.message.contains("unknown sslmode `verify`"), "{}", issue.message);
        assert!(!issue.message.contains("pw"), "no password in messages");
    }
}
