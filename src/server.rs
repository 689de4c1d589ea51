//! Assembling the Pingora server from a validated [`Config`]: the gateway listener, the admin
//! and metrics listeners, and the background services.

use crate::admin::AdminApi;
use crate::billing::wallet::WalletBook;
use crate::chain::PluginChain;
use crate::config::Config;
use crate::edge::Edge;
use crate::metrics::MetricsApp;
use crate::proxy::{Billing, Gateway, StripeEndpoint};
use crate::router::ModelTable;
use crate::secrets::MasterKeys;
use crate::store::cache::{StoreCache, StoreSlot};
use crate::store::service::{BillingWork, StoreService};
use crate::upstream::{DnsRefresher, Upstreams};
use crate::usage::spool::{SpoolMode, UsageSpool};
use komilion_sdk::{ConfigIssue, PluginRegistry, PluginServices};
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerApp;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How often provider host names are resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{}", crate::config::ConfigErrors(.0.clone()))]
    Config(Vec<ConfigIssue>),
    #[error("{0}")]
    Upstream(String),
    #[error("cannot open the store {url}: {reason}")]
    Store { url: String, reason: String },
    #[error("{0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("{0}")]
    Spool(#[from] crate::usage::spool::SpoolError),
    #[error("cannot listen on {addr} ({what}): {reason}; is another komilion or another server already there?")]
    Listen {
        addr: String,
        what: &'static str,
        reason: std::io::Error,
    },
}

/// Refuse to start on an address something already listens on. Pingora binds its listeners
/// with `SO_REUSEPORT`, so a second gateway on a taken port would bind as well and the kernel
/// would split connections between the two processes; a plain bind (without it) fails instead.
/// Skipped for a graceful upgrade, whose listeners come from the old process.
pub fn check_listeners_free(config: &Config) -> Result<(), BuildError> {
    let mut listeners: Vec<(&str, &'static str)> = config
        .listen
        .gateway
        .iter()
        .map(|a| (a.as_str(), "listen.gateway"))
        .collect();
    listeners.extend(config.listen.metrics.as_deref().map(|a| (a, "listen.metrics")));
    listeners.extend(config.admin.as_ref().map(|a| (a.listen.as_str(), "admin.listen")));
    for (addr, what) in listeners {
        if let Err(reason) = std::net::TcpListener::bind(addr) {
            return Err(BuildError::Listen {
                addr: addr.to_owned(),
                what,
                reason,
            });
        }
    }
    Ok(())
}

/// Pingora's process settings from ours.
pub fn server_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        work_stealing: s.work_stealing,
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        daemon: s.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        error_log: s.error_log.clone(),
        user: s.user.clone(),
        group: s.group.clone(),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        ..ServerConf::default()
    }
}

/// The store's URL without its password, for messages. libpq URLs may also carry it as a
/// `password=` parameter.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let (base, query) = match u.as_str().split_once('?') {
                Some((base, query)) => (base.to_owned(), query),
                None => return u.to_string(),
            };
            let query: Vec<&str> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***",
                    _ => p,
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        // Not a URL we can take apart: drop everything before the host, where a password goes.
        Err(_) => match url.split_once("://").zip(url.rsplit_once('@')) {
            Some(((scheme, _), (_, host))) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
    }
}

/// Plugin services over a (not yet open) store, or none without a store.
pub fn plugin_services(cache: Option<&Arc<StoreCache>>) -> PluginServices {
    match cache {
        Some(cache) => PluginServices::new(Some(cache.clone()), Some(cache.clone())),
        None => PluginServices::default(),
    }
}

/// Build the plugin chain of a config (also what `komilion check` runs).
pub fn build_chain(
    config: &Config,
    registry: &PluginRegistry,
    services: &PluginServices,
) -> Result<PluginChain, BuildError> {
    PluginChain::build(&config.plugins, registry, services).map_err(BuildError::Config)
}

/// What `komilion check` warns about: settings that work but are likely not what the operator
/// wants (they never stop a start).
pub fn config_warnings(config: &Config) -> Vec<String> {
    let mut warnings =
        crate::billing::pricing::Pricing::new(config.catalog.clone(), &config.providers).warnings(&config.providers);
    warnings.extend(config.admin.as_ref().and_then(|a| admin_exposure_warning(&a.listen)));
    for (i, plugin) in config.plugins.iter().enumerate() {
        let at = format!("plugins[{i}].settings");
        warnings.extend(
            komilion_plugins::settings_warnings(&plugin.name, &plugin.settings)
                .into_iter()
                .map(|issue| issue.under(&at))
                .map(|issue| format!("{} ({}): {}", issue.path, plugin.name, issue.message)),
        );
    }
    warnings
}

/// The admin listener speaks plain HTTP: on anything but loopback, the admin token and every
/// account's data cross the network unencrypted. Komilion does not terminate TLS there itself
/// (one less certificate to rotate in the gateway); the operator puts a TLS hop in front.
fn admin_exposure_warning(listen: &str) -> Option<String> {
    // `Config::load` has checked that it parses.
    let addr: std::net::SocketAddr = listen.parse().ok()?;
    if addr.ip().to_canonical().is_loopback() {
        return None;
    }
    let port = addr.port();
    Some(format!(
        "admin.listen: `{listen}` is not a loopback address and the admin API speaks plain HTTP, so the \
         admin token and account data would cross the network unencrypted; bind it to 127.0.0.1:{port} and \
         reach it through a TLS-terminating reverse proxy on the same host (nginx, Caddy) or an SSH tunnel \
         (ssh -L {port}:127.0.0.1:{port} <host>)"
    ))
}

/// Open the store once before serving: an unreachable store or a failed migration stops the
/// start with a clear message instead of a gateway that answers 503 to everyone. The runtime
/// used here is dropped before Pingora forks; the serving store is opened by [`StoreService`].
pub fn check_store(url: &str) -> Result<(), BuildError> {
    let failed = |reason: String| BuildError::Store {
        url: redacted(url),
        reason,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(e.to_string()))?;
    runtime
        .block_on(crate::store::open(url))
        .map(drop)
        .map_err(|e| failed(e.to_string()))
}

/// A listening service for `app` on `addrs`, behind the edge's client limits.
fn edge_service<A>(name: &str, app: A, config: &Config, addrs: &[&str]) -> Service<Edge<A>>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    let mut service = Service::new(name.to_owned(), Edge::new(app, config.client.clone(), addrs));
    for addr in addrs {
        service.add_tcp(addr);
    }
    service
}

/// The whole server, ready for `run_forever()`.
pub fn build_server(config: &Config, mut opt: Opt) -> Result<Server, BuildError> {
    // Our config file is not Pingora's: hand Pingora its settings directly.
    opt.conf = None;
    let conf = server_conf(config);
    if !opt.upgrade {
        check_listeners_free(config)?;
    }
    if let Some(url) = &config.store {
        check_store(url)?;
    }
    let master_keys = MasterKeys::from_env()?.map(Arc::new);
    let slot: StoreSlot = Arc::new(OnceLock::new());
    let cache = config.store.as_ref().map(|_| StoreCache::new(slot.clone()));
    let chain = build_chain(
        config,
        &komilion_plugins::builtin_registry(),
        &plugin_services(cache.as_ref()),
    )?;
    let billing = match &config.store {
        Some(_) => {
            // A graceful upgrade's new process shares the spool with the old one until it exits.
            let mode = if opt.upgrade {
                SpoolMode::Successor
            } else {
                SpoolMode::Exclusive
            };
            let spool = Arc::new(UsageSpool::open(std::path::Path::new(&config.usage.spool_dir), mode)?);
            let instance_id = crate::store::new_id("inst");
            let wallets = Arc::new(WalletBook::new(slot.clone(), instance_id, config.wallets.clone()));
            Some(Billing { wallets, spool })
        }
        None => None,
    };
    let upstreams = Arc::new(Upstreams::new(&config.providers).map_err(BuildError::Upstream)?);
    let breakers = Arc::new(crate::providers::breaker::Breakers::new(
        config.providers.iter().map(|p| (p.name.clone(), p.breaker)).collect(),
    ));
    let gateway = Gateway {
        breakers: breakers.clone(),
        fallback: config.fallback,
        account_keys: match (&config.store, &master_keys) {
            (Some(_), Some(master)) => Some(Arc::new(crate::providers::byok::AccountKeys::new(
                slot.clone(),
                master.clone(),
            ))),
            _ => None,
        },
        chain,
        upstreams: upstreams.clone(),
        models: ModelTable::new(&config.providers),
        connector: Connector::new(Some(ConnectorOptions::from_server_conf(&conf))),
        max_body_bytes: config.max_body_bytes,
        stream_limits: config.stream_limits,
        body_timeout: config.client.body_timeout,
        stripe: config.stripe.as_ref().map(|s| StripeEndpoint {
            secret: s.webhook_secret.clone(),
            tolerance_secs: s.tolerance_secs,
            store: slot.clone(),
        }),
        pricing: crate::billing::pricing::Pricing::new(config.catalog.clone(), &config.providers),
        billing: billing.clone(),
        store: config.store.as_ref().map(|_| slot.clone()),
    };

    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // Every listener runs its app behind the edge's limits (slow clients, connection caps,
    // the gateway's own 400s); see `edge.rs` for why that is not a Pingora hook.
    let gateway_addrs: Vec<&str> = config.listen.gateway.iter().map(String::as_str).collect();
    let proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    server.add_service(edge_service("komilion gateway", proxy, config, &gateway_addrs));

    if let Some(admin) = &config.admin {
        let api = AdminApi::new(
            slot.clone(),
            &admin.token,
            master_keys.clone(),
            config.client.body_timeout,
        );
        let proxy = pingora::proxy::http_proxy(&server.configuration, api);
        server.add_service(edge_service("komilion admin", proxy, config, &[&admin.listen]));
    }

    if let Some(addr) = &config.listen.metrics {
        let ready = config.store.as_ref().map(|_| slot.clone());
        let app = HttpServer::new_app(MetricsApp { ready, breakers });
        server.add_service(edge_service("komilion metrics", app, config, &[addr]));
    }
    if let (Some(url), Some(cache)) = (&config.store, cache) {
        let billing = billing.map(|b| BillingWork {
            wallets: b.wallets,
            spool: b.spool,
            batch_size: config.usage.batch_size,
        });
        let service = StoreService {
            url: url.clone(),
            grace: Duration::from_secs(config.server.grace_period_seconds),
            cache,
            billing,
            alerts: config.alerts.clone(),
            retention_days: config.usage.retention_days,
        };
        server.add_service(background_service("store", service));
    }
    server.add_service(background_service(
        "dns refresh",
        DnsRefresher {
            upstreams,
            every: DNS_REFRESH,
        },
    ));
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::{admin_exposure_warning, redacted};

    #[test]
    fn an_admin_listener_off_loopback_is_warned_about() {
        for quiet in [
            "127.0.0.1:9091",
            "127.0.0.2:9091",
            "[::1]:9091",
            "[::ffff:127.0.0.1]:9091",
        ] {
            assert_eq!(admin_exposure_warning(quiet), None, "{quiet}");
        }
        for exposed in ["0.0.0.0:9091", "10.0.0.5:9091", "[::]:9091", "[2001:db8::1]:9091"] {
            let warning = admin_exposure_warning(exposed).expect(exposed);
            assert!(warning.contains("127.0.0.1:9091"), "{warning}");
            assert!(warning.contains("TLS-terminating reverse proxy"), "{warning}");
            assert!(warning.contains("ssh -L 9091:127.0.0.1:9091"), "{warning}");
        }
    }

    #[test]
    fn store_urls_lose_their_passwords() {
        assert_eq!(
            redacted("postgres://u:secret@db:5432/k?sslmode=require"),
            "postgres://u:***@db:5432/k?sslmode=require"
        );
        assert_eq!(
            redacted("postgresql://u@db/k?password=secret&sslmode=verify-full"),
            "postgresql://u@db/k?password=***&sslmode=verify-full"
        );
        assert_eq!(redacted("postgres://u:secret@[bad/k"), "postgres://***@[bad/k");
        assert_eq!(redacted("sqlite:///var/lib/k.db"), "sqlite:///var/lib/k.db");
    }
}
